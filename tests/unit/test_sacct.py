"""sacct/squeue parsing on literal text, reduction to cells, resubmit choice, and the thin shell."""

from __future__ import annotations

import subprocess
import time
from dataclasses import replace
from datetime import datetime, timezone

import pytest

from bakery_slurm import slurm_commands
from bakery_slurm.errors import SchedulerError
from bakery_slurm.ledger import Ledger, PlannedArray, confirm_array, record_intent
from bakery_slurm.cell_status import NOT_FOUND, UNCONFIRMED, CellStatus, reduce_cells, totals
from bakery_slurm.resubmit_policy import Refusal, choose_eval_resubmit, choose_resubmit, is_live
from bakery_slurm.sacct import find_jobs_by_name, parse_sacct, query_sacct, sacct_starttime
from bakery_slurm.slurm_commands import TaskState
from bakery_slurm.squeue import (controller_view, find_queued_jobs_by_name, needs_controller, parse_squeue,
                                 query_squeue)

SACCT_TEXT = """\
1234_0|COMPLETED|0:0|00:01:02|c1-1|bakery-t-1234
1234_3|FAILED|7:0|00:00:05|c1-2|bakery-t-1234
1234_[4-9%2]|PENDING|0:0|00:00:00|None assigned|bakery-t-1234
1234_3.batch|FAILED|7:0|00:00:05|c1-2|bakery-t-1234
1235_[1,3,5-7]|PENDING|0:0|00:00:00|None assigned|bakery-t-1235
1236|RUNNING|0:0|00:10:00|c1-[1-2]|bakery-t-1236
1237_2|CANCELLED by 0|0:15|00:00:09|c1-3|bakery-t-1237
1237_10|OUT_OF_MEMORY|0:125|01:00:00|c1-4|bakery-t-1237
1237_11|NODE_FAIL|1:0|1-02:03:04|c1-5|bakery-t-1237
1237_12|REQUEUED|0:0|00:00:30|c1-6|bakery-t-1237
1238_[0-6:3]|PENDING|0:0|00:00:00|None assigned|bakery-t-1238
1234_5|COMPLETED|0:0|00:00:01|c9-9|train|old
1236|COMPLETED|0:0|00:00:01|c9-9|bakery-t-9999

"""
# Array job id -> job name, as the ledger records them.
NAMES = {str(job): f"bakery-t-{job}" for job in range(1234, 1239)}


def test_parse_sacct_expands_ranges_and_strips_state_detail():
    states = parse_sacct(SACCT_TEXT, NAMES)
    assert states["1234_0"] == TaskState("COMPLETED", "0:0", "00:01:02", "c1-1")
    assert states["1234_3"] == TaskState("FAILED", "7:0", "00:00:05", "c1-2")
    assert {k for k in states if k.startswith("1234_")} == {"1234_0", "1234_3"} | {f"1234_{i}" for i in range(4, 10)}
    assert states["1234_9"] == TaskState("PENDING", "0:0", "00:00:00", None)
    assert sorted(k for k in states if k.startswith("1235_")) == ["1235_1", "1235_3", "1235_5", "1235_6", "1235_7"]
    assert states["1236"] == TaskState("RUNNING", "0:0", "00:10:00", "c1-[1-2]")
    assert states["1237_2"].state == "CANCELLED"
    assert [states[f"1237_{i}"].state for i in (10, 11, 12)] == ["OUT_OF_MEMORY", "NODE_FAIL", "REQUEUED"]
    assert states["1237_11"].elapsed == "1-02:03:04"
    assert sorted(k for k in states if k.startswith("1238_")) == ["1238_0", "1238_3", "1238_6"]


def test_a_tasks_own_row_wins_over_a_range_that_still_covers_it():
    """Seen on SLURM 22.05: an eval array killed by --kill-on-invalid-dep after its task 0 ran
    keeps 4_0's row and prints the whole range CANCELLED."""
    states = parse_sacct("4_0|FAILED|1:0|00:00:15|vm|e\n4_[0-1%2]|CANCELLED|0:0|00:00:00|None assigned|e\n",
                         {"4": "e"})
    assert {k: s.state for k, s in states.items()} == {"4_0": "FAILED", "4_1": "CANCELLED"}


def test_parse_sacct_skips_rows_of_other_jobs_with_the_same_id():
    # After a controller's state is reset, ids are handed out again and `sacct -j` also prints the
    # earlier jobs' rows: 1234_5 is still PENDING in our array, 1236 still RUNNING.
    states = parse_sacct(SACCT_TEXT, NAMES)
    assert states["1234_5"].state == "PENDING"
    assert states["1236"].state == "RUNNING"
    assert parse_sacct(SACCT_TEXT, {"1234": "bakery-t-other"}) == {}


@pytest.mark.parametrize("text", ["", "\n", "  \n\n"])
def test_parse_sacct_empty_output(text):
    assert parse_sacct(text, NAMES) == {}


@pytest.mark.parametrize(
    "line, message",
    [
        ("hello world", "expected 6 '|'-separated fields"),
        ("1234_1|COMPLETED|0:0|00:00:01|n1", "expected 6"),
        ("abc_1|COMPLETED|0:0|00:00:01|n1|bakery-t-1234", "cannot parse job id 'abc_1'"),
        # cut by SLURM_BITSTR_LEN
        ("1234_[1-3,5...|PENDING|0:0|00:00:00|None assigned|bakery-t-1234", "cannot parse job id"),
        ("1234_[1--3]|PENDING|0:0|00:00:00|None assigned|bakery-t-1234", "cannot parse array range '1--3'"),
        ("1234+1|COMPLETED|0:0|00:00:01|n1|bakery-t-1234", "cannot parse job id '1234\\+1'"),
        ("1234_1|completed|0:0|00:00:01|n1|bakery-t-1234", "cannot parse state 'completed'"),
        ("1234_1|COMPLETED|zero|00:00:01|n1|bakery-t-1234", "cannot parse exit code 'zero'"),
    ],
)
def test_parse_sacct_refuses_garbage(line, message):
    with pytest.raises(SchedulerError, match=f"sacct line 2: {message}"):
        parse_sacct(f"1_0|COMPLETED|0:0|00:00:01|n0|bakery-t-1\n{line}\n", NAMES)


def test_parse_squeue():
    text = ("500_0|RUNNING|1:02|c1-1|a500\n500_[1-3%1]|PENDING|0:00||a500\n501_0|COMPLETED|0:20|c1-2|a501\n"
            "502_0|RUNNING|0:20|c1-2|someone else's\n")
    states = parse_squeue(text, {"500": "a500", "501": "a501", "502": "a502"})
    assert states["500_0"] == TaskState("RUNNING", None, "1:02", "c1-1")
    assert states["500_3"] == TaskState("PENDING", None, "0:00", None)
    assert len(states) == 5
    with pytest.raises(SchedulerError, match="squeue line 1: expected 5"):
        parse_squeue("500_0 RUNNING\n", {})


def planned(*cells: str) -> PlannedArray:
    return PlannedArray(executor="slurm", resources={}, folder="f", cells=list(cells))


def build_ledger() -> tuple[Ledger, list[str]]:
    """Cells a, b, c in array 100; b resubmitted alone as array 200 (index 0 again); d unconfirmed."""
    ledger = Ledger()
    names = []
    for n, (cells, job_id) in enumerate([(("a", "b", "c"), "100"), (("b",), "200"), (("d",), None)]):
        now = datetime(2025, 3, 1 + n, 12, tzinfo=timezone.utc)
        sub = record_intent(
            ledger,
            matrix_path="m",
            matrix_sha256="0" * 64,
            arrays=[planned(*cells)],
            recipe_hashes=dict.fromkeys(cells, f"r{n}"),
            now=now,
        )
        names.append(sub.arrays[0].name)
        if job_id:
            confirm_array(ledger, sub.arrays[0].name, job_id)
    return ledger, names


def test_reduce_cells_uses_the_latest_attempt_by_cell_not_index():
    ledger, names = build_ledger()
    # 100_0 (cell a) is COMPLETED and 100_1 (b's first attempt) FAILED; b's latest is 200_0.
    states = parse_sacct(
        f"100_0|COMPLETED|0:0|00:01:00|n1|{names[0]}\n100_1|FAILED|1:0|00:00:10|n2|{names[0]}\n"
        f"200_0|RUNNING|0:0|00:00:05|n3|{names[1]}\n",
        {"100": names[0], "200": names[1]},
    )
    by_cell = {s.cell: s for s in reduce_cells(ledger, states)}
    assert list(by_cell) == ["a", "b", "c", "d"]
    assert by_cell["a"] == CellStatus("a", "COMPLETED", 1, names[0], "100", 0, "r0", "0:0", "00:01:00", "n1")
    assert by_cell["b"] == CellStatus("b", "RUNNING", 2, names[1], "200", 0, "r1", "0:0", "00:00:05", "n3",
                                      plain_job=True)
    # Array 200 has one task, which submitit submits as a plain job: SLURM's id is "200" (status
    # showed "200_0", which scontrol hold, release and requeue refuse).
    assert (by_cell["a"].task_id, by_cell["b"].task_id) == ("100_0", "200")
    assert by_cell["c"] == CellStatus("c", NOT_FOUND, 1, names[0], "100", 2, "r0")
    assert by_cell["d"] == CellStatus("d", UNCONFIRMED, 1, names[2], None, 0, "r2",
                                      unscheduled_attempts=1, plain_job=True)
    assert by_cell["d"].task_id is None


def status(cell: str, state: str, attempt: int = 1, job_id: str | None = "9") -> CellStatus:
    return CellStatus(cell, state, attempt, "bakery-00000000-0", job_id, 0, "r")


def test_choose_resubmit_refuses_with_reasons():
    statuses = [
        status("1b/failed", "FAILED"),
        status("1b/oom", "OUT_OF_MEMORY", attempt=2),
        status("1b/capped", "TIMEOUT", attempt=3),
        status("1b/pending", "PENDING"),
        status("1b/running", "RUNNING"),
        status("1b/done", "COMPLETED"),
        status("1b/unconfirmed", UNCONFIRMED, job_id=None),
        status("1b/lost", NOT_FOUND),
        status("4b/failed", "FAILED"),
    ]
    chosen, refused = choose_resubmit(statuses, max_attempts=3, only="1b/*")
    assert [s.cell for s in chosen] == ["1b/failed", "1b/oom"]
    assert refused == [
        Refusal("1b/capped", "TIMEOUT", "reached the attempt cap (3 of 3)"),
        Refusal("1b/pending", "PENDING", "latest attempt is PENDING, not a terminal failure"),
        Refusal("1b/running", "RUNNING", "latest attempt is RUNNING, not a terminal failure"),
        Refusal("1b/done", "COMPLETED", "already COMPLETED"),
        Refusal(
            "1b/unconfirmed",
            UNCONFIRMED,
            "array bakery-00000000-0 has no recorded job id; run status to recover it first",
        ),
        Refusal("1b/lost", NOT_FOUND, "the scheduler has no record of task 9_0"),
    ]


def test_attempts_no_scheduler_took_do_not_count_against_max_attempts():
    """Two submits interrupted before sbatch (Ctrl-C, a crash: LOST) ran nothing; the attempt that
    ran and failed is the only one the cap counts. It used to count all three, so with
    max_attempts = 2 the cell could never run again."""
    ledger = Ledger()
    for n, job_id in enumerate([None, None, "300"]):
        sub = record_intent(ledger, matrix_path="m", matrix_sha256="0" * 64, arrays=[planned("a")],
                            recipe_hashes={"a": "r"}, now=datetime(2025, 3, 1 + n, tzinfo=timezone.utc))
        if job_id:
            confirm_array(ledger, sub.arrays[0].name, job_id)
    (failed,) = reduce_cells(ledger, parse_sacct(f"300|FAILED|1:0|00:00:10|n1|{sub.arrays[0].name}\n",
                                                 {"300": sub.arrays[0].name}))
    assert (failed.state, failed.attempt, failed.unscheduled_attempts) == ("FAILED", 3, 2)
    assert choose_resubmit([failed], max_attempts=2)[0] == [failed]
    assert choose_resubmit([failed], max_attempts=1)[1] == [
        Refusal("a", "FAILED", "reached the attempt cap (1 of 1)")]
    # Nor is a LOST attempt itself: it is resubmitted however often sbatch was interrupted.
    lost = replace(status("a", "LOST", attempt=3, job_id=None), unscheduled_attempts=3)
    assert choose_resubmit([lost], max_attempts=1) == ([lost], [])


def test_choose_resubmit_selected_states():
    statuses = [status("a", "FAILED"), status("b", "TIMEOUT")]
    chosen, refused = choose_resubmit(statuses, max_attempts=2, states={"TIMEOUT"})
    assert [s.cell for s in chosen] == ["b"]
    assert refused == [Refusal("a", "FAILED", "FAILED is not among the selected states (TIMEOUT)")]
    with pytest.raises(ValueError, match="cannot resubmit cells in state COMPLETED"):
        choose_resubmit([], max_attempts=2, states={"COMPLETED"})
    with pytest.raises(ValueError, match="at least 1"):
        choose_resubmit([], max_attempts=0)


def test_eval_attempts_reduce_apart_from_merges_of_the_same_cell():
    ledger = Ledger()
    merge = PlannedArray(executor="slurm", resources={}, folder="f", cells=["a", "b"])
    evals = PlannedArray(executor="slurm", resources={}, folder="g", cells=["a", "b"],
                         stage="eval", after="bakery-00000000-0", after_indices=[0, 1])
    record_intent(ledger, matrix_path="m", matrix_sha256="0" * 64, arrays=[merge, evals],
                  recipe_hashes={"a": "r", "b": "r"}, eval_hashes={"a": "s", "b": "s"},
                  submission_id="0" * 32)
    confirm_array(ledger, "bakery-00000000-0", "100")
    confirm_array(ledger, "bakery-00000000-1", "101")
    names = {"100": "bakery-00000000-0", "101": "bakery-00000000-1"}
    states = parse_sacct("100_0|COMPLETED|0:0|00:01:00|n1|bakery-00000000-0\n"
                         "100_1|FAILED|1:0|00:00:10|n1|bakery-00000000-0\n"
                         "101_0|RUNNING|0:0|00:00:05|n1|bakery-00000000-1\n"
                         "101_1|CANCELLED|0:0|00:00:00|None|bakery-00000000-1\n", names)
    merges = {s.cell: (s.state, s.stage) for s in reduce_cells(ledger, states)}
    evaluated = {s.cell: (s.state, s.stage, s.task_id, s.recipe_hash)
                 for s in reduce_cells(ledger, states, stage="eval")}
    assert merges == {"a": ("COMPLETED", "merge"), "b": ("FAILED", "merge")}
    assert evaluated == {"a": ("RUNNING", "eval", "101_0", "s"),
                         "b": ("CANCELLED", "eval", "101_1", "s")}


def test_a_failed_eval_resubmits_alone_only_once_its_merge_succeeded():
    evals = [status("merged", "FAILED"), status("unpublished", "TIMEOUT"),
             status("merge-failed", "CANCELLED"), status("1b/base", "FAILED"),
             status("capped", "FAILED", attempt=2), status("running", "RUNNING")]
    merges = {"merged": "COMPLETED", "unpublished": "UNPUBLISHED", "merge-failed": "FAILED",
              "capped": "COMPLETED", "running": "COMPLETED"}  # 1b/base is a baseline: no merge
    chosen, refused = choose_eval_resubmit(evals, merges, max_attempts=2)
    assert [s.cell for s in chosen] == ["merged", "unpublished", "1b/base"]
    assert refused == [
        Refusal("capped", "FAILED", "reached the attempt cap (2 of 2)"),
        Refusal("running", "RUNNING", "latest attempt is RUNNING, not a terminal failure"),
        Refusal("merge-failed", "CANCELLED",
                "its merge is FAILED: resubmitting the merge chains its eval again")]


HELD = ["REQUEUE_HOLD", "SPECIAL_EXIT", "STOPPED", "SUSPENDED", "RESIZING", "REQUEUED",
        "REQUEUE_FED", "RESV_DEL_HOLD"]


@pytest.mark.parametrize("state", HELD + ["PENDING", "RUNNING", "SOME_FUTURE_STATE"])
def test_held_suspended_and_unknown_states_are_live(state):
    # Someone can release or resume such a task: submitting the cell again would run it twice.
    assert is_live(state)
    chosen, [refusal] = choose_resubmit([status("a", state)], max_attempts=3)
    assert chosen == [] and refusal.reason == f"latest attempt is {state}, not a terminal failure"


@pytest.mark.parametrize("state", ["COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "LOST", NOT_FOUND])
def test_ended_states_are_not_live(state):
    assert not is_live(state)


def test_totals():
    statuses = [status("a", "FAILED"), status("b", "COMPLETED"), status("c", "FAILED")]
    assert totals(statuses) == {"COMPLETED": 1, "FAILED": 2}
    assert list(totals(statuses)) == ["COMPLETED", "FAILED"]


def test_sacct_starttime(monkeypatch):
    # sacct reads --starttime in local time; pin the zone so the expected string is fixed.
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    try:
        ledger, _ = build_ledger()
        assert sacct_starttime(ledger) == "2025-03-01T11:00:00"
        assert sacct_starttime(Ledger()) is None
    finally:
        monkeypatch.undo()
        time.tzset()


class FakeRunner:
    """Stands in for subprocess.run: records each command, answers with canned output."""

    def __init__(self, stdout: str = "", returncode: int = 0, stderr: str = "", raises: Exception | None = None):
        self.calls: list[list[str]] = []
        self.kwargs: list[dict] = []
        self.stdout, self.returncode, self.stderr, self.raises = stdout, returncode, stderr, raises

    def __call__(self, command, **kwargs):
        self.calls.append(command)
        self.kwargs.append(kwargs)
        if self.raises is not None:
            raise self.raises
        return subprocess.CompletedProcess(command, self.returncode, self.stdout, self.stderr)


def test_query_sacct_one_call_for_all_arrays():
    runner = FakeRunner("100_0|COMPLETED|0:0|00:01:00|n1|a\n200_[0-1]|PENDING|0:0|00:00:00|None assigned|b\n")
    states = query_sacct({"100": "a", "200": "b"}, "2025-03-01T11:00:00", runner=runner)
    assert runner.calls == [
        ["sacct", "-X", "--parsable2", "--noheader", "-o", "JobID,State,ExitCode,Elapsed,NodeList,JobName"]
        + ["-j", "100,200", "--starttime", "2025-03-01T11:00:00"]
    ]
    assert runner.kwargs[0]["env"]["SLURM_BITSTR_LEN"] == "0"
    assert sorted(states) == ["100_0", "200_0", "200_1"]


def test_query_sacct_chunks_long_id_lists(monkeypatch):
    runner = FakeRunner()
    assert query_sacct({}, runner=runner) == {}
    assert runner.calls == []
    monkeypatch.setattr(slurm_commands, "MAX_IDS_PER_CALL", 10)
    query_sacct({str(i): f"a{i}" for i in range(25)}, runner=runner)
    assert [len(call[call.index("-j") + 1].split(",")) for call in runner.calls] == [10, 10, 5]


@pytest.mark.parametrize(
    "runner, message",
    [
        (FakeRunner(raises=FileNotFoundError(2, "No such file")), "sacct is not installed or not on PATH"),
        (FakeRunner(raises=subprocess.TimeoutExpired("sacct", 120)), "did not answer within 120 s"),
        (
            FakeRunner(returncode=1, stderr="sacct: error: Slurm accounting storage is disabled\n"),
            "failed \\(exit status 1\\): sacct: error: Slurm accounting storage is disabled",
        ),
        (
            FakeRunner(stderr="sacct: error: Problem talking to the database: Connection refused"),
            "failed \\(exit status 0\\): sacct: error: Problem talking",
        ),
        (FakeRunner(stdout="JobID|State\n"), "sacct -X .* -j 7: sacct line 1: expected 6"),
    ],
)
def test_query_sacct_failures_raise(runner, message):
    with pytest.raises(SchedulerError, match=message):
        query_sacct({"7": "a7"}, runner=runner)


def test_query_squeue_asks_by_name_for_every_users_jobs_and_keeps_ours():
    """No --me: a teammate sharing the ledger asks about the owner's arrays."""
    runner = FakeRunner("500_0|RUNNING|1:02|c1-1|a500\n999_0|RUNNING|5:00|c1-2|other\n")
    assert query_squeue({"500": "a500"}, runner=runner) == {"500_0": TaskState("RUNNING", None, "1:02", "c1-1")}
    assert runner.calls == [["squeue", "--array", "--noheader", "--states=all", "-o", "%i|%T|%M|%N|%j",
                             "--name=a500"]]
    down = FakeRunner(returncode=1, stderr="squeue: error: Unable to contact slurm controller")
    with pytest.raises(SchedulerError, match="squeue --array .* failed \\(exit status 1\\): squeue: error: Unable"):
        query_squeue({"500": "a500"}, runner=down)


def test_find_jobs_by_name():
    runner = FakeRunner("300_0|bakery-aa-0\n300_[1-4]|bakery-aa-0\n301_0|bakery-aa-1\n302_0|someone-else\n")
    found = find_jobs_by_name(["bakery-aa-0", "bakery-aa-1", "bakery-aa-2"], "2025-03-01T11:00:00", runner=runner)
    assert found == {"bakery-aa-0": ["300"], "bakery-aa-1": ["301"]}
    assert runner.calls[0][2:] == [
        "--allusers",  # a teammate sharing the ledger finds the owner's arrays too
        "--parsable2",
        "--noheader",
        "-o",
        "JobID,JobName",
        "--name=bakery-aa-0,bakery-aa-1,bakery-aa-2",
        "--starttime",
        "2025-03-01T11:00:00",
    ]


def test_find_queued_jobs_by_name():
    runner = FakeRunner("55_[2-3]|bakery-a-0\n55_1|bakery-a-0\n9|other\n")
    assert find_queued_jobs_by_name(["bakery-a-0", "bakery-b-0"], runner=runner) == {"bakery-a-0": ["55"]}
    [call] = runner.calls
    assert call[0] == "squeue" and "--name=bakery-a-0,bakery-b-0" in call and "--states=all" in call
    assert "--me" not in call


def test_parse_sacct_skips_a_foreign_heterogeneous_job_with_a_reused_id():
    # A controller reset hands out 1234 again; sacct -j 1234 also prints the earlier het job's
    # components, which are not ours and must be skipped like any other foreign row.
    text = ("1234+0|COMPLETED|0:0|00:00:01|c9-9|train\n"
            "1234+1|COMPLETED|0:0|00:00:01|c9-8|train\n"
            "1234_0|RUNNING|0:0|00:01:00|c1-1|bakery-t-1234\n")
    assert parse_sacct(text, {"1234": "bakery-t-1234"}) == {
        "1234_0": TaskState("RUNNING", "0:0", "00:01:00", "c1-1")}


PENDING = TaskState("PENDING", "0:0", "00:00:00", None)
RUNNING = TaskState("RUNNING", "0:0", "00:05:00", "n1")


@pytest.mark.parametrize("accounting, expected", [
    # Accounting settled it for good: the queue is not asked.
    (TaskState("COMPLETED", "0:0"), False), (TaskState("FAILED", "1:0"), False),
    (TaskState("TIMEOUT", "0:0"), False), (TaskState("CANCELLED", "0:15"), False),
    # No row yet, live, or an end SLURM requeues from: the controller may know better.
    (None, True), (PENDING, True), (RUNNING, True),
    (TaskState("REQUEUED"), True), (TaskState("NODE_FAIL", "0:0"), True),
    (TaskState("PREEMPTED", "0:0"), True), (TaskState("BOOT_FAIL", "0:0"), True),
])
def test_needs_controller(accounting, expected):
    assert needs_controller(accounting) is expected


@pytest.mark.parametrize("accounting, queued, expected", [
    # Neither has it: nothing to say (status reads the task's records).
    (None, None, None),
    # sacct lags sbatch: the queue fills the gap.
    (None, TaskState("PENDING"), TaskState("PENDING")),
    # Accounting says live, the controller knows better (it lists a task until MinJobAge).
    (RUNNING, TaskState("COMPLETED", None, "0:30", "n1"), TaskState("COMPLETED", None, "0:30", "n1")),
    (PENDING, TaskState("RUNNING", None, "0:01", "n1"), TaskState("RUNNING", None, "0:01", "n1")),
    # Accounting says live, the controller no longer has it: ended, accounting missed the end.
    (PENDING, None, replace(PENDING, left_queue=True)),
    (RUNNING, None, replace(RUNNING, left_queue=True)),
    # Requeued after a node failure or preemption: pending again, the same attempt.
    (TaskState("NODE_FAIL", "0:0", "00:01:00", "n1"), TaskState("PENDING"), TaskState("PENDING")),
    (TaskState("PREEMPTED", "0:0", "00:01:00", "n1"), TaskState("RUNNING"), TaskState("RUNNING")),
    # Both say it ended: accounting's row, with its exit code.
    (TaskState("NODE_FAIL", "0:0", "00:01:00", "n1"), TaskState("NODE_FAIL"),
     TaskState("NODE_FAIL", "0:0", "00:01:00", "n1")),
    (TaskState("FAILED", "1:0"), TaskState("FAILED"), TaskState("FAILED", "1:0")),
    (TaskState("NODE_FAIL", "0:0"), None, TaskState("NODE_FAIL", "0:0")),
])
def test_controller_view(accounting, queued, expected):
    assert controller_view(accounting, queued) == expected


def test_a_task_cancelled_alone_from_a_pending_array_reads_from_the_queue():
    """`scancel 41_1` while the whole array is one pending record: sacct's range still covers
    41_1 (until slurmdbd hears of it, or the array's first task starts), while squeue --array
    lists every other task and not 41_1 (SLURM 22.05 drops a pending task cancelled alone)."""
    accounting = parse_sacct("41_[0-2%1]|PENDING|0:0|00:00:00|None assigned|a41\n", {"41": "a41"})
    queue = parse_squeue("41_0|PENDING|0:00||a41\n41_2|PENDING|0:00||a41\n", {"41": "a41"})
    views = {i: controller_view(accounting[f"41_{i}"], queue.get(f"41_{i}")) for i in range(3)}
    assert {i: (v.state, v.left_queue) for i, v in views.items()} == {
        0: ("PENDING", False), 1: ("PENDING", True), 2: ("PENDING", False)}


# Every state SLURM 22.05-24.x prints for a job in sacct's State and squeue's %T (job_state_string
# and its flags), and what `resubmit` makes of it: RESUBMIT ended without success; LIVE may still
# run (held, suspended, requeued, stopped, in a federation), or has: never submitted again.
RESUBMIT = ["FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "CANCELLED", "CANCELLED by 0",
            "CANCELLED by 1000", "BOOT_FAIL", "DEADLINE", "PREEMPTED"]
LIVE = ["PENDING", "RUNNING", "SUSPENDED", "COMPLETING", "CONFIGURING", "RESIZING", "REQUEUED",
        "REQUEUE_FED", "REQUEUE_HOLD", "SPECIAL_EXIT", "STAGE_OUT", "STOPPED", "SIGNALING",
        "RESV_DEL_HOLD", "REVOKED"]


@pytest.mark.parametrize("printed", RESUBMIT + LIVE + ["COMPLETED"])
def test_every_state_slurm_prints_parses_and_has_a_resubmit_decision(printed):
    base = printed.split(" ")[0]
    accounting = parse_sacct(f"7_0|{printed}|0:0|00:01:00|n1|a7\n", {"7": "a7"})
    queue = parse_squeue(f"7_0|{printed}|1:00|n1|a7\n", {"7": "a7"})
    assert accounting["7_0"].state == queue["7_0"].state == base
    chosen, refused = choose_resubmit([status("c", base)], max_attempts=2)
    if printed in RESUBMIT:
        assert chosen and not is_live(base)
    elif printed in LIVE:
        assert refused[0].reason == f"latest attempt is {base}, not a terminal failure" and is_live(base)
    else:
        assert refused[0].reason == "already COMPLETED"


def test_an_array_over_several_rows_with_step_rows_maps_every_task_once():
    """Pending ranges split by tasks that started (and by scancel), step rows of a task that
    ran (sacct without -X prints them; they repeat the job's state), and a requeued task."""
    text = ("123_[4-7]|PENDING|0:0|00:00:00|None assigned|a\n"
            "123_[9,11%2]|PENDING|0:0|00:00:00|None assigned|a\n"
            "123_8|RUNNING|0:0|00:01:00|n1|a\n123_8.batch|RUNNING|0:0|00:01:00|n1|a\n"
            "123_8.extern|RUNNING|0:0|00:01:00|n1|a\n123_8.0|FAILED|1:0|00:00:30|n1|a\n"
            "123_2|REQUEUED|0:0|00:00:02|n1|a\n123_2.batch|CANCELLED|0:15|00:00:02|n1|a\n")
    states = parse_sacct(text, {"123": "a"})
    assert {k: s.state for k, s in states.items()} == {
        **{f"123_{i}": "PENDING" for i in (4, 5, 6, 7, 9, 11)}, "123_8": "RUNNING", "123_2": "REQUEUED"}


def test_a_task_revoked_in_a_federation_is_not_read_as_gone():
    """REVOKED: a federation ran the job on another cluster, whose queue this cluster's squeue
    does not list. Taken as gone it read LOST, and resubmit ran the cell a second time."""
    revoked = TaskState("REVOKED", "0:0", "00:00:00", None)
    assert not needs_controller(revoked)
    assert controller_view(revoked, None) == revoked
