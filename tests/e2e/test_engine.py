"""The bakery engine (`[merge] engine = "bakery"`, the default) against the reference path.

The reference is `[merge] engine = "mergekit"`: PEFT merge_and_unload bakes, mergekit's run_merge,
name repair; tests/e2e/test_pipeline.py holds it bit-identical to an independent mergekit-yaml
run. Here every method on every base layout the tool accepts must come out of the engine with the
same bytes: the 1B-like text model, the multimodal model in the hub layout, the multimodal model
in transformers 5.4-5.5's double-prefixed layout, and sharded bases (text and multimodal; one
untouched tensor holds -0.0, which a TIES or task_arithmetic merge turns into +0.0, so it must not
be copied through). Adapters the engine cannot compute exactly fall back, recorded.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from bakery_slurm import manifest
from bakery_slurm.manifest import marker_path
from bakery_slurm.matrix import expand, load_matrix
from bakery_slurm.pipeline import CellPaths, run_cell
from support import checkpoint_tensors

pytestmark = pytest.mark.e2e

LAYOUTS = ("hub", "prefixed", "sharded")
SIZES = ("tiny1b", "tiny4b")
METHODS = ("linear", "task_arithmetic", "ties")
ENGINES = ("bakery", "mergekit")


def cell_id(size: str, method: str) -> str:
    return f"{size}-std/eng-nob__{method}"


def reshard(base: Path, negative_zero_in: str) -> None:
    """Split `base/model.safetensors` into two shards plus an index, and set the first element of
    the (untouched) tensor `negative_zero_in` to -0.0."""
    tensors = load_file(str(base / "model.safetensors"))
    tensors[negative_zero_in] = tensors[negative_zero_in].clone()
    tensors[negative_zero_in].view(-1)[0] = -0.0
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, part in halves.items():
        save_file({n: tensors[n] for n in part}, str(base / file), metadata={"format": "pt"})
    (base / "model.safetensors").unlink()
    weight_map = {n: file for file, part in halves.items() for n in part}
    (base / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
         "weight_map": weight_map}))


@pytest.fixture(scope="module")
def layouts(tmp_path_factory, tiny_models) -> dict[str, Path]:
    """A models root per layout (bases/{text,multimodal}, adapters/...)."""
    from bakery_slurm.tiny import build_demo_models

    root = tmp_path_factory.mktemp("layouts")
    prefixed = root / "prefixed"
    build_demo_models(prefixed, layout="prefixed")
    sharded = root / "sharded"
    shutil.copytree(tiny_models, sharded)
    reshard(sharded / "bases" / "text", "model.norm.weight")
    reshard(sharded / "bases" / "multimodal", "language_model.model.norm.weight")
    return {"hub": tiny_models, "prefixed": prefixed, "sharded": sharded}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, write_tiny_matrix, layouts) -> SimpleNamespace:
    """Every tiny cell of every layout, once per engine, on CPU."""
    root = tmp_path_factory.mktemp("engine-runs")
    results, published, work = {}, {}, {}
    for layout, models in layouts.items():
        for engine in ENGINES:
            matrix = load_matrix(write_tiny_matrix(root / layout / engine, models=models,
                                                   engine=engine))
            published[layout, engine] = root / layout / engine / "published"
            work[layout, engine] = matrix.work_dir
            for cell in expand(matrix):
                results[layout, engine, cell.id] = run_cell(cell, matrix.work_dir, device="cpu")
    return SimpleNamespace(results=results, published=published, work=work, layouts=layouts)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_engine_is_bit_identical_to_peft_bakes_and_mergekit(runs, layout, size, method):
    cid = cell_id(size, method)
    ours = checkpoint_tensors(runs.published[layout, "bakery"] / cid)
    reference = checkpoint_tensors(runs.published[layout, "mergekit"] / cid)
    assert ours.keys() == reference.keys()
    different = [n for n in ours if ours[n].dtype != reference[n].dtype
                 or not torch.equal(ours[n], reference[n])]
    assert not different, f"{len(different)} tensors differ from the reference, e.g. {different[:5]}"
    # Bit-identical also where the values are equal as numbers but not as bits (-0.0 vs +0.0).
    assert all(torch.equal(ours[n].view(torch.int16), reference[n].view(torch.int16)) for n in ours)
    base = checkpoint_tensors(runs.layouts[layout] / "bases" / {"tiny1b": "text",
                                                                 "tiny4b": "multimodal"}[size])
    assert any(not torch.equal(ours[n], t) for n, t in zip(ours, base.values()))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("size", SIZES)
def test_engine_records_one_pass_without_bakes(runs, size, method):
    result = runs.results["hub", "bakery", cell_id(size, method)]
    stages = result["stages"]
    assert result["status"] == "done"
    assert stages["bake"]["engine"] == "bakery" and stages["bake"]["engine_fallback_reason"] is None
    assert stages["bake"]["status"] == "skipped" and stages["bake"]["bytes_written"] == 0
    assert stages["strip"]["status"] == "skipped"
    merge = stages["merge"]
    assert merge["status"] == "done" and merge["device"] == "cpu" and merge["bytes_written"] > 0
    progress = result["progress"]
    assert progress["tensors_done"] == progress["tensors_total"] == merge["tensors"] > 0
    assert progress["bytes_done"] == progress["bytes_total"] > 0
    # Untouched tensors (embeddings, norms) are copied through: every method leaves them unchanged.
    assert 0 < merge["passed_through"] < merge["tensors"]
    assert not (runs.work["hub", "bakery"] / "cache" / "bakes").exists()
    assert not (CellPaths(runs.work["hub", "bakery"], cell_id(size, method)).merged).exists()


def test_the_merge_marker_takes_the_hashes_made_while_writing(tmp_path, write_tiny_matrix,
                                                               monkeypatch):
    """The engine hashes each shard as it writes it; nothing between the write and the marker
    (the staging folder's fsync, modes and rename) makes the marker read the output again."""
    hashed = []
    real = manifest.sha256_file
    monkeypatch.setattr(manifest, "sha256_file", lambda path: hashed.append(path) or real(path))
    matrix = load_matrix(write_tiny_matrix(tmp_path, methods=("linear",)))
    cell = next(c for c in expand(matrix) if c.id == cell_id("tiny4b", "linear"))
    result = run_cell(cell, matrix.work_dir, device="cpu")
    final = CellPaths(matrix.work_dir, cell.id).final
    marker = json.loads(marker_path(final).read_text())
    weights = [name for name in marker["files"] if name.endswith(".safetensors")]
    assert weights and result["stages"]["merge"]["outputs"] == marker["content_sha256"]
    for name in weights:
        assert marker["files"][name]["sha256"] == real(final / name)
    assert not [p for p in hashed if p.suffix == ".safetensors" and "cells" in p.parts]


def test_negative_zero_is_merged_not_copied(runs):
    """The sharded bases' norm weights hold a -0.0; every method gives +0.0 there."""
    for size, name in (("tiny1b", "model.norm.weight"),
                       ("tiny4b", "language_model.model.norm.weight")):
        for method in METHODS:
            out = checkpoint_tensors(runs.published["sharded", "bakery"] / cell_id(size, method))
            first = out[name].view(-1)[0]
            assert first == 0 and not torch.signbit(first), (size, method)


def test_rerun_skips_the_merge_and_a_lost_output_is_remade_identically(runs, write_tiny_matrix):
    matrix = load_matrix(write_tiny_matrix(runs.work["hub", "bakery"].parent))
    cell = next(c for c in expand(matrix) if c.id == cell_id("tiny4b", "ties"))
    first = runs.results["hub", "bakery", cell.id]
    again = run_cell(cell, matrix.work_dir, device="cpu")
    assert again["stages"]["merge"]["status"] == "skipped"
    assert again["stages"]["verify"]["status"] == "skipped"
    assert again["stages"]["push"]["status"] == "skipped"
    paths = CellPaths(matrix.work_dir, cell.id)
    shutil.rmtree(paths.final)
    marker_path(paths.final).unlink()
    remade = run_cell(cell, matrix.work_dir, device="cpu")
    assert remade["stages"]["merge"]["status"] == "done"
    assert remade["stages"]["merge"]["outputs"] == first["stages"]["merge"]["outputs"]
    # The same bytes were verified already.
    assert remade["stages"]["verify"]["status"] == "skipped"


def test_keep_bakes_writes_the_bakes_and_merges_with_the_engine(tmp_path, write_tiny_matrix, runs):
    path = write_tiny_matrix(tmp_path, methods=("ties",))
    path.write_text(path.read_text() + "keep_bakes = true\n")
    matrix = load_matrix(path)
    cell = next(c for c in expand(matrix) if c.id == cell_id("tiny1b", "ties"))
    result = run_cell(cell, matrix.work_dir, device="cpu")
    assert result["stages"]["bake"]["engine"] == "bakery"
    assert result["stages"]["bake"]["status"] == "done"
    assert set(result["stages"]["bake"]["adapters"]) == {"eng", "nob"}
    assert len(list((matrix.work_dir / "cache" / "bakes").glob("*.done.json"))) == 2
    assert result["stages"]["strip"]["status"] == "skipped"
    ours = checkpoint_tensors(tmp_path / "published" / cell.id)
    reference = checkpoint_tensors(runs.published["hub", "mergekit"] / cell.id)
    assert all(torch.equal(ours[n], reference[n]) for n in reference)


def adapters_with(tmp_path: Path, tiny_models: Path, **lora_options) -> Path:
    """A copy of the tiny models whose text adapters are rebuilt with `lora_options`."""
    from bakery_slurm.tiny import build_lora_adapter

    models = tmp_path / "models"
    shutil.copytree(tiny_models, models)
    for seed, name in enumerate(("eng", "nob"), start=1):
        build_lora_adapter(models / "bases" / "text", models / "adapters" / "text" / name,
                           seed=seed, **lora_options)
    return models


def run_both(tmp_path: Path, models: Path, write_tiny_matrix, method: str, size: str = "tiny1b",
             dtype: str | None = None) -> dict[str, dict]:
    """One cell with each engine (in the matrix's `dtype`, when given): result and published tensors."""
    out = {}
    for engine in ENGINES:
        path = write_tiny_matrix(tmp_path / engine, models=models, methods=(method,), engine=engine)
        if dtype:
            path.write_text(f'dtype = "{dtype}"\n' + path.read_text())
        matrix = load_matrix(path)
        cell = next(c for c in expand(matrix) if c.id == cell_id(size, method))
        # The same random state for both: a PEFT bake may draw from it (init_lora_weights = False).
        torch.manual_seed(0)
        out[engine] = {"result": run_cell(cell, matrix.work_dir, device="cpu"),
                       "tensors": checkpoint_tensors(tmp_path / engine / "published" / cell.id)}
    return out


def test_rslora_is_computed_exactly(tmp_path, tiny_models, write_tiny_matrix, runs):
    """rsLoRA scales by alpha / sqrt(r) instead of alpha / r; the engine does the same."""
    models = adapters_with(tmp_path, tiny_models, use_rslora=True)
    both = run_both(tmp_path, models, write_tiny_matrix, "task_arithmetic")
    assert both["bakery"]["result"]["stages"]["bake"]["engine"] == "bakery"
    ours, reference = both["bakery"]["tensors"], both["mergekit"]["tensors"]
    assert all(torch.equal(ours[n], reference[n]) for n in reference)
    # Same factors as the plain adapters (same seeds), another scaling: another result.
    plain = checkpoint_tensors(runs.published["hub", "bakery"] / cell_id("tiny1b", "task_arithmetic"))
    assert any(not torch.equal(ours[n], plain[n]) for n in plain)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_adapters_saved_in_16_bits_are_baked_as_peft_loads_them(tmp_path, tiny_models,
                                                               write_tiny_matrix, runs, dtype):
    """PEFT loads 16-bit LoRA factors into fp32 layers (an exact upcast) before it merges them;
    the engine reads the factors in their file's dtype and upcasts them the same way."""
    models = tmp_path / "models"
    shutil.copytree(tiny_models, models)
    for name in ("eng", "nob"):
        file = models / "adapters" / "text" / name / "adapter_model.safetensors"
        save_file({key: factor.to(dtype) for key, factor in load_file(str(file)).items()},
                  str(file), metadata={"format": "pt"})
    both = run_both(tmp_path, models, write_tiny_matrix, "task_arithmetic")
    assert both["bakery"]["result"]["stages"]["bake"]["engine"] == "bakery"
    ours, reference = both["bakery"]["tensors"], both["mergekit"]["tensors"]
    assert ours.keys() == reference.keys()
    assert all(torch.equal(ours[n], reference[n]) for n in reference)
    # The factors rounded to 16 bits: another result than the fp32 adapters'.
    plain = checkpoint_tensors(runs.published["hub", "bakery"] / cell_id("tiny1b", "task_arithmetic"))
    assert any(not torch.equal(ours[n], plain[n]) for n in plain)


@pytest.mark.parametrize("options, reason", [
    ({"use_dora": True}, "use_dora"),
    ({"target_modules": ["q_proj", "embed_tokens"]}, "not a linear LoRA factor"),
    # PEFT's from_pretrained runs these inits again, which replace the base weight by a residual.
    ({"init_lora_weights": "pissa"}, "init_lora_weights = 'pissa'"),
    ({"init_lora_weights": "olora"}, "init_lora_weights = 'olora'"),
])
def test_unsupported_adapters_fall_back_to_peft_and_mergekit(tmp_path, tiny_models,
                                                             write_tiny_matrix, options, reason):
    models = adapters_with(tmp_path, tiny_models, **options)
    both = run_both(tmp_path, models, write_tiny_matrix, "ties")
    bake = both["bakery"]["result"]["stages"]["bake"]
    assert bake["engine"] == "mergekit" and reason in bake["engine_fallback_reason"]
    assert bake["status"] == "done" and set(bake["adapters"]) == {"eng", "nob"}
    assert both["bakery"]["result"]["stages"]["strip"]["status"] == "done"
    ours, reference = both["bakery"]["tensors"], both["mergekit"]["tensors"]
    assert ours.keys() == reference.keys()
    assert all(torch.equal(ours[n], reference[n]) for n in reference)


def assert_same_bytes(both: dict[str, dict]) -> None:
    ours, reference = both["bakery"]["tensors"], both["mergekit"]["tensors"]
    assert ours.keys() == reference.keys()
    assert all(ours[n].dtype == reference[n].dtype
               and torch.equal(ours[n].view(torch.uint8), reference[n].view(torch.uint8))
               for n in reference)


def edit_adapter_configs(models: Path, kind: str, **settings) -> None:
    for name in ("eng", "nob"):
        path = models / "adapters" / kind / name / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **settings}, indent=2))


@pytest.mark.parametrize("settings", [
    {"target_modules": ["q_proj", "v_proj"]},
    {"layers_to_transform": [0]},
    {"exclude_modules": ["fc1", "fc2"]},
    {"target_modules": r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"},
], ids=["target-list", "layers-to-transform", "exclude-modules", "language-model-regex"])
def test_saved_factors_the_config_does_not_select_fall_back(tmp_path, tiny_models,
                                                            write_tiny_matrix, settings):
    """PEFT makes LoRA layers only for the modules adapter_config.json selects, and ignores the
    saved factors of any other: an adapter whose file holds more than its config selects is left
    to PEFT, recorded."""
    models = tmp_path / "models"
    shutil.copytree(tiny_models, models)
    edit_adapter_configs(models, "multimodal", **settings)
    both = run_both(tmp_path, models, write_tiny_matrix, "task_arithmetic", "tiny4b")
    assert "does not select" in both["bakery"]["result"]["stages"]["bake"]["engine_fallback_reason"]
    assert_same_bytes(both)


@pytest.mark.parametrize("kind, missing", [
    ("text", None),
    ("text", "model.layers.0.self_attn.q_proj"),
    ("multimodal", None),
    ("multimodal", "model.vision_tower.encoder.layers.0.self_attn.q_proj"),
], ids=["text-all-saved", "text-one-missing", "multimodal-all-saved", "multimodal-one-missing"])
def test_a_randomly_initialised_module_without_saved_factors_falls_back(tmp_path, tiny_models,
                                                                         write_tiny_matrix, kind,
                                                                         missing):
    """With init_lora_weights = False PEFT initialises every LoRA layer it creates at random (A
    and B), and a module the config selects whose factors the file lacks keeps that noise, which
    merge_and_unload bakes in. The engine computes such an adapter only when every selected
    module has its saved factors; otherwise the cell falls back, recorded."""
    from bakery_slurm.tiny import build_lora_adapter

    models = tmp_path / "models"
    shutil.copytree(tiny_models, models)
    for seed, name in enumerate(("eng", "nob"), start=1):
        folder = models / "adapters" / kind / name
        build_lora_adapter(models / "bases" / kind, folder, seed=seed, init_lora_weights=False,
                           target_modules=["q_proj", "v_proj"])
        if missing:
            file = folder / "adapter_model.safetensors"
            save_file({key: factor for key, factor in load_file(str(file)).items()
                       if f".{missing}.lora_" not in key}, str(file), metadata={"format": "pt"})
    both = run_both(tmp_path, models, write_tiny_matrix, "task_arithmetic",
                    {"text": "tiny1b", "multimodal": "tiny4b"}[kind])
    bake = both["bakery"]["result"]["stages"]["bake"]
    if missing:
        assert bake["engine"] == "mergekit"
        assert f"{missing}: selected, but no saved factors" in bake["engine_fallback_reason"]
    else:
        assert bake["engine"] == "bakery" and bake["engine_fallback_reason"] is None
    assert_same_bytes(both)


# Keys of each form PEFT matches (`get_pattern_key`: the key, as a regex, ends the module's name
# from its start or after a dot): a plain suffix, layer-indexed paths (on the multimodal model
# also the vision tower's layer 0), full module paths of either model, regexes, and a key that
# matches nothing (PEFT warns and ignores it).
RANK_PATTERN = {"layers.0.self_attn.q_proj": 2, r"layers\.1\.mlp\.(up|down)_proj": 8,
                "no_such_module": 16}
ALPHA_PATTERN = {"model.layers.1.self_attn.v_proj": 3,
                 "model.language_model.layers.1.self_attn.v_proj": 3,
                 "gate_proj": 32, r".*\.0\.mlp\..*": 5}


@pytest.mark.parametrize("kind, rslora", [("text", False), ("text", True), ("multimodal", False)],
                         ids=["text", "text-rslora", "multimodal"])
@pytest.mark.parametrize("method", METHODS)
def test_rank_and_alpha_patterns_are_computed_exactly(tmp_path, tiny_models, write_tiny_matrix,
                                                      method, kind, rslora):
    """PEFT gives each module the r and lora_alpha of the first rank_pattern / alpha_pattern key
    that matches its name; the engine computes the same per-module scaling, without falling back."""
    from bakery_slurm.tiny import build_lora_adapter

    models = tmp_path / "models"
    shutil.copytree(tiny_models, models)
    for seed, name in enumerate(("eng", "nob"), start=1):
        folder = build_lora_adapter(models / "bases" / kind, models / "adapters" / kind / name,
                                    seed=seed, rank_pattern=RANK_PATTERN,
                                    alpha_pattern=ALPHA_PATTERN, use_rslora=rslora)
        config = json.loads((folder / "adapter_config.json").read_text())
        assert (config["rank_pattern"], config["alpha_pattern"]) == (RANK_PATTERN, ALPHA_PATTERN)
    both = run_both(tmp_path, models, write_tiny_matrix, method,
                    {"text": "tiny1b", "multimodal": "tiny4b"}[kind])
    bake = both["bakery"]["result"]["stages"]["bake"]
    assert bake["engine"] == "bakery" and bake["engine_fallback_reason"] is None
    assert bake["status"] == "skipped"
    assert_same_bytes(both)


@pytest.mark.parametrize("missing", [("r",), ("lora_alpha",), ("r", "lora_alpha")])
def test_a_config_without_r_or_lora_alpha_is_computed_with_pefts_defaults(
        tmp_path, tiny_models, write_tiny_matrix, missing):
    """PEFT reads a missing r or lora_alpha as LoraConfig's default (8 and 8); so does the engine,
    here on adapters of rank 8 and alpha 32 whose rank pattern gives q_proj rank 2."""
    models = adapters_with(tmp_path, tiny_models, r=8, lora_alpha=32, rank_pattern={"q_proj": 2})
    for name in ("eng", "nob"):
        path = models / "adapters" / "text" / name / "adapter_config.json"
        config = json.loads(path.read_text())
        path.write_text(json.dumps({k: v for k, v in config.items() if k not in missing}))
    both = run_both(tmp_path, models, write_tiny_matrix, "task_arithmetic")
    bake = both["bakery"]["result"]["stages"]["bake"]
    assert bake["engine"] == "bakery" and bake["engine_fallback_reason"] is None
    assert_same_bytes(both)


@pytest.mark.parametrize("settings, error", [
    ({"rank_pattern": {"q_proj": 3}}, "size mismatch"),
    ({"rank_pattern": None}, "'NoneType' object has no attribute 'keys'"),
    ({"target_modules": r".*\.(q|k|v|o|gate|up|down)_proj", "layers_to_transform": [0]},
     "`layers_to_transform` cannot be used when `target_modules` is a str"),
    ({"layers_pattern": "layers"}, "`layers_to_transform` must also be specified"),
], ids=["pattern-rank-not-the-factors", "null-rank-pattern", "regex-target-with-layers",
        "layers-pattern-alone"])
def test_adapters_peft_cannot_load_fail_as_peft_does(tmp_path, tiny_models, write_tiny_matrix,
                                                     settings, error):
    """PEFT refuses these adapters (a layer built with the pattern's rank refuses factors of
    another, LoraConfig refuses the selection, a null pattern breaks it): the engine falls back,
    and the cell fails with PEFT's error, as the reference does."""
    from bakery_slurm.errors import StageError

    models = tmp_path / "models"
    shutil.copytree(tiny_models, models)
    edit_adapter_configs(models, "text", **settings)
    for engine in ENGINES:
        matrix = load_matrix(write_tiny_matrix(tmp_path / engine, models=models,
                                               methods=("linear",), engine=engine))
        cell = next(c for c in expand(matrix) if c.id == cell_id("tiny1b", "linear"))
        with pytest.raises(StageError, match=re.escape(error)):
            run_cell(cell, matrix.work_dir, device="cpu")


@pytest.mark.parametrize("old, new", [
    ("base_model.model.model.language_model.", "base_model.model.language_model."),
    ("base_model.model.model.vision_tower.", "base_model.model.vision_tower."),
], ids=["language_model.layers", "vision_tower.encoder"])
def test_adapter_keys_in_a_layout_peft_does_not_load_fall_back(tmp_path, tiny_models,
                                                               write_tiny_matrix, old, new):
    """Keys PEFT's key mapping does not bring to the model's modules are loaded nowhere (PEFT only
    warns of missing adapter keys): the engine must not bake them either."""
    models = tmp_path / "models"
    shutil.copytree(tiny_models, models)
    for name in ("eng", "nob"):
        file = models / "adapters" / "multimodal" / name / "adapter_model.safetensors"
        save_file({new + key[len(old):] if key.startswith(old) else key: factor
                   for key, factor in load_file(str(file)).items()},
                  str(file), metadata={"format": "pt"})
    both = run_both(tmp_path, models, write_tiny_matrix, "task_arithmetic", "tiny4b")
    assert "a key layout PEFT does not load" in both["bakery"]["result"]["stages"]["bake"]["engine_fallback_reason"]
    assert_same_bytes(both)


def test_a_base_config_without_architectures(tmp_path, tiny_models, write_tiny_matrix):
    """mergekit looks every model of a recipe up by its config's `architectures`, and fails with
    a bare TypeError on a base whose config names none (transformers loads it by model_type);
    the bakery engine needs no architecture, and the mergekit engine says what is missing."""
    from bakery_slurm.errors import StageError

    models = tmp_path / "models"
    shutil.copytree(tiny_models, models)
    config = models / "bases" / "text" / "config.json"
    config.write_text(json.dumps({k: v for k, v in json.loads(config.read_text()).items()
                                  if k != "architectures"}))
    for engine in ENGINES:
        matrix = load_matrix(write_tiny_matrix(tmp_path / engine, models=models, methods=("ties",),
                                               engine=engine))
        cell = next(c for c in expand(matrix) if c.id == cell_id("tiny1b", "ties"))
        if engine == "bakery":
            assert run_cell(cell, matrix.work_dir, device="cpu")["status"] == "done"
        else:
            with pytest.raises(StageError, match=r"stage merge failed: .*config.json names no "
                                                 r"architectures"):
                run_cell(cell, matrix.work_dir, device="cpu")


@pytest.mark.parametrize("layout", [None, "language_model.lm_head", "model.language_model.lm_head",
                                    "language_model.model.lm_head"])
def test_lm_head_factors_are_baked_only_where_peft_loads_them(tmp_path, tiny_models,
                                                              write_tiny_matrix, layout):
    """On a multimodal base with its own lm_head, PEFT loads lm_head factors saved under the
    model's module, `lm_head`; under the language model (as a Gemma3ForCausalLM inside it would
    name them) they are loaded nowhere, although the base's lm_head tensor is named
    `language_model.lm_head.weight`: the engine must not bake them either."""
    from bakery_slurm.tiny import build_lora_adapter, build_multimodal_base

    models = tmp_path / "models"
    shutil.copytree(tiny_models, models)
    base = build_multimodal_base(models / "bases" / "multimodal", tie_word_embeddings=False)
    for seed, name in enumerate(("eng", "nob"), start=1):
        folder = build_lora_adapter(base, models / "adapters" / "multimodal" / name, seed=seed,
                                    target_modules=["q_proj", "lm_head"])
        file = folder / "adapter_model.safetensors"
        old = "base_model.model.lm_head."
        save_file({f"base_model.model.{layout}.{key[len(old):]}" if layout and key.startswith(old)
                   else key: factor for key, factor in load_file(str(file)).items()},
                  str(file), metadata={"format": "pt"})
    both = run_both(tmp_path, models, write_tiny_matrix, "task_arithmetic", "tiny4b")
    bake = both["bakery"]["result"]["stages"]["bake"]
    lm_head = "language_model.lm_head.weight"
    changed = not torch.equal(both["mergekit"]["tensors"][lm_head], checkpoint_tensors(base)[lm_head])
    if layout:
        assert bake["engine"] == "mergekit" and f"adapter module {layout}" in bake["engine_fallback_reason"]
        assert not changed
    else:
        assert bake["engine"] == "bakery" and changed
    assert_same_bytes(both)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_a_cell_dtype_other_than_the_bases_is_merged_by_both_engines(tmp_path, tiny_models,
                                                                    write_tiny_matrix, dtype):
    """The bakes, and so the reference and every fallback, are in the cell's dtype, not the
    (bf16) base's."""
    both = run_both(tmp_path, tiny_models, write_tiny_matrix, "ties", dtype=dtype)
    assert both["mergekit"]["result"]["status"] == "done"
    assert {t.dtype for t in both["bakery"]["tensors"].values()} == {getattr(torch, dtype)}
    assert_same_bytes(both)


def test_a_failing_tensor_fails_the_merge_with_nothing_in_place(tmp_path, write_tiny_matrix,
                                                                monkeypatch, runs):
    """An error in one worker stops the merge: the stage fails naming it, no final/ appears, and
    the next run merges everything to the same bytes as an undisturbed run."""
    from bakery_slurm.engine import cell as engine_cell
    from bakery_slurm.errors import StageError

    real = engine_cell.baked_tensor
    baked = []

    def failing(base, a, b, scaling):
        baked.append(tuple(base.shape))
        if base.shape[0] == 128:  # the MLP's gate/up projections
            raise RuntimeError("disk on fire")
        return real(base, a, b, scaling)

    matrix = load_matrix(write_tiny_matrix(tmp_path, methods=("ties",)))
    cell = next(c for c in expand(matrix) if c.id == cell_id("tiny1b", "ties"))
    paths = CellPaths(matrix.work_dir, cell.id)
    monkeypatch.setattr(engine_cell, "baked_tensor", failing)
    # One worker: every unit is queued before the first fails (the budget holds them all), and
    # none of them may start after it.
    monkeypatch.setattr(engine_cell, "available_cores", lambda: 1)
    with pytest.raises(StageError, match="merge failed: RuntimeError: disk on fire"):
        run_cell(cell, matrix.work_dir, device="cpu")
    assert not paths.final.exists() and not marker_path(paths.final).exists()
    assert baked[-1][0] == 128 and baked.count(baked[-1]) == 1
    monkeypatch.setattr(engine_cell, "baked_tensor", real)
    result = run_cell(cell, matrix.work_dir, device="cpu")
    assert result["status"] == "done"
    assert not list(paths.root.glob(".*.partial"))
    ours = checkpoint_tensors(tmp_path / "published" / cell.id)
    reference = checkpoint_tensors(runs.published["hub", "bakery"] / cell.id)
    assert all(torch.equal(ours[n], reference[n]) for n in reference)
