"""The seed's failure: mergekit's first `.to(cuda)` failed with "device busy" in the image.

This machine has no GPU, so the CUDA side is the one boundary stood in for: the probe is made to
report a usable GPU, and mergekit's `run_merge` (or the bakery engine's move of a tensor to the
device) to fail the way it did on Olivia whenever it is asked for CUDA. Everything else (the CPU
retry, the merge, the record) is real.
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


@pytest.mark.parametrize("engine", ("mergekit", "bakery"))
def test_a_cuda_failure_at_start_falls_back_to_cpu_and_is_recorded(write_tiny_matrix, tmp_path,
                                                                   monkeypatch, engine):
    import mergekit.merge

    from bakery_slurm.engine import cell as engine_cell

    real_run_merge, real_to_device = mergekit.merge.run_merge, engine_cell.to_device
    devices = []

    def run_merge(config, out_path, options, **kwargs):
        devices.append(options.device)
        if options.device == "cuda":
            raise RuntimeError("CUDA error: device busy")
        return real_run_merge(config, out_path, options=options, **kwargs)

    def to_device(tensors, device):
        if not devices or devices[-1] != device.type:
            devices.append(device.type)
        if device.type == "cuda":
            raise RuntimeError("CUDA error: device busy")
        return real_to_device(tensors, device)

    monkeypatch.setattr(merge_stage, "choose_device", lambda requested: ("cuda", None))
    monkeypatch.setattr(mergekit.merge, "run_merge", run_merge)
    monkeypatch.setattr(engine_cell, "to_device", to_device)
    matrix = load_matrix(write_tiny_matrix(tmp_path, engine=engine))
    cell = next(c for c in expand(matrix) if c.id == "tiny1b-std/eng-nob__ties")
    result = run_cell(cell, tmp_path / "work")
    assert devices == ["cuda", "cpu"]
    merge = result["stages"]["merge"]
    assert merge["device"] == "cpu"
    what = {"mergekit": "mergekit", "bakery": "the bakery engine"}[engine]
    assert merge["fallback_reason"] == f"{what} on CUDA failed: CUDA error: device busy"
    card = (tmp_path / "published" / cell.id / "README.md").read_text()
    assert f"Merged on cpu (fell back: {what} on CUDA failed: CUDA error: device busy)" in card


def test_without_cuda_auto_merges_on_cpu_and_says_why():
    # In a fresh process with every GPU hidden, so that this holds on a GPU machine too.
    code = ("from bakery_slurm.stages.merge import choose_device as choose\n"
            "print(choose('cpu'), choose('auto'), choose('cuda'))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split(") (") == [
        "('cpu', None", "'cpu', 'CUDA is not available'", "'cpu', 'CUDA requested but not available')\n"]


def test_a_slurm_task_given_no_gpu_merges_on_cpu_with_auto():
    """Without a container (or on a node that does not fence GPUs per job) CUDA would show a task
    that asked for no GPU the GPUs of other jobs; SLURM_JOB_GPUS is set in any job given GPUs."""
    assert merge_stage.choose_device("auto", {"SLURM_JOB_ID": "7"}) == (
        "cpu", "SLURM gave this task no GPU")
    assert merge_stage.slurm_gave_no_gpu({"SLURM_JOB_ID": "7", "CUDA_VISIBLE_DEVICES": ""})
    assert not merge_stage.slurm_gave_no_gpu({"SLURM_JOB_ID": "7", "SLURM_JOB_GPUS": "2"})
    assert not merge_stage.slurm_gave_no_gpu({"SLURM_JOB_ID": "7", "CUDA_VISIBLE_DEVICES": "0"})
    assert not merge_stage.slurm_gave_no_gpu({})  # run by hand or by the local executor


def test_only_a_gpu_failure_sends_a_merge_to_the_cpu(tmp_path):
    """An error the CPU would meet as well (a host allocation, a shape) is raised, not retried on
    the CPU with a record blaming CUDA; a CPU retry that fails too names the CUDA failure."""
    out = tmp_path / "out"
    out.mkdir()
    tried = []

    def failing_on(message_on_cuda, message_on_cpu=None):
        def attempt(device):
            tried.append(device)
            (out / f"{device}.part").write_text("partial")
            message = message_on_cuda if device == "cuda" else message_on_cpu
            if message:
                raise RuntimeError(message)
            return "merged"
        return attempt

    with pytest.raises(RuntimeError, match="DefaultCPUAllocator"):
        merge_stage._on_device(failing_on("DefaultCPUAllocator: can't allocate memory"), out,
                               "cuda", None, "the engine")
    assert tried == ["cuda"]
    result, record = merge_stage._on_device(failing_on("CUDA error: an illegal memory access\nwas met"),
                                            out, "cuda", None, "the engine")
    assert result == "merged" and sorted(p.name for p in out.iterdir()) == ["cpu.part"]
    assert record == {"device": "cpu", "fallback_reason":
                      "the engine on CUDA failed: CUDA error: an illegal memory access was met"}
    with pytest.raises(RuntimeError, match="disk on fire") as failed:
        merge_stage._on_device(failing_on("CUDA out of memory", "disk on fire"), out, "cuda", None,
                               "the engine")
    assert failed.value.__notes__ == ["the engine on CUDA failed: CUDA out of memory"]
