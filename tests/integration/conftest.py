"""Fixtures for the integration tier (`-m slurm`): a real single-node SLURM cluster with accounting.

`slurm_cluster` (session, autouse here) makes sure `sbatch` exists and `slurm_cluster.sh status`
passes; otherwise it runs `slurm_cluster.sh up` when we are root. If SLURM still cannot be had, the
tests fail under CI=true and are skipped elsewhere (a laptop).

`standin_image` (session, autouse here) puts the stand-in `apptainer` (standin/apptainer, see its
header) first on PATH, which SLURM passes on to the tasks, and writes a stand-in image naming the
image venv (`make image-venv`: a second venv with bakery-slurm installed from this checkout, as the
real image has it) and hiding the submitting venv from the tasks. Its path is in
BAKERY_STANDIN_IMAGE for `write_matrix`.

`bakery` drives the tool only through its own CLI (Click's CliRunner on `bakery_slurm.cli.cli`) and
waits for states by polling `status --json` until a condition holds or a deadline passes; at the
end of the session it cancels whatever is still live in the ledgers it touched. `held_lock` holds
an fcntl lock from a separate process, as a concurrent task on the cluster would.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from click.testing import CliRunner, Result

import support
from bakery_slurm.cli import cli

CLUSTER_SCRIPT = Path(__file__).with_name("slurm_cluster.sh")
STANDIN = Path(__file__).with_name("standin")
ROOT = Path(__file__).resolve().parents[2]
IMAGE_VENV = Path(os.environ.get("BAKERY_IMAGE_VENV", ROOT / ".image-venv")).absolute()
# Bringing the cluster up may install packages (apt-get) on a fresh machine.
CLUSTER_UP_TIMEOUT_S = 900
# Upper bound for any one wait on task states; generous next to what the tests need (a tiny cell
# runs in ~10 s, a --time=1 task reaches TIMEOUT 60-95 s after it starts). Only hit on a hang.
DEADLINE_S = 240
POLL_S = 1.0
# The states in which a task is over. Written out here, not imported, so that a product change to
# its own notion of "live" cannot make a wait return early.
SETTLED = frozenset({"COMPLETED", "FAILED", "TIMEOUT", "CANCELLED", "OUT_OF_MEMORY", "NODE_FAIL",
                     "BOOT_FAIL", "DEADLINE", "PREEMPTED"})


def _cluster_problem() -> str | None:
    """Why SLURM cannot be used right now, or None when `sbatch`, `sinfo` and `sacct` work."""
    if shutil.which("sbatch") is None:
        return "sbatch is not on PATH"
    try:
        done = subprocess.run([str(CLUSTER_SCRIPT), "status"], capture_output=True, text=True,
                              timeout=120)
    except (OSError, subprocess.SubprocessError) as e:
        return f"{CLUSTER_SCRIPT} status could not run: {e}"
    if done.returncode != 0:
        return f"{CLUSTER_SCRIPT} status failed:\n{done.stderr.strip()}"
    return None


@pytest.fixture(scope="session", autouse=True)
def slurm_cluster() -> None:
    """A reachable cluster: started with `slurm_cluster.sh up` as root if needed; else fail under
    CI=true, skip elsewhere."""
    problem = _cluster_problem()
    if problem is not None and os.geteuid() == 0:
        try:
            up = subprocess.run([str(CLUSTER_SCRIPT), "up"], capture_output=True, text=True,
                                timeout=CLUSTER_UP_TIMEOUT_S)
        except (OSError, subprocess.SubprocessError) as e:
            problem = f"{problem}\n{CLUSTER_SCRIPT} up could not run: {e}"
        else:
            if up.returncode != 0:
                problem = (f"{problem}\n{CLUSTER_SCRIPT} up exited {up.returncode}:\n"
                           f"{up.stderr.strip()[-3000:]}")
            else:
                problem = _cluster_problem()
    elif problem is not None:
        problem += " (and only root may run slurm_cluster.sh up)"
    if problem is not None:
        message = f"no usable SLURM cluster: {problem}"
        if os.environ.get("CI") == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


def _image_venv_problem() -> str | None:
    """Why the image venv cannot stand for the image, or None when it holds this checkout's
    bakery_slurm (a stale copy would test old code)."""
    python = IMAGE_VENV / "bin" / "python"
    if not python.exists():
        return f"no image venv at {IMAGE_VENV} (run `make image-venv`)"
    found = subprocess.run([str(python), "-c", "import bakery_slurm, os; "
                            "print(os.path.dirname(bakery_slurm.__file__))"],
                           capture_output=True, text=True, cwd="/")
    if found.returncode != 0:
        return f"{python} cannot import bakery_slurm: {found.stderr.strip()[-500:]}"
    installed = Path(found.stdout.strip())
    if installed.resolve().is_relative_to(ROOT / "bakery_slurm"):
        return f"the image venv imports bakery_slurm from the checkout ({installed}), not a copy"
    stale = [str(source.relative_to(ROOT)) for source in (ROOT / "bakery_slurm").rglob("*.py")
             if not (installed / source.relative_to(ROOT / "bakery_slurm")).exists()
             or (installed / source.relative_to(ROOT / "bakery_slurm")).read_bytes() != source.read_bytes()]
    if stale:
        return f"the image venv's bakery_slurm is older than the checkout ({', '.join(stale[:3])}...): run `make image-venv`"
    return None


@pytest.fixture(scope="session", autouse=True)
def standin_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The stand-in image file; the stand-in apptainer first on PATH for this session."""
    problem = _image_venv_problem()
    if problem is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"no image venv for the stand-in apptainer: {problem}", pytrace=False)
        pytest.skip(f"no image venv for the stand-in apptainer: {problem}")
    image = tmp_path_factory.mktemp("images") / "bakery-standin.sif"
    image.write_text(f"bakery-standin-image {IMAGE_VENV}\nhide {sys.prefix}\n")
    saved = {name: os.environ.get(name) for name in ("PATH", "BAKERY_STANDIN_IMAGE")}
    os.environ["PATH"] = f"{STANDIN}:{os.environ['PATH']}"
    os.environ["BAKERY_STANDIN_IMAGE"] = str(image)
    yield image
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


class Bakery:
    """The `bakery-slurm` CLI, in process, plus waits on `status --json`."""

    def __init__(self) -> None:
        self.ledgers: set[Path] = set()

    def run(self, *args: Any, ledger: Path | None = None) -> Result:
        """Invoke `bakery-slurm ARGS [--ledger LEDGER]`; exceptions other than exits propagate."""
        argv = [str(a) for a in args]
        if ledger is not None:
            self.ledgers.add(Path(ledger))
            argv += ["--ledger", str(ledger)]
        return CliRunner().invoke(cli, argv, catch_exceptions=False)

    def ok(self, *args: Any, ledger: Path | None = None) -> Result:
        """Like `run`, asserting exit status 0."""
        result = self.run(*args, ledger=ledger)
        assert result.exit_code == 0, _describe(args, result)
        return result

    def poll(self, args: tuple[Any, ...], ledger: Path, condition: Callable[[Result], bool],
             what: str, timeout: float = DEADLINE_S) -> Result:
        """Run `bakery-slurm ARGS --ledger LEDGER` until `condition(result)` holds; return that
        result. Fail after `timeout` seconds, showing the last output and the queue."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.run(*args, ledger=ledger)
            if condition(result):
                return result
            if time.monotonic() > deadline:
                queue = subprocess.run(["squeue", "--states=all", "-o", "%i %j %T %M %R"],
                                       capture_output=True, text=True).stdout
                pytest.fail(f"waited {timeout:.0f} s for {what}; last output:\n{result.output}"
                            f"\nsqueue:\n{queue}")
            time.sleep(POLL_S)

    def wait(self, ledger: Path, condition: Callable[[dict[str, dict[str, Any]]], bool], what: str,
             timeout: float = DEADLINE_S) -> dict[str, dict[str, Any]]:
        """Poll `status --json` until `condition(rows by cell)` holds; return those rows."""
        seen: dict[str, dict[str, Any]] = {}

        def check(result: Result) -> bool:
            # Exit 0 or 1 (a cell failed) are both answers; anything else is not.
            assert result.exit_code in (0, 1), _describe(("status", "--json"), result)
            seen.clear()
            seen.update({row["cell"]: row for row in json.loads(result.stdout)})
            return condition(seen)

        self.poll(("status", "--json"), ledger, check, what, timeout)
        return seen

    def wait_settled(self, ledger: Path, cells: Any = None,
                     timeout: float = DEADLINE_S) -> dict[str, dict[str, Any]]:
        """Wait until `cells` (default: every row of the ledger) are in a final state: the
        merge of a cell (a baseline has none) and its eval, if it has one."""
        def settled(row: dict[str, Any]) -> bool:
            return all(state is None or state in SETTLED for state in (row["state"], row["eval"]))

        return self.wait(ledger, lambda rows: all(
            settled(rows[c]) for c in (rows if cells is None else cells)),
            f"{'every cell' if cells is None else ', '.join(cells)} to finish", timeout)


def _describe(args: Any, result: Result) -> str:
    return (f"bakery-slurm {' '.join(map(str, args))} exited {result.exit_code}\n"
            f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}")


@pytest.fixture(scope="session")
def bakery() -> Iterator[Bakery]:
    """The CLI helper; afterwards, live tasks of every ledger it used are cancelled."""
    helper = Bakery()
    yield helper
    for ledger in sorted(helper.ledgers):
        if ledger.exists():
            with contextlib.suppress(Exception):
                CliRunner().invoke(cli, ["cancel", "--ledger", str(ledger)])


@pytest.fixture(scope="session")
def held_lock() -> Callable[[Path], contextlib.AbstractContextManager[None]]:
    """`with held_lock(path):` an exclusive `fcntl.lockf` lock on `path`, held by another process
    (the lock bakery-slurm's own `fsutil.locked` takes), released when the block ends."""
    return support.held_lock
