"""Helpers shared by test modules (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

REGEN_ENV = "BAKERY_REGEN_GOLDEN"
T = TypeVar("T")


def wait_for(condition: Callable[[], T], what: str, deadline_s: float = 30.0,
             interval_s: float = 0.02) -> T:
    """Poll `condition` until it returns something truthy; fail after `deadline_s`.

    Polling a condition is how tests wait; a fixed sleep never stands in for a state.
    """
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {deadline_s} s waiting for {what}")


_LOCKER = """\
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
mode = fcntl.LOCK_SH if sys.argv[2] == "shared" else fcntl.LOCK_EX
if sys.argv[3] == "try":
    try:
        fcntl.lockf(fd, mode | fcntl.LOCK_NB)
    except OSError:
        sys.exit(1)
else:
    fcntl.lockf(fd, mode)
    print("locked", flush=True)
    sys.stdin.read()  # hold the lock until the test closes our stdin
"""


def may_lock(path: Path, shared: bool = False) -> bool:
    """Could another process take an `fcntl.lockf` lock on `path` now (exclusive, or shared),
    without waiting? The lock bakery-slurm's own `fsutil.locked` takes."""
    mode = "shared" if shared else "exclusive"
    return subprocess.run([sys.executable, "-c", _LOCKER, str(path), mode, "try"]).returncode == 0


@contextlib.contextmanager
def held_lock(path: Path, shared: bool = False) -> Iterator[None]:
    """Hold an `fcntl.lockf` lock on `path` (exclusive, or shared) in another process for the
    block."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", _LOCKER, str(path),
                               "shared" if shared else "exclusive", "hold"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        line = holder.stdout.readline()
        assert line == "locked\n", f"lock holder for {path} did not take the lock (said {line!r})"
        yield
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


def assert_matches_golden(text: str, record: Path, what: str) -> None:
    """Compare `text` with the recorded file, as submitit's `_sbatch_test_record.txt` test does.

    With BAKERY_REGEN_GOLDEN=1 the record is (re)written first. A missing record fails rather
    than being silently created.
    """
    if os.environ.get(REGEN_ENV) == "1":
        record.parent.mkdir(exist_ok=True)
        record.write_text(text, encoding="utf-8")
    assert record.exists(), f"{record} is missing: run the tests with {REGEN_ENV}=1 to write it"
    recorded = record.read_text(encoding="utf-8")
    old_lines, new_lines = recorded.splitlines(), text.splitlines()
    changes = [f"line {i + 1}: {old!r} -> {new!r}"
               for i, (old, new) in enumerate(zip(old_lines, new_lines)) if old != new]
    if len(old_lines) != len(new_lines):
        changes.append(f"{len(old_lines)} lines recorded, {len(new_lines)} rendered")
    assert not changes and recorded == text, (
        f"The rendered {what} differs from the record:\n" + "\n".join(changes) +
        f"\nIf the change is intended, delete {record} and rerun with {REGEN_ENV}=1 to regenerate it.")


@dataclass
class Recorder:
    """Stands in for `subprocess.run`: records each call and answers from `answers`, keyed by the
    command name: a CompletedProcess-like (returncode, stdout, stderr) triple, or a function of the
    argv returning one. `check=True` raises CalledProcessError on a non-zero status, as
    subprocess.run does."""

    answers: dict[str, tuple[int, str, str] | Callable[[list[str]], tuple[int, str, str]]] = \
        field(default_factory=dict)
    calls: list[list[str]] = field(default_factory=list)
    kwargs: list[dict[str, Any]] = field(default_factory=list)

    def __call__(self, argv, **kwargs):
        self.calls.append(list(argv))
        self.kwargs.append(kwargs)
        if argv[0] not in self.answers:
            raise FileNotFoundError(2, "No such file or directory", argv[0])
        answer = self.answers[argv[0]]
        code, out, err = answer(list(argv)) if callable(answer) else answer
        if kwargs.get("check") and code != 0:
            raise subprocess.CalledProcessError(code, argv, out, err)
        return subprocess.CompletedProcess(argv, code, out, err)


def checkpoint_tensors(folder: Path) -> dict[str, Any]:
    """Every tensor of a safetensors checkpoint folder (all shards), by name."""
    from safetensors.torch import load_file  # imported here: most tests never load a checkpoint

    out: dict[str, Any] = {}
    for shard in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(shard)))
    assert out, f"no safetensors in {folder}"
    return out


def settled(ledger_path: Path) -> list[Any] | None:
    """The ledger's cell statuses once no cell is pending or running, else None (for `wait_for`)."""
    from bakery_slurm.ledger import load_ledger
    from bakery_slurm.resubmit_policy import is_live
    from bakery_slurm.status_snapshot import snapshot

    statuses = snapshot(ledger_path, load_ledger(ledger_path)).statuses
    return statuses if not any(is_live(s.state) for s in statuses) else None


def unshared(folder: Path) -> dict[str, str]:
    """What in `folder` (a cache shared by a group) the group may not read and write (a folder:
    search too), symlinks aside: {path: mode}."""
    found = {}
    for path in [folder, *folder.rglob("*")]:
        mode = path.lstat().st_mode
        wanted = stat.S_IRGRP | stat.S_IWGRP | (stat.S_IXGRP if stat.S_ISDIR(mode) else 0)
        if not stat.S_ISLNK(mode) and mode & wanted != wanted:
            found[str(path.relative_to(folder))] = oct(stat.S_IMODE(mode))
    return found
