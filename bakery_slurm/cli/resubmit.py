"""`bakery-slurm resubmit`: run the cells whose latest attempt failed again, as new arrays."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..cell_status import CellStatus
from ..evaluation import baseline_carriers, expand_eval
from ..ledger import latest_attempt, load_ledger
from ..matrix import expand, load_matrix
from ..output import echo_rows, output_options
from ..resubmit_policy import (TERMINAL_FAILURES, Refusal, choose_eval_resubmit, choose_resubmit,
                               is_live)
from ..submission import submit_cells
from ..preflight import gate
from ..status_snapshot import snapshot
from .common import ledger_option, preflight_option
from . import EXIT_FAILED, cli

COLUMNS = ["cell", "stage", "state", "action"]


@cli.command()
@ledger_option
@click.option("--state", "states", multiple=True, type=click.Choice(sorted(TERMINAL_FAILURES)),
              help="Only cells in this state (repeatable; default: every terminal failure).")
@click.option("--only", metavar="GLOB", help="Only cells (and baselines) whose id matches GLOB.")
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

    Evaluations ([eval]) are resubmitted the same way: a failed eval whose cell's merge succeeded
    (and a failed baseline) runs again alone, and a resubmitted merge gets its eval chained to
    it again. --state and --only select evals as they select cells.

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
    # different times may read one source at different commits. Evals go with them, so that a
    # resubmitted merge's eval is chained to it in the same submission.
    groups: dict[tuple[str, str, tuple], dict[str, list[CellStatus]]] = {}
    merges = {s.cell: s for s in snap.statuses}
    for stage, statuses in (("merge", snap.statuses), ("eval", snap.evals)):
        for status in statuses:
            # A cell's eval goes with its merge's group; a baseline's with its own attempt's.
            owner = merges.get(status.cell, status)
            pins = {} if refresh_inputs else latest_attempt(ledger, owner.cell, owner.stage).pins
            key = (matrix_of[owner.array_name], snap.arrays[owner.array_name].executor,
                   tuple(sorted(pins.items())))
            groups.setdefault(key, {"merge": [], "eval": []})[stage].append(status)
    live_evals = {s.cell for s in snap.evals if is_live(s.state)}
    wanted = states or TERMINAL_FAILURES
    for (matrix_path, executor, known_pins), group in groups.items():
        if not any(s.state in wanted for s in group["merge"] + group["eval"]):
            # Nothing here to resubmit, so its matrix (moved since, or a teammate's this user may
            # not read) is not read; the attempt cap applies to states in `wanted` only.
            refused = choose_resubmit(group["merge"], max_attempts=1, states=wanted, only=only)[1]
            eval_refused = choose_eval_resubmit(
                group["eval"], {cell: s.state for cell, s in merges.items()}, max_attempts=1,
                states=wanted, only=only)[1]
            rows += _refusal_rows(refused, eval_refused)
            refused_all += refused + eval_refused
            continue
        matrix = load_matrix(matrix_path)
        to_run, refused = choose_resubmit(group["merge"], max_attempts=matrix.spec.max_attempts,
                                          states=wanted, only=only)
        cells = {c.id: c for c in expand(matrix)}
        targets = {t.id: t for t in expand_eval(matrix)}
        refused += [Refusal(s.cell, s.state, f"no longer a cell of {matrix.path}")
                    for s in to_run if s.cell not in cells]
        to_run = [s for s in to_run if s.cell in cells]
        rechained = {s.cell for s in to_run if s.cell in targets and s.cell not in live_evals}
        evals_to_run, eval_refused = choose_eval_resubmit(
            [s for s in group["eval"] if s.cell not in rechained],
            {cell: s.state for cell, s in merges.items()},
            max_attempts=matrix.spec.max_attempts, states=wanted, only=only)
        eval_refused += [Refusal(s.cell, s.state, f"no longer an eval target of {matrix.path}")
                         for s in evals_to_run if s.cell not in targets]
        evals_to_run = [s for s in evals_to_run if s.cell in targets]
        rows += _refusal_rows(refused, eval_refused)
        refused_all += refused + eval_refused
        judged = {("merge", s.cell): (s.array_name, s.index) for s in to_run}
        judged |= {("eval", s.cell): (s.array_name, s.index) for s in evals_to_run}
        seen_evals = {c: latest_attempt(ledger, c, "eval") for c in rechained}

        def still_failed(fresh, judged=judged, seen_evals=seen_evals, cells=cells,
                         targets=targets):
            # Another resubmit may have run since we looked: only those whose latest attempt is
            # still the one we judged are submitted, so each failed one is submitted once.
            def unchanged(stage, target_id):
                latest = latest_attempt(fresh, target_id, stage)
                return latest and (latest.array, latest.index) == judged[(stage, target_id)]

            again = [cells[c] for stage, c in judged if stage == "merge" and unchanged(stage, c)]
            evals = [targets[c] for stage, c in judged if stage == "eval" and unchanged(stage, c)]
            # A merge's eval is chained again only along with that merge.
            evals += [targets[c] for c in seen_evals if any(m.id == c for m in again)
                      and latest_attempt(fresh, c, "eval") == seen_evals[c]]
            return again, evals

        # Nothing failed in this group (e.g. every cell COMPLETED or UNPUBLISHED): no array.
        chosen = [cells[s.cell] for s in to_run]
        evals = [targets[s.cell] for s in evals_to_run] + [targets[c] for c in rechained]
        checked = chosen + [c for c in baseline_carriers(matrix, evals) if c not in chosen]
        pins = gate(matrix, checked, executor, run_checks=not no_preflight,
                    known_pins=dict(known_pins), evals=evals) if checked or evals else {}
        requests = submit_cells(ledger_path, matrix, chosen, executor, evals=evals, pins=pins,
                                dry_run=dry_run, guard=None if dry_run else still_failed
                                ) if chosen or evals else []
        resubmitted = {(r.array.stage, c): r for r in requests for c in r.array.cells}
        states_of = {("merge", s.cell): s.state for s in to_run}
        states_of |= {("eval", s.cell): s.state for s in evals_to_run}
        states_of |= {("eval", c): merges[c].state for c in rechained}
        for (stage, target_id), state in states_of.items():
            request = resubmitted.get((stage, target_id))
            if request is None:
                action = "skipped: resubmitted meanwhile by another process"
            else:
                submitted += 1
                waits = f", after {request.after.name}" if request.after else ""
                action = (f"resubmitted in {request.array.name} job "
                          f"{request.array.job_id or '(dry run)'}{waits}")
            rows.append({"cell": target_id, "stage": stage, "state": state, "action": action})
    echo_rows(rows, COLUMNS, fmt)
    click.echo(f"{'would resubmit' if dry_run else 'resubmitted'} {submitted} task(s)", err=True)
    if any(r.state in wanted for r in refused_all):
        # A failed cell that cannot run again (attempt cap) is still a failed cell; failed cells
        # outside --state were not asked about.
        sys.exit(EXIT_FAILED)


def _refusal_rows(refused: list[Refusal], eval_refused: list[Refusal]) -> list[dict[str, str]]:
    """The table's rows for refusals; completed cells are refused too, but listing each would bury
    the failures."""
    return [{"cell": r.cell, "stage": stage, "state": r.state, "action": f"refused: {r.reason}"}
            for stage, refusals in (("merge", refused), ("eval", eval_refused))
            for r in refusals if r.state != "COMPLETED"]
