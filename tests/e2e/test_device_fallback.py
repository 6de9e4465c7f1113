"""The seed's failure: mergekit's first `.to(cuda)` failed with "device busy" in the image.

This machine has no GPU, so the CUDA side is the one boundary stood in for: the probe is made to
report a usable GPU and mergekit's `run_merge` to fail the way it did on Olivia whenever it is
asked for CUDA. Everything else (the CPU retry, the merge, the record) is real.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bakery_slurm.matrix import expand, load_matrix
from bakery_slurm.pipeline import run_cell
from bakery_slurm.stages import merge as merge_stage

pytestmark = pytest.mark.e2e


def test_a_cuda_failure_at_start_falls_back_to_cpu_and_is_recorded(tiny_matrix, tmp_path,
                                                                   monkeypatch):
    import mergekit.merge

    real_run_merge = mergekit.merge.run_merge
    devices = []

    def run_merge(config, out_path, options, **kwargs):
        devices.append(options.device)
        if options.device == "cuda":
            raise RuntimeError("CUDA error: device busy")
        return real_run_merge(config, out_path, options=options, **kwargs)

    monkeypatch.setattr(merge_stage, "choose_device", lambda requested: ("cuda", None))
    monkeypatch.setattr(mergekit.merge, "run_merge", run_merge)
    cell = next(c for c in expand(load_matrix(tiny_matrix)) if c.id == "tiny1b-std/eng-nob__ties")
    result = run_cell(cell, tmp_path / "work")
    assert devices == ["cuda", "cpu"]
    merge = result["stages"]["merge"]
    assert merge["device"] == "cpu"
    assert merge["fallback_reason"] == "mergekit on CUDA failed: CUDA error: device busy"
    card = (tmp_path / "published" / cell.id / "README.md").read_text()
    assert "Merged on cpu (fell back: mergekit on CUDA failed: CUDA error: device busy)" in card


def test_without_cuda_auto_merges_on_cpu_and_says_why():
    # In a fresh process with every GPU hidden, so that this holds on a GPU machine too.
    code = ("from bakery_slurm.stages.merge import choose_device as choose\n"
            "print(choose('cpu'), choose('auto'), choose('cuda'))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split(") (") == [
        "('cpu', None", "'cpu', 'CUDA is not available'", "'cpu', 'CUDA requested but not available')\n"]
