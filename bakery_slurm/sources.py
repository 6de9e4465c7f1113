"""Make a `ModelSource` a local folder, and say exactly which content it is.

A Hub source is downloaded with `snapshot_download` (token from the environment or the Hub's token
file, handled by huggingface_hub; we never see or store it) and identified by the commit it resolved
to. A local source is identified by the sha256 of its files, so a retrained adapter at the same path
gets a new identity (mergekit's own LoRA cache keys by folder name only; facts.md).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import BakeryError
from .manifest import content_hash, manifest
from .matrix import ModelSource

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalModel:
    """A model folder on disk and the identity of its content (used in cache keys and cards)."""

    path: Path
    identity: dict[str, Any]


def fetch(source: ModelSource) -> LocalModel:
    """Download (Hub) or locate (local path) `source`; raise BakeryError if it is not there."""
    if source.repo is not None:
        return _fetch_hub(source)
    path = Path(source.path) / (source.subfolder or "")
    if not path.is_dir():
        raise BakeryError(f"model folder {path} does not exist (from {source.describe()})")
    files = manifest(path)
    return LocalModel(path=path, identity={"path": str(path), "sha256": content_hash(files)})


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
