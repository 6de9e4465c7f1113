"""What a stage produced: a manifest of files (size and sha256) and the done-marker beside the output.

A stage writes its output folder atomically, then `write_marker`; a rerun trusts the output only when
`intact_marker` finds the marker and every listed file at its recorded size. The marker lives beside
the folder (`<folder>.done.json`), not inside it, so the folder's content is exactly what was produced.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Mapping

from . import fsutil


# Files are hashed in chunks this large, read into one buffer that is reused: a fresh buffer per
# chunk page-faults in every time (2x slower), and each chunk hands the GIL over twice (the read
# and the hash release it), so with small chunks (hashlib.file_digest's 256 KiB) a thread running
# Python beside the hash, such as an import, slowed hashing 2 GB from 1.3 s to 70 s here.
HASH_CHUNK = 64 << 20


def sha256_file(path: Path) -> str:
    """The file's sha256 (1.3 s for 2 GB here)."""
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        # No larger than the file (plus one byte, to see its end in one read): a tokenizer file
        # is not worth zero-filling 64 MiB for.
        buffer = bytearray(min(HASH_CHUNK, os.fstat(f.fileno()).st_size + 1))
        view = memoryview(buffer)
        while size := f.readinto(buffer):
            digest.update(view[:size])
    return digest.hexdigest()


def manifest(folder: Path) -> dict[str, dict[str, Any]]:
    """{relative path: {"size", "sha256"}} for every regular file under `folder`."""
    return without_signatures(scan(folder))


def without_signatures(files: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """A `scan` as a `manifest`: the stat signatures describe this machine, not the content."""
    return {name: {"size": info["size"], "sha256": info["sha256"]} for name, info in files.items()}


def stat_signature(st: os.stat_result) -> list[int]:
    """What changes whenever a file's bytes may have: size, mtime, ctime (which no one can set
    back) and inode. Not the device number: the nodes of a network filesystem (NFS, Lustre) each
    number its mount differently, and a 24 GB base would be hashed again on every node."""
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def scan(folder: Path, known: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """{relative path: {"size", "sha256", "signature"}} for every regular file under `folder`.

    A file whose `stat_signature` equals its entry in `known` (an earlier scan) keeps that sha256
    without being read. One that changed while it was read gets signature None: never trusted.
    """
    folder = Path(folder)
    known = known or {}

    def entry(path: Path) -> dict[str, Any]:
        before = stat_signature(path.stat())
        earlier = known.get(str(path.relative_to(folder))) or {}
        if earlier.get("signature") == before and earlier.get("sha256"):
            return {"size": before[0], "sha256": earlier["sha256"], "signature": before}
        sha256 = sha256_file(path)
        after = stat_signature(path.stat())
        return {"size": after[0], "sha256": sha256, "signature": after if after == before else None}

    files = [path for path in sorted(folder.rglob("*")) if path.is_file()]
    # The shards of a checkpoint are hashed side by side (hashlib and reads release the GIL): a
    # 12b base or output (24 GB in 5 shards) takes the time of one shard where the cores allow.
    with ThreadPoolExecutor(max_workers=max(1, min(len(files), len(os.sched_getaffinity(0))))) as pool:
        return {str(path.relative_to(folder)): info
                for path, info in zip(files, pool.map(entry, files))}


def content_hash(files: dict[str, dict[str, Any]]) -> str:
    """One hash for a whole manifest: names and contents."""
    blob = json.dumps({name: info["sha256"] for name, info in files.items()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def total_size(files: dict[str, dict[str, Any]]) -> int:
    return sum(info["size"] for info in files.values())


def marker_path(output: Path) -> Path:
    return Path(output).with_name(Path(output).name + ".done.json")


def write_marker(output: Path, info: dict[str, Any]) -> dict[str, Any]:
    """Record `output`'s manifest plus `info`; returns the marker's content."""
    files = manifest(output)
    marker = {**info, "files": files, "content_sha256": content_hash(files)}
    fsutil.atomic_write_json(marker_path(output), marker)
    return marker


def intact_marker(output: Path) -> dict[str, Any] | None:
    """The marker of `output` if it and every file it lists (at its recorded size) exist."""
    output = Path(output)
    try:
        marker = json.loads(marker_path(output).read_text())
        files = marker["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    present = {str(p.relative_to(output)): p.stat().st_size
               for p in output.rglob("*") if p.is_file()} if output.is_dir() else {}
    if present != {name: info["size"] for name, info in files.items()}:
        return None
    return marker
