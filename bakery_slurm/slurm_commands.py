"""Running SLURM's client commands and reading what they all print: the plumbing under `sacct`
and `squeue`.

`run_and_parse` runs one command through an injectable `runner` (`subprocess.run` or a stand-in)
and turns every way of failing (missing, timed out, failed, an error on stderr, unparsable text)
into `SchedulerError`: a scheduler that cannot be asked is never reported as a state. The parsers
here are pure: job ids and array ranges (``1234_[0,3-5:2%2]``), states, node lists, ``|``-separated
rows.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Sequence

from .errors import SchedulerError, SchedulerMissing

MAX_IDS_PER_CALL = 1000
"""Job ids (or names) per sacct call. 1000 ids make a ~10 kB ``-j`` argument, far below Linux's
128 kiB limit on one argument, and a 10,000-cell ledger over 100 arrays still needs one call."""

SCHEDULER_TIMEOUT_S = 120
"""sacct retries for minutes when slurmdbd is unreachable; give up and say so after this."""

Runner = Callable[..., "subprocess.CompletedProcess[str]"]

# `1234`, `1234_7`, or a compressed set of tasks `1234_[0,3-5,8-20:4%2]` (`:step` and `%throttle`
# are both printed by SLURM), optionally followed by a job step (`.batch`, `.0`).
_JOB_ID = re.compile(r"(?P<job>\d+)(?:_(?:(?P<index>\d+)|\[(?P<ranges>[0-9,:-]+)(?:%\d+)?\])|\+(?P<het>\d+))?(?:\.(?P<step>\w+))?")
_RANGE = re.compile(r"(?P<first>\d+)(?:-(?P<last>\d+)(?::(?P<step>\d+))?)?")
_STATE = re.compile(r"[A-Z_]+")
EXIT_CODE = re.compile(r"\d+:\d+")
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
    left_queue
        Accounting shows the task live (`state`), but the controller, asked too, no longer has
        it: it has ended, and accounting missed the end (`squeue.controller_view`).
    """

    state: str
    exit_code: str | None = None
    elapsed: str | None = None
    node: str | None = None
    left_queue: bool = False


def task_row(states: Mapping[str, TaskState], job_id: str, index: int) -> TaskState | None:
    """Task `index` of array `job_id` in `states` (keyed as `parse_sacct` keys them): its own row,
    else the job's row without an index (submitit submits a one-task "array" as a plain job, and
    sacct shows a whole array as one row until the controller splits it into tasks)."""
    return states.get(f"{job_id}_{index}") or states.get(job_id)


def parse_names(text: str, wanted: set[str], source: str = "sacct") -> dict[str, set[str]]:
    """``JobID|JobName`` rows -> {name: array job ids}, for the `wanted` names only."""
    found: dict[str, set[str]] = {}
    # Split once: JobName is last and may itself contain "|".
    for number, (job_id, name) in rows(text, 2, source, maxsplit=1):
        match = _JOB_ID.fullmatch(job_id)
        if match is None or (name in wanted and match["het"] is not None):
            raise SchedulerError(f"{source} line {number}: cannot parse job id {job_id!r}")
        if name in wanted:
            found.setdefault(name, set()).add(match["job"])
    return found


def rows(text: str, n_fields: int, source: str, maxsplit: int = -1) -> Iterator[tuple[int, list[str]]]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("|", maxsplit)
        if len(fields) != n_fields:
            raise SchedulerError(f"{source} line {number}: expected {n_fields} '|'-separated fields: {line!r}")
        yield number, [field.strip() for field in fields]


def task_keys(job_id: str, name: str, names: Mapping[str, str], number: int, source: str) -> list[str]:
    """The task keys a row stands for; none for a step row or a row of a job not in `names`."""
    match = _JOB_ID.fullmatch(job_id)
    if match is None:
        raise SchedulerError(f"{source} line {number}: cannot parse job id {job_id!r}")
    job = match["job"]
    if names.get(job) != name:
        return []
    if match["het"] is not None:
        # A heterogeneous job's component (`1234+0`) under our array's name: not ours to read.
        # (One under another name, a job that reused our id, was skipped above.)
        raise SchedulerError(f"{source} line {number}: cannot parse job id {job_id!r}")
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


def base_state(state: str, number: int, source: str) -> str:
    base = state.split(" ", 1)[0]
    if not _STATE.fullmatch(base):
        raise SchedulerError(f"{source} line {number}: cannot parse state {state!r}")
    return base


def node_list(node: str) -> str | None:
    """The node list as printed, None for a task that has not run."""
    return None if node in _NO_NODE else node


def chunks(items: Sequence[str]) -> Iterator[list[str]]:
    unique = list(dict.fromkeys(items))
    for start in range(0, len(unique), MAX_IDS_PER_CALL):
        yield unique[start : start + MAX_IDS_PER_CALL]


def run_and_parse(command: list[str], runner: Runner, parse: Callable[[str], dict]) -> dict:
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
