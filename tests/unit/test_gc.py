"""`gc.plan_gc` on a work folder laid out as the pipeline lays it out (files are placeholders)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bakery_slurm.gc import bytes_per_kind, plan_gc, remove

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


def test_a_cell_whose_run_lock_is_held_is_live(tmp_path):
    work = work_folder(tmp_path)
    root = cell(work, LIVE, "done", [])  # done before, being rerun (--force) right now
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
        "fcntl.lockf(fd, fcntl.LOCK_EX); print('locked', flush=True); sys.stdin.read()"),
        str(root / ".run.lock")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        plan = plan_gc(work, live_cells=[])
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert not any(str(r.path).startswith(str(root)) for r in plan)
    assert {r.kind for r in plan} == {"cell outputs"}
