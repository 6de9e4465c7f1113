"""`bakery-slurm plan` through Click's CliRunner: output formats, `--only`, and bad matrices.

Every bad matrix must exit 2 with `Error: <file>: <key>: <message> (got <value>)` on stderr, print
nothing on stdout, and write nothing anywhere (the tmp dir is listed before and after).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from bakery_slurm.cli import cli
from conftest import MINIMAL_MATRIX

REPO_MATRIX = Path(__file__).resolve().parents[2] / "matrix.toml"
SEED_IDS = [f"{size}-{variant}/eng-nob__{method}"
            for size, size_methods in (("1b", ("linear", "task_arithmetic", "ties")),
                                       ("4b", ("linear", "task_arithmetic", "ties")),
                                       ("12b", ("ties",)))
            for variant in ("std", "open")
            for method in size_methods]
SAFE = ("names must be safe path segments (letters, digits, '_', '.', '+', '-'; "
        "no leading dot, no '..')")


def run_plan(*args: str):
    return CliRunner().invoke(cli, ["plan", *map(str, args)])


def listing(root: Path) -> list[tuple[str, int]]:
    """Every path under root with its size (0 for folders), to prove nothing was written."""
    return sorted((str(p.relative_to(root)), p.stat().st_size if p.is_file() else 0)
                  for p in root.rglob("*"))


def edit(old: str, new: str, text: str = MINIMAL_MATRIX) -> str:
    """`text` with `old` replaced by `new`; `old` must occur, so a case cannot silently be valid."""
    assert old in text, old
    return text.replace(old, new)


# ---------------------------------------------------------------------------------------------
# Happy paths on the repo's matrix.toml


def test_plan_table_lists_the_14_seed_cells():
    result = CliRunner().invoke(cli, ["plan", str(REPO_MATRIX)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["id", "method", "parameters", "base", "pinned"]
    assert [line.split()[0] for line in lines[1:]] == SEED_IDS
    row = next(line for line in lines if line.startswith("12b-open/eng-nob__ties "))
    assert row.split()[1:] == [
        "ties", "density=0.5", "weight=0.5",
        "hub:NbAiLab/nb-gpt-gemma3-12b-instruct-epoch-3-aurora-sft-2603-open-posttrain", "-"]
    assert result.stderr == ""


def test_plan_json_has_every_field():
    result = CliRunner().invoke(cli, ["plan", str(REPO_MATRIX), "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [row["id"] for row in rows] == SEED_IDS
    for row in rows:
        assert {"id", "size", "variant", "method", "parameters", "base", "adapters",
                "push"} <= set(row)
        assert set(row["adapters"]) == {"eng", "nob"}
        assert row["push"] == f"hub:NbAiLab/nb-gpt-gemma3-bakery-merges-2603/{row['id']}"
    ties = next(row for row in rows if row["id"] == "4b-std/eng-nob__ties")
    assert (ties["size"], ties["variant"], ties["method"]) == ("4b", "std", "ties")
    assert ties["parameters"] == {"density": {"eng": 0.5, "nob": 0.5},
                                  "weight": {"eng": 0.5, "nob": 0.5}}
    assert ties["base"] == "hub:NbAiLab/nb-gpt-gemma3-4b-instruct-epoch-3-aurora-sft-2603-posttrain"
    assert ties["adapters"]["eng"].startswith("hub:NbAiLab/nb-gpt-gemma3-bakery-adapters-2603/")


def test_plan_nl_is_one_object_per_line():
    result = CliRunner().invoke(cli, ["plan", str(REPO_MATRIX), "--nl"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["id"] for line in result.stdout.splitlines()] == SEED_IDS


@pytest.mark.parametrize("fmt", [[], ["--json"], ["--nl"]])
def test_plan_only_selects_by_glob(fmt):
    result = CliRunner().invoke(cli, ["plan", str(REPO_MATRIX), "--only", "12b-*", *fmt],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    if fmt == ["--json"]:
        ids = [row["id"] for row in json.loads(result.stdout)]
    elif fmt == ["--nl"]:
        ids = [json.loads(line)["id"] for line in result.stdout.splitlines()]
    else:
        ids = [line.split()[0] for line in result.stdout.splitlines()[1:]]
    assert ids == ["12b-std/eng-nob__ties", "12b-open/eng-nob__ties"]


def test_plan_only_matching_nothing_is_a_usage_error():
    result = CliRunner().invoke(cli, ["plan", str(REPO_MATRIX), "--only", "27b-*"])
    assert result.exit_code == 2
    assert f"--only '27b-*' matches no cell of {REPO_MATRIX.resolve()}" in result.stderr


def test_plan_table_shows_per_adapter_weights(write_matrix):
    text = edit("[methods.ties]\ndensity = 0.5\nweight = 0.5\n",
                "[methods.linear]\nweight = {eng = 0.3, nob = 0.7}\n")
    result = run_plan(write_matrix(text))
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[1].split()[:3] == [
        "tiny-std/eng-nob__linear", "linear", "weight=eng:0.3/nob:0.7"]


def test_plan_help():
    result = CliRunner().invoke(cli, ["plan", "--help"])
    assert result.exit_code == 0
    assert result.output.startswith("Usage: cli plan [OPTIONS] MATRIX")
    assert "Show the cells MATRIX expands to" in result.output
    for option in ("--only GLOB", "--json", "--nl", "-h, --help"):
        assert option in result.output
    assert "bakery-slurm plan matrix.toml --only '12b-*' --json" in result.output
    assert "--table" not in result.output


def test_plan_does_not_import_heavy_libraries(tmp_path):
    """`plan` must stay fast and work on a login node: no torch, transformers, mergekit, peft."""
    code = (
        "import sys\n"
        "from bakery_slurm.cli import cli\n"
        f"cli.main(['plan', {str(REPO_MATRIX)!r}, '--json'], standalone_mode=False)\n"
        "heavy = [m for m in ('torch', 'transformers', 'mergekit', 'peft') if m in sys.modules]\n"
        "print('HEAVY=' + ','.join(heavy), file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)) == 14
    assert "HEAVY=\n" in proc.stderr


# ---------------------------------------------------------------------------------------------
# Bad matrices: exit 2, the key and value named, the file named, nothing written

MINIMAL_METHODS = "[methods.ties]\ndensity = 0.5\nweight = 0.5\n"
BAD_MATRICES = [
    pytest.param("colour = 'blue'\n" + MINIMAL_MATRIX,
                 "colour: unknown key (got 'blue')", id="unknown-top-level-key"),
    pytest.param(edit("density = 0.5", "densty = 0.5"),
                 "methods.ties.densty: unknown parameter 'densty' for ties "
                 "(valid: weight, density, normalize) (got 0.5)", id="unknown-key-in-method"),
    pytest.param(edit("[methods.ties]", "[methods.tie]"),
                 "methods.tie: unknown merge method 'tie' (valid: linear, task_arithmetic, ties) "
                 "(got 'tie')", id="unknown-method"),
    pytest.param(edit("[sizes.tiny]\n", '[sizes.tiny]\nmethods = ["linear"]\n'),
                 "sizes.tiny.methods: not declared in [methods] (declared: ties) (got 'linear')",
                 id="size-restricts-to-undeclared-method"),
    pytest.param(edit("[sizes.tiny]\n", '[sizes.tiny]\nvariants = ["open"]\n'),
                 "sizes.tiny.variants: not declared in [variants] (declared: std) (got 'open')",
                 id="size-restricts-to-undeclared-variant"),
    pytest.param(edit("[sizes.tiny]\n", "[sizes.tiny]\nmethods = []\n"),
                 "sizes.tiny.methods: an empty list selects nothing; leave the key out to use "
                 "every entry of [methods] (got [])", id="size-with-empty-method-list"),
    pytest.param(edit('[push]\ntarget = "dir:published"\n', ""),
                 "push: Field required", id="missing-push"),
    pytest.param(edit('adapters = ["eng", "nob"]\n', ""),
                 "adapters: Field required", id="missing-adapters"),
    pytest.param(edit('adapters = ["eng", "nob"]', "adapters = []"),
                 "adapters: List should have at least 1 item after validation, not 0 (got [])",
                 id="empty-adapters"),
    pytest.param(edit("weight = 0.5\n", ""),
                 "methods.ties: missing required parameter 'weight' (got {'density': 0.5})",
                 id="missing-required-weight"),
    pytest.param(edit("[variants.std]\n", '[variants.std]\n\n[variants.x]\n\n[variants."std-x"]\n')
                 + '\n[sizes."tiny-std"]\n',
                 "sizes.tiny-std x variants.x x methods.ties: duplicate cell id (also from "
                 "sizes.tiny x variants.std-x x methods.ties) (got 'tiny-std-x/eng-nob__ties')",
                 id="duplicate-id-size-variant"),
    pytest.param(edit("density = 0.5", "density = [0.5, 0.50]"),
                 "sizes.tiny x variants.std x methods.ties: duplicate cell id (also from "
                 "sizes.tiny x variants.std x methods.ties) (got 'tiny-std/eng-nob__ties-density0.5')",
                 id="duplicate-id-sweep"),
    pytest.param(edit("weight = 0.5", 'weight = "0.5"'),
                 "methods.ties.weight: must be a number (got '0.5')", id="weight-quoted-string"),
    pytest.param(edit("density = 0.5", "density = 0"),
                 "methods.ties.density: must be in (0, 1] (got 0)", id="density-zero"),
    pytest.param(edit("density = 0.5", "density = 1.5"),
                 "methods.ties.density: must be in (0, 1] (got 1.5)", id="density-above-one"),
    pytest.param(edit("density = 0.5", "density = [0.3, nan]"),
                 "methods.ties.density: must be in (0, 1] (got nan)", id="density-nan-in-sweep"),
    pytest.param(edit("weight = 0.5", "weight = -0.5"),
                 "methods.ties.weight: must be a finite number >= 0 (got -0.5)",
                 id="negative-weight"),
    pytest.param(edit("weight = 0.5", "weight = nan"),
                 "methods.ties.weight: must be a finite number >= 0 (got nan)", id="weight-nan"),
    pytest.param(edit("weight = 0.5", "weight = {eng = inf, nob = 0.5}"),
                 "methods.ties.weight: must be a finite number >= 0 (got inf)",
                 id="weight-inf-in-table"),
    pytest.param(edit("weight = 0.5", "weight = {eng = 0.5, fr = 0.5}"),
                 "methods.ties.weight: per-adapter table must have exactly the keys eng, nob "
                 "(got {'eng': 0.5, 'fr': 0.5})", id="weight-table-unknown-adapter"),
    pytest.param(edit("weight = 0.5", "weight = true"),
                 "methods.ties.weight: must be a number (got True)", id="weight-bool"),
    pytest.param(edit("[sizes.tiny]", '[sizes.".."]'),
                 f"sizes: {SAFE} (got '..')", id="size-dotdot"),
    pytest.param(edit("[sizes.tiny]", '[sizes."a/b"]'),
                 f"sizes: {SAFE} (got 'a/b')", id="size-slash"),
    pytest.param(edit("[sizes.tiny]", '[sizes."a;b"]'),
                 f"sizes: {SAFE} (got 'a;b')", id="size-semicolon"),
    pytest.param(edit("[sizes.tiny]", '[sizes."x$(reboot)"]'),
                 f"sizes: {SAFE} (got 'x$(reboot)')", id="size-command-substitution"),
    pytest.param(edit("[variants.std]", '[variants."std open"]'),
                 f"variants: {SAFE} (got 'std open')", id="variant-with-space"),
    pytest.param(edit('adapters = ["eng", "nob"]', 'adapters = ["eng", ".nob"]'),
                 f"adapters: {SAFE} (got '.nob')", id="adapter-hidden-name"),
    pytest.param(edit('path = "models/adapter-{size}-{variant}-{adapter}"',
                      'repo = "org/adapters"\nsubfolder = "../{adapter}"'),
                 "adapter.subfolder: must be a relative path of safe segments (no '..', "
                 "no leading '/') (got '../eng')", id="subfolder-escapes"),
    pytest.param(edit('path = "models/adapter-{size}-{variant}-{adapter}"',
                      'repo = "org/adapters"\nsubfolder = "/{size}/{adapter}"'),
                 "adapter.subfolder: must be a relative path of safe segments (no '..', "
                 "no leading '/') (got '/tiny/eng')", id="subfolder-absolute"),
    pytest.param(edit('path = "models/adapter-{size}-{variant}-{adapter}"',
                      'repo = "org/adapters"\nrevision = "main;rm -rf ~"'),
                 "adapter.revision: not a branch, tag or commit (got 'main;rm -rf ~')",
                 id="revision-shell-metacharacters"),
    pytest.param(edit('path = "models/base-{size}"', 'repo = "NbAiLab/base {size}"'),
                 "base.repo: not a Hub repo id (owner/name) (got 'NbAiLab/base tiny')",
                 id="invalid-repo-id"),
    pytest.param(edit('path = "models/base-{size}"', 'repo = "NbAiLab/base--{size}"'),
                 "base.repo: not a Hub repo id (owner/name) (got 'NbAiLab/base--tiny')",
                 id="repo-id-double-dash"),
    pytest.param(edit("weight = 0.5", "weight = { eng = 0, nob = 0.0 }"),
                 "methods.ties.weight: the adapters' values may not all be zero "
                 "(got {'eng': 0, 'nob': 0.0})", id="weights-all-zero"),
    pytest.param(edit("weight = 0.5", "weight = [0.5, 0]"),
                 "methods.ties.weight: the adapters' values may not all be zero (got [0.5, 0])",
                 id="weight-sweep-with-zero"),
    pytest.param(edit('path = "models/base-{size}"', 'repo = "org/base-{size}"\npath = "base"'),
                 "base: give exactly one of 'repo' (a Hub repo id) or 'path' (a local folder) "
                 "(got {'repo': 'org/base-{size}', 'path': 'base'})", id="repo-and-path"),
    pytest.param(edit('path = "models/base-{size}"', 'path = "models/base-{sise}"'),
                 "base.path: unknown placeholder {sise} (known: {size}, {variant}) "
                 "(got 'models/base-{sise}')", id="unknown-placeholder"),
    pytest.param(edit('target = "dir:published"', 'target = "s3:bucket/merges"'),
                 "push.target: must be 'hub:<owner>/<name>' or 'dir:<folder>' "
                 "(got 's3:bucket/merges')", id="push-target-s3"),
    pytest.param(edit('target = "dir:published"', 'target = "hub:not-a-repo"'),
                 "push.target: not a Hub repo id (owner/name) (got 'hub:not-a-repo')",
                 id="push-target-bad-hub-repo"),
    pytest.param(MINIMAL_MATRIX + '\n[resources]\ntime = "90 minutes"\n',
                 "resources.time: time must be HH:MM:SS or D-HH:MM:SS (got '90 minutes')",
                 id="bad-time"),
    pytest.param(edit("[sizes.tiny]\n", '[sizes.tiny]\nresources = { time = "2h" }\n'),
                 "sizes.tiny.resources.time: time must be HH:MM:SS or D-HH:MM:SS (got '2h')",
                 id="bad-time-per-size"),
    pytest.param(MINIMAL_MATRIX + '\n[resources]\nmem = "lots"\n',
                 "resources.mem: memory must look like 110G or 4000M (got 'lots')", id="bad-mem"),
    pytest.param(edit("[sizes.tiny]\n", "[sizes.tiny]\nresources = { gpus = 1 }\n"),
                 "sizes.tiny.resources.gpus: unknown key (got 1)", id="unknown-resource-key"),
    pytest.param(MINIMAL_MATRIX + '\n[runtime]\nenv = { HF_TOKEN = "hf_not_a_real_token" }\n',
                 "runtime.env: 'HF_TOKEN' looks like a credential; tokens come from the "
                 "environment or the Hub token file, never from the matrix "
                 "(got variables ['HF_TOKEN'])", id="token-in-runtime-env"),
    pytest.param(MINIMAL_MATRIX + '\n[runtime]\nenv = { "A=B" = "x" }\n',
                 "runtime.env: 'A=B' is not an environment variable name (got variables ['A=B'])",
                 id="env-name-with-equals"),
    pytest.param(MINIMAL_MATRIX + '\n[resources]\ntime = "00:00:00"\n',
                 "resources.time: time must be longer than 0 (SLURM reads 0 as no limit at all) "
                 "(got '00:00:00')", id="time-zero"),
    pytest.param(MINIMAL_MATRIX + '\n[resources]\ngpus_per_node = true\n',
                 "resources.gpus_per_node: Input should be a valid integer (got True)",
                 id="gpus-bool-not-coerced"),
    pytest.param(MINIMAL_MATRIX + '\n[resources]\ncpus_per_task = "8"\n',
                 "resources.cpus_per_task: Input should be a valid integer (got '8')",
                 id="cpus-quoted-not-coerced"),
    pytest.param("max_attempts = true\n" + MINIMAL_MATRIX,
                 "max_attempts: Input should be a valid integer (got True)",
                 id="max-attempts-bool-not-coerced"),
    pytest.param(MINIMAL_MATRIX + '\n[eval]\ntasks = ["a"]\nlimit = true\n',
                 "eval.limit.int: Input should be a valid integer (got True)",
                 id="eval-limit-bool-not-coerced"),
    pytest.param(MINIMAL_MATRIX + '\n[resources]\npartition = "accel\\necho INJECTED"\n',
                 "resources.partition: must be a non-empty SLURM name without spaces or control "
                 "characters (got 'accel\\necho INJECTED')", id="partition-with-newline"),
    pytest.param(MINIMAL_MATRIX + '\n[resources]\naccount = "nn 1234k"\n',
                 "resources.account: must be a non-empty SLURM name without spaces or control "
                 "characters (got 'nn 1234k')", id="account-with-space"),
    pytest.param(edit('adapters = ["eng", "nob"]', 'adapters = ["base", "nob"]'),
                 "adapters: 'base' is reserved for the base model's input (--pin base=COMMIT); "
                 "rename the adapter (got 'base')", id="adapter-named-base"),
    pytest.param(MINIMAL_MATRIX + '\n[eval]\ntasks = ["a"]\n[[eval.baselines]]\nname = "base"\n'
                 'sizes = []\n',
                 "eval.baselines.0.sizes: an empty list evaluates the baseline nowhere; leave the "
                 "key out to use every one of [sizes] (got [])", id="baseline-with-no-sizes"),
    pytest.param('exclude = [{sise = "tiny"}]\n' + MINIMAL_MATRIX,
                 "exclude.0: unknown key (valid: size, variant, method, id) (got 'sise')",
                 id="exclude-unknown-key"),
    pytest.param('exclude = [{size = "t*"}]\n' + MINIMAL_MATRIX,
                 "exclude: the rules remove every cell (got [{'size': 't*'}])",
                 id="exclude-removes-everything"),
    pytest.param(MINIMAL_MATRIX + '\n[runtime]\npython = ""\n',
                 "runtime.python: must name the image's Python: a command on its PATH or a path "
                 "(got '')", id="empty-python"),
    pytest.param('exclude = [{size = "tiyn"}]\n' + MINIMAL_MATRIX,
                 "exclude.0: matches no cell or [eval] baseline of the matrix (got {'size': 'tiyn'})",
                 id="exclude-rule-matches-nothing"),
    pytest.param('exclude = [{size = "big"}]\n' + MINIMAL_MATRIX + "[sizes.big]\n",
                 "exclude: the rules remove every cell of size big; leave [sizes.big] out of the "
                 "matrix instead (got [{'size': 'big'}])", id="exclude-empties-a-size"),
]


@pytest.mark.parametrize("text, message", BAD_MATRICES)
def test_bad_matrix_exits_2_naming_file_key_and_value(tmp_path, write_matrix, text, message):
    path = write_matrix(text)
    before = listing(tmp_path)
    result = run_plan(path)
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert result.stderr.startswith(f"Error: {path.resolve()}: "), result.stderr
    assert f"{path.resolve()}: {message}" in result.stderr, result.stderr
    assert listing(tmp_path) == before


def test_bad_matrix_cases_are_distinct():
    texts = [case.values[0] for case in BAD_MATRICES]
    assert len(set(texts)) == len(texts) >= 15


def test_token_value_is_never_echoed(tmp_path, write_matrix):
    path = write_matrix(MINIMAL_MATRIX + '\n[runtime]\nenv = { MY_SECRET = "s3cr3t-value" }\n')
    result = run_plan(path)
    assert result.exit_code == 2
    assert "MY_SECRET" in result.stderr
    assert "s3cr3t-value" not in result.output


def test_non_toml_file(tmp_path, write_matrix):
    path = write_matrix("this is not toml\n", "matrix.yaml")
    before = listing(tmp_path)
    result = run_plan(path)
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.startswith(f"Error: {path.resolve()}: not valid TOML: ")
    assert "(at line 1, column 6)" in result.stderr
    assert listing(tmp_path) == before


def test_a_matrix_saved_with_a_byte_order_mark_reads(tmp_path, write_matrix):
    path = write_matrix(MINIMAL_MATRIX)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert run_plan(path).exit_code == 0


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere" / "matrix.toml"
    result = run_plan(path)
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr == (f"Error: {path}: cannot read matrix: No such file or directory\n")
    assert listing(tmp_path) == []


def test_a_matrix_path_in_a_symlink_loop(tmp_path):
    loop = tmp_path / "matrix.toml"
    loop.symlink_to(loop)
    result = run_plan(loop)
    assert result.exit_code == 2
    assert result.stderr.startswith(f"Error: {loop}: cannot read matrix: "), result.stderr


def test_several_schema_errors_are_all_reported(tmp_path, write_matrix):
    text = edit('[push]\ntarget = "dir:published"\n', "", edit('adapters = ["eng", "nob"]\n', ""))
    path = write_matrix("colour = 1\n" + text)
    result = run_plan(path)
    assert result.exit_code == 2
    lines = result.stderr.splitlines()
    assert lines[0].startswith("Error: ")
    assert sorted(line.removeprefix("Error: ") for line in lines) == sorted([
        f"{path.resolve()}: adapters: Field required",
        f"{path.resolve()}: push: Field required",
        f"{path.resolve()}: colour: unknown key (got 1)",
    ])
