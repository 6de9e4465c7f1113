"""What only a CUDA GPU can show (`pytest -m gpu tests/gpu`; `make test` runs where there is none,
so pyproject's addopts deselect these and they are never skipped).

- device "auto" picks the GPU, and mergekit merges there bit-identically to an independent
  `mergekit-yaml --cuda` run on the same baked inputs; linear and task_arithmetic agree with a CPU
  merge within bf16 rounding, TIES too except at exact ties of its density cut; the bakery
  engine gives the mergekit engine's bytes on the GPU as on the CPU;
- a real CUDA failure at start (the caching allocator refusing the probe allocation, as "device
  busy" refused the seed's) falls back to CPU and the reason is recorded, and nothing before the
  merge touches the GPU (PEFT would load adapters there on its own);
- a task started by the embedded local executor (the code path of the demo and of every SLURM
  task, runtime none) sees the GPU through the environment it inherits, and
  CUDA_VISIBLE_DEVICES="" in the submitting shell hides it: the variable reaches the task;
- a published cell runs on the GPU with logits close to the CPU's.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from click.testing import CliRunner

from bakery_slurm.cli import cli
from bakery_slurm.matrix import expand, load_matrix
from bakery_slurm.pipeline import CellPaths, read_result, run_cell
from support import checkpoint_tensors, settled, wait_for

pytestmark = pytest.mark.gpu

SIZES = ("tiny1b", "tiny4b")
METHODS = ("linear", "task_arithmetic", "ties")
PROCESS_TIMEOUT_S = 300


@pytest.fixture(scope="module", autouse=True)
def cuda() -> None:
    if not torch.cuda.is_available():
        pytest.fail("tests/gpu need a CUDA GPU (torch.cuda.is_available() is False)")


def cell_id(size: str, method: str) -> str:
    return f"{size}-std/eng-nob__{method}"


def test_a_cuda_failure_at_start_falls_back_to_cpu(write_tiny_matrix, tmp_path):
    """The probe allocation is refused by the real allocator (a zero memory fraction), the way
    the seed's "device busy" refused mergekit's first `.to(cuda)`. First in this module: no
    cached CUDA block may serve the probe."""
    matrix = load_matrix(write_tiny_matrix(tmp_path, engine="mergekit"))
    cell = next(c for c in expand(matrix) if c.id == cell_id("tiny1b", "ties"))
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(0.0)
    try:
        result = run_cell(cell, matrix.work_dir, device="auto")
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    merge = result["stages"]["merge"]
    assert merge["device"] == "cpu"
    assert merge["fallback_reason"].startswith("CUDA probe failed: "), merge["fallback_reason"]
    assert "out of memory" in merge["fallback_reason"].lower(), merge["fallback_reason"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, write_tiny_matrix) -> SimpleNamespace:
    """Every tiny cell four times, in separate work folders: device auto (the GPU) and device cpu,
    each with the mergekit engine (`results`, `published`) and the bakery engine
    (`engine_results`, `engine_published`)."""
    root = tmp_path_factory.mktemp("gpu-runs")
    out, work = {}, {}
    for engine in ("mergekit", "bakery"):
        for device in ("auto", "cpu"):
            matrix = load_matrix(write_tiny_matrix(root / engine / device, engine=engine))
            work[engine, device] = matrix.work_dir
            out[engine, device] = {c.id: run_cell(c, matrix.work_dir, device=device)
                                   for c in expand(matrix)}
    devices = ("auto", "cpu")
    # `recipe` is the recipe each mergekit-engine cell ran, with this machine's bake folders (the
    # published one names its inputs by hash instead).
    return SimpleNamespace(
        root=root, results={d: out["mergekit", d] for d in devices},
        published={d: root / "mergekit" / d / "published" for d in devices},
        recipe={d: lambda cid, d=d: CellPaths(work["mergekit", d], cid).recipe for d in devices},
        engine_results={d: out["bakery", d] for d in devices},
        engine_published={d: root / "bakery" / d / "published" for d in devices})


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("size", SIZES)
def test_the_bakery_engine_on_the_gpu_matches_the_mergekit_engine_on_the_gpu(runs, size, method):
    """Both bake on the CPU to the same bytes and run mergekit's merge method on the GPU."""
    cid = cell_id(size, method)
    merge = runs.engine_results["auto"][cid]["stages"]["merge"]
    assert (merge["device"], merge["fallback_reason"]) == ("cuda", None)
    for device in ("auto", "cpu"):
        ours = checkpoint_tensors(runs.engine_published[device] / cid)
        reference = checkpoint_tensors(runs.published[device] / cid)
        assert ours.keys() == reference.keys()
        different = [n for n in ours if not torch.equal(ours[n], reference[n])]
        assert not different, f"{device}: {len(different)} tensors differ, e.g. {different[:5]}"


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("size", SIZES)
def test_auto_merges_on_the_gpu_like_mergekit_yaml_cuda(runs, size, method, tmp_path):
    cid = cell_id(size, method)
    merge = runs.results["auto"][cid]["stages"]["merge"]
    assert (merge["device"], merge["fallback_reason"]) == ("cuda", None)
    published = runs.published["auto"] / cid
    proc = subprocess.run(
        [sys.executable, "-m", "mergekit.scripts.run_yaml", str(runs.recipe["auto"](cid)),
         str(tmp_path / "out"), "--cuda", "--no-copy-tokenizer"],
        capture_output=True, text=True, timeout=PROCESS_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ours, theirs = checkpoint_tensors(published), checkpoint_tensors(tmp_path / "out")
    assert ours.keys() == theirs.keys()
    different = [n for n in ours if not torch.equal(ours[n], theirs[n])]
    assert not different, f"{len(different)} tensors differ from mergekit-yaml --cuda's: {different[:5]}"


def close_in_bf16(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise: equal up to the rounding of two bf16 results of differently ordered float
    arithmetic: one ulp (2**-7 relative) of the value, or of the tensor's largest magnitude where
    terms cancelled."""
    a, b = a.float(), b.float()
    return (a - b).abs() <= 2**-7 * torch.maximum(b.abs(), b.abs().max())


@pytest.mark.parametrize("method", ("linear", "task_arithmetic"))
@pytest.mark.parametrize("size", SIZES)
def test_gpu_and_cpu_merges_agree_within_bf16_rounding(runs, size, method):
    cid = cell_id(size, method)
    gpu, cpu = (checkpoint_tensors(runs.published[device] / cid) for device in ("auto", "cpu"))
    assert gpu.keys() == cpu.keys()
    for name in gpu:
        assert gpu[name].dtype == cpu[name].dtype == torch.bfloat16, name
        assert close_in_bf16(gpu[name], cpu[name]).all(), f"{cid} {name}"


@pytest.mark.parametrize("size", SIZES)
def test_gpu_and_cpu_ties_differ_only_where_the_density_cut_ties(runs, size):
    """TIES keeps the `density` largest magnitudes of each task vector (mergekit.sparsify.magnitude,
    an unstable argsort). bf16 magnitudes repeat, and CPU and GPU order equal ones differently, so
    an element exactly at the cut may be kept on one and dropped on the other. Every element that
    differs beyond rounding must be such a tie in some adapter's task vector."""
    cid = cell_id(size, "ties")
    recipe = yaml.safe_load(runs.recipe["cpu"](cid).read_text())
    base = checkpoint_tensors(Path(recipe["base_model"]))
    deltas = [(checkpoint_tensors(Path(m["model"])), m["parameters"]["density"])
              for m in recipe["models"]]
    gpu, cpu = (checkpoint_tensors(runs.published[device] / cid) for device in ("auto", "cpu"))
    assert gpu.keys() == cpu.keys()
    for name in gpu:
        differs = ~close_in_bf16(gpu[name], cpu[name])
        at_cut = torch.zeros_like(differs)
        for model, density in deltas:
            magnitude = (model[name] - base[name]).abs().float()
            k = max(1, int(density * magnitude.numel()))
            cut = magnitude.reshape(-1).sort(descending=True).values[k - 1]
            at_cut |= magnitude == cut
        assert not (differs & ~at_cut).any(), f"{cid} {name}: differs away from the density cut"


def test_published_cell_runs_on_the_gpu_close_to_the_cpu(runs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cid = cell_id("tiny1b", "ties")
    root = runs.published["auto"]
    ids = AutoTokenizer.from_pretrained(root, subfolder=cid)("Hei, verden", return_tensors="pt").input_ids
    logits = {}
    for device in ("cuda", "cpu"):
        model = AutoModelForCausalLM.from_pretrained(root, subfolder=cid,
                                                     dtype=torch.float32).to(device).eval()
        with torch.no_grad():
            logits[device] = model(ids.to(device)).logits.cpu()
    assert torch.isfinite(logits["cuda"]).all()
    torch.testing.assert_close(logits["cuda"], logits["cpu"], rtol=1e-3, atol=1e-3)


def submit_locally(matrix_path: Path, env: dict[str, str]) -> dict[str, dict]:
    """`bakery-slurm submit --executor local` with `env` in the submitting environment; wait for
    every cell to end; return each cell's result record."""
    ledger = matrix_path.parent / "bakery-ledger.json"
    result = CliRunner().invoke(cli, ["submit", str(matrix_path), "--executor", "local",
                                      "--ledger", str(ledger)], env=env)
    assert result.exit_code == 0, result.output
    statuses = wait_for(lambda: settled(ledger), "the local tasks to end",
                        deadline_s=PROCESS_TIMEOUT_S, interval_s=0.5)
    assert {s.state for s in statuses} == {"COMPLETED"}, [(s.cell, s.state) for s in statuses]
    matrix = load_matrix(matrix_path)
    return {s.cell: read_result(CellPaths(matrix.work_dir, s.cell)) for s in statuses}


def test_a_task_sees_the_gpu_and_cuda_visible_devices_reaches_it(write_tiny_matrix, tmp_path):
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0")
    seen = submit_locally(write_tiny_matrix(tmp_path / "visible", methods=("ties",)),
                          {"CUDA_VISIBLE_DEVICES": visible})
    assert {r["stages"]["merge"]["device"] for r in seen.values()} == {"cuda"}
    hidden = submit_locally(write_tiny_matrix(tmp_path / "hidden", methods=("ties",)),
                            {"CUDA_VISIBLE_DEVICES": ""})
    assert {(r["stages"]["merge"]["device"], r["stages"]["merge"]["fallback_reason"])
            for r in hidden.values()} == {("cpu", "CUDA is not available")}
