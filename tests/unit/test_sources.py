"""Local sources: identity by content, with file hashes reused while the files are untouched."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from fakes import FakeHubApi

from bakery_slurm import manifest, sources
from bakery_slurm.errors import BakeryError
from bakery_slurm.matrix import ModelSource
from bakery_slurm.sources import fetch, hub_patterns
from bakery_slurm.stages.push import base_card


def local(folder) -> ModelSource:
    return ModelSource(repo=None, path=str(folder), subfolder=None, revision=None)


@pytest.fixture
def reads(monkeypatch) -> list[str]:
    """The names of the files `sha256_file` reads (the real function, watched)."""
    seen: list[str] = []
    real = manifest.sha256_file

    def watched(path):
        seen.append(os.path.basename(path))
        return real(path)

    monkeypatch.setattr(manifest, "sha256_file", watched)
    return seen


@pytest.fixture
def model(tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(b"weights " * 1000)
    (folder / "adapter_config.json").write_text('{"r": 8}')
    return folder


def test_unchanged_files_are_not_read_again(model, tmp_path, reads):
    cache = tmp_path / "hashes"
    first = fetch(local(model), hash_cache=cache)
    assert sorted(reads) == ["adapter_config.json", "adapter_model.safetensors"]
    reads.clear()
    [record] = cache.glob("*.json")
    written = record.stat().st_mtime_ns, record.stat().st_ino
    again = fetch(local(model), hash_cache=cache)
    assert reads == []
    assert (record.stat().st_mtime_ns, record.stat().st_ino) == written  # nothing to write
    assert again.identity == first.identity == fetch(local(model)).identity


def test_a_file_rewritten_in_place_with_its_old_size_and_mtime_is_read_again(model, tmp_path, reads):
    cache = tmp_path / "hashes"
    first = fetch(local(model), hash_cache=cache)
    weights = model / "adapter_model.safetensors"
    st = weights.stat()
    weights.write_bytes(b"retrain " * 1000)  # same size
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime; ctime moves regardless
    reads.clear()
    second = fetch(local(model), hash_cache=cache)
    assert reads == ["adapter_model.safetensors"]
    assert second.identity["sha256"] != first.identity["sha256"]


def test_an_unreadable_cache_record_means_hashing_everything(model, tmp_path, reads):
    cache = tmp_path / "hashes"
    fetch(local(model), hash_cache=cache)
    [record] = cache.glob("*.json")
    record.write_text("{ truncated")
    reads.clear()
    fetch(local(model), hash_cache=cache)
    assert len(reads) == 2
    assert set(json.loads(record.read_text())["files"]) == {"adapter_config.json",
                                                           "adapter_model.safetensors"}


def test_another_node_of_a_network_filesystem_reuses_the_hashes(model, tmp_path, reads, monkeypatch):
    # Each NFS/Lustre client numbers the mount's device differently; inode, size and times agree.
    cache = tmp_path / "hashes"
    fetch(local(model), hash_cache=cache)
    reads.clear()
    real_stat = os.stat_result

    class OtherNode(type(model)):
        def stat(self, *args, **kwargs):
            st = super().stat(*args, **kwargs)
            fields = list(st)
            fields[2] = st.st_dev + 1  # st_dev
            return real_stat(fields, {"st_mtime_ns": st.st_mtime_ns, "st_ctime_ns": st.st_ctime_ns})

    monkeypatch.setattr(manifest, "Path", OtherNode)
    assert OtherNode(model).stat().st_dev != model.stat().st_dev
    fetch(local(model), hash_cache=cache)
    assert reads == []


def test_a_file_not_older_than_the_hash_record_is_read_again(model, tmp_path, reads, monkeypatch):
    """On a filesystem with coarse timestamps (whole seconds on Lustre), a file rewritten in place
    with its old size in the tick in which it was hashed keeps its signature: as git's index does
    with such "racy" entries, a file whose mtime or ctime is not older than the record is read
    again. Here every timestamp is one tick."""
    real_stat = os.stat_result

    class OneTick(type(model)):
        def stat(self, *args, **kwargs):
            st = super().stat(*args, **kwargs)
            return real_stat(list(st), {"st_mtime_ns": 10**18, "st_ctime_ns": 10**18})

    monkeypatch.setattr(manifest, "Path", OneTick)
    monkeypatch.setattr(sources, "Path", OneTick)  # the hash record is on such a filesystem too
    cache = tmp_path / "hashes"
    first = fetch(local(model), hash_cache=cache)
    with open(model / "adapter_model.safetensors", "r+b") as f:  # the trainer's final save
        f.write(b"epoch 2 " * 1000)
    reads.clear()
    second = fetch(local(model), hash_cache=cache)
    assert sorted(reads) == ["adapter_config.json", "adapter_model.safetensors"]
    assert second.identity != first.identity


def test_a_file_from_the_future_is_not_read_again_on_every_fetch(model, tmp_path, reads):
    """An mtime far past the record's (copied with `rsync -a` from a host whose clock runs fast)
    cannot be a rewrite in the record's tick: trusted, not hashed again until that date."""
    weights = model / "adapter_model.safetensors"
    future = weights.stat().st_mtime + 3600
    os.utime(weights, (future, future))
    cache = tmp_path / "hashes"
    fetch(local(model), hash_cache=cache)
    reads.clear()
    fetch(local(model), hash_cache=cache)
    fetch(local(model), hash_cache=cache)
    assert reads == []


def test_a_hub_bases_card_is_fetched_for_its_license_and_language(tmp_path):
    """The published cards take `license` and `language` from the base's README.md: prefetch's
    download (the fake applies huggingface_hub's own pattern filter) and a task's offline fetch
    both keep it."""
    api = FakeHubApi(download_dir=tmp_path / "downloads")
    api.seed("org/base", {"README.md": b"---\nlicense: gemma\nlanguage:\n- no\n- en\n---\n# base\n",
                          "config.json": b"{}", "model.safetensors": b"\0" * 8})
    cache = tmp_path / "hf-home" / "hub"
    allow, ignore = hub_patterns(None)
    api.snapshot_download("org/base", revision=None, cache_dir=cache, allow_patterns=allow,
                          ignore_patterns=ignore)
    base = fetch(ModelSource(repo="org/base", path=None, subfolder=None, revision=None),
                 offline=True, cache_dir=cache)
    assert base_card(base.path) == {"license": "gemma", "language": ["no", "en"]}


@pytest.mark.parametrize("subfolder", [None, "4b"])
def test_a_hub_source_fetches_its_own_folder_not_its_subfolders(subfolder):
    from huggingface_hub.utils import filter_repo_objects

    at = f"{subfolder}/" if subfolder else ""
    files = [f"{at}config.json", f"{at}model.safetensors", f"{at}tokenizer.json",
             f"{at}1b-std/eng/adapter_model.safetensors", f"{at}original/consolidated.safetensors",
             f"{at}checkpoint-100/model.safetensors", f"{at}optimizer.pt", "README.md"]
    allow, ignore = hub_patterns(subfolder)
    assert sorted(filter_repo_objects(files, allow_patterns=allow, ignore_patterns=ignore)) == \
        sorted([f"{at}config.json", f"{at}model.safetensors", f"{at}tokenizer.json", "README.md"])


def test_an_offline_fetch_names_a_cached_file_whose_blob_is_gone(tmp_path):
    """A snapshot's file is a link into blobs/: with the blob purged, the file is missing."""
    api = FakeHubApi(download_dir=tmp_path / "downloads")
    api.seed("org/base", {"config.json": b"{}", "model.safetensors": b"\0" * 8})
    cache = tmp_path / "hf-home" / "hub"
    allow, ignore = hub_patterns(None)
    snapshot = Path(api.snapshot_download("org/base", revision=None, cache_dir=cache,
                                          allow_patterns=allow, ignore_patterns=ignore))
    (snapshot / "model.safetensors").unlink()
    (snapshot / "model.safetensors").symlink_to("../../blobs/purged")
    with pytest.raises(BakeryError, match=f"{snapshot / 'model.safetensors'} is not in the Hub "
                                          "cache and the runtime is offline"):
        fetch(ModelSource(repo="org/base", path=None, subfolder=None, revision=None),
              offline=True, cache_dir=cache)


@pytest.mark.parametrize("with_cache", [True, False])
def test_a_local_source_written_while_it_is_hashed_is_refused_naming_the_file(
        model, tmp_path, monkeypatch, with_cache):
    """A trainer still saving the adapter: the hash would be of bytes that never were the file
    (and the bake would read others). The cell must fail naming it, not bake under that identity."""
    real = manifest.sha256_file
    weights = model / "adapter_model.safetensors"

    def hashed_while_written(path):
        digest = real(path)
        if path == weights:
            with open(weights, "ab") as f:
                f.write(b"the rest of the epoch")
        return digest

    monkeypatch.setattr(manifest, "sha256_file", hashed_while_written)
    with pytest.raises(BakeryError, match=f"{weights} changed while it was hashed"):
        fetch(local(model), hash_cache=tmp_path / "hashes" if with_cache else None)
