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
from bakery_slurm.gc import Swept, bytes_per_kind, plan_gc, sweep
from bakery_slurm.ledger import (Ledger, PlannedArray, all_arrays, confirm_array, record_intent,
                                 save_ledger)
from bakery_slurm.slurm_commands import TaskState
from bakery_slurm.status_snapshot import Snapshot
from support import may_lock

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
    assert sweep(plan) == Swept(removed=plan)
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


def sweep_while_in_use(work: Path, cell_id: str):
    """`sweep(plan_gc(...))` while another process holds `in_use(work, cell_id)`: a task running
    or evaluating that cell, started by hand or from another ledger."""
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys; from bakery_slurm.gc import in_use\n"
        "with in_use(sys.argv[1], sys.argv[2]):\n"
        "    print('held', flush=True); sys.stdin.read()"), str(work), cell_id],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        return sweep(plan_gc(work, live_cells=[]))
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


def test_what_a_task_is_using_now_is_kept(tmp_path):
    """A task holds its cell's gc lock and the work folder's (shared): that cell's outputs, the
    cache and the leftovers stay; another published cell's outputs go."""
    work = work_folder(tmp_path)
    root = cell(work, LIVE, "done", [])  # done before, being rerun (--force) right now
    swept = sweep_while_in_use(work, LIVE)
    removed_now, kept = swept.removed, swept.in_use
    assert {r.kind for r in removed_now} == {"cell outputs"}
    assert all(str(r.path).startswith(str(work / "cells" / DONE)) for r in removed_now)
    assert not (work / "cells" / DONE / "final").exists()
    assert {str(r.path.relative_to(work)) for r in kept if r.kind == "cell outputs"} == {
        f"cells/{LIVE}/{name}" for name in ("merged", "final", "publish", "verified.json",
                                            "merged.done.json", "final.done.json",
                                            "publish.done.json")}
    assert (root / "final").is_dir() and (work / "cache" / "bakes" / "k-done").is_dir()
    assert {r.kind for r in kept} == {"cell outputs", "bakes", "leftovers"}


def test_a_published_cell_being_evaluated_now_keeps_its_final_folder(tmp_path):
    """`run-eval` by hand (or from another ledger on the same work folder) reads the cell's
    `final` folder, holding the same locks as a run."""
    work = work_folder(tmp_path)
    kept = sweep_while_in_use(work, DONE).in_use
    assert f"cells/{DONE}/final" in {str(r.path.relative_to(work)) for r in kept}
    assert (work / "cells" / DONE / "final").is_dir()


def test_gc_holds_what_it_removes_and_never_the_run_lock(tmp_path, monkeypatch):
    """While gc removes a cell's outputs, a task of that cell cannot start using them (it waits on
    the cell's gc lock), and a task starting now finds its run lock free: gc never makes a
    starting run-cell fail as "already running"."""
    from bakery_slurm import gc

    work = work_folder(tmp_path)
    seen = {}

    def delete(path: Path) -> None:
        if path == work / "cells" / DONE / "final":
            seen["cell gc lock"] = may_lock(work / "cells" / DONE / ".gc.lock", shared=True)
            seen["run lock"] = may_lock(work / "cells" / DONE / ".run.lock")
        if path == work / "cache" / "bakes" / "k-done":
            seen["work gc lock"] = may_lock(work / ".gc.lock", shared=True)
        real_delete(path)

    real_delete = gc._delete
    monkeypatch.setattr(gc, "_delete", delete)
    swept = sweep(plan_gc(work, live_cells=[]))
    assert seen == {"cell gc lock": False, "run lock": True, "work gc lock": False}
    assert swept.in_use == [] and not (work / "cells" / DONE / "final").exists()


def test_a_dry_run_removes_nothing_writes_nothing_and_counts_what_it_would(tmp_path):
    work = work_folder(tmp_path)
    before = sorted(work.rglob("*"))
    plan = plan_gc(work, live_cells=[])
    assert sweep(plan, dry_run=True) == Swept(removed=plan)
    assert sorted(work.rglob("*")) == before  # not even a lock file
    (work / "cells" / DONE / ".gc.lock").touch()  # a task of DONE ran here once
    assert sweep(plan, dry_run=True) == Swept(removed=plan)


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


def test_every_task_that_uses_a_cell_holds_it_against_gc(tmp_path, write_matrix, monkeypatch):
    """run-cell, run-eval and the login node's push each hold the cell's gc lock and the work
    folder's while they read or write them (and, for run-cell and run-eval, their run lock)."""
    import contextlib
    from types import SimpleNamespace

    from bakery_slurm import login_push, pipeline
    from bakery_slurm.matrix import expand, load_matrix
    from bakery_slurm.stages import evaluate
    from conftest import MINIMAL_MATRIX

    work = tmp_path / "work"
    [one] = expand(load_matrix(write_matrix(MINIMAL_MATRIX)))
    cell_lock, work_lock = work / "cells" / one.id / ".gc.lock", work / ".gc.lock"
    seen = []

    def record(*args, **kwargs):
        seen.append((may_lock(cell_lock), may_lock(work_lock), may_lock(cell_lock, shared=True)))
        return {}

    monkeypatch.setattr(pipeline, "_run", record)
    monkeypatch.setattr(evaluate, "_run", record)
    pipeline.run_cell(one, work)
    evaluate.run_eval(SimpleNamespace(id=one.id, kind="cell"), work)
    with contextlib.ExitStack() as held:
        assert login_push._hold(held, pipeline.CellPaths(work, one.id)) is None
        record()
    # Shared: gc cannot take them, and another task of the work folder still can.
    assert seen == [(False, False, True)] * 3
    assert may_lock(cell_lock) and may_lock(work_lock)  # released at the end


def test_what_gc_cannot_remove_is_named_not_counted_and_exits_1(tmp_path, monkeypatch):
    """A teammate's folder this user may not write (made under another umask): gc said it freed
    the bytes, though every file stayed."""
    from bakery_slurm import gc

    work = work_folder(tmp_path)
    stuck = work / "cells" / DONE / "final"

    def delete(path: Path) -> None:
        if path == stuck:
            raise PermissionError(13, "Permission denied", str(stuck / "model.safetensors"))
        real_delete(path)

    real_delete = gc._delete
    monkeypatch.setattr(gc, "_delete", delete)
    plan = plan_gc(work, live_cells=[])
    swept = sweep(plan)
    assert [(r.path, e.strerror) for r, e in swept.failed] == [(stuck, "Permission denied")]
    assert stuck not in {r.path for r in swept.removed} and len(swept.removed) == len(plan) - 1

    ledger = Ledger()
    planned = PlannedArray(executor="slurm", resources={}, cells=[DONE],
                           folder=str(work / "arrays" / "m"))
    sub = record_intent(ledger, matrix_path=str(tmp_path / "matrix.toml"), matrix_sha256="0" * 64,
                        arrays=[planned], recipe_hashes={DONE: "r"})
    confirm_array(ledger, sub.arrays[0].name, "51")
    path = tmp_path / "bakery-ledger.json"
    save_ledger(path, ledger)
    snap = Snapshot(statuses=reduce_cells(ledger, {"51_0": TaskState("COMPLETED")}), evals=[],
                    arrays={a.name: a for a in all_arrays(ledger)}, notes=[])
    monkeypatch.setattr(gc_command, "snapshot", lambda *a, **k: snap)
    (work / "cells" / DONE / "final").mkdir(exist_ok=True)  # planned again
    result = CliRunner().invoke(cli, ["gc", "--ledger", str(path), "--json"])
    assert result.exit_code == 1
    assert f"Error: could not remove {stuck}: [Errno 13] Permission denied" in result.stderr
    outputs = next(r for r in json.loads(result.stdout) if r["kind"] == "cell outputs")
    assert outputs["bytes"] == 0 and outputs["paths"] == 0  # the rest went in the first sweep
