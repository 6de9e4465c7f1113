"""The output checkpoint laid out before any tensor is computed, then filled in any order.

Every output tensor's name, dtype and shape is known up front (the base's, in the hub layout, in
the cell's dtype), so `plan_shards` (pure) decides the files, each file's header and every tensor's
byte offset. `ShardWriter` creates the files at their final size and writes each tensor (or a
row range of one) at its offset with `os.pwrite` as soon as it is computed, from any thread: no
tensor waits for another to be written, and no finished tensor stays in memory. Each file is
hashed while it is written (`manifest.PrefixHasher`): the tensors are laid out in the order the
engine merges them, so a file's written prefix grows as the merge goes and its hash and its
writeback to disk follow behind, instead of reading the whole output again at the end.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..manifest import PrefixHasher
from ..repair import INDEX_FILE, SINGLE_FILE, encode_header

# safetensors dtype name -> bytes per element, for the dtypes a cell can have.
ELEMENT_BYTES = {"BF16": 2, "F16": 2, "F32": 4}


@dataclass(frozen=True)
class Placement:
    """Where one tensor's bytes go: the file and the absolute offset of its first byte."""

    file: str
    offset: int
    nbytes: int


@dataclass(frozen=True)
class ShardPlan:
    """Files (name -> header bytes and total size) and the placement of every tensor."""

    headers: dict[str, bytes]
    sizes: dict[str, int]
    placements: dict[str, Placement]

    @property
    def index(self) -> dict[str, Any] | None:
        """model.safetensors.index.json's content, or None for a single file."""
        if len(self.headers) == 1:
            return None
        total = sum(p.nbytes for p in self.placements.values())
        return {"metadata": {"total_size": total},
                "weight_map": {name: p.file for name, p in sorted(self.placements.items())}}


def shard_name(index: int, count: int) -> str:
    """transformers' and mergekit's shard file names: model-00001-of-00003.safetensors."""
    return SINGLE_FILE if count == 1 else f"model-{index:05d}-of-{count:05d}.safetensors"


def plan_shards(tensors: Mapping[str, tuple[str, tuple[int, ...]]], max_shard_bytes: int,
                metadata: Mapping[str, str] | None = None) -> ShardPlan:
    """Lay out `tensors` ({name: (safetensors dtype, shape)}, in write order) in shards.

    A shard is closed when the next tensor would take it past `max_shard_bytes` (a tensor larger
    than that gets a shard of its own), as transformers' `save_pretrained` does.
    """
    groups: list[list[str]] = [[]]
    filled = 0
    for name, (dtype, shape) in tensors.items():
        nbytes = ELEMENT_BYTES[dtype] * math.prod(shape)
        if groups[-1] and filled + nbytes > max_shard_bytes:
            groups.append([])
            filled = 0
        groups[-1].append(name)
        filled += nbytes
    headers, sizes, placements = {}, {}, {}
    for i, names in enumerate(groups, start=1):
        file = shard_name(i, len(groups))
        header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
        cursor = 0
        for name in names:
            dtype, shape = tensors[name]
            nbytes = ELEMENT_BYTES[dtype] * math.prod(shape)
            header[name] = {"dtype": dtype, "shape": list(shape),
                            "data_offsets": [cursor, cursor + nbytes]}
            cursor += nbytes
        raw = encode_header(header)
        headers[file], sizes[file] = raw, len(raw) + cursor
        for name in names:
            begin = header[name]["data_offsets"][0]
            placements[name] = Placement(file, len(raw) + begin,
                                         header[name]["data_offsets"][1] - begin)
    return ShardPlan(headers, sizes, placements)


class ShardWriter:
    """Open files of a `ShardPlan` in `folder`; `write` may be called from several threads."""

    def __init__(self, plan: ShardPlan, folder: Path):
        self.plan, self.folder = plan, Path(folder)
        self.fds: dict[str, int] = {}
        self.hashers: dict[str, PrefixHasher] = {}
        try:
            for file, raw in plan.headers.items():
                # 0o666 under the umask: the mode the staging folder gives its files anyway, so
                # no chmod changes the files' ctime (and so their signatures) once hashed.
                fd = os.open(self.folder / file, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
                self.fds[file] = fd
                self.hashers[file] = PrefixHasher(self.folder / file, fd, plan.sizes[file])
                os.ftruncate(fd, plan.sizes[file])
                self._pwrite(file, memoryview(raw), 0)
        except BaseException:
            self.abort()
            raise
        if plan.index is not None:
            (self.folder / INDEX_FILE).write_text(json.dumps(plan.index, indent=2) + "\n")

    def write(self, name: str, data: memoryview, byte_offset: int = 0) -> None:
        """Write `data` (part of tensor `name`, starting `byte_offset` bytes into it)."""
        where = self.plan.placements[name]
        if byte_offset + len(data) > where.nbytes:
            raise ValueError(f"{name}: {byte_offset + len(data)} bytes do not fit its {where.nbytes}")
        self._pwrite(where.file, data, where.offset + byte_offset)

    def _pwrite(self, file: str, data: memoryview, position: int) -> None:
        start, fd = position, self.fds[file]
        while data:
            written = os.pwrite(fd, data, position)
            data, position = data[written:], position + written
        self.hashers[file].written(start, position)

    def close(self) -> dict[str, dict[str, Any]]:
        """Wait for every file's hash, fsync and close the files; return {file: `scan` entry}."""
        try:
            files = {file: hasher.result() for file, hasher in self.hashers.items()}
            for fd in self.fds.values():
                os.fsync(fd)
            return files
        finally:
            self.abort()

    def abort(self) -> None:
        """Stop hashing and close the files (after a failure: they are left incomplete)."""
        for hasher in self.hashers.values():
            hasher.abort()
        for fd in self.fds.values():
            os.close(fd)
        self.fds, self.hashers = {}, {}
