"""The embedded local executor: job arrays on this machine, for laptops, the demo and tests.

submitit's LocalExecutor starts every task at once, ignores the time limit we ask for, and a job
rebuilt in a later process cannot tell running from dead (submitit 1.5.4). This one is a detached
supervisor process per array that runs at most `parallelism` tasks at a time, ends a task at its
time limit (TIMEOUT) or cancel as SLURM does (SIGTERM, SIGKILL `KILL_WAIT_S` later, to every
process the task started), and keeps one state file per task, so `status` in any later process can tell
PENDING, RUNNING, COMPLETED, FAILED, TIMEOUT and CANCELLED apart, and reports a task whose process
(or supervisor) died without a word as NODE_FAIL.

Across arrays, at most `MachineSlots.count` local tasks of this user run on this machine at once
(`BAKERY_LOCAL_MAX_TASKS`, default the CPUs this process may use): two submits, a merge array and
its eval array, or several resource groups would otherwise each run `parallelism` tasks, and a
laptop runs out of memory. A slot is a lock file under a per-user, per-host folder
(`BAKERY_LOCAL_SLOTS_DIR`, default ~/.cache/bakery-slurm/local-slots/HOST), locked (flock,
non-blocking) on a descriptor that the supervisor and its task share: the slot stays taken for as
long as either lives, so a task that runs on after its supervisor was killed still counts, and
the kernel frees it once both have ended, however they end. A task takes a slot only once it may
start: a task waiting for another task holds none, so an eval never keeps its merge from
starting.

A task may wait for a task of another local array (an eval for its cell's merge, as SLURM's
`aftercorr`/`afterok`): it starts once that one is COMPLETED, and is CANCELLED, with the reason in
its stderr log, once that one ended otherwise (as SLURM's `--kill-on-invalid-dep=yes`).

A supervisor starts no task before `submit` has recorded it (supervisor.json), so a submit that
dies while starting it leaves nothing running unseen.

Layout of an array folder: array.json (what to run), supervisor.json (its pid), supervisor.log
(its own errors), and per task i: i.state.json, i.out, i.err, and i.cancel when a cancel was
requested. Slot folder: slot-<n>.lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, Iterable, Mapping, Sequence

from . import fsutil
from .errors import SchedulerError
from .slurm_commands import TaskState
from .task_command import task_environment

POLL_S = 0.2  # how often the supervisor checks its children, deadlines and cancel requests
# From SIGTERM to SIGKILL, for a cancelled task or one at its time limit: SLURM's default KillWait.
KILL_WAIT_S = 30
MAX_TASKS_ENV = "BAKERY_LOCAL_MAX_TASKS"  # the machine-wide cap on running local tasks
SLOTS_DIR_ENV = "BAKERY_LOCAL_SLOTS_DIR"  # where its slots are kept


@dataclass(frozen=True)
class MachineSlots:
    """The machine-wide cap: at most `count` local tasks run at once, one per lock file
    slot-<n>.lock in `folder`, whatever array they belong to."""

    folder: Path
    count: int


def machine_slots(env: Mapping[str, str], cpus: int, host: str, home: Path) -> MachineSlots:
    """The slots every local array of this user on this host shares, as `env` sets them.

    The folder is per host: a home folder shared by several login nodes (NFS) must not make one
    node's tasks count against another's."""
    value = env.get(MAX_TASKS_ENV, "").strip()
    if value and not (value.isdigit() and int(value) >= 1):
        raise SchedulerError(f"{MAX_TASKS_ENV} must be a whole number of at least 1 (the most "
                             f"local tasks that run at once on this machine), got {value!r}")
    cache = Path(env["XDG_CACHE_HOME"]) if env.get("XDG_CACHE_HOME") else home / ".cache"
    folder = (Path(env[SLOTS_DIR_ENV]) if env.get(SLOTS_DIR_ENV)
              else cache / "bakery-slurm" / "local-slots" / host)
    return MachineSlots(folder.expanduser().absolute(), int(value) if value else cpus)


def this_machine_slots() -> MachineSlots:
    """`machine_slots` of this process's environment, CPUs (those it may use), host and home."""
    cpus = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else os.cpu_count() or 1)
    return machine_slots(os.environ, cpus, socket.gethostname(), Path.home())


def submit(folder: Path, job_id: str, argvs: list[list[str]], pass_env: list[str],
           container: str, parallelism: int, time_min: int,
           after: list[dict[str, Any]] | None = None) -> str:
    """Write the array description and start its supervisor, detached; return `job_id`.

    `after`, per task: the task it waits for, {"folder", "job_id", "index"} of a local array.
    The machine's slots are resolved here, from this environment, and recorded: an invalid
    `BAKERY_LOCAL_MAX_TASKS` (SchedulerError) starts nothing."""
    slots = this_machine_slots()
    fsutil.make_folder(folder)
    fsutil.atomic_write_json(folder / "array.json", {
        "job_id": job_id, "argvs": argvs, "pass_env": pass_env, "container": container,
        "parallelism": parallelism, "time_limit_s": time_min * 60, "kill_wait_s": KILL_WAIT_S,
        "after": after, "slots": {"folder": str(slots.folder), "count": slots.count}})
    for index in range(len(argvs)):
        _write_state(folder, index, "PENDING")
    with _open_log(folder / "supervisor.log") as log:
        process = subprocess.Popen([sys.executable, "-m", "bakery_slurm.local", str(folder),
                                    str(os.getpid())],
                                   stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                   start_new_session=True)
    try:
        fsutil.atomic_write_json(folder / "supervisor.json",
                                 {"pid": process.pid, "host": socket.gethostname(),
                                  "identity": _process_identity(process.pid)})
    except BaseException:
        # Without its pid no status could tell it runs: stop it, which has started no task yet
        # (`recorded`), so that a submit failing with OSError (or interrupted) started nothing
        # (`Backend.submit`, `started_job_id`).
        process.kill()
        process.wait()
        raise
    return job_id


def started_job_id(folder: Path) -> str | None:
    """The job id of the array in `folder` if its supervisor was started (its pid recorded),
    whether or not the submit that started it lived to record the id in the ledger."""
    spec = _read_json(folder / "array.json")
    return spec["job_id"] if spec and (folder / "supervisor.json").exists() else None


def read_states(folder: Path, job_id: str) -> dict[str, TaskState]:
    """{"<job_id>_<i>": TaskState} for every task of the array in `folder`."""
    # Asked before any state file is read: if the supervisor was alive then, it will still record
    # the outcome of every task; if it was dead, the state files are already final.
    supervisor_alive = _alive(_read_json(folder / "supervisor.json"))
    states = {}
    for path in sorted(folder.glob("*.state.json")):
        index = path.name.split(".")[0]
        record = _read_json(path) or {"state": "PENDING"}
        state = record["state"]
        live = state in ("PENDING", "RUNNING")
        # A live state that no process will ever finish: the task (and its supervisor) died. A
        # task that has exited but that its live supervisor has not yet reaped and recorded
        # (up to POLL_S) is still RUNNING, not dead.
        if live and not (supervisor_alive or (state == "RUNNING" and _alive(record))):
            state = "NODE_FAIL"
        # When a task that died without a word ended is not known (after a reboot, days may
        # have passed): no elapsed rather than one that grows with every reading.
        elapsed = None if state == "NODE_FAIL" else _elapsed(record)
        states[f"{job_id}_{index}"] = TaskState(
            state=state, exit_code=record.get("exit_code"), elapsed=elapsed,
            node=record.get("host"))
    return states


def cancel(folder: Path, indices: list[int]) -> None:
    """Ask the supervisor to cancel tasks; a running task's process group gets SIGTERM now (its
    supervisor sends SIGKILL `kill_wait_s` later if it has not ended)."""
    for index in indices:
        fsutil.atomic_write_text(folder / f"{index}.cancel", "")
        record = _read_json(folder / f"{index}.state.json") or {}
        # Only a process of this host can be signalled here; elsewhere its supervisor sees the
        # cancel file and signals it.
        if (record.get("state") == "RUNNING" and record.get("host") == socket.gethostname()
                and _alive(record)):
            try:
                os.killpg(record["pid"], signal.SIGTERM)
            except ProcessLookupError:
                pass


def log_paths(folder: Path, index: int) -> tuple[Path, Path]:
    return folder / f"{index}.out", folder / f"{index}.err"


# ---------------------------------------------------------------------------------------------
# The supervisor (runs detached: python -m bakery_slurm.local FOLDER SUBMIT_PID)


@dataclass
class _Running:
    """A started task: its process, the machine slot it holds (its number and the locked file),
    when its time limit is reached (monotonic seconds), and the last signal the supervisor sent
    it, SIGKILL following SIGTERM `kill_wait_s` later."""

    process: subprocess.Popen
    slot: tuple[int, int]
    deadline: float
    timed_out: bool = False
    sent: int | None = None
    kill_at: float | None = None


def next_starts(pending: Sequence[int], free: int,
                waited: Mapping[int, str]) -> tuple[list[int], dict[int, str]]:
    """What a supervisor round does with its pending tasks (pure).

    `waited` is the state of the task each pending one waits for (COMPLETED for one that waits
    for nothing); `free` is how many more of the array's own tasks may run. Returns the tasks to
    start, in order, at most `free` (each still needs a machine slot), and {index: state} of the
    tasks to cancel because the task they wait for ended otherwise. A task whose waited-for task
    is PENDING or RUNNING is in neither: it waits, holding no slot that the task it waits for may
    need."""
    ready = [i for i in pending if waited[i] == "COMPLETED"]
    never = {i: waited[i] for i in pending if waited[i] not in ("PENDING", "RUNNING", "COMPLETED")}
    return ready[:max(free, 0)], never


def take_slot(slots: MachineSlots) -> tuple[int, int] | None:
    """Lock a free slot of the machine: (its number, the open file holding the lock), or None
    when every slot is taken.

    flock, not lockf: an flock belongs to the open file, which the task inherits (`_start`), so
    it holds until the supervisor and the task have both closed it (ended); a lockf lock belongs
    to the process alone, and a killed supervisor would free the slot of a task still running.
    An flock also conflicts with the slots this process holds on other descriptors already."""
    slots.folder.mkdir(parents=True, exist_ok=True)
    for number in range(slots.count):
        fd = os.open(slots.folder / f"slot-{number}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        return number, fd
    return None


def supervise(folder: Path) -> None:
    """Run the array in `folder` to its end.

    A supervisor that cannot go on (a state file it cannot write: the disk is full) ends every
    task it started before it fails, its traceback in supervisor.log: a task it no longer
    watches, perhaps not even recorded as started, could be neither cancelled nor told apart
    from the attempt a resubmit starts. Ended, each reads NODE_FAIL, which is then true."""
    spec = json.loads((folder / "array.json").read_text())
    running: dict[int, _Running] = {}
    try:
        _run(folder, spec, running)
    except BaseException:
        _end_all(running.values(), spec["kill_wait_s"])
        with contextlib.suppress(OSError):  # the log may be on the full disk too
            print(f"bakery-slurm: the supervisor of {folder} failed; it ended its "
                  f"{len(running)} running tasks", file=sys.stderr, flush=True)
        raise


def _run(folder: Path, spec: dict[str, Any], running: dict[int, _Running]) -> None:
    """The supervisor's rounds, until every task has ended; `running` holds the tasks started
    and not yet recorded as ended."""
    pending = list(range(len(spec["argvs"])))
    env = task_environment(dict(os.environ), spec["pass_env"], spec["container"])
    after = spec.get("after")
    kill_wait_s = spec["kill_wait_s"]
    slots = MachineSlots(Path(spec["slots"]["folder"]), spec["slots"]["count"])
    while pending or running:
        for index in [i for i in pending if (folder / f"{i}.cancel").exists()]:
            pending.remove(index)
            _write_state(folder, index, "CANCELLED", exit_code="0:15")
        waited_states: dict[tuple[str, str], dict[str, TaskState]] = {}  # read once per round
        waited = {i: _dependency_state(after[i], waited_states) if after else "COMPLETED"
                  for i in pending}
        starts, never = next_starts(pending, spec["parallelism"] - len(running), waited)
        for index, state in never.items():
            pending.remove(index)
            _never_satisfied(folder, index, after[index], state)
        for index in starts:
            slot = take_slot(slots)
            if slot is None:
                break  # the machine runs as many local tasks as it may: wait for one to end
            pending.remove(index)
            process = _start(folder, index, spec["argvs"][index], env, spec["job_id"], slot[1])
            if process is None:
                os.close(slot[1])
                continue
            running[index] = _Running(process, slot, time.monotonic() + spec["time_limit_s"])
            # Recorded only once `running` holds it: should the write fail, `supervise` ends it.
            _write_state(folder, index, "RUNNING", pid=process.pid,
                         identity=_process_identity(process.pid), started=_now())
        for index, task in list(running.items()):
            now = time.monotonic()
            returncode = task.process.poll()
            if returncode is not None:
                # Its leftover processes end with it, as SLURM ends a task's cgroup. No new
                # process gets the group's id while the group has members.
                _signal_group(task.process, signal.SIGKILL)
                if task.timed_out:
                    _finish(folder, index, "TIMEOUT", f"0:{task.sent}")
                else:
                    state, exit_code = _outcome(folder, index, returncode)
                    if state == "FAILED" and returncode < 0:
                        _say(folder, index, f"bakery-slurm: {killed_by(-returncode)}")
                    _finish(folder, index, state, exit_code)
                os.close(task.slot[1])
                del running[index]
            elif task.kill_at is not None:
                if now > task.kill_at and task.sent != signal.SIGKILL:
                    task.sent = _signal_group(task.process, signal.SIGKILL)
            else:
                cancelled = (folder / f"{index}.cancel").exists()
                if cancelled or now > task.deadline:
                    # As scancel and SLURM's time limit: SIGTERM (run-cell ends through
                    # `finally`), SIGKILL KillWait later for a task that does not end (hung in
                    # native code, its Python handler never runs). `cancel` signalled it already
                    # on this host; this is for a cancel from another host, or one that came
                    # while the task was being started.
                    task.timed_out = not cancelled
                    task.sent = _signal_group(task.process, signal.SIGTERM)
                    task.kill_at = now + kill_wait_s
        time.sleep(POLL_S)


def _end_all(tasks: Iterable[_Running], kill_wait_s: float) -> None:
    """End the tasks still running as a cancel does (SIGTERM, then SIGKILL `kill_wait_s` later),
    wait for them, and free their machine slots."""
    tasks = list(tasks)
    live = [task.process for task in tasks if task.process.returncode is None]
    for process in live:
        _signal_group(process, signal.SIGTERM)
    deadline = time.monotonic() + kill_wait_s
    for process in live:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=max(deadline - time.monotonic(), 0))
        _signal_group(process, signal.SIGKILL)
        process.wait()
    for task in tasks:
        os.close(task.slot[1])


def _signal_group(process: subprocess.Popen, signum: int) -> int:
    """Send `signum` to the task's process group (its own session: the task and its children);
    return it."""
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:
        pass
    return signum


def _dependency_state(task: dict[str, Any],
                      seen: dict[tuple[str, str], dict[str, TaskState]]) -> str:
    """The state of the task waited for; PENDING while its array shows no state yet. `seen`
    keeps each waited-for array's states for the rest of one supervisor round."""
    key = (task["folder"], task["job_id"])
    if key not in seen:
        seen[key] = read_states(Path(task["folder"]), task["job_id"])
    state = seen[key].get(f"{task['job_id']}_{task['index']}")
    return state.state if state else "PENDING"


def _open_log(path: Path, mode: str = "ab") -> IO[Any]:
    """Open a log of the array for appending; one it creates gets the group access its folder
    gives (`fsutil.share`): a teammate's `logs` reads it, whatever this user's umask."""
    log = open(path, mode)
    try:
        fsutil.share(path)
    except BaseException:
        log.close()
        raise
    return log


def _never_satisfied(folder: Path, index: int, task: dict[str, Any], state: str) -> None:
    _say(folder, index, f"cancelled: the task it waits for, {task['job_id']}_{task['index']}, "
                        f"ended {state} (dependency never satisfied)")
    _write_state(folder, index, "CANCELLED", exit_code="0:0")


def _say(folder: Path, index: int, line: str) -> None:
    """Append the executor's word on task `index` to its stderr log, as slurmstepd does."""
    with _open_log(log_paths(folder, index)[1], "a") as stderr:
        stderr.write(line + "\n")


def killed_by(signum: int) -> str:
    """Why a task that neither its time limit nor a cancel ended died of signal `signum`.

    SLURM calls a task the OOM killer ended OUT_OF_MEMORY; here a SIGKILL from the OOM killer
    cannot be told from one sent by hand: the kernel counts OOM kills per cgroup (memory.events),
    not per process, and every local task shares its user's cgroup (on cgroup v1, or without the
    memory controller, nothing counts them). So both causes are named, and the state is FAILED."""
    try:
        name = signal.Signals(signum).name
    except ValueError:
        return f"killed by signal {signum}"
    if signum == signal.SIGKILL:
        name += ": out of memory, or killed by hand"
    return f"killed by signal {signum} ({name})"


def _start(folder: Path, index: int, argv: list[str], env: dict[str, str], job_id: str,
           slot_fd: int) -> subprocess.Popen | None:
    """Start task `index` (the caller records it RUNNING), holding the machine slot locked on
    `slot_fd` too (`take_slot`); a command that cannot start (e.g. no `apptainer` here) fails
    the task with the reason in its stderr log, as a shell would (exit 127), and returns None."""
    out, err = log_paths(folder, index)
    task_env = {**env, "BAKERY_LOCAL_JOB_ID": f"{job_id}_{index}"}
    with _open_log(out) as stdout, _open_log(err) as stderr:
        try:
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stdout,
                                       stderr=stderr, env=task_env, start_new_session=True,
                                       pass_fds=(slot_fd,))
        except OSError as e:
            stderr.write(f"cannot start {argv[0]}: {e}\n".encode())
            _write_state(folder, index, "FAILED", exit_code="127:0", started=_now(), ended=_now())
            return None
    return process


def _outcome(folder: Path, index: int, returncode: int) -> tuple[str, str]:
    if (folder / f"{index}.cancel").exists():
        return "CANCELLED", f"0:{-returncode if returncode < 0 else 0}"
    if returncode == 0:
        return "COMPLETED", "0:0"
    if returncode < 0:
        return "FAILED", f"0:{-returncode}"
    return "FAILED", f"{returncode}:0"


def _finish(folder: Path, index: int, state: str, exit_code: str) -> None:
    record = _read_json(folder / f"{index}.state.json") or {}
    _write_state(folder, index, state, exit_code=exit_code, started=record.get("started"),
                 ended=_now())


def _write_state(folder: Path, index: int, state: str, **fields: Any) -> None:
    fsutil.atomic_write_json(folder / f"{index}.state.json",
                             {"state": state, "host": socket.gethostname(), **fields})


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _alive(record: dict[str, Any] | None) -> bool:
    """Is the process in `record` ({"pid", "host", "identity"}) still running? Only answerable
    on its host."""
    if not record or "pid" not in record:
        return False
    if record.get("host") != socket.gethostname():
        return True  # another machine's process: we cannot tell, so do not call it dead
    try:
        os.kill(record["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # The pid may be another process's now (this one ended, or the machine rebooted since).
    identity = _process_identity(record["pid"])
    if record.get("identity") and identity and identity != record["identity"]:
        return False
    # A zombie (exited, not yet reaped by its parent) is dead for our purposes.
    try:
        return Path(f"/proc/{record['pid']}/stat").read_text().split()[2] != "Z"
    except (OSError, IndexError):
        return True


def _process_identity(pid: int) -> str | None:
    """What tells process `pid` apart from any later process given its pid: the boot's id and
    the process's start time since boot (/proc/PID/stat's field 22). None where /proc does not
    say (not Linux, or the process is gone): the pid alone is taken then."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        # The command name (field 2, in parentheses) may hold spaces: count from its end.
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return f"{boot}:{fields[19]}"
    except (OSError, IndexError):
        return None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _elapsed(record: dict[str, Any]) -> str | None:
    if not record.get("started"):
        return None
    start = datetime.fromisoformat(record["started"])
    end = datetime.fromisoformat(record["ended"]) if record.get("ended") else datetime.now(timezone.utc)
    return slurm_duration(int((end - start).total_seconds()))


def slurm_duration(seconds: int) -> str:
    """`seconds` as sacct prints an elapsed time: [D-]HH:MM:SS."""
    days, seconds = divmod(seconds, 86400)
    clock = f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
    return f"{days}-{clock}" if days else clock


def recorded(folder: Path, submitter: int) -> bool:
    """Wait until `submit` has recorded this supervisor's pid in supervisor.json: True; False
    once the process that started it (`submitter`) is gone without having recorded it.

    Until then the supervisor starts no task: one that no record names would run tasks that no
    status sees and no cancel reaches, beside the attempt a resubmit starts."""
    def names_me() -> bool:
        record = _read_json(folder / "supervisor.json")
        return bool(record) and record.get("pid") == os.getpid()

    while not names_me():
        if os.getppid() != submitter:  # reparented: the submit is gone
            return names_me()  # it may have recorded this one just before it ended
        time.sleep(POLL_S)
    return True


if __name__ == "__main__":
    if recorded(Path(sys.argv[1]), int(sys.argv[2])):
        supervise(Path(sys.argv[1]))
