"""Task states from sacct (or squeue), reduced to one status per cell.

The pure core: `parse_sacct` and `parse_squeue` turn scheduler text into `TaskState`s keyed by
``"<array job id>_<index>"``, keeping only rows whose job id *and* job name are an array's of the
ledger; `reduce_cells` maps them onto the ledger's latest attempt of every cell;
`choose_resubmit` and `totals` work on the resulting `CellStatus` list.

The shell, kept thin: `query_sacct`, `query_squeue` and `find_jobs_by_name` run one command (or one
per chunk of ids) through an injectable `runner` and raise `SchedulerError` when the command is
missing, fails, or prints something unparsable. A scheduler that cannot be asked is never reported
as a state.
"""

from __future__ import annotations

import fnmatch
import functools
import os
import re
import shlex
import subprocess
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Iterable, Iterator, Mapping, Sequence

from .errors import SchedulerError, SchedulerMissing
from .ledger import Ledger, all_arrays

SACCT_FIELDS = ("JobID", "State", "ExitCode", "Elapsed", "NodeList", "JobName")
SACCT_FORMAT = ",".join(SACCT_FIELDS)
"""The ``-o`` of every status sacct call (with ``-X --parsable2 --noheader``). JobName is last: a
foreign job's name may itself contain "|"."""

SQUEUE_FORMAT = "%i|%T|%M|%N|%j"
"""The ``-o`` of the squeue fallback: job id, long state, time used, nodes, job name."""

MAX_IDS_PER_CALL = 1000
"""Job ids (or names) per sacct call. 1000 ids make a ~10 kB ``-j`` argument, far below Linux's
128 kiB limit on one argument, and a 10,000-cell ledger over 100 arrays still needs one call."""

SCHEDULER_TIMEOUT_S = 120
"""sacct retries for minutes when slurmdbd is unreachable; give up and say so after this."""

UNCONFIRMED = "UNCONFIRMED"
"""The latest attempt's array has no job id: sbatch is running, failed, or its id was never saved."""

NOT_FOUND = "NOT_FOUND"
"""The array has a job id, but the scheduler's answer has no row for this task."""

CANCELLED = "CANCELLED"
"""A task cancelled by scancel (or `bakery-slurm cancel`, also before it started)."""

COMPLETED = "COMPLETED"
"""The only state that means a cell's latest attempt succeeded."""

LOST = "LOST"
"""The intent was recorded but no scheduler ever had the array (sbatch failed or was interrupted
before it ran): set by `tracking.snapshot` once sacct had time to know it by name and does not."""

TERMINAL_FAILURES = frozenset(
    {"FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", CANCELLED, "BOOT_FAIL", "DEADLINE", "PREEMPTED",
     LOST}
)
"""States in which a task has ended without success: the ones `choose_resubmit` may resubmit."""

ENDED = TERMINAL_FAILURES | {COMPLETED, NOT_FOUND}
"""States after which no task of this attempt can run again."""


def is_live(state: str) -> bool:
    """May the attempt in `state` still run (or be running)? Then it is never submitted again.

    Live is everything that has not ended: pending and running, but also held, suspended, stopped
    and requeued tasks (``REQUEUE_HOLD``, ``SPECIAL_EXIT``, ``STOPPED``, ``SUSPENDED``,
    ``RESIZING``, ...), which someone can release or resume, `UNCONFIRMED` and `SUBMITTED` arrays,
    and any state a later SLURM adds: a cell running twice is worse than one waiting for a look.
    """
    return state not in ENDED


Runner = Callable[..., "subprocess.CompletedProcess[str]"]

# `1234`, `1234_7`, or a compressed set of tasks `1234_[0,3-5,8-20:4%2]` (`:step` and `%throttle`
# are both printed by SLURM), optionally followed by a job step (`.batch`, `.0`).
_JOB_ID = re.compile(r"(?P<job>\d+)(?:_(?:(?P<index>\d+)|\[(?P<ranges>[0-9,:-]+)(?:%\d+)?\]))?(?:\.(?P<step>\w+))?")
_RANGE = re.compile(r"(?P<first>\d+)(?:-(?P<last>\d+)(?::(?P<step>\d+))?)?")
_STATE = re.compile(r"[A-Z_]+")
_EXIT_CODE = re.compile(r"\d+:\d+")
# What sacct ("None assigned") and squeue ("" or "(null)") print as the nodes of a task not yet run.
_NO_NODE = {"", "None assigned", "(null)"}


@dataclass(frozen=True)
class TaskState:
    """What the scheduler says about one array task.

    Attributes
    ----------
    state
        SLURM's state without its detail (``CANCELLED by 0`` -> ``CANCELLED``).
    exit_code
        ``"<code>:<signal>"`` as sacct prints it; None from squeue.
    elapsed
        Run time as SLURM prints it (``[D-]HH:MM:SS``), None if empty.
    node
        Node list, None for a task that has not run.
    """

    state: str
    exit_code: str | None = None
    elapsed: str | None = None
    node: str | None = None


@dataclass(frozen=True)
class CellStatus:
    """The state of a cell's latest attempt.

    Attributes
    ----------
    cell
        Cell id.
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

    @property
    def task_id(self) -> str | None:
        """``<array_job_id>_<index>`` as SLURM commands take it, None while unconfirmed."""
        return None if self.array_job_id is None else f"{self.array_job_id}_{self.index}"


@dataclass(frozen=True)
class Refusal:
    """A cell `choose_resubmit` will not resubmit, and why."""

    cell: str
    state: str
    reason: str


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
        range such as ``1234_[4-9%2]`` gives one entry per index, all with the range's state.

    Raises
    ------
    SchedulerError
        A line does not have the expected fields, job id, state or exit code.
    """
    states: dict[str, TaskState] = {}
    for number, fields in _rows(text, len(SACCT_FIELDS), "sacct", maxsplit=len(SACCT_FIELDS) - 1):
        job_id, state, exit_code, elapsed, node, name = fields
        if exit_code and not _EXIT_CODE.fullmatch(exit_code):
            raise SchedulerError(f"sacct line {number}: cannot parse exit code {exit_code!r}")
        task = TaskState(_base_state(state, number, "sacct"), exit_code or None, elapsed or None, _node(node))
        states.update(dict.fromkeys(_task_keys(job_id, name, names, number, "sacct"), task))
    return states


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
    for number, (job_id, state, elapsed, node, name) in _rows(text, 5, "squeue", maxsplit=4):
        task = TaskState(_base_state(state, number, "squeue"), None, elapsed or None, _node(node))
        states.update(dict.fromkeys(_task_keys(job_id, name, names, number, "squeue"), task))
    return states


def reduce_cells(ledger: Ledger, states: Mapping[str, TaskState]) -> list[CellStatus]:
    """The status of every cell in `ledger`: the state of its latest attempt.

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
        is absent from `states` is `CANCELLED` when the ledger records that `cancel` cancelled it,
        else `NOT_FOUND`.
    """
    arrays = {array.name: array for array in all_arrays(ledger)}
    statuses = []
    for cell in sorted(ledger.cells):
        cell_attempts = ledger.cells[cell]
        latest = cell_attempts[-1]
        job_id = arrays[latest.array].job_id
        if job_id is None:
            task = TaskState(UNCONFIRMED)
        else:
            # Rows without an index: submitit submits a one-task "array" as a plain job, and sacct
            # shows a whole array as one row until the controller splits it into tasks.
            task = states.get(f"{job_id}_{latest.index}") or states.get(job_id)
            if task is None:
                # A task cancelled before it started leaves no row in sacct (and leaves squeue):
                # the ledger's note of the cancel is all there is.
                task = TaskState(CANCELLED if latest.cancelled else NOT_FOUND)
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
            )
        )
    return statuses


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


def totals(statuses: Iterable[CellStatus]) -> dict[str, int]:
    """Number of cells per state, by state name."""
    return dict(sorted(Counter(status.state for status in statuses).items()))


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
    for chunk in _chunks(list(names)):
        command = ["sacct", "-X", "--parsable2", "--noheader", "-o", SACCT_FORMAT, "-j", ",".join(chunk)]
        if starttime is not None:
            command += ["--starttime", starttime]
        states.update(_parse_output(command, runner, functools.partial(parse_sacct, names=names)))
    return states


def query_squeue(names: Mapping[str, str], *, runner: Runner = subprocess.run) -> dict[str, TaskState]:
    """Ask squeue for the tasks of the given array jobs (id -> name) still known to the controller.

    The fallback when there is no accounting. It lists all the user's jobs (``--me``) and keeps the
    given ones, because ``squeue -j`` fails outright when a single requested job has left the queue.
    ``--states=all`` includes tasks that ended in the last few minutes (slurm.conf MinJobAge); older
    tasks are simply absent.

    Raises
    ------
    SchedulerError
        As `query_sacct`.
    """
    command = ["squeue", "--me", "--array", "--noheader", "--states=all", "-o", SQUEUE_FORMAT]
    return _parse_output(command, runner, functools.partial(parse_squeue, names=names)) if names else {}


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
    for chunk in _chunks(names):
        command = ["sacct", "-X", "--parsable2", "--noheader", "-o", "JobID,JobName"]
        command += [f"--name={','.join(chunk)}", "--starttime", starttime]
        found.update(_parse_output(command, runner, functools.partial(_parse_names, wanted=set(chunk))))
    return {name: sorted(ids, key=int) for name, ids in sorted(found.items())}


def find_queued_jobs_by_name(names: Sequence[str], *, runner: Runner = subprocess.run) -> dict[str, list[str]]:
    """As `find_jobs_by_name`, from squeue: the controller's own queue, which knows an array the
    moment sbatch is accepted (sacct lags) and works without accounting. Jobs that ended more than
    a few minutes ago (slurm.conf MinJobAge) are no longer listed.
    """
    found: dict[str, set[str]] = {}
    for chunk in _chunks(names):
        command = ["squeue", "--me", "--noheader", "--states=all", "-o", "%i|%j",
                   f"--name={','.join(chunk)}"]
        parse = functools.partial(_parse_names, wanted=set(chunk), source="squeue")
        for name, ids in _parse_output(command, runner, parse).items():
            found.setdefault(name, set()).update(ids)
    return {name: sorted(ids, key=int) for name, ids in sorted(found.items())}


def accounting_disabled(error: SchedulerError) -> bool:
    """Did sacct fail because the cluster keeps no accounting (or sacct is not installed)?"""
    return isinstance(error, SchedulerMissing) or "accounting storage is disabled" in str(error).lower()


def _parse_names(text: str, wanted: set[str], source: str = "sacct") -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    # Split once: JobName is last and may itself contain "|".
    for number, (job_id, name) in _rows(text, 2, source, maxsplit=1):
        match = _JOB_ID.fullmatch(job_id)
        if match is None:
            raise SchedulerError(f"{source} line {number}: cannot parse job id {job_id!r}")
        if name in wanted:
            found.setdefault(name, set()).add(match["job"])
    return found


def _refusal_reason(status: CellStatus, wanted: frozenset[str], max_attempts: int) -> str | None:
    if status.state in wanted:
        if status.attempt >= max_attempts:
            return f"reached the attempt cap ({status.attempt} of {max_attempts})"
        return None
    if status.state in TERMINAL_FAILURES:
        return f"{status.state} is not among the selected states ({', '.join(sorted(wanted))})"
    if status.state == COMPLETED:
        return "already COMPLETED"
    if status.state == UNCONFIRMED:
        return f"array {status.array_name} has no recorded job id; run status to recover it first"
    if status.state == NOT_FOUND:
        return f"the scheduler has no record of task {status.task_id}"
    return f"latest attempt is {status.state}, not a terminal failure"


def _rows(text: str, n_fields: int, source: str, maxsplit: int = -1) -> Iterator[tuple[int, list[str]]]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("|", maxsplit)
        if len(fields) != n_fields:
            raise SchedulerError(f"{source} line {number}: expected {n_fields} '|'-separated fields: {line!r}")
        yield number, [field.strip() for field in fields]


def _task_keys(job_id: str, name: str, names: Mapping[str, str], number: int, source: str) -> list[str]:
    """The task keys a row stands for; none for a step row or a row of a job not in `names`."""
    match = _JOB_ID.fullmatch(job_id)
    if match is None:
        raise SchedulerError(f"{source} line {number}: cannot parse job id {job_id!r}")
    job = match["job"]
    if names.get(job) != name:
        return []
    if match["step"] is not None:
        # A step row (sacct without -X) repeats its job's state; the job row is what counts.
        return []
    if match["index"] is not None:
        return [f"{job}_{int(match['index'])}"]
    if match["ranges"] is None:
        return [job]
    keys = []
    for part in match["ranges"].split(","):
        bounds = _RANGE.fullmatch(part)
        if bounds is None:
            raise SchedulerError(f"{source} line {number}: cannot parse array range {part!r} in {job_id!r}")
        first = int(bounds["first"])
        last = int(bounds["last"] or first)
        keys += [f"{job}_{index}" for index in range(first, last + 1, int(bounds["step"] or 1))]
    return keys


def _base_state(state: str, number: int, source: str) -> str:
    base = state.split(" ", 1)[0]
    if not _STATE.fullmatch(base):
        raise SchedulerError(f"{source} line {number}: cannot parse state {state!r}")
    return base


def _node(node: str) -> str | None:
    return None if node in _NO_NODE else node


def _chunks(items: Sequence[str]) -> Iterator[list[str]]:
    unique = list(dict.fromkeys(items))
    for start in range(0, len(unique), MAX_IDS_PER_CALL):
        yield unique[start : start + MAX_IDS_PER_CALL]


def _parse_output(command: list[str], runner: Runner, parse: Callable[[str], dict]) -> dict:
    """Run `command` and parse its stdout, turning every way of failing into a SchedulerError."""
    shown = shlex.join(command)
    # Without this, SLURM cuts long task ranges to 64 characters and the cut text cannot be parsed.
    env = {**os.environ, "SLURM_BITSTR_LEN": "0"}
    try:
        result = runner(command, capture_output=True, text=True, env=env, timeout=SCHEDULER_TIMEOUT_S, check=False)
    except FileNotFoundError:
        raise SchedulerMissing(f"{command[0]} is not installed or not on PATH (ran: {shown})") from None
    except subprocess.TimeoutExpired:
        raise SchedulerError(f"{shown} did not answer within {SCHEDULER_TIMEOUT_S} s") from None
    except OSError as exc:
        raise SchedulerError(f"cannot run {shown}: {exc}") from exc
    stderr = (result.stderr or "").strip()
    # Accounting trouble shows up on stderr ("sacct: error: Problem talking to the database"); do not
    # trust the exit status alone, or rows missing for that reason would read as NOT_FOUND.
    if result.returncode != 0 or "error:" in stderr:
        raise SchedulerError(f"{shown} failed (exit status {result.returncode}): {stderr or 'no error output'}")
    try:
        return parse(result.stdout)
    except SchedulerError as exc:
        raise SchedulerError(f"{shown}: {exc}") from exc
