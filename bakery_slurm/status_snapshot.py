"""Where every cell of a ledger stands now: the shell around `cell_status.reduce_cells`.

One batched sacct call for all SLURM arrays (squeue + completion markers when there is no
accounting), state files for local arrays, and recovery of arrays whose job id was never recorded
(a crash between sbatch and the ledger write): sacct finds them by their unique job name, and a
local array's folder shows whether its supervisor was started. squeue is asked about every task
sacct has no row for or may have out of date (`squeue.controller_view`). A task that neither
shows, or that sacct shows live and squeue no longer has, has ended: its state is read from its
own records (`_gone_state`); except in another user's array on a cluster that hides other users'
jobs (`_hidden_arrays`), where absence says nothing.
Eval attempts (`Ledger.evals`) are reduced the same way, from the same sacct call.
Never imports torch.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable

from .errors import ConfigError
from .evaluation import read_eval_failure, read_eval_record
from .executors import LocalBackend, SlurmBackend
from .fsutil import is_held
from .ledger import (ArrayRecord, Ledger, all_arrays, confirm_array, submitting_path,
                     update_ledger)
from .login_push import VERIFIED, ready_to_publish
from .matrix import load_matrix
from .pipeline import CellPaths, read_result
from .cell_status import (
    CANCELLED,
    COMPLETED,
    HIDDEN,
    LOST,
    NOT_FOUND,
    PENDING,
    UNCONFIRMED,
    UNPUBLISHED,
    CellStatus,
    reduce_cells,
)
from .resubmit_policy import TERMINAL_FAILURES, is_live
from .sacct import sacct_starttime

log = logging.getLogger(__name__)

# How the local executor reports a task whose process (and supervisor) died unrecorded.
NODE_FAIL = "NODE_FAIL"
# sacct shows a new array only after a few seconds: until then its tasks are SUBMITTED, not lost.
SUBMITTED = "SUBMITTED"
SACCT_LAG = timedelta(minutes=2)
# Login and compute nodes' clocks may disagree by this much.
CLOCK_SKEW = timedelta(minutes=1)


@dataclass(frozen=True)
class Snapshot:
    """Every cell's status (its merge), every eval target's, the arrays by name, and notes on
    how the states were obtained."""

    statuses: list[CellStatus]
    arrays: dict[str, ArrayRecord]
    notes: list[str]
    evals: list[CellStatus] = field(default_factory=list)


def snapshot(ledger_path: Path, ledger: Ledger, slurm: SlurmBackend | None = None,
             recover: bool = True) -> Snapshot:
    """Query the scheduler(s) once and reduce to one status per cell.

    With recover=True, arrays whose job id was never recorded are looked up in sacct by name and
    confirmed in the ledger file (the only write). Raises SchedulerError when sacct (or the squeue
    fallback) cannot be asked: "could not ask" is never shown as a state.
    """
    slurm = slurm or SlurmBackend()
    notes = _recover(ledger_path, ledger, slurm) if recover else []
    arrays = all_arrays(ledger)
    slurm_arrays = [a for a in arrays if a.executor == "slurm"]
    states, source = ({}, "sacct")
    if slurm_arrays:
        states, source = slurm.states(slurm_arrays, sacct_starttime(ledger))
        if source != "sacct":
            notes.append(f"states from {source}")
    # Job ids SLURM showed any task of: sacct's lag is over for them, and the queue lists every
    # task of a job it has, so a task of theirs that neither shows is gone, however fresh.
    shown = {key.split("_")[0] for key in states}
    states.update(LocalBackend.states([a for a in arrays if a.executor == "local"], None)[0])
    by_name = {a.name: a for a in arrays}
    recent = datetime.now(timezone.utc) - SACCT_LAG
    submission_of = {a.name: s.id for s in ledger.submissions for a in s.arrays}
    # Asked once per submission, not per cell: a large unconfirmed array is many cells.
    submitting = functools.cache(lambda submission: is_held(submitting_path(ledger_path, submission)))

    def fresh(status: CellStatus) -> bool:
        # Recorded lately, or its submit is still running its sbatches (a busy controller).
        return (by_name[status.array_name].submitted > recent
                or (status.state == UNCONFIRMED and submitting(submission_of[status.array_name])))

    def unseen(status: CellStatus) -> bool:
        return fresh(status) and status.array_job_id not in shown

    accounting = source == "sacct"
    hidden = _hidden_arrays(slurm_arrays, slurm)
    statuses = [_settle_gone(_settle_unknown(s, unseen(s)), by_name, _merge_outcome, accounting,
                             fresh(s), hidden) for s in reduce_cells(ledger, states)]
    defers = {a.name: _defers(s.matrix_path) for s in ledger.submissions for a in s.arrays}
    statuses = [_publication(s, by_name, defers[s.array_name]) for s in statuses]
    statuses = [_with_detail(s, by_name) for s in statuses]
    evals = [_settle_gone(_settle_unknown(s, unseen(s)), by_name, _eval_outcome, accounting,
                          fresh(s), hidden) for s in reduce_cells(ledger, states, stage="eval")]
    evals = [_scored(s, by_name) for s in evals]
    merges = {s.cell: s.state for s in statuses}
    evals = [_why_not_run(s, merges.get(s.cell)) for s in evals]
    evals = [_why_failed(s, by_name) for s in evals]
    if any(s.state == HIDDEN for s in statuses + evals):
        notes.append("this cluster shows you only your own jobs (PrivateData=jobs): HIDDEN tasks "
                     "are other users'; their owners' `status` shows them")
    return Snapshot(statuses=statuses, arrays=by_name, notes=notes, evals=evals)


def _hidden_arrays(arrays: list[ArrayRecord], slurm: SlurmBackend) -> frozenset[str]:
    """The SLURM arrays whose tasks the scheduler may hide from us: another user's (the owner of
    its folder, made by the submit), where the cluster hides other users' jobs. Their absence
    from sacct and squeue says nothing of how they stand. The scheduler's configuration is read
    only when a teammate's array is in the ledger."""
    theirs = frozenset(a.name for a in arrays if _owner(Path(a.folder)) not in (None, os.getuid()))
    return theirs if theirs and slurm.hides_others_jobs() else frozenset()


def _owner(folder: Path) -> int | None:
    try:
        return folder.stat().st_uid
    except OSError:
        return None


def _gone_state(outcome: str | None, accounting: bool, last_seen: str | None = None) -> str:
    """The state of a SLURM task the controller no longer has, so it will never run: one that
    neither sacct nor squeue shows past sacct's lag (`last_seen` None), or one accounting last
    saw live in `last_seen` (it missed the end: slurmdbd down or behind). It ended as its
    attempt's own record says (`outcome`: COMPLETED or FAILED, None when it recorded none).
    Without one it was removed before it started, CANCELLED, where accounting says it never
    started: accounting has a row for every task that started, and one still PENDING there
    (the array's pending range) was cancelled alone (scancel or an admin; SLURM 22.05 keeps no
    row for it). Otherwise LOST: it ran, and nothing says whether a limit, a node or a scancel
    ended it (without accounting the queue forgets every task minutes after it ended,
    MinJobAge). `resubmit` takes both."""
    if outcome:
        return outcome
    if last_seen is None:
        return CANCELLED if accounting else LOST
    return CANCELLED if last_seen == PENDING else LOST


def _settle_gone(status: CellStatus, arrays: dict[str, ArrayRecord],
                 outcome: Callable[[CellStatus, dict[str, ArrayRecord]], str | None],
                 accounting: bool, fresh: bool, hidden: frozenset[str] = frozenset()) -> CellStatus:
    """A gone SLURM task's `_gone_state`, its records read only then: a NOT_FOUND one, and one
    that left the queue while accounting shows it live (`CellStatus.left_queue`), which keeps
    accounting's state while its array is fresh (sacct lags) unless that is PENDING: a task
    that never started is over once the controller drops it. In an array of `hidden`, whose
    tasks the scheduler does not show us, absence says nothing: a NOT_FOUND task ended as its
    record says, else is HIDDEN, and accounting's word on a task stands. (A local task has
    state files until its array folder is removed: it stays NOT_FOUND.) A local NODE_FAIL task
    ended as its attempt's record says, if it says: its supervisor died (SIGKILL, the OOM
    killer) while it ran, and the task, in a session of its own, ran on to an end that no one
    recorded."""
    executor = arrays[status.array_name].executor
    if status.state == NODE_FAIL and executor == "local":
        return replace(status, state=outcome(status, arrays) or NODE_FAIL)
    if executor != "slurm":
        return status
    if status.array_name in hidden:
        if status.state == NOT_FOUND:
            return replace(status, state=outcome(status, arrays) or HIDDEN)
        return replace(status, left_queue=False)
    if status.left_queue and (status.state == PENDING or not fresh):
        return replace(status, state=_gone_state(outcome(status, arrays), accounting, status.state),
                       left_queue=False)
    if status.state != NOT_FOUND:
        return status
    return replace(status, state=_gone_state(outcome(status, arrays), accounting))


def _eval_outcome(status: CellStatus, arrays: dict[str, ArrayRecord]) -> str | None:
    """COMPLETED if the eval wrote its results after its attempt was submitted, FAILED if it
    wrote a failure record then (the later of the two when both are), None when neither."""
    array = arrays[status.array_name]
    outcomes = [(_written_at(record, status, array), state) for record, state in
                ((read_eval_record(array.work, status.cell), COMPLETED),
                 (read_eval_failure(array.work, status.cell), "FAILED"))]
    written = [(when, state) for when, state in outcomes if when is not None]
    return max(written)[1] if written else None


def _written_at(record: dict, status: CellStatus, array: ArrayRecord) -> datetime | None:
    """When `record` was written ("finished"), if by the task of `status`'s attempt; else None."""
    try:
        # A results file kept by a later task (same model and settings) says when: `checked`.
        finished = datetime.fromisoformat(record.get("checked") or record["finished"])
    except (KeyError, TypeError, ValueError):
        return None
    if finished.tzinfo is None:  # not ours (we write UTC with its offset): read it as UTC
        finished = finished.replace(tzinfo=timezone.utc)
    return finished if _by_attempt(record, status, array, finished) else None


def _by_attempt(record: dict, status: CellStatus, array: ArrayRecord, written: datetime) -> bool:
    """Was `record`, written (or started) at `written` by the node's clock, written by the task
    of `status`'s attempt? A record that names its SLURM task (`pipeline.slurm_task`: the job id
    alone for a plain job, as `CellStatus.task_id`) says so exactly. Others (a local task's, an older version's) count when written after the attempt was
    submitted, which compares the node's clock with the login node's, a minute apart at most."""
    task = record.get("task")
    if array.executor == "slurm" and task is not None:
        return task == status.task_id
    return written >= array.submitted - CLOCK_SKEW


def _why_not_run(status: CellStatus, merge_state: str | None) -> CellStatus:
    """An eval that never ran because its cell's merge failed says so (the scheduler cancels it,
    `--kill-on-invalid-dep`)."""
    if merge_state in TERMINAL_FAILURES and status.state in (CANCELLED, "PENDING"):
        return replace(status, detail=f"never ran: its merge ended {merge_state}")
    return status


def _why_failed(status: CellStatus, arrays: dict[str, ArrayRecord]) -> CellStatus:
    """A failed eval says why, from the failure record its attempt wrote (none when it was
    killed: a timeout, out of memory)."""
    if status.state not in TERMINAL_FAILURES or status.detail:
        return status
    array = arrays[status.array_name]
    failure = read_eval_failure(array.work, status.cell)
    if _written_at(failure, status, array) is None:
        return status
    error = failure.get("error")
    # One line, as every detail: lm-eval's errors (a YAML error, a dataset's) span several.
    return replace(status, detail=" ".join(error.split()) if isinstance(error, str) else error)


# Cells in these states have no result record of their latest attempt worth reading. (A LOST
# task may have one: the stage it was killed in.)
_NO_DETAIL = frozenset({COMPLETED, "PENDING", UNCONFIRMED, SUBMITTED})


def describe_progress(state: str, result: dict | None) -> str | None:
    """One line on a cell from its attempt's result record: why it failed, or the stage it is in
    (or was in when it stopped) and since when, with the tensors done of a merge by the bakery
    engine. None when the record says nothing more."""
    if not result:
        return None
    if result.get("status") == "failed":
        return result.get("error")
    running = [(name, record) for name, record in (result.get("stages") or {}).items()
               if isinstance(record, dict) and record.get("status") == "running"]
    if result.get("status") != "running" or not running:
        return None
    stage, record = running[-1]
    since = record.get("started", "?")
    if not is_live(state):
        return f"stopped in {stage} (started {since})"
    progress = result.get("progress") or {}
    if progress.get("stage") == stage:  # the bakery engine's merge reports tensors done
        return f"{stage} since {since}, {progress['tensors_done']}/{progress['tensors_total']} tensors"
    return f"{stage} since {since}"


def _with_detail(status: CellStatus, arrays: dict[str, ArrayRecord]) -> CellStatus:
    if status.state in _NO_DETAIL:
        return status
    return replace(status, detail=describe_progress(status.state, _attempt_result(status, arrays)[1]))


def _settle_unknown(status: CellStatus, fresh: bool) -> CellStatus:
    """A task sacct does not show is SUBMITTED while the array is fresh (sacct lags); an array
    still unconfirmed after that, which `_recover` could not find by name, never reached a
    scheduler: LOST, so it can be resubmitted."""
    if status.state == NOT_FOUND and fresh:
        return replace(status, state=SUBMITTED)
    if status.state == UNCONFIRMED and not fresh:
        return replace(status, state=LOST)
    return status


def _recover(ledger_path: Path, ledger: Ledger, slurm: SlurmBackend) -> list[str]:
    """Confirm unconfirmed arrays that were started after all: SLURM arrays that sacct knows by
    name, local arrays whose folder records a started supervisor (a submit interrupted between
    starting it and recording its job id); return notes."""
    unconfirmed = [a for a in all_arrays(ledger) if a.job_id is None]
    found = {name: (job_id, "from its folder") for name, job_id in
             LocalBackend.started([a for a in unconfirmed if a.executor == "local"]).items()}
    names = [a.name for a in unconfirmed if a.executor == "slurm"]
    starttime = sacct_starttime(ledger)
    if names and starttime is not None:
        found.update({name: (ids[-1], "by its job name")
                      for name, ids in slurm.recover(names, starttime).items() if ids})
    if not found:
        return []
    with update_ledger(ledger_path) as fresh:
        for name, (job_id, _) in found.items():
            confirm_array(fresh, name, job_id)
    for name, (job_id, _) in found.items():
        confirm_array(ledger, name, job_id)
    return [f"recovered job id {job_id} of array {name} {how}"
            for name, (job_id, how) in found.items()]


def _attempt_result(status: CellStatus,
                    arrays: dict[str, ArrayRecord]) -> tuple[CellPaths, dict | None]:
    """The cell's paths, and its result record if this very attempt wrote it (one written before
    the attempt started may be a --force rerun's)."""
    # Array folders live at <work>/arrays/<name> (submission.py).
    array = arrays[status.array_name]
    paths = CellPaths(array.work, status.cell)
    result = read_result(paths)
    if not result or result.get("recipe_hash") != status.recipe_hash:
        return paths, None
    try:
        started = datetime.fromisoformat(result["started"])
    except (KeyError, TypeError, ValueError):
        return paths, None
    return paths, result if _by_attempt(result, status, array, started) else None


def _merge_outcome(status: CellStatus, arrays: dict[str, ArrayRecord]) -> str | None:
    """COMPLETED or FAILED as the cell's result record says, if this attempt wrote it and got
    that far; None otherwise (a record still "running": the task was killed)."""
    result = _attempt_result(status, arrays)[1] or {}
    return {"done": COMPLETED, "failed": "FAILED", VERIFIED: COMPLETED}.get(result.get("status"))


@functools.lru_cache(maxsize=None)
def _defers(matrix_path: str) -> bool:
    """Whether the matrix's tasks stop after verify (`[push] defer`). False when it cannot be
    read: `bakery-slurm push` needs the matrix, so there is nothing to tell its cells apart for."""
    try:
        return load_matrix(matrix_path, check_cells=False).spec.push.defer
    except (ConfigError, OSError):
        return False


def _publication(status: CellStatus, arrays: dict[str, ArrayRecord], defers: bool) -> CellStatus:
    """A task SLURM says ended without success (FAILED, TIMEOUT, OUT_OF_MEMORY, NODE_FAIL,
    CANCELLED, ...) ended as its attempt's record says where that says the cell got through:
    killed in teardown, after its work was done, it must not run again. Verified but not
    published (its push failed, or `[push] defer`) is UNPUBLISHED, not FAILED or COMPLETED:
    `bakery-slurm push` publishes it, no rerun needed (so is a COMPLETED task of a matrix that
    defers). Published (`done`: by the task, or since from the login node) is COMPLETED. (A
    COMPLETED task of a matrix that does not defer published its cell: its record is not read.)"""
    if status.state not in TERMINAL_FAILURES and not (status.state == COMPLETED and defers):
        return status
    paths, result = _attempt_result(status, arrays)
    if ready_to_publish(paths, result):
        return replace(status, state=UNPUBLISHED)
    if (result or {}).get("status") == "done":
        return replace(status, state=COMPLETED)
    return status


def _scored(status: CellStatus, arrays: dict[str, ArrayRecord]) -> CellStatus:
    """An eval SLURM says ended without success whose attempt wrote its results (after any
    failure record) is COMPLETED, as `_publication` reads a merge: killed in teardown, its
    scores are in."""
    if status.state in TERMINAL_FAILURES and _eval_outcome(status, arrays) == COMPLETED:
        return replace(status, state=COMPLETED)
    return status
