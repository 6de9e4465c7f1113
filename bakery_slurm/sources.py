"""Make a `ModelSource` a local folder, and say exactly which content it is.

A Hub source is downloaded with `snapshot_download` (token from the environment or the Hub's token
file, handled by huggingface_hub; we never see or store it) and identified by the commit it resolved
to. A local source is identified by the sha256 of its files, so a retrained adapter at the same path
gets a new identity (mergekit's own LoRA cache keys a bake by folder names only, and would reuse it).

Only the files a cell reads are downloaded (`WANTED`): weights as safetensors, configs, tokenizer
files, the card; never `.bin`/`.pth` copies of the weights, optimizer states or `checkpoint-*`
folders, which adapter repos often hold and which can be larger than the model.

Hashing a 12B base reads ~24 GB (~1 GiB/s, benchmarks/bench_sources.py) in every cell of that
base. With a `hash_cache` folder each file's hash is kept beside its stat signature and reused
while the file is untouched, as git's index does.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from . import fsutil
from .errors import BakeryError
from .manifest import content_hash, scan
from .matrix import ModelSource

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalModel:
    """A model folder on disk and the identity of its content (used in cache keys and cards)."""

    path: Path
    identity: dict[str, Any]


# README.md: the base's card, whose license and language the published cards carry.
WANTED = ("*.safetensors", "*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken", "README.md")
UNWANTED = ("*.bin", "*.pth", "*.pt", "*.ckpt", "*optimizer*", "*checkpoint-*", "*.msgpack", "*.h5")


def hub_patterns(subfolder: str | None) -> tuple[list[str], list[str]]:
    """(allow_patterns, ignore_patterns) for `snapshot_download` of one source: its own folder's
    files, not its subfolders' (fnmatch's `*` crosses `/`: a base at the root of a repo that also
    holds adapters, or an `original/` copy of the weights, would be downloaded whole)."""
    prefix = f"{subfolder}/" if subfolder else ""
    # The repo's card (the Hub reads metadata only from the root README.md), for the license.
    card = ["README.md"] if subfolder else []
    return [prefix + p for p in WANTED] + card, [prefix + p for p in UNWANTED] + [prefix + "*/*"]


def fetch(source: ModelSource, hash_cache: Path | None = None, offline: bool = False,
          cache_dir: Path | None = None) -> LocalModel:
    """Download (Hub) or locate (local path) `source`; raise BakeryError if it is not there.

    `hash_cache` is a folder where a local source's file hashes are kept between runs. With
    `offline`, a Hub source is read from the Hub cache only (`cache_dir`, default HF_HOME's) and
    a file missing there fails at once, naming it.
    """
    if source.repo is not None:
        return _fetch_hub(source, offline, cache_dir)
    path = _local_folder(source)
    if not path.is_dir():
        raise BakeryError(f"model folder {path} does not exist (from {source.describe()})")
    files = _hash_local(path, hash_cache) if hash_cache else scan(path)
    changed = [name for name, info in files.items() if info["signature"] is None]
    if changed:
        # Its hash is of bytes the file never held at once, and the bake would read others.
        raise BakeryError(f"{path / changed[0]} changed while it was hashed (still being "
                          f"written?): run the cell again once it is complete "
                          f"(from {source.describe()})")
    return LocalModel(path=path, identity={"path": str(path), "sha256": content_hash(files)})


def _local_folder(source: ModelSource) -> Path:
    return Path(source.path) / (source.subfolder or "")


def identifies(identity: Mapping[str, Any], source: ModelSource) -> bool:
    """Is `identity` (a `fetch` result's) that of `source` as the matrix names it: the same repo,
    subfolder and revision (and the pinned commit, when `source` has one), or the same local
    folder? A local folder's content is not compared (a cell's recipe names its sources, not
    their content, either): an eval task compares it when it runs."""
    if source.repo is not None:
        named = (identity.get("repo"), identity.get("subfolder"), identity.get("revision"))
        return (named == (source.repo, source.subfolder, source.revision)
                and source.commit in (None, identity.get("commit")))
    return identity.get("path") == str(_local_folder(source))


# A file time this far past the record's cannot be a rewrite in the record's timestamp tick (a
# rewrite stamps "now"): a future mtime (rsync -a, tar x from a fast clock) is not racy forever.
RACY_WINDOW_NS = 300 * 10**9


def _hash_local(path: Path, hash_cache: Path) -> dict[str, dict[str, Any]]:
    """`scan(path)`, reading only files changed since the hashes kept in `hash_cache`."""
    record = Path(hash_cache) / (hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32] + ".json")
    try:
        written = record.stat().st_mtime_ns
        known = json.loads(record.read_text())["files"]
        # "Racy" entries, as git's index has them: a file whose mtime or ctime is not older than
        # the record may have changed after it was hashed, within one timestamp tick (a whole
        # second on Lustre), keeping its signature. Hash it again.
        known = {name: info for name, info in known.items()
                 if info.get("signature") and not (
                     written <= max(info["signature"][1:3]) < written + RACY_WINDOW_NS)}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError):
        known = {}  # none yet, or unreadable: hash everything and write it anew
    files = scan(path, known)
    if files != known:
        with fsutil.locked(record.with_suffix(".lock")):
            fsutil.atomic_write_json(record, {"path": str(path.resolve()), "files": files})
    return files


def _fetch_hub(source: ModelSource, offline: bool, cache_dir: Path | None) -> LocalModel:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    allow, ignore = hub_patterns(source.subfolder)
    log.info("%s %s", "reading cached" if offline else "downloading", source.describe())
    try:
        snapshot = Path(snapshot_download(source.repo, revision=source.commit or source.revision,
                                          allow_patterns=allow, ignore_patterns=ignore,
                                          local_files_only=offline, cache_dir=cache_dir))
    except LocalEntryNotFoundError as e:
        if offline:
            raise BakeryError(f"{source.describe()} is not in the Hub cache and the runtime is "
                              f"offline: run `bakery-slurm prefetch` on the login node ({e})") from None
        raise BakeryError(f"cannot download {source.describe()}: {e}") from None
    except (HfHubHTTPError, OSError) as e:
        raise BakeryError(f"cannot download {source.describe()}: {e}") from None
    share_cache_entry(snapshot)
    path = snapshot / (source.subfolder or "")
    if not path.is_dir():
        raise BakeryError(f"{source.describe()}: no folder {source.subfolder!r} in the repo")
    if offline:
        missing = missing_files(path)
        if missing:
            raise BakeryError(f"{source.describe()}: {path / missing[0]} is not in the Hub cache "
                              f"and the runtime is offline ({len(missing)} file(s) missing): run "
                              f"`bakery-slurm prefetch` on the login node")
    # snapshot_download returns .../snapshots/<commit sha>: the exact revision we got.
    return LocalModel(path=path, identity={"repo": source.repo, "subfolder": source.subfolder,
                                           "revision": source.revision, "commit": snapshot.name})


def share_cache_entry(snapshot: Path) -> None:
    """Give what this user wrote into the Hub cache for `snapshot`'s repo (its entry
    `<cache>/models--<owner>--<name>`, the entry's lock folder, the cache's own folders) the
    access a group's setgid cache folder gives (`fsutil.share_tree`). huggingface_hub writes the
    entry's tree listing 0600 whatever the umask, and everything else under the umask: a
    teammate sharing the cache could not read what this download put there (offline, their
    task would fail), nor lock the entry to download into it."""
    entry = snapshot.parents[1]
    cache = entry.parent
    # A cache mounted read-only (a task's bind) is read as it is: nothing was written there.
    with contextlib.suppress(OSError):
        for path in (cache, cache / ".locks", cache / "CACHEDIR.TAG"):
            if path.exists():
                fsutil.share(path)
        for tree in (entry, cache / ".locks" / entry.name):
            if tree.is_dir():
                fsutil.share_tree(tree)


def missing_files(folder: Path) -> list[str]:
    """Files a model or adapter folder names but lacks: the shards its safetensors index lists,
    else its single weights file. A cached snapshot can be partial (an interrupted download, a
    prefetch of other files): offline, that must fail here, not deep inside a load. A snapshot's
    files are links into the cache's blobs/: one whose blob is gone (a purge by age) is missing."""
    names = {p.name for p in folder.iterdir() if p.exists()}
    if "adapter_config.json" in names:
        wanted = {"adapter_model.safetensors"}
    elif "config.json" in names:
        index = folder / "model.safetensors.index.json"
        try:
            wanted = set(json.loads(index.read_text())["weight_map"].values())
        except FileNotFoundError:
            wanted = {"model.safetensors"}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return [index.name]
    else:
        return ["config.json or adapter_config.json"]
    return sorted(wanted - names)
