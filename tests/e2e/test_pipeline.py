"""The whole cell pipeline (bake -> merge -> strip -> verify -> push) on tiny Gemma 3 models,
through `[merge] engine = "mergekit"`: PEFT bakes, mergekit's run_merge, name repair. This path is
the reference tests/e2e/test_engine.py holds the bakery engine against.

Every cell of the tiny matrix (tiny1b = Gemma3ForCausalLM, tiny4b = Gemma3ForConditionalGeneration;
linear, task_arithmetic, ties) runs once per module into one shared work folder (`matrix_run`),
with HF_TOKEN set to a marker value; the parametrized tests then check each cell's result record,
published folder, model card, and the merge against an independent `mergekit-yaml` run. The
restart tests each use a fresh work folder (`tiny_matrix`, overridden here for this engine).

Nothing here waits on a timer: subprocesses are awaited, and the kill test waits on a FIFO that
its test-only hook (see `MERGE_HOOK`) opens once mergekit has written its output.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import yaml
from safetensors import safe_open

from bakery_slurm import pipeline
from bakery_slurm.errors import StageError
from bakery_slurm.manifest import intact_marker, marker_path, sha256_file
from bakery_slurm.matrix import Cell, expand, load_matrix
from bakery_slurm.pipeline import STAGES, CellPaths, read_result, run_cell
from bakery_slurm.stages.push import public_inputs
from bakery_slurm.tiny import build_lora_adapter
from support import checkpoint_tensors

pytestmark = pytest.mark.e2e

SECRET = "hf_secret_test_value"
KINDS = {"tiny1b": "text", "tiny4b": "multimodal"}
METHODS = ("linear", "task_arithmetic", "ties")
ADAPTERS = ("eng", "nob")
BIN = Path(sys.executable).parent
# Upper bound for one subprocess (a tiny cell takes ~7 s, mostly imports); only hit on a hang.
PROCESS_TIMEOUT_S = 300


@pytest.fixture
def tiny_matrix(tmp_path: Path, write_tiny_matrix) -> Path:
    """tests/conftest.py's six tiny cells, merged by PEFT bakes + mergekit."""
    return write_tiny_matrix(tmp_path, engine="mergekit")


def cell_id(size: str, method: str) -> str:
    return f"{size}-std/eng-nob__{method}"


def cells_of(matrix_path: Path) -> tuple[Any, dict[str, Cell]]:
    matrix = load_matrix(matrix_path)
    return matrix, {cell.id: cell for cell in expand(matrix)}


def header_specs(folder: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{name: (dtype, shape)} read from safetensors headers, independently of bakery_slurm.repair."""
    specs = {}
    for shard in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            for name in f.keys():
                part = f.get_slice(name)
                specs[name] = (part.get_dtype(), tuple(part.get_shape()))
    return specs


def bake_folder(work: Path, result: dict[str, Any], adapter: str) -> Path:
    return work / "cache" / "bakes" / result["stages"]["bake"]["adapters"][adapter]["key"]


def bake_folders(work: Path) -> list[Path]:
    """Completed bake folders (temporary `.<key>.*.raw` folders excluded)."""
    return sorted(p for p in (work / "cache" / "bakes").iterdir()
                  if p.is_dir() and not p.name.startswith("."))


def run_cli(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start `bakery-slurm ARGS` with stdout to LOG.out and stderr to LOG.err (no pipes to fill)."""
    with open(log.with_suffix(".out"), "wb") as out, open(log.with_suffix(".err"), "wb") as err:
        return subprocess.Popen([str(BIN / "bakery-slurm"), *args], stdout=out, stderr=err,
                                env={**os.environ, **(env or {})})


def finished_cli(proc: subprocess.Popen, log: Path) -> dict[str, Any]:
    """Wait for a `run_cli` process; assert it succeeded; return the result JSON it printed."""
    rc = proc.wait(timeout=PROCESS_TIMEOUT_S)
    assert rc == 0, f"exit {rc}:\n{log.with_suffix('.err').read_text()[-4000:]}"
    return json.loads(log.with_suffix(".out").read_text())


# ------------------------------------------------------------------------------------------------
# Every cell once, in one work folder


@pytest.fixture(scope="module")
def matrix_run(tmp_path_factory: pytest.TempPathFactory, write_tiny_matrix) -> SimpleNamespace:
    """Run all six cells in-process (CPU) with HF_TOKEN set; shared by the per-cell tests."""
    root = tmp_path_factory.mktemp("matrix-run")
    matrix, cells = cells_of(write_tiny_matrix(root, engine="mergekit"))
    assert sorted(cells) == sorted(cell_id(s, m) for s in KINDS for m in METHODS)
    results = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_TOKEN", SECRET)
        for cid, cell in cells.items():
            results[cid] = run_cell(cell, matrix.work_dir, device="cpu")
    return SimpleNamespace(root=root, work=matrix.work_dir, published=root / "published",
                           cells=cells, results=results)


@pytest.fixture(scope="module")
def cli_merges(matrix_run: SimpleNamespace, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An independent `mergekit-yaml --device cpu --no-copy-tokenizer` run per cell, on the recipe
    the cell ran with (`cells/<id>/mergekit_config.yml`: it names the cached bakes and the
    base). Started together, one thread each."""
    root = tmp_path_factory.mktemp("mergekit-cli")
    procs = {}
    for cid in matrix_run.cells:
        folder = root / cid.replace("/", "__")
        folder.mkdir()
        config = folder / "config.yml"
        shutil.copyfile(CellPaths(matrix_run.work, cid).recipe, config)
        with open(folder / "log", "wb") as log:
            procs[cid] = subprocess.Popen(
                [str(BIN / "mergekit-yaml"), str(config), str(folder / "out"), "--device", "cpu",
                 "--no-copy-tokenizer"],
                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    for cid, proc in procs.items():
        folder = root / cid.replace("/", "__")
        rc = proc.wait(timeout=PROCESS_TIMEOUT_S)
        assert rc == 0, f"mergekit-yaml failed for {cid}:\n{(folder / 'log').read_text()[-4000:]}"
    return {cid: root / cid.replace("/", "__") / "out" for cid in procs}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("size", KINDS)
def test_cell_result_records_every_stage(matrix_run, size, method):
    cid = cell_id(size, method)
    result = matrix_run.results[cid]
    assert result["status"] == "done" and result["error"] is None
    assert result["cell"] == cid and result["recipe_hash"] == matrix_run.cells[cid].recipe_hash
    assert read_result(CellPaths(matrix_run.work, cid)) == result  # the record on disk
    assert list(result["stages"]) == list(STAGES)
    for name, stage in result["stages"].items():
        assert stage["status"] in ("done", "skipped"), (name, stage)
        assert isinstance(stage["seconds"], float) and stage["seconds"] >= 0, (name, stage)
        for key in ("bytes_read", "bytes_written"):
            assert isinstance(stage[key], int) and stage[key] >= 0, (name, key, stage)
    stages = result["stages"]
    assert stages["merge"]["status"] == "done" and stages["merge"]["bytes_written"] > 0
    assert stages["merge"]["bytes_read"] > 0 and stages["merge"]["device"] == "cpu"
    assert stages["verify"]["status"] == "done" and stages["push"]["status"] == "done"
    assert stages["push"]["bytes_written"] > 0
    assert set(stages["bake"]["adapters"]) == set(ADAPTERS)
    assert len(bake_folders(matrix_run.work)) == 2 * len(KINDS)  # one bake per (kind, adapter)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("size", KINDS)
def test_published_folder_loads_with_base_tensor_set(matrix_run, size, method):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cid = cell_id(size, method)
    folder = matrix_run.published / cid
    base = matrix_run.cells[cid].base.path
    model, info = AutoModelForCausalLM.from_pretrained(matrix_run.published, subfolder=cid,
                                                       dtype=torch.bfloat16, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info.get("mismatched_keys") and not info.get("error_msgs"), info
    assert type(model).__name__ == {"text": "Gemma3ForCausalLM",
                                    "multimodal": "Gemma3ForConditionalGeneration"}[KINDS[size]]
    tok = AutoTokenizer.from_pretrained(matrix_run.published, subfolder=cid)
    base_tok = AutoTokenizer.from_pretrained(base)
    assert tok.get_vocab() == base_tok.get_vocab()
    assert tok("God morgen, Oslo").input_ids == base_tok("God morgen, Oslo").input_ids
    published, base_specs = header_specs(folder), header_specs(Path(base))
    assert published == base_specs  # names, shapes and dtypes
    assert {dtype for dtype, _ in published.values()} == {"BF16"}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("size", KINDS)
def test_merge_is_bit_identical_to_mergekit_cli(matrix_run, cli_merges, size, method):
    cid = cell_id(size, method)
    result = matrix_run.results[cid]
    recipe = yaml.safe_load(CellPaths(matrix_run.work, cid).recipe.read_text())
    # The CLI merged exactly our baked inputs (and base, where the method uses one).
    assert [m["model"] for m in recipe["models"]] == [
        str(bake_folder(matrix_run.work, result, a)) for a in ADAPTERS]
    assert recipe["merge_method"] == method
    assert ("base_model" in recipe) == (method != "linear")
    # The published recipe is the same recipe, its models named by their inputs.
    published = yaml.safe_load((matrix_run.published / cid / "mergekit_config.yml").read_text())
    assert {k: v for k, v in published.items() if k not in ("models", "base_model")} == {
        k: v for k, v in recipe.items() if k not in ("models", "base_model")}
    assert [m["parameters"] for m in published["models"]] == [m["parameters"] for m in recipe["models"]]
    assert [m["model"].split("+")[1].split("@")[0] for m in published["models"]] == [
        f"local:{'text' if size == 'tiny1b' else 'multimodal'}/{a}" for a in ADAPTERS]
    ours = checkpoint_tensors(matrix_run.published / cid)
    theirs = checkpoint_tensors(cli_merges[cid])
    assert ours.keys() == theirs.keys()
    different = [n for n in ours if ours[n].dtype != theirs[n].dtype
                 or not torch.equal(ours[n], theirs[n])]
    assert not different, f"{len(different)} tensors differ from mergekit-yaml's, e.g. {different[:5]}"
    # ...and the merge did something: the output is neither the base nor one of the bakes.
    base = checkpoint_tensors(Path(matrix_run.cells[cid].base.path))
    for other in [base, *(checkpoint_tensors(bake_folder(matrix_run.work, result, a)) for a in ADAPTERS)]:
        assert any(not torch.equal(ours[n], other[n]) for n in ours)


@pytest.mark.parametrize("size", KINDS)
def test_linear_and_task_arithmetic_agree_within_bf16_rounding(matrix_run, size):
    """linear 0.5/0.5 computes (a + b) / 2 in fp32 and rounds once to bf16; task_arithmetic
    computes base + 0.5 (a - base) + 0.5 (b - base) in bf16, rounding after each subtraction and
    addition. A bf16 rounding errs by at most half an ulp, 2**-8 |v| (8 significant bits), and
    with M = max(|a|, |b|, |base|) at that element the intermediates are at most 2M, so the two
    subtractions (halved), the sum, the final addition and linear's own rounding add up to at
    most (1 + 1 + 1 + 0.5) * 2**-7 M < 2**-5 M. Measured here: up to ~2**-6.1 M, with ~88% of
    elements bit-equal. The bound is not vacuous: task vectors counted at weight 1 instead of 0.5
    break it by a factor of ~60, and most elements moved from the base by more than it."""
    lin = checkpoint_tensors(matrix_run.published / cell_id(size, "linear"))
    ta = checkpoint_tensors(matrix_run.published / cell_id(size, "task_arithmetic"))
    result = matrix_run.results[cell_id(size, "linear")]
    a, b = (checkpoint_tensors(bake_folder(matrix_run.work, result, name)) for name in ADAPTERS)
    base = checkpoint_tensors(Path(matrix_run.cells[cell_id(size, "linear")].base.path))
    assert lin.keys() == ta.keys() == base.keys()

    def within_rounding(x: torch.Tensor, y: torch.Tensor, name: str) -> bool:
        scale = torch.maximum(torch.maximum(a[name].float().abs(), b[name].float().abs()),
                              base[name].float().abs())
        return bool(((x.float() - y.float()).abs() <= 2**-5 * scale).all())

    for name in lin:
        assert within_rounding(lin[name], ta[name], name), (
            f"{name}: linear and task_arithmetic differ beyond bf16 rounding")
    doubled = {n: base[n].float() + (a[n].float() - base[n].float()) + (b[n].float() - base[n].float())
               for n in lin}
    assert not all(within_rounding(lin[n], doubled[n], n) for n in lin)
    assert not all(within_rounding(lin[n], base[n], n) for n in lin)


@pytest.mark.parametrize("size", KINDS)
def test_baked_model_matches_peft_with_adapter(matrix_run, size):
    """Logits of the baked checkpoint vs the bf16 base with the adapter attached by PEFT.

    Baking rounds W + BA to bf16 once per weight; PEFT adds the fp32 LoRA product to the bf16
    activations on the fly. They differ by bf16 rounding only: measured <= 2 ulps of the largest
    output (~1.5% of the logit scale), while the adapter moves the outputs by ~12x that gap. The
    bounds: gap <= 2**-5 * scale (at least 4 ulps of the top binade, since an ulp there is at most
    2**-7 * scale) and gap < effect / 4 (an adapter missing from some modules, applied twice or
    mis-scaled by alpha/r moves the outputs by a large part of the effect). On the multimodal model
    the vision tower (also adapted by all-linear) is compared on an image too: the tiny models'
    projector is zero-initialised, so images never reach the logits.
    """
    from peft import PeftModel
    from transformers import AutoTokenizer

    from bakery_slurm.stages.bake import load_model

    kind = KINDS[size]
    cid = cell_id(size, "linear")
    result = matrix_run.results[cid]
    cell = matrix_run.cells[cid]
    base_dir = Path(cell.base.path)
    tok = AutoTokenizer.from_pretrained(base_dir)
    ids = tok("God morgen! The weather in Oslo is cold.", return_tensors="pt").input_ids
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)).bfloat16()

    def vision(model) -> torch.Tensor:
        return model.model.vision_tower(pixel_values=pixels).last_hidden_state.float()

    for name, source in cell.adapters:
        baked = load_model(bake_folder(matrix_run.work, result, name), torch.bfloat16).eval()
        peft = PeftModel.from_pretrained(load_model(base_dir, torch.bfloat16),
                                         source.path).eval()
        with torch.no_grad():
            got = baked(input_ids=ids).logits.float()
            want = peft(input_ids=ids).logits.float()
            with peft.disable_adapter():
                plain = peft(input_ids=ids).logits.float()
            gap, effect, scale = ((got - want).abs().max().item(),
                                  (want - plain).abs().max().item(), want.abs().max().item())
            assert gap <= 2**-5 * scale and gap < effect / 4, (name, gap, effect, scale)
            if kind == "multimodal":
                got_v, want_v = vision(baked), vision(peft.get_base_model())
                with peft.disable_adapter():
                    plain_v = vision(peft.get_base_model())
                gap, effect, scale = ((got_v - want_v).abs().max().item(),
                                      (want_v - plain_v).abs().max().item(),
                                      want_v.abs().max().item())
                assert gap <= 2**-5 * scale and gap < effect / 4, (name, "vision", gap, effect)


def test_model_card_metadata(matrix_run):
    for cid in matrix_run.cells:
        card = (matrix_run.published / cid / "README.md").read_text()
        assert card.startswith("---\n")
        meta = yaml.safe_load(card.split("---\n")[1])
        assert meta["base_model_relation"] == "merge"
        assert {"merge", "mergekit"} <= set(meta["tags"])
        assert matrix_run.cells[cid].recipe_hash in card
        record = json.loads((matrix_run.published / cid / "bakery.json").read_text())
        assert record["recipe_hash"] == matrix_run.cells[cid].recipe_hash
    root = (matrix_run.published / "README.md").read_text()
    meta = yaml.safe_load(root.split("---\n")[1])
    assert meta["base_model_relation"] == "merge" and {"merge", "mergekit", "lora"} <= set(meta["tags"])
    assert f"Total: {len(matrix_run.cells)} merged checkpoints." in root


def test_published_files_name_no_cluster_path(matrix_run, tiny_models):
    """Card, recipe and record name inputs by repo id / folder name and hash, never by the paths
    of this machine (bake folders, snapshots, the work folder)."""
    for path in matrix_run.published.rglob("*"):
        if path.suffix in (".md", ".yml", ".json") and path.name != "config.json":
            text = path.read_text()
            assert str(matrix_run.work) not in text and str(tiny_models) not in text, path
    recipe = (matrix_run.published / next(iter(matrix_run.cells)) / "mergekit_config.yml").read_text()
    assert "+local:" in recipe and "@sha256:" in recipe


def test_token_is_written_nowhere(matrix_run):
    """HF_TOKEN was set during every run: no file of the run (work folder, published folder,
    matrix) may contain it."""
    files = [p for p in matrix_run.root.rglob("*") if p.is_file()]
    assert len(files) > 50 and any(p.suffix == ".safetensors" for p in files)
    leaking = [str(p) for p in files if SECRET.encode() in p.read_bytes()]
    assert not leaking


# ------------------------------------------------------------------------------------------------
# Restarts


def test_rerun_after_losing_outputs_reuses_the_bakes(tiny_matrix):
    """A cell that lost everything after the bake (merged, final, publish, their markers,
    verified.json, result.json) resumes without re-baking: same bake folders, untouched."""
    matrix, cells = cells_of(tiny_matrix)
    cell = cells[cell_id("tiny1b", "ties")]
    first = run_cell(cell, matrix.work_dir, device="cpu")
    assert first["stages"]["bake"]["cached"] is False
    paths = CellPaths(matrix.work_dir, cell.id)
    bakes = {a: bake_folder(matrix.work_dir, first, a) for a in ADAPTERS}
    before = {a: (p.stat().st_ino, p.stat().st_mtime_ns, (p / "model.safetensors").stat().st_ino,
                  (p / "model.safetensors").stat().st_mtime_ns) for a, p in bakes.items()}
    for folder in (paths.merged, paths.final, paths.publish):
        shutil.rmtree(folder)
        marker_path(folder).unlink(missing_ok=True)
    paths.verified.unlink()
    paths.result.unlink()

    second = run_cell(cell, matrix.work_dir, device="cpu")
    assert second["status"] == "done"
    bake = second["stages"]["bake"]
    assert bake["cached"] is True and bake["bytes_written"] == 0
    assert all(bake["adapters"][a]["cached"] for a in ADAPTERS)
    assert bake["outputs"] == first["stages"]["bake"]["outputs"]
    after = {a: (p.stat().st_ino, p.stat().st_mtime_ns, (p / "model.safetensors").stat().st_ino,
                 (p / "model.safetensors").stat().st_mtime_ns) for a, p in bakes.items()}
    assert after == before
    assert second["stages"]["merge"]["status"] == "done"  # redone, and to the same bytes
    assert second["stages"]["merge"]["outputs"] == first["stages"]["merge"]["outputs"]
    assert second["stages"]["strip"]["outputs"] == first["stages"]["strip"]["outputs"]
    # The target holds this recipe already (it was never deleted): not pushed twice.
    assert second["stages"]["push"]["status"] == "skipped"
    assert len(bake_folders(matrix.work_dir)) == 2


MERGE_HOOK = '''\
"""Test-only sitecustomize (tests/e2e/test_pipeline.py, test_kill_during_merge...).

When BAKERY_TEST_MERGE_FIFO is set, mergekit's run_merge does its real work, then blocks opening
that FIFO for reading until the test opens it for writing. The test can thus kill the process at
a known point inside the merge stage: output written to the staging folder, not yet renamed.
"""
import os

_fifo = os.environ.get("BAKERY_TEST_MERGE_FIFO")
if _fifo:
    import mergekit.merge as _merge

    _real_run_merge = _merge.run_merge

    def _blocking_run_merge(*args, **kwargs):
        _real_run_merge(*args, **kwargs)
        with open(_fifo, "rb") as f:
            f.read()

    _merge.run_merge = _blocking_run_merge
'''


def _wait_for_reader(fifo: Path, proc: subprocess.Popen, err_log: Path, limit_s: float) -> int:
    """Open FIFO for writing once the child has it open for reading (ENXIO until then); fail if
    the child exits first. Polls with proc.wait(timeout), so an early exit is seen at once."""
    deadline = time.monotonic() + limit_s
    while True:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as e:
            if e.errno != errno.ENXIO:
                raise
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"run-cell did not reach the merge within {limit_s} s")
        try:
            proc.wait(timeout=0.02)
        except subprocess.TimeoutExpired:
            continue
        pytest.fail(f"run-cell exited ({proc.returncode}) before blocking in the merge:\n"
                    f"{err_log.read_text()[-4000:]}")


def test_kill_during_merge_leaves_no_partial_output_in_place(tiny_matrix, tmp_path):
    """SIGKILL `bakery-slurm run-cell` while mergekit's output sits in the staging folder.

    Catching the real tiny merge (well under a second) by polling would be a race, so a test-only
    sitecustomize on PYTHONPATH (MERGE_HOOK) makes run_merge block on a FIFO after writing: the
    kill then lands at the worst moment, a complete-looking but unfinished merge.
    """
    matrix, cells = cells_of(tiny_matrix)
    cell = cells[cell_id("tiny4b", "linear")]
    paths = CellPaths(matrix.work_dir, cell.id)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(MERGE_HOOK)
    fifo = tmp_path / "merge.fifo"
    os.mkfifo(fifo)
    log = tmp_path / "killed"
    proc = run_cli(["run-cell", str(tiny_matrix), cell.id, "--device", "cpu"], log,
                   env={"PYTHONPATH": os.pathsep.join(filter(None, [str(hook),
                                                                     os.environ.get("PYTHONPATH")])),
                        "BAKERY_TEST_MERGE_FIFO": str(fifo)})
    fd = _wait_for_reader(fifo, proc, log.with_suffix(".err"), PROCESS_TIMEOUT_S)
    try:
        staging = list(paths.root.glob(".merged.*.partial"))
        assert len(staging) == 1 and (staging[0] / "model.safetensors").is_file()
        proc.kill()
        assert proc.wait(timeout=PROCESS_TIMEOUT_S) == -9
    finally:
        os.close(fd)

    # Nothing of the unfinished merge is in place, and nothing downstream exists.
    assert not paths.merged.exists() and not marker_path(paths.merged).exists()
    for later in (paths.final, paths.publish, matrix.root / "published" / cell.id):
        assert not later.exists() and not marker_path(later).exists()
    record = read_result(paths)
    # The record says which stage the task was in when it died, and since when.
    assert record["status"] == "running" and list(record["stages"]) == ["bake", "merge"]
    assert record["stages"]["merge"]["status"] == "running" and record["stages"]["merge"]["started"]

    result = run_cell(cell, matrix.work_dir, device="cpu")
    assert result["status"] == "done"
    assert result["stages"]["bake"]["cached"] is True
    assert result["stages"]["merge"]["status"] == "done"
    assert (paths.merged / "model.safetensors").is_file() and marker_path(paths.merged).is_file()
    assert (matrix.root / "published" / cell.id / "bakery.json").is_file()
    assert not list(paths.root.glob(".*.partial"))  # the dead task's staging folder is cleared


def test_concurrent_cells_share_the_bakes(tiny_matrix, tmp_path):
    """Two run-cell processes for two methods of one size, started together: each adapter is baked
    exactly once (the other process waits on the bake's lock and reuses it), both cells finish."""
    matrix, cells = cells_of(tiny_matrix)
    ids = [cell_id("tiny4b", "linear"), cell_id("tiny4b", "ties")]
    procs = [(run_cli(["run-cell", str(tiny_matrix), cid, "--device", "cpu"], tmp_path / f"run{i}"),
              tmp_path / f"run{i}") for i, cid in enumerate(ids)]
    results = [finished_cli(proc, log) for proc, log in procs]
    assert [r["cell"] for r in results] == ids
    assert all(r["status"] == "done" for r in results)
    baked = [r["stages"]["bake"]["adapters"][a] for r in results for a in ADAPTERS]
    assert sum(not b["cached"] for b in baked) == len(ADAPTERS)  # each adapter baked once
    assert results[0]["stages"]["bake"]["outputs"] == results[1]["stages"]["bake"]["outputs"]
    work = matrix.work_dir
    assert len(bake_folders(work)) == len(ADAPTERS)
    assert all(intact_marker(folder) is not None for folder in bake_folders(work))
    assert not [p for p in (work / "cache" / "bakes").iterdir() if p.name.startswith(".")]
    for cid in ids:
        assert header_specs(matrix.root / "published" / cid) == header_specs(
            Path(cells[cid].base.path))


@pytest.mark.parametrize("engine", ("mergekit", "bakery"))
def test_retrained_adapter_is_rebaked_and_republished(tmp_path, tiny_models, write_tiny_matrix,
                                                      engine):
    """A new adapter at the same path (retrained: another seed) gets a new bake key (mergekit
    engine) or new merge inputs (bakery engine); the rerun re-merges and publishes the new weights."""
    models = tmp_path / "models"
    shutil.copytree(tiny_models, models)
    matrix_path = write_tiny_matrix(tmp_path, models=models, methods=("linear",), engine=engine)
    matrix, cells = cells_of(matrix_path)
    cell = cells[cell_id("tiny1b", "linear")]
    published = matrix.root / "published" / cell.id
    first = run_cell(cell, matrix.work_dir, device="cpu")
    old_weights = checkpoint_tensors(published)

    adapter = models / "adapters" / "text" / "nob"
    old_bytes = (adapter / "adapter_model.safetensors").read_bytes()
    build_lora_adapter(models / "bases" / "text", adapter, seed=1234)
    assert (adapter / "adapter_model.safetensors").read_bytes() != old_bytes

    second = run_cell(cell, matrix.work_dir, device="cpu")
    assert second["status"] == "done"
    if engine == "mergekit":
        old_bake, new_bake = first["stages"]["bake"]["adapters"], second["stages"]["bake"]["adapters"]
        assert new_bake["eng"]["key"] == old_bake["eng"]["key"] and new_bake["eng"]["cached"]
        assert new_bake["nob"]["key"] != old_bake["nob"]["key"] and not new_bake["nob"]["cached"]
        assert len(bake_folders(matrix.work_dir)) == 3
    else:
        assert not (matrix.work_dir / "cache" / "bakes").exists()
    assert second["stages"]["merge"]["status"] == "done"
    assert second["stages"]["merge"]["outputs"] != first["stages"]["merge"]["outputs"]
    # The published cell is the new merge, not the stale one.
    assert second["stages"]["push"]["status"] == "done"
    new_weights = checkpoint_tensors(published)
    assert any(not torch.equal(old_weights[n], new_weights[n]) for n in old_weights)
    record = json.loads((published / "bakery.json").read_text())
    assert record["inputs"] == public_inputs(second["stages"]["bake"]["inputs"])


def test_mergekit_engine_redoes_the_merge_when_only_the_base_tokenizer_changed(
        tmp_path, tiny_models, write_tiny_matrix):
    """A new base revision that only fixes the chat template / tokenizer (same weights, same
    config): the published cell must carry the new base's tokenizer files, as verify demands."""
    models = tmp_path / "models"
    shutil.copytree(tiny_models, models)
    matrix = load_matrix(write_tiny_matrix(tmp_path, models=models, methods=("linear",),
                                           engine="mergekit"))
    cell = {c.id: c for c in expand(matrix)}["tiny1b-std/eng-nob__linear"]
    first = run_cell(cell, matrix.work_dir, device="cpu")
    assert first["status"] == "done"

    template = models / "bases" / "text" / "chat_template.jinja"
    template.write_text(template.read_text() + "{# fixed upstream #}\n")

    second = run_cell(cell, matrix.work_dir, device="cpu")
    assert second["stages"]["bake"]["inputs"] != first["stages"]["bake"]["inputs"]  # new base
    final = CellPaths(matrix.work_dir, cell.id).final
    # The verified, published output must hold the base's tokenizer files byte for byte.
    assert sha256_file(final / "chat_template.jinja") == sha256_file(template), (
        second["stages"]["merge"]["status"], second["stages"]["verify"]["status"])
    published = matrix.root / "published" / cell.id
    assert sha256_file(published / "chat_template.jinja") == sha256_file(template)


def test_an_output_put_in_place_without_its_new_marker_is_not_trusted_later(
        tmp_path, tiny_models, write_tiny_matrix, monkeypatch):
    """Adapter v1 merged and published. Adapter v2 (same shapes, so same file sizes) is put at the
    same path; its merge renames final/ into place, then the task dies before the done-marker is
    rewritten (SIGTERM at the time limit, quota exceeded writing the marker). The user restores
    v1 and reruns: final/ must hold v1's merge, not v2's under v1's old marker."""
    models = tmp_path / "models"
    shutil.copytree(tiny_models, models)
    matrix = load_matrix(write_tiny_matrix(tmp_path, models=models, methods=("linear",)))
    cell = {c.id: c for c in expand(matrix)}["tiny1b-std/eng-nob__linear"]
    paths = CellPaths(matrix.work_dir, cell.id)
    first = run_cell(cell, matrix.work_dir, device="cpu")
    v1_weights = checkpoint_tensors(paths.final)

    adapter = models / "adapters" / "text" / "nob"
    saved = tmp_path / "nob-v1"
    shutil.copytree(adapter, saved)
    build_lora_adapter(models / "bases" / "text", adapter, seed=4321)  # v2, same sizes

    def dies(*args, **kwargs):  # the process ends here: final/ is in place, the marker is old
        raise OSError(errno.EDQUOT, "Disk quota exceeded")

    monkeypatch.setattr(pipeline, "write_marker", dies)
    with pytest.raises(StageError):
        run_cell(cell, matrix.work_dir, device="cpu")
    monkeypatch.undo()

    shutil.rmtree(adapter)
    shutil.copytree(saved, adapter)  # v1 again
    third = run_cell(cell, matrix.work_dir, device="cpu")
    assert third["stages"]["bake"]["inputs"] == first["stages"]["bake"]["inputs"]
    got = checkpoint_tensors(paths.final)
    assert all(torch.equal(v1_weights[n], got[n]) for n in v1_weights), (
        "final/ holds adapter v2's merge although every stage was skipped as v1's: "
        + str({s: r["status"] for s, r in third["stages"].items()}))


# ------------------------------------------------------------------------------------------------
# A failed stage names the input it could not use


def test_a_corrupt_adapter_is_named_in_the_error_and_the_result_record(tmp_path, tiny_models,
                                                                       write_tiny_matrix):
    models = tmp_path / "models"
    shutil.copytree(tiny_models, models)
    corrupt = models / "adapters" / "text" / "nob" / "adapter_model.safetensors"
    corrupt.write_bytes(b"not a safetensors file " * 64)
    matrix, cells = cells_of(write_tiny_matrix(tmp_path, models=models, methods=("linear",)))
    cell = cells[cell_id("tiny1b", "linear")]
    with pytest.raises(StageError) as failure:
        run_cell(cell, matrix.work_dir, device="cpu")
    message = str(failure.value)
    assert f"stage bake failed: adapter nob ({corrupt.parent}): {corrupt}: " in message, message
    result = read_result(CellPaths(matrix.work_dir, cell.id))
    assert result["status"] == "failed" and result["error"] == f"bake: {message.split(': stage bake failed: ')[1]}"
    assert result["stages"]["bake"]["error"].startswith(f"adapter nob ({corrupt.parent}): {corrupt}: ")


def test_an_unexpected_error_keeps_its_type_and_traceback_in_stderr(tmp_path, tiny_models,
                                                                    write_tiny_matrix):
    models = tmp_path / "models"
    shutil.copytree(tiny_models, models)
    config = models / "adapters" / "text" / "eng" / "adapter_config.json"
    config.write_text(json.dumps({"not": "a PEFT config"}))  # readable JSON that PEFT rejects
    matrix_path = write_tiny_matrix(tmp_path, models=models, methods=("linear",))
    matrix, cells = cells_of(matrix_path)
    cell = cells[cell_id("tiny1b", "linear")]
    log = tmp_path / "run-cell"
    # The task's private HF_XET_CACHE goes to TMPDIR, and the one of a task that was killed
    # (its process is gone) is removed.
    tmp = tmp_path / "node-tmp"
    # A pid above the kernel's maximum: no process has it (a pid that just exited can be reused
    # by the time the task looks, on a busy machine).
    dead = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1
    (tmp / f"bakery-xet-7_3-{dead}" / "chunks").mkdir(parents=True)
    proc = run_cli(["run-cell", str(matrix_path), cell.id, "--device", "cpu"], log,
                   env={"TMPDIR": str(tmp)})
    assert proc.wait(timeout=PROCESS_TIMEOUT_S) == 1
    assert list(tmp.iterdir()) == []
    stderr = log.with_suffix(".err").read_text()
    assert "Traceback (most recent call last)" in stderr, stderr[-3000:]
    error = read_result(CellPaths(matrix.work_dir, cell.id))["error"]
    # The exception's type is kept (a bare KeyError would read only 'key'), after the input.
    prefix = f"bake: adapter eng ({config.parent}): "
    assert error.startswith(prefix) and error[len(prefix):].split(":")[0].isidentifier(), error
    assert "\n" not in error


def test_a_killed_base_copy_is_removed_by_the_next_task(tmp_path):
    # A base saved in another layout is copied to the hub layout under cache/bases. A task killed
    # while writing that copy leaves `.<key>.*.partial` beside it, as big as the base: the next
    # task that needs the base removes it, under the base's lock.
    from bakery_slurm.sources import LocalModel
    from bakery_slurm.stages.bake import _key, prepare_base
    from bakery_slurm.tiny import build_multimodal_base, build_tokenizer

    folder = tmp_path / "base"
    build_tokenizer(folder)
    build_multimodal_base(folder, layout="prefixed")
    base = LocalModel(path=folder, identity={"path": str(folder), "sha256": "x"})
    copy = tmp_path / "cache" / "bases" / _key({"base": base.identity})
    leftover = copy.with_name(f".{copy.name}.x1y2z3.partial")
    leftover.mkdir(parents=True)
    (leftover / "model.safetensors").write_bytes(b"half a base")
    out, _, record = prepare_base(base, tmp_path / "cache")
    assert out == copy and not record["cached"] and not leftover.exists()
    assert sorted(p.name for p in copy.parent.iterdir()) == [copy.name, f"{copy.name}.done.json",
                                                            f"{copy.name}.lock"]
