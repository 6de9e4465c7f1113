"""The Hub token reaches the tasks through the environment only, or submit refuses early."""

from __future__ import annotations

import os

import pytest
from huggingface_hub import constants

from bakery_slurm.errors import ConfigError
from bakery_slurm.matrix import expand, load_matrix
from bakery_slurm.submission import export_hub_token
from conftest import MINIMAL_MATRIX


@pytest.fixture
def hub_cells(write_matrix):
    text = MINIMAL_MATRIX.replace('target = "dir:published"', 'target = "hub:owner/merges"')
    return expand(load_matrix(write_matrix(text)))


@pytest.fixture
def token_file(tmp_path, monkeypatch):
    path = tmp_path / "hf-home" / "token"
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(path))
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        # setenv first, so that teardown restores the variable's absence even after
        # export_hub_token sets it behind monkeypatch's back.
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    return path


def test_a_token_in_the_token_file_is_put_in_the_environment(hub_cells, token_file):
    token_file.parent.mkdir()
    token_file.write_text("hf_from_file")
    export_hub_token(hub_cells)
    assert os.environ["HF_TOKEN"] == "hf_from_file"


def test_no_token_at_all_is_refused_before_anything_runs(hub_cells, token_file):
    with pytest.raises(ConfigError, match="no Hub token was found: set HF_TOKEN"):
        export_hub_token(hub_cells)
    assert "HF_TOKEN" not in os.environ


def test_dir_targets_need_no_token(write_matrix, token_file):
    export_hub_token(expand(load_matrix(write_matrix(MINIMAL_MATRIX))))
    assert "HF_TOKEN" not in os.environ


def test_an_empty_hf_token_does_not_hide_the_token_files_token_from_the_tasks(hub_cells, token_file,
                                                                              monkeypatch):
    """`export HF_TOKEN=` on the login node: huggingface_hub skips the empty variable and finds
    the file's token, but the tasks inherit the variable, and their HF_HOME has no token file."""
    token_file.parent.mkdir()
    token_file.write_text("hf_from_file")
    monkeypatch.setenv("HF_TOKEN", "")
    export_hub_token(hub_cells)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(token_file.parent / "no-such-token"))
    from huggingface_hub import get_token

    assert get_token() == "hf_from_file"
