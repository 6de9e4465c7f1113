"""`bakery-slurm cancel`: cancel the pending and running tasks of some cells."""

from __future__ import annotations

import fnmatch
from pathlib import Path

import click

from ..errors import CancelRefused, SchedulerError
from ..executors import backend
from ..ledger import load_ledger, record_cancel, update_ledger
from ..resubmit_policy import is_live
from ..status_snapshot import snapshot
from .common import ledger_option
from . import cli


@cli.command()
@ledger_option
@click.option("--only", metavar="GLOB", help="Only cells whose id matches GLOB (default: all).")
def cancel(ledger_path: Path, only: str | None) -> None:
    """Cancel the live (pending, running, held or suspended) tasks of the ledger's cells, their
    evals and the baselines' evals.

    \b
    Example:
        bakery-slurm cancel --only '12b-*'
    """
    ledger = load_ledger(ledger_path)
    snap = snapshot(ledger_path, ledger)
    live = [s for s in snap.statuses + snap.evals if is_live(s.state) and s.array_job_id
            and (only is None or fnmatch.fnmatchcase(s.cell, only))]
    by_executor: dict[str, list] = {}
    for s in live:
        array = snap.arrays[s.array_name]
        by_executor.setdefault(array.executor, []).append((array, s.index))
    failed: SchedulerError | None = None
    for executor, tasks in by_executor.items():
        try:
            backend(executor).cancel(tasks)
        except SchedulerError as e:
            # Refused by id (a teammate's task): the others were cancelled, and are noted below.
            # Any other failure: none of this executor's tasks is known to be cancelled.
            failed = e
            not_cancelled = (e.refused if isinstance(e, CancelRefused)
                             else {(a.name, i) for a, i in tasks})
            live = [s for s in live if (s.array_name, s.index) not in not_cancelled]
    if live:
        # SLURM forgets a task cancelled before it started: the ledger remembers, so that status
        # shows it CANCELLED and resubmit takes it.
        with update_ledger(ledger_path) as fresh:
            for s in live:
                record_cancel(fresh, s.cell, s.array_name, s.index, stage=s.stage)
    for s in live:
        what = f"{s.cell} (eval)" if s.stage == "eval" else s.cell
        click.echo(f"cancelled {what} ({s.task_id}, was {s.state})")
    if failed is not None:
        raise failed
    if not live:
        click.echo("nothing to cancel", err=True)
