"""`bakery-slurm gc`: free the disk that published cells no longer need."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..gc import bytes_per_kind, plan_gc, sweep
from ..ledger import all_arrays, load_ledger
from ..output import echo_rows, output_options
from ..resubmit_policy import is_live
from ..status_snapshot import snapshot
from .common import ledger_option
from . import EXIT_FAILED, cli

COLUMNS = ["work", "kind", "paths", "bytes", "size"]


@cli.command()
@ledger_option
@click.option("--dry-run", is_flag=True, help="Show what would be removed; remove nothing.")
@output_options
def gc(ledger_path: Path, dry_run: bool, fmt: str) -> None:
    """Remove what published cells no longer need from the ledger's work folders.

    Removes the merged, final and publish folders of published cells, bakes no unpublished cell
    names, base copies once every cell is published, and what killed tasks left behind. While a
    cell of that work folder is pending or running (or its eval), only the outputs of published
    cells go: no bakes, base copies or leftovers (states are refreshed first; the scheduler must
    answer). What a task is using now (run-cell, run-eval or push, also one started by hand or
    from another ledger) is kept. Prints the bytes freed per kind; a path it could not remove (a
    teammate's folder this user may not write) is named and not counted, and gc exits 1.

    \b
    Example:
        bakery-slurm gc --dry-run
        bakery-slurm gc
    """
    ledger = load_ledger(ledger_path)
    snap = snapshot(ledger_path, ledger)
    for note in snap.notes:
        click.echo(f"note: {note}", err=True)
    # Array folders live at <work>/arrays/<name> (submission.py).
    works: dict[Path, set[str]] = {}
    for array in all_arrays(ledger):
        works.setdefault(array.work, set())
    # A cell whose eval may still run keeps its outputs too: the eval reads its verified output.
    # (a cell's eval, also one whose cell was merged outside this ledger; not a baseline's)
    merges = {s.cell for s in snap.statuses}
    cell_evals = [e for e in snap.evals if e.cell in merges or
                  (snap.arrays[e.array_name].work / "cells" / e.cell / "result.json").exists()]
    for status in snap.statuses + cell_evals:
        if is_live(status.state):
            works[snap.arrays[status.array_name].work].add(status.cell)
    rows, freed, failed = [], 0, 0
    for work, live in sorted(works.items()):
        if live:
            click.echo(f"{work}: {len(live)} cell(s) pending or running: only outputs of "
                       "published cells are removed", err=True)
        swept = sweep(plan_gc(work, live), dry_run)
        if swept.in_use:
            click.echo(f"{work}: {len(swept.in_use)} path(s) kept: a task is using them now",
                       err=True)
        for removal, error in swept.failed:
            click.echo(f"Error: could not remove {removal.path}: {error}", err=True)
        failed += len(swept.failed)
        for kind, (n, size) in bytes_per_kind(swept.removed).items():
            rows.append({"work": str(work), "kind": kind, "paths": n, "bytes": size,
                         "size": _human(size)})
            freed += size
    echo_rows(rows, COLUMNS, fmt)
    click.echo(f"{'would free' if dry_run else 'freed'} {_human(freed)}", err=True)
    if failed:
        sys.exit(EXIT_FAILED)


def _human(size: int) -> str:
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    value, unit = float(size), 0
    while value >= 1024 and unit < len(units) - 1:
        value, unit = value / 1024, unit + 1
    return f"{size} B" if unit == 0 else f"{value:.1f} {units[unit]}"
