"""The command line of one array task (`container.task_argv`) and its environment
(`task.task_environment`): exact argvs, and the Hub token passed by environment only."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from bakery_slurm import local, submission
from bakery_slurm.cli import cli
from bakery_slurm.container import task_argv
from bakery_slurm.errors import SchedulerError
from bakery_slurm.executors import SlurmBackend
from bakery_slurm.matrix import Runtime, expand, load_matrix
from bakery_slurm.task import task_environment
from conftest import MINIMAL_MATRIX

SHA = "ab" * 32
CELL = "4b-std/eng-nob__ties"
SECRET = "hf_secret_do_not_print_0123456789"


def test_apptainer_argv_is_exact():
    runtime = Runtime(container="apptainer", image="/images/bakery.sif",
                      binds=["/cluster/projects/nn1k", "/data/matrices", "/scratch"],
                      env={"HF_HOME": "/cluster/projects/nn1k/hf-home", "A_FIRST": "1"})
    argv = task_argv(runtime, "apptainer", Path("/data/matrices/matrix.toml"), SHA, CELL,
                     Path("/scratch/work"), gpus=1)
    assert argv == [
        "apptainer", "exec", "--nv", "--cleanenv",
        # the runtime's binds, then the matrix folder and the work folder; duplicates dropped
        "--bind", "/cluster/projects/nn1k,/data/matrices,/scratch,/scratch/work",
        "--env=A_FIRST=1", "--env=HF_HOME=/cluster/projects/nn1k/hf-home",
        "/images/bakery.sif", "python3", "-m", "bakery_slurm", "run-cell",
        "/data/matrices/matrix.toml", CELL, "--recipe-hash", SHA, "--work", "/scratch/work"]


def test_apptainer_argv_binds_the_matrix_and_work_folders_once():
    runtime = Runtime(container="apptainer", image="/i.sif", binds=["/w", "/m", "/w"])
    argv = task_argv(runtime, "apptainer", Path("/m/matrix.toml"), SHA, CELL, Path("/w"), gpus=4)
    assert argv[argv.index("--bind") + 1] == "/w,/m"


@pytest.mark.parametrize("gpus", [0, None])
def test_apptainer_argv_without_gpus_has_no_nv(gpus):
    runtime = Runtime(container="apptainer", image="/i.sif", python="/opt/py/bin/python3")
    argv = task_argv(runtime, "apptainer", Path("/m/matrix.toml"), SHA, CELL, Path("/w"), gpus=gpus)
    assert argv == ["apptainer", "exec", "--cleanenv", "--bind", "/m,/w", "/i.sif",
                    "/opt/py/bin/python3", "-m", "bakery_slurm", "run-cell", "/m/matrix.toml",
                    CELL, "--recipe-hash", SHA, "--work", "/w"]


def test_none_argv_runs_this_python_directly_with_the_fixed_environment():
    runtime = Runtime(container="none", image="/i.sif", binds=["/b"],
                      env={"HF_HOME": "/h", "A_FIRST": "1"})
    argv = task_argv(runtime, "none", Path("/m/matrix.toml"), SHA, CELL, Path("/w"), gpus=1)
    assert argv == ["env", "A_FIRST=1", "HF_HOME=/h", sys.executable, "-m", "bakery_slurm",
                    "run-cell", "/m/matrix.toml", CELL, "--recipe-hash", SHA, "--work", "/w"]


def test_none_argv_without_fixed_environment_is_just_python():
    argv = task_argv(Runtime(container="none"), "none", Path("/m/matrix.toml"), SHA, CELL,
                     Path("/w"), gpus=None)
    assert argv[0] == sys.executable


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
    result = CliRunner().invoke(cli, ["submit", str(matrix), "--executor", "slurm", "--dry-run"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "apptainer exec --nv --cleanenv" in result.stdout
    assert "#SBATCH --array=0-1%2" in result.stdout
    assert "--env=HF_HOME=/cluster/projects/nn1k/hf-home" in result.stdout
    assert SECRET not in result.stdout
    assert SECRET not in result.stderr
    assert "HF_TOKEN" not in result.stdout  # not even by name on a command line
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
