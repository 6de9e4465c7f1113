"""`status_snapshot.snapshot`: states that need the clock or the cells' result records, with sacct and
squeue answered by a recording fake at the subprocess boundary."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from bakery_slurm.cell_status import CellStatus
from bakery_slurm.cli.common import status_columns, status_rows
from bakery_slurm.errors import SchedulerError
from bakery_slurm.evaluation import failure_path
from bakery_slurm.executors import SlurmBackend
from bakery_slurm.ledger import (
    Ledger, PlannedArray, confirm_array, load_ledger, record_intent, record_cancel, save_ledger)
from bakery_slurm.login_push import VERIFIED
from bakery_slurm.output import format_rows
from bakery_slurm.pipeline import CellPaths, read_result
from bakery_slurm.resubmit_policy import choose_resubmit, is_live
from bakery_slurm.stages.push import RECORD_FILE
from bakery_slurm.status_snapshot import snapshot
from support import Recorder

CELL = "1b-std/eng-nob__ties"
OTHER = "1b-std/eng-nob__linear"
NO_ACCOUNTING = (1, "", "sacct: error: Slurm accounting storage is disabled")


def ledger_with_one_array(tmp_path: Path, age: timedelta, job_id: str | None,
                          executor: str = "slurm") -> tuple[Path, Ledger]:
    ledger = Ledger()
    planned = PlannedArray(executor=executor, resources={}, cells=[CELL, OTHER],
                           folder=str(tmp_path / "work" / "arrays" / "a"))
    submission = record_intent(ledger, matrix_path=str(tmp_path / "matrix.toml"),
                               matrix_sha256="0" * 64, arrays=[planned],
                               recipe_hashes={CELL: "r", OTHER: "r"},
                               now=datetime.now(timezone.utc) - age)
    if job_id:
        confirm_array(ledger, submission.arrays[0].name, job_id)
    path = tmp_path / "bakery-ledger.json"
    save_ledger(path, ledger)
    return path, ledger


def state_of(tmp_path: Path, ledger_path: Path, ledger: Ledger, runner: Recorder) -> str:
    snap = snapshot(ledger_path, ledger, slurm=SlurmBackend(runner))
    return {s.cell: s.state for s in snap.statuses}[CELL]


def test_a_fresh_unconfirmed_array_waits_and_an_old_one_that_sacct_never_saw_is_lost(tmp_path):
    # Neither sacct nor squeue knows a job by that name.
    runner = Recorder({"sacct": (0, "", ""), "squeue": (0, "", "")})
    path, ledger = ledger_with_one_array(tmp_path, timedelta(seconds=5), None)
    assert state_of(tmp_path, path, ledger, runner) == "UNCONFIRMED"
    path, ledger = ledger_with_one_array(tmp_path, timedelta(minutes=10), None)
    assert state_of(tmp_path, path, ledger, runner) == "LOST"
    assert [call[0] for call in runner.calls] == ["sacct", "squeue"] * 2
    assert all("--name=" in " ".join(call) for call in runner.calls)


def test_an_unconfirmed_array_that_squeue_lists_is_recovered_and_never_lost(tmp_path):
    # Accounting lags (or is down to nothing): the queue has the array by its name.
    for sacct in ((0, "", ""), NO_ACCOUNTING):
        path, ledger = ledger_with_one_array(tmp_path / sacct[2][:5], timedelta(minutes=10), None)
        name = ledger.submissions[0].arrays[0].name
        by_name = f"77_[0-1]|{name}\n"
        states = f"77_0|RUNNING|0:05|n1|{name}\n77_1|PENDING|0:00||{name}\n"
        runner = Recorder({"sacct": sacct, "squeue": lambda argv: (
            0, by_name if "%i|%j" in argv else states, "")})
        snap = snapshot(path, ledger, slurm=SlurmBackend(runner))
        assert snap.notes[0] == f"recovered job id 77 of array {name} by its job name"
        # Without accounting the states come from squeue; where sacct has no row yet, the queue
        # fills the gap: a task it lists is live.
        assert {s.cell: s.state for s in snap.statuses} == {CELL: "RUNNING",
                                                             OTHER: "PENDING"}
        assert load_ledger(path).submissions[0].arrays[0].job_id == "77"


def test_sacct_lag_reads_submitted_then_a_task_gone_unstarted_is_cancelled(tmp_path):
    """A pending task cancelled alone with plain scancel (or by an admin) leaves no row in sacct
    and leaves the queue (SLURM 22.05). With accounting, which has a row for every task that
    started, that is what a task neither shows means once sacct's lag is past: CANCELLED, which
    resubmit takes (it used to read NOT_FOUND forever, which resubmit refused)."""
    runner = Recorder({"sacct": (0, "", ""), "squeue": (0, "", "")})
    path, ledger = ledger_with_one_array(tmp_path, timedelta(seconds=5), "41")
    assert state_of(tmp_path, path, ledger, runner) == "SUBMITTED"
    path, ledger = ledger_with_one_array(tmp_path, timedelta(minutes=10), "41")
    snap = snapshot(path, ledger, slurm=SlurmBackend(runner))
    assert {s.cell: s.state for s in snap.statuses} == {CELL: "CANCELLED", OTHER: "CANCELLED"}
    assert [s.cell for s in choose_resubmit(snap.statuses, max_attempts=3)[0]] == [OTHER, CELL]


def test_a_gone_task_whose_attempt_recorded_its_outcome_reads_that_even_with_accounting(tmp_path):
    """sacct has no row (slurmdbd behind, or its records lost) and the queue forgot the task: its
    result record says how it ended, and a cell that completed is not run again."""
    runner = Recorder({"sacct": (0, "", ""), "squeue": (0, "", "")})
    path, ledger = ledger_with_one_array(tmp_path, timedelta(minutes=10), "41")
    write_result(tmp_path, "done", datetime.now(timezone.utc) - timedelta(minutes=5))
    assert state_of(tmp_path, path, ledger, runner) == "COMPLETED"


def test_a_queue_that_cannot_be_asked_about_tasks_sacct_lacks_is_an_error_not_a_state(tmp_path):
    """A task neither sacct nor squeue shows reads as ended: when squeue fails, the tasks sacct
    has no row for may still be pending or running, so status fails (exit 3) instead."""
    runner = Recorder({"sacct": (0, "", ""),
                       "squeue": (1, "", "squeue: error: slurm_load_jobs error: Socket timed out")})
    path, ledger = ledger_with_one_array(tmp_path, timedelta(minutes=10), "41")
    with pytest.raises(SchedulerError, match="Socket timed out"):
        snapshot(path, ledger, slurm=SlurmBackend(runner))


def test_a_task_cancelled_alone_while_its_array_is_one_pending_record_is_cancelled_at_once(tmp_path):
    """`scancel 41_1` while nothing of array 41 has started (held, or waiting on resources):
    sacct still shows the whole array as one pending range, which covers 41_1, while the
    controller has dropped it (squeue lists 41_0 only). It read PENDING, which resubmit refuses,
    until the array's first task started; the queue settles it CANCELLED at once."""
    path, ledger = ledger_with_one_array(tmp_path, timedelta(seconds=5), "41")
    name = ledger.submissions[0].arrays[0].name
    runner = Recorder({"sacct": (0, f"41_[0-1%1]|PENDING|0:0|00:00:00|None assigned|{name}\n", ""),
                       "squeue": (0, f"41_0|PENDING|0:00||{name}\n", "")})
    snap = snapshot(path, ledger, slurm=SlurmBackend(runner))
    assert {s.cell: s.state for s in snap.statuses} == {CELL: "PENDING", OTHER: "CANCELLED"}
    assert [s.cell for s in choose_resubmit(snap.statuses, max_attempts=3)[0]] == [OTHER]
    # Once slurmdbd has heard of the cancel, its range no longer covers 41_1: neither shows it,
    # and as the scheduler shows the rest of its array, that is no lag of a fresh array.
    runner = Recorder({"sacct": (0, f"41_[0%1]|PENDING|0:0|00:00:00|None assigned|{name}\n", ""),
                       "squeue": (0, f"41_0|PENDING|0:00||{name}\n", "")})
    assert states(path, ledger, runner) == {CELL: "PENDING", OTHER: "CANCELLED"}


def accounting_says_running(tmp_path: Path, age: timedelta, squeue: tuple[int, str, str]) -> dict[str, str]:
    """The states of CELL (41_0) and OTHER (41_1) when sacct shows both RUNNING and squeue
    answers `squeue`."""
    path, ledger = ledger_with_one_array(tmp_path, age, "41")
    name = ledger.submissions[0].arrays[0].name
    runner = Recorder({"sacct": (0, f"41_0|RUNNING|0:0|00:05:00|n1|{name}\n"
                                    f"41_1|RUNNING|0:0|00:05:00|n1|{name}\n", ""),
                       "squeue": squeue})
    return states(path, ledger, runner)


def test_a_task_accounting_shows_running_that_left_the_queue_ended_as_its_record_says(tmp_path):
    """slurmdbd was down (or is behind) when the tasks ended: sacct still says RUNNING, but the
    controller no longer has them. They read RUNNING forever (live: never resubmitted, and
    `submit` refused the cells). CELL's task recorded its end (COMPLETED); OTHER's recorded
    nothing, killed at a limit or with its node: LOST, which resubmit takes."""
    write_result(tmp_path, "done", datetime.now(timezone.utc) - timedelta(minutes=5), task="41_0")
    assert accounting_says_running(tmp_path, timedelta(minutes=10), (0, "", "")) == {
        CELL: "COMPLETED", OTHER: "LOST"}


def test_a_task_accounting_shows_running_that_left_the_queue_is_settled_only_past_sacct_lag(tmp_path):
    assert accounting_says_running(tmp_path, timedelta(seconds=5), (0, "", "")) == {
        CELL: "RUNNING", OTHER: "RUNNING"}


def test_the_queue_decides_where_accounting_says_running(tmp_path):
    """squeue lists a task until MinJobAge after it ended: what it says stands over sacct's
    RUNNING, and a task it lists is never gone."""
    path, ledger = ledger_with_one_array(tmp_path, timedelta(minutes=10), "41")
    name = ledger.submissions[0].arrays[0].name
    runner = Recorder({"sacct": (0, f"41_0|RUNNING|0:0|00:05:00|n1|{name}\n"
                                    f"41_1|RUNNING|0:0|00:05:00|n1|{name}\n", ""),
                       "squeue": (0, f"41_0|TIMEOUT|5:00|n1|{name}\n41_1|RUNNING|5:00|n1|{name}\n", "")})
    assert states(path, ledger, runner) == {CELL: "TIMEOUT", OTHER: "RUNNING"}


def test_a_queue_that_cannot_be_asked_about_tasks_sacct_shows_live_is_an_error_not_gone(tmp_path):
    squeue = (1, "", "squeue: error: slurm_load_jobs error: Unable to contact slurm controller")
    with pytest.raises(SchedulerError, match="Unable to contact slurm controller"):
        accounting_says_running(tmp_path, timedelta(minutes=10), squeue)


def test_a_task_requeued_after_its_node_failed_is_pending_again_not_resubmitted(tmp_path):
    """SLURM requeues a task whose node failed (JobRequeue=1) under the same id; accounting may
    still show NODE_FAIL while the controller has it pending again. resubmit took it: the cell
    ran twice."""
    path, ledger = ledger_with_one_array(tmp_path, timedelta(minutes=10), "41")
    name = ledger.submissions[0].arrays[0].name
    runner = Recorder({"sacct": (0, f"41_0|NODE_FAIL|0:0|00:05:00|n1|{name}\n"
                                    f"41_1|NODE_FAIL|0:0|00:05:00|n1|{name}\n", ""),
                       "squeue": (0, f"41_0|PENDING|0:00||{name}\n", "")})
    snap = snapshot(path, ledger, slurm=SlurmBackend(runner))
    assert {s.cell: s.state for s in snap.statuses} == {CELL: "PENDING", OTHER: "NODE_FAIL"}
    assert [s.cell for s in choose_resubmit(snap.statuses, max_attempts=3)[0]] == [OTHER]


def write_result(tmp_path: Path, status: str, started: datetime, recipe_hash: str = "r",
                 task: str | None = None) -> None:
    paths = CellPaths(tmp_path / "work", CELL)
    paths.root.mkdir(parents=True)
    paths.result.write_text(json.dumps({"status": status, "recipe_hash": recipe_hash,
                                        "started": started.isoformat(timespec="seconds"),
                                        "task": task}))


def test_without_accounting_a_gone_task_takes_its_state_from_this_attempts_result(tmp_path):
    runner = Recorder({"sacct": NO_ACCOUNTING, "squeue": (0, "", "")})
    path, ledger = ledger_with_one_array(tmp_path, timedelta(minutes=10), "41")
    write_result(tmp_path, "failed", datetime.now(timezone.utc) - timedelta(minutes=5))
    snap = snapshot(path, ledger, slurm=SlurmBackend(runner))
    assert {s.cell: s.state for s in snap.statuses}[CELL] == "FAILED"
    assert snap.notes == ["states from squeue + completion markers (SLURM accounting is disabled; "
                          "finished tasks are read from result.json)"]


def test_without_accounting_an_older_result_says_nothing_about_this_attempt(tmp_path):
    runner = Recorder({"sacct": NO_ACCOUNTING, "squeue": (0, "", "")})
    path, ledger = ledger_with_one_array(tmp_path, timedelta(minutes=10), "41")
    write_result(tmp_path, "done", datetime.now(timezone.utc) - timedelta(hours=2))
    assert state_of(tmp_path, path, ledger, runner) == "LOST"


def test_a_result_naming_its_task_is_read_by_that_task_whatever_the_clocks_say(tmp_path):
    """A compute node's clock minutes behind the login node's dates this attempt's record
    before its array was submitted: it used to be ignored, and a task that recorded its failure
    read LOST. The record names the task that wrote it (CELL is task 0 of array 41)."""
    runner = Recorder({"sacct": NO_ACCOUNTING, "squeue": (0, "", "")})
    path, ledger = ledger_with_one_array(tmp_path, timedelta(minutes=10), "41")
    write_result(tmp_path, "failed", datetime.now(timezone.utc) - timedelta(minutes=15), task="41_0")
    assert state_of(tmp_path, path, ledger, runner) == "FAILED"


def test_a_result_written_by_another_task_says_nothing_about_this_attempt(tmp_path):
    """The previous attempt (task 40_0) completed seconds before this one was submitted, within
    the clock-skew allowance: this attempt's task, cancelled before it started, used to read as
    that record's COMPLETED, and resubmit refused it."""
    runner = Recorder({"sacct": (0, "", ""), "squeue": (0, "", "")})
    path, ledger = ledger_with_one_array(tmp_path, timedelta(minutes=10), "41")
    write_result(tmp_path, "done", ledger.submissions[0].arrays[0].submitted - timedelta(seconds=30),
                 task="40_0")
    assert state_of(tmp_path, path, ledger, runner) == "CANCELLED"


def test_without_accounting_a_task_killed_without_a_word_is_lost_and_resubmittable(tmp_path):
    """A task killed at its time or memory limit leaves its result record "running"; without
    accounting nothing else remembers it once it leaves the queue (MinJobAge). It used to read
    NOT_FOUND forever, which resubmit refused; it is LOST, says where it stopped, and counts as
    an attempt (a scheduler ran it)."""
    runner = Recorder({"sacct": NO_ACCOUNTING, "squeue": (0, "", "")})
    path, ledger = ledger_with_one_array(tmp_path, timedelta(minutes=10), "41")
    write_running(tmp_path, {"bake": {"status": "done"},
                             "merge": {"status": "running", "started": "2026-11-28T03:40:00+00:00"}})
    snap = snapshot(path, ledger, slurm=SlurmBackend(runner))
    (status,) = [s for s in snap.statuses if s.cell == CELL]
    assert (status.state, status.detail) == ("LOST", "stopped in merge (started 2026-11-28T03:40:00+00:00)")
    assert [s.cell for s in choose_resubmit([status], max_attempts=2)[0]] == [CELL]
    assert choose_resubmit([status], max_attempts=1)[1][0].reason == "reached the attempt cap (1 of 1)"


def test_a_task_cancelled_while_pending_is_cancelled_not_not_found(tmp_path):
    # SLURM 22.05 keeps no accounting row for it; the ledger knows `cancel` cancelled it.
    runner = Recorder({"sacct": NO_ACCOUNTING, "squeue": (0, "", "")})
    path, ledger = ledger_with_one_array(tmp_path, timedelta(minutes=10), "41")
    assert state_of(tmp_path, path, ledger, runner) == "LOST"
    record_cancel(ledger, CELL, ledger.cells[CELL][-1].array, ledger.cells[CELL][-1].index)
    assert state_of(tmp_path, path, ledger, runner) == "CANCELLED"
    # Accounting may keep showing the array's pending range, which still covers the task.
    name = ledger.submissions[0].arrays[0].name
    runner = Recorder({"sacct": (0, f"41_[0-1%1]|PENDING|0:0|00:00:00|None assigned|{name}\n", ""),
                       "squeue": (0, f"41_1|PENDING|0:00||{name}\n", "")})
    assert state_of(tmp_path, path, ledger, runner) == "CANCELLED"
    # A row past PENDING wins over the note: the cancel came as the task started.
    name = ledger.submissions[0].arrays[0].name
    runner = Recorder({"sacct": (0, f"41_0|COMPLETED|0:0|00:01:00|n1|{name}\n", ""),
                       "squeue": (0, "", "")})
    assert state_of(tmp_path, path, ledger, runner) == "COMPLETED"


def write_running(tmp_path: Path, stages: dict, status: str = "running", error: str | None = None) -> None:
    paths = CellPaths(tmp_path / "work", CELL)
    paths.root.mkdir(parents=True, exist_ok=True)
    paths.result.write_text(json.dumps({
        "status": status, "recipe_hash": "r", "stages": stages, "error": error,
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}))


def detail_of(tmp_path: Path, sacct_state: str) -> str | None:
    path, ledger = ledger_with_one_array(tmp_path, timedelta(minutes=10), "41")
    name = ledger.submissions[0].arrays[0].name
    runner = Recorder({"sacct": (0, f"41_0|{sacct_state}|0:0|00:01:00|n1|{name}\n", ""),
                       "squeue": (0, f"41_0|{sacct_state}|1:00|n1|{name}\n", "")})
    return {s.cell: s.detail for s in snapshot(path, ledger, slurm=SlurmBackend(runner)).statuses}[CELL]


def test_status_detail_names_the_running_stage_and_since_when(tmp_path):
    write_running(tmp_path, {"bake": {"status": "done"},
                             "merge": {"status": "running", "started": "2026-11-28T03:40:00+00:00"}})
    assert detail_of(tmp_path, "RUNNING") == "merge since 2026-11-28T03:40:00+00:00"
    assert detail_of(tmp_path, "TIMEOUT") == "stopped in merge (started 2026-11-28T03:40:00+00:00)"


def test_status_detail_of_a_failed_cell_is_its_error(tmp_path):
    write_running(tmp_path, {"bake": {"status": "failed"}}, status="failed",
                  error="bake: adapter nob (/m/nob): /m/nob/adapter_model.safetensors: bad header")
    assert detail_of(tmp_path, "FAILED") == \
        "bake: adapter nob (/m/nob): /m/nob/adapter_model.safetensors: bad header"


def ended_in(tmp_path: Path, slurm_state: str, record: dict, task: str = "41_0",
             prepared: bool = False) -> CellStatus:
    """CELL's status when SLURM says its task (41_0) ended in `slurm_state` and its result
    record (written by `task`) is `record`; `prepared`: its publish folder is prepared."""
    path, ledger = ledger_with_one_array(tmp_path, timedelta(minutes=10), "41")
    paths = CellPaths(tmp_path / "work", CELL)
    paths.root.mkdir(parents=True)
    paths.result.write_text(json.dumps({
        "recipe_hash": "r", "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "task": task, **record}))
    if prepared:
        paths.publish.mkdir(parents=True)
        (paths.publish / RECORD_FILE).write_text(json.dumps({"recipe_hash": "r"}))
    name = ledger.submissions[0].arrays[0].name
    runner = Recorder({"sacct": (0, f"41_0|{slurm_state}|0:9|00:05:00|n1|{name}\n", ""),
                       "squeue": (0, "", "")})
    snap = snapshot(path, ledger, slurm=SlurmBackend(runner))
    return next(s for s in snap.statuses if s.cell == CELL)


PUBLISHED = {"status": "done", "stages": {"verify": {"status": "done"}, "push": {"status": "done"}}}
PUSH_FAILED = {"status": "failed", "error": "push: 503",
               "stages": {"verify": {"status": "done"}, "push": {"status": "failed"}}}
DEFERRED = {"status": VERIFIED, "stages": {"verify": {"status": "done"}, "push": {"status": "deferred"}}}


@pytest.mark.parametrize("slurm_state", ["FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL",
                                         "CANCELLED", "PREEMPTED"])
def test_a_task_killed_after_its_cell_was_published_is_completed_not_rerun(tmp_path, slurm_state):
    """SLURM reports the task failed (killed in teardown: a time or memory limit, its node, a
    signal), but its own record says the cell was verified and published: the work is done.
    Only FAILED used to be read so, and only after a push from the login node: resubmit ran
    the cell again."""
    status = ended_in(tmp_path, slurm_state, PUBLISHED)
    assert status.state == "COMPLETED"
    assert choose_resubmit([status], max_attempts=3)[1][0].reason == "already COMPLETED"


@pytest.mark.parametrize("record", [PUSH_FAILED, DEFERRED])
def test_a_task_killed_after_verify_whose_push_is_left_is_unpublished(tmp_path, record):
    status = ended_in(tmp_path, "TIMEOUT", record, prepared=True)
    assert status.state == "UNPUBLISHED"
    assert choose_resubmit([status], max_attempts=3)[0] == []


def test_a_record_another_task_wrote_does_not_settle_a_failed_task(tmp_path):
    assert ended_in(tmp_path, "TIMEOUT", PUBLISHED, task="40_0").state == "TIMEOUT"


def ledger_with_one_eval(tmp_path: Path, target: str) -> tuple[Path, Ledger]:
    """A ledger whose one eval array (job 52, of `target`) was submitted 10 minutes ago."""
    ledger = Ledger()
    planned = PlannedArray(executor="slurm", resources={}, cells=[target], stage="eval",
                           folder=str(tmp_path / "work" / "arrays" / "e"))
    submission = record_intent(ledger, matrix_path=str(tmp_path / "matrix.toml"),
                               matrix_sha256="0" * 64, arrays=[planned], recipe_hashes={},
                               eval_hashes={target: "s"},
                               now=datetime.now(timezone.utc) - timedelta(minutes=10))
    confirm_array(ledger, submission.arrays[0].name, "52")
    path = tmp_path / "bakery-ledger.json"
    save_ledger(path, ledger)
    return path, ledger


def eval_state_without_accounting(tmp_path: Path, write: dict[str, timedelta],
                                  task: str | None = None) -> str:
    """The state of CELL's eval (its task gone from squeue), with the eval folder holding the
    given records ("results" and/or "failure"), each written that long ago (by SLURM task
    `task`, when given); the eval array (job 52, one task) was submitted 10 minutes ago."""
    from bakery_slurm.evaluation import results_path

    path, ledger = ledger_with_one_eval(tmp_path, CELL)
    work = tmp_path / "work"
    for kind, age in write.items():
        finished = (datetime.now(timezone.utc) - age).isoformat(timespec="seconds")
        if kind == "failure":  # written by hand or another tool: no UTC offset, read as UTC
            finished = finished.removesuffix("+00:00")
        target = results_path(work, CELL) if kind == "results" else failure_path(work, CELL)
        target.parent.mkdir(parents=True, exist_ok=True)
        named = {} if task is None else {"task": task}
        target.write_text(json.dumps({"bakery": {"finished": finished, **named}} if kind == "results"
                                     else {"error": "lm-eval failed", "finished": finished, **named}))
    runner = Recorder({"sacct": NO_ACCOUNTING, "squeue": (0, "", "")})
    (status,) = snapshot(path, ledger, slurm=SlurmBackend(runner)).evals
    # A failed eval says why; one that did not fail says nothing.
    assert status.detail == ("lm-eval failed" if status.state == "FAILED" else None)
    return status.state


def test_without_accounting_a_gone_eval_reads_its_records_of_this_attempt(tmp_path):
    minute = timedelta(minutes=1)
    assert eval_state_without_accounting(tmp_path / "a", {"results": 2 * minute}) == "COMPLETED"
    assert eval_state_without_accounting(tmp_path / "b", {"failure": 2 * minute}) == "FAILED"
    # an older eval's results, then this attempt failed: FAILED (and the other way round)
    assert eval_state_without_accounting(tmp_path / "c", {"results": 60 * minute,
                                                          "failure": 2 * minute}) == "FAILED"
    assert eval_state_without_accounting(tmp_path / "d", {"failure": 5 * minute,
                                                          "results": 2 * minute}) == "COMPLETED"
    # records older than the attempt say nothing about it: killed, cancelled or never run,
    # nothing says which (it used to read NOT_FOUND forever, which resubmit refused)
    assert eval_state_without_accounting(tmp_path / "e", {"failure": 60 * minute}) == "LOST"
    assert eval_state_without_accounting(tmp_path / "f", {}) == "LOST"


def test_an_eval_record_naming_its_task_is_read_by_that_task_whatever_the_clocks_say(tmp_path):
    """A node whose clock is behind dates this attempt's records before its array was submitted;
    one written just before by the previous attempt's task falls within the clock allowance.
    Both are told apart by the task that wrote them (job 52 here: a one-task array)."""
    minute = timedelta(minutes=1)
    assert eval_state_without_accounting(tmp_path / "a", {"failure": 15 * minute}, "52") == "FAILED"
    assert eval_state_without_accounting(tmp_path / "b", {"results": 10 * minute}, "51") == "LOST"


# ---------------------------------------------------------------------------------------------
# A ledger shared by a group: the owner's arrays seen from a teammate's account


@dataclass
class Job:
    job_id: str
    name: str
    user: str
    tasks: dict[int, str]  # index -> state


@dataclass
class Cluster:
    """sacct/squeue of a cluster whose jobs belong to several users, asked by `me`.

    Visibility as SLURM 22.05 with PrivateData=none has it: `sacct -j` lists any user's job;
    `sacct --name=...` lists only the caller's jobs unless `-a/--allusers`; `squeue --me` only
    the caller's jobs (`squeue` without --me/-u lists everyone's). With `private` (PrivateData=jobs
    in slurm.conf and slurmdbd.conf) neither lists another user's jobs, however asked, and
    `scontrol show config` says so."""

    me: str
    jobs: list[Job]
    accounting: bool = True
    private: bool = False

    def visible(self, job: Job) -> bool:
        return not self.private or job.user == self.me

    def scontrol(self, argv: list[str]) -> tuple[int, str, str]:
        assert argv == ["scontrol", "show", "config"], argv
        return 0, f"MaxArraySize            = 1001\nPrivateData             = " \
                  f"{'jobs,usage' if self.private else 'none'}\n", ""

    def sacct(self, argv: list[str]) -> tuple[int, str, str]:
        if not self.accounting:
            return NO_ACCOUNTING
        all_users = "-a" in argv or "--allusers" in argv
        ids = next((argv[i + 1].split(",") for i, a in enumerate(argv) if a == "-j"), None)
        names = next((a.split("=", 1)[1].split(",") for a in argv if a.startswith("--name=")), None)
        out = []
        for job in filter(self.visible, self.jobs):
            if ids is not None and job.job_id not in ids:
                continue
            if ids is None and not all_users and job.user != self.me:
                continue
            if names is not None and job.name not in names:
                continue
            for index, state in job.tasks.items():
                if argv[argv.index("-o") + 1] == "JobID,JobName":
                    out.append(f"{job.job_id}_{index}|{job.name}")
                else:
                    out.append(f"{job.job_id}_{index}|{state}|0:0|00:01:00|n1|{job.name}")
        return 0, "\n".join(out) + "\n", ""

    def squeue(self, argv: list[str]) -> tuple[int, str, str]:
        names = next((a.split("=", 1)[1].split(",") for a in argv if a.startswith("--name=")), None)
        out = []
        for job in filter(self.visible, self.jobs):
            if "--me" in argv and job.user != self.me:
                continue
            if names is not None and job.name not in names:
                continue
            for index, state in job.tasks.items():
                if "%i|%j" in argv:
                    out.append(f"{job.job_id}_{index}|{job.name}")
                else:
                    out.append(f"{job.job_id}_{index}|{state}|1:00|n1|{job.name}")
        return 0, "\n".join(out) + "\n", ""

    def runner(self) -> Recorder:
        return Recorder({"sacct": self.sacct, "squeue": self.squeue, "scontrol": self.scontrol})


def states(path: Path, ledger: Ledger, runner) -> dict[str, str]:
    return {s.cell: s.state for s in snapshot(path, ledger, slurm=SlurmBackend(runner)).statuses}


def test_a_teammates_status_recovers_the_owners_unconfirmed_array_instead_of_calling_it_lost(
        tmp_path):
    """alice's submit crashed after sbatch (her array has no job id in the shared ledger); bob,
    in the same group, runs status/resubmit on it. `sacct --name` without --allusers and
    `squeue --me` both hide alice's job from bob, so the array is LOST and bob's resubmit runs
    both cells a second time, next to alice's running ones."""
    path, ledger = ledger_with_one_array(tmp_path, timedelta(minutes=10), None)
    name = ledger.submissions[0].arrays[0].name
    cluster = Cluster(me="bob", jobs=[Job("77", name, "alice", {0: "RUNNING", 1: "PENDING"})])
    snap = snapshot(path, ledger, slurm=SlurmBackend(cluster.runner()))
    by_cell = {s.cell: s for s in snap.statuses}
    assert by_cell[CELL].state != "LOST", "alice's running array is called LOST in bob's status"
    chosen, _ = choose_resubmit(snap.statuses, max_attempts=3)
    assert chosen == [], "bob's resubmit would run alice's running cells a second time"


ALICE, BOB = 4242, 4343


def test_a_teammates_tasks_the_cluster_hides_are_hidden_not_gone(tmp_path, monkeypatch):
    """PrivateData=jobs: sacct and squeue show bob none of alice's jobs, so her array's tasks
    were gone past sacct's lag: CANCELLED in bob's status, and his resubmit ran her running cell
    a second time. Her task that recorded its end reads as recorded; the other may still run."""
    path, ledger = ledger_with_one_array(tmp_path, timedelta(minutes=10), "77")
    array = ledger.submissions[0].arrays[0]
    Path(array.folder).mkdir(parents=True)
    os.chown(array.folder, ALICE, -1)  # her submit made it
    write_result(tmp_path, "done", datetime.now(timezone.utc) - timedelta(minutes=5), task="77_0")
    cluster = Cluster(me="bob", private=True,
                      jobs=[Job("77", array.name, "alice", {0: "COMPLETED", 1: "RUNNING"})])
    monkeypatch.setattr(os, "getuid", lambda: BOB)
    snap = snapshot(path, ledger, slurm=SlurmBackend(cluster.runner()))
    assert {s.cell: s.state for s in snap.statuses} == {CELL: "COMPLETED", OTHER: "HIDDEN"}
    assert any("PrivateData=jobs" in note for note in snap.notes)
    chosen, refused = choose_resubmit(snap.statuses, max_attempts=3)
    assert chosen == [] and "another user's" in {r.cell: r.reason for r in refused}[OTHER]
    # Alice sees her own jobs; and where the cluster shows everyone's, bob sees them too.
    monkeypatch.setattr(os, "getuid", lambda: ALICE)
    cluster.me = "alice"
    assert states(path, ledger, cluster.runner()) == {CELL: "COMPLETED", OTHER: "RUNNING"}
    monkeypatch.setattr(os, "getuid", lambda: BOB)
    cluster.me, cluster.private = "bob", False
    assert states(path, ledger, cluster.runner()) == {CELL: "COMPLETED", OTHER: "RUNNING"}


def test_the_scheduler_configuration_is_read_only_for_a_teammates_array(tmp_path):
    """Every `status` of one's own arrays costs no `scontrol show config`."""
    path, ledger = ledger_with_one_array(tmp_path, timedelta(minutes=10), "77")
    array = ledger.submissions[0].arrays[0]
    Path(array.folder).mkdir(parents=True)
    runner = Cluster(me="root", jobs=[Job("77", array.name, "root", {0: "RUNNING", 1: "RUNNING"})]).runner()
    assert states(path, ledger, runner) == {CELL: "RUNNING", OTHER: "RUNNING"}
    assert not [call for call in runner.calls if call[0] == "scontrol"]


def test_without_accounting_a_teammate_sees_the_owners_running_tasks_as_live(tmp_path):
    """Without accounting the states come from `squeue --me`: bob does not see alice's tasks,
    so they read NOT_FOUND, which is not live: bob's `submit` submits both cells again, and his
    `cancel` says "nothing to cancel"."""
    path, ledger = ledger_with_one_array(tmp_path, timedelta(minutes=10), "77")
    name = ledger.submissions[0].arrays[0].name
    cluster = Cluster(me="bob", accounting=False,
                      jobs=[Job("77", name, "alice", {0: "RUNNING", 1: "PENDING"})])
    got = states(path, ledger, cluster.runner())
    assert got == {CELL: "RUNNING", OTHER: "PENDING"}
    assert all(is_live(state) for state in got.values())


def test_a_task_the_queue_still_runs_is_live_even_when_accounting_has_no_row_for_it(tmp_path):
    """slurmdbd lost the array's records (restored database, or records still queued in the
    controller's DBD agent): sacct succeeds with no rows, while squeue shows the tasks running.
    The cells read NOT_FOUND, which is not live, so `submit` submits them again while they run
    (and `cancel` does not cancel them)."""
    path, ledger = ledger_with_one_array(tmp_path, timedelta(minutes=10), "77")
    name = ledger.submissions[0].arrays[0].name
    cluster = Cluster(me="alice", jobs=[Job("77", name, "alice", {0: "RUNNING", 1: "PENDING"})])
    runner = Recorder({"sacct": (0, "", ""), "squeue": cluster.squeue})
    got = states(path, ledger, runner)
    assert all(is_live(state) for state in got.values()), got


def test_an_array_still_being_submitted_is_not_lost_to_a_concurrent_resubmit(tmp_path,
                                                                              monkeypatch):
    """One submit of three arrays (MaxArraySize 1). sbatch of the second array hangs (a busy
    controller: sbatch retries for minutes); three minutes after the intent was recorded, a
    teammate runs `resubmit`. Nothing has the second array yet, so status calls it LOST (which
    README defines as "no scheduler ever had it, e.g. sbatch was interrupted") and resubmit takes
    its cell, while the first submit goes on to sbatch the very same cell."""
    from bakery_slurm import status_snapshot, submission
    from bakery_slurm.ledger import load_ledger
    from bakery_slurm.matrix import expand, load_matrix
    from conftest import MINIMAL_MATRIX

    matrix_path = tmp_path / "matrix.toml"
    matrix_path.write_text(MINIMAL_MATRIX + '\n[methods.linear]\nweight = 0.5\n\n'
                           '[methods.task_arithmetic]\nweight = 0.5\n\n'
                           '[runtime]\ncontainer = "none"\n')
    matrix = load_matrix(matrix_path)
    ledger_path = tmp_path / "bakery-ledger.json"
    seen: dict[str, list] = {}

    class Later(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime.now(tz) + timedelta(minutes=3)

    class SlowSbatch:
        """sbatch for the second array hangs; meanwhile a teammate runs `resubmit`."""

        def __init__(self):
            self.submitted: list[str] = []

        def max_array_size(self):
            return 1

        def submit(self, request):
            self.submitted.append(request.array.name)
            if len(self.submitted) == 2:
                # Three minutes on: what a teammate's `resubmit` sees and chooses.
                with monkeypatch.context() as m:
                    m.setattr(status_snapshot, "datetime", Later)
                    cluster = Recorder({"sacct": (0, "", ""), "squeue": (0, "", "")})
                    snap = snapshot(ledger_path, load_ledger(ledger_path),
                                    slurm=SlurmBackend(cluster))
                chosen, _ = choose_resubmit(snap.statuses, max_attempts=3)
                seen["states"] = {s.cell: s.state for s in snap.statuses}
                seen["chosen"] = [s.cell for s in chosen]
            return str(100 + len(self.submitted))

        def find_by_name(self, name):
            return None

    monkeypatch.setattr(submission, "backend", lambda name: SlowSbatch())
    submission.submit_cells(ledger_path, matrix, expand(matrix), "slurm")
    being_submitted = load_ledger(ledger_path).submissions[0].arrays[1].cells[0]
    assert seen["states"][being_submitted] != "LOST", seen["states"]
    assert being_submitted not in seen["chosen"], \
        "resubmit takes a cell whose sbatch is still running in another process"


@pytest.mark.parametrize("writer, expected", [("52", "COMPLETED"), ("51", "TIMEOUT")])
def test_an_eval_killed_after_writing_its_results_is_completed(tmp_path, writer, expected):
    """SLURM says TIMEOUT, but this attempt's task (job 52) wrote its results: the scores are
    in, and resubmit must not evaluate again. Results another task wrote say nothing of it."""
    from bakery_slurm.evaluation import results_path

    path, ledger = ledger_with_one_eval(tmp_path, CELL)
    results = results_path(tmp_path / "work", CELL)
    results.parent.mkdir(parents=True)
    results.write_text(json.dumps({"bakery": {
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"), "task": writer}}))
    name = ledger.submissions[0].arrays[0].name
    runner = Recorder({"sacct": (0, f"52|TIMEOUT|0:0|01:00:00|n1|{name}\n", "")})
    [status] = snapshot(path, ledger, slurm=SlurmBackend(runner)).evals
    assert status.state == expected


def test_a_multi_line_eval_error_stays_on_its_row_of_the_status_table(tmp_path):
    target = "1b-std/base"
    path, ledger = ledger_with_one_eval(tmp_path, target)
    name = ledger.submissions[0].arrays[0].name
    failure = failure_path(tmp_path / "work", target)
    failure.parent.mkdir(parents=True)
    # What evaluate.py records for lm-eval's YAML error: str(StageError), several lines.
    failure.write_text(json.dumps({
        "error": f"{target}: stage eval failed: ScannerError: while scanning a simple key\n"
                 '  in "tasks/x.yaml", line 3, column 1\ncould not find expected \':\'',
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}))
    runner = Recorder({"sacct": (0, f"52|FAILED|1:0|00:00:30|n1|{name}\n", "")})
    snap = snapshot(path, ledger, slurm=SlurmBackend(runner))
    rows = status_rows(ledger, snap)
    table = format_rows(rows, status_columns(snap), "table")
    assert len(table.splitlines()) == 1 + len(rows), table


def test_a_table_cell_is_one_line_whatever_its_value():
    rows = [{"cell": "c", "detail": "ScannerError: while scanning\n  in x.yaml\r\tline 3"}]
    assert format_rows(rows, ["cell", "detail"], "table").splitlines()[1] == \
        "c     ScannerError: while scanning in x.yaml line 3"


def test_table_columns_are_padded_by_display_width():
    """A wide (CJK) value takes two terminal columns per character: the next column starts at
    the same screen column on every line."""
    rows = [{"cell": "c", "detail": "模型失败", "log": "x"}, {"cell": "c", "detail": "ab", "log": "y"}]
    assert format_rows(rows, ["cell", "detail", "log"], "table").splitlines() == [
        "cell  detail    log", "c     模型失败  x", "c     ab        y"]


def test_a_result_record_that_is_not_an_object_reads_as_none(tmp_path):
    paths = CellPaths(tmp_path / "work", CELL)
    paths.root.mkdir(parents=True)
    paths.result.write_text("[1]")
    assert read_result(paths) is None


def test_a_local_array_whose_submit_was_interrupted_is_found_running_not_lost(tmp_path,
                                                                               monkeypatch):
    """Ctrl-C in `submit --executor local` just after the array's supervisor started, before the
    ledger recorded its job id: the detached supervisor runs the task all the same. Minutes
    later status finds the array by its folder and shows the task RUNNING, not LOST (which
    resubmit would run a second time)."""
    import os
    import signal

    from bakery_slurm import local, status_snapshot, submission
    from bakery_slurm.executors import LocalBackend
    from bakery_slurm.ledger import load_ledger
    from bakery_slurm.matrix import expand, load_matrix
    from conftest import MINIMAL_MATRIX
    from support import wait_for

    class Later(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime.now(tz) + timedelta(minutes=3)

    matrix_path = tmp_path / "matrix.toml"
    matrix_path.write_text(MINIMAL_MATRIX + '\n[runtime]\ncontainer = "none"\n')
    ledger_path = tmp_path / "bakery-ledger.json"
    monkeypatch.setattr(submission, "task_argv", lambda *args, **kwargs: ["sleep", "60"])
    real_submit = LocalBackend.submit

    def interrupted(request):
        real_submit(request)
        raise KeyboardInterrupt

    monkeypatch.setattr(LocalBackend, "submit", staticmethod(interrupted))
    with pytest.raises(KeyboardInterrupt):
        submission.submit_cells(ledger_path, load_matrix(matrix_path),
                                expand(load_matrix(matrix_path)), "local")
    folder = Path(load_ledger(ledger_path).submissions[0].arrays[0].folder)
    job_id = json.loads((folder / "array.json").read_text())["job_id"]
    try:
        wait_for(lambda: local.read_states(folder, job_id)[f"{job_id}_0"].state == "RUNNING",
                 "the task to run")
        monkeypatch.setattr(status_snapshot, "datetime", Later)
        snap = snapshot(ledger_path, load_ledger(ledger_path))
        assert [(s.state, s.array_job_id) for s in snap.statuses] == [("RUNNING", job_id)]
        assert load_ledger(ledger_path).submissions[0].arrays[0].job_id == job_id
    finally:
        for record in (folder / "0.state.json", folder / "supervisor.json"):
            pid = json.loads(record.read_text()).get("pid")
            if pid is not None:  # the task first (its own group), then its supervisor
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def test_a_local_task_that_outlived_its_supervisor_reads_as_its_record_says(tmp_path):
    """The supervisor was killed (SIGKILL, the OOM killer) while a task ran: the task ran on to
    its end, which no one recorded. It is COMPLETED as its result record says, not NODE_FAIL
    (which resubmit would run again); a task that recorded nothing stays NODE_FAIL."""
    import socket
    import subprocess
    import sys

    path, ledger = ledger_with_one_array(tmp_path, timedelta(minutes=10), "local-ab-0",
                                         executor="local")
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()  # a pid no process has now: the task's
    folder = Path(ledger.submissions[0].arrays[0].folder)
    folder.mkdir(parents=True)
    (folder / "0.state.json").write_text(json.dumps(
        {"state": "RUNNING", "pid": ended.pid, "host": socket.gethostname()}))
    (folder / "1.state.json").write_text(json.dumps({"state": "PENDING"}))
    write_result(tmp_path, "done", datetime.now(timezone.utc) - timedelta(minutes=5))
    snap = snapshot(path, ledger, slurm=SlurmBackend(Recorder()))
    assert {s.cell: s.state for s in snap.statuses} == {CELL: "COMPLETED", OTHER: "NODE_FAIL"}
