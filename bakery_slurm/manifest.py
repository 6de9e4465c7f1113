"""What a stage produced: a manifest of files (size and sha256) and the done-marker beside the output.

A stage writes its output folder atomically, then `write_marker`; a rerun trusts the output only when
`intact_marker` finds the marker and every listed file at its recorded size. The marker lives beside
the folder (`<folder>.done.json`), not inside it, so the folder's content is exactly what was produced.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
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


class PrefixHasher:
    """The sha256 of a file being written in any order, computed while it is written.

    `written(start, stop)` says a byte range is in the file; a thread reads and hashes each byte
    as soon as every byte before it has been written (from the page cache, in HASH_CHUNK reads),
    then asks the kernel to start writing that range to disk, so the final fsync has little left
    to wait for. The ranges written must tile the file exactly once, which a planned layout
    (`engine.shards`) guarantees. `result()` waits for the last byte and gives the entry `scan`
    would make, so `write_marker` does not read the file again.
    """

    def __init__(self, path: Path, fd: int, size: int):
        self.path, self.fd, self.size = Path(path), fd, size
        self.done_to = 0                 # every byte before this one is written
        self.pending: dict[int, int] = {}  # written ranges beyond it: start -> stop
        self.hashed = 0
        self.digest = hashlib.sha256()
        self.error: BaseException | None = None
        self.aborted = False
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._run, daemon=True,
                                       name=f"bakery-hash-{self.path.name}")
        self.thread.start()

    def written(self, start: int, stop: int) -> None:
        with self.cond:
            if stop > start:
                self.pending[start] = stop
            while self.done_to in self.pending:
                self.done_to = self.pending.pop(self.done_to)
            self.cond.notify()

    def abort(self) -> None:
        with self.cond:
            self.aborted = True
            self.cond.notify()
        self.thread.join()

    def result(self) -> dict[str, Any]:
        """{"size", "sha256", "signature"} once the whole file is hashed; call it when every
        byte has been written (a file with a gap left is an error, not a wait)."""
        with self.cond:
            gap = self.done_to < self.size
        if gap:
            self.abort()
        self.thread.join()
        if self.error is not None:
            raise self.error
        if self.aborted or self.hashed != self.size:
            raise RuntimeError(f"{self.path}: hashed {self.hashed} of {self.size} bytes")
        return {"size": self.size, "sha256": self.digest.hexdigest(),
                "signature": stat_signature(os.fstat(self.fd))}

    def _run(self) -> None:
        try:
            buffer = bytearray(max(1, min(HASH_CHUNK, self.size)))
            view = memoryview(buffer)
            while self.hashed < self.size:
                with self.cond:
                    self.cond.wait_for(lambda: self.aborted or self.done_to > self.hashed)
                    if self.aborted:
                        return
                    stop = self.done_to
                start = self.hashed
                while self.hashed < stop:
                    got = os.preadv(self.fd, [view[:min(len(buffer), stop - self.hashed)]],
                                    self.hashed)
                    if got == 0:
                        raise OSError(f"{self.path}: ends at {self.hashed} of {self.size} bytes")
                    self.digest.update(view[:got])
                    self.hashed += got
                self._start_writeback(start, stop)
        except BaseException as e:  # noqa: BLE001 - handed to whoever asks for the result
            self.error = e

    def _start_writeback(self, start: int, stop: int) -> None:
        """A hint, on Linux: the final fsync is what makes the file durable, on any system."""
        try:
            os.sync_file_range(self.fd, start, stop - start, os.SYNC_FILE_RANGE_WRITE)
        except (AttributeError, OSError):  # not Linux, or a filesystem that refuses the hint
            pass


def manifest(folder: Path, known: Mapping[str, Mapping[str, Any]] | None = None
             ) -> dict[str, dict[str, Any]]:
    """{relative path: {"size", "sha256"}} for every regular file under `folder` (see `scan`),
    without `scan`'s stat signatures, which describe this machine, not the content."""
    return {name: {"size": info["size"], "sha256": info["sha256"]}
            for name, info in scan(folder, known).items()}


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


def write_marker(output: Path, info: dict[str, Any],
                 known: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Record `output`'s manifest plus `info`; returns the marker's content. `known`: files
    hashed already, as `scan` takes them (a file changed since is read again)."""
    files = manifest(output, known)
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
