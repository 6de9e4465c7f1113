"""A project folder shared by a Unix group: a teammate runs `status` and `resubmit` on a ledger
and work folder that someone else created (`-m slurm`: this tier runs as root, which can create
the second user; the cells run on the local executor).

`teammate` creates a group and a user in it (useradd), and a setgid folder of that group in /tmp;
all three are removed afterwards. The teammate runs the CLI through `runuser` with the system
Python 3.11 and this checkout on PYTHONPATH (root's own interpreter is not readable by others).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from bakery_slurm.matrix import expand, load_matrix
from bakery_slurm.pipeline import CellPaths, run_cell
from support import wait_for

from .test_slurm import cid, size, write_matrix

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
SYSTEM_PYTHON = "/usr/bin/python3"
CELL = cid("gone", "linear")


@pytest.fixture(scope="module")
def teammate():
    if os.geteuid() != 0:
        pytest.fail("this tier runs as root (it starts the cluster); needed here for useradd")
    name = f"bkmate{os.getpid()}"
    subprocess.run(["groupadd", name], check=True, capture_output=True)
    try:
        subprocess.run(["useradd", "-M", "-N", "-g", name, "-s", "/usr/sbin/nologin", name],
                       check=True, capture_output=True)
        try:
            gid = int(subprocess.run(["getent", "group", name], check=True, capture_output=True,
                                     text=True).stdout.split(":")[2])
            shared = Path(tempfile.mkdtemp(prefix="bakery-shared-", dir="/tmp"))
            try:
                os.chown(shared, 0, gid)
                os.chmod(shared, 0o2775)  # setgid: everything below belongs to the group
                yield SimpleNamespace(user=name, shared=shared)
            finally:
                shutil.rmtree(shared, ignore_errors=True)
        finally:
            end_processes_of(name)  # userdel refuses while the teammate's supervisor lives
            subprocess.run(["userdel", name], check=True, capture_output=True)
            # torch's per-user cache folder, made by the teammate's imports
            shutil.rmtree(Path(tempfile.gettempdir()) / f"torchinductor_{name}", ignore_errors=True)
    finally:
        subprocess.run(["groupdel", name], check=False, capture_output=True)


def end_processes_of(user: str) -> None:
    """Wait for `user`'s processes (local supervisors, tasks) to end; kill those that do not."""
    def pids() -> list[int]:
        found = subprocess.run(["pgrep", "-u", user], capture_output=True, text=True).stdout
        return [int(pid) for pid in found.split()]

    try:
        wait_for(lambda: not pids(), f"{user}'s processes to end", deadline_s=30)
    except AssertionError:
        for pid in pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not pids(), f"{user}'s processes to die")


def as_teammate(teammate, *args: str, **env_vars: str) -> subprocess.CompletedProcess:
    """`bakery-slurm *args` as the teammate, under this process's umask (runuser keeps it),
    offline unless `env_vars` (more environment variables) say otherwise."""
    site = Path(sys.executable).parents[1] / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    env = [f"PYTHONPATH={REPO}:{site}", f"HOME={teammate.shared}", f"PATH={os.environ['PATH']}",
           *(f"{name}={value}" for name, value in {"HF_HUB_OFFLINE": "1", **env_vars}.items())]
    return subprocess.run(["runuser", "-u", teammate.user, "--", "env", "-i", *env, SYSTEM_PYTHON,
                           "-m", "bakery_slurm", *args], capture_output=True, text=True,
                          cwd=teammate.shared, timeout=600)


@pytest.fixture
def umask_of():
    old = os.umask(0o022)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def project_folder(teammate, name: str) -> Path:
    """A project's folder in the group's folder, which its group may use (made so whatever the
    umask of the member who runs the project: one they made under umask 077 is theirs alone,
    and stays so)."""
    folder = teammate.shared / name
    folder.mkdir()
    os.chmod(folder, 0o2775)
    return folder


def submitted_failed_cell(folder: Path, bakery) -> Path:
    """A local submission of one cell whose sources do not exist (it fails in seconds; preflight,
    which would refuse it, is skipped here and by the teammate's resubmits)."""
    matrix = write_matrix(folder, {"gone": size(folder / "no-models", "text", ["linear"])})
    ledger = folder / "bakery-ledger.json"
    bakery.ok("submit", matrix, "--executor", "local", "--no-preflight", ledger=ledger)
    assert bakery.wait_settled(ledger)[CELL]["state"] == "FAILED"
    return ledger


@pytest.mark.parametrize("umask", [0o002, 0o077], ids=["umask 002", "umask 077"])
def test_a_teammate_reads_and_resubmits_in_a_group_folder(teammate, bakery, umask_of, umask):
    """With umask 077 too: in the group's setgid folder the ledger, its lock and the array
    folders get the group's access (they were the owner's alone)."""
    umask_of(umask)
    ledger = submitted_failed_cell(project_folder(teammate, f"group-{umask:03o}"), bakery)
    os.chmod(ledger.parent / "matrix.toml", 0o664)  # the user's own file, which resubmit reads
    status = as_teammate(teammate, "status", "--json", "--ledger", str(ledger))
    assert status.returncode == 1, status.stderr  # 1: the cell failed, and that is all
    [row] = json.loads(status.stdout)
    assert row["state"] == "FAILED" and "does not exist" in row["detail"], row
    again = as_teammate(teammate, "resubmit", "--json", "--no-preflight", "--ledger",
                        str(ledger))
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)[0]["action"].startswith("resubmitted in ")
    rows = bakery.wait_settled(ledger)
    assert (rows[CELL]["state"], rows[CELL]["attempt"]) == ("FAILED", 2)
    # The first attempt's log, which the owner's local executor wrote.
    shown = as_teammate(teammate, "logs", CELL, "--attempt", "1", "--stderr", "--ledger",
                        str(ledger))
    assert shown.returncode == 0 and "does not exist" in shown.stdout, shown.stderr


def test_a_lock_the_group_may_not_write_is_a_clear_message(teammate, bakery, umask_of):
    umask_of(0o022)  # the owner forgot umask 002: files readable, not writable, by the group
    private = teammate.shared / "private"
    private.mkdir()
    os.chmod(private, 0o755)  # and the setgid bit, which would give the group its access
    ledger = submitted_failed_cell(private, bakery)
    before = ledger.read_bytes()
    status = as_teammate(teammate, "status", "--ledger", str(ledger))
    assert status.returncode == 1 and status.stdout.startswith("cell "), status.stderr
    again = as_teammate(teammate, "resubmit", "--no-preflight", "--ledger", str(ledger))
    assert again.returncode == 2, again.stderr
    assert again.stderr.startswith(f"Error: cannot open the lock file {ledger}.lock for writing "
                                   "(Permission denied): it is mode 644"), again.stderr
    assert "umask 002" in again.stderr and "Traceback" not in again.stderr
    assert ledger.read_bytes() == before


def group_project(teammate, tiny_models, write_tiny_matrix, engine: str,
                  name: str | None = None) -> Path:
    """A matrix of the tiny models' linear and task_arithmetic cells in the group folder, in
    project folder `proj-<name>` (default: the engine's)."""
    name = name or engine
    models = teammate.shared / "models" / name
    shutil.copytree(tiny_models, models)
    subprocess.run(["chmod", "-R", "g+rwX,o+rX", str(models)], check=True)  # pytest's tmp is 0700
    matrix = write_tiny_matrix(project_folder(teammate, f"proj-{name}"), models=models,
                               methods=("linear", "task_arithmetic"), engine=engine)
    os.chmod(matrix, 0o664)  # the user's own file, whatever their umask: the group reads it
    return matrix


@pytest.mark.parametrize("umask", [0o002, 0o077], ids=["umask 002", "umask 077"])
def test_a_teammate_merges_from_the_bakes_the_first_user_made(teammate, umask_of, tiny_models,
                                                              write_tiny_matrix, umask):
    """The mergekit engine's bakes are cached for the row: safetensors writes them 0600, and a
    bake whose names need no repair is linked into place, so its mode must be set before (under
    umask 077 too: to what the group's folder gives)."""
    umask_of(umask)
    matrix_path = group_project(teammate, tiny_models, write_tiny_matrix, "mergekit",
                                f"mergekit-{umask:03o}")
    matrix = load_matrix(matrix_path)
    cells = {c.id: c for c in expand(matrix)}
    assert run_cell(cells["tiny1b-std/eng-nob__linear"], matrix.work_dir, device="cpu")["status"] == "done"
    unreadable = [p for p in (matrix.work_dir / "cache" / "bakes").rglob("*")
                  if p.is_file() and not p.stat().st_mode & stat.S_IRGRP]
    assert unreadable == []
    run = as_teammate(teammate, "run-cell", str(matrix_path), "tiny1b-std/eng-nob__task_arithmetic",
                      "--device", "cpu")
    assert run.returncode == 0, run.stderr[-1500:]


KILLED_IN_A_STAGE = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from bakery_slurm import fsutil
    with fsutil.staging_dir(Path(sys.argv[1])) as tmp:
        (tmp / "model.safetensors").write_bytes(b"half a merge" * 1000)
        os.kill(os.getpid(), signal.SIGKILL)   # SLURM's time limit, the OOM killer
""")


def test_a_teammates_rerun_removes_the_staging_folder_of_a_killed_task(teammate, umask_of,
                                                                       tiny_models,
                                                                       write_tiny_matrix):
    """mkdtemp makes staging folders 0700: left so by a killed task, no teammate could remove it."""
    umask_of(0o002)
    matrix_path = group_project(teammate, tiny_models, write_tiny_matrix, "bakery")
    paths = CellPaths(load_matrix(matrix_path).work_dir, "tiny1b-std/eng-nob__linear")
    killed = subprocess.run([sys.executable, "-c", KILLED_IN_A_STAGE, str(paths.final)],
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert killed.returncode == -signal.SIGKILL
    assert len(list(paths.root.glob(".*.partial"))) == 1
    run = as_teammate(teammate, "run-cell", str(matrix_path), paths.cell_id, "--device", "cpu")
    assert run.returncode == 0, run.stderr[-1500:]
    assert list(paths.root.glob(".*.partial")) == []


def test_a_log_the_teammate_may_not_read_is_a_clear_message(teammate, bakery, umask_of):
    umask_of(0o002)
    ledger = submitted_failed_cell(teammate.shared / "private-log", bakery)
    [log] = (teammate.shared / "private-log").rglob("0.err")
    os.chmod(log, 0o600)  # written under the owner's umask 077
    shown = as_teammate(teammate, "logs", CELL, "--stderr", "--ledger", str(ledger))
    assert shown.returncode == 2 and "Traceback" not in shown.stderr, shown.stderr
    assert shown.stderr.startswith(f"Error: permission denied on {log} (Permission denied): it "
                                   "is mode 600"), shown.stderr
    assert "umask 002" in shown.stderr


def test_a_published_cell_the_teammate_may_not_read_is_never_dropped_from_the_root_card(
        teammate, umask_of, tiny_models, write_tiny_matrix):
    """A cell published to a `dir:` target by someone with umask 077: the teammate's card
    refresh used to read the target without it (rglob skips a folder it may not read) and
    rewrite the root card without that cell."""
    umask_of(0o002)
    models = teammate.shared / "models" / "card"
    shutil.copytree(tiny_models, models)
    subprocess.run(["chmod", "-R", "g+rwX,o+rX", str(models)], check=True)
    matrix_path = write_tiny_matrix(teammate.shared / "proj-card", models=models,
                                    methods=("linear", "task_arithmetic"))
    matrix = load_matrix(matrix_path)
    for cell in expand(matrix):
        if cell.size == "tiny1b":
            assert run_cell(cell, matrix.work_dir, device="cpu")["status"] == "done"
    published = matrix_path.parent / "published"
    hidden = published / "tiny1b-std" / "eng-nob__linear"
    os.chmod(hidden, 0o700)
    card = (published / "README.md").read_bytes()
    refresh = as_teammate(teammate, "push", str(matrix_path), "--cards")
    assert refresh.returncode == 2 and "Traceback" not in refresh.stderr, refresh.stderr
    assert refresh.stderr.startswith(f"Error: permission denied on {hidden} "), refresh.stderr
    assert (published / "README.md").read_bytes() == card


def test_a_teammate_reads_the_slurm_logs_of_a_member_with_umask_077(teammate, bakery, umask_of):
    """SLURM opens a task's log files under the submitter's umask (sbatch passes it on as
    SLURM_UMASK): under 077 no teammate could read why a cell failed."""
    umask_of(0o077)
    folder = project_folder(teammate, "strict-slurm")
    matrix = write_matrix(folder, {"gone": size(folder / "no-models", "text", ["linear"])})
    ledger = folder / "bakery-ledger.json"
    bakery.ok("submit", matrix, "--executor", "slurm", "--no-preflight", ledger=ledger)
    assert bakery.wait_settled(ledger)[CELL]["state"] == "FAILED"
    status = as_teammate(teammate, "status", "--json", "--ledger", str(ledger))
    assert status.returncode == 1, status.stderr
    assert "does not exist" in json.loads(status.stdout)[0]["detail"]
    shown = as_teammate(teammate, "logs", CELL, "--stderr", "--ledger", str(ledger))
    assert shown.returncode == 0, shown.stderr
    assert "does not exist" in shown.stdout


HUB_MATRIX = """
name = "shared-hub-cache"
adapters = ["eng", "nob"]
[base]
repo = "acme/tiny-text"
[adapter]
repo = "acme/tiny-adapters"
subfolder = "{adapter}"
[push]
target = "dir:published"
[variants.std]
[sizes.tiny1b]
[methods.linear]
weight = 0.5
[runtime]
container = "none"
[paths]
work = "work"
"""


def test_a_teammate_uses_and_adds_to_the_hub_cache_a_member_with_umask_077_filled(
        teammate, umask_of, tiny_models):
    """The group's Hub cache: one member prefetches under umask 077, then a teammate's task reads
    what they downloaded, offline, and the teammate's prefetch downloads another repo into the
    cache (huggingface_hub's lock folder). huggingface_hub wrote the repo's tree listing 0600,
    and the rest under the umask: the member's alone."""
    from hub_server import HubServer

    umask_of(0o002)
    project, cache = project_folder(teammate, "proj-hub"), project_folder(teammate, "hf-hub")
    (matrix := project / "matrix.toml").write_text(HUB_MATRIX)
    (other := project / "other.toml").write_text(
        HUB_MATRIX.replace('"acme/tiny-text"', '"acme/other-text"'))
    repos = {"acme/tiny-text": tiny_models / "bases" / "text",
             "acme/other-text": tiny_models / "bases" / "text",
             "acme/tiny-adapters": tiny_models / "adapters" / "text"}
    with HubServer(repos) as hub:
        online = {"HF_ENDPOINT": hub.endpoint, "HF_HUB_OFFLINE": "0", "HF_HUB_CACHE": str(cache),
                  "HF_HOME": str(project / "hf-home")}
        first = subprocess.run([sys.executable, "-m", "bakery_slurm", "prefetch", str(matrix)],
                               env={**os.environ, **online}, capture_output=True, text=True,
                               umask=0o077)
        assert first.returncode == 0, first.stderr[-3000:]
        run = as_teammate(teammate, "run-cell", str(matrix), "tiny1b-std/eng-nob__linear",
                          "--device", "cpu", HF_HUB_CACHE=str(cache))
        assert run.returncode == 0, run.stderr[-3000:]
        added = as_teammate(teammate, "prefetch", str(other), **online)
        assert added.returncode == 0, added.stderr[-3000:]
