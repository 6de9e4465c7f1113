"""One cell, start to finish: bake -> merge -> strip -> verify -> push (or stop after verify).

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
import os
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from . import fsutil
from .errors import BakeryError, StageError
from .manifest import intact_marker, total_size, write_marker
from .matrix import Cell
from .rootcard import CardContext
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
    def recipe(self) -> Path:
        """The mergekit recipe with this machine's paths (the bakes), for rerunning it here."""
        return self.root / "mergekit_config.yml"

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


class _Run:
    """The state of one run: the result record, saved after every stage."""

    def __init__(self, cell: Cell, paths: CellPaths):
        self.cell, self.paths = cell, paths
        self.result: dict[str, Any] = {
            "cell": cell.id, "recipe_hash": cell.recipe_hash, "push": str(cell.push),
            "status": "running",
            "started": now(), "finished": None, "stages": {}, "versions": library_versions(),
            # Which Python and image ran the cell (apptainer sets APPTAINER_CONTAINER inside).
            "runtime": {"python": sys.executable,
                        "container": os.environ.get("APPTAINER_CONTAINER")},
            "error": None,
        }
        self.save()

    def save(self) -> None:
        fsutil.atomic_write_json(self.paths.result, self.result)

    def stage(self, name: str, body: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        log.info("%s: %s started", self.cell.id, name)
        start = time.monotonic()
        try:
            record = body()
        except Exception as e:
            seconds = round(time.monotonic() - start, 3)
            self.result["stages"][name] = {"status": "failed", "seconds": seconds, "error": str(e)}
            self.result.update(status="failed", finished=now(), error=f"{name}: {e}")
            self.save()
            log.error("%s: %s failed after %.1f s: %s", self.cell.id, name, seconds, e)
            raise StageError(self.cell.id, name, str(e)) from e
        record.setdefault("status", "done")
        record["seconds"] = round(time.monotonic() - start, 3)
        self.result["stages"][name] = record
        self.save()
        log.info("%s: %s %s in %.1f s", self.cell.id, name, record["status"], record["seconds"])
        return record


def run_cell(cell: Cell, work: Path, device: str = "auto", hub_api: Any = None,
             offline: bool = False, card: CardContext | None = None) -> dict[str, Any]:
    """Run (or resume) every stage of `cell` under `work`; return the result record.

    The result's status is "done", or "verified" when `[push] defer` left publishing to
    `bakery-slurm push`. `card` titles and orders the target's root card (from the matrix).
    With `offline`, Hub inputs are read from the Hub cache only (`[runtime] offline`).

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
            return _run(cell, paths, device, hub_api, offline, card)
    except fsutil.LockBusy:
        raise BakeryError(f"{cell.id}: another task is running this cell ({paths.lock})") from None


def _run(cell: Cell, paths: CellPaths, device: str, hub_api: Any, offline: bool,
         card: CardContext | None) -> dict[str, Any]:
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
        base = fetch(cell.base, hash_cache=hashes, offline=offline)
        adapters = {name: fetch(source, hash_cache=hashes, offline=offline)
                    for name, source in cell.adapters}
        base_dir, base_tensors, base_record = bake_stage.prepare_base(base, paths.cache)
        baked, records = {}, {}
        for name, adapter in adapters.items():
            baked[name], records[name] = bake_stage.bake(base, adapter, cell.dtype,
                                                         base_tensors, paths.cache)
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
        # The recipe as mergekit runs it here; the published one names repo ids and commits.
        fsutil.atomic_write_text(paths.recipe, recipe)
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
        record = push_stage.prepare(cell, paths.final, paths.publish, state["inputs"],
                                    state["base"].path, run.result["stages"]["merge"],
                                    run.result["versions"])
        if cell.push.defer:  # GPU nodes never wait on uploads: `bakery-slurm push` publishes
            return {"status": "deferred", "target": f"{cell.push}/{cell.id}",
                    "bytes_read": 0, "bytes_written": 0}
        return push_stage.push_cell(cell, paths.publish, record, api=hub_api, context=card)

    for name, body in zip(STAGES, (bake, merge, strip, check, push)):
        run.stage(name, body)
    deferred = run.result["stages"]["push"]["status"] == "deferred"
    run.result.update(status="verified" if deferred else "done", finished=now())
    run.save()
    return run.result


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
