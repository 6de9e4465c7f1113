"""Faults a real cluster brings (`-m slurm`): cancels before a task starts (`bakery-slurm
cancel`'s and plain scancel's), sbatch failing after the controller accepted the job, no
accounting, held, suspended and special-exit tasks, and a running task requeued.

As in test_slurm.py, the tool is driven through its CLI only; the push lock of the `dir:` target,
held from another process, keeps the first task of an array RUNNING (at push) while the others
wait their turn (`array_parallelism = 1`), so every state here is certain when it is looked at.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from bakery_slurm.executors import SlurmBackend
from bakery_slurm.ledger import all_arrays, load_ledger

from support import wait_for

from .conftest import SETTLED
from .test_slurm import cid, size, write_matrix

pytestmark = pytest.mark.slurm

QUEUE = [cid("q0", "linear"), cid("q1", "linear"), cid("q2", "linear")]


def one_at_a_time(tmp_path: Path, models: Path) -> Path:
    """A matrix of the three QUEUE cells: one array, one task running at a time."""
    matrix = write_matrix(tmp_path, {name: size(models, "text", ["linear"]) for name in ("q0", "q1", "q2")})
    matrix.write_text(matrix.read_text().replace("array_parallelism = 2", "array_parallelism = 1"))
    return matrix


def scontrol(*args: str) -> None:
    subprocess.run(["scontrol", *args], check=True, capture_output=True, text=True)


def age_ledger(ledger: Path, minutes: int = 10) -> None:
    """Date every submission, array and attempt of `ledger` back by `minutes`: past sacct's
    usual lag, after which status stops reading a task it cannot find as just SUBMITTED."""
    data = json.loads(ledger.read_text())
    old = (datetime.now(timezone.utc) - timedelta(minutes=minutes)).isoformat()
    for submission in data["submissions"]:
        submission["created"] = old
        for array in submission["arrays"]:
            array["submitted"] = old
    for attempts in data["cells"].values():
        for attempt in attempts:
            attempt["submitted"] = old
    ledger.write_text(json.dumps(data))


def resubmit_the_cancelled_one(bakery, ledger: Path) -> None:
    """`resubmit` sends exactly QUEUE[1], CANCELLED, again."""
    again = json.loads(bakery.ok("resubmit", "--json", ledger=ledger).stdout)
    assert [(r["cell"], r["state"]) for r in again if r["action"].startswith("resubmitted in ")] == \
        [(QUEUE[1], "CANCELLED")], again


def assert_all_complete_after_one_resubmit(bakery, ledger: Path) -> None:
    rows = bakery.wait_settled(ledger)
    assert {c: (r["state"], r["attempt"]) for c, r in rows.items()} == {
        QUEUE[0]: ("COMPLETED", 1), QUEUE[1]: ("COMPLETED", 2), QUEUE[2]: ("COMPLETED", 1)}


def test_a_cell_cancelled_while_pending_is_cancelled_and_resubmitted(tmp_path, tiny_models, bakery,
                                                                      held_lock):
    matrix = one_at_a_time(tmp_path, tiny_models)
    ledger = tmp_path / "bakery-ledger.json"
    with held_lock(tmp_path / "published" / ".bakery-push.lock"):
        bakery.ok("submit", matrix, "--executor", "slurm", ledger=ledger)
        rows = bakery.wait(ledger, lambda rows: (rows[QUEUE[0]]["detail"] or "").startswith("push since"),
                           f"{QUEUE[0]} to wait at push")
        # status names the stage a running cell is in, and since when (from its result record).
        since = rows[QUEUE[0]]["detail"].removeprefix("push since ")
        assert rows[QUEUE[0]]["state"] == "RUNNING" and datetime.fromisoformat(since).tzinfo
        assert rows[QUEUE[1]]["state"] == "PENDING"
        out = bakery.ok("cancel", "--only", "q1-*", ledger=ledger).stdout
        assert out.strip().endswith("_1, was PENDING)"), out
        # SLURM 22.05 keeps no accounting row for it: the ledger's note of the cancel decides.
        rows = bakery.wait(ledger, lambda rows: rows[QUEUE[1]]["state"] not in ("PENDING", "SUBMITTED"),
                           f"{QUEUE[1]} to leave PENDING")
        assert rows[QUEUE[1]]["state"] == "CANCELLED"
        resubmit_the_cancelled_one(bakery, ledger)
    assert_all_complete_after_one_resubmit(bakery, ledger)


def test_a_task_scancelled_while_pending_outside_the_tool_is_cancelled_and_resubmitted(
        tmp_path, tiny_models, bakery, held_lock):
    """Plain `scancel` (or an admin) cancels a pending task, so the ledger has no note of it:
    SLURM 22.05 drops it from the queue and keeps no accounting row for it (sacct's pending
    range of the array no longer covers it). It used to read NOT_FOUND forever, which resubmit
    refused."""
    matrix = one_at_a_time(tmp_path, tiny_models)
    ledger = tmp_path / "bakery-ledger.json"
    with held_lock(tmp_path / "published" / ".bakery-push.lock"):
        bakery.ok("submit", matrix, "--executor", "slurm", ledger=ledger)
        rows = bakery.wait(ledger, lambda rows: rows[QUEUE[0]]["state"] == "RUNNING",
                           f"{QUEUE[0]} RUNNING")
        assert rows[QUEUE[1]]["state"] == "PENDING"
        subprocess.run(["scancel", rows[QUEUE[1]]["task"]], check=True, capture_output=True)
        age_ledger(ledger)  # past sacct's lag, where a task nothing shows is not just SUBMITTED
        rows = bakery.wait(ledger, lambda rows: rows[QUEUE[1]]["state"] != "PENDING",
                           f"{QUEUE[1]} to leave PENDING")
        assert (rows[QUEUE[1]]["state"], rows[QUEUE[2]]["state"]) == ("CANCELLED", "PENDING")
        resubmit_the_cancelled_one(bakery, ledger)
    assert_all_complete_after_one_resubmit(bakery, ledger)


def test_a_task_scancelled_while_its_whole_array_is_held_is_cancelled_at_once(
        tmp_path, tiny_models, bakery, monkeypatch):
    """Nothing of the array has started (submitted held, `sbatch --hold`), so sacct shows it as
    one pending range. `scancel` of one task drops it from the controller, while accounting's
    range goes on covering it (until slurmdbd hears of the cancel, or the array's first task
    starts): it read PENDING, which resubmit refuses. The queue settles it CANCELLED at once."""
    matrix = one_at_a_time(tmp_path, tiny_models)
    ledger = tmp_path / "bakery-ledger.json"
    held = tmp_path / "bin" / "sbatch"
    held.parent.mkdir()
    held.write_text(f"#!/bin/sh\nexec {shutil.which('sbatch')} --hold \"$@\"\n")
    held.chmod(0o755)
    with monkeypatch.context() as patch:
        patch.setenv("PATH", f"{held.parent}{os.pathsep}{os.environ['PATH']}")
        bakery.ok("submit", matrix, "--executor", "slurm", ledger=ledger)
    [array] = all_arrays(load_ledger(ledger))

    def accounting() -> str:
        return subprocess.run(["sacct", "-X", "-P", "-n", "-o", "JobID,State", "-j", array.job_id,
                               f"--name={array.name}"],  # not an earlier job's reused id
                              capture_output=True, text=True, check=True).stdout

    wait_for(lambda: f"{array.job_id}_[0-2" in accounting(), "sacct to show the pending range",
             deadline_s=60, interval_s=0.5)
    rows = bakery.wait(ledger, lambda rows: all(r["state"] == "PENDING" for r in rows.values()),
                       "every task PENDING")
    subprocess.run(["scancel", rows[QUEUE[1]]["task"]], check=True, capture_output=True)
    rows = json.loads(bakery.run("status", "--json", ledger=ledger).stdout)
    assert {r["cell"]: r["state"] for r in rows} == {
        QUEUE[0]: "PENDING", QUEUE[1]: "CANCELLED", QUEUE[2]: "PENDING"}, accounting()
    resubmit_the_cancelled_one(bakery, ledger)
    scontrol("release", array.job_id)
    assert_all_complete_after_one_resubmit(bakery, ledger)


def test_a_task_that_fails_after_publishing_its_cell_is_completed_and_not_rerun(
        tmp_path, tiny_models, bakery, monkeypatch):
    """The task's command exits 7 after the cell was verified and published (as a task killed
    in teardown: its container's exit, a time or memory limit). SLURM says FAILED; the result
    record, which names the task, says done. It read FAILED, and resubmit ran the cell again."""
    failing = tmp_path / "bin" / "apptainer"
    failing.parent.mkdir()
    failing.write_text(f"#!/bin/sh\n{shutil.which('apptainer')} \"$@\" || exit $?\nexit 7\n")
    failing.chmod(0o755)
    monkeypatch.setenv("PATH", f"{failing.parent}{os.pathsep}{os.environ['PATH']}")
    cell = cid("k0", "linear")
    matrix = write_matrix(tmp_path, {"k0": size(tiny_models, "text", ["linear"])})
    ledger = tmp_path / "bakery-ledger.json"
    bakery.ok("submit", matrix, "--executor", "slurm", ledger=ledger)
    [array] = all_arrays(load_ledger(ledger))

    def accounting() -> list[str]:
        # by name too: a cluster set up afresh numbers its jobs from 1 again, and accounting
        # keeps the rows of earlier jobs with this id
        return subprocess.run(["sacct", "-X", "-P", "-n", "-o", "State,ExitCode", "-j", array.job_id,
                               f"--name={array.name}"],
                              capture_output=True, text=True, check=True).stdout.split()

    ended = wait_for(lambda: [row for row in accounting() if row.split("|")[0] in SETTLED],
                     "sacct to show the task's end", deadline_s=240, interval_s=1)
    assert ended == ["FAILED|7:0"]
    rows = bakery.wait_settled(ledger)
    assert (rows[cell]["state"], rows[cell]["exit_code"]) == ("COMPLETED", "7:0")
    assert (tmp_path / "published" / cell).is_dir()
    assert json.loads(bakery.ok("resubmit", "--json", ledger=ledger).stdout) == []
    assert len(all_arrays(load_ledger(ledger))) == 1


def test_sbatch_failing_after_the_controller_accepted_the_array_records_it(tmp_path, bakery,
                                                                           monkeypatch):
    """An sbatch that submits and then fails, as one whose reply timed out: the array runs, so the
    ledger must keep it (found in the queue by its unique name), or the next submit runs it twice."""
    wrapper = tmp_path / "bin" / "sbatch"
    wrapper.parent.mkdir()
    wrapper.write_text(f"#!/bin/sh\n{shutil.which('sbatch')} \"$@\" >/dev/null || exit $?\n"
                       "echo 'sbatch: error: Socket timed out on send/recv operation' >&2\nexit 1\n")
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{wrapper.parent}{os.pathsep}{os.environ['PATH']}")
    matrix = write_matrix(tmp_path, {"gone": size(tmp_path / "no-models", "text", ["linear"])})
    ledger = tmp_path / "bakery-ledger.json"
    result = bakery.run("submit", matrix, "--executor", "slurm", "--no-preflight", ledger=ledger)
    assert result.exit_code == 0, result.output
    assert "Socket timed out" in result.stderr and "but the controller has it as job" in result.stderr
    [array] = all_arrays(load_ledger(ledger))
    queued = subprocess.run(["squeue", "-h", "--states=all", f"--name={array.name}", "-o", "%i"],
                            capture_output=True, text=True, check=True).stdout.split()
    assert array.job_id and {q.split("_")[0] for q in queued} == {array.job_id}
    rows = bakery.wait_settled(ledger)
    assert [(r["state"], r["array_job_id"]) for r in rows.values()] == [("FAILED", array.job_id)]


@pytest.fixture
def no_accounting(tmp_path, monkeypatch) -> Path:
    """Point this process's SLURM commands at a copy of slurm.conf with accounting disabled: sacct
    then answers "Slurm accounting storage is disabled", as on a cluster without slurmdbd, while
    sbatch, squeue, scancel and scontrol talk to the same controller. The cluster is untouched."""
    conf = Path(os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf"))
    copy = tmp_path / "etc-slurm" / "slurm.conf"
    copy.parent.mkdir()
    text = "".join(line for line in conf.read_text().splitlines(keepends=True)
                   if not line.startswith(("AccountingStorage", "JobAcctGather")))
    copy.write_text(text + "AccountingStorageType=accounting_storage/none\n")
    monkeypatch.setenv("SLURM_CONF", str(copy))
    check = subprocess.run(["sacct", "-n"], capture_output=True, text=True)
    assert "accounting storage is disabled" in check.stderr.lower(), check
    return copy


class Crash(Exception):
    """The submitting process dies right after sbatch returned, before the ledger write."""


def test_without_accounting_squeue_recovers_and_held_tasks_stay_live(tmp_path, tiny_models, bakery,
                                                                     held_lock, monkeypatch,
                                                                     no_accounting):
    matrix = one_at_a_time(tmp_path, tiny_models)
    ledger = tmp_path / "bakery-ledger.json"
    real_submit = SlurmBackend.submit

    def submit_then_crash(self, request):
        raise Crash(f"killed after sbatch printed job {real_submit(self, request)}")

    with held_lock(tmp_path / "published" / ".bakery-push.lock"):
        with monkeypatch.context() as patch, pytest.raises(Crash):
            patch.setattr(SlurmBackend, "submit", submit_then_crash)
            bakery.run("submit", matrix, "--executor", "slurm", ledger=ledger)
        # The job id was never recorded, and the intent is older than sacct's usual lag: without
        # asking squeue, status would exit 3 (no sacct) or call the array LOST.
        age_ledger(ledger)
        first = bakery.run("status", "--json", ledger=ledger)
        assert first.exit_code == 0, first.output
        [array] = all_arrays(load_ledger(ledger))
        assert f"recovered job id {array.job_id} of array {array.name} by its job name" in first.stderr
        assert "squeue + completion markers (SLURM accounting is disabled" in first.stderr
        assert "LOST" not in {r["state"] for r in json.loads(first.stdout)}
        task = f"{array.job_id}_0"
        bakery.wait(ledger, lambda rows: rows[QUEUE[0]]["state"] == "RUNNING", f"{QUEUE[0]} RUNNING")
        scontrol("suspend", task)
        bakery.wait(ledger, lambda rows: rows[QUEUE[0]]["state"] == "SUSPENDED", f"{QUEUE[0]} SUSPENDED")
        scontrol("resume", task)
        scontrol("requeuehold", "State=SpecialExit", task)
        rows = bakery.wait(ledger, lambda rows: rows[QUEUE[0]]["state"] == "SPECIAL_EXIT",
                           f"{QUEUE[0]} SPECIAL_EXIT")
        # Held by someone who may release it: never submitted again, never resubmitted.
        dry = bakery.ok("submit", matrix, "--executor", "slurm", "--dry-run", ledger=ledger)
        assert f"skip {QUEUE[0]}: an attempt is SPECIAL_EXIT" in dry.stderr
        refused = json.loads(bakery.ok("resubmit", "--json", ledger=ledger).stdout)
        assert {"cell": QUEUE[0], "stage": "merge", "state": "SPECIAL_EXIT",
                "action": "refused: latest attempt is SPECIAL_EXIT, not a terminal failure"} in refused
        assert len(all_arrays(load_ledger(ledger))) == 1
        cancelled = bakery.ok("cancel", ledger=ledger).stdout
        assert f"cancelled {QUEUE[0]} ({task}, was SPECIAL_EXIT)" in cancelled.splitlines()
    rows = bakery.wait_settled(ledger)
    assert {c: r["state"] for c, r in rows.items()} == dict.fromkeys(QUEUE, "CANCELLED")


def test_a_task_requeued_while_running_is_the_same_attempt_and_resumes(tmp_path, tiny_models,
                                                                       bakery, held_lock):
    """`scontrol requeue` (as SLURM requeues a preempted task, or one on a failed node) kills a
    running task and runs it again under the same id: one attempt, whose second run resumes
    from the markers the first left and whose log keeps both runs. The result record names the
    task, so status reads it as this attempt's whatever the nodes' clocks say."""
    cell = QUEUE[0]
    matrix = one_at_a_time(tmp_path, tiny_models)
    ledger = tmp_path / "bakery-ledger.json"
    result = tmp_path / "work" / "cells" / cell / "result.json"
    with held_lock(tmp_path / "published" / ".bakery-push.lock"):
        bakery.ok("submit", matrix, "--executor", "slurm", ledger=ledger)
        rows = bakery.wait(ledger, lambda rows: (rows[cell]["detail"] or "").startswith("push since"),
                           f"{cell} to wait at push")
        task = rows[cell]["task"]
        assert json.loads(result.read_text())["task"] == task
        scontrol("requeue", task)
        bakery.wait(ledger, lambda rows: rows[cell]["state"] == "PENDING", f"{cell} requeued")
        # SLURM holds a requeued job back (BeginTime, about two minutes): start it now.
        scontrol("update", f"JobId={task}", "StartTime=now")
    rows = bakery.wait_settled(ledger)
    assert {c: (r["state"], r["attempt"]) for c, r in rows.items()} == dict.fromkeys(
        QUEUE, ("COMPLETED", 1))
    record = json.loads(result.read_text())
    assert record["task"] == task and record["status"] == "done"
    assert {s: record["stages"][s]["status"] for s in ("merge", "verify", "push")} == {
        "merge": "skipped", "verify": "skipped", "push": "done"}
    log = bakery.ok("logs", cell, "--stderr", ledger=ledger).stdout
    assert "DUE TO JOB REQUEUE" in log and log.count(f"{cell}: push started") == 2
