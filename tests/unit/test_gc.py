"""`gc.plan_gc` on a work folder laid out as the pipeline lays it out (files are placeholders)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from bakery_slurm.cell_status import reduce_cells
from bakery_slurm.cli import cli
from bakery_slurm.cli import gc as gc_command
from bakery_slurm.gc import bytes_per_kind, plan_gc, remove
from bakery_slurm.ledger import (Ledger, PlannedArray, all_arrays, confirm_array, record_intent,
                                 save_ledger)
from bakery_slurm.slurm_commands import TaskState
from bakery_slurm.status_snapshot import Snapshot

DONE, FAILED, LIVE = "1b-std/eng-nob__ties", "1b-std/eng-nob__linear", "4b-std/eng-nob__ties"


def cell(work: Path, cell_id: str, status: str, bake_keys: list[str]) -> Path:
    root = work / "cells" / cell_id
    for name in ("merged", "final", "publish"):
        (root / name).mkdir(parents=True)
        (root / name / "model.safetensors").write_bytes(b"w" * 100)
        (root / f"{name}.done.json").write_text("{}")
    (root / "verified.json").write_text("{}")
    adapters = {f"a{i}": {"key": key} for i, key in enumerate(bake_keys)}
    (root / "result.json").write_text(json.dumps({"cell": cell_id, "status": status,
                                                  "stages": {"bake": {"adapters": adapters}}}))
    return root


def work_folder(tmp_path: Path) -> Path:
    work = tmp_path / "work"
    for kind, key in (("bakes", "k-done"), ("bakes", "k-failed"), ("bases", "b1")):
        (work / "cache" / kind / key).mkdir(parents=True)
        (work / "cache" / kind / key / "model.safetensors").write_bytes(b"b" * 1000)
        (work / "cache" / kind / f"{key}.done.json").write_text("{}")
    (work / "cache" / "bakes" / ".k-done.x1.raw").mkdir()
    (work / "cache" / "bakes" / ".k-failed.done.json.x2.tmp").write_text("{")  # killed mid-write
    cell(work, DONE, "done", ["k-done"])
    cell(work, FAILED, "failed", ["k-failed"])
    (work / "cells" / FAILED / ".result.json.x3.tmp").write_text("{")
    return work


def removed(work: Path, removals) -> set[str]:
    return {str(r.path.relative_to(work)) for r in removals}


def test_published_outputs_unused_bakes_and_leftovers_go(tmp_path):
    work = work_folder(tmp_path)
    plan = plan_gc(work, live_cells=[])
    assert removed(work, plan) == {
        *(f"cells/{DONE}/{name}" for name in ("merged", "final", "publish", "verified.json",
                                              "merged.done.json", "final.done.json", "publish.done.json")),
        "cache/bakes/k-done", "cache/bakes/k-done.done.json", "cache/bakes/.k-done.x1.raw",
        "cache/bakes/.k-failed.done.json.x2.tmp", f"cells/{FAILED}/.result.json.x3.tmp"}
    # The failed cell keeps its outputs and its bake; base copies stay until all are published.
    assert bytes_per_kind(plan)["cell outputs"] == (7, 300 + 4 * 2)
    remove(plan)
    assert (work / "cells" / DONE / "result.json").is_file()
    assert (work / "cache" / "bakes" / "k-failed").is_dir() and (work / "cache" / "bases" / "b1").is_dir()


def test_a_file_counts_only_when_its_last_hard_link_goes(tmp_path):
    """final/ and publish/ share the weights (counted once); a `dir:` target on the same
    filesystem, or the Hub cache a base copy is linked from, keeps its own link: nothing freed."""
    work = work_folder(tmp_path)
    root = work / "cells" / DONE
    (root / "publish" / "model.safetensors").unlink()
    os.link(root / "final" / "model.safetensors", root / "publish" / "model.safetensors")
    assert bytes_per_kind(plan_gc(work, live_cells=[]))["cell outputs"] == (7, 200 + 4 * 2)
    (tmp_path / "published").mkdir()
    os.link(root / "final" / "model.safetensors", tmp_path / "published" / "model.safetensors")
    os.link(work / "cache" / "bases" / "b1" / "model.safetensors", tmp_path / "hub-blob")
    (work / "cells" / FAILED / "result.json").write_text(json.dumps({"cell": FAILED, "status": "done"}))
    totals = bytes_per_kind(plan_gc(work, live_cells=[]))
    assert totals["cell outputs"] == (14, 100 + 300 + 8 * 2)  # DONE's merged, all of FAILED's
    assert totals["base copies"] == (2, 2)  # the marker only


def test_a_pending_or_running_cell_keeps_the_whole_cache(tmp_path):
    work = work_folder(tmp_path)
    plan = plan_gc(work, live_cells=[LIVE])  # pending: not even a cell folder yet
    assert {r.kind for r in plan} == {"cell outputs"}
    assert all(str(r.path).startswith(str(work / "cells" / DONE)) for r in plan)


def plan_while_locked(work: Path, lock: Path):
    """`plan_gc` while another process holds `lock` (a task running, or evaluating, a cell)."""
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
        "fcntl.lockf(fd, fcntl.LOCK_EX); print('locked', flush=True); sys.stdin.read()"),
        str(lock)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        return plan_gc(work, live_cells=[])
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


def test_a_cell_whose_run_lock_is_held_is_live(tmp_path):
    work = work_folder(tmp_path)
    root = cell(work, LIVE, "done", [])  # done before, being rerun (--force) right now
    plan = plan_while_locked(work, root / ".run.lock")
    assert not any(str(r.path).startswith(str(root)) for r in plan)
    assert {r.kind for r in plan} == {"cell outputs"}


def test_a_published_cell_whose_eval_is_running_now_keeps_its_final_folder(tmp_path):
    """`run-eval` by hand (or from another ledger on the same work folder) holds the cell's eval
    lock and reads its `final` folder: the cell is live."""
    work = work_folder(tmp_path)
    lock = work / "cells" / DONE / "eval" / ".run.lock"
    lock.parent.mkdir(parents=True)
    plan = plan_while_locked(work, lock)
    doomed = {str(r.path.relative_to(work)) for r in plan}
    assert f"cells/{DONE}/final" not in doomed


def test_gc_keeps_the_final_folder_of_a_cell_whose_ledger_eval_is_pending_without_a_merge_attempt(
        tmp_path, monkeypatch):
    """The cell was merged and published before this ledger knew it (`run-cell` by hand, the
    demo, an earlier ledger): `submit` with [eval] skips its merge ("already completed and
    published") and submits only its eval, which starts at once. The ledger then holds an eval
    attempt and no merge attempt for the cell. While that eval is PENDING/RUNNING, gc must not
    remove cells/CELL/final, which the eval reads (README: "A cell whose eval is pending or
    running counts as live")."""
    work = work_folder(tmp_path)
    ledger = Ledger()
    planned = PlannedArray(executor="slurm", resources={}, cells=[DONE], stage="eval",
                           folder=str(work / "arrays" / "e"))
    sub = record_intent(ledger, matrix_path=str(tmp_path / "matrix.toml"), matrix_sha256="0" * 64,
                        arrays=[planned], recipe_hashes={}, eval_hashes={DONE: "s"})
    confirm_array(ledger, sub.arrays[0].name, "52")
    path = tmp_path / "bakery-ledger.json"
    save_ledger(path, ledger)
    snap = Snapshot(statuses=reduce_cells(ledger, {}),
                    evals=reduce_cells(ledger, {"52": TaskState("RUNNING")}, stage="eval"),
                    arrays={a.name: a for a in all_arrays(ledger)}, notes=[])
    assert [e.state for e in snap.evals] == ["RUNNING"]
    monkeypatch.setattr(gc_command, "snapshot", lambda *a, **k: snap)
    result = CliRunner().invoke(cli, ["gc", "--ledger", str(path)])
    assert result.exit_code == 0, result.output
    assert (work / "cells" / DONE / "final").is_dir()
