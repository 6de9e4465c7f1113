"""`tracking.snapshot`: states that need the clock or the cells' result records, with sacct and
squeue answered by a recording fake at the subprocess boundary."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

from bakery_slurm.executors import SlurmBackend
from bakery_slurm.ledger import Ledger, PlannedArray, confirm_array, record_intent, save_ledger
from bakery_slurm.pipeline import CellPaths
from bakery_slurm.tracking import snapshot
from support import Recorder

CELL = "1b-std/eng-nob__ties"
NO_ACCOUNTING = (1, "", "sacct: error: Slurm accounting storage is disabled")


def ledger_with_one_array(tmp_path: Path, age: timedelta, job_id: str | None) -> tuple[Path, Ledger]:
    ledger = Ledger()
    planned = PlannedArray(executor="slurm", resources={}, cells=[CELL, "1b-std/eng-nob__linear"],
                           folder=str(tmp_path / "work" / "arrays" / "a"))
    submission = record_intent(ledger, matrix_path=str(tmp_path / "matrix.toml"),
                               matrix_sha256="0" * 64, arrays=[planned],
                               recipe_hashes={CELL: "r", "1b-std/eng-nob__linear": "r"},
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
    runner = Recorder({"sacct": (0, "", "")})  # sacct knows no job by that name
    path, ledger = ledger_with_one_array(tmp_path, timedelta(seconds=5), None)
    assert state_of(tmp_path, path, ledger, runner) == "UNCONFIRMED"
    path, ledger = ledger_with_one_array(tmp_path, timedelta(minutes=10), None)
    assert state_of(tmp_path, path, ledger, runner) == "LOST"
    assert all("--name=" in " ".join(call) for call in runner.calls)


def test_sacct_lag_reads_submitted_then_not_found(tmp_path):
    runner = Recorder({"sacct": (0, "", "")})
    path, ledger = ledger_with_one_array(tmp_path, timedelta(seconds=5), "41")
    assert state_of(tmp_path, path, ledger, runner) == "SUBMITTED"
    path, ledger = ledger_with_one_array(tmp_path, timedelta(minutes=10), "41")
    assert state_of(tmp_path, path, ledger, runner) == "NOT_FOUND"


def write_result(tmp_path: Path, status: str, started: datetime, recipe_hash: str = "r") -> None:
    paths = CellPaths(tmp_path / "work", CELL)
    paths.root.mkdir(parents=True)
    paths.result.write_text(json.dumps({"status": status, "recipe_hash": recipe_hash,
                                        "started": started.isoformat(timespec="seconds")}))


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
    assert state_of(tmp_path, path, ledger, runner) == "NOT_FOUND"
