"""`bakery-slurm status`: where every cell of the ledger stands. Reads only; never imports torch."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import click

from ..ledger import load_ledger
from ..output import echo_rows, output_options
from ..cell_status import UNPUBLISHED, totals
from ..resubmit_policy import TERMINAL_FAILURES, is_live
from ..status_snapshot import snapshot
from .common import ledger_option, status_columns, status_rows
from . import EXIT_FAILED, cli

MIN_WATCH_S = 30  # sacct is the controller's database: do not poll it harder than this


@cli.command()
@ledger_option
@click.option("--watch", type=float, metavar="SECONDS",
              help=f"Refresh every SECONDS (at least {MIN_WATCH_S}) until no cell is pending or "
                   "running (not with --json: --nl prints each refresh's rows as lines).")
@output_options
def status(ledger_path: Path, watch: float | None, fmt: str) -> None:
    """Show the state of every cell's latest attempt, from one batched sacct call.

    With [eval], the `eval` column is the state of the cell's latest evaluation, and each
    baseline has a row of its own (no merge state). An eval chained to a merge that failed is
    CANCELLED by the scheduler, and says so in the detail column.
    Exit status 1 when any cell's (or eval's) latest attempt failed (FAILED, TIMEOUT,
    OUT_OF_MEMORY, ...).
    UNPUBLISHED cells were verified but not published (push failed, or `[push] defer`):
    `bakery-slurm push` publishes them.
    Without SLURM accounting, states come from squeue and the cells' result records, and a
    note on stderr says so.

    \b
    Example:
        bakery-slurm status
        bakery-slurm status --json | jq '.[] | select(.state != "COMPLETED")'
        bakery-slurm status --watch 60
    """
    if watch is not None and fmt == "json":
        # Each refresh would print a JSON list of its own: no JSON reader takes several.
        raise click.UsageError("--watch prints every refresh: with --json that is several JSON "
                               "documents; use --nl (one object per line, each refresh's rows "
                               "in turn)")
    if watch is not None and not math.isfinite(watch):
        raise click.BadParameter(f"{watch} is not a number of seconds", param_hint="--watch")
    if watch is not None and watch < MIN_WATCH_S:
        click.echo(f"--watch {watch:g} is below {MIN_WATCH_S} s; refreshing every {MIN_WATCH_S} s",
                   err=True)
        watch = MIN_WATCH_S
    while True:
        ledger = load_ledger(ledger_path)
        snap = snapshot(ledger_path, ledger)
        for note in snap.notes:
            click.echo(f"note: {note}", err=True)
        rows = status_rows(ledger, snap)
        echo_rows(rows, status_columns(snap), fmt)
        if fmt == "table":
            click.echo("totals: " + ", ".join(f"{state} {n}" for state, n in
                                               totals(snap.statuses).items()))
            if snap.evals:
                click.echo("eval totals: " + ", ".join(f"{state} {n}" for state, n in
                                                        totals(snap.evals).items()))
        live = any(is_live(s.state) for s in snap.statuses + snap.evals)
        if watch is None or not live:
            break
        time.sleep(watch)
    unpublished = [s.cell for s in snap.statuses if s.state == UNPUBLISHED]
    if unpublished:
        click.echo(f"{len(unpublished)} cell(s) verified but not published: `bakery-slurm push "
                   "MATRIX` publishes them (no rerun)", err=True)
    failed = [s.cell for s in snap.statuses if s.state in TERMINAL_FAILURES]
    failed_evals = [s.cell for s in snap.evals if s.state in TERMINAL_FAILURES]
    if failed:
        click.echo(f"{len(failed)} cell(s) failed: `bakery-slurm logs {failed[0]} --stderr` shows "
                   "why; `bakery-slurm resubmit` runs them again", err=True)
    if failed_evals:
        click.echo(f"{len(failed_evals)} eval(s) failed or never ran: `bakery-slurm logs "
                   f"{failed_evals[0]} --eval --stderr` shows why; `bakery-slurm resubmit` runs "
                   "them again (a failed merge's eval with its merge)", err=True)
    if failed or failed_evals:
        sys.exit(EXIT_FAILED)
