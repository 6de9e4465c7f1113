"""`bakery-slurm resubmit`: run the cells whose latest attempt failed again, as new arrays."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..ledger import latest_attempt, load_ledger
from ..matrix import expand, load_matrix
from ..output import format_rows, output_options
from ..resubmit_policy import TERMINAL_FAILURES, choose_resubmit
from ..submission import submit_cells
from ..preflight import gate
from ..status_snapshot import snapshot
from .common import ledger_option, preflight_option
from . import EXIT_FAILED, cli

COLUMNS = ["cell", "state", "action"]


@cli.command()
@ledger_option
@click.option("--state", "states", multiple=True, type=click.Choice(sorted(TERMINAL_FAILURES)),
              help="Only cells in this state (repeatable; default: every terminal failure).")
@click.option("--only", metavar="GLOB", help="Only cells whose id matches GLOB.")
@click.option("--dry-run", is_flag=True, help="Show what would be resubmitted; submit nothing.")
@click.option("--refresh-inputs", is_flag=True,
              help="Pin Hub inputs to what their revisions name now, instead of the commits the "
                   "failed attempts read.")
@preflight_option
@output_options
def resubmit(ledger_path: Path, states: tuple[str, ...], only: str | None, dry_run: bool,
             refresh_inputs: bool, no_preflight: bool, fmt: str) -> None:
    """Resubmit exactly the cells whose latest attempt ended in a terminal failure.

    States are refreshed first. Pending, running and completed cells are refused, and so are
    cells that used up the matrix's max_attempts. The new arrays go to the executor that ran the
    failed attempt, grouped by resources; the ledger records the new attempts. Each cell reads
    its Hub inputs at the commits its failed attempt was pinned to (--refresh-inputs resolves
    them again), and the checks of `bakery-slurm check` run first.

    \b
    Example:
        bakery-slurm resubmit --dry-run
        bakery-slurm resubmit --state TIMEOUT --only '12b-*'
    """
    ledger = load_ledger(ledger_path)
    snap = snapshot(ledger_path, ledger)
    for note in snap.notes:
        click.echo(f"note: {note}", err=True)
    matrix_of = {a.name: s.matrix_path for s in ledger.submissions for a in s.arrays}
    rows, submitted, refused_all = [], 0, []
    # Cells are resubmitted per (matrix, executor, pins) of their latest attempt: cells pinned at
    # different times may read one source at different commits.
    groups: dict[tuple[str, str, tuple], list] = {}
    for status in snap.statuses:
        pins = {} if refresh_inputs else ledger.cells[status.cell][-1].pins
        key = (matrix_of[status.array_name], snap.arrays[status.array_name].executor,
               tuple(sorted(pins.items())))
        groups.setdefault(key, []).append(status)
    for (matrix_path, executor, known_pins), statuses in groups.items():
        matrix = load_matrix(matrix_path)
        to_run, refused = choose_resubmit(statuses, max_attempts=matrix.spec.max_attempts,
                                          states=states or TERMINAL_FAILURES, only=only)
        # Completed cells are refused too; listing each would bury the failures.
        rows += [{"cell": r.cell, "state": r.state, "action": f"refused: {r.reason}"}
                 for r in refused if r.state != "COMPLETED"]
        refused_all += refused
        cells = {c.id: c for c in expand(matrix)}
        missing = [s for s in to_run if s.cell not in cells]
        rows += [{"cell": s.cell, "state": s.state,
                  "action": f"refused: no longer a cell of {matrix.path}"} for s in missing]
        evaluated = {s.cell: (s.array_name, s.index) for s in to_run if s.cell in cells}

        def still_failed(fresh, evaluated=evaluated, cells=cells):
            # Another resubmit may have run since we looked: only cells whose latest attempt is
            # still the one we judged are submitted, so each failed cell is submitted once.
            return [cells[c] for c, (array, index) in evaluated.items()
                    if (a := latest_attempt(fresh, c)) and (a.array, a.index) == (array, index)]

        # Nothing failed in this group (e.g. every cell COMPLETED or UNPUBLISHED): no array.
        chosen = [cells[c] for c in evaluated]
        pins = gate(matrix, chosen, executor, run_checks=not no_preflight,
                    known_pins=dict(known_pins)) if chosen else {}
        requests = submit_cells(ledger_path, matrix, chosen, executor, pins=pins,
                                dry_run=dry_run, guard=None if dry_run else still_failed
                                ) if chosen else []
        resubmitted = {c: r.array for r in requests for c in r.array.cells}
        for cell, (array, index) in evaluated.items():
            state = next(s.state for s in to_run if s.cell == cell)
            if cell in resubmitted:
                submitted += 1
                job = resubmitted[cell].job_id or "(dry run)"
                rows.append({"cell": cell, "state": state,
                             "action": f"resubmitted in {resubmitted[cell].name} job {job}"})
            else:
                rows.append({"cell": cell, "state": state,
                             "action": "skipped: resubmitted meanwhile by another process"})
    click.echo(format_rows(rows, COLUMNS, fmt))
    click.echo(f"{'would resubmit' if dry_run else 'resubmitted'} {submitted} cell(s)", err=True)
    if any(r.state in TERMINAL_FAILURES for r in refused_all):
        # A failed cell that cannot run again (attempt cap) is still a failed cell.
        sys.exit(EXIT_FAILED)
