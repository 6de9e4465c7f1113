"""Atomic writes and locks: the only way bakery-slurm writes a file that matters.

Every write goes to a temporary name in the same directory, is fsynced, then renamed over the target,
so a reader sees the old content or the new one, never half of it. Locks are POSIX record locks
(`fcntl.lockf`), which NFS (via NLM) and Lustre (mounted with `flock`) honour across nodes, unlike
`flock(2)` on older NFS clients.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


def fsync_path(path: Path) -> None:
    """fsync a file, or a directory (which makes a rename inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def link_or_copy(src: Path, dst: Path) -> bool:
    """Hardlink file `src` to `dst` (True), or copy and fsync it where linking fails (False).

    Links follow symlinks: Hub snapshot folders are symlinks into a blob store; link the blob.
    Files linked this way must only ever be replaced by rename, never edited in place.
    """
    try:
        os.link(src, dst, follow_symlinks=True)
        return True
    except OSError:  # other filesystem, no hardlink support, link count limit
        shutil.copyfile(src, dst)
        fsync_path(dst)
        return False


def umask() -> int:
    """The process's umask, read without changing it where Linux shows it (setting it to read
    it would, for a moment, affect files other threads create)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/self/status") as status:
            return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes, executable: bool = False) -> None:
    """Write `data` to `path` via temp file + fsync + rename, with the mode a plain `open` would
    give (mkstemp's is 0600, which hides the file from the rest of a group-shared folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, (0o777 if executable else 0o666) & ~umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_path(path.parent)


def atomic_write_text(path: Path, text: str, executable: bool = False) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), executable)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


class LockBusy(Exception):
    """A non-blocking `locked` found the lock held by another process."""


@contextlib.contextmanager
def locked(lock_path: Path, blocking: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on `lock_path` (created if missing) for the duration of the block.

    With blocking=False, raise LockBusy at once when another process holds it.
    """
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError):
            raise LockBusy(str(lock_path)) from None
        yield
    finally:
        fcntl.lockf(fd, fcntl.LOCK_UN)
        os.close(fd)


def _usual_modes(folder: Path) -> None:
    """Give `folder` and everything in it the modes a plain mkdir/open would under the umask.

    mkdtemp makes folders 0700 and safetensors writes files 0600: left so, a teammate sharing the
    work folder could not read the bake cache, nor a group the published checkpoints.
    """
    mask = umask()
    os.chmod(folder, 0o777 & ~mask)
    for path in folder.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


@contextlib.contextmanager
def staging_dir(final: Path) -> Iterator[Path]:
    """Yield an empty temporary directory beside `final`; on success rename it to `final`.

    On any exception the temporary directory is removed, so `final` is either absent or complete.
    An existing `final` is replaced (the caller decided it was not intact).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        yield tmp
        _usual_modes(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_path(final.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
