"""Atomic writes, staging folders and locks."""

import errno
import os
import stat
from pathlib import Path

import pytest

from bakery_slurm import fsutil
from bakery_slurm.errors import LockError
from support import may_lock


def test_a_staged_folder_appears_complete_with_the_usual_modes(tmp_path):
    umask = os.umask(0o022)
    try:
        final = tmp_path / "out"
        with fsutil.staging_dir(final) as tmp:
            (tmp / "sub").mkdir()
            weights = tmp / "sub" / "model.safetensors"
            weights.write_bytes(b"x")
            os.chmod(weights, 0o600)  # as safetensors writes its files
            assert not final.exists()
        assert stat.S_IMODE(final.stat().st_mode) == 0o755
        assert stat.S_IMODE((final / "sub").stat().st_mode) == 0o755
        assert stat.S_IMODE((final / "sub" / "model.safetensors").stat().st_mode) == 0o644
    finally:
        os.umask(umask)


def test_a_staged_folder_is_on_disk_before_it_is_renamed_into_place(tmp_path, monkeypatch):
    final, synced = tmp_path / "out", []
    real = fsutil.fsync_path
    monkeypatch.setattr(fsutil, "fsync_path",
                        lambda path: synced.append((Path(path).name, final.exists())) or real(path))
    (tmp_path / "blob").write_bytes(b"w")
    with fsutil.staging_dir(final) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "config.json").write_text("{}")
        fsutil.link_or_copy(tmp_path / "blob", tmp / "model.safetensors")
        (tmp / "link").symlink_to("model.safetensors")
        staged = tmp.name
    before_rename = {name for name, existed in synced if not existed}
    assert {"sub", "config.json", "model.safetensors", staged} <= before_rename
    assert "link" not in before_rename  # a symlink is not opened (its target is synced already)
    assert (final / "sub" / "config.json").read_text() == "{}"


def test_a_failed_stage_leaves_nothing(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with fsutil.staging_dir(final) as tmp:
            (tmp / "half").write_bytes(b"x")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_replaces_whole_files_only(tmp_path):
    path = tmp_path / "ledger.json"
    fsutil.atomic_write_json(path, {"a": 1})
    fsutil.atomic_write_json(path, {"a": 2})
    assert path.read_text() == '{\n  "a": 2\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["ledger.json"]  # no temporary left behind


@pytest.fixture
def group_umask():
    """umask 002, as in a project folder shared by a group; restored afterwards."""
    old = os.umask(0o002)
    yield
    os.umask(old)


def test_atomic_writes_and_locks_honour_the_umask(tmp_path, group_umask):
    # mkstemp alone makes 0600 files: a teammate could not read the ledger or a result record.
    fsutil.atomic_write_json(tmp_path / "result.json", {"a": 1})
    with fsutil.locked(tmp_path / "x.lock"):
        pass
    assert stat.S_IMODE((tmp_path / "result.json").stat().st_mode) == 0o664
    assert stat.S_IMODE((tmp_path / "x.lock").stat().st_mode) == 0o664


def test_staging_never_changes_the_mode_of_a_hard_linked_file(tmp_path, group_umask):
    # A Hub cache blob linked into a staged folder: its mode is the cache's business.
    blob = tmp_path / "blob"
    blob.write_bytes(b"weights")
    os.chmod(blob, 0o444)
    with fsutil.staging_dir(tmp_path / "out") as tmp:
        fsutil.link_or_copy(blob, tmp / "model.safetensors")
        (tmp / "config.json").write_bytes(b"{}")
        os.chmod(tmp / "config.json", 0o600)
    assert stat.S_IMODE(blob.stat().st_mode) == 0o444
    assert stat.S_IMODE((tmp_path / "out" / "config.json").stat().st_mode) == 0o664


@pytest.mark.parametrize("code", [errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK])
def test_a_filesystem_without_locks_is_named(tmp_path, code):
    # What fcntl.lockf raises on Lustre mounted noflock (ENOSYS) and on mounts without a lock
    # manager; no filesystem here refuses locks, so lockf is replaced at its signature.
    def refuse(fd, operation):
        raise OSError(code, os.strerror(code))

    with pytest.raises(LockError, match=r"does not support POSIX locks .*mounted with `flock`"):
        with fsutil.locked(tmp_path / "x.lock", lockf=refuse):
            pass


def test_shared_locks_coexist_and_keep_an_exclusive_one_out(tmp_path):
    lock = tmp_path / "x.lock"
    with fsutil.locked(lock, blocking=False, shared=True):
        assert may_lock(lock, shared=True) and not may_lock(lock)
    assert may_lock(lock)


def test_a_replaced_file_or_folder_keeps_the_access_the_group_had(tmp_path):
    """A teammate with umask 077 rewrites the group's ledger, a result record, a root card or a
    published cell: a rename puts a new file in place, which must not become theirs alone."""
    old = os.umask(0o002)
    try:
        ledger, cell = tmp_path / "bakery-ledger.json", tmp_path / "published" / "1b-std" / "c"
        fsutil.atomic_write_json(ledger, {"a": 1})
        with fsutil.staging_dir(cell) as tmp:
            (tmp / "config.json").write_text("{}")
        os.umask(0o077)
        fsutil.atomic_write_json(ledger, {"a": 2})
        with fsutil.staging_dir(cell) as tmp:
            (tmp / "config.json").write_text("{}")
        fsutil.atomic_write_json(tmp_path / "new.json", {})  # a new file: the umask alone
        os.umask(0o022)
        fsutil.atomic_write_json(ledger, {"a": 3})  # what the umask allows more is kept too
    finally:
        os.umask(old)
    assert stat.S_IMODE(ledger.stat().st_mode) == 0o664
    assert stat.S_IMODE(cell.stat().st_mode) == 0o775
    assert stat.S_IMODE((cell / "config.json").stat().st_mode) == 0o664
    assert stat.S_IMODE((tmp_path / "new.json").stat().st_mode) == 0o600


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EROFS])
def test_a_full_or_read_only_disk_names_the_output_being_written(tmp_path, monkeypatch, code):
    """A write's OSError carries no file name: a stage's error read `OSError: [Errno 28] No space
    left on device`, naming nothing. It names the output now, and nothing is left in place."""
    from bakery_slurm.pipeline import describe_error

    def full(*args):
        raise OSError(code, os.strerror(code))

    final = tmp_path / "cells" / "c" / "final"
    with pytest.raises(OSError) as staged:
        with fsutil.staging_dir(final) as tmp:
            (tmp / "model.safetensors").write_bytes(b"x")
            full()
    assert describe_error(staged.value) == f"writing {final}: OSError: [Errno {code}] {os.strerror(code)}"
    assert list(final.parent.iterdir()) == []

    monkeypatch.setattr(fsutil.os, "fsync", full)
    record = tmp_path / "verified.json"
    with pytest.raises(OSError) as written:
        fsutil.atomic_write_json(record, {"ok": True})
    assert describe_error(written.value).startswith(f"writing {record}: OSError: [Errno {code}]")
    assert list(tmp_path.glob("*.json*")) == []


def test_a_file_that_could_not_be_created_is_explained_by_its_folder(tmp_path):
    """A write into a folder this user may not write fails on a file that does not exist yet
    (mkstemp's temporary name): the explanation names the folder, its mode and owner."""
    folder = tmp_path / "teammates"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    st = folder.stat()
    assert fsutil.who_may_access(folder / ".ledger.json.x1y2.tmp").startswith(
        f"the folder {folder} is mode 755, owned by uid {st.st_uid} gid {st.st_gid}.")


def modes_below(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode)
            for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("folder_mode, umask, dirs, files", [
    (0o2770, 0o077, 0o2770, 0o660),  # a teammate's umask 077 in the group's folder
    (0o2750, 0o077, 0o2750, 0o640),  # a folder the group may read only: never more than that
    (0o2775, 0o022, 0o2775, 0o664),  # the others' bits stay the umask's
    (0o0770, 0o077, 0o0700, 0o600),  # no setgid bit: no group's folder, the umask alone
], ids=["umask 077", "group may read", "umask 022", "not setgid"])
def test_what_is_created_in_a_setgid_folder_gets_the_access_it_gives_its_group(
        tmp_path, folder_mode, umask, dirs, files):
    """As a default ACL would: a ledger, a lock, a cell's output made under umask 077 in a
    group's setgid folder were the writer's alone, and no teammate could run status on them."""
    group = tmp_path / "group"
    group.mkdir()
    os.chmod(group, folder_mode)
    old = os.umask(umask)
    try:
        fsutil.atomic_write_json(group / "project" / "bakery-ledger.json", {"a": 1})
        with fsutil.locked(group / "project" / "bakery-ledger.json.lock"):
            pass
        with fsutil.staging_dir(group / "work" / "cells" / "c" / "final") as tmp:
            (tmp / "model.safetensors").write_bytes(b"w")
            os.chmod(tmp / "model.safetensors", 0o600)  # as safetensors writes its files
        with fsutil.held_while_alive(group / "project" / "submitting"):
            held = stat.S_IMODE((group / "project" / "submitting").stat().st_mode)
    finally:
        os.umask(old)
    assert modes_below(group) == {
        "project": dirs, "project/bakery-ledger.json": files,
        "project/bakery-ledger.json.lock": files, "work": dirs, "work/cells": dirs,
        "work/cells/c": dirs, "work/cells/c/final": dirs,
        "work/cells/c/final/model.safetensors": files}
    assert held == files


def test_sharing_a_tree_gives_the_group_the_access_its_folder_gives(tmp_path):
    """What other programs write in a group's folder (huggingface_hub's 0600 tree listings and
    its files under a teammate's umask 077, submitit's array folders) is given what the folder
    gives its group, from the top down; files other users own and linked files are left as
    they are."""
    group = tmp_path / "group"
    group.mkdir()
    os.chmod(group, 0o2750)
    entry = group / "models--o--n"
    (entry / "blobs").mkdir(parents=True)
    (entry / "blobs" / "abc").write_bytes(b"w")
    (entry / "trees").mkdir()
    (entry / "trees" / "c.json").write_text("{}")
    (entry / "run.sh").write_text("#!/bin/sh\n")
    (entry / "snapshots").mkdir()
    (entry / "snapshots" / "config.json").symlink_to("../blobs/abc")
    os.link(entry / "run.sh", tmp_path / "linked.sh")
    (entry / "linked-too").write_bytes(b"x")
    os.link(entry / "linked-too", tmp_path / "other")
    # Made under umask 077 (mkdir keeps the setgid bit of the folder it is made in).
    for path, mode in [(entry, 0o2700), (entry / "blobs", 0o2700), (entry / "trees", 0o2700),
                       (entry / "snapshots", 0o2700), (entry / "blobs" / "abc", 0o600),
                       (entry / "trees" / "c.json", 0o600), (entry / "run.sh", 0o700),
                       (entry / "linked-too", 0o600)]:
        os.chmod(path, mode)
    os.unlink(tmp_path / "linked.sh")
    old = os.umask(0o077)
    try:
        fsutil.share_tree(entry)
    finally:
        os.umask(old)
    assert modes_below(group) == {
        "models--o--n": 0o2750, "models--o--n/blobs": 0o2750, "models--o--n/blobs/abc": 0o640,
        "models--o--n/linked-too": 0o600, "models--o--n/run.sh": 0o750,
        "models--o--n/snapshots": 0o2750, "models--o--n/snapshots/config.json": 0o640,
        "models--o--n/trees": 0o2750, "models--o--n/trees/c.json": 0o640}


def test_sharing_gives_the_group_what_the_umask_gives_it_in_any_folder(tmp_path, group_umask):
    """huggingface_hub writes a tree listing with mkstemp, 0600 whatever the umask: under umask
    002 the group may read it too, as it may read the rest of the cache."""
    listing = tmp_path / "c.json"
    listing.write_text("{}")
    os.chmod(listing, 0o600)
    fsutil.share(listing)
    assert stat.S_IMODE(listing.stat().st_mode) == 0o660
