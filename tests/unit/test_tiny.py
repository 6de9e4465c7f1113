"""The tiny offline models: deterministic, loadable, with adapters that actually change weights."""

from __future__ import annotations

import json

import pytest

from bakery_slurm import tiny


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    return tiny.build_demo_models(tmp_path_factory.mktemp("demo"))


@pytest.mark.parametrize(
    "layout, expected",
    [
        ("hub", "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"),
        ("transformers", "vision_tower.encoder.layers.0.mlp.fc1.weight"),
        ("prefixed", "model.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"),
    ],
)
def test_multimodal_name_vision(layout, expected):
    assert tiny.multimodal_name("vision_tower.encoder.layers.0.mlp.fc1.weight", layout) == expected


def test_multimodal_name_text_and_projector():
    assert tiny.multimodal_name("language_model.model.norm.weight", "hub") == "language_model.model.norm.weight"
    assert tiny.multimodal_name("multi_modal_projector.mm_input_projection_weight", "prefixed") == (
        "model.multi_modal_projector.mm_input_projection_weight"
    )
    # Already in the hub layout: unchanged, not doubled.
    name = "vision_tower.vision_model.post_layernorm.weight"
    assert tiny.multimodal_name(name, "hub") == name


def test_multimodal_name_unknown_layout():
    with pytest.raises(ValueError, match="valid: hub, transformers, prefixed"):
        tiny.multimodal_name("x", "hug")


def test_tokenizer_is_deterministic(tmp_path):
    from transformers import PreTrainedTokenizerFast

    tiny.build_tokenizer(tmp_path / "a")
    tiny.build_tokenizer(tmp_path / "b")
    assert _files(tmp_path / "a") == _files(tmp_path / "b")

    tok = PreTrainedTokenizerFast.from_pretrained(str(tmp_path / "a"))
    assert len(tok) == tiny.VOCAB_SIZE
    assert tok.convert_tokens_to_ids(list(tiny.SPECIAL_TOKENS)) == list(range(len(tiny.SPECIAL_TOKENS)))
    ids = tok("Hei på deg").input_ids
    assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == "Hei på deg"
    chat = tok.apply_chat_template([{"role": "assistant", "content": "Hallo"}], tokenize=False)
    assert chat == "<bos><start_of_turn>model\nHallo<end_of_turn>\n"


@pytest.mark.e2e
def test_text_base_is_deterministic(tmp_path):
    tiny.build_text_base(tmp_path / "a", seed=0)
    tiny.build_text_base(tmp_path / "b", seed=0)
    tiny.build_text_base(tmp_path / "c", seed=1)
    a, b, c = (_files(tmp_path / x) for x in "abc")
    assert a == b
    assert a["model.safetensors"] != c["model.safetensors"]
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(a)


@pytest.mark.e2e
def test_adapters_are_nonzero_and_neutral(demo):
    from safetensors.torch import load_file

    for kind, n_modules in (("text", 14), ("multimodal", 20)):
        for lang in ("eng", "nob"):
            tensors = load_file(str(demo[kind][lang] / "adapter_model.safetensors"))
            lora_b = [t for name, t in tensors.items() if ".lora_B." in name]
            assert len(lora_b) == n_modules and len(tensors) == 2 * n_modules
            assert all(t.abs().min() > 0 for t in lora_b)
            config = json.loads((demo[kind][lang] / "adapter_config.json").read_text())
            assert config["r"] == 4 and config["lora_alpha"] == 8
            assert config["base_model_name_or_path"].startswith("tiny-gemma3-")
    eng = load_file(str(demo["text"]["eng"] / "adapter_model.safetensors"))
    nob = load_file(str(demo["text"]["nob"] / "adapter_model.safetensors"))
    assert any(not eng[k].equal(nob[k]) for k in eng)


@pytest.mark.e2e
def test_multimodal_base_loads_in_hub_layout(demo):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, Gemma3ForConditionalGeneration

    base = demo["multimodal"]["base"]
    with safe_open(str(base / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert len(names) == 51
    assert {name.split(".")[0] for name in names} == {"language_model", "vision_tower", "multi_modal_projector"}
    assert all(n.startswith("vision_tower.vision_model.") for n in names if n.startswith("vision_tower."))
    for cls in (Gemma3ForConditionalGeneration, AutoModelForCausalLM):
        model, info = cls.from_pretrained(str(base), dtype=torch.bfloat16, output_loading_info=True)
        assert type(model).__name__ == "Gemma3ForConditionalGeneration"
        assert not any(info.values()), info


@pytest.mark.e2e
def test_build_demo_models_skips_complete_folders(demo):
    root = demo["text"]["base"].parent.parent
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*.safetensors")}
    (demo["text"]["nob"] / "adapter_model.safetensors").unlink()  # as if half-built by hand
    again = tiny.build_demo_models(root)
    assert again == demo
    after = {p: p.stat().st_mtime_ns for p in root.rglob("*.safetensors")}
    rebuilt = {p for p in after if before.get(p) != after[p]}
    assert rebuilt == {demo["text"]["nob"] / "adapter_model.safetensors"}
