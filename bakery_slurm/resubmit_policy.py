"""Which cells may run again: the resubmit policy.

`TERMINAL_FAILURES` are the states `resubmit` takes; `is_live` says which states may still run
(and so are never submitted again); `choose_resubmit` splits cells into those to resubmit and
those refused, with a reason each, and `choose_eval_resubmit` does the same for evaluations whose
merge is not resubmitted with them. Pure.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Iterable, Mapping

from .cell_status import (
    CANCELLED,
    COMPLETED,
    HIDDEN,
    LOST,
    NOT_FOUND,
    UNCONFIRMED,
    UNPUBLISHED,
    CellStatus,
)

TERMINAL_FAILURES = frozenset(
    {"FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", CANCELLED, "BOOT_FAIL", "DEADLINE", "PREEMPTED",
     LOST}
)
"""States in which a task has ended without success: the ones `choose_resubmit` may resubmit."""

ENDED = TERMINAL_FAILURES | {COMPLETED, UNPUBLISHED, NOT_FOUND}
"""States after which no task of this attempt can run again."""


def is_live(state: str) -> bool:
    """May the attempt in `state` still run (or be running)? Then it is never submitted again.

    Live is everything that has not ended: pending and running, but also held, suspended, stopped
    and requeued tasks (``REQUEUE_HOLD``, ``SPECIAL_EXIT``, ``STOPPED``, ``SUSPENDED``,
    ``RESIZING``, ...), which someone can release or resume, `UNCONFIRMED` and `SUBMITTED` arrays,
    and any state a later SLURM adds: a cell running twice is worse than one waiting for a look.
    """
    return state not in ENDED

@dataclass(frozen=True)
class Refusal:
    """A cell `choose_resubmit` will not resubmit, and why."""

    cell: str
    state: str
    reason: str


def choose_resubmit(
    statuses: Iterable[CellStatus],
    *,
    max_attempts: int,
    states: Iterable[str] = TERMINAL_FAILURES,
    only: str | None = None,
) -> tuple[list[CellStatus], list[Refusal]]:
    """Split cells into those to resubmit and those refused, with a reason each.

    Parameters
    ----------
    statuses
        From `reduce_cells`, freshly queried.
    max_attempts
        Attempts allowed per cell, the first included; a cell that has had them all is refused.
        Attempts no scheduler took (`CellStatus.unscheduled_attempts`) ran nothing and do not
        count.
    states
        Which terminal failures to resubmit; must be a subset of `TERMINAL_FAILURES`.
    only
        fnmatch glob on cell ids (``*`` also matches ``/``); cells not matching are left out of
        both lists.

    Returns
    -------
    (to_resubmit, refused)
        Both in the order of `statuses`.

    Raises
    ------
    ValueError
        `states` names a state outside `TERMINAL_FAILURES`, or `max_attempts` < 1.
    """
    wanted = frozenset(states)
    if not wanted <= TERMINAL_FAILURES:
        raise ValueError(
            f"cannot resubmit cells in state {', '.join(sorted(wanted - TERMINAL_FAILURES))}; "
            f"choose from {', '.join(sorted(TERMINAL_FAILURES))}"
        )
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
    chosen: list[CellStatus] = []
    refused: list[Refusal] = []
    for status in statuses:
        if only is not None and not fnmatch.fnmatchcase(status.cell, only):
            continue
        reason = _refusal_reason(status, wanted, max_attempts)
        if reason is None:
            chosen.append(status)
        else:
            refused.append(Refusal(status.cell, status.state, reason))
    return chosen, refused


MERGED = frozenset({COMPLETED, UNPUBLISHED})
"""Merge states whose verified output an eval can score."""


def choose_eval_resubmit(
    evals: Iterable[CellStatus],
    merges: Mapping[str, str],
    *,
    max_attempts: int,
    states: Iterable[str] = TERMINAL_FAILURES,
    only: str | None = None,
) -> tuple[list[CellStatus], list[Refusal]]:
    """Split evaluations into those to resubmit alone and those refused, as `choose_resubmit`.

    `merges` maps a cell id to the state of its merge; an eval target not in it is a baseline.
    An eval of a cell whose merge did not succeed is refused: resubmitting the merge chains its
    eval again (those evals are not passed here).
    """
    chosen, refused = choose_resubmit(evals, max_attempts=max_attempts, states=states, only=only)
    merged = [s for s in chosen if merges.get(s.cell, COMPLETED) in MERGED]
    refused += [Refusal(s.cell, s.state, f"its merge is {merges[s.cell]}: resubmitting the merge "
                                         "chains its eval again")
                for s in chosen if s not in merged]
    return merged, refused


def _refusal_reason(status: CellStatus, wanted: frozenset[str], max_attempts: int) -> str | None:
    if status.state in wanted:
        counted = status.attempt - status.unscheduled_attempts
        if counted >= max_attempts:
            return f"reached the attempt cap ({counted} of {max_attempts})"
        return None
    if status.state in TERMINAL_FAILURES:
        return f"{status.state} is not among the selected states ({', '.join(sorted(wanted))})"
    if status.state == COMPLETED:
        return "already COMPLETED"
    if status.state == UNPUBLISHED:
        return "verified, only publishing is left: `bakery-slurm push MATRIX` publishes it"
    if status.state == UNCONFIRMED:
        return f"array {status.array_name} has no recorded job id; run status to recover it first"
    if status.state == HIDDEN:
        return (f"task {status.task_id} is another user's, and this cluster hides other users' "
                "jobs (PrivateData=jobs): it may still run; its owner can resubmit it")
    if status.state == NOT_FOUND:
        return f"the scheduler has no record of task {status.task_id}"
    return f"latest attempt is {status.state}, not a terminal failure"
