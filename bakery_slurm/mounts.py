"""Which mount holds a path, and whether its locks hold across nodes.

bakery-slurm's locks are POSIX locks (`fsutil.locked`). Lustre mounted `localflock` grants them on
each client node alone, without an error: tasks on two nodes would both hold a cell's run lock or a
cache entry's. The mount options say so (`/proc/self/mountinfo`), so submit can refuse such a work
folder before any task meets it. Pure parsing here; `node_local_lock_mount` reads the file.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

MOUNTINFO = Path("/proc/self/mountinfo")
# Lustre's client option for locks granted per node (its others: `flock`, across nodes, and
# `noflock`, refused with ENOSYS, which `fsutil.locked` explains).
NODE_LOCAL_LOCKS = "localflock"


@dataclass(frozen=True)
class Mount:
    point: str
    fstype: str
    options: frozenset[str]


def parse_mountinfo(text: str) -> list[Mount]:
    """The mounts listed in `text` (proc(5)'s mountinfo: per-mount options before the optional
    fields and their ` - ` separator, then the filesystem type, source and superblock options)."""
    mounts = []
    for line in text.splitlines():
        head, sep, tail = line.partition(" - ")
        fields, rest = head.split(), tail.split()
        if not sep or len(fields) < 6 or len(rest) < 3:
            continue
        options = set(fields[5].split(",")) | set(rest[2].split(","))
        mounts.append(Mount(_unescape(fields[4]), rest[0], frozenset(options)))
    return mounts


def mount_of(path: str, mounts: list[Mount]) -> Mount | None:
    """The mount holding absolute, resolved `path`: the last mounted of the deepest points above
    it (a later mount over the same point hides the earlier one)."""
    best: Mount | None = None
    for mount in mounts:
        prefix = mount.point.rstrip("/") + "/"
        if (path == mount.point or path.startswith(prefix)) and (
                best is None or len(mount.point) >= len(best.point)):
            best = mount
    return best


def node_local_lock_mount(path: Path) -> Mount | None:
    """The mount holding `path` (or the nearest folder above it that exists) where locks hold on
    one node only, or None (also where mounts cannot be read: not Linux)."""
    try:
        text = MOUNTINFO.read_text()
    except OSError:
        return None
    existing = Path(os.path.abspath(path))
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    mount = mount_of(str(existing.resolve()), parse_mountinfo(text))
    return mount if mount and NODE_LOCAL_LOCKS in mount.options else None


def _unescape(field: str) -> str:
    """A mountinfo path, whose space, tab, newline and backslash are written as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)
