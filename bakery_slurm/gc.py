"""What `bakery-slurm gc` may remove from a work folder, and removing it.

A work folder holds the shared cache (`cache/bakes`, `cache/bases`: content-addressed, reused by
every cell) and one folder per cell (`cells/<id>/{merged,final,publish}` with their done-markers).
Once a cell is published, its outputs are on the push target and only a rerun would need them
again (a rerun redoes what is missing). The rules, most careful first:

- A cell that may still run (pending or running in the ledger) keeps everything: its outputs,
  and, since a pending cell's bake keys are not known before it runs, the whole cache and every
  leftover of the work folder.
- What a task is using now is kept, whatever the ledger says (a `run-cell` or `run-eval` started
  by hand, or from another ledger on the same work folder): every task holds its cell's gc lock
  and the work folder's shared (`in_use`); gc removes a cell's outputs holding the cell's lock
  exclusively, and the cache and leftovers holding the work folder's, and skips what is held. So
  a task never loses a file between gc's plan and its removal, and never waits for gc longer than
  a removal.
- A published cell (result record ``done``) gives up `merged`, `final`, `publish`, their markers
  and `verified.json`; its `result.json` stays (submit's skip rule and status read it).
- Bakes are removed unless a cell that is not published names them in its result record (a failed
  cell being fixed reuses its bakes); base copies only once every cell is published.
- Leftovers of killed tasks (``.*.partial``, ``.*.raw``) go when no cell may run.

The bytes reported are the bytes freed: a hard-linked file counts once, and not at all while a
link outside the removals keeps it (a `dir:` target's weights, a Hub cache blob).

`plan_gc` only reads; `sweep` deletes what it planned and what no task is using.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from . import fsutil
from .manifest import marker_path

KINDS = ("cell outputs", "bakes", "base copies", "leftovers")
CELL_OUTPUTS = ("merged", "final", "publish")
GC_LOCK = ".gc.lock"


@contextlib.contextmanager
def in_use(work: Path, cell_id: str) -> Iterator[None]:
    """Hold the work folder's gc lock and the cell's, shared, for the block: what every task
    reading or writing a cell (and the shared cache) holds, so that gc removes none of it
    meanwhile. Blocks only while gc is removing something of the cell or the cache."""
    with fsutil.locked(Path(work) / GC_LOCK, shared=True), \
            fsutil.locked(Path(work) / "cells" / cell_id / GC_LOCK, shared=True):
        yield


@dataclass(frozen=True)
class Removal:
    """One path `gc` removes: what kind of thing it is, its size in bytes, and the lock that must
    be free to remove it (its cell's gc lock, or the work folder's for the cache and leftovers)."""

    kind: str
    path: Path
    bytes: int
    guard: Path


def plan_gc(work: Path, live_cells: Iterable[str]) -> list[Removal]:
    """What may be removed from `work` while the cells in `live_cells` may still run."""
    work = Path(work)
    results = _results(work)
    live = set(live_cells)
    planned: list[tuple[str, Path, Path]] = []
    for cell, (root, result) in sorted(results.items()):
        if cell in live or result.get("status") != "done":
            continue
        paths = [p for name in CELL_OUTPUTS for p in (root / name, marker_path(root / name))]
        planned += [("cell outputs", p, root / GC_LOCK) for p in [*paths, root / "verified.json"]]
    if live:
        return _with_sizes(planned)
    guard = work / GC_LOCK
    unpublished = {cell: result for cell, (_, result) in results.items() if result.get("status") != "done"}
    wanted = {key for result in unpublished.values() for key in _bake_keys(result)}
    cache = work / "cache"
    for kind, folder in (("bakes", cache / "bakes"), ("base copies", cache / "bases")):
        if kind == "base copies" and unpublished:
            continue
        for output in _outputs(folder):
            if output.name not in wanted:
                planned += [(kind, output, guard), (kind, marker_path(output), guard)]
    leftovers = [p for folder in (cache / "bakes", cache / "bases") for p in _leftovers(folder)]
    leftovers += [p for root, _ in results.values() for p in _leftovers(root)]
    planned += [("leftovers", p, guard) for p in leftovers]
    return _with_sizes(planned)


@dataclass
class Swept:
    """What `sweep` did with each planned removal."""

    removed: list[Removal] = field(default_factory=list)
    in_use: list[Removal] = field(default_factory=list)  # kept: a task is using them now
    failed: list[tuple[Removal, OSError]] = field(default_factory=list)  # partly removed, maybe


def sweep(removals: list[Removal], dry_run: bool = False) -> Swept:
    """Delete the planned paths whose guard no task holds, holding it exclusively meanwhile (with
    dry_run, only try it, and write nothing: a guard that does not exist was never taken). A path
    already gone is fine; one that cannot be removed (a teammate's folder this user may not
    write) is reported, not counted as freed."""
    swept = Swept()
    for guard in dict.fromkeys(r.guard for r in removals):
        group = [r for r in removals if r.guard == guard]
        if dry_run and not guard.exists():
            swept.removed += group
            continue
        try:
            with fsutil.locked(guard, blocking=False):
                for removal in group:
                    try:
                        if not dry_run:
                            _delete(removal.path)
                    except OSError as e:
                        swept.failed.append((removal, e))
                    else:
                        swept.removed.append(removal)
        except fsutil.LockBusy:
            swept.in_use += group
    return swept


def _delete(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        pass  # gone already (a rerun's own cleanup, or another gc)


def bytes_per_kind(removals: Iterable[Removal]) -> dict[str, tuple[int, int]]:
    """Kind -> (number of paths, bytes), for every kind in `KINDS` order."""
    totals = {kind: [0, 0] for kind in KINDS}
    for removal in removals:
        totals[removal.kind][0] += 1
        totals[removal.kind][1] += removal.bytes
    return {kind: (n, size) for kind, (n, size) in totals.items()}


def _results(work: Path) -> dict[str, tuple[Path, dict]]:
    """Cell id -> (cell folder, result record) for every cell folder with a readable record."""
    found = {}
    for path in sorted((work / "cells").rglob("result.json")):
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(result, dict) and isinstance(result.get("cell"), str):
            found[result["cell"]] = (path.parent, result)
    return found


def _bake_keys(result: dict) -> set[str]:
    adapters = ((result.get("stages") or {}).get("bake") or {}).get("adapters") or {}
    return {record["key"] for record in adapters.values() if isinstance(record, dict) and "key" in record}


def _outputs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")) \
        if folder.is_dir() else []


def _leftovers(folder: Path) -> list[Path]:
    """Staging folders of killed writers: `.<name>.*.partial` and `.<key>.*.raw`, and the
    temporary files of killed atomic writes (`.<name>.*.tmp`: records, markers)."""
    return sorted(p for p in folder.glob(".*")
                  if (p.is_dir() and p.name.endswith((".partial", ".raw")))
                  or (p.is_file() and p.name.endswith(".tmp"))) if folder.is_dir() else []


def _with_sizes(planned: list[tuple[str, Path, Path]]) -> list[Removal]:
    """The planned (kind, path, guard) triples whose path exists, each with the bytes removing it
    frees.

    A file's bytes count once, under the first path that holds it, and only when gc removes
    every hard link to it: a checkpoint also published to a `dir:` target on the same
    filesystem, or a base linked from the Hub cache, frees nothing.
    """
    files = {path: _files(path) for _, path, _ in planned if path.exists()}
    links = Counter(inode for found in files.values() for inode, _, _ in found)
    counted: set[tuple[int, int]] = set()
    removals = []
    for kind, path, guard in planned:
        if path not in files:
            continue
        freed = [(inode, size) for inode, size, nlink in files[path]
                 if inode not in counted and links[inode] >= nlink]
        counted.update(inode for inode, _ in freed)
        removals.append(Removal(kind, path, sum(size for _, size in freed), guard))
    return removals


def _files(path: Path) -> list[tuple[tuple[int, int], int, int]]:
    """((device, inode), size, link count) of every regular file at or under `path`."""
    found = []
    for file in [path] if path.is_file() else path.rglob("*"):
        st = file.lstat()
        if file.is_file() and not file.is_symlink():
            found.append(((st.st_dev, st.st_ino), st.st_size, st.st_nlink))
    return found
