"""Preflight (`check`, and `submit`/`resubmit` before any sbatch) and pinned Hub inputs, through
CliRunner with the Hub stood in by `tests/fakes.FakeHubApi` (`preflight.hub_api` is the seam)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from bakery_slurm import preflight
from bakery_slurm.cli import cli
from bakery_slurm.ledger import load_ledger
from bakery_slurm.preflight import token_write_problem
from fakes import FakeHubApi
from support import settled, wait_for

CELL = "1b-std/eng-nob__ties"
TASKS = Path(__file__).resolve().parents[1] / "eval_tasks"

HUB_MATRIX = """\
name = "hub"
adapters = ["eng", "nob"]
[base]
repo = "acme/base-{size}"
[adapter]
repo = "acme/adapters"
subfolder = "{size}-{variant}/{adapter}"
[push]
target = "hub:acme/merges"
[variants.std]
[sizes.1b]
[methods.ties]
density = 0.5
weight = 0.5
[runtime]
container = "none"
"""


@pytest.fixture(autouse=True)
def _restore_logging():
    logger = logging.getLogger("bakery_slurm")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved


@pytest.fixture
def hub(tmp_path, monkeypatch) -> FakeHubApi:
    """The Hub with acme/base-1b, acme/adapters (1b-std/{eng,nob}, plus files no cell reads) and
    an empty acme/merges; the token's user is a member of acme. `hub.base` and `hub.adapters` are
    the repos' commits."""
    api = FakeHubApi(download_dir=tmp_path / "downloads")
    api.base = api.seed("acme/base-1b", {
        "config.json": b"{}", "model.safetensors": b"w" * 10, "pytorch_model.bin": b"old" * 10,
        "tokenizer.json": b"{}"})
    files = {f"1b-std/{name}/{file}": b"{}" for name in ("eng", "nob")
             for file in ("adapter_config.json", "adapter_model.safetensors")}
    files["1b-std/nob/checkpoint-100/adapter_model.safetensors"] = b"x"
    files["1b-std/nob/optimizer.pt"] = b"x"
    api.adapters = api.seed("acme/adapters", files)
    api.seed("acme/merges", {})
    api.identity["orgs"] = [{"name": "acme"}]
    monkeypatch.setattr(preflight, "hub_api", lambda: api)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    return api


def push_new_adapter(hub: FakeHubApi) -> str:
    """A new nob adapter lands on main; returns the new commit."""
    return hub.put("acme/adapters", {"1b-std/nob/adapter_model.safetensors": b"retrained"})


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def problems(result) -> list[str]:
    return [line.strip() for line in result.stderr.splitlines() if line.startswith("  ")]


def test_check_prints_every_hub_input_with_its_commit(hub, write_matrix):
    result = invoke("check", write_matrix(HUB_MATRIX), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == [
        {"input": "hub:acme/adapters/1b-std/eng", "commit": hub.adapters},
        {"input": "hub:acme/adapters/1b-std/nob", "commit": hub.adapters},
        {"input": "hub:acme/base-1b", "commit": hub.base}]
    # One listing per repo and commit, however many subfolders are read from it.
    assert len(hub.calls_to("list_repo_files")) == 2


@pytest.mark.parametrize("edit, expected", [
    (('repo = "acme/base-{size}"', 'repo = "acme/base-{size}-typo"'),
     "base.repo: no such repo on the Hub, or it is private and this token cannot read it "
     "('acme/base-1b-typo', input 'base')"),
    (('subfolder = "{size}-{variant}/{adapter}"', 'subfolder = "{size}/{adapter}"'),
     "adapter.subfolder: no adapter_config.json under '1b/eng' in acme/adapters@{adapters} "
     "(input 'eng')"),
    (('subfolder = "{size}-{variant}/{adapter}"', 'subfolder = "{size}-{variant}/{adapter}"\nrevision = "v3"'),
     "adapter.revision: acme/adapters has no revision 'v3' (input 'eng')"),
])
def test_a_missing_hub_input_is_named_by_key_and_nothing_is_written(hub, write_matrix, tmp_path,
                                                                    edit, expected):
    matrix = write_matrix(HUB_MATRIX.replace(*edit))
    expected = expected.replace("{adapters}", hub.adapters[:12])
    for command in (["check", matrix], ["submit", matrix, "--executor", "local"]):
        result = invoke(*command)
        assert result.exit_code == 2, result.output
        assert expected in problems(result)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["matrix.toml"]


@pytest.mark.parametrize("identity, expected", [
    ({"name": "tester", "auth": {"accessToken": {"role": "read"}}},
     "the Hub token of tester is read-only; acme/merges needs a write token"),
    ({"name": "tester", "orgs": [{"name": "other"}], "auth": {"accessToken": {"role": "write"}}},
     "the Hub token belongs to tester, who is not a member of 'acme', so it cannot write or "
     "create acme/merges"),
    ({"name": "tester", "auth": {"accessToken": {"role": "fineGrained", "fineGrained": {
        "scoped": [{"entity": {"type": "model", "name": "acme/merges"},
                    "permissions": ["repo.content.read"]}]}}}},
     "the fine-grained Hub token of tester has no repo.write on acme/merges or on acme"),
    ({"name": "tester", "orgs": [{"name": "acme"}], "auth": {"accessToken": {"role": "write"}}},
     None),
    ({"name": "acme", "auth": {"accessToken": {"role": "write"}}}, None),
    ({"name": "tester", "auth": {"accessToken": {"role": "fineGrained", "fineGrained": {
        "scoped": [{"entity": {"type": "org", "name": "acme"}, "permissions": ["repo.write"]}]}}}},
     None),
    ({"name": "tester", "auth": {"accessToken": {"role": "fineGrained", "fineGrained": {
        "scoped": [{"entity": {"type": "model", "name": "acme/merges"},
                    "permissions": ["repo.write"]}]}}}}, None),
])
def test_token_write_problem(identity, expected):
    assert token_write_problem(identity, "acme/merges") == expected


def test_a_read_only_token_fails_submit_before_sbatch(hub, write_matrix, tmp_path):
    hub.identity = {"name": "tester", "auth": {"accessToken": {"role": "read"}}}
    result = invoke("submit", write_matrix(HUB_MATRIX), "--executor", "local")
    assert result.exit_code == 2
    assert problems(result) == [
        "push.target: the Hub token of tester is read-only; acme/merges needs a write token "
        "(got 'hub:acme/merges')"]
    assert not (tmp_path / "bakery-ledger.json").exists()


def test_a_private_matrix_refuses_an_existing_public_repo_before_sbatch(hub, write_matrix, tmp_path):
    """`private = true` cannot make an existing repo private (create_repo leaves it as it is)."""
    text = HUB_MATRIX.replace('target = "hub:acme/merges"', 'target = "hub:acme/merges"\nprivate = true')
    result = invoke("submit", write_matrix(text), "--executor", "local")
    assert result.exit_code == 2
    assert problems(result) == [
        "push.private: acme/merges exists and is public, but push.private = true: make the repo "
        "private on the Hub (its Settings), or set private = false (got 'hub:acme/merges')"]
    assert not (tmp_path / "bakery-ledger.json").exists()
    hub.seed("acme/merges", {}, private=True)
    assert invoke("check", write_matrix(text)).exit_code == 0
    hub.repos.pop("acme/merges")  # a repo the first push creates, private
    assert invoke("check", write_matrix(text)).exit_code == 0


def test_image_apptainer_and_required_variables_are_checked(hub, write_matrix, tmp_path,
                                                            monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))  # no apptainer here
    monkeypatch.delenv("https_proxy", raising=False)
    matrix = write_matrix(HUB_MATRIX.replace('container = "none"', f'''container = "apptainer"
image = "{tmp_path}/nope.sif"
require_env = ["https_proxy"]'''))
    result = invoke("check", matrix, "--executor", "local")
    assert result.exit_code == 2
    assert problems(result) == [
        f"runtime.image: no such image file: {tmp_path}/nope.sif (got '{tmp_path}/nope.sif')",
        "runtime.container: 'apptainer' is not on PATH here, and the local executor runs the "
        "tasks here (got 'apptainer')",
        "runtime.require_env: https_proxy is not set in this environment, and the tasks need it "
        "(got ['https_proxy'])"]
    assert result.stderr.startswith(f"Error: preflight found 3 problem(s) in {matrix}")


def test_folders_a_container_cannot_see_are_named(hub, write_matrix, tmp_path):
    """apptainer shows a task only the bound folders (the matrix and work folders, [runtime]
    binds, ~ and /tmp): a cache or a local input elsewhere would be missing in every task."""
    image = tmp_path / "bakery.sif"
    image.write_text("an image")
    text = (HUB_MATRIX.replace('repo = "acme/base-{size}"', 'path = "/srv/elsewhere/base-{size}"')
            .replace('container = "none"', f'container = "apptainer"\nimage = "{image}"\n'
                     'env = { HF_HOME = "/srv/elsewhere/hf-home" }'))
    result = invoke("check", write_matrix(text), "--executor", "slurm")
    assert result.exit_code == 2
    hidden = [p for p in problems(result) if "under none of the folders" in p]
    assert [p.split(":")[0] for p in hidden] == ["runtime.env.HF_HOME", "base.path"]
    assert hidden[0] == ("runtime.env.HF_HOME: /srv/elsewhere/hf-home is under none of the folders "
                         "a task's container sees (the matrix and work folders, [runtime] binds, ~ "
                         "and /tmp): add a folder above it to runtime.binds")
    bound = write_matrix(text.replace(f'image = "{image}"', f'image = "{image}"\nbinds = ["/srv"]'))
    assert not [p for p in problems(invoke("check", bound, "--executor", "slurm"))
                if "under none of the folders" in p]
    # A task reads every path at the path written in the matrix: a bind shown elsewhere in the
    # container (SRC:DST) makes its source visible only at DST.
    moved = write_matrix(text.replace(f'image = "{image}"',
                                      f'image = "{image}"\nbinds = ["/srv:/mnt/srv"]'))
    assert [p.split(":")[0] for p in problems(invoke("check", moved, "--executor", "slurm"))
            if "under none of the folders" in p] == ["runtime.env.HF_HOME", "base.path"]


def test_a_relative_image_and_bind_are_read_from_the_matrix_folder(hub, write_matrix, tmp_path,
                                                                   monkeypatch):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "bakery.sif").write_text("an image")
    (tmp_path / "shared").mkdir()
    matrix = write_matrix(HUB_MATRIX.replace('container = "none"', 'container = "apptainer"\n'
                                             'image = "images/bakery.sif"\nbinds = ["shared"]'))
    monkeypatch.chdir("/")
    result = invoke("check", matrix, "--executor", "slurm")
    assert not [p for p in problems(result) if p.startswith("runtime.")], result.stderr


def test_a_work_folder_whose_locks_hold_on_one_node_only_is_refused_for_slurm(
        hub, write_matrix, tmp_path, monkeypatch):
    """Lustre mounted `localflock` grants POSIX locks per node without an error: tasks on two
    nodes would both hold a cell's run lock. Its mount options say so."""
    from bakery_slurm import mounts

    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text("22 1 0:21 / / rw - ext4 /dev/vda1 rw\n"
                         f"30 22 0:40 / {tmp_path} rw - lustre 10.1.1.1@o2ib:/fs rw,localflock\n")
    monkeypatch.setattr(mounts, "MOUNTINFO", mountinfo)
    matrix = write_matrix(HUB_MATRIX)
    result = invoke("check", matrix, "--executor", "slurm")
    assert result.exit_code == 2
    [problem] = [p for p in problems(result) if p.startswith("paths.work")]
    assert f"is on {tmp_path}, a lustre mount with `localflock`, whose locks hold on one node" in problem
    # one node: the local executor's tasks share its locks
    assert not [p for p in problems(invoke("check", matrix, "--executor", "local"))
                if p.startswith("paths.work")]
    mountinfo.write_text(mountinfo.read_text().replace("localflock", "flock"))
    assert not [p for p in problems(invoke("check", matrix, "--executor", "slurm"))
                if p.startswith("paths.work")]


def test_require_env_must_name_passed_variables(write_matrix):
    matrix = write_matrix(HUB_MATRIX + 'require_env = ["MY_PROXY"]\n')
    result = invoke("plan", matrix)
    assert result.exit_code == 2
    assert "runtime: require_env names ['MY_PROXY'] that pass_env does not forward" in result.stderr


def test_local_inputs_must_exist(hub, write_matrix, tmp_path):
    matrix = write_matrix(HUB_MATRIX.replace('repo = "acme/base-{size}"', 'path = "models/{size}"'))
    result = invoke("check", matrix)
    assert result.exit_code == 2
    assert problems(result) == [f"base.path: no such folder: {tmp_path}/models/1b "
                                f"(input 'base' of {CELL})"]


def test_no_preflight_skips_every_check(hub, write_matrix):
    matrix = write_matrix(HUB_MATRIX.replace('repo = "acme/base-{size}"', 'repo = "acme/gone"'))
    result = invoke("submit", matrix, "--executor", "local", "--dry-run", "--no-preflight")
    assert result.exit_code == 0, result.output
    assert hub.calls == []
    assert "is not pinned (no Hub access here, not in the cache)" in result.stderr
    assert "--pin" not in result.stdout


# ---------------------------------------------------------------------------------------------
# Pins


def test_submit_pins_every_hub_input_and_the_task_reads_exactly_those(hub, write_matrix, tmp_path):
    matrix = write_matrix(HUB_MATRIX)
    dry = invoke("submit", matrix, "--executor", "local", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert (f"--pin base={hub.base} --pin eng={hub.adapters} --pin nob={hub.adapters}"
            in dry.stdout)
    result = invoke("submit", matrix, "--executor", "local")
    assert result.exit_code == 0, result.output
    [attempt] = load_ledger(tmp_path / "bakery-ledger.json").cells[CELL]
    assert attempt.pins == {"hub:acme/base-1b": hub.base, "hub:acme/adapters/1b-std/eng": hub.adapters,
                            "hub:acme/adapters/1b-std/nob": hub.adapters}
    plan = invoke("plan", matrix, "--json")
    assert json.loads(plan.stdout)[0]["pins"] == attempt.pins
    # The task (it fails offline) must not outlive the test, competing with the next ones.
    wait_for(lambda: settled(tmp_path / "bakery-ledger.json"), "the task to end")


def test_resubmit_reuses_the_pins_unless_refreshed(hub, write_matrix, tmp_path):
    from support import settled, wait_for

    matrix = write_matrix(HUB_MATRIX)
    ledger = tmp_path / "bakery-ledger.json"
    assert invoke("submit", matrix, "--executor", "local").exit_code == 0
    # Offline here, the task cannot download its inputs: it fails.
    wait_for(lambda: settled(ledger), "the cell to fail")
    newer = push_new_adapter(hub)
    again = invoke("resubmit", "--ledger", ledger, "--dry-run")
    assert again.exit_code == 0, again.output
    assert "resubmitted" in again.stdout or "would resubmit 1" in again.stderr
    kept = invoke("resubmit", "--ledger", ledger)
    assert kept.exit_code == 0, kept.output
    second = load_ledger(ledger).cells[CELL][-1]
    assert second.pins["hub:acme/adapters/1b-std/nob"] == hub.adapters
    wait_for(lambda: settled(ledger), "the second attempt to fail")
    fresh = invoke("resubmit", "--ledger", ledger, "--refresh-inputs")
    assert fresh.exit_code == 0, fresh.output
    third = load_ledger(ledger).cells[CELL][-1]
    assert third.pins["hub:acme/adapters/1b-std/nob"] == newer
    assert third.pins["hub:acme/base-1b"] == hub.base
    wait_for(lambda: settled(ledger), "the third attempt to fail")


# ---------------------------------------------------------------------------------------------
# prefetch


def test_prefetch_downloads_only_what_a_cell_reads_into_the_matrix_hub_cache(hub, write_matrix,
                                                                          tmp_path):
    hf_home = tmp_path / "hf-home"
    matrix = write_matrix(HUB_MATRIX + f'env = {{ HF_HOME = "{hf_home}" }}\n')
    result = invoke("prefetch", matrix, "--json")
    assert result.exit_code == 0, result.output
    rows = {r["input"]: r for r in json.loads(result.stdout)}
    assert rows["hub:acme/base-1b"] == {"input": "hub:acme/base-1b", "commit": hub.base,
                                        "files": 3, "bytes": 14}
    snapshot = hf_home / "hub" / "models--acme--adapters" / "snapshots" / hub.adapters
    assert sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()) == [
        f"1b-std/{n}/{f}" for n in ("eng", "nob")
        for f in ("adapter_config.json", "adapter_model.safetensors")]
    base = hf_home / "hub" / "models--acme--base-1b"
    assert not (base / "snapshots" / hub.base / "pytorch_model.bin").exists()
    assert (base / "refs" / "main").read_text() == hub.base
    assert "prefetched 3 input(s)" in result.stderr


def test_offline_submit_pins_what_prefetch_cached_and_needs_it(hub, write_matrix, tmp_path):
    hf_home = tmp_path / "hf-home"
    matrix = write_matrix(HUB_MATRIX + f'offline = true\nenv = {{ HF_HOME = "{hf_home}" }}\n')
    before = invoke("submit", matrix, "--executor", "local", "--dry-run")
    assert before.exit_code == 2
    assert (f"base.repo: hub:acme/base-1b is not in the Hub cache {hf_home}/hub and "
            f"runtime.offline is true: run `bakery-slurm prefetch {matrix}` first "
            "(input 'base')") in problems(before)
    assert invoke("prefetch", matrix).exit_code == 0
    push_new_adapter(hub)  # pushed after the prefetch: not what offline tasks get
    after = invoke("submit", matrix, "--executor", "local", "--dry-run")
    assert after.exit_code == 0, after.output
    assert (f"--pin base={hub.base} --pin eng={hub.adapters} --pin nob={hub.adapters}"
            in after.stdout)
    assert [c for c in hub.calls if c[0] in ("repo_info", "list_repo_files")] == []


# ---------------------------------------------------------------------------------------------
# The shipped matrix.toml, with only account, image and work edited


def test_the_shipped_matrix_with_three_keys_edited_passes_check_and_runs_in_the_image(
        hub, tmp_path, monkeypatch):
    from bakery_slurm.errors import SchedulerError
    from bakery_slurm.executors import SlurmBackend
    from bakery_slurm.matrix import expand, load_matrix

    text = (Path(__file__).resolve().parents[2] / "matrix.toml").read_text()
    image, work = tmp_path / "images" / "bakery.sif", tmp_path / "bakery-work"
    image.parent.mkdir()
    image.write_text("an image")
    for old, new in [('account = "nnXXXXk"', 'account = "nn1234k"'),
                     ('image = "/cluster/work/projects/nnXXXXk/images/bakery-gh200.sif"', f'image = "{image}"'),
                     ('work = "/cluster/work/projects/nnXXXXk/bakery-work"', f'work = "{work}"')]:
        assert old in text
        text = text.replace(old, new)
    assert "nnXXXXk" not in text.split("[paths]")[0].split("[runtime]")[1]  # nothing else to edit
    matrix = tmp_path / "matrix.toml"
    matrix.write_text(text)
    cells = expand(load_matrix(matrix))
    for base in {cell.base.repo for cell in cells}:
        hub.seed(base, {"config.json": b"{}"})
    hub.seed("NbAiLab/nb-gpt-gemma3-bakery-adapters-2603", {
        f"{source.subfolder}/adapter_config.json": b"{}"
        for cell in cells for _, source in cell.adapters})
    hub.seed("NbAiLab/nb-gpt-gemma3-bakery-merges-2603", {})
    hub.identity["orgs"] = [{"name": "NbAiLab"}]
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{Path('/usr/bin')}")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "apptainer").write_text("#!/bin/sh\n")
    (tmp_path / "bin" / "apptainer").chmod(0o755)

    def no_scontrol(self):
        raise SchedulerError("scontrol show config failed: not installed")

    monkeypatch.setattr(SlurmBackend, "max_array_size", no_scontrol)
    checked = invoke("check", matrix, "--executor", "slurm", "--json")
    assert checked.exit_code == 0, checked.output
    assert len(json.loads(checked.stdout)) == 6 + 12  # six bases, two adapters per (size, variant)
    dry = invoke("submit", matrix, "--executor", "slurm", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert (f"exec env APPTAINERENV_HF_HOME={work}/hf-home APPTAINERENV_PYTHONSAFEPATH=1 "
            f"apptainer exec --nv --cleanenv "
            f"--bind {tmp_path},{work} ${{tmpdir_bind:+\"$tmpdir_bind\"}} {image} python3 "
            f"\"$@\"") in dry.stdout
    assert "dry run: 3 array(s), 14 task(s)" in dry.stdout

# ---------------------------------------------------------------------------------------------
# Two sizes: offline caches, pins of baselines without cells, gated repos

TWO_SIZES = HUB_MATRIX.replace("[sizes.1b]\n", "[sizes.1b]\n[sizes.2b]\n")


@pytest.fixture
def hub2(hub) -> FakeHubApi:
    """`hub` with acme/base-2b and the 2b adapters too."""
    hub.seed("acme/base-2b", {"config.json": b"{}", "model.safetensors": b"w" * 10})
    hub.adapters = hub.put("acme/adapters", {f"2b-std/{name}/{file}": b"{}" for name in ("eng", "nob")
                                             for file in ("adapter_config.json",
                                                          "adapter_model.safetensors")})
    return hub


# Offline, an input is pinned only where the cache holds its files, whatever its revision.
def test_offline_submit_refuses_a_commit_revision_the_cache_lacks(hub2, write_matrix, tmp_path):
    hf_home = tmp_path / "hf-home"
    commit = hub2.head("acme/base-1b")
    text = (TWO_SIZES.replace('repo = "acme/base-{size}"',
                               f'repo = "acme/base-{{size}}"\nrevision = "{commit}"')
            .replace("[sizes.2b]\n", "")
            + f'offline = true\nenv = {{ HF_HOME = "{hf_home}" }}\n')
    matrix = write_matrix(text)
    result = invoke("submit", matrix, "--executor", "local", "--dry-run")
    # Nothing at all is in the cache (no prefetch ran): every input must be refused.
    assert not (hf_home / "hub" / "models--acme--base-1b").exists()
    assert result.exit_code == 2, result.output
    assert any(p.startswith(f"base.repo: hub:acme/base-1b@{commit} ") and "not in the Hub cache" in p
               for p in problems(result)), problems(result)


# A ref in the cache is not the input: prefetch may have fetched other cells' subfolders only, or
# been interrupted (huggingface_hub writes refs/<revision> before any file).
def test_offline_submit_refuses_an_adapter_subfolder_prefetch_did_not_fetch(hub2, write_matrix,
                                                                             tmp_path):
    hf_home = tmp_path / "hf-home"
    matrix = write_matrix(TWO_SIZES + f'offline = true\nenv = {{ HF_HOME = "{hf_home}" }}\n')
    assert invoke("prefetch", matrix, "--only", "1b-*").exit_code == 0
    snapshot = hf_home / "hub" / "models--acme--adapters" / "snapshots" / hub2.adapters
    assert not (snapshot / "2b-std").exists()  # only the 1b adapters were fetched
    result = invoke("submit", matrix, "--executor", "local", "--dry-run")
    assert result.exit_code == 2, result.output
    found = problems(result)
    assert any("hub:acme/base-2b" in p for p in found)  # no ref at all
    # the adapters' ref is there (the 1b ones were fetched), their 2b files are not:
    assert any("hub:acme/adapters/2b-std/eng" in p for p in found), found


# A baseline at a size and variant without cells reads a base no cell does: checked and pinned too.
BASELINE_ONLY = (TWO_SIZES.replace('name = "hub"\n',
                                   'name = "hub"\nexclude = [{ size = "2b", method = "ties" }]\n')
                 + '[eval]\ntasks = ["tiny_mc"]\nbaselines = [{ name = "base" }]\n')


def eval_task_line(stdout: str, target: str) -> str:
    lines = stdout.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("-- task ") and line.endswith(f": {target}"):
            return lines[i + 1]
    raise AssertionError(f"no task {target} in:\n{stdout}")


def test_submit_pins_the_base_of_a_baseline_without_cells(hub2, write_matrix):
    matrix = write_matrix(BASELINE_ONLY)
    dry = invoke("submit", matrix, "--executor", "local", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert f"--pin base={hub2.head('acme/base-1b')}" in eval_task_line(dry.stdout, "1b-std/base")
    assert f"--pin base={hub2.head('acme/base-2b')}" in eval_task_line(dry.stdout, "2b-std/base")


def test_check_and_prefetch_take_only_a_baseline(hub2, write_matrix):
    """`--only` may name a baseline alone (one at a size and variant without cells, say)."""
    matrix = write_matrix(BASELINE_ONLY)
    checked = invoke("check", matrix, "--only", "2b-std/base", "--json")
    assert checked.exit_code == 0, checked.output
    assert [row["input"] for row in json.loads(checked.stdout)] == ["hub:acme/base-2b"]
    nothing = invoke("check", matrix, "--only", "9b-*")
    assert nothing.exit_code == 2
    assert "--only '9b-*' matches no cell or [eval] baseline of" in nothing.stderr


def test_check_refuses_a_missing_base_of_a_baseline_without_cells(hub2, write_matrix):
    hub2.repos.pop("acme/base-2b")  # not on the Hub (a typo, a private repo)
    matrix = write_matrix(BASELINE_ONLY)
    for command in (["submit", matrix, "--executor", "local", "--dry-run"], ["check", matrix]):
        result = invoke(*command)
        assert result.exit_code == 2, result.output
        assert any(p.startswith("base.repo: no such repo on the Hub") and "acme/base-2b" in p
                   for p in problems(result)), problems(result)


# Without a container a task inherits this environment with [runtime] env over it: an
# HF_HUB_CACHE set here wins, in the task's huggingface_hub, over the HF_HOME of [runtime] env,
# and prefetch, check and offline submit must use that cache too.
def resolved_in(env: dict[str, str], expression: str, module: str) -> str:
    return subprocess.run([sys.executable, "-c", f"import {module}; print({expression})"],
                          env=env, capture_output=True, text=True, check=True).stdout.strip()


def test_the_hub_cache_prefetch_fills_is_the_one_a_task_without_container_reads(
        hub2, write_matrix, tmp_path, monkeypatch):
    from bakery_slurm.matrix import load_matrix

    hf_home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "login-hub-cache"))
    matrix = write_matrix(TWO_SIZES + f'offline = true\nenv = {{ HF_HOME = "{hf_home}" }}\n')
    loaded = load_matrix(matrix)
    task_env = {**os.environ, **loaded.task_env("none")}  # array_task.run_task's environment
    task_cache = resolved_in(task_env, "huggingface_hub.constants.HF_HUB_CACHE", "huggingface_hub.constants")
    assert str(preflight.hub_cache_dir(loaded, "none")) == task_cache
    # End to end: what prefetch fetched, an offline task reads.
    assert invoke("prefetch", matrix, "--only", "1b-*").exit_code == 0
    code = ("from bakery_slurm.sources import fetch; from bakery_slurm.matrix import ModelSource;"
            f"fetch(ModelSource('acme/base-1b', None, None, None, '{hub2.head('acme/base-1b')}'),"
            " offline=True)")
    done = subprocess.run([sys.executable, "-c", code], env=task_env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-500:]


# In a container (--cleanenv) the eval tasks see only [runtime] env (HF_HOME = <work>/hf-home by
# default): prefetch loads the datasets there, whatever HF_DATASETS_CACHE says on the login node.
def test_prefetch_loads_eval_datasets_into_the_cache_a_container_task_reads(
        hub2, write_matrix, tmp_path, monkeypatch):
    from bakery_slurm.cli import prefetch as prefetch_cli
    from bakery_slurm.matrix import load_matrix

    image = tmp_path / "bakery.sif"
    image.write_text("an image")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "login-datasets"))
    matrix = write_matrix(TWO_SIZES.replace('container = "none"',
                                             f'container = "apptainer"\nimage = "{image}"')
                          + '[eval]\ntasks = ["tiny_mc"]\n')
    seen = {}

    def fake_prefetch_tasks(tasks, include_path, env, path, **where):
        seen["env"] = dict(env)
        return []

    monkeypatch.setattr(prefetch_cli, "prefetch_tasks", fake_prefetch_tasks)
    result = invoke("prefetch", matrix, "--only", "1b-*")
    assert result.exit_code == 0, result.output
    expected = preflight.datasets_cache_dir(load_matrix(matrix), "apptainer")
    assert f"loading eval tasks into {expected}" in result.stderr
    child_cache = resolved_in(seen["env"], "datasets.config.HF_DATASETS_CACHE", "datasets.config")
    assert child_cache == str(expected)


# A resubmit's kept pins too: the cache may have been purged since (work areas are purged
# after some weeks).
def test_offline_resubmit_pins_are_checked_against_the_cache(hub2, write_matrix, tmp_path):
    from bakery_slurm.matrix import expand, load_matrix

    hf_home = tmp_path / "hf-home"  # empty: purged since the first submit
    matrix = load_matrix(write_matrix(TWO_SIZES.replace("[sizes.2b]\n", "")
                                      + f'offline = true\nenv = {{ HF_HOME = "{hf_home}" }}\n'))
    cells = expand(matrix)
    known = {"hub:acme/base-1b": hub2.head("acme/base-1b"),
             "hub:acme/adapters/1b-std/eng": hub2.adapters,
             "hub:acme/adapters/1b-std/nob": hub2.adapters}
    report = preflight.preflight(matrix, cells, "local", container="none", known_pins=known,
                                 api=hub2, environ=os.environ)
    assert len(report.problems) == 3, report.problems


def test_check_refuses_a_gated_base_the_token_cannot_read(hub2, write_matrix):
    """The Hub answers repo_info and the file listing of a gated repo to anyone; only downloads
    and auth-check refuse a token that has not accepted its terms."""
    hub2.gated = {"acme/base-1b"}
    result = invoke("check", write_matrix(HUB_MATRIX))
    assert result.exit_code == 2, result.output
    assert ("base.repo: acme/base-1b is gated and this token has no access (input 'base'; accept "
            "its terms on the Hub)") in problems(result)


# huggingface_hub reads its cache from HF_HUB_CACHE, else the legacy HUGGINGFACE_HUB_CACHE, else
# HF_HOME/hub (HF_HOME itself defaulting to XDG_CACHE_HOME/huggingface), with `~` expanded: each
# spelling a site may use names the cache the tasks read, which prefetch must fill and an offline
# submit must find.
@pytest.mark.parametrize("runtime_env, login_env", [
    ({"HUGGINGFACE_HUB_CACHE": "{tmp}/legacy-hub"}, {}),
    ({"XDG_CACHE_HOME": "{tmp}/xdg"}, {}),
    ({"HF_HOME": "~/hf-home"}, {}),
    ({"HF_HOME": "$PROJECT/hf-home"}, {"PROJECT": "{tmp}/project"}),
    ({"HF_HOME": "{tmp}/hf-home"}, {"HUGGINGFACE_HUB_CACHE": "{tmp}/login-legacy-hub"}),
])
def test_every_spelling_of_the_hub_cache_is_the_one_prefetch_fills_and_submit_reads(
        hub2, write_matrix, tmp_path, monkeypatch, runtime_env, login_env):
    from bakery_slurm.matrix import load_matrix

    for name in ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for name, value in login_env.items():
        monkeypatch.setenv(name, value.format(tmp=tmp_path))
    env = ", ".join(f'{name} = "{value.format(tmp=tmp_path)}"' for name, value in runtime_env.items())
    matrix = write_matrix(TWO_SIZES.replace("[sizes.2b]\n", "")
                          + f"offline = true\nenv = {{ {env} }}\n")
    loaded = load_matrix(matrix)
    task_env = {**os.environ, **loaded.task_env("none")}
    task_cache = resolved_in(task_env, "huggingface_hub.constants.HF_HUB_CACHE",
                             "huggingface_hub.constants")
    assert str(preflight.hub_cache_dir(loaded, "none")) == task_cache
    prefetched = invoke("prefetch", matrix)
    assert prefetched.exit_code == 0, prefetched.output
    assert (Path(task_cache) / "models--acme--base-1b" / "refs" / "main").is_file()
    dry = invoke("submit", matrix, "--executor", "local", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert f"--pin base={hub2.head('acme/base-1b')}" in dry.stdout


def test_a_legacy_hub_cache_variable_in_a_container_is_the_cache_prefetch_fills(
        hub2, write_matrix, tmp_path):
    """In a container [runtime] env alone sets the cache: its HUGGINGFACE_HUB_CACHE wins over the
    HF_HOME (<work>/hf-home) bakery-slurm adds there."""
    from bakery_slurm.eval_prefetch import child_environment
    from bakery_slurm.matrix import load_matrix

    image = tmp_path / "bakery.sif"
    image.write_text("an image")
    matrix = write_matrix(TWO_SIZES.replace('container = "none"', f'container = "apptainer"\n'
                                            f'image = "{image}"\n'
                                            f'env = {{ HUGGINGFACE_HUB_CACHE = "{tmp_path}/hub" }}'))
    loaded = load_matrix(matrix)
    task_env = child_environment(os.environ, loaded.task_env("apptainer"), "apptainer")
    assert str(preflight.hub_cache_dir(loaded, "apptainer")) == resolved_in(
        task_env, "huggingface_hub.constants.HF_HUB_CACHE", "huggingface_hub.constants")


# `datasets` reads its cache from HF_DATASETS_CACHE, else HF_HOME/datasets, HF_HOME defaulting to
# XDG_CACHE_HOME/huggingface as huggingface_hub's does, and its builders expand `~` (never
# `$NAME`): the cache prefetch loads the eval datasets into, and an offline submit looks in, is
# the one an eval task reads, for each spelling.
@pytest.mark.parametrize("runtime_env, login_env", [
    ({}, {}),
    ({"XDG_CACHE_HOME": "{tmp}/xdg"}, {}),
    ({"HF_HOME": "~/hf-home"}, {}),
    ({"HF_DATASETS_CACHE": "~/datasets"}, {}),
    ({"HF_HOME": "$PROJECT/hf-home"}, {"PROJECT": "{tmp}/project"}),
    ({"HF_HOME": "{tmp}/hf-home"}, {"HF_DATASETS_CACHE": "{tmp}/login-datasets"}),
])
def test_every_spelling_of_the_datasets_cache_is_the_one_an_eval_task_reads(
        write_matrix, tmp_path, monkeypatch, runtime_env, login_env):
    from bakery_slurm.matrix import load_matrix

    for name in ("HF_HOME", "HF_DATASETS_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for name, value in login_env.items():
        monkeypatch.setenv(name, value.format(tmp=tmp_path))
    env = ", ".join(f'{name} = "{value.format(tmp=tmp_path)}"' for name, value in runtime_env.items())
    loaded = load_matrix(write_matrix(HUB_MATRIX + f"env = {{ {env} }}\n"))
    task_env = {**os.environ, **loaded.task_env("none")}
    assert str(preflight.datasets_cache_dir(loaded, "none")) == resolved_in(
        task_env, "os.path.expanduser(datasets.config.HF_DATASETS_CACHE)", "os, datasets.config")


# Offline, an eval task reads its dataset from the datasets cache only: a task whose dataset is
# on the Hub and was not prefetched is refused before any sbatch (it would fail on the node after
# its wait in the queue), without lm-eval; a task whose data are local files needs no download.
def test_offline_check_and_submit_refuse_an_eval_dataset_prefetch_did_not_load(
        hub, write_matrix, tmp_path, monkeypatch):
    hf_home, include = tmp_path / "hf-home", tmp_path / "eval-tasks"
    shutil.copytree(TASKS, include)
    (include / "local_mc.yaml").write_text("include: tiny_mc.yaml\ntask: local_mc\n")
    (include / "hub_mc.yaml").write_text("include: tiny_mc.yaml\ntask: hub_mc\n"
                                         "dataset_path: acme/hub-mc\n")
    text = HUB_MATRIX + f'offline = true\nenv = {{ HF_HOME = "{hf_home}" }}\n'
    assert invoke("prefetch", write_matrix(text)).exit_code == 0  # the Hub inputs (no [eval])
    matrix = write_matrix(text + f'[eval]\ntasks = ["tiny_mc", "local_mc", "hub_mc"]\n'
                                 f'include_path = "{include}"\n')
    cache = hf_home / "datasets"
    refused = [f"eval.tasks: the dataset of eval task 'hub_mc' is not in the datasets cache "
               f"{cache} and runtime.offline is true: run `bakery-slurm prefetch {matrix}` first"]
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # the check needs no lm-eval
    before = sorted(tmp_path.rglob("*"))
    for command in (["check", matrix], ["submit", matrix, "--executor", "local"]):
        result = invoke(*command)
        assert result.exit_code == 2, result.output
        assert problems(result) == refused
    assert sorted(tmp_path.rglob("*")) == before
    no_checks = invoke("submit", matrix, "--executor", "local", "--dry-run", "--no-preflight")
    assert no_checks.exit_code == 0, no_checks.output
    # What prefetch records once lm-eval has loaded hub_mc, whose dataset it prepared:
    from bakery_slurm.eval_prefetch import record_prefetched

    prepared = cache / "acme___hub-mc" / "default" / "hub_mc-validation.arrow"
    prepared.parent.mkdir(parents=True)
    prepared.write_bytes(b"arrow")
    record_prefetched(cache, "hub_mc", str(include), [str(prepared)])
    checked = invoke("check", matrix)
    assert checked.exit_code == 0, checked.output
    prepared.unlink()  # a purge by age
    assert problems(invoke("check", matrix)) == refused


# In huggingface_hub's cache a snapshot's files are links into blobs/. A work area purged by age
# (or a blob removed by hand) leaves the link behind, dangling: the file is not in the cache.
def test_offline_submit_refuses_a_cached_file_whose_blob_is_gone(hub, write_matrix, tmp_path):
    hf_home = tmp_path / "hf-home"
    matrix = write_matrix(HUB_MATRIX + f'offline = true\nenv = {{ HF_HOME = "{hf_home}" }}\n')
    assert invoke("prefetch", matrix).exit_code == 0
    weights = (hf_home / "hub" / "models--acme--adapters" / "snapshots" / hub.adapters
               / "1b-std" / "nob" / "adapter_model.safetensors")
    weights.unlink()
    weights.symlink_to("../../../../blobs/purged")
    result = invoke("submit", matrix, "--executor", "local", "--dry-run")
    assert result.exit_code == 2, result.output
    assert any(p.startswith(f"adapter.repo: hub:acme/adapters/1b-std/nob at {hub.adapters[:12]} "
                            "is not in the Hub cache") and "lacks adapter_model.safetensors" in p
               for p in problems(result)), problems(result)


def test_prefetch_names_a_gated_repo_as_gated_not_as_missing(hub, write_matrix, tmp_path):
    hub.gated = {"acme/base-1b"}
    matrix = write_matrix(HUB_MATRIX + f'env = {{ HF_HOME = "{tmp_path}/hf-home" }}\n')
    result = invoke("prefetch", matrix)
    assert result.exit_code == 2, result.output
    assert ("hub:acme/base-1b: acme/base-1b is gated and this token has no access (accept its "
            "terms on the Hub, then run prefetch again)") in result.stderr
    assert "not on the Hub" not in result.stderr


def test_a_local_input_reached_through_a_bound_symlink_is_named(hub, tmp_path, monkeypatch):
    """A bind shows its folder at the path written (a symlink there is not resolved), but the
    matrix reads a local input at its resolved path: /cluster/projects/x -> /lustre/x bound,
    a base under it is read at /lustre/x/..., which the container does not have."""
    monkeypatch.setattr(preflight, "DEFAULT_BINDS", ())  # tmp_path is under /tmp
    (tmp_path / "lustre" / "base-1b").mkdir(parents=True)
    (tmp_path / "lustre" / "base-1b" / "config.json").write_text("{}")
    (tmp_path / "projects").symlink_to(tmp_path / "lustre")
    (tmp_path / "matrix").mkdir()
    image = tmp_path / "matrix" / "bakery.sif"
    image.write_text("an image")
    text = (HUB_MATRIX.replace('repo = "acme/base-{size}"',
                               f'path = "{tmp_path}/projects/base-{{size}}"')
            .replace('container = "none"', f'container = "apptainer"\nimage = "{image}"\n'
                     f'binds = ["{tmp_path}/projects"]'))
    (tmp_path / "matrix" / "matrix.toml").write_text(text)
    result = invoke("check", tmp_path / "matrix" / "matrix.toml", "--executor", "slurm")
    assert (f"base.path: {tmp_path}/lustre/base-1b is under none of the folders a task's "
            "container sees (the matrix and work folders, [runtime] binds, ~ and /tmp): add a "
            "folder above it to runtime.binds") in problems(result), result.output
    bound = text.replace(f'binds = ["{tmp_path}/projects"]', f'binds = ["{tmp_path}/lustre"]')
    (tmp_path / "matrix" / "matrix.toml").write_text(bound)
    result = invoke("check", tmp_path / "matrix" / "matrix.toml", "--executor", "slurm")
    assert not [p for p in problems(result) if "under none of the folders" in p], result.output
