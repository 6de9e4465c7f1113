"""squeue: the controller's queue, for clusters without accounting, for arrays sacct does not
know yet (it lags sbatch by seconds; the queue has a job the moment it is accepted), and for tasks
whose accounting row may be out of date.

`parse_squeue` (pure) reads ``squeue --array -o SQUEUE_FORMAT`` text as `sacct.parse_sacct` reads
sacct's; `query_squeue` and `find_queued_jobs_by_name` run it. `needs_controller` and
`controller_view` (pure) say which tasks the queue is asked about and what its answer makes of
accounting's row.
"""

from __future__ import annotations

import functools
import subprocess
from dataclasses import replace
from typing import Mapping, Sequence

from .resubmit_policy import is_live
from .slurm_commands import (Runner, TaskState, base_state, chunks, node_list, parse_names, rows,
                             run_and_parse, task_keys)

SQUEUE_FORMAT = "%i|%T|%M|%N|%j"
"""The ``-o`` of the squeue fallback: job id, long state, time used, nodes, job name."""

REQUEUED_FROM = frozenset({"NODE_FAIL", "PREEMPTED", "BOOT_FAIL"})
"""Ended states SLURM requeues a job from by itself (JobRequeue, PreemptMode=REQUEUE): accounting
may show one while the controller already has the task pending or running again."""

REVOKED = "REVOKED"
"""A federation's sibling job, revoked because another cluster runs it: live, but never in this
cluster's queue."""


def _live_here(state: str) -> bool:
    """May a task in accounting's `state` still run on this cluster, so its queue would list it?"""
    return is_live(state) and state != REVOKED


def needs_controller(accounting: TaskState | None) -> bool:
    """Must the controller be asked about a task with this accounting row (None: no row)? Yes
    unless the row says how the task ended for good: accounting lags (slurmdbd behind or down,
    records lost), and a row missing, live or in `REQUEUED_FROM` may be out of date."""
    return accounting is None or _live_here(accounting.state) or accounting.state in REQUEUED_FROM


def controller_view(accounting: TaskState | None, queued: TaskState | None) -> TaskState | None:
    """One task's state from accounting's row and the controller's (`squeue --states=all`, which
    lists a task until MinJobAge after it ended); None where neither has it.

    The controller decides where accounting may be behind: a task it lists is in the state it
    says when accounting has no row or a live one (a pending task cancelled alone, which the
    array's pending range in sacct still covers, is CANCELLED at once), or when accounting has it
    ended in `REQUEUED_FROM` and the controller runs it again. A task accounting shows live that
    the controller no longer has has ended without accounting knowing: it keeps accounting's row,
    marked `TaskState.left_queue`, for `status_snapshot` to settle from its result record. Where
    both say it ended, accounting's row (with its exit code) stands.
    """
    if queued is None:
        live = accounting is not None and _live_here(accounting.state)
        return replace(accounting, left_queue=True) if live else accounting
    if accounting is None or _live_here(accounting.state):
        return queued
    if accounting.state in REQUEUED_FROM and is_live(queued.state):
        return queued
    return accounting


def parse_squeue(text: str, names: Mapping[str, str]) -> dict[str, TaskState]:
    """Parse ``squeue --array --noheader -o SQUEUE_FORMAT`` output, as `parse_sacct` does sacct's
    (rows of jobs other than the named arrays are skipped).

    Returns
    -------
    dict
        Task key -> `TaskState` with no exit code.

    Raises
    ------
    SchedulerError
        A line does not have the expected fields, job id or state.
    """
    states: dict[str, TaskState] = {}
    for number, (job_id, state, elapsed, node, name) in rows(text, 5, "squeue", maxsplit=4):
        task = TaskState(base_state(state, number, "squeue"), None, elapsed or None, node_list(node))
        states.update(dict.fromkeys(task_keys(job_id, name, names, number, "squeue"), task))
    return states


def query_squeue(names: Mapping[str, str], *, runner: Runner = subprocess.run) -> dict[str, TaskState]:
    """Ask squeue for the tasks of the given array jobs (id -> name) still known to the controller.

    The fallback when there is no accounting, and for tasks sacct has no row for. It asks by job
    name (unique per array), as ``squeue -j`` fails outright when a single requested job has
    left the queue, and for every user's jobs (no ``--me``): a teammate sharing the ledger asks
    about the owner's arrays. ``--states=all`` includes tasks that ended in the last few minutes
    (slurm.conf MinJobAge); older tasks are simply absent.

    Raises
    ------
    SchedulerError
        As `query_sacct`.
    """
    states: dict[str, TaskState] = {}
    for chunk in chunks(sorted(set(names.values()))):
        command = ["squeue", "--array", "--noheader", "--states=all", "-o", SQUEUE_FORMAT,
                   f"--name={','.join(chunk)}"]
        states.update(run_and_parse(command, runner, functools.partial(parse_squeue, names=names)))
    return states


def find_queued_jobs_by_name(names: Sequence[str], *, runner: Runner = subprocess.run) -> dict[str, list[str]]:
    """As `find_jobs_by_name`, from squeue: the controller's own queue, which knows an array the
    moment sbatch is accepted (sacct lags) and works without accounting; every user's jobs, as
    `query_squeue`. Jobs that ended more than a few minutes ago (slurm.conf MinJobAge) are no
    longer listed.
    """
    found: dict[str, set[str]] = {}
    for chunk in chunks(names):
        command = ["squeue", "--noheader", "--states=all", "-o", "%i|%j",
                   f"--name={','.join(chunk)}"]
        parse = functools.partial(parse_names, wanted=set(chunk), source="squeue")
        for name, ids in run_and_parse(command, runner, parse).items():
            found.setdefault(name, set()).update(ids)
    return {name: sorted(ids, key=int) for name, ids in sorted(found.items())}
