"""File hashing: the sha256 of every size around the chunk the files are read in."""

from __future__ import annotations

import hashlib
import os

import pytest

from bakery_slurm import manifest


@pytest.mark.parametrize("size", [0, 1, 999, 1000, 1001, 2003])
def test_a_file_hashes_to_its_sha256_in_chunks(tmp_path, monkeypatch, size):
    monkeypatch.setattr(manifest, "HASH_CHUNK", 1000)
    path = tmp_path / "weights.safetensors"
    path.write_bytes(os.urandom(size))
    assert manifest.sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()
