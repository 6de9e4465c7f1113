"""Make a `ModelSource` a local folder, and say exactly which content it is.

A Hub source is downloaded with `snapshot_download` (token from the environment or the Hub's token
file, handled by huggingface_hub; we never see or store it) and identified by the commit it resolved
to. A local source is identified by the sha256 of its files, so a retrained adapter at the same path
gets a new identity (mergekit's own LoRA cache keys by folder name only, and so serves a stale bake).

Hashing a 12B base reads ~24 GB (~1 GiB/s, benchmarks/bench_sources.py) in every cell of that
base. With a `hash_cache` folder each file's hash is kept beside its stat signature and reused
while the file is untouched, as git's index does.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import fsutil
from .errors import BakeryError
from .manifest import content_hash, manifest, scan, without_signatures
from .matrix import ModelSource

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalModel:
    """A model folder on disk and the identity of its content (used in cache keys and cards)."""

    path: Path
    identity: dict[str, Any]


def fetch(source: ModelSource, hash_cache: Path | None = None) -> LocalModel:
    """Download (Hub) or locate (local path) `source`; raise BakeryError if it is not there.

    `hash_cache` is a folder where a local source's file hashes are kept between runs.
    """
    if source.repo is not None:
        return _fetch_hub(source)
    path = Path(source.path) / (source.subfolder or "")
    if not path.is_dir():
        raise BakeryError(f"model folder {path} does not exist (from {source.describe()})")
    files = _hash_local(path, hash_cache) if hash_cache else manifest(path)
    return LocalModel(path=path, identity={"path": str(path), "sha256": content_hash(files)})


def _hash_local(path: Path, hash_cache: Path) -> dict[str, dict[str, Any]]:
    """`manifest(path)`, reading only files changed since the hashes kept in `hash_cache`."""
    record = Path(hash_cache) / (hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32] + ".json")
    try:
        known = json.loads(record.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        known = {}  # none yet, or unreadable: hash everything and write it anew
    files = scan(path, known)
    if files != known:
        with fsutil.locked(record.with_suffix(".lock")):
            fsutil.atomic_write_json(record, {"path": str(path.resolve()), "files": files})
    return without_signatures(files)


def _fetch_hub(source: ModelSource) -> LocalModel:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = [f"{source.subfolder}/*"] if source.subfolder else None
    log.info("downloading %s", source.describe())
    try:
        snapshot = Path(snapshot_download(source.repo, revision=source.revision,
                                          allow_patterns=patterns))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as e:
        raise BakeryError(f"cannot download {source.describe()}: {e}") from None
    path = snapshot / (source.subfolder or "")
    if not path.is_dir():
        raise BakeryError(f"{source.describe()}: no folder {source.subfolder!r} in the repo")
    # snapshot_download returns .../snapshots/<commit sha>: the exact revision we got.
    return LocalModel(path=path, identity={"repo": source.repo, "subfolder": source.subfolder,
                                           "revision": source.revision, "commit": snapshot.name})
