"""sacct: task states from SLURM's accounting, and arrays found by their job name.

`parse_sacct` (pure) turns ``sacct -X --parsable2`` text into `TaskState`s keyed by
``"<array job id>_<index>"``, keeping only rows whose job id *and* job name are an array's of the
ledger; `query_sacct` and `find_jobs_by_name` run it, one call per chunk of ids.
`accounting_disabled` tells a cluster without accounting (fall back to `squeue`) from a failure.
"""

from __future__ import annotations

import functools
import subprocess
from datetime import timedelta
from typing import Mapping, Sequence

from .errors import SchedulerError, SchedulerMissing
from .ledger import Ledger, all_arrays
from .slurm_commands import (
    EXIT_CODE,
    Runner,
    TaskState,
    base_state,
    chunks,
    node_list,
    parse_names,
    rows,
    run_and_parse,
    task_keys,
)

SACCT_FIELDS = ("JobID", "State", "ExitCode", "Elapsed", "NodeList", "JobName")
SACCT_FORMAT = ",".join(SACCT_FIELDS)
"""The ``-o`` of every status sacct call (with ``-X --parsable2 --noheader``). JobName is last: a
foreign job's name may itself contain "|"."""

def parse_sacct(text: str, names: Mapping[str, str]) -> dict[str, TaskState]:
    """Parse ``sacct -X --parsable2 --noheader -o SACCT_FORMAT`` output.

    Parameters
    ----------
    text
        The output; blank lines are ignored and empty output gives an empty dict. Step rows
        (``1234_5.batch``), which sacct prints without ``-X``, are skipped.
    names
        Array job id -> its job name (`ArrayRecord.name`, unique per array). Rows of any other
        job are skipped: job ids are not unique forever. A controller whose state was reset or
        restored from an older copy hands out ids again, and ``sacct -j`` then also answers with
        the earlier job's rows (sacct(1), ``--duplicates``), whose states are not ours.

    Returns
    -------
    dict
        ``"<job>_<index>"`` (``"<job>"`` for a job that is not an array) -> `TaskState`. A pending
        range such as ``1234_[4-9%2]`` gives one entry per index, all with the range's state,
        unless the task has a row of its own: when an array whose tasks wait on a dependency is
        killed (`--kill-on-invalid-dep`), sacct keeps the tasks that ran as rows of their own and
        still prints the whole range CANCELLED (``1234_[0-1%2]``, beside ``1234_0|FAILED``).

    Raises
    ------
    SchedulerError
        A line does not have the expected fields, job id, state or exit code.
    """
    states: dict[str, TaskState] = {}
    ranges: dict[str, TaskState] = {}
    for number, fields in rows(text, len(SACCT_FIELDS), "sacct", maxsplit=len(SACCT_FIELDS) - 1):
        job_id, state, exit_code, elapsed, node, name = fields
        if exit_code and not EXIT_CODE.fullmatch(exit_code):
            raise SchedulerError(f"sacct line {number}: cannot parse exit code {exit_code!r}")
        task = TaskState(base_state(state, number, "sacct"), exit_code or None, elapsed or None, node_list(node))
        keys = task_keys(job_id, name, names, number, "sacct")
        (ranges if "[" in job_id else states).update(dict.fromkeys(keys, task))
    return {**ranges, **states}


def sacct_starttime(ledger: Ledger, margin: timedelta = timedelta(hours=1)) -> str | None:
    """A ``--starttime`` covering every array in `ledger`, or None for an empty ledger.

    It is the earliest array's submission time minus `margin` (login nodes' clocks may run ahead
    of the controller's), in local time as sacct reads it.
    """
    submitted = [array.submitted for array in all_arrays(ledger)]
    if not submitted:
        return None
    return (min(submitted) - margin).astimezone().strftime("%Y-%m-%dT%H:%M:%S")


def query_sacct(
    names: Mapping[str, str], starttime: str | None = None, *, runner: Runner = subprocess.run
) -> dict[str, TaskState]:
    """Ask sacct for every task of the given array jobs: one call per `MAX_IDS_PER_CALL` ids.

    Parameters
    ----------
    names
        Array job id -> job name, as `parse_sacct` takes them; none means no call.
    starttime
        sacct ``--starttime`` (see `sacct_starttime`); narrows the accounting query.
    runner
        `subprocess.run` or a stand-in with its signature.

    Returns
    -------
    dict
        As `parse_sacct`, merged over all calls.

    Raises
    ------
    SchedulerError
        sacct is missing, timed out, failed, reported an error or printed unparsable rows. The
        message holds the command and sacct's stderr.
    """
    states: dict[str, TaskState] = {}
    for chunk in chunks(list(names)):
        command = ["sacct", "-X", "--parsable2", "--noheader", "-o", SACCT_FORMAT, "-j", ",".join(chunk)]
        if starttime is not None:
            command += ["--starttime", starttime]
        states.update(run_and_parse(command, runner, functools.partial(parse_sacct, names=names)))
    return states


def find_jobs_by_name(
    names: Sequence[str], starttime: str, *, runner: Runner = subprocess.run
) -> dict[str, list[str]]:
    """Find the job ids of arrays by job name, for arrays whose id was never recorded.

    Parameters
    ----------
    names
        Job names from the ledger (`ArrayRecord.name`).
    starttime
        sacct ``--starttime``; required because without ``-j`` sacct only searches since midnight.
    runner
        `subprocess.run` or a stand-in with its signature.

    Returns
    -------
    dict
        Name -> sorted array job ids (normally one); names sacct does not know are absent.

    Raises
    ------
    SchedulerError
        As `query_sacct`.
    """
    found: dict[str, set[str]] = {}
    for chunk in chunks(names):
        # --allusers: without -j, sacct shows only the caller's jobs, and a teammate sharing the
        # ledger must find the owner's array too (the unique name keeps other users' jobs out).
        command = ["sacct", "-X", "--allusers", "--parsable2", "--noheader", "-o", "JobID,JobName"]
        command += [f"--name={','.join(chunk)}", "--starttime", starttime]
        found.update(run_and_parse(command, runner, functools.partial(parse_names, wanted=set(chunk))))
    return {name: sorted(ids, key=int) for name, ids in sorted(found.items())}


def accounting_disabled(error: SchedulerError) -> bool:
    """Did sacct fail because the cluster keeps no accounting (or sacct is not installed)?"""
    return isinstance(error, SchedulerMissing) or "accounting storage is disabled" in str(error).lower()
