"""Atomic writes and locks: the only way bakery-slurm writes a file that matters.

Every write goes to a temporary name in the same directory, is fsynced, then renamed over the target,
so a reader sees the old content or the new one, never half of it. Every file and folder gets the
mode a plain open/mkdir would give under the umask, so a project folder shared by a group (umask
002) is usable by every member. In a setgid folder (the usual way a group shares one), what is
created there also gets the access the folder gives its group, whatever the umask, as a default
ACL would (`creating_umask`, `share`); never more, and never anything for others. Files
bakery-slurm does not own, or shares by hard link with another folder (a Hub cache blob), are
never chmod-ed.

Locks are POSIX record locks (`fcntl.lockf`), which NFS (via NLM) and Lustre (mounted with `flock`)
honour across nodes, unlike `flock(2)` on older NFS clients. Lustre mounted `noflock` refuses them
(ENOSYS): `locked` says so instead of failing obscurely. Lustre mounted `localflock` grants them
per node only, silently: preflight refuses a work folder there for SLURM (`mounts`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import LockError


def fsync_path(path: Path) -> None:
    """fsync a file, or a directory (which makes a rename inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def link_or_copy(src: Path, dst: Path) -> bool:
    """Hardlink file `src` to `dst` (True), or copy it where linking fails (False). Into a
    `staging_dir`, which puts either on disk before it is renamed into place.

    Links follow symlinks: Hub snapshot folders are symlinks into a blob store; link the blob.
    Files linked this way must only ever be replaced by rename, never edited in place.
    """
    try:
        os.link(src, dst, follow_symlinks=True)
        return True
    except OSError:  # other filesystem, no hardlink support, link count limit
        shutil.copyfile(src, dst)
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


def group_access(folder_mode: int) -> int:
    """The group bits a folder of mode `folder_mode` gives what is created in it: its own group
    bits when it is setgid (a folder shared by a group), none otherwise."""
    return folder_mode & 0o070 if folder_mode & stat.S_ISGID else 0


def shared_mode(mode: int, folder_mode: int, mask: int) -> int:
    """`mode` (a file's or folder's) with the group access its folder gives (`group_access`) or
    the umask `mask` does, as far as the owner has it (an owner's read-only file stays
    read-only), as a default ACL gives it: a teammate with umask 077 in a group's setgid folder
    must not make files only they can read. Nothing is taken away, and nothing is given to
    others."""
    return mode | ((mode & 0o700) >> 3 & (group_access(folder_mode) | ~mask) & 0o070)


def creating_umask(folder: Path) -> int:
    """The umask for creating a file or folder in `folder`: the process's, without the group bits
    the folder gives (`group_access`)."""
    try:
        folder_mode = os.stat(folder).st_mode
    except OSError:
        return umask()
    return umask() & ~group_access(folder_mode)


def share(path: Path, mask: int | None = None) -> None:
    """Give `path`, just created by this user, the group access its folder or the umask `mask`
    (default: the process's) gives (`shared_mode`): what a program wrote 0600 (mkstemp) or under
    the umask. A symlink, a file another user owns, and a file with other hard links are left
    alone (see `usual_modes`)."""
    path = Path(path)
    st = path.lstat()
    if not _ours_alone(st):
        return
    wanted = shared_mode(stat.S_IMODE(st.st_mode), os.stat(path.parent).st_mode,
                         umask() if mask is None else mask)
    if wanted != stat.S_IMODE(st.st_mode):
        os.chmod(path, wanted)


def share_tree(folder: Path) -> None:
    """`share` `folder` and everything below it, each folder before what it holds (so a group's
    access reaches down a tree made under umask 077): for trees other programs wrote into a
    group's folder (huggingface_hub's cache entries, submitit's array folders)."""
    mask = umask()
    share(folder, mask)
    for root, dirs, files in os.walk(folder):
        for name in [*dirs, *files]:
            # Gone: a temporary file renamed meanwhile. Refused: a teammate's folder, not ours.
            with contextlib.suppress(FileNotFoundError, PermissionError):
                share(Path(root) / name, mask)


def make_folder(folder: Path) -> None:
    """`mkdir -p folder`, each folder it creates shared as its parent gives (`share`)."""
    folder = Path(folder)
    missing = []
    while not folder.is_dir() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        try:
            path.mkdir()
        except FileExistsError:
            if not path.is_dir():
                raise
            continue  # made by another process meanwhile: its mode is its maker's business
        share(path)


def replacing_umask(path: Path) -> int:
    """The umask for writing a file or folder that replaces `path`: the one for creating it in
    its folder (`creating_umask`), loosened to what `path` (if it exists) grants already.

    A file replaced by rename is a new file: under a teammate's umask 077 a group's ledger, result
    record or root card would become theirs alone, and the rest of the group, its owner included,
    could no longer read it. Replacing never narrows the access the file had; a new file gets the
    mode of the umask alone.
    """
    try:
        st = os.stat(path)
    except OSError:
        return creating_umask(path.parent)
    mode = stat.S_IMODE(st.st_mode)
    if not stat.S_ISDIR(st.st_mode):
        # A file's mode says nothing of x: reading a file is reading and searching a folder.
        mode |= (mode & 0o444) >> 2
    return creating_umask(path.parent) & ~mode & 0o777


# What a write fails with when the destination is full or read-only. Such an OSError names no
# file (a write(2) has none to name): `naming_output` adds the output being written.
_DESTINATION_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


@contextlib.contextmanager
def naming_output(output: Path) -> Iterator[None]:
    """Note "writing `output`" on a full or read-only disk's error from the block (a stage's
    error puts the notes in front of the message: `pipeline.describe_error`)."""
    try:
        yield
    except OSError as e:
        if e.errno in _DESTINATION_ERRORS and e.filename is None:
            e.add_note(f"writing {output}")
        raise


def atomic_write_bytes(path: Path, data: bytes, executable: bool = False) -> None:
    """Write `data` to `path` via temp file + fsync + rename, with the mode a plain `open` would
    give (mkstemp's is 0600, which hides the file from the rest of a group-shared folder), and
    at least the access the file it replaces had (`replacing_umask`)."""
    path = Path(path)
    with naming_output(path):
        make_folder(path.parent)
        mask = replacing_umask(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            # mkstemp creates 0600: give the file the mode open() would, so a group can read it.
            os.fchmod(fd, (0o777 if executable else 0o666) & ~mask)
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


# What lockf fails with where the filesystem has no POSIX locks (Lustre `noflock`: ENOSYS; some
# FUSE and NFS mounts without a lock manager: EOPNOTSUPP or ENOLCK).
_NO_LOCKS = {errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK}


@contextlib.contextmanager
def locked(lock_path: Path, blocking: bool = True, shared: bool = False,
           lockf: Callable[[int, int], None] = fcntl.lockf) -> Iterator[None]:
    """Hold an exclusive lock on `lock_path` (created if missing) for the duration of the block;
    with shared=True a shared one, which other shared holders may hold at the same time.

    With blocking=False, raise LockBusy at once when another process holds it (exclusively, for a
    shared lock). `lockf` is `fcntl.lockf` or a stand-in with its signature.

    Raises
    ------
    LockError
        The lock file cannot be opened for writing (a teammate's file the group may not write),
        or the filesystem does not support POSIX locks.
    """
    lock_path = Path(lock_path)
    make_folder(lock_path.parent)
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError as e:
        raise LockError(f"cannot open the lock file {lock_path} for writing ({e.strerror}): "
                        f"{who_may_access(lock_path)}") from None
    try:
        share(lock_path)
        try:
            mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
            lockf(fd, mode if blocking else mode | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError):
            raise LockBusy(str(lock_path)) from None
        except OSError as e:
            if e.errno not in _NO_LOCKS:
                raise
            raise LockError(
                f"cannot lock {lock_path}: the filesystem does not support POSIX locks "
                f"({e.strerror}). On Lustre, ask for the folder to be mounted with `flock` "
                "(not `noflock`, and not `localflock`, whose locks hold on one node only), or "
                "move [paths] work and the ledger to a filesystem with locks") from None
        try:
            yield
        finally:
            lockf(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextlib.contextmanager
def held_while_alive(path: Path) -> Iterator[None]:
    """Hold an flock on `path` (created, and removed at the end) for the block: other processes
    see with `is_held` that this one is still at it; the kernel drops it if this one dies. flock,
    not lockf: a probe from this very process sees it held too (on a local filesystem; NFS
    emulates flock with POSIX locks, which only other processes see)."""
    try:
        make_folder(Path(path).parent)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        fd = None  # a folder this user may not write: the command's own lock there says so
    if fd is None:
        yield
        return
    try:
        share(path)  # a teammate's `is_held` opens it: unreadable, it would look held forever
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:
            if e.errno not in _NO_LOCKS:
                raise
            # No locks here: `is_held` cannot tell either and says held while the file exists;
            # the ledger's own lock then stops the command with the explanation.
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


def is_held(path: Path) -> bool:
    """Is `path` held by `held_while_alive` in a live process? True when it cannot be told."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:  # BlockingIOError: held; anything else: cannot tell
        return True
    finally:
        os.close(fd)
    return False


def who_may_access(path: Path) -> str:
    """Why this user may not read or write `path` (or the folder holding it), and what fixes it:
    for the message of a command stopped by a teammate's file or folder."""
    path = Path(path)
    for place in (path, *path.parents):
        try:
            st = place.stat()
        except (PermissionError, FileNotFoundError):
            # A folder above it may not be searched, or it could not be created there (a write's
            # temporary file): name that folder.
            continue
        except OSError:
            break
        kind = "folder" if stat.S_ISDIR(st.st_mode) else "file"
        named = "it is" if place == path else f"the {kind} {place} is"
        return (f"{named} mode {st.st_mode & 0o7777:o}, owned by uid {st.st_uid} gid "
                f"{st.st_gid}. For a folder shared by a group, everyone working in it needs umask "
                "002 (and the folder the setgid bit); the owner can `chmod -R g+rwX` what was "
                "made without it")
    return "neither it nor a folder above it can be looked at"


def usual_modes(folder: Path, mask: int | None = None) -> None:
    """Give `folder` and everything in it the modes a plain mkdir/open would under the umask.

    mkdtemp makes folders 0700 and safetensors writes files 0600: left so, a teammate sharing the
    work folder could not read the bake cache, nor a group the published checkpoints. A file we
    do not own cannot be chmod-ed, and one with other hard links (a Hub cache blob, linked into
    place) would change mode there too: both are left as they are. A file that has its mode
    already is not chmod-ed either, which would change its ctime (a hash taken while it was
    written is trusted only while its ctime is unchanged: `manifest.scan`).
    `mask` is the umask to apply (default: the process's).
    """
    mask = umask() if mask is None else mask
    usual_dir_mode(folder, mask)
    for path in folder.rglob("*"):
        st = path.lstat()
        if not _ours_alone(st):
            continue
        if stat.S_IMODE(st.st_mode) != _usual_mode(st, mask):
            os.chmod(path, _usual_mode(st, mask))


def _ours_alone(st: os.stat_result) -> bool:
    """May bakery-slurm chmod the file or folder whose `lstat` is `st`? Not a symlink, not
    another user's, and not a file with other hard links (a Hub cache blob linked into place),
    whose mode would change there too."""
    return (not stat.S_ISLNK(st.st_mode) and st.st_uid == os.geteuid()
            and (stat.S_ISDIR(st.st_mode) or st.st_nlink == 1))


def usual_dir_mode(folder: Path, mask: int | None = None) -> None:
    """Give a folder (mkdtemp's are 0700) the mode mkdir gives under `mask` (default: the
    process's umask)."""
    os.chmod(folder, _usual_mode(os.stat(folder), umask() if mask is None else mask))


def _usual_mode(st: os.stat_result, mask: int) -> int:
    """The mode mkdir or open gives under `mask`. A folder keeps its setgid bit (inherited from a
    group's setgid folder): files created in it later must keep getting the folder's group."""
    if stat.S_ISDIR(st.st_mode):
        return (0o777 & ~mask) | (st.st_mode & stat.S_ISGID)
    return 0o666 & ~mask


@contextlib.contextmanager
def staging_dir(final: Path) -> Iterator[Path]:
    """Yield an empty temporary directory beside `final`; on success rename it to `final`.

    Everything in it (files written, copied or linked there, and its folders) is fsynced before
    the rename, so after a crash `final` is absent or complete on disk, not a folder of files that
    the filesystem had not written yet (zero-length on ext4, zero-filled on others). On any
    exception the temporary directory is removed. An existing `final` is replaced (the caller
    decided it was not intact).
    """
    final = Path(final)
    make_folder(final.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        with naming_output(final):  # also the fsyncs: NFS may report a full disk only there
            # mkdtemp's 0700: a teammate could not remove it after a kill.
            usual_dir_mode(tmp, creating_umask(final.parent))
            yield tmp
            # A folder that replaces another keeps at least the access the old one gave: a
            # teammate's umask 077 must not hide a published cell from the rest of the group.
            usual_modes(tmp, replacing_umask(final))
            for path in [*tmp.rglob("*"), tmp]:  # a file already synced costs nothing here
                if not path.is_symlink() and (path.is_file() or path.is_dir()):
                    fsync_path(path)
            old = None
            if final.exists():
                # Moved aside, not removed in place: `final` is never a half-deleted folder (a
                # reader's open file on NFS makes a removal fail half-way), only briefly absent.
                old = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial",
                                            dir=final.parent))
                try:
                    os.replace(final, old)
                except BaseException:
                    old.rmdir()
                    raise
            try:
                os.replace(tmp, final)
            except BaseException:
                if old is not None:
                    os.replace(old, final)
                raise
            fsync_path(final.parent)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
