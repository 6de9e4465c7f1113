"""What one array task runs (`task_command`): exact argvs, the launcher that starts submitit's
runner inside the image, and the Hub token passed by environment only."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from bakery_slurm import local, submission
from bakery_slurm.cli import cli
from bakery_slurm.errors import ConfigError, SchedulerError
from bakery_slurm.executors import SlurmBackend
from bakery_slurm.matrix import Runtime, expand, load_matrix
from bakery_slurm.task_command import (
    apptainer_prefix,
    cell_args,
    launcher_script,
    task_argv,
    task_environment,
)
from conftest import MINIMAL_MATRIX

SHA = "ab" * 32
PIN = "0123456789abcdef0123456789abcdef01234567"
CELL = "4b-std/eng-nob__ties"
SECRET = "hf_secret_do_not_print_0123456789"
ARGS = cell_args(Path("/m/matrix.toml"), CELL, SHA, Path("/w"), {})


def test_cell_args_name_the_cell_its_recipe_and_its_pins_in_order():
    assert cell_args(Path("/m/matrix.toml"), CELL, SHA, Path("/w"), {"nob": PIN, "base": "c" * 40}) == [
        "run-cell", "/m/matrix.toml", CELL, "--recipe-hash", SHA, "--work", "/w",
        "--pin", f"base={'c' * 40}", "--pin", f"nob={PIN}"]


def test_apptainer_prefix_is_exact():
    runtime = Runtime(container="apptainer", image="/images/bakery.sif",
                      binds=["/cluster/projects/nn1k", "/data/matrices", "/scratch"],
                      env={"HF_HOME": "/cluster/projects/nn1k/hf-home", "A_FIRST": "1"})
    prefix = apptainer_prefix(runtime, runtime.env, Path("/data/matrices/matrix.toml"),
                              Path("/scratch/work"), 1)
    assert prefix == [
        "env", "APPTAINERENV_A_FIRST=1", "APPTAINERENV_HF_HOME=/cluster/projects/nn1k/hf-home",
        # the image's packages, not the folder submit ran in (the job's working directory)
        "APPTAINERENV_PYTHONSAFEPATH=1", "apptainer", "exec", "--nv", "--cleanenv",
        # the runtime's binds, then the matrix folder and the work folder; duplicates dropped
        "--bind", "/cluster/projects/nn1k,/data/matrices,/scratch,/scratch/work",
        "/images/bakery.sif", "python3"]
    assert task_argv(prefix, runtime.env, ARGS) == [*prefix, "-m", "bakery_slurm", *ARGS]


def test_apptainer_prefix_binds_the_matrix_and_work_folders_once():
    runtime = Runtime(container="apptainer", image="/i.sif", binds=["/w", "/m", "/w"])
    prefix = apptainer_prefix(runtime, {}, Path("/m/matrix.toml"), Path("/w"), gpus=4)
    assert prefix[prefix.index("--bind") + 1] == "/w,/m"


@pytest.mark.parametrize("gpus", [0, None])
def test_apptainer_prefix_without_gpus_has_no_nv(gpus):
    runtime = Runtime(container="apptainer", image="/i.sif", python="/opt/py/bin/python3")
    assert apptainer_prefix(runtime, {}, Path("/m/matrix.toml"), Path("/w"), gpus=gpus) == [
        "env", "APPTAINERENV_PYTHONSAFEPATH=1", "apptainer", "exec", "--cleanenv", "--bind", "/m,/w",
        "/i.sif", "/opt/py/bin/python3"]


def test_the_runtime_paths_are_expanded_and_read_from_the_matrix_folder(write_matrix, tmp_path,
                                                                          monkeypatch):
    """apptainer expands no ~, and a relative image or bind is read from the matrix's folder (as
    every path in the file), not from wherever submit runs; a bind's symlink is kept as written."""
    monkeypatch.setenv("HOME", "/home/me")
    monkeypatch.chdir("/")
    matrix = load_matrix(write_matrix(MINIMAL_MATRIX + '[runtime]\ncontainer = "apptainer"\n'
                                      'image = "images/b.sif"\n'
                                      'binds = ["~/data:/data:ro", "shared", "/abs/link"]\n',
                                      "m/matrix.toml"))
    folder = tmp_path / "m"
    assert matrix.runtime.image == f"{folder}/images/b.sif"
    assert matrix.runtime.binds == ["/home/me/data:/data:ro", f"{folder}/shared", "/abs/link"]
    prefix = apptainer_prefix(matrix.runtime, {}, matrix.path, Path("/w"), gpus=0)
    assert prefix[prefix.index("--bind") + 1] == f"/home/me/data:/data:ro,{folder}/shared,/abs/link,{folder},/w"
    assert prefix[-2] == f"{folder}/images/b.sif"
    home = load_matrix(write_matrix(MINIMAL_MATRIX + '[runtime]\nimage = "~/b.sif"\n'))
    assert home.runtime.image == "/home/me/b.sif"


@pytest.mark.parametrize("bind", ["/a,/b", ":/data", ""])
def test_a_bind_that_is_not_one_folder_is_refused_at_load(write_matrix, bind):
    path = write_matrix(MINIMAL_MATRIX + f'[runtime]\nbinds = ["{bind}"]\n')
    with pytest.raises(ConfigError, match=f"{path}: runtime.binds.*is not one bind"):
        load_matrix(path)


@pytest.mark.parametrize("work", ["w,1", "w:1"])
def test_a_work_folder_apptainer_cannot_bind_is_refused_before_sbatch(write_matrix, work):
    """The work folder is bound as `--bind SRC,...`: a ',' starts another bind, a ':' a destination."""
    matrix = load_matrix(write_matrix(MINIMAL_MATRIX + f'[paths]\nwork = "{work}"\n'
                                      '[runtime]\nimage = "/i.sif"\n'))
    with pytest.raises(ConfigError, match=f"paths.work: apptainer cannot bind a folder whose path "
                                          f"holds ',' or ':' \\(got '{matrix.work_dir}'\\)"):
        submission.resolve_container(matrix, "slurm")
    assert submission.resolve_container(matrix, "local") == "none"  # no container, no bind


def test_a_container_gets_a_hub_cache_under_work_unless_env_names_one(write_matrix):
    matrix = load_matrix(write_matrix(MINIMAL_MATRIX + '[paths]\nwork = "w"\n'))
    assert matrix.task_env("apptainer") == {"HF_HOME": str(matrix.work_dir / "hf-home")}
    assert matrix.task_env("none") == {}  # without a container the task inherits ours
    named = load_matrix(write_matrix(MINIMAL_MATRIX + '[runtime]\nenv = { HF_HUB_CACHE = "/c" }\n'))
    assert named.task_env("apptainer") == {"HF_HUB_CACHE": "/c"}


def test_none_argv_runs_this_python_directly_with_the_fixed_environment():
    argv = task_argv(None, {"HF_HOME": "/h", "A_FIRST": "1"}, ARGS)
    assert argv == ["env", "A_FIRST=1", "HF_HOME=/h", sys.executable, "-m", "bakery_slurm", *ARGS]


def test_none_argv_without_fixed_environment_is_just_python():
    assert task_argv(None, {}, ARGS)[0] == sys.executable


# ---------------------------------------------------------------------------------------------
# The launcher: a real sh runs it, with a recording `apptainer` on PATH

RECORDER = """#!/bin/sh
printf '%s\n' "$@" > "$RECORD.args"
env > "$RECORD.env"
"""


def run_launcher(tmp_path: Path, environ: dict[str, str], pass_env: list[str],
                 fixed: dict[str, str] | None = None) -> tuple[list[str], dict[str, str], str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "apptainer").write_text(RECORDER)
    (bin_dir / "apptainer").chmod(0o755)
    runtime = Runtime(container="apptainer", image="/i.sif", env=fixed or {"HF_HOME": "/h"})
    script = launcher_script(apptainer_prefix(runtime, runtime.env, Path("/m/x.toml"), Path("/w"), 1),
                             pass_env)
    path = tmp_path / "launch.sh"
    path.write_text(script)
    path.chmod(0o755)
    record = tmp_path / "record"
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "RECORD": str(record), **environ}
    subprocess.run([str(path), "-u", "-m", "submitit.core._submit", "/w/arrays/a b"], env=env,
                   check=True)
    args = (record.with_suffix(".args")).read_text().splitlines()
    seen = dict(line.split("=", 1) for line in record.with_suffix(".env").read_text().splitlines()
                if "=" in line)
    return args, seen, script


def test_launcher_forwards_the_job_the_token_and_pass_env_by_name(tmp_path):
    environ = {"SLURM_JOB_ID": "12", "SLURM_ARRAY_TASK_ID": "3", "SLURM_PROCID": "0",
               "SLURM_JOB_NODELIST": "gpu-[1-2]", "SUBMITIT_EXECUTOR": "slurm",
               "HF_TOKEN": SECRET, "https_proxy": "http://proxy:3128", "CUDA_VISIBLE_DEVICES": "1",
               "UNRELATED": "x", "MY_VAR": "with spaces and $dollar"}
    args, seen, script = run_launcher(tmp_path, environ, ["https_proxy", "http_proxy", "MY_VAR"])
    assert args == ["exec", "--nv", "--cleanenv", "--bind", "/m,/w", "/i.sif",
                    "python3", "-u", "-m", "submitit.core._submit", "/w/arrays/a b"]
    forwarded = {k[len("APPTAINERENV_"):]: v for k, v in seen.items()
                 if k.startswith("APPTAINERENV_")}
    # The runtime's fixed env (HF_HOME) goes the same way, set in the script.
    assert forwarded == {**{k: v for k, v in environ.items() if k != "UNRELATED"}, "HF_HOME": "/h",
                         "PYTHONSAFEPATH": "1"}
    assert SECRET not in script and "proxy:3128" not in script  # names only, never values


def test_runtime_env_values_reach_the_container_whole_and_win_over_forwarded_ones(tmp_path):
    """apptainer's --env splits a value holding '=' at its commas; APPTAINERENV_* are taken whole."""
    fixed = {"XLA_FLAGS": "--a=1,--b=2", "NO_PROXY": 'localhost,.cluster,"x"', "https_proxy": "fixed"}
    _, seen, _ = run_launcher(tmp_path, {"https_proxy": "http://proxy:3128"}, ["https_proxy"], fixed)
    assert {name: seen[f"APPTAINERENV_{name}"] for name in fixed} == fixed


STANDIN = Path(__file__).resolve().parents[1] / "integration" / "standin"


def test_the_image_and_not_the_folder_submit_ran_in_provides_bakery_slurm(tmp_path):
    """SLURM starts a task in the folder submit ran in (often a bakery-slurm checkout), apptainer
    keeps it as the working directory, and `python -m` would put it first on sys.path."""
    image = tmp_path / "image.sif"  # the stand-in's image: this venv stands for it
    image.write_text(f"bakery-standin-image {sys.prefix}\n")
    checkout = tmp_path / "checkout"
    (checkout / "bakery_slurm").mkdir(parents=True)
    (checkout / "bakery_slurm" / "__init__.py").write_text("raise ImportError('the checkout')\n")
    runtime = Runtime(container="apptainer", image=str(image))
    script = tmp_path / "launch.sh"
    script.write_text(launcher_script(apptainer_prefix(runtime, {}, tmp_path / "matrix.toml",
                                                       tmp_path, 0), []))
    script.chmod(0o755)
    done = subprocess.run([str(script), "-c", "import bakery_slurm; print(bakery_slurm.__file__)"],
                          cwd=checkout, env={"PATH": f"{STANDIN}:/usr/bin:/bin", "HOME": str(tmp_path)},
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert not done.stdout.startswith(str(checkout))


def test_launcher_binds_and_names_the_node_tmpdir(tmp_path):
    """--cleanenv drops TMPDIR and apptainer binds only /tmp: the node's own temporary folder (the
    tasks' private Xet cache goes there) is bound and named inside."""
    node_tmp = tmp_path / "local scratch"
    node_tmp.mkdir()
    args, seen, _ = run_launcher(tmp_path, {"TMPDIR": str(node_tmp)}, [])
    assert args[:7] == ["exec", "--nv", "--cleanenv", "--bind", "/m,/w", f"--bind={node_tmp}",
                        "/i.sif"]
    assert seen["APPTAINERENV_TMPDIR"] == str(node_tmp)


@pytest.mark.parametrize("tmpdir", ["missing", "a,b", "a:b"])
def test_launcher_leaves_a_tmpdir_it_cannot_bind(tmp_path, tmpdir):
    (tmp_path / "a,b").mkdir()
    (tmp_path / "a:b").mkdir()
    args, seen, _ = run_launcher(tmp_path, {"TMPDIR": str(tmp_path / tmpdir)}, [])
    assert args[:6] == ["exec", "--nv", "--cleanenv", "--bind", "/m,/w", "/i.sif"]
    assert "APPTAINERENV_TMPDIR" not in seen


def test_launcher_leaves_unset_names_unset(tmp_path):
    _, seen, _ = run_launcher(tmp_path, {"SLURM_JOB_ID": "1"}, ["https_proxy"])
    assert "APPTAINERENV_https_proxy" not in seen and "APPTAINERENV_HF_TOKEN" not in seen
    assert seen["APPTAINERENV_SLURM_JOB_ID"] == "1"


# ---------------------------------------------------------------------------------------------
# task_environment

ENVIRON = {"PATH": "/usr/bin", "HOME": "/home/u", "HF_TOKEN": SECRET,
           "https_proxy": "http://proxy:3128", "MY_VAR": "x"}


def test_apptainer_environment_forwards_token_and_pass_env_names():
    env = task_environment(dict(ENVIRON), ["https_proxy", "http_proxy", "MY_VAR"], "apptainer")
    added = {k: v for k, v in env.items() if k not in ENVIRON}
    assert added == {"APPTAINERENV_HF_TOKEN": SECRET,
                     "APPTAINERENV_https_proxy": "http://proxy:3128",
                     "APPTAINERENV_MY_VAR": "x"}
    # absent names (http_proxy, HUGGING_FACE_HUB_TOKEN) do not appear at all
    assert "APPTAINERENV_http_proxy" not in env
    assert "APPTAINERENV_HUGGING_FACE_HUB_TOKEN" not in env
    assert {k: env[k] for k in ENVIRON} == ENVIRON  # the host environment itself is kept


def test_apptainer_environment_forwards_tokens_gpus_and_task_ids():
    environ = {"HUGGING_FACE_HUB_TOKEN": "t1", "HF_TOKEN": "t2", "CUDA_VISIBLE_DEVICES": "2",
               "SLURM_JOB_ID": "9", "SLURM_ARRAY_JOB_ID": "7", "SLURM_ARRAY_TASK_ID": "3",
               "SLURM_NODELIST": "gpu-1"}
    env = task_environment(environ, [], "apptainer")
    assert {k: env[k] for k in env if k.startswith("APPTAINERENV_")} == {
        f"APPTAINERENV_{name}": value for name, value in environ.items()
        if name != "SLURM_NODELIST"}


def test_none_environment_is_unchanged():
    environ = dict(ENVIRON)
    assert task_environment(environ, ["https_proxy", "MY_VAR"], "none") == ENVIRON
    assert environ == ENVIRON  # not mutated either


# ---------------------------------------------------------------------------------------------
# The token never reaches a command line, the output or a file

APPTAINER_MATRIX = MINIMAL_MATRIX + """
[methods.linear]
weight = 0.5

[resources]
gpus_per_node = 1
partition = "accel"

[runtime]
container = "apptainer"
image = "/images/bakery.sif"
binds = ["/cluster/projects/nn1k"]
env = { HF_HOME = "/cluster/projects/nn1k/hf-home" }
"""


def files_under(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_dry_run_never_shows_or_writes_the_token(tmp_path, write_matrix, monkeypatch):
    matrix = write_matrix(APPTAINER_MATRIX)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setenv("https_proxy", "http://proxy:3128")

    # A laptop: no scontrol and no srun; the dry run still renders submitit's sbatch script.
    def no_scontrol(self):
        raise SchedulerError("scontrol show config failed: not installed")

    monkeypatch.setattr(SlurmBackend, "max_array_size", no_scontrol)
    import shutil
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None if name == "srun"
                        else real_which(name, *a, **k))
    before = files_under(tmp_path)
    result = CliRunner().invoke(cli, ["submit", str(matrix), "--executor", "slurm", "--dry-run",
                                      "--no-preflight"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "apptainer exec --nv --cleanenv" in result.stdout
    assert "#SBATCH --array=0-1%2" in result.stdout
    # submitit's runner starts inside the image: the sbatch script runs the launcher, not this
    # Python, whose path means nothing on an arm64 compute node.
    assert "apptainer-launch.sh -u -m submitit.core._submit" in result.stdout
    assert sys.executable not in result.stdout
    assert ("env APPTAINERENV_HF_HOME=/cluster/projects/nn1k/hf-home APPTAINERENV_PYTHONSAFEPATH=1 "
            "apptainer exec") in result.stdout
    assert SECRET not in result.stdout
    assert SECRET not in result.stderr
    # Not even by name on a command line: only the launcher's list of forwarded names has it.
    assert [line for line in result.stdout.splitlines() if "HF_TOKEN" in line] == [
        line for line in result.stdout.splitlines() if line.startswith("for name in $(env")]
    assert files_under(tmp_path) == before  # a dry run writes nothing


def wait_terminal(folder: Path, job_id: str, n: int, deadline_s: float = 20) -> dict:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        states = local.read_states(folder, job_id)
        if len(states) == n and all(s.state not in ("PENDING", "RUNNING") for s in states.values()):
            return states
        time.sleep(0.05)
    raise AssertionError(f"tasks in {folder} did not finish: {local.read_states(folder, job_id)}")


def test_local_apptainer_task_gets_the_token_by_environment_only(tmp_path, write_matrix,
                                                                 monkeypatch):
    """A real local submission with container apptainer: the task sees APPTAINERENV_HF_TOKEN,
    while no argv, ledger or array file holds the token."""
    matrix = load_matrix(write_matrix(APPTAINER_MATRIX))
    cells = expand(matrix)[:1]
    monkeypatch.setenv("HF_TOKEN", SECRET)
    argvs = []

    def fake_argv(*args, **kwargs):
        argvs.append(task_argv(*args, **kwargs))
        return [sys.executable, "-c",
                "import os; print(sorted(k for k in os.environ if k.startswith('APPTAINERENV_'))); "
                "print(os.environ.get('APPTAINERENV_HF_TOKEN') == os.environ['HF_TOKEN'])"]

    monkeypatch.setattr(submission, "task_argv", fake_argv)
    (request,) = submission.submit_cells(tmp_path / "ledger.json", matrix, cells, "local")
    folder = Path(request.array.folder)
    states = wait_terminal(folder, request.array.job_id, 1)
    assert [s.state for s in states.values()] == ["COMPLETED"]
    out = (folder / "0.out").read_text()
    assert "'APPTAINERENV_HF_TOKEN'" in out and out.rstrip().endswith("True")
    assert argvs and all(SECRET not in " ".join(a) for a in argvs)
    assert request.container == "apptainer"
    written = files_under(tmp_path)
    assert "ledger.json" in written and any(name.endswith("array.json") for name in written)
    assert [name for name, data in written.items() if SECRET.encode() in data] == []


def test_a_task_runs_its_command_under_the_submitters_umask(tmp_path, monkeypatch):
    """SLURM starts the task under the umask of its array folder (SLURM_UMASK); the command gets
    the submitter's back from `fixed_env`, which an image built before it was sent ignores."""
    from bakery_slurm import array_task

    seen = tmp_path / "seen"
    python = tmp_path / "python"  # stands in for the image's Python: says its umask and env
    python.write_text(f"#!/bin/sh\n{{ umask; echo \"${{{array_task.TASK_UMASK}:-unset}}\"; }} > {seen}\n")
    python.chmod(0o755)
    monkeypatch.setattr(array_task.sys, "executable", str(python))
    old = os.umask(0o002)
    try:
        array_task.run_task(["run-cell"], {array_task.TASK_UMASK: "0077", "X": "1"})
        assert seen.read_text().split() == ["0077", "unset"]
        array_task.run_task(["run-cell"], {})  # no umask sent: the task's own
        assert seen.read_text().split() == ["0002", "unset"]
    finally:
        os.umask(old)
