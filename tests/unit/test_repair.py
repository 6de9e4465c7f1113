"""Tests of bakery_slurm.repair on real (tiny) safetensors files written with safetensors.numpy."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from bakery_slurm.errors import RepairError
from bakery_slurm.repair import (
    INDEX_FILE,
    checkpoint_tensors,
    detect_kind,
    plan_renames,
    read_header,
    repair_checkpoint,
    tensor_set,
    to_hub_name,
)

# A miniature Gemma3ForConditionalGeneration in the hub layout: every subtree is represented.
HUB_SHAPES = {
    "language_model.model.embed_tokens.weight": (16, 8),
    "language_model.model.layers.0.self_attn.q_proj.weight": (8, 8),
    "language_model.model.layers.0.mlp.down_proj.weight": (8, 4),
    "language_model.model.norm.weight": (8,),
    "vision_tower.vision_model.embeddings.patch_embedding.weight": (4, 3, 2, 2),
    "vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight": (4, 4),
    "vision_tower.vision_model.post_layernorm.weight": (4,),
    "multi_modal_projector.mm_input_projection_weight": (4, 8),
    "multi_modal_projector.mm_soft_emb_norm.weight": (4,),
}
TEXT_SHAPES = {
    "model.embed_tokens.weight": (16, 8),
    "model.layers.0.self_attn.q_proj.weight": (8, 8),
    "model.norm.weight": (8,),
}
MULTIMODAL_CONFIG = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3"}
TEXT_CONFIG = {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text"}
METADATA = {"format": "pt", "note": "kept"}


def layout_b(hub: str) -> str:
    """transformers 4.52.0-4.52.3."""
    if hub.startswith("language_model.model."):
        return "model.language_model." + hub[len("language_model.model.") :]
    if hub == "language_model.lm_head.weight":
        return "lm_head.weight"
    return "model." + hub


def layout_c(hub: str) -> str:
    """transformers 5.4.0-5.5.4: an extra leading `model.`."""
    return "model." + hub


def without_vision_model(hub: str) -> str:
    """What transformers 5.24 saves for a model built from a config (seen on this machine)."""
    if hub.startswith("vision_tower.vision_model."):
        return "vision_tower." + hub[len("vision_tower.vision_model.") :]
    return hub


def layout_d(hub: str) -> str:
    """Built from a config in other 5.x: no `vision_model.`, text model under `model.language_model.`."""
    return layout_b(without_vision_model(hub))


LAYOUTS = {"a": lambda hub: hub, "b": layout_b, "c": layout_c, "d": layout_d, "d-5.24": without_vision_model}


def arrays(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, np.ndarray]:
    # Distinct values per tensor, so a tensor swapped for another of the same shape is noticed.
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def specs(shapes: dict[str, tuple[int, ...]], dtype: str = "F32") -> dict[str, tuple[str, tuple[int, ...]]]:
    return {name: (dtype, shape) for name, shape in shapes.items()}


def write_checkpoint(folder: Path, tensors: dict[str, np.ndarray], config: dict | None, shards: int = 1) -> Path:
    """Write a checkpoint folder as transformers does: one file, or shards plus an index."""
    folder.mkdir(parents=True)
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer.json").write_text('{"model": "bpe"}')
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"), metadata=METADATA)
        return folder
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {name: tensors[name] for name in names[i::shards]}
        save_file(part, str(folder / file), metadata=METADATA)
        weight_map.update(dict.fromkeys(part, file))
    total = sum(t.nbytes for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_FILE).write_text(json.dumps(index))
    return folder


def data_section(path: Path) -> bytes:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return raw[8 + length :]


def header_length(path: Path) -> int:
    with open(path, "rb") as f:
        return struct.unpack("<Q", f.read(8))[0]


# ---------------------------------------------------------------------------------------------- pure


@pytest.mark.parametrize(
    ("name", "hub"),
    [
        ("language_model.model.layers.3.mlp.up_proj.weight", "language_model.model.layers.3.mlp.up_proj.weight"),
        ("language_model.lm_head.weight", "language_model.lm_head.weight"),
        ("vision_tower.vision_model.post_layernorm.bias", "vision_tower.vision_model.post_layernorm.bias"),
        ("multi_modal_projector.mm_input_projection_weight", "multi_modal_projector.mm_input_projection_weight"),
        ("model.language_model.embed_tokens.weight", "language_model.model.embed_tokens.weight"),
        ("model.language_model.norm.weight", "language_model.model.norm.weight"),
        ("model.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight",
         "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"),
        ("model.multi_modal_projector.mm_soft_emb_norm.weight", "multi_modal_projector.mm_soft_emb_norm.weight"),
        ("lm_head.weight", "language_model.lm_head.weight"),
        ("model.language_model.model.layers.0.input_layernorm.weight",
         "language_model.model.layers.0.input_layernorm.weight"),
        ("model.language_model.lm_head.weight", "language_model.lm_head.weight"),
        ("vision_tower.embeddings.patch_embedding.weight",
         "vision_tower.vision_model.embeddings.patch_embedding.weight"),
        ("model.vision_tower.embeddings.position_embedding.weight",
         "vision_tower.vision_model.embeddings.position_embedding.weight"),
    ],
)
def test_to_hub_name(name, hub):
    assert to_hub_name(name) == hub


@pytest.mark.parametrize(
    "name", ["model.lm_head.weight", "model.something.weight", "model.norm.weight", "lm_head"]
)
def test_to_hub_name_leaves_unknown_names_for_the_bijection_check(name):
    assert to_hub_name(name) == name


def test_detect_kind_prefers_config_over_names():
    assert detect_kind(HUB_SHAPES, TEXT_CONFIG) == "text"
    assert detect_kind(TEXT_SHAPES, MULTIMODAL_CONFIG) == "multimodal"
    assert detect_kind(TEXT_SHAPES, {"model_type": "gemma3"}) == "multimodal"
    assert detect_kind(HUB_SHAPES, {"model_type": "gemma3_text"}) == "text"


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_detect_kind_from_names(layout):
    assert detect_kind(map(LAYOUTS[layout], HUB_SHAPES), None) == "multimodal"
    assert detect_kind(TEXT_SHAPES, {}) == "text"


def test_detect_kind_refuses_other_architectures():
    with pytest.raises(RepairError, match="LlamaForCausalLM"):
        detect_kind(TEXT_SHAPES, {"architectures": ["LlamaForCausalLM"], "model_type": "llama"})


def test_plan_for_text_is_identity_and_keeps_leading_model():
    plan = plan_renames(specs(TEXT_SHAPES), specs(TEXT_SHAPES), "text")
    assert plan == {name: name for name in TEXT_SHAPES}


def test_plan_renames_every_tensor_of_layout_c():
    plan = plan_renames({layout_c(n): ("F32", s) for n, s in HUB_SHAPES.items()}, specs(HUB_SHAPES), "multimodal")
    assert plan == {layout_c(n): n for n in HUB_SHAPES}


def refusal(tensors, base, kind="multimodal") -> str:
    with pytest.raises(RepairError) as e:
        plan_renames(tensors, base, kind)
    return str(e.value)


def test_plan_refuses_a_missing_tensor():
    tensors = {layout_b(n): ("F32", s) for n, s in HUB_SHAPES.items() if "post_layernorm" not in n}
    message = refusal(tensors, specs(HUB_SHAPES))
    assert "missing from the checkpoint: vision_tower.vision_model.post_layernorm.weight" in message


def test_plan_refuses_an_extra_tensor_naming_it_old_and_new():
    tensors = {layout_c(n): ("F32", s) for n, s in HUB_SHAPES.items()} | {"lm_head.weight": ("F32", (16, 8))}
    message = refusal(tensors, specs(HUB_SHAPES))
    assert "not in the base: lm_head.weight (as language_model.lm_head.weight)" in message


def test_plan_refuses_an_unknown_name_instead_of_stripping_it():
    tensors = specs(HUB_SHAPES) | {"model.rotary_emb.inv_freq": ("F32", (4,))}
    assert "not in the base: model.rotary_emb.inv_freq" in refusal(tensors, specs(HUB_SHAPES))


def test_plan_refuses_two_names_mapping_to_one():
    tensors = specs(HUB_SHAPES) | {"model.language_model.norm.weight": ("F32", (8,))}
    message = refusal(tensors, specs(HUB_SHAPES))
    assert (
        "colliding: language_model.model.norm.weight and model.language_model.norm.weight"
        " -> language_model.model.norm.weight" in message
    )


@pytest.mark.parametrize(("spec", "shown"), [(("F32", (8, 2)), "F32 [8, 2]"), (("F16", (8, 4)), "F16 [8, 4]")])
def test_plan_refuses_a_shape_or_dtype_mismatch(spec, shown):
    name = "language_model.model.layers.0.mlp.down_proj.weight"
    tensors = {layout_b(n): ("F32", s) for n, s in HUB_SHAPES.items()} | {layout_b(name): spec}
    message = refusal(tensors, specs(HUB_SHAPES))
    old = "model.language_model.layers.0.mlp.down_proj.weight"
    assert f"{old} (as {name}): {shown}, base has F32 [8, 4]" in message


def test_plan_text_kind_refuses_stripped_names():
    stripped = {name[len("model.") :]: spec for name, spec in specs(TEXT_SHAPES).items()}
    message = refusal(stripped, specs(TEXT_SHAPES), "text")
    assert "missing from the checkpoint: model.embed_tokens.weight" in message


def test_plan_refuses_a_base_not_in_hub_layout():
    base = {layout_c(n): spec for n, spec in specs(HUB_SHAPES).items()}
    assert "the base is not in the hub layout" in refusal(specs(HUB_SHAPES), base)


def test_plan_lists_at_most_ten_names():
    base = {f"language_model.model.layers.{i}.weight": ("F32", (1,)) for i in range(25)}
    assert "(and 15 more)" in refusal({}, base)


# --------------------------------------------------------------------------------------------- shell


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_repair_brings_every_layout_to_hub(tmp_path, layout):
    hub_arrays = arrays(HUB_SHAPES)
    src = write_checkpoint(
        tmp_path / "src", {LAYOUTS[layout](n): a for n, a in hub_arrays.items()}, MULTIMODAL_CONFIG
    )
    report = repair_checkpoint(src, tmp_path / "dst", specs(HUB_SHAPES))

    dst = tmp_path / "dst"
    assert tensor_set(dst) == specs(HUB_SHAPES)
    repaired = load_file(str(dst / "model.safetensors"))
    assert all(np.array_equal(repaired[n], hub_arrays[n]) for n in HUB_SHAPES)
    assert data_section(dst / "model.safetensors") == data_section(src / "model.safetensors")
    assert header_length(dst / "model.safetensors") % 8 == 0
    assert read_header(dst / "model.safetensors")["__metadata__"] == METADATA
    for name in ("config.json", "tokenizer.json"):
        assert (dst / name).read_bytes() == (src / name).read_bytes()
    assert report.kind == "multimodal"
    assert report.identity == (layout == "a")
    assert report.renamed == sum(LAYOUTS[layout](n) != n for n in HUB_SHAPES)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "src"]


def test_repair_renames_a_top_level_lm_head_when_the_base_has_one(tmp_path):
    shapes = HUB_SHAPES | {"language_model.lm_head.weight": (16, 8)}
    src = write_checkpoint(tmp_path / "src", {layout_d(n): a for n, a in arrays(shapes).items()}, None)
    report = repair_checkpoint(src, tmp_path / "dst", specs(shapes))
    assert tensor_set(tmp_path / "dst") == specs(shapes)
    assert "lm_head.weight" in tensor_set(src) and report.renamed == len(shapes)


def test_repair_of_text_checkpoint_links_it_untouched(tmp_path):
    src = write_checkpoint(tmp_path / "src", arrays(TEXT_SHAPES), TEXT_CONFIG)
    base = tensor_set(write_checkpoint(tmp_path / "base", arrays(TEXT_SHAPES, seed=1), TEXT_CONFIG))
    report = repair_checkpoint(src, tmp_path / "dst", base)

    assert report.identity and report.renamed == 0 and report.kind == "text"
    assert report.bytes_written == 0 and report.files_linked == 3
    assert tensor_set(tmp_path / "dst") == specs(TEXT_SHAPES)
    assert os.path.samefile(src / "model.safetensors", tmp_path / "dst" / "model.safetensors")


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (lambda t: t.pop("language_model.model.norm.weight"), "language_model.model.norm.weight"),
        (lambda t: t.update(extra=np.zeros(2, np.float32)), "extra"),
        (lambda t: t.update({"model.language_model.norm.weight": np.zeros(8, np.float32)}),
         "model.language_model.norm.weight"),
        (lambda t: t.update({"multi_modal_projector.mm_soft_emb_norm.weight": np.zeros(5, np.float32)}),
         "multi_modal_projector.mm_soft_emb_norm.weight"),
        (lambda t: t.update({"multi_modal_projector.mm_soft_emb_norm.weight": np.zeros(4, np.float16)}),
         "multi_modal_projector.mm_soft_emb_norm.weight"),
    ],
    ids=["missing", "extra", "collision", "shape", "dtype"],
)
def test_refused_repair_leaves_no_destination(tmp_path, edit, named):
    tensors = arrays(HUB_SHAPES)
    edit(tensors)
    src = write_checkpoint(tmp_path / "src", tensors, MULTIMODAL_CONFIG)
    (tmp_path / "old").mkdir()
    with pytest.raises(RepairError, match=named):
        repair_checkpoint(src, tmp_path / "dst", specs(HUB_SHAPES))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old", "src"]


def test_repair_of_sharded_checkpoint_renames_the_index(tmp_path):
    hub_arrays = arrays(HUB_SHAPES)
    src = write_checkpoint(tmp_path / "src", {layout_c(n): a for n, a in hub_arrays.items()}, MULTIMODAL_CONFIG, 3)
    report = repair_checkpoint(src, tmp_path / "dst", specs(HUB_SHAPES))

    dst = tmp_path / "dst"
    old_index = json.loads((src / INDEX_FILE).read_text())
    new_index = json.loads((dst / INDEX_FILE).read_text())
    assert new_index["metadata"] == old_index["metadata"]
    assert new_index["weight_map"] == {to_hub_name(k): v for k, v in old_index["weight_map"].items()}
    # checkpoint_tensors cross-checks the index against every shard header.
    assert {n: loc.file for n, loc in checkpoint_tensors(dst).items()} == new_index["weight_map"]
    for shard in sorted(set(new_index["weight_map"].values())):
        assert data_section(dst / shard) == data_section(src / shard)
        assert header_length(dst / shard) % 8 == 0
        for name, array in load_file(str(dst / shard)).items():
            assert np.array_equal(array, hub_arrays[name])
    assert report.renamed == len(HUB_SHAPES) and report.bytes_read > 0


def test_header_padding_is_added_to_an_unpadded_file(tmp_path):
    # Handcrafted: a 1-tensor file whose header is deliberately not a multiple of 8 long.
    header = json.dumps({"model.multi_modal_projector.mm_soft_emb_norm.weight": {
        "dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, separators=(",", ":")).encode()
    header += b" " if len(header) % 8 == 0 else b""
    src = tmp_path / "src"
    src.mkdir()
    (src / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\x01" * 8)
    base = {"multi_modal_projector.mm_soft_emb_norm.weight": ("F32", (2,))}
    repair_checkpoint(src, tmp_path / "dst", base)
    assert header_length(tmp_path / "dst" / "model.safetensors") % 8 == 0
    repaired = load_file(str(tmp_path / "dst" / "model.safetensors"))
    assert repaired["multi_modal_projector.mm_soft_emb_norm.weight"].tobytes() == b"\x01" * 8


def test_truncated_shard_is_refused(tmp_path):
    src = write_checkpoint(tmp_path / "src", arrays(TEXT_SHAPES), TEXT_CONFIG)
    path = src / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(RepairError, match="truncated"):
        read_header(path)


def test_index_disagreeing_with_shards_is_refused(tmp_path):
    src = write_checkpoint(tmp_path / "src", arrays(HUB_SHAPES), MULTIMODAL_CONFIG, 2)
    index = json.loads((src / INDEX_FILE).read_text())
    shard_of_norm = index["weight_map"]["language_model.model.norm.weight"]
    other = next(f for f in index["weight_map"].values() if f != shard_of_norm)
    index["weight_map"]["language_model.model.norm.weight"] = other
    (src / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(RepairError, match="disagrees with the shards: language_model.model.norm.weight"):
        checkpoint_tensors(src)


def test_stray_safetensors_file_is_refused(tmp_path):
    src = write_checkpoint(tmp_path / "src", arrays(HUB_SHAPES), MULTIMODAL_CONFIG, 2)
    save_file({"x": np.zeros(1, np.float32)}, str(src / "model-00001-of-00003.safetensors"))
    with pytest.raises(RepairError, match="not in model.safetensors.index.json: model-00001-of-00003"):
        checkpoint_tensors(src)


def test_destination_overlapping_source_is_refused(tmp_path):
    src = write_checkpoint(tmp_path / "src", arrays(TEXT_SHAPES), TEXT_CONFIG)
    for dst in (src, src / "fixed", tmp_path):
        with pytest.raises(RepairError, match="overlaps"):
            repair_checkpoint(src, dst, specs(TEXT_SHAPES))
