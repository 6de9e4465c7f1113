"""Publish verified cells from the login node (`bakery-slurm push`).

A cell is ready to publish when its latest run verified it and prepared its publish folder
(`cells/<id>/publish`, with `bakery.json`) for the cell's current recipe, but did not publish it:
its push failed (the Hub refused or could not be reached, a rate limit outlasted the retries or
would have outlasted the task's time limit), or `[push] defer = true`
made the task stop after verify so that GPU nodes never wait on uploads. Publishing here commits
many cells at once (the Hub allows a repo about 128 commits an hour), never reruns a stage, and
records the push in each cell's result record, so `status` reads COMPLETED afterwards.

The cards are rendered again when published from here, with the eval results in the work folder
that scored the checkpoint (`model-index`; the root card's evaluation section): an eval that ran
after the task prepared the folder is in them. A cell published before its eval ran gets its
card refreshed by `refresh_cards` (`bakery-slurm push --cards`): only README.md files are
committed (the cells' cards and the root card), from the records published at the target, so it
works after `gc` removed the publish folders too.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

from . import fsutil
from .gc import in_use
from .manifest import intact_marker
from .matrix import Cell, PushTarget
from .pipeline import CellPaths, read_result
from .rootcard import CardContext
from .stages import push as push_stage

VERIFIED = "verified"  # the result status of a cell whose task stopped after verify (defer)
PUSHED_BY = "bakery-slurm push"  # marks a push stage done from the login node (`status` reads it)


@dataclass(frozen=True)
class Verdict:
    """Whether a cell can be published from here, and why (not)."""

    cell: str
    ready: bool
    reason: str


def unpublished(result: Mapping[str, Any] | None) -> bool:
    """The run this record describes verified the cell but did not publish it: deferred, or the
    push itself failed. (Pure: `status` uses it too.)"""
    if not result:
        return False
    stages = result.get("stages", {})
    verified = stages.get("verify", {}).get("status") in ("done", "skipped")
    push = stages.get("push", {}).get("status")
    return verified and (result.get("status") == VERIFIED
                         or (result.get("status") == "failed" and push == "failed"))


def ready_to_publish(paths: CellPaths, result: Mapping[str, Any] | None) -> bool:
    """`unpublished(result)`, with a publish folder prepared for that run's recipe."""
    prepared = push_stage.prepared(paths.publish) if unpublished(result) else None
    return bool(prepared) and prepared.get("recipe_hash") == result.get("recipe_hash")


def judge(cell: Cell, result: Mapping[str, Any] | None, prepared: Mapping[str, Any] | None,
          final_sha: str | None) -> Verdict:
    """Can `cell` be published from its work folder? (Pure.)"""
    if not result or result.get("recipe_hash") != cell.recipe_hash:
        return Verdict(cell.id, False, "not run with this recipe: submit it")
    if result.get("status") == "done":
        return Verdict(cell.id, False, "already published")
    if not unpublished(result):
        return Verdict(cell.id, False, f"not verified (its run is {result.get('status')}): "
                                       "resubmit it")
    if (not prepared or prepared.get("recipe_hash") != cell.recipe_hash
            or prepared.get("output", {}).get("content_sha256") != final_sha):
        return Verdict(cell.id, False, "its publish folder is missing or stale: resubmit it")
    return Verdict(cell.id, True, "verified, not published")


def push_verified(cells: list[Cell], work: Path, push: PushTarget, context: CardContext,
                  api: Any = None, dry_run: bool = False) -> list[dict[str, Any]]:
    """Publish every ready cell of `cells` to `push`; one row per cell (cell, action).

    Each cell's locks (`_hold`) are held from the check until its result record says published,
    so a task running the cell, or another push, is never raced (the cell is reported as busy).
    Raises PushError when the target refuses (the cells stay ready for the next try).
    """
    rows, items = [], []
    with contextlib.ExitStack() as held:
        for cell in cells:
            paths = CellPaths(work, cell.id)
            busy = None if dry_run else _hold(held, paths)
            if busy:
                rows.append({"cell": cell.id, "action": f"skipped: {busy}"})
                continue
            final = intact_marker(paths.final) if paths.final.is_dir() else None
            verdict = judge(cell, read_result(paths), push_stage.prepared(paths.publish),
                            final and final["content_sha256"])
            if not verdict.ready:
                rows.append({"cell": cell.id, "action": f"skipped: {verdict.reason}"})
                continue
            record = push_stage.prepared(paths.publish)
            if context.evals and not dry_run:
                results = context.evals.cell_results(cell.id, record["output"]["content_sha256"])
                fsutil.atomic_write_text(paths.publish / push_stage.ROOT_CARD,
                                         push_stage.cell_card(cell, record, results))
            items.append(push_stage.Publication(cell.id, paths.publish, record))
        if dry_run:
            return rows + [{"cell": i.cell_id, "action": "would publish"} for i in items]
        if not items:
            return rows
        target = push_stage.make_target(push, api=api)
        published = target.published_records()
        there = [i for i in items if push_stage.is_published(i.record, published.get(i.cell_id))]
        todo = [i for i in items if i not in there]
        start = time.monotonic()
        wheres = push_stage.publish_cells(target, push, todo, context) if todo else {}
        seconds = round(time.monotonic() - start, 3)
        for item in there:
            _mark_published(CellPaths(work, item.cell_id), {
                "status": "skipped", "target": f"{push}/{item.cell_id}", "seconds": 0,
                "reason": push_stage.ALREADY_PUBLISHED,
                "pushed_by": PUSHED_BY})
            rows.append({"cell": item.cell_id, "action": "already at the target"})
        for item in todo:
            where = wheres[item.cell_id]
            _mark_published(CellPaths(work, item.cell_id), {
                "status": "done", "target": where, "seconds": seconds,
                "pushed_by": PUSHED_BY})
            rows.append({"cell": item.cell_id, "action": f"published: {where}"})
    return rows


def refresh_cards(cells: list[Cell], work: Path, push: PushTarget, context: CardContext,
                  api: Any = None, dry_run: bool = False) -> list[dict[str, Any]]:
    """Publish the cards of the published `cells` again, each with the eval results in `work`
    that scored the checkpoint published, and the root card; one row per cell (cell, action).

    Only README.md files are committed; a cell published with another recipe than the matrix's
    now, or not published, is skipped, and so is a cell a task is running (it may publish a new
    checkpoint, whose card this one would replace). Raises PushError when the target refuses.
    """
    target = push_stage.make_target(push, api=api)
    published = target.published_records()
    rows, items, cards = [], [], {}
    with contextlib.ExitStack() as held:
        tmp = Path(held.enter_context(tempfile.TemporaryDirectory(prefix="bakery-cards-")))
        for cell in cells:
            record = published.get(cell.id)
            if record is None or record.get("recipe_hash") != cell.recipe_hash:
                why = "not published" if record is None else "published with another recipe"
                rows.append({"cell": cell.id, "action": f"skipped: {why}"})
                continue
            busy = None if dry_run else _hold(held, CellPaths(work, cell.id))
            if busy:
                rows.append({"cell": cell.id, "action": f"skipped: {busy}"})
                continue
            results = (context.evals.cell_results(cell.id, record["output"]["content_sha256"])
                       if context.evals else None)
            cards[cell.id] = "card with its eval results" if results else "card, no eval results"
            folder = tmp / cell.id
            folder.mkdir(parents=True)
            (folder / push_stage.ROOT_CARD).write_text(push_stage.cell_card(cell, record, results))
            items.append(push_stage.Publication(cell.id, folder, record, replace=False))
        if items and not dry_run:
            push_stage.publish_cells(target, push, items, context)
    done = "would publish" if dry_run else "published"
    return rows + [{"cell": cell, "action": f"{done}: {what}"} for cell, what in cards.items()]


def _hold(held: contextlib.ExitStack, paths: CellPaths) -> str | None:
    """Take the cell's locks for the rest of `held` (a cell never run here has none to take), or
    say why not. The run lock is taken shared: a task running the cell holds it exclusively, and
    an eval of the cell holds it shared, as it only reads `final`, as a push does, so a push goes
    on beside an eval. Two pushes of a cell are kept apart by its push lock."""
    if not paths.root.is_dir():
        return None
    with contextlib.ExitStack() as taking:
        try:
            taking.enter_context(fsutil.locked(paths.lock, blocking=False, shared=True))
        except fsutil.LockBusy:
            return "a task is running it"
        try:
            taking.enter_context(fsutil.locked(paths.push_lock, blocking=False))
        except fsutil.LockBusy:
            return "another push is publishing it"
        taking.enter_context(in_use(paths.work, paths.cell_id))
        held.enter_context(taking.pop_all())
    return None


def _mark_published(paths: CellPaths, stage: dict[str, Any]) -> None:
    """Record the push in the cell's result record: the cell is done."""
    result = json.loads(paths.result.read_text())
    size = sum(p.stat().st_size for p in paths.publish.rglob("*") if p.is_file())
    result["stages"]["push"] = {**stage, "bytes_read": size,
                                "bytes_written": size if stage["status"] == "done" else 0}
    result.update(status="done", error=None,
                  finished=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    fsutil.atomic_write_json(paths.result, result)
