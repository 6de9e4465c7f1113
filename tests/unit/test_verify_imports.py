"""verify's model code is imported on a thread that only imports: what it imports is what verify
loads the model with, and an import that fails there is left for verify to report."""

from __future__ import annotations

import json
import threading

from bakery_slurm.stages import verify


def test_the_thread_imports_the_class_the_config_names(tmp_path, monkeypatch):
    import transformers

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Gemma3ForCausalLM"]}))
    real, resolved = verify.model_class, []
    monkeypatch.setattr(verify, "model_class", lambda folder: resolved.append(real(folder)))
    verify.import_model_code(tmp_path).join()
    assert resolved == [transformers.Gemma3ForCausalLM]


def test_a_failed_import_is_left_for_verify(tmp_path, monkeypatch):
    def broken(folder):
        raise ImportError(f"no model code for {folder}")

    unhandled = []
    monkeypatch.setattr(verify, "model_class", broken)
    monkeypatch.setattr(threading, "excepthook", unhandled.append)
    verify.import_model_code(tmp_path).join()
    assert unhandled == []
