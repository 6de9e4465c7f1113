"""One status per cell: the scheduler's task states mapped onto each cell's latest attempt.

Pure: `reduce_cells` takes the ledger and task states (from `sacct`, `squeue` or the local
executor) and returns a `CellStatus` per cell; `totals` counts them. The states are SLURM's plus
the few this module names.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Mapping

from .ledger import Ledger, Stage, all_arrays, stage_attempts, task_id
from .slurm_commands import TaskState, task_row

UNCONFIRMED = "UNCONFIRMED"
"""The latest attempt's array has no job id: sbatch is running, failed, or its id was never saved."""

NOT_FOUND = "NOT_FOUND"
"""The array has a job id, but the scheduler's answer has no row for this task. For a SLURM
task `status_snapshot.snapshot` settles it (SUBMITTED, or how it ended); a local array keeps it
when its state files are gone."""

HIDDEN = "HIDDEN"
"""A task of an array another user submitted, which neither sacct nor squeue shows because the
cluster hides other users' jobs (slurm.conf's `PrivateData=jobs`), and whose own record does not
say how it ended: it may still run. Set by `status_snapshot.snapshot`; never resubmitted."""

CANCELLED = "CANCELLED"
"""A task cancelled by scancel (or `bakery-slurm cancel`, also before it started)."""

PENDING = "PENDING"
"""Waiting to start (held tasks are PENDING too, in accounting)."""

COMPLETED = "COMPLETED"
"""The only state that means a cell's latest attempt succeeded."""

UNPUBLISHED = "UNPUBLISHED"
"""The task verified the cell but did not publish it (its push failed, or `[push] defer`): set by
`status_snapshot.snapshot`; `bakery-slurm push` publishes it, `resubmit` never reruns it for that."""

LOST = "LOST"
"""Nothing says what became of the attempt, and nothing can run it any more: set by
`status_snapshot.snapshot` for an array no scheduler ever had (sbatch failed or was interrupted
before it ran; unconfirmed, and not found by name once sacct had time to know it), and for a task
that left the queue without recording an outcome (killed at a time or memory limit, on a failed
node, or cancelled) where accounting missed its end (slurmdbd down or behind) or is disabled."""

@dataclass(frozen=True)
class CellStatus:
    """The state of a cell's latest attempt.

    Attributes
    ----------
    cell
        Cell id (or eval target id).
    state
        A SLURM state, `UNCONFIRMED` or `NOT_FOUND`.
    attempt
        How many attempts the cell has had; the latest is number `attempt` (1-based).
    array_name, array_job_id, index
        The array task that ran the latest attempt (`array_job_id` None while unconfirmed).
    recipe_hash
        The recipe the latest attempt ran.
    exit_code, elapsed, node
        As in `TaskState`, when the scheduler reported them.
    detail
        One line from the cell's result record: the stage a live cell is in and since when, or
        why a failed one failed (the stage and the input it could not use).
    stage
        Whose attempts these are: the cell's merge, or the evaluation of a cell or baseline.
    unscheduled_attempts
        How many of its attempts no scheduler took (their array has no job id: sbatch failed
        or was interrupted): they ran nothing, so `max_attempts` does not count them.
    plain_job
        The latest attempt's array is a plain job (`ArrayRecord.plain_job`): SLURM knows its
        task by the job id alone.
    left_queue
        As `TaskState.left_queue`: `state` is accounting's last word on a task the controller no
        longer has; `status_snapshot.snapshot` settles it.
    """

    cell: str
    state: str
    attempt: int
    array_name: str
    array_job_id: str | None
    index: int
    recipe_hash: str
    exit_code: str | None = None
    elapsed: str | None = None
    node: str | None = None
    detail: str | None = None
    stage: Stage = "merge"
    unscheduled_attempts: int = 0
    plain_job: bool = False
    left_queue: bool = False

    @property
    def task_id(self) -> str | None:
        """The latest attempt's task as SLURM commands take it (`ledger.task_id`)."""
        return task_id(self.array_job_id, self.index, self.plain_job)


def reduce_cells(ledger: Ledger, states: Mapping[str, TaskState],
                 stage: Stage = "merge") -> list[CellStatus]:
    """The status of every cell (or eval target, for stage "eval") in `ledger`: the state of its
    latest attempt at that stage.

    Parameters
    ----------
    ledger
        Supplies each cell's attempts and the arrays they ran in.
    states
        Task key -> state, from `parse_sacct`/`query_sacct` (or the squeue fallback).

    Returns
    -------
    list of CellStatus
        Sorted by cell id. A cell whose latest array has no job id is `UNCONFIRMED`; one whose task
        is absent from `states` is `NOT_FOUND`; one whose cancel the ledger records is `CANCELLED`
        unless the scheduler shows it past PENDING.
    """
    arrays = {array.name: array for array in all_arrays(ledger)}
    statuses = []
    by_id = stage_attempts(ledger, stage)
    for cell in sorted(by_id):
        cell_attempts = by_id[cell]
        latest = cell_attempts[-1]
        job_id = arrays[latest.array].job_id
        if job_id is None:
            task = TaskState(UNCONFIRMED)
        else:
            task = task_row(states, job_id, latest.index)
            if latest.cancelled and (task is None or task.state == PENDING):
                # A task cancelled before it started gets no row of its own in accounting (SLURM
                # 22.05): sacct shows nothing, or the array's pending range, which still covers
                # it. The ledger's note of the cancel is the truth then.
                task = TaskState(CANCELLED)
            elif task is None:
                task = TaskState(NOT_FOUND)
        statuses.append(
            CellStatus(
                cell=cell,
                state=task.state,
                attempt=len(cell_attempts),
                array_name=latest.array,
                array_job_id=job_id,
                index=latest.index,
                recipe_hash=latest.recipe_hash,
                exit_code=task.exit_code,
                elapsed=task.elapsed,
                node=task.node,
                stage=stage,
                unscheduled_attempts=sum(arrays[a.array].job_id is None for a in cell_attempts),
                plain_job=arrays[latest.array].plain_job,
                left_queue=task.left_queue,
            )
        )
    return statuses


def totals(statuses: Iterable[CellStatus]) -> dict[str, int]:
    """Number of cells per state, by state name."""
    return dict(sorted(Counter(status.state for status in statuses).items()))
