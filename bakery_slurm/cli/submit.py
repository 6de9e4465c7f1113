"""`bakery-slurm submit`: expand a matrix into job arrays and record them in the ledger."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..evaluation import (baseline_carriers, expand_eval, is_evaluated, read_eval_record,
                          verified_output)
from ..executors import backend, resolve_executor
from ..ledger import latest_attempt, load_ledger
from ..login_push import ready_to_publish
from ..matrix import select
from ..output import echo_rows, output_options
from ..pipeline import CellPaths, read_result
from ..preflight import gate
from ..resubmit_policy import is_live
from ..status_snapshot import snapshot
from ..submission import submit_cells
from .common import LEDGER_NAME, preflight_option, selected_cells
from . import cli

ARRAY_COLUMNS = ["array", "job_id", "executor", "stage", "cells", "after", "resources"]


@cli.command()
@click.argument("matrix", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--only", metavar="GLOB", help="Only cells whose id matches GLOB, e.g. '4b-*'.")
@click.option("--executor", type=click.Choice(["auto", "slurm", "local"]), default="auto",
              show_default=True, help="auto: slurm when sbatch is on PATH, else local.")
@click.option("--dry-run", is_flag=True,
              help="Print arrays, sbatch scripts, task commands and recipes; submit nothing.")
@click.option("--force", is_flag=True, help="Also submit cells already completed with this recipe "
              "(and evaluations already done with these settings).")
@click.option("--no-eval", is_flag=True, help="Submit the merges only, none of [eval].")
@click.option("--ledger", "ledger_path", type=click.Path(dir_okay=False, path_type=Path),
              envvar="BAKERY_LEDGER",
              help=f"Ledger file (env BAKERY_LEDGER; default: {LEDGER_NAME} beside MATRIX).")
@preflight_option
@output_options
def submit(matrix: Path, only: str | None, executor: str, dry_run: bool, force: bool,
           no_eval: bool, ledger_path: Path | None, no_preflight: bool, fmt: str) -> None:
    """Submit the cells of MATRIX as job arrays, one per resource group (one sbatch each).

    Cells already completed and published with the same recipe hash and push target, and cells
    with a pending or running attempt, are skipped (--force submits completed ones again).
    With [eval], each cell's evaluation is submitted as an eval array chained to its merge: an
    eval task starts only when its cell's merge task succeeded, and the scheduler cancels it
    when that fails. Baselines, and cells already merged, are evaluated at once; evaluations
    done with the same settings on the same checkpoint are skipped.
    Every rendered recipe is validated with mergekit, and the checks of `bakery-slurm check`
    run, before anything is submitted. Every Hub input is pinned to the commit its revision
    names now; the tasks read exactly that commit, and the ledger records it.

    \b
    Example:
        bakery-slurm submit matrix.toml --dry-run
        bakery-slurm submit matrix.toml --only '4b-*'
        bakery-slurm submit matrix.toml --executor local
    """
    from ..recipe import render_recipe, validate_recipe

    loaded, cells = selected_cells(matrix, only, or_baselines=not no_eval)
    ledger_path = ledger_path or loaded.root / LEDGER_NAME
    recipes = {c.id: render_recipe(c, "(base, hub layout)",
                                   {name: f"({name} baked)" for name, _ in c.adapters})
               for c in cells}
    for cell in cells:
        validate_recipe(cell.id, recipes[cell.id])
    kind = resolve_executor(executor)
    ledger, snap = ledger_and_snapshot(ledger_path, recover=not dry_run)
    targets = [] if no_eval else select(expand_eval(loaded, cells), only)
    cells, skipped, seen = skip_done_or_live(cells, ledger, snap, loaded.work_dir, force)
    evals, live, eval_skips, seen_evals = _evals_to_submit(
        targets, {c.id for c in cells}, ledger, snap, loaded.work_dir, kind, force)
    for target_id, reason in skipped + eval_skips:
        click.echo(f"skip {target_id}: {reason}", err=True)
    unchanged = still_as_judged(cells, seen, evals, seen_evals)
    checked = cells + [c for c in baseline_carriers(loaded, evals) if c not in cells]
    pins = (gate(loaded, checked, kind, run_checks=not no_preflight, evals=evals)
            if checked or evals else {})
    requests = (submit_cells(ledger_path, loaded, cells, kind, evals=evals, live=live, pins=pins,
                            dry_run=dry_run, force_evals=force, guard=unchanged)
                if cells or evals else [])
    submitted = {(r.array.stage, c) for r in requests for c in r.array.cells}
    taken = ({("merge", c.id) for c in cells} | {("eval", t.id) for t in evals}) - submitted
    for stage, target_id in sorted(taken):
        click.echo(f"skip {target_id}{' (eval)' if stage == 'eval' else ''}: submitted meanwhile "
                   "by another process", err=True)
    if dry_run:
        _print_dry_run(requests, kind, recipes)
        return
    rows = [{"array": r.array.name, "job_id": r.array.job_id, "executor": r.array.executor,
             "stage": r.array.stage, "cells": len(r.array.cells), "resources": r.array.resources,
             "after": r.after.job_id if r.after else None, "cell_ids": r.array.cells}
            for r in requests]
    echo_rows(rows, ARRAY_COLUMNS, fmt)
    if rows:
        click.echo(f"ledger: {ledger_path}", err=True)


def ledger_and_snapshot(ledger_path: Path, recover: bool = True):
    """The ledger (None where there is none yet) and the state of its cells (None without any),
    which `skip_done_or_live` judges cells on."""
    ledger = load_ledger(ledger_path) if ledger_path.exists() else None
    snap = (snapshot(ledger_path, ledger, recover=recover)
            if ledger and (ledger.cells or ledger.evals) else None)
    return ledger, snap


def skip_done_or_live(cells, ledger, snap, work: Path, force: bool):
    """Split off cells already completed with their recipe, or with a live attempt (`demo`
    skips by these rules too).

    Returns the cells to submit, (cell id, reason) for the others, and the latest attempt of
    each cell as judged here.
    """
    skipped, keep = [], []
    seen = {c.id: latest_attempt(ledger, c.id) for c in cells} if ledger else {}
    live = {s.cell: s.state for s in snap.statuses if is_live(s.state)} if snap else {}
    for cell in cells:
        result = read_result(CellPaths(work, cell.id))
        if cell.id in live:
            skipped.append((cell.id, f"an attempt is {live[cell.id]}"))
        elif (not force and result and result.get("status") == "done"
              and result.get("recipe_hash") == cell.recipe_hash
              and result.get("push") == str(cell.push)):
            skipped.append((cell.id, "already completed and published with this recipe "
                                     "(use --force)"))
        elif (not force and result and ready_to_publish(CellPaths(work, cell.id), result)
              and result.get("recipe_hash") == cell.recipe_hash):
            skipped.append((cell.id, "verified, not published: `bakery-slurm push` publishes it "
                                     "(use --force to run it again)"))
        else:
            keep.append(cell)
    return keep, skipped, seen


def still_as_judged(cells, seen, evals=(), seen_evals=None):
    """The `submit_cells` guard for cells and eval targets judged on `seen` and `seen_evals`
    (their latest attempts then): another submit may have taken some of them since, so under
    the ledger lock only those whose latest attempt is still the one judged are kept."""
    seen_evals = seen_evals or {}

    def unchanged(fresh):
        return ([c for c in cells if latest_attempt(fresh, c.id) == seen.get(c.id)],
                [t for t in evals
                 if latest_attempt(fresh, t.id, stage="eval") == seen_evals.get(t.id)])

    return unchanged


def _evals_to_submit(targets, merging: set[str], ledger, snap, work: Path, executor: str,
                     force: bool):
    """Which eval targets to submit, and what each waits for.

    A target is skipped while an eval attempt of it is live, and when it was evaluated with
    these settings on the checkpoint it would score now (unless `force`). A cell's eval waits
    for its merge submitted now (`merging`), or for its merge attempt still pending or running;
    it starts at once when the cell is verified already, and is not submitted while the cell
    has no verified output and no merge coming.

    Returns the targets to submit, {cell id: (array, index)} of the live merge tasks they wait
    for, (target id, reason) for the others, and the latest eval attempt of each as judged here.
    """
    seen = {t.id: latest_attempt(ledger, t.id, stage="eval") for t in targets} if ledger else {}
    live_evals = {s.cell: s.state for s in snap.evals if is_live(s.state)} if snap else {}
    live_merges = ({s.cell: s for s in snap.statuses if is_live(s.state)} if snap else {})
    keep, live, skipped = [], {}, []
    for target in targets:
        merge = live_merges.get(target.id)
        # A cell merged now, or by a live merge task, will have another output than today's.
        final = (None if target.id in merging or merge else verified_output(work, target.id))
        if target.id in live_evals:
            skipped.append((target.id, f"an eval attempt is {live_evals[target.id]}"))
        elif not force and is_evaluated(target, read_eval_record(work, target.id), final):
            skipped.append((target.id, "already evaluated with these settings (use --force)"))
        elif target.kind == "baseline" or target.id in merging:
            keep.append(target)
        elif merge and merge.array_job_id and snap.arrays[merge.array_name].executor == executor:
            keep.append(target)
            live[target.id] = (merge.array_name, merge.index)
        elif merge:
            skipped.append((target.id, f"its merge is {merge.state} in array {merge.array_name}, "
                                       "which this submit cannot chain to: submit again once it "
                                       "has ended"))
        elif final is not None:
            keep.append(target)
        else:
            skipped.append((target.id, "eval not submitted: the cell has no verified output (gc "
                                       "removes a published cell's) and no merge pending or "
                                       f"running; `submit --force --only {target.id}` merges it "
                                       "again and evaluates it"))
    return keep, live, skipped, seen


def _print_dry_run(requests, kind: str, recipes: dict[str, str]) -> None:
    runner = backend(kind)
    for request in requests:
        array = request.array
        waits = f", after {request.after.name}" if request.after else ""
        click.echo(f"== {array.stage} array {array.name} ({kind}, {len(array.cells)} tasks"
                   f"{waits}) resources {json.dumps(array.resources)}")
        click.echo(runner.render(request).rstrip())
        if request.launcher and kind == "slurm":
            click.echo(f"-- launcher {request.launcher_path} (the sbatch script's Python):")
            click.echo(request.launcher.rstrip())
        for index, (cell_id, argv) in enumerate(zip(array.cells, request.argvs)):
            click.echo(f"-- task {index}: {cell_id}")
            click.echo("   " + " ".join(_quote(a) for a in argv))
            if array.stage == "eval":
                continue
            click.echo("   recipe:")
            click.echo("\n".join("     " + line for line in recipes[cell_id].rstrip().splitlines()))
    click.echo(f"dry run: {len(requests)} array(s), "
               f"{sum(len(r.argvs) for r in requests)} task(s); nothing submitted or written.")


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)
