"""verify's transformers load in a child process (`stages.verify.ModelLoader`): what it loads,
what it reports, and that it ends whether or not it was asked to load anything."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from safetensors.torch import load_file, save_file

from bakery_slurm.errors import BakeryError
from bakery_slurm.stages.verify import ModelLoader, load_report

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def loaded_in_child(tiny_models, tmp_path_factory):
    """The child's answers for the tiny text base as it is and with one tensor removed."""
    base = tiny_models / "bases" / "text"
    short = tmp_path_factory.mktemp("short") / "text"
    shutil.copytree(base, short)
    tensors = load_file(str(short / "model.safetensors"))
    tensors.pop("model.norm.weight")
    save_file(tensors, str(short / "model.safetensors"), metadata={"format": "pt"})
    answers = {"short folder": short}
    for case, folder in (("intact", base), ("short", short)):
        loader = ModelLoader(child=True)
        answers[case] = loader.load(folder, "bfloat16")
        assert loader.process.returncode == 0
    return answers


def test_the_child_loads_the_checkpoint_as_the_process_itself_would(tiny_models, loaded_in_child):
    here = load_report(tiny_models / "bases" / "text", "bfloat16")
    assert loaded_in_child["intact"] == here == {"model_class": "Gemma3ForCausalLM", "problems": {}}


def test_the_child_reports_what_transformers_found_missing(loaded_in_child):
    assert loaded_in_child["short"]["problems"] == {"missing_keys": ["model.norm.weight"]}
    assert load_report(loaded_in_child["short folder"], "bfloat16") == loaded_in_child["short"]


def test_a_checkpoint_transformers_cannot_load_is_an_error_naming_it(tiny_models, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(tiny_models / "bases" / "text", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "hidden_size": 48}))
    loader = ModelLoader(child=True)
    with pytest.raises(BakeryError, match=f"{folder}: transformers cannot load it: .*size"):
        loader.load(folder, "bfloat16")


def test_a_loader_never_asked_to_load_ends_when_closed():
    loader = ModelLoader(child=True)
    loader.close()
    assert loader.process.returncode is not None
    loader.close()  # twice is harmless


def test_without_a_child_the_load_runs_here(tiny_models, monkeypatch):
    def no_process(*args, **kwargs):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(subprocess, "Popen", no_process)
    loader = ModelLoader(child=True)
    assert loader.process is None
    assert loader.load(tiny_models / "bases" / "text", "bfloat16")["model_class"] == "Gemma3ForCausalLM"
    loader.close()
