"""One cell, start to finish: bake -> merge -> strip -> verify -> push (or stop after verify).

The stages are the `Step`s of STEPS, in order; each declares the fields of `Flow` it needs and
gives, the inputs its output depends on, and how it finds what it recorded last time, so one rule
decides every skip, push's excepted: push asks the target whether it holds the cell already only
after preparing the cell's publish folder, so that a failed read leaves the cell publishable.
With the bakery engine (the default) "bake" only fetches and plans, "merge" writes the final
checkpoint in one pass from the base and the LoRA factors, and "strip" has nothing to do; with
`[merge] engine = "mergekit"` (or an adapter the engine cannot compute exactly) PEFT bakes each
adapter, mergekit merges the bakes and strip repairs the names.

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
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from . import fsutil
from .errors import BakeryError, StageError
from .gc import in_use
from .manifest import intact_marker, marker_path, total_size, write_marker
from .matrix import Cell
from .rootcard import CardContext
from .versions import library_versions

log = logging.getLogger(__name__)

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
    def push_lock(self) -> Path:
        """Held by a login node's push of the cell (`login_push`), which holds `lock` shared."""
        return self.root / ".push.lock"

    @property
    def cache(self) -> Path:
        """Shared by every cell: bakes/ and bases/ are content-addressed; hashes/ keeps the file
        hashes of local sources (`sources.fetch`)."""
        return self.work / "cache"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def slurm_task() -> str | None:
    """The SLURM task this process runs in, as the ledger knows it: `<array job id>_<index>`, or
    the job id of a plain job (submitit submits a one-task array so); None outside SLURM."""
    env = os.environ
    if "SLURM_ARRAY_JOB_ID" in env and "SLURM_ARRAY_TASK_ID" in env:
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID")


def read_result(paths: CellPaths) -> dict[str, Any] | None:
    """The cell's result record, or None when it has not run (a corrupt one reads as None too)."""
    try:
        result = json.loads(paths.result.read_text())
    except (OSError, ValueError):
        return None
    return result if isinstance(result, dict) else None


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
            # Which Python and image ran the cell (apptainer sets APPTAINER_CONTAINER inside).
            "runtime": {"python": sys.executable,
                        "container": os.environ.get("APPTAINER_CONTAINER")},
            "error": None,
            # Which task wrote the record: `status` tells this attempt's record from an earlier
            # one by it, not by comparing this node's clock with the login node's. (A requeued
            # task runs again under the same id: still the same attempt.)
            "task": slurm_task(),
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
            try:
                self.save()
            except OSError as unsaved:  # the disk the stage filled: its error is the one to report
                log.error("%s: could not record the failure in %s: %s", self.cell.id,
                          self.paths.result, unsaved)
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
        Another process is running this cell, or evaluating its output, right now.
    """
    paths = CellPaths(Path(work), cell.id)
    try:
        with fsutil.locked(paths.lock, blocking=False), in_use(paths.work, cell.id):
            return _run(cell, paths, device, hub_api, offline, card)
    except fsutil.LockBusy:
        raise BakeryError(f"{cell.id}: another task is running this cell or evaluating its "
                          f"output ({paths.lock})") from None


@dataclass
class Flow:
    """What the steps of one cell hand each other. Each field is set by the one step that `gives`
    it and read only by steps that declare it in `needs` (see STEPS)."""

    cell: Cell
    paths: CellPaths
    device: str
    hub_api: Any
    offline: bool                    # read Hub inputs from the Hub cache only
    card: CardContext | None         # titles and orders the target's root card
    result: dict[str, Any]           # the run's result record (push cites the merge's device)
    report_progress: Callable[[dict[str, Any]], None]
    loader: Any                      # stages.verify.ModelLoader, started with the run
    # time.monotonic() when the run began: the push gives up before the task's time limit
    started: float = field(default_factory=time.monotonic)
    # bake
    base: Any = None                 # sources.LocalModel
    base_dir: Path | None = None     # the base's folder as the merge reads it (hub layout for mergekit)
    base_tensors: dict[str, Any] = field(default_factory=dict)   # hub-layout {name: (dtype, shape)}
    sources: dict[str, Any] = field(default_factory=dict)        # identities of base and adapters
    adapters: dict[str, Path] = field(default_factory=dict)      # adapter -> its fetched folder
    plan: Any = None                 # engine.CellPlan, or None on the mergekit path
    engine_fallback: str | None = None
    baked: dict[str, Path] = field(default_factory=dict)         # adapter -> baked checkpoint
    baked_sha: dict[str, str] = field(default_factory=dict)
    # merge
    recipe: str = ""
    merged: Path | None = None
    merged_sha: str = ""
    # strip
    final_sha: str = ""


@dataclass(frozen=True)
class Step:
    """One stage of a cell, read top to bottom in STEPS.

    `inputs(flow)` is everything the step's output depends on; `previous(flow)` is what the step
    recorded when it last made that output (None when the output is missing or not intact). The
    one skip rule: a step whose previous record holds the same inputs is not run again;
    `resume` then gives its fields from that record, as `run` would have.
    """

    name: str
    needs: tuple[str, ...]
    gives: tuple[str, ...]
    run: Callable[[Flow, dict[str, Any]], dict[str, Any]]
    inputs: Callable[[Flow], dict[str, Any]] = lambda flow: {}
    previous: Callable[[Flow], dict[str, Any] | None] = lambda flow: None
    resume: Callable[[Flow, dict[str, Any]], dict[str, Any]] = lambda flow, record: {}

    def __call__(self, flow: Flow) -> dict[str, Any]:
        inputs = self.inputs(flow)
        previous = self.previous(flow)
        if previous is not None and previous.get("inputs") == inputs:
            return {"status": "skipped", "bytes_read": 0, "bytes_written": 0, "inputs": inputs,
                    **self.resume(flow, previous)}
        return {"inputs": inputs, **self.run(flow, inputs)}


# ------------------------------------------------------------------------------------------------
# bake: fetch the sources; plan the engine's merge, or bake each adapter into a checkpoint


def _bake(flow: Flow, inputs: dict[str, Any]) -> dict[str, Any]:
    from .engine import Unsupported, plan_cell
    from .methods import get as method
    from .sources import fetch
    from .stages import bake as bake_stage

    cell, cache = flow.cell, flow.paths.cache
    flow.base = fetch(cell.base, hash_cache=cache / "hashes", offline=flow.offline)
    adapters = {name: fetch(source, hash_cache=cache / "hashes", offline=flow.offline)
                for name, source in cell.adapters}
    for name, adapter in adapters.items():  # so that a corrupt one is named, whichever engine
        with bake_stage.naming_input(f"adapter {name} ({adapter.path})"):
            bake_stage.check_adapter(adapter.path)
    flow.adapters = {name: adapter.path for name, adapter in adapters.items()}
    flow.sources = {"base": flow.base.identity,
                    "adapters": {n: a.identity for n, a in adapters.items()}}
    engine = cell.merge.engine
    if engine == "bakery":
        try:
            flow.plan = plan_cell(flow.base.path, [(n, a.path) for n, a in adapters.items()],
                                  cell.method, method(cell.method).needs_base, cell.parameters,
                                  cell.dtype)
        except Unsupported as e:
            flow.engine_fallback, engine = str(e), "mergekit"
            log.warning("%s: the bakery engine cannot merge this cell exactly (%s); "
                        "baking with PEFT and merging with mergekit instead", cell.id, e)
    # The bake's inputs are what the sources resolved to (known only once they are fetched).
    record = {"engine": engine, "engine_fallback_reason": flow.engine_fallback,
              "inputs": flow.sources, "outputs": {}}
    if flow.plan is not None:
        flow.base_tensors = dict(flow.plan.specs)
        flow.base_dir = flow.base.path
        if not cell.merge.keep_bakes:
            return {**record, "status": "skipped", "cached": True, "adapters": {},
                    "reason": "the bakery engine bakes each tensor in memory during the merge",
                    "bytes_read": 0, "bytes_written": 0}
    base_dir, base_tensors, base_record = bake_stage.prepare_base(flow.base, cache)
    # The bakes and mergekit's output are in the cell's dtype, which need not be the base's.
    from .stages.verify import SAFETENSORS_DTYPE
    base_tensors = {name: (SAFETENSORS_DTYPE[cell.dtype], tuple(shape))
                    for name, (_, shape) in base_tensors.items()}
    if flow.plan is None:
        flow.base_dir, flow.base_tensors = base_dir, base_tensors
    records = {}
    for name, adapter in adapters.items():
        flow.baked[name], records[name] = bake_stage.bake(flow.base, adapter, cell.dtype,
                                                          base_tensors, cache, name=name)
    flow.baked_sha = {n: r["content_sha256"] for n, r in records.items()}
    return {**record, "base": base_record, "adapters": records,
            "cached": all(r["cached"] for r in records.values()),
            "bytes_read": sum(r["bytes_read"] for r in records.values()) + base_record["bytes_read"],
            "bytes_written": sum(r["bytes_written"] for r in records.values())
            + base_record["bytes_written"],
            "outputs": flow.baked_sha}


# ------------------------------------------------------------------------------------------------
# merge: the bakery engine into final/ (hub-layout names), or mergekit into merged/


def _merge_inputs(flow: Flow) -> dict[str, Any]:
    if flow.plan is not None:
        return {"engine": "bakery", "recipe_hash": flow.cell.recipe_hash, "sources": flow.sources,
                "versions": library_versions()}
    # The merge also copies the base's tokenizer files: a base revision changing only those
    # leaves every bake's content (and so `baked`) as it was. So does another mergekit.
    return {"recipe_hash": flow.cell.recipe_hash, "baked": flow.baked_sha,
            "base": flow.sources["base"], "versions": library_versions()}


def _merge_output(flow: Flow) -> Path:
    return flow.paths.final if flow.plan is not None else flow.paths.merged


def _merge(flow: Flow, inputs: dict[str, Any]) -> dict[str, Any]:
    from .recipe import validate_recipe
    from .stages import merge as merge_stage

    _set_recipe(flow)
    chosen, reason = merge_stage.choose_device(flow.device)
    out = _merge_output(flow)
    # The old marker must not outlive the output it describes: a task that dies between the
    # rename below and write_marker would otherwise leave new content under old inputs.
    marker_path(out).unlink(missing_ok=True)
    with fsutil.staging_dir(out) as tmp:
        if flow.plan is not None:
            device_record, hashed = merge_stage.run_engine(flow.plan, tmp, chosen, reason,
                                                           report=flow.report_progress)
            read = sum(p.stat().st_size for p in {f for f, _ in flow.plan.sources.values()})
        else:
            config = validate_recipe(flow.cell.id, flow.recipe)
            device_record, hashed = merge_stage.run_mergekit(config, tmp, chosen, reason), None
            read = sum(_size(p) for p in flow.baked.values())
        tokenizer = merge_stage.copy_tokenizer(flow.base_dir, tmp)
    marker = write_marker(out, {"inputs": inputs, **device_record}, known=hashed)
    flow.merged, flow.merged_sha = out, marker["content_sha256"]
    return {**device_record, "tokenizer_sha256": tokenizer, "bytes_read": read,
            "bytes_written": total_size(marker["files"]), "outputs": marker["content_sha256"]}


def _merge_resume(flow: Flow, marker: dict[str, Any]) -> dict[str, Any]:
    _set_recipe(flow)
    flow.merged, flow.merged_sha = _merge_output(flow), marker["content_sha256"]
    return {"device": marker["device"], "fallback_reason": marker["fallback_reason"],
            "outputs": marker["content_sha256"]}


def _set_recipe(flow: Flow) -> None:
    """The mergekit recipe this cell's merge is, with this machine's paths: on the baked
    checkpoints when there are some, else on mergekit's `base+adapter` references (what the
    bakery engine computes). Kept in the cell's folder for rerunning it here; the published one
    names repo ids and commits (`push.public_recipe`)."""
    from .recipe import render_recipe

    if flow.baked:
        flow.recipe = render_recipe(flow.cell, str(flow.base_dir),
                                    {n: str(p) for n, p in flow.baked.items()})
    else:
        flow.recipe = render_recipe(flow.cell, str(flow.base.path),
                                    {name: f"{flow.base.path}+{path}"
                                     for name, path in flow.adapters.items()})
    fsutil.atomic_write_text(flow.paths.recipe, flow.recipe)


# ------------------------------------------------------------------------------------------------
# strip: bring mergekit's output to the hub layout (the engine wrote those names already)


def _strip(flow: Flow, inputs: dict[str, Any]) -> dict[str, Any]:
    from .repair import repair_checkpoint

    if flow.merged == flow.paths.final:
        flow.final_sha = flow.merged_sha
        return {"status": "skipped", "reason": "the bakery engine wrote hub-layout names",
                "bytes_read": 0, "bytes_written": 0, "outputs": flow.final_sha}
    marker_path(flow.paths.final).unlink(missing_ok=True)  # see _merge
    report = repair_checkpoint(flow.merged, flow.paths.final, flow.base_tensors)
    marker = write_marker(flow.paths.final, {"inputs": inputs})
    flow.final_sha = marker["content_sha256"]
    return {"renamed": report.renamed, "identity": report.identity,
            "bytes_read": report.bytes_read, "bytes_written": report.bytes_written,
            "outputs": marker["content_sha256"]}


def _strip_resume(flow: Flow, marker: dict[str, Any]) -> dict[str, Any]:
    flow.final_sha = marker["content_sha256"]
    return {"outputs": marker["content_sha256"]}


# ------------------------------------------------------------------------------------------------
# verify and push


def _verify(flow: Flow, inputs: dict[str, Any]) -> dict[str, Any]:
    from .stages.verify import verify

    record = verify(flow.paths.final, flow.base_dir, flow.base_tensors, flow.cell.dtype,
                    flow.loader)
    fsutil.atomic_write_json(flow.paths.verified, {"inputs": inputs, **record})
    return {**record, "bytes_read": _size(flow.paths.final), "bytes_written": 0}


def _verify_previous(flow: Flow) -> dict[str, Any] | None:
    if intact_marker(flow.paths.final) is None:
        return None
    try:
        return json.loads(flow.paths.verified.read_text())
    except (OSError, ValueError):
        return None


def _push_inputs(flow: Flow) -> dict[str, Any]:
    """What the cell is published as, recorded with the stage: its recipe hash, which names
    sources, and the inputs they resolved to, as published (repo ids and commits, content hashes).
    The same pair in the target's record skips the push (`push.is_published`)."""
    from .stages import push as push_stage

    return {"recipe_hash": flow.cell.recipe_hash, "sources": push_stage.public_inputs(flow.sources)}


def _push(flow: Flow, inputs: dict[str, Any]) -> dict[str, Any]:
    from .stages import push as push_stage

    cell, paths = flow.cell, flow.paths
    # A Hub base's card is its repo's root README.md, above the subfolder the base is read from.
    card_dir = flow.base.path
    if cell.base.repo is not None and cell.base.subfolder:
        card_dir = card_dir.parents[len(Path(cell.base.subfolder).parts) - 1]
    # The publish folder first, before the target is asked anything: whatever fails from here on
    # (the Hub unreachable, a rate limit past the task's time limit) leaves a cell that
    # `bakery-slurm push` publishes, as the PushError says; it publishes prepared folders only.
    record = push_stage.prepare(cell, paths.final, paths.publish, flow.sources, card_dir,
                                flow.result["stages"]["merge"], flow.result["versions"],
                                flow.card.evals if flow.card else None)
    if cell.push.defer:  # GPU nodes never wait on uploads: `bakery-slurm push` publishes
        return {"status": "deferred", "target": f"{cell.push}/{cell.id}",
                "bytes_read": 0, "bytes_written": 0}
    # One target for both: the publish's first read finds the record read here already.
    target = push_stage.make_target(cell.push, api=flow.hub_api, deadline=_push_deadline(flow))
    if push_stage.is_published(record, target.published_record(cell.id)):
        return {"status": "skipped", "reason": push_stage.ALREADY_PUBLISHED,
                "target": f"{cell.push}/{cell.id}", "bytes_read": 0, "bytes_written": 0}
    item = push_stage.Publication(cell.id, paths.publish, record)
    where = push_stage.publish_cells(target, cell.push, [item], flow.card)[cell.id]
    return {"target": where, "bytes_read": _size(paths.publish),
            "bytes_written": _size(paths.publish)}


def _push_deadline(flow: Flow) -> float:
    """When the push must have given up waiting on the Hub: before the task's time limit."""
    from .stages import push as push_stage

    return (flow.started + flow.cell.resources.time_min * 60
            - push_stage.TIME_LIMIT_RESERVE_S)


STEPS = (
    Step("bake", needs=("cell",), run=_bake,
         gives=("base", "base_dir", "base_tensors", "sources", "adapters", "plan",
                "engine_fallback", "baked", "baked_sha")),
    Step("merge", needs=("plan", "baked_sha", "baked", "base_dir", "sources", "adapters"),
         gives=("recipe", "merged", "merged_sha"), run=_merge,
         inputs=_merge_inputs, previous=lambda flow: intact_marker(_merge_output(flow)),
         resume=_merge_resume),
    Step("strip", needs=("merged", "merged_sha", "base_tensors"), gives=("final_sha",),
         run=_strip, inputs=lambda flow: {"merged": flow.merged_sha},
         previous=lambda flow: intact_marker(flow.paths.final), resume=_strip_resume),
    Step("verify", needs=("final_sha", "base_dir", "base_tensors", "loader"), gives=(),
         run=_verify, inputs=lambda flow: {"final": flow.final_sha}, previous=_verify_previous,
         resume=lambda flow, record: {k: v for k, v in record.items() if k != "inputs"}),
    # No `previous`: whether the target holds the cell already is asked inside `_push`, after
    # the publish folder is prepared (see there).
    Step("push", needs=("base", "sources"), gives=(), run=_push, inputs=_push_inputs),
)
STAGES = tuple(step.name for step in STEPS)


def _run(cell: Cell, paths: CellPaths, device: str, hub_api: Any, offline: bool,
         card: CardContext | None) -> dict[str, Any]:
    from .stages.verify import ModelLoader

    run = _Run(cell, paths)
    # A task killed mid-stage leaves its staging folder (`.<output>.*.partial`, as big as a
    # checkpoint) behind. We hold the cell's lock, so any such folder here is dead.
    for stale in paths.root.glob(".*.partial"):
        shutil.rmtree(stale, ignore_errors=True)

    def report_progress(progress: dict[str, Any]) -> None:
        run.result["progress"] = {"stage": "merge", **progress, "updated": now()}
        run.save()

    # verify's transformers load, in a process that imports transformers' model code while this
    # one fetches, plans and merges
    loader = ModelLoader()
    flow = Flow(cell, paths, device, hub_api, offline, card, run.result, report_progress, loader)
    try:
        for step in STEPS:
            run.stage(step.name, lambda: step(flow))
    finally:
        loader.close()
    deferred = run.result["stages"]["push"]["status"] == "deferred"
    run.result.update(status="verified" if deferred else "done", finished=now())
    run.save()
    return run.result


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
