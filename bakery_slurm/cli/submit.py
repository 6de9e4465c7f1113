"""`bakery-slurm submit`: expand a matrix into job arrays and record them in the ledger."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..executors import backend, resolve_executor
from ..ledger import latest_attempt, load_ledger
from ..login_push import ready_to_publish
from ..output import format_rows, output_options
from ..pipeline import CellPaths, read_result
from ..preflight import gate
from ..resubmit_policy import is_live
from ..status_snapshot import snapshot
from ..submission import submit_cells
from .common import LEDGER_NAME, preflight_option, selected_cells
from . import cli

ARRAY_COLUMNS = ["array", "job_id", "executor", "cells", "resources"]


@cli.command()
@click.argument("matrix", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--only", metavar="GLOB", help="Only cells whose id matches GLOB, e.g. '4b-*'.")
@click.option("--executor", type=click.Choice(["auto", "slurm", "local"]), default="auto",
              show_default=True, help="auto: slurm when sbatch is on PATH, else local.")
@click.option("--dry-run", is_flag=True,
              help="Print arrays, sbatch scripts, task commands and recipes; submit nothing.")
@click.option("--force", is_flag=True, help="Also submit cells already completed with this recipe.")
@click.option("--ledger", "ledger_path", type=click.Path(dir_okay=False, path_type=Path),
              envvar="BAKERY_LEDGER",
              help=f"Ledger file (env BAKERY_LEDGER; default: {LEDGER_NAME} beside MATRIX).")
@preflight_option
@output_options
def submit(matrix: Path, only: str | None, executor: str, dry_run: bool, force: bool,
           ledger_path: Path | None, no_preflight: bool, fmt: str) -> None:
    """Submit the cells of MATRIX as job arrays, one per resource group (one sbatch each).

    Cells already completed and published with the same recipe hash and push target, and cells
    with a pending or running attempt, are skipped (--force submits completed ones again).
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

    loaded, cells = selected_cells(matrix, only)
    ledger_path = ledger_path or loaded.root / LEDGER_NAME
    recipes = {c.id: render_recipe(c, "(base, hub layout)",
                                   {name: f"({name} baked)" for name, _ in c.adapters})
               for c in cells}
    for cell in cells:
        validate_recipe(cell.id, recipes[cell.id])
    cells, skipped, seen = _skip_done_or_live(cells, ledger_path, loaded.work_dir, force, dry_run)
    for cell_id, reason in skipped:
        click.echo(f"skip {cell_id}: {reason}", err=True)

    def unchanged(fresh):
        # Another submit may have taken some of these cells since we looked: under the ledger
        # lock, keep only cells whose latest attempt is still the one we judged.
        return [c for c in cells if latest_attempt(fresh, c.id) == seen.get(c.id)]

    kind = resolve_executor(executor)
    pins = gate(loaded, cells, kind, run_checks=not no_preflight) if cells else {}
    requests = submit_cells(ledger_path, loaded, cells, kind, pins=pins, dry_run=dry_run,
                            guard=unchanged) if cells else []
    taken = {c.id for c in cells} - {cell for r in requests for cell in r.array.cells}
    for cell_id in sorted(taken):
        click.echo(f"skip {cell_id}: submitted meanwhile by another process", err=True)
    if dry_run:
        _print_dry_run(requests, kind, recipes)
        return
    rows = [{"array": r.array.name, "job_id": r.array.job_id, "executor": r.array.executor,
             "cells": len(r.array.cells), "resources": r.array.resources,
             "cell_ids": r.array.cells} for r in requests]
    click.echo(format_rows(rows, ARRAY_COLUMNS, fmt))
    if rows:
        click.echo(f"ledger: {ledger_path}", err=True)


def _skip_done_or_live(cells, ledger_path: Path, work: Path, force: bool, dry_run: bool):
    """Split off cells already completed with their recipe, or with a live attempt.

    Returns the cells to submit, (cell id, reason) for the others, and the latest attempt of
    each cell as judged here.
    """
    skipped, keep = [], []
    live, seen = {}, {}
    if ledger_path.exists():
        ledger = load_ledger(ledger_path)
        seen = {c.id: latest_attempt(ledger, c.id) for c in cells}
        if any(c.id in ledger.cells for c in cells):
            live = {s.cell: s.state for s in snapshot(ledger_path, ledger, recover=not dry_run).statuses
                    if is_live(s.state)}
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


def _print_dry_run(requests, kind: str, recipes: dict[str, str]) -> None:
    runner = backend(kind)
    for request in requests:
        array = request.array
        click.echo(f"== array {array.name} ({kind}, {len(array.cells)} tasks) "
                   f"resources {json.dumps(array.resources)}")
        click.echo(runner.render(request).rstrip())
        if request.launcher and kind == "slurm":
            click.echo(f"-- launcher {request.launcher_path} (the sbatch script's Python):")
            click.echo(request.launcher.rstrip())
        for index, (cell_id, argv) in enumerate(zip(array.cells, request.argvs)):
            click.echo(f"-- task {index}: {cell_id}")
            click.echo("   " + " ".join(_quote(a) for a in argv))
            click.echo("   recipe:")
            click.echo("\n".join("     " + line for line in recipes[cell_id].rstrip().splitlines()))
    click.echo(f"dry run: {len(requests)} array(s), "
               f"{sum(len(r.argvs) for r in requests)} task(s); nothing submitted or written.")


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)
