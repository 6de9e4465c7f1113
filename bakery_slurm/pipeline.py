"""One cell, start to finish: bake -> merge -> strip -> verify -> push.

Every stage writes its output atomically and records what it produced; a rerun reuses an output
whose marker is intact and whose recorded inputs are the current ones, so a task killed at any
point resumes where it stopped and a changed input redoes exactly what depends on it. The cell's
result record (`result.json`, beside its outputs) gets each stage's wall time, bytes read and
written, device, and input/output hashes as soon as the stage ends; `status` and the benchmarks
read it.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from . import fsutil
from .errors import BakeryError, StageError
from .manifest import intact_marker, total_size, write_marker
from .matrix import Cell
from .versions import library_versions

log = logging.getLogger(__name__)

STAGES = ("bake", "merge", "strip", "verify", "push")


@dataclass(frozen=True)
class CellPaths:
    """Every file and folder of one cell, in one place (like submitit's JobPaths)."""

    work: Path
    cell_id: str

    @property
    def root(self) -> Path:
        return self.work / "cells" / self.cell_id

    @property
    def merged(self) -> Path:
        return self.root / "merged"

    @property
    def final(self) -> Path:
        return self.root / "final"

    @property
    def publish(self) -> Path:
        return self.root / "publish"

    @property
    def verified(self) -> Path:
        return self.root / "verified.json"

    @property
    def result(self) -> Path:
        return self.root / "result.json"

    @property
    def lock(self) -> Path:
        return self.root / ".run.lock"

    @property
    def cache(self) -> Path:
        """Shared by every cell: bakes/ and bases/ are content-addressed; hashes/ keeps the file
        hashes of local sources (`sources.fetch`)."""
        return self.work / "cache"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_result(paths: CellPaths) -> dict[str, Any] | None:
    """The cell's result record, or None when it has not run (a corrupt one reads as None too)."""
    try:
        return json.loads(paths.result.read_text())
    except (OSError, ValueError):
        return None


def describe_error(error: BaseException) -> str:
    """One line for a stage's error: the inputs named in its notes, then the error itself (with
    its type where it is not one of ours: a bare KeyError reads ``'device'``)."""
    text = str(error) if isinstance(error, BakeryError) else f"{type(error).__name__}: {error}"
    notes = getattr(error, "__notes__", [])
    return ": ".join([*notes, " ".join(text.split())])


class _Run:
    """The state of one run: the result record, saved after every stage."""

    def __init__(self, cell: Cell, paths: CellPaths):
        self.cell, self.paths = cell, paths
        self.result: dict[str, Any] = {
            "cell": cell.id, "recipe_hash": cell.recipe_hash, "push": str(cell.push),
            "status": "running",
            "started": now(), "finished": None, "stages": {}, "versions": library_versions(),
            "error": None,
        }
        self.save()

    def save(self) -> None:
        fsutil.atomic_write_json(self.paths.result, self.result)

    def stage(self, name: str, body: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        log.info("%s: %s started", self.cell.id, name)
        start, started = time.monotonic(), now()
        # Saved before the stage runs, so that `status` can say which stage a cell is in, and since when.
        self.result["stages"][name] = {"status": "running", "started": started}
        self.save()
        try:
            record = body()
        except Exception as e:
            seconds = round(time.monotonic() - start, 3)
            message = describe_error(e)
            self.result["stages"][name] = {"status": "failed", "started": started,
                                           "seconds": seconds, "error": message}
            self.result.update(status="failed", finished=now(), error=f"{name}: {message}")
            self.save()
            # An error we did not raise on purpose keeps its traceback (in the task's stderr).
            log.error("%s: %s failed after %.1f s: %s", self.cell.id, name, seconds, message,
                      exc_info=None if isinstance(e, BakeryError) else e)
            raise StageError(self.cell.id, name, message) from e
        record.setdefault("status", "done")
        record["started"] = started
        record["seconds"] = round(time.monotonic() - start, 3)
        self.result["stages"][name] = record
        self.save()
        log.info("%s: %s %s in %.1f s", self.cell.id, name, record["status"], record["seconds"])
        return record


def run_cell(cell: Cell, work: Path, device: str = "auto", hub_api: Any = None) -> dict[str, Any]:
    """Run (or resume) every stage of `cell` under `work`; return the result record.

    Raises
    ------
    StageError
        A stage failed; the result record names it and the error.
    BakeryError
        Another process is running this cell right now.
    """
    paths = CellPaths(Path(work), cell.id)
    try:
        with fsutil.locked(paths.lock, blocking=False):
            return _run(cell, paths, device, hub_api)
    except fsutil.LockBusy:
        raise BakeryError(f"{cell.id}: another task is running this cell ({paths.lock})") from None


def _run(cell: Cell, paths: CellPaths, device: str, hub_api: Any) -> dict[str, Any]:
    from .recipe import render_recipe, validate_recipe
    from .repair import repair_checkpoint
    from .sources import fetch
    from .stages import bake as bake_stage
    from .stages import merge as merge_stage
    from .stages import push as push_stage
    from .stages.verify import verify

    run = _Run(cell, paths)
    state: dict[str, Any] = {}
    # A task killed mid-stage leaves its staging folder (`.<output>.*.partial`, as big as a
    # checkpoint) behind. We hold the cell's lock, so any such folder here is dead.
    for stale in paths.root.glob(".*.partial"):
        shutil.rmtree(stale, ignore_errors=True)

    def bake() -> dict[str, Any]:
        hashes = paths.cache / "hashes"
        base = fetch(cell.base, hash_cache=hashes)
        adapters = {name: fetch(source, hash_cache=hashes) for name, source in cell.adapters}
        base_dir, base_tensors, base_record = bake_stage.prepare_base(base, paths.cache)
        baked, records = {}, {}
        for name, adapter in adapters.items():
            baked[name], records[name] = bake_stage.bake(base, adapter, cell.dtype,
                                                         base_tensors, paths.cache, name=name)
        state.update(base=base, base_dir=base_dir, base_tensors=base_tensors, baked=baked,
                     inputs={"base": base.identity,
                             "adapters": {n: a.identity for n, a in adapters.items()}})
        return {"base": base_record, "adapters": records,
                "cached": all(r["cached"] for r in records.values()),
                "bytes_read": sum(r["bytes_read"] for r in records.values()) + base_record["bytes_read"],
                "bytes_written": sum(r["bytes_written"] for r in records.values())
                + base_record["bytes_written"],
                "inputs": state["inputs"],
                "outputs": {n: r["content_sha256"] for n, r in records.items()}}

    def merge() -> dict[str, Any]:
        recipe = render_recipe(cell, str(state["base_dir"]),
                               {n: str(p) for n, p in state["baked"].items()})
        state["recipe"] = recipe
        inputs = {"recipe_hash": cell.recipe_hash,
                  "baked": run.result["stages"]["bake"]["outputs"]}
        marker = intact_marker(paths.merged)
        if marker is not None and marker.get("inputs") == inputs:
            return {"status": "skipped", "device": marker["device"],
                    "fallback_reason": marker["fallback_reason"], "bytes_read": 0,
                    "bytes_written": 0, "outputs": marker["content_sha256"]}
        config = validate_recipe(cell.id, recipe)
        chosen, reason = merge_stage.choose_device(device)
        with fsutil.staging_dir(paths.merged) as tmp:
            device_record = merge_stage.run_mergekit(config, tmp, chosen, reason)
            tokenizer = merge_stage.copy_tokenizer(state["base_dir"], tmp)
        marker = write_marker(paths.merged, {"inputs": inputs, **device_record})
        return {**device_record, "tokenizer_sha256": tokenizer,
                "bytes_read": sum(_size(p) for p in state["baked"].values()),
                "bytes_written": total_size(marker["files"]),
                "inputs": inputs, "outputs": marker["content_sha256"]}

    def strip() -> dict[str, Any]:
        inputs = {"merged": run.result["stages"]["merge"]["outputs"]}
        marker = intact_marker(paths.final)
        if marker is not None and marker.get("inputs") == inputs:
            return {"status": "skipped", "bytes_read": 0, "bytes_written": 0,
                    "outputs": marker["content_sha256"], "inputs": inputs}
        report = repair_checkpoint(paths.merged, paths.final, state["base_tensors"])
        marker = write_marker(paths.final, {"inputs": inputs})
        return {"renamed": report.renamed, "identity": report.identity,
                "bytes_read": report.bytes_read, "bytes_written": report.bytes_written,
                "inputs": inputs, "outputs": marker["content_sha256"]}

    def check() -> dict[str, Any]:
        final_sha = run.result["stages"]["strip"]["outputs"]
        try:
            previous = json.loads(paths.verified.read_text())
        except (OSError, ValueError):
            previous = {}
        if previous.get("final_sha256") == final_sha and intact_marker(paths.final):
            return {"status": "skipped", "bytes_read": 0, "bytes_written": 0, **previous}
        record = verify(paths.final, state["base_dir"], state["base_tensors"], cell.dtype)
        record.update(final_sha256=final_sha)
        fsutil.atomic_write_json(paths.verified, record)
        return {**record, "bytes_read": _size(paths.final), "bytes_written": 0}

    def push() -> dict[str, Any]:
        target = push_stage.make_target(cell.push, api=hub_api)
        # The recipe hash names sources, not their content: a retrained adapter at the same path
        # (or a new commit of an unpinned repo) keeps it. Skip only if the resolved inputs match too.
        published = target.published_record(cell.id) or {}
        if (published.get("recipe_hash") == cell.recipe_hash
                and published.get("inputs") == state["inputs"]):
            return {"status": "skipped",
                    "reason": "the target holds this recipe hash and these inputs already",
                    "target": f"{cell.push}/{cell.id}", "bytes_read": 0, "bytes_written": 0}
        final_marker = intact_marker(paths.final)
        record = {"cell": cell.id, "recipe_hash": cell.recipe_hash, "inputs": state["inputs"],
                  "parameters": cell.parameters, "method": cell.method, "dtype": cell.dtype,
                  "output": {"content_sha256": final_marker["content_sha256"],
                             "files": final_marker["files"]},
                  "device": run.result["stages"]["merge"]["device"],
                  "fallback_reason": run.result["stages"]["merge"]["fallback_reason"],
                  "versions": run.result["versions"]}
        card = push_stage.render_card(cell, state["recipe"], record)
        push_stage.build_publish_folder(paths.final, paths.publish, card, state["recipe"], record)
        where = target.publish(paths.publish, cell.id,
                               f"bakery-slurm: {cell.id} (recipe {cell.recipe_hash[:12]})")
        return {"target": where, "bytes_read": _size(paths.publish),
                "bytes_written": _size(paths.publish)}

    for name, body in zip(STAGES, (bake, merge, strip, check, push)):
        run.stage(name, body)
    run.result.update(status="done", finished=now())
    run.save()
    return run.result


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
