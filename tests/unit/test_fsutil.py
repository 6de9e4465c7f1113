"""Atomic writes, staging folders and locks."""

import os
import stat

import pytest

from bakery_slurm import fsutil


def test_a_staged_folder_appears_complete_with_the_usual_modes(tmp_path):
    umask = os.umask(0o022)
    try:
        final = tmp_path / "out"
        with fsutil.staging_dir(final) as tmp:
            (tmp / "sub").mkdir()
            weights = tmp / "sub" / "model.safetensors"
            weights.write_bytes(b"x")
            os.chmod(weights, 0o600)  # as safetensors writes its files
            assert not final.exists()
        assert stat.S_IMODE(final.stat().st_mode) == 0o755
        assert stat.S_IMODE((final / "sub").stat().st_mode) == 0o755
        assert stat.S_IMODE((final / "sub" / "model.safetensors").stat().st_mode) == 0o644
    finally:
        os.umask(umask)


def test_a_failed_stage_leaves_nothing(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with fsutil.staging_dir(final) as tmp:
            (tmp / "half").write_bytes(b"x")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_replaces_whole_files_only(tmp_path):
    path = tmp_path / "ledger.json"
    fsutil.atomic_write_json(path, {"a": 1})
    fsutil.atomic_write_json(path, {"a": 2})
    assert path.read_text() == '{\n  "a": 2\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["ledger.json"]  # no temporary left behind
