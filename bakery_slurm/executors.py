"""Job arrays: the only module that imports submitit.

`group_cells` (pure) puts cells with equal resources into one array each, split so no array
exceeds the cluster's MaxArraySize (submitit submits whatever it is given as one array).
`SlurmBackend` submits an array with one `sbatch` through submitit, `LocalBackend` through the
embedded local executor; both return the array's job id, read task states, cancel tasks and
locate logs, as the `Backend` protocol documents.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence, runtime_checkable

from . import array_task, fsutil, local
from .errors import CancelRefused, SchedulerError, SchedulerMissing
from .ledger import ArrayRecord
from .matrix import Cell, Resources
from .sacct import accounting_disabled, find_jobs_by_name, query_sacct
from .slurm_commands import SCHEDULER_TIMEOUT_S, Runner, TaskState, task_row
from .squeue import controller_view, find_queued_jobs_by_name, needs_controller, query_squeue
from .task_command import LAUNCHER_NAME

DEFAULT_MAX_ARRAY_SIZE = 1001  # SLURM's default MaxArraySize (highest index 1000)
# Resource fields -> submitit SlurmExecutor parameters (time is handled apart: minutes).
SUBMITIT_KEYS = ("partition", "account", "qos", "constraint", "gpus_per_node", "cpus_per_task",
                 "mem")


def group_cells(cells: Sequence[Cell], max_array_size: int) -> list[list[Cell]]:
    """Cells grouped by identical resources (first-seen order), each group cut into chunks of at
    most `max_array_size` tasks."""
    groups: dict[str, list[Cell]] = {}
    for cell in cells:
        groups.setdefault(cell.resources.model_dump_json(), []).append(cell)
    return [group[i:i + max_array_size] for group in groups.values()
            for i in range(0, len(group), max_array_size)]


def parse_max_array_size(text: str) -> int:
    """The most tasks one array may have, from `scontrol show config` output.

    MaxArraySize bounds the task index (0 .. MaxArraySize - 1, and submitit numbers tasks from
    0); SchedulerParameters' `max_array_tasks` bounds the number of tasks and may be lower
    (slurm.conf(5): max_array_tasks=1000 with MaxArraySize=100001). MaxArraySize = 0 disables
    arrays: then one cell per job, which submitit submits as a plain job.
    """
    match = re.search(r"^MaxArraySize\s*=\s*(\d+)", text, re.MULTILINE)
    if match is None:
        raise SchedulerError("scontrol show config printed no MaxArraySize")
    size = int(match.group(1))
    params = re.search(r"^SchedulerParameters\s*=(.*)$", text, re.MULTILINE)
    tasks = re.search(r"(?:^|,)\s*max_array_tasks=(\d+)", params.group(1)) if params else None
    if tasks is not None:
        size = min(size, int(tasks.group(1)))
    return max(size, 1)


def hides_others_jobs(text: str) -> bool:
    """Does the controller hide other users' jobs (`PrivateData` holds `jobs`), from `scontrol
    show config` output? Then squeue (and, set so in slurmdbd.conf too, sacct) show a user only
    their own jobs."""
    match = re.search(r"^PrivateData\s*=(.*)$", text, re.MULTILINE)
    return bool(match) and "jobs" in {v.strip().lower() for v in match.group(1).split(",")}


def dependency(after: ArrayRecord, after_indices: Sequence[int], n_tasks: int) -> str:
    """sbatch's --dependency for an array whose task i waits for task `after_indices[i]` of the
    array `after` (confirmed): `aftercorr` (task i after task i) for a whole array chained task
    by task, else `afterok` on the one task a single-task array waits for. submitit submits a
    one-task array as a plain job, whose id has no `_<index>`. (A dry run shows an array not
    yet submitted by its name.)"""
    job = after.job_id or after.name
    if len(after.cells) == 1:
        return f"afterok:{job}"
    if n_tasks == 1:
        return f"afterok:{job}_{after_indices[0]}"
    if list(after_indices) != list(range(n_tasks)):
        raise ValueError(f"tasks {list(after_indices)} of {after.name} do not correspond to "
                         f"tasks 0..{n_tasks - 1}: chain them one job each")
    return f"aftercorr:{job}"


def slurm_parameters(request: SubmitRequest) -> dict[str, Any]:
    """submitit SlurmExecutor parameters for one array (None values left to the cluster).

    An eval array gets its dependency, and `--kill-on-invalid-dep=yes`: when the merge it waits
    for fails, the scheduler cancels it instead of leaving it pending forever."""
    resources = request.resources
    values = resources.model_dump()
    params = {key: values[key] for key in SUBMITIT_KEYS if values[key] is not None}
    if request.after is not None:
        params["dependency"] = dependency(request.after, request.array.after_indices or [],
                                          len(request.array.cells))
        params["additional_parameters"] = {"kill-on-invalid-dep": "yes"}
    return {**params, "time": resources.time_min, "job_name": request.array.name,
            "array_parallelism": request.parallelism}


@dataclass(frozen=True)
class SubmitRequest:
    """Everything needed to start one array: its ledger record and each task's command.

    Attributes
    ----------
    cell_args
        Per task, the arguments of `python -m bakery_slurm` (`task_command.cell_args`).
    argvs
        Per task, the whole command (`task_command.task_argv`): what the local executor runs.
    fixed_env
        The runtime's fixed environment, for a task without a container (apptainer gets it as
        `--env`, in the launcher).
    launcher
        The script that starts submitit's runner inside the image (apptainer runtime), or None:
        the runner is then this Python.
    after
        The merge array this (eval) array's tasks wait for (`array.after_indices` says which
        task each waits for); its job id is known by the time this array is submitted.
    """

    array: ArrayRecord
    cell_args: list[list[str]]
    argvs: list[list[str]]
    fixed_env: dict[str, str]
    launcher: str | None
    pass_env: list[str]
    container: str
    parallelism: int
    resources: Resources
    after: ArrayRecord | None = None

    @property
    def launcher_path(self) -> Path:
        return Path(self.array.folder).expanduser().absolute() / LAUNCHER_NAME

    @property
    def python(self) -> str:
        """What the sbatch script runs `-u -m submitit.core._submit FOLDER` with."""
        return shlex.quote(str(self.launcher_path) if self.launcher else sys.executable)


@runtime_checkable
class Backend(Protocol):
    """What submit, status, resubmit, cancel and logs need from an executor; `SlurmBackend` and
    `LocalBackend` are the two. Each array is known by its ledger record (`ArrayRecord`): its
    unique job name before it has a job id, both after.

    Attributes
    ----------
    name
        The executor's name in the ledger (``"slurm"``, ``"local"``).
    """

    name: str

    def max_array_size(self) -> int:
        """The most tasks one array may have here."""

    def render(self, request: SubmitRequest) -> str:
        """What `submit` would run for `request`, for --dry-run; submits nothing."""

    def submit(self, request: SubmitRequest) -> str:
        """Start the array; return its job id. Raises SchedulerError when it was refused, and
        OSError only when the array's own files (folder, launcher) could not be written: before
        anything reached the scheduler."""

    def states(self, arrays: Sequence[ArrayRecord], starttime: str | None) -> tuple[dict[str, TaskState], str]:
        """Task states ("<job id>_<index>" -> TaskState) of the confirmed `arrays`, and where they
        came from. Raises SchedulerError when the scheduler cannot be asked."""

    def recover(self, names: Sequence[str], starttime: str) -> dict[str, list[str]]:
        """Job ids of arrays by job name, for arrays whose id was never recorded."""

    def find_by_name(self, name: str) -> str | None:
        """The job id of the array called `name` if the scheduler has it now (after a failed
        submit that may have been accepted)."""

    def cancel(self, tasks: Sequence[tuple[ArrayRecord, int]]) -> None:
        """Cancel these (array, index) tasks."""

    def log_paths(self, array: ArrayRecord, index: int) -> tuple[Path, Path]:
        """The stdout and stderr files of one task."""


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    """This process's environment with `values` over it for the block: submitit's sbatch call
    takes no environment of its own."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class SlurmBackend:
    """The `Backend` for SLURM: sbatch through submitit, sacct (or squeue), scancel."""

    name = "slurm"

    def __init__(self, runner: Runner = subprocess.run):
        self.runner = runner

    def max_array_size(self) -> int:
        return parse_max_array_size(self._config())

    def hides_others_jobs(self) -> bool:
        """Whether this user sees only their own jobs (`hides_others_jobs`); root sees all."""
        return os.getuid() != 0 and hides_others_jobs(self._config())

    def _config(self) -> str:
        try:
            return self.runner(["scontrol", "show", "config"], capture_output=True, text=True,
                               timeout=SCHEDULER_TIMEOUT_S, check=True).stdout
        except (OSError, subprocess.SubprocessError) as e:
            raise SchedulerError(f"scontrol show config failed: {e}") from None

    def render(self, request: SubmitRequest) -> str:
        """The sbatch script submitit would write for this array (for --dry-run).

        Works without SLURM on this machine: submitit's SlurmExecutor refuses to be built where
        `srun` is missing, so its task command is formed here exactly as its
        `_submitit_command_str` forms it. A one-task array is submitted by submitit as a plain
        job, so it is rendered without `--array`.
        """
        from submitit.slurm.slurm import _make_sbatch_string

        folder = Path(request.array.folder).expanduser().absolute()
        command = " ".join([request.python, "-u -m submitit.core._submit", shlex.quote(str(folder))])
        params = slurm_parameters(request)
        n = len(request.argvs)
        return _make_sbatch_string(command=command, folder=folder,
                                   map_count=n if n > 1 else None, **params)

    def submit(self, request: SubmitRequest) -> str:
        """sbatch the array through submitit; its job id.

        In a group's setgid work folder, the array's folder, what submitit writes there and the
        log files SLURM opens get the group access the folder gives, whatever this user's umask
        (`fsutil.creating_umask`; sbatch passes `SLURM_UMASK` on to the job), so that a
        teammate's `status` and `logs` can read them."""
        import submitit

        folder = Path(request.array.folder).expanduser().absolute()
        fsutil.make_folder(folder)
        if request.launcher:
            fsutil.atomic_write_text(request.launcher_path, request.launcher, executable=True)
        try:
            # submitit refuses to build a SlurmExecutor (RuntimeError) where srun is missing.
            executor = submitit.SlurmExecutor(folder=request.array.folder, python=request.python)
        except RuntimeError as e:
            raise SchedulerError(f"cannot submit to SLURM here: {e}") from None
        executor.update_parameters(**slurm_parameters(request))
        n = len(request.cell_args)
        # run_task is pickled by reference (bakery_slurm.array_task.run_task), not as bytecode:
        # the Python that unpickles it is the image's, whatever the login node runs.
        task_env = {**({} if request.launcher else request.fixed_env),
                    array_task.TASK_UMASK: f"{fsutil.umask():04o}"}
        try:
            with _environment(SLURM_UMASK=f"{fsutil.creating_umask(folder):04o}"):
                jobs = executor.map_array(array_task.run_task, request.cell_args, [task_env] * n)
        # sbatch refusing (bad partition, account, ...) is FailedJobError, an UncompletedJobError.
        except (submitit.core.utils.FailedSubmissionError, submitit.core.utils.UncompletedJobError,
                OSError) as e:
            raise SchedulerError(f"sbatch failed for array {request.array.name}: {e}") from None
        finally:
            fsutil.share_tree(folder)  # submitit's script and pickles, written under the umask
        return jobs[0].job_id.split("_")[0]

    def states(self, arrays: Sequence[ArrayRecord], starttime: str | None) -> tuple[dict[str, TaskState], str]:
        """Task states of `arrays` from one sacct call, or squeue when there is no accounting.

        Returns the states and their source ("sacct" or a note on the fallback).
        """
        names = {a.job_id: a.name for a in arrays if a.job_id}
        if not names:
            return {}, "sacct"
        try:
            states = query_sacct(names, starttime, runner=self.runner)
        except SchedulerError as e:
            if not accounting_disabled(e):
                raise
            why = "sacct is not installed" if isinstance(e, SchedulerMissing) else "SLURM accounting is disabled"
            return self._fallback(names, why)
        # Accounting lags the controller (slurmdbd behind or down, its records lost): the queue
        # has the last word on tasks sacct has no row for, or one that may be out of date. A task
        # neither lists, or that sacct shows live and the queue no longer has, has ended
        # (`status_snapshot` reads how), so a queue that cannot be asked is an error.
        tasks = [(a, i) for a in arrays if a.job_id for i in range(len(a.cells))
                 if needs_controller(task_row(states, a.job_id, i))]
        if tasks:
            queue = query_squeue({a.job_id: a.name for a, _ in tasks}, runner=self.runner)
            views = {a.task_id(i): controller_view(task_row(states, a.job_id, i),
                                                   task_row(queue, a.job_id, i)) for a, i in tasks}
            states = {**states, **{key: view for key, view in views.items() if view is not None}}
        return states, "sacct"

    def _fallback(self, names: dict[str, str], why: str) -> tuple[dict[str, TaskState], str]:
        return (query_squeue(names, runner=self.runner),
                f"squeue + completion markers ({why}; finished tasks are read from result.json)")

    def recover(self, names: Sequence[str], starttime: str) -> dict[str, list[str]]:
        """Array job ids by job name: from accounting, and from the queue for any name that
        accounting does not know (yet: sacct lags sbatch; or at all: no accounting). A job the
        queue lists is never given up as lost."""
        try:
            found = find_jobs_by_name(names, starttime, runner=self.runner)
        except SchedulerError as e:
            if not accounting_disabled(e):
                raise
            found = {}
        missing = [name for name in names if name not in found]
        return {**found, **(find_queued_jobs_by_name(missing, runner=self.runner) if missing else {})}

    def find_by_name(self, name: str) -> str | None:
        """The job id of the array called `name` if the controller's queue has it: what an sbatch
        that failed after the controller accepted the job leaves behind."""
        ids = find_queued_jobs_by_name([name], runner=self.runner).get(name)
        return ids[-1] if ids else None

    def cancel(self, tasks: Sequence[tuple[ArrayRecord, int]]) -> None:
        """One scancel for every (array, index) given.

        Raises
        ------
        CancelRefused
            scancel refused some tasks by id (another user's: it cancels the others, names each
            refused one, "... job id 200: Access/permission denied", and exits non-zero).
        SchedulerError
            scancel failed otherwise: no task is known to be cancelled.
        """
        ids = {a.task_id(i): (a.name, i) for a, i in tasks}
        if not ids:
            return
        command = ["scancel", *ids]
        try:
            self.runner(command, capture_output=True, text=True, timeout=SCHEDULER_TIMEOUT_S,
                        check=True)
        except subprocess.CalledProcessError as e:
            message = f"{' '.join(command)} failed: {e.stderr.strip()}"
            refused = {ids[task] for task in re.findall(r"job id (\S+?):", e.stderr or "") if task in ids}
            if refused:
                raise CancelRefused(message, frozenset(refused)) from None
            raise SchedulerError(message) from None
        except (OSError, subprocess.SubprocessError) as e:
            raise SchedulerError(f"{' '.join(command)} failed: {e}") from None

    @staticmethod
    def log_paths(array: ArrayRecord, index: int) -> tuple[Path, Path]:
        """submitit's log files of one task (`JobPaths(folder, "<job>_<i>", 0).stdout/.stderr`),
        spelled out: `status` asks for 10,000 of them and JobPaths costs ~0.1 ms each."""
        stem = f"{array.folder}/{array.task_id(index)}_0_log"
        return Path(stem + ".out"), Path(stem + ".err")


class LocalBackend:
    """The `Backend` for this machine: the embedded local executor (`local`)."""

    name = "local"

    @staticmethod
    def max_array_size() -> int:
        return sys.maxsize

    @staticmethod
    def render(request: SubmitRequest) -> str:
        return (f"# local array {request.array.name}: {len(request.argvs)} tasks, at most "
                f"{request.parallelism} at once, time limit {request.resources.time_min} min\n")

    @staticmethod
    def submit(request: SubmitRequest) -> str:
        job_id = "local-" + request.array.name.split("-", 1)[1]
        after = request.after
        waits = ([{"folder": after.folder, "job_id": after.job_id, "index": i}
                  for i in request.array.after_indices or []] if after else None)
        return local.submit(Path(request.array.folder), job_id, request.argvs, request.pass_env,
                            request.container, request.parallelism, request.resources.time_min,
                            waits)

    @staticmethod
    def states(arrays: Sequence[ArrayRecord], starttime: str | None) -> tuple[dict[str, TaskState], str]:
        states: dict[str, TaskState] = {}
        for array in arrays:
            if array.job_id:
                states.update(local.read_states(Path(array.folder), array.job_id))
        return states, "local"

    @staticmethod
    def recover(names: Sequence[str], starttime: str) -> dict[str, list[str]]:
        return {}  # no scheduler knows a local array by name: `started` finds it by its folder

    @staticmethod
    def started(arrays: Sequence[ArrayRecord]) -> dict[str, str]:
        """Job ids of the unconfirmed `arrays` whose supervisor was started: a submit
        interrupted (Ctrl-C) before the ledger recorded the id leaves it running all the same."""
        found = {a.name: local.started_job_id(Path(a.folder)) for a in arrays}
        return {name: job_id for name, job_id in found.items() if job_id}

    @staticmethod
    def find_by_name(name: str) -> str | None:
        return None  # a local submit that fails started nothing

    @staticmethod
    def cancel(tasks: Sequence[tuple[ArrayRecord, int]]) -> None:
        for array, index in tasks:
            local.cancel(Path(array.folder), [index])

    @staticmethod
    def log_paths(array: ArrayRecord, index: int) -> tuple[Path, Path]:
        return local.log_paths(Path(array.folder), index)


def backend(name: str) -> Backend:
    return SlurmBackend() if name == "slurm" else LocalBackend()


def resolve_executor(requested: str) -> str:
    """auto -> slurm when sbatch is on PATH, else local."""
    if requested != "auto":
        return requested
    return "slurm" if shutil.which("sbatch") else "local"
