"""The embedded local executor for real, with tiny commands instead of bakery cells: the
parallelism cap, the machine-wide cap across arrays, the time limit, exit codes, cancel, dead
tasks, state keys and logs.

Conditions are awaited by polling with a bounded deadline; the tasks' own sleeps only keep them
busy, they never synchronise the test.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest

from bakery_slurm import fsutil, local
from bakery_slurm.errors import SchedulerError
from bakery_slurm.slurm_commands import TaskState
from support import wait_for

JOB = "local-0123abcd-0"
PY = sys.executable
LIVE = ("PENDING", "RUNNING")


# ---------------------------------------------------------------------------------------------
# Helpers




def states_of(folder: Path) -> dict[str, str]:
    return {key: s.state for key, s in local.read_states(folder, JOB).items()}


def all_done(folder: Path, n: int) -> dict[str, TaskState] | None:
    states = local.read_states(folder, JOB)
    if len(states) == n and all(s.state not in LIVE for s in states.values()):
        return states
    return None


def state_is(folder: Path, index: int, state: str) -> bool:
    return local.read_states(folder, JOB).get(f"{JOB}_{index}", TaskState("?")).state == state


def write_array(folder: Path, argvs: list[list[str]], parallelism: int, time_limit_s: float,
                kill_wait_s: float = local.KILL_WAIT_S) -> None:
    """What `local.submit` writes, with a time limit in seconds (the API takes minutes)."""
    folder.mkdir(parents=True, exist_ok=True)
    slots = local.this_machine_slots()
    (folder / "array.json").write_text(json.dumps({
        "job_id": JOB, "argvs": argvs, "pass_env": [], "container": "none",
        "parallelism": parallelism, "time_limit_s": time_limit_s, "kill_wait_s": kill_wait_s,
        "slots": {"folder": str(slots.folder), "count": slots.count}}))


def pid_alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (OSError, IndexError):
        return False


def sleeper(marker: Path, seconds: float = 60) -> list[str]:
    """A task that writes its pid to `marker` once it runs, then sleeps (as the same process)."""
    return ["sh", "-c", f'echo $$ > "{marker}"; exec sleep {seconds}']


@pytest.fixture
def folder(tmp_path):
    """The array folder; on teardown every process this test started in any array folder under
    tmp_path is killed, by pid (only processes whose command line names this test's tmp_path)."""
    path = tmp_path / "array"
    yield path
    pids = []
    for record in [*tmp_path.glob("*/supervisor.json"), *tmp_path.glob("*/*.state.json")]:
        try:
            pids.append(json.loads(record.read_text())["pid"])
        except (OSError, ValueError, KeyError):
            pass
    for marker in tmp_path.glob("*.pid"):
        try:
            pids.append(int(marker.read_text()))
        except (OSError, ValueError):
            pass
    for pid in pids:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        # our supervisor and `sh -c` tasks name tmp_path; an exec'd sleeper shows as `sleep 60`
        if pid_alive(pid) and (str(tmp_path) in cmdline or cmdline.startswith("sleep ")):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# ---------------------------------------------------------------------------------------------
# Tests


def interval_recorder(go: Path) -> str:
    """A task (`python -c SCRIPT LOG NAME`) that appends `<ns> start NAME` to LOG, waits until
    `go` exists, then appends `<ns> end NAME`."""
    return ("import os, sys, time\n"
            "def rec(kind):\n"
            "    with open(sys.argv[1], 'a') as f:\n"
            "        f.write(f'{time.time_ns()} {kind} {sys.argv[2]}\\n')\n"
            "rec('start')\n"
            f"while not os.path.exists({str(go)!r}): time.sleep(0.02)\n"
            "rec('end')\n")


def max_overlap(log: Path) -> int:
    """The most tasks running at once, from the `<ns> start|end <i>` lines the tasks wrote."""
    events = sorted((int(t), kind == "start") for t, kind, _ in
                    (line.split() for line in log.read_text().splitlines()))
    running, most = 0, 0
    for _, is_start in events:  # at equal times an end sorts before a start
        running += 1 if is_start else -1
        most = max(most, running)
    return most


def test_parallelism_cap_is_honoured(folder, tmp_path):
    """4 tasks, at most 2 at once: the intervals each task records never overlap by more than 2
    (and do overlap by 2, so the tasks did run in parallel)."""
    log, go = tmp_path / "intervals.log", tmp_path / "go"
    # Each task ends once `go` exists: the first two are both running before any may end.
    script = interval_recorder(go)
    argvs = [[PY, "-c", script, str(log), str(i)] for i in range(4)]
    local.submit(folder, JOB, argvs, [], "none", parallelism=2, time_min=1)
    wait_for(lambda: log.exists() and log.read_text().count(" start ") == 2, "two tasks to start")
    go.touch()
    states = wait_for(lambda: all_done(folder, 4), "4 tasks to finish")
    assert {k: s.state for k, s in states.items()} == {f"{JOB}_{i}": "COMPLETED" for i in range(4)}
    assert log.read_text().count(" end ") == 4
    assert max_overlap(log) == 2


def test_time_limit_ends_the_task_as_timeout(folder, tmp_path):
    """A sub-minute limit is not possible through `local.submit` (minutes): the supervisor is run
    in-process on an array.json with time_limit_s=1."""
    marker = tmp_path / "t.pid"
    write_array(folder, [sleeper(marker, "infinity"), [PY, "-c", "pass"]], parallelism=2,
                time_limit_s=1)
    local.supervise(folder)  # returns only once the task that never ends by itself is killed
    states = local.read_states(folder, JOB)
    assert states[f"{JOB}_0"].state == "TIMEOUT"
    assert states[f"{JOB}_0"].exit_code == "0:15"  # the SIGTERM ended it
    assert states[f"{JOB}_1"].state == "COMPLETED"
    assert not pid_alive(int(marker.read_text()))  # the process group was killed


def test_a_command_that_cannot_start_fails_its_task_with_the_reason_in_its_log(folder):
    write_array(folder, [["/nonexistent/apptainer", "exec"], [PY, "-c", "pass"]], parallelism=1,
                time_limit_s=60)
    local.supervise(folder)  # returns: one task failing to start does not stop the array
    states = local.read_states(folder, JOB)
    assert (states[f"{JOB}_0"].state, states[f"{JOB}_0"].exit_code) == ("FAILED", "127:0")
    assert states[f"{JOB}_1"].state == "COMPLETED"
    assert "cannot start /nonexistent/apptainer" in local.log_paths(folder, 0)[1].read_text()


def test_submit_records_the_time_limit_in_seconds(folder):
    local.submit(folder, JOB, [[PY, "-c", "pass"]], ["https_proxy"], "none", parallelism=3,
                 time_min=2)
    spec = json.loads((folder / "array.json").read_text())
    assert spec["time_limit_s"] == 120
    assert (spec["parallelism"], spec["pass_env"], spec["job_id"]) == (3, ["https_proxy"], JOB)
    wait_for(lambda: all_done(folder, 1), "the task to finish")


def test_exit_codes(folder):
    argvs = [["sh", "-c", "exit 3"], ["sh", "-c", "exit 0"], ["sh", "-c", "kill -9 $$"]]
    local.submit(folder, JOB, argvs, [], "none", parallelism=3, time_min=1)
    states = wait_for(lambda: all_done(folder, 3), "3 tasks to finish")
    assert (states[f"{JOB}_0"].state, states[f"{JOB}_0"].exit_code) == ("FAILED", "3:0")
    assert (states[f"{JOB}_1"].state, states[f"{JOB}_1"].exit_code) == ("COMPLETED", "0:0")
    assert (states[f"{JOB}_2"].state, states[f"{JOB}_2"].exit_code) == ("FAILED", "0:9")
    # The OOM killer's SIGKILL cannot be told from a `kill -9`: the log names both.
    assert local.log_paths(folder, 2)[1].read_text().splitlines()[-1] == (
        "bakery-slurm: killed by signal 9 (SIGKILL: out of memory, or killed by hand)")
    assert not local.log_paths(folder, 0)[1].read_text()  # an exit code needs no word


def test_a_task_killed_by_a_signal_is_said_so_by_name():
    assert local.killed_by(9) == "killed by signal 9 (SIGKILL: out of memory, or killed by hand)"
    assert local.killed_by(11) == "killed by signal 11 (SIGSEGV)"
    assert local.killed_by(200) == "killed by signal 200"  # no such signal here: no name


def test_state_keys_and_logs(folder):
    argvs = [["sh", "-c", f'echo "out {i} $BAKERY_LOCAL_JOB_ID"; echo "err {i}" >&2']
             for i in range(3)]
    local.submit(folder, JOB, argvs, [], "none", parallelism=3, time_min=1)
    states = wait_for(lambda: all_done(folder, 3), "3 tasks to finish")
    assert sorted(states) == [f"{JOB}_0", f"{JOB}_1", f"{JOB}_2"]
    for i in range(3):
        out, err = local.log_paths(folder, i)
        assert (out, err) == (folder / f"{i}.out", folder / f"{i}.err")
        assert out.read_text() == f"out {i} {JOB}_{i}\n"
        assert err.read_text() == f"err {i}\n"
        assert states[f"{JOB}_{i}"].node and states[f"{JOB}_{i}"].elapsed is not None


def test_finished_tasks_never_read_as_dead_while_the_supervisor_records_them(folder):
    """Between a task's exit and the supervisor's next poll the task is an unreaped zombie: that
    is RUNNING (then COMPLETED), never NODE_FAIL."""
    local.submit(folder, JOB, [[PY, "-c", "pass"]] * 3, [], "none", parallelism=3, time_min=1)
    seen: set[str] = set()

    def done():
        states = states_of(folder)
        seen.update(states.values())
        return len(states) == 3 and not set(states.values()) & set(LIVE)

    wait_for(done, "3 tasks to finish")
    assert seen <= {"PENDING", "RUNNING", "COMPLETED"}, seen
    assert set(states_of(folder).values()) == {"COMPLETED"}


def test_cancel_pending_and_running(folder, tmp_path):
    m0, m1 = tmp_path / "0.pid", tmp_path / "1.pid"
    local.submit(folder, JOB, [sleeper(m0), sleeper(m1)], [], "none", parallelism=1, time_min=1)
    wait_for(lambda: m0.exists() and m0.read_text().strip(), "task 0 to start")
    # The task can start (and write its marker) before the supervisor has recorded it RUNNING.
    wait_for(lambda: states_of(folder) == {f"{JOB}_0": "RUNNING", f"{JOB}_1": "PENDING"},
             "task 0 RUNNING and task 1 PENDING")
    local.cancel(folder, [1])
    wait_for(lambda: state_is(folder, 1, "CANCELLED"), "pending task 1 to be cancelled")
    assert state_is(folder, 0, "RUNNING")
    task0 = int(m0.read_text())
    local.cancel(folder, [0])
    states = wait_for(lambda: all_done(folder, 2), "both tasks to end")
    assert (states[f"{JOB}_0"].state, states[f"{JOB}_0"].exit_code) == ("CANCELLED", "0:15")
    assert states[f"{JOB}_1"].state == "CANCELLED"
    assert not m1.exists() and not (folder / "1.out").exists()  # task 1 never started
    assert not pid_alive(task0)


def test_killed_task_with_live_supervisor_is_failed(folder, tmp_path):
    marker = tmp_path / "0.pid"
    local.submit(folder, JOB, [sleeper(marker)], [], "none", parallelism=1, time_min=1)
    wait_for(lambda: marker.exists() and marker.read_text().strip(), "the task to start")
    os.kill(int(marker.read_text()), signal.SIGKILL)
    states = wait_for(lambda: all_done(folder, 1), "the supervisor to record the kill")
    assert (states[f"{JOB}_0"].state, states[f"{JOB}_0"].exit_code) == ("FAILED", "0:9")


def test_dead_supervisor_and_task_read_as_node_fail(folder, tmp_path):
    marker = tmp_path / "0.pid"
    local.submit(folder, JOB, [sleeper(marker), sleeper(tmp_path / "1.pid")], [], "none",
                 parallelism=1, time_min=1)
    wait_for(lambda: marker.exists() and marker.read_text().strip(), "task 0 to start")
    # The task can start before the supervisor has recorded it RUNNING (with its pid).
    wait_for(lambda: states_of(folder) == {f"{JOB}_0": "RUNNING", f"{JOB}_1": "PENDING"},
             "task 0 RUNNING and task 1 PENDING")
    supervisor = json.loads((folder / "supervisor.json").read_text())["pid"]
    task = json.loads((folder / "0.state.json").read_text())["pid"]
    assert task == int(marker.read_text())
    os.kill(supervisor, signal.SIGKILL)
    os.killpg(task, signal.SIGKILL)
    wait_for(lambda: not pid_alive(supervisor) and not pid_alive(task), "both to die")
    states = local.read_states(folder, JOB)
    # RUNNING with no process and no supervisor; PENDING that no supervisor will ever start.
    assert {k: s.state for k, s in states.items()} == {f"{JOB}_0": "NODE_FAIL",
                                                      f"{JOB}_1": "NODE_FAIL"}
    # The files still say RUNNING / PENDING: NODE_FAIL is what a reader concludes, not a write.
    assert json.loads((folder / "0.state.json").read_text())["state"] == "RUNNING"


def test_a_task_waits_for_its_dependency_and_is_cancelled_when_that_fails(folder, tmp_path):
    """Eval after merge, as SLURM's aftercorr with --kill-on-invalid-dep=yes: task 0 of the
    second array starts only once task 0 of the first completed; task 1, whose task failed, is
    cancelled without running."""
    # The first array is the fixture's folder, so that teardown kills its waiting task if the
    # test fails early; the second's supervisor then reads it dead and ends too.
    go, ran = tmp_path / "go", tmp_path / "ran"
    first, second = folder, tmp_path / "eval"
    local.submit(first, JOB, [["sh", "-c", f'while [ ! -e "{go}" ]; do sleep 0.05; done'],
                              ["sh", "-c", "exit 3"]], [], "none", parallelism=2, time_min=1)
    second_job = "local-0123abcd-1"
    after = [{"folder": str(first), "job_id": JOB, "index": i} for i in (0, 1)]
    local.submit(second, second_job, [["sh", "-c", f'echo 0 >> "{ran}"'],
                                      ["sh", "-c", f'echo 1 >> "{ran}"']],
                 [], "none", parallelism=2, time_min=1, after=after)
    wait_for(lambda: local.read_states(second, second_job)[f"{second_job}_1"].state == "CANCELLED",
             "the task whose dependency failed to be cancelled")
    assert state_is(first, 0, "RUNNING")
    assert local.read_states(second, second_job)[f"{second_job}_0"].state == "PENDING"
    go.touch()
    states = wait_for(lambda: (s := local.read_states(second, second_job))
                      and s[f"{second_job}_0"].state == "COMPLETED" and s, "task 0 to run")
    assert ran.read_text() == "0\n"
    waited = json.loads((first / "0.state.json").read_text())
    started = json.loads((second / "0.state.json").read_text())
    assert started["started"] >= waited["ended"]
    assert "ended FAILED (dependency never satisfied)" in (second / "1.err").read_text()
    assert states[f"{second_job}_1"].exit_code == "0:0"


def test_cancel_signals_only_a_process_of_this_host(tmp_path, monkeypatch):
    """On a shared work folder the array may run on another node: the pid recorded there means
    nothing here (its supervisor sees the cancel file and stops it)."""
    folder = tmp_path / "array"
    folder.mkdir()
    (folder / "0.state.json").write_text(json.dumps(
        {"state": "RUNNING", "pid": os.getpid(), "host": "some-other-node"}))
    signalled = []
    monkeypatch.setattr(local.os, "killpg", lambda pid, sig: signalled.append(pid))
    local.cancel(folder, [0])
    assert signalled == [] and (folder / "0.cancel").exists()


def test_a_cancel_that_comes_while_the_supervisor_starts_the_task_stops_it(folder, tmp_path,
                                                                           monkeypatch):
    """`cancel` found the task PENDING (the supervisor was starting it) and signalled nothing:
    the supervisor, seeing the cancel file, stops the running task."""
    ran = tmp_path / "ran"
    write_array(folder, [[PY, "-c", f"import time; time.sleep(30); open({str(ran)!r}, 'w')"]],
                parallelism=1, time_limit_s=60)
    local._write_state(folder, 0, "PENDING")
    real_start = local._start

    def start_racing_a_cancel(*args, **kwargs):
        local.cancel(folder, [0])  # the state is still PENDING: nothing to signal yet
        return real_start(*args, **kwargs)

    monkeypatch.setattr(local, "_start", start_racing_a_cancel)
    local.supervise(folder)
    assert states_of(folder) == {f"{JOB}_0": "CANCELLED"}
    assert not ran.exists()


def processes_naming(token: str) -> list[int]:
    """The live processes whose command line holds `token`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            cmdline = stat.read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if token in cmdline and pid_alive(int(stat.parent.name)):
            found.append(int(stat.parent.name))
    return found


def test_a_supervisor_that_cannot_record_a_state_ends_its_tasks(folder, tmp_path):
    """A state file that cannot be written (the disk is full; here its name is taken by a
    folder, which fails the same rename for root too): a task whose start was not recorded
    could be neither cancelled nor told apart from the attempt a resubmit starts. The supervisor
    ends every task it started before it fails, so that the tasks read NODE_FAIL truthfully."""
    token = str(tmp_path / "busy")
    busy = [PY, "-c", "import time\nwhile True: time.sleep(0.05)", token]
    write_array(folder, [busy, busy], parallelism=2, time_limit_s=60, kill_wait_s=0.5)
    (folder / "1.state.json").mkdir()
    (folder / "1.state.json" / "x").touch()
    try:
        with pytest.raises(IsADirectoryError):
            local.supervise(folder)
        assert processes_naming(token) == []
        assert states_of(folder) == {f"{JOB}_0": "NODE_FAIL", f"{JOB}_1": "NODE_FAIL"}
        # Their slots are free again (this supervisor ran in the test's own process).
        slots = local.this_machine_slots().folder.glob("slot-*.lock")
        assert [slot for slot in slots if fsutil.is_held(slot)] == []
    finally:
        for pid in processes_naming(token):
            os.kill(pid, signal.SIGKILL)


def test_a_supervisor_never_recorded_starts_nothing(folder, tmp_path):
    """`submit` records the supervisor's pid after starting it. A submit that dies before it has
    (killed, or its write failing) must leave no task running that no status sees, no cancel
    reaches, and a resubmit runs a second time: the supervisor starts tasks only once it is
    recorded, and ends without starting any once the process that started it is gone."""
    import subprocess
    marker, pid = tmp_path / "0.pid", tmp_path / "supervisor.pid"
    write_array(folder, [sleeper(marker)], parallelism=1, time_limit_s=60)
    local._write_state(folder, 0, "PENDING")
    # A shell stands in for the submit: it starts the supervisor and exits, recording nothing.
    subprocess.run(["sh", "-c", f'"{PY}" -m bakery_slurm.local "{folder}" $$ & echo $! > "{pid}"'],
                   check=True)
    supervisor = int(pid.read_text())
    wait_for(lambda: not pid_alive(supervisor), "the unrecorded supervisor to end")
    assert not marker.exists() and not (folder / "0.out").exists()
    assert states_of(folder) == {f"{JOB}_0": "NODE_FAIL"}


def start_supervisor(folder: Path) -> None:
    """Run the supervisor of an array written by `write_array`, detached as `local.submit` runs
    it, its pid recorded where the fixture's teardown finds it."""
    import subprocess
    process = subprocess.Popen([PY, "-m", "bakery_slurm.local", str(folder), str(os.getpid())],
                               stdin=subprocess.DEVNULL, start_new_session=True)
    (folder / "supervisor.json").write_text(json.dumps({"pid": process.pid,
                                                        "host": local.socket.gethostname()}))


def term_ignoring_sleeper(marker: Path) -> list[str]:
    """A hung task: SIGTERM does not end it (run-cell handles SIGTERM in Python, which a task
    stuck in native code never runs)."""
    return ["sh", "-c", f'trap "" TERM; echo $$ > "{marker}"; while :; do sleep 0.05; done']


def test_a_cancelled_task_that_ignores_sigterm_is_killed_after_the_kill_wait(folder, tmp_path):
    """As scancel: SIGTERM, then SIGKILL `kill_wait_s` later; the task ends CANCELLED, not
    RUNNING until its time limit."""
    marker = tmp_path / "0.pid"
    write_array(folder, [term_ignoring_sleeper(marker)], parallelism=1, time_limit_s=3600,
                kill_wait_s=0.5)
    local._write_state(folder, 0, "PENDING")
    start_supervisor(folder)
    wait_for(lambda: marker.exists() and marker.read_text().strip() and state_is(folder, 0, "RUNNING"),
             "the task to run")
    local.cancel(folder, [0])
    states = wait_for(lambda: all_done(folder, 1), "the cancelled task to end", deadline_s=10)
    assert (states[f"{JOB}_0"].state, states[f"{JOB}_0"].exit_code) == ("CANCELLED", "0:9")
    assert not pid_alive(int(marker.read_text()))


def test_the_time_limit_sends_sigterm_first_then_sigkill(folder, tmp_path):
    """As SLURM at a time limit: SIGTERM (run-cell ends through `finally`, removing its private
    cache), SIGKILL `kill_wait_s` later for a task that does not end."""
    polite, hung = tmp_path / "polite", tmp_path / "1.pid"
    write_array(folder, [["sh", "-c", f'trap "echo term > {polite}; exit 143" TERM; '
                                      'while :; do sleep 0.05; done'],
                         term_ignoring_sleeper(hung)],
                parallelism=2, time_limit_s=1, kill_wait_s=0.5)
    local.supervise(folder)
    states = local.read_states(folder, JOB)
    assert (states[f"{JOB}_0"].state, states[f"{JOB}_0"].exit_code) == ("TIMEOUT", "0:15")
    assert polite.read_text() == "term\n"
    assert (states[f"{JOB}_1"].state, states[f"{JOB}_1"].exit_code) == ("TIMEOUT", "0:9")
    assert not pid_alive(int(hung.read_text()))


def test_processes_a_task_leaves_behind_end_with_it(folder, tmp_path):
    """SLURM ends every process of a task's cgroup when the task ends: a child the task started
    (the verify loader of a run-cell killed by the OOM killer) does not outlive it."""
    child = tmp_path / "child.pid"
    write_array(folder, [["sh", "-c", f'sleep 60 & echo $! > "{child}"; exit 3']],
                parallelism=1, time_limit_s=60)
    local.supervise(folder)
    assert states_of(folder) == {f"{JOB}_0": "FAILED"}
    wait_for(lambda: not pid_alive(int(child.read_text())), "the task's child to end")


def test_a_pid_taken_by_another_process_after_a_reboot_is_not_the_task(folder, tmp_path):
    """The machine rebooted while the array ran: its supervisor's and task's pids now belong to
    other processes. Their start (boot id, start time) tells them apart: the tasks are
    NODE_FAIL (resubmit takes them), not live forever, and cancel signals no stranger."""
    import subprocess
    stranger = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        (tmp_path / "stranger.pid").write_text(str(stranger.pid))  # the fixture kills it too
        before_reboot = {"pid": stranger.pid, "host": local.socket.gethostname(),
                         "identity": "a-boot-before:1234"}
        folder.mkdir()
        (folder / "supervisor.json").write_text(json.dumps(before_reboot))
        (folder / "0.state.json").write_text(json.dumps({**before_reboot, "state": "RUNNING",
                                                         "started": "2026-01-01T00:00:00+00:00"}))
        (folder / "1.state.json").write_text(json.dumps({"state": "PENDING"}))
        assert states_of(folder) == {f"{JOB}_0": "NODE_FAIL", f"{JOB}_1": "NODE_FAIL"}
        # When it died is not known: its elapsed is not the time since it started, ever growing.
        assert local.read_states(folder, JOB)[f"{JOB}_0"].elapsed is None
        local.cancel(folder, [0])
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()


def test_elapsed_times_read_as_sacct_prints_them():
    assert local.slurm_duration(3723) == "01:02:03"
    assert local.slurm_duration(2 * 86400 + 59) == "2-00:00:59"


def test_live_processes_are_recorded_with_their_identity(folder, tmp_path):
    marker = tmp_path / "0.pid"
    local.submit(folder, JOB, [sleeper(marker)], [], "none", parallelism=1, time_min=1)
    wait_for(lambda: state_is(folder, 0, "RUNNING"), "the task to run")
    for record in ("supervisor.json", "0.state.json"):
        recorded = json.loads((folder / record).read_text())
        assert recorded["identity"] == local._process_identity(recorded["pid"])
    local.cancel(folder, [0])
    wait_for(lambda: all_done(folder, 1), "the task to end")


# ---------------------------------------------------------------------------------------------
# The machine-wide cap across arrays


def test_the_machine_cap_holds_across_arrays(folder, tmp_path, monkeypatch):
    """Two arrays of 2 tasks, each allowed 2 at once, on a machine capped at 2 local tasks: never
    more than 2 run, though each supervisor alone would run 4 between them."""
    monkeypatch.setenv(local.MAX_TASKS_ENV, "2")
    log, go = tmp_path / "intervals.log", tmp_path / "go"
    script = interval_recorder(go)
    second = tmp_path / "second"
    for array, job in ((folder, JOB), (second, "local-0123abcd-1")):
        local.submit(array, job, [[PY, "-c", script, str(log), f"{job}_{i}"] for i in range(2)],
                     [], "none", parallelism=2, time_min=1)
    wait_for(lambda: log.exists() and log.read_text().count(" start ") == 2, "two tasks to start")
    go.touch()
    wait_for(lambda: all_done(folder, 2), "the first array to finish")
    wait_for(lambda: all(s.state == "COMPLETED" for s in
                         local.read_states(second, "local-0123abcd-1").values()),
             "the second array to finish")
    assert log.read_text().count(" end ") == 4
    assert max_overlap(log) == 2


def test_a_task_that_outlives_its_killed_supervisor_keeps_its_machine_slot(folder, tmp_path,
                                                                         monkeypatch):
    """The supervisor is SIGKILLed while its task runs on (in a session of its own): the slot
    stays taken until the task ends too, so no other array starts a task beyond the cap. While
    it runs the task reads RUNNING; the kernel frees the slot once both have ended."""
    monkeypatch.setenv(local.MAX_TASKS_ENV, "1")
    marker = tmp_path / "0.pid"
    local.submit(folder, JOB, [sleeper(marker)], [], "none", parallelism=1, time_min=1)
    wait_for(lambda: state_is(folder, 0, "RUNNING"), "the task to run")
    slots = local.this_machine_slots()
    supervisor = json.loads((folder / "supervisor.json").read_text())["pid"]
    task = json.loads((folder / "0.state.json").read_text())["pid"]
    os.kill(supervisor, signal.SIGKILL)
    wait_for(lambda: not pid_alive(supervisor), "the supervisor to die")
    assert pid_alive(task) and state_is(folder, 0, "RUNNING")
    assert local.take_slot(slots) is None  # another supervisor finds the machine full
    os.kill(task, signal.SIGKILL)
    wait_for(lambda: not pid_alive(task), "the task to die")
    taken = wait_for(lambda: local.take_slot(slots), "the slot to be free once both ended")
    os.close(taken[1])
    assert states_of(folder) == {f"{JOB}_0": "NODE_FAIL"}


def test_a_task_waiting_for_another_array_holds_no_slot(folder, tmp_path, monkeypatch):
    """One slot on the machine; the eval array is started first and waits for the merge array:
    were it to hold the slot while it waits, the merge would never start (a deadlock)."""
    monkeypatch.setenv(local.MAX_TASKS_ENV, "1")
    merge, evals, eval_job = tmp_path / "merge", folder, "local-0123abcd-1"
    local.submit(evals, eval_job, [[PY, "-c", "pass"]], [], "none", parallelism=1, time_min=1,
                 after=[{"folder": str(merge), "job_id": JOB, "index": 0}])
    local.submit(merge, JOB, [[PY, "-c", "pass"]], [], "none", parallelism=1, time_min=1)
    wait_for(lambda: local.read_states(evals, eval_job)[f"{eval_job}_0"].state == "COMPLETED",
             "the eval to run after its merge")


def test_slots_are_taken_one_per_task_and_freed_on_close(tmp_path):
    slots = local.MachineSlots(tmp_path / "slots", 2)
    first = local.take_slot(slots)
    second = local.take_slot(slots)  # the same process: a slot it holds is not free to it
    try:
        assert (first[0], second[0]) == (0, 1)
        assert local.take_slot(slots) is None
        assert fsutil.is_held(slots.folder / "slot-0.lock")  # another supervisor cannot take it
    finally:
        os.close(first[1])
        os.close(second[1])
    assert not fsutil.is_held(slots.folder / "slot-0.lock")


def test_next_starts_starts_ready_tasks_up_to_the_free_count_and_cancels_broken_waits():
    waited = {0: "PENDING", 1: "COMPLETED", 2: "FAILED", 3: "COMPLETED", 4: "RUNNING",
              5: "COMPLETED"}
    assert local.next_starts(list(waited), 2, waited) == ([1, 3], {2: "FAILED"})
    # A full array still cancels the tasks whose dependency will never be satisfied.
    assert local.next_starts(list(waited), 0, waited) == ([], {2: "FAILED"})
    # Waiting tasks are never started, whatever is free: they hold no slot.
    assert local.next_starts([0, 4], 5, waited) == ([], {})


def test_machine_slots_default_to_the_cpus_in_a_per_host_cache_folder(tmp_path):
    home = tmp_path / "home"
    assert local.machine_slots({}, 8, "laptop", home) == local.MachineSlots(
        home / ".cache/bakery-slurm/local-slots/laptop", 8)
    assert local.machine_slots({"XDG_CACHE_HOME": str(tmp_path / "c"), local.MAX_TASKS_ENV: "3"},
                               8, "node1", home) == local.MachineSlots(
        tmp_path / "c/bakery-slurm/local-slots/node1", 3)
    assert local.machine_slots({local.SLOTS_DIR_ENV: str(tmp_path / "s")}, 2, "x", home).folder \
        == tmp_path / "s"
    for bad in ("0", "two", "-1"):
        with pytest.raises(SchedulerError, match=local.MAX_TASKS_ENV):
            local.machine_slots({local.MAX_TASKS_ENV: bad}, 8, "laptop", home)
