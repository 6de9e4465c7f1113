"""push: publish a verified cell at path_in_repo = cell id, one commit per cell.

A target is a Hub repo (`hub:owner/name`, via `HfApi.upload_folder`) or a local folder (`dir:/path`)
with the same layout, so `from_pretrained(root, subfolder=cell_id)` loads either. Each published
folder carries `bakery.json` (recipe hash, resolved inputs, file hashes); a target that already
holds the same recipe hash and inputs at that path is not pushed again. Hub calls failing with 412
(concurrent commit), 429 (rate limit) or 5xx are retried with exponential backoff and full jitter.

The token is whatever huggingface_hub finds in HF_TOKEN or its token file; it is never passed,
logged or written by us.
"""

from __future__ import annotations

import importlib
import json
import logging
import random
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Protocol

from .. import fsutil
from ..errors import PushError
from ..matrix import Cell, PushTarget
from ..templating import render

log = logging.getLogger(__name__)

RECORD_FILE = "bakery.json"
RETRY_STATUSES = frozenset({408, 412, 429, 500, 502, 503, 504})
MAX_TRIES = 6
BACKOFF_BASE_S = 2.0
BACKOFF_CAP_S = 120.0


class Target(Protocol):
    def published_record(self, path_in_repo: str) -> dict[str, Any] | None: ...

    def publish(self, folder: Path, path_in_repo: str, message: str) -> str: ...


class DirTarget:
    """A local folder laid out like the Hub repo: <root>/<cell id>/..."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def published_record(self, path_in_repo: str) -> dict[str, Any] | None:
        return _read_record(self.root / path_in_repo / RECORD_FILE)

    def publish(self, folder: Path, path_in_repo: str, message: str) -> str:
        with fsutil.locked(self.root / ".bakery-push.lock"):
            with fsutil.staging_dir(self.root / path_in_repo) as tmp:
                for item in folder.iterdir():
                    shutil.copy2(item, tmp / item.name)
        return str(self.root / path_in_repo)


class HubTarget:
    """A Hub model repo. `api` is an `HfApi`; tests pass a documented stand-in (tests/fakes.py)."""

    def __init__(self, repo_id: str, private: bool = False, api: Any = None,
                 sleep: Callable[[float], None] = time.sleep):
        if api is None:
            from huggingface_hub import HfApi

            api = HfApi()
        self.repo_id, self.private, self.api, self.sleep = repo_id, private, api, sleep

    def published_record(self, path_in_repo: str) -> dict[str, Any] | None:
        """The `bakery.json` published at `path_in_repo`, or None (absent, no repo, unreadable)."""
        from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

        def download() -> str | None:
            try:
                return self.api.hf_hub_download(self.repo_id, f"{path_in_repo}/{RECORD_FILE}")
            except (EntryNotFoundError, RepositoryNotFoundError):
                return None

        local = self._retry(download, "read the published record")
        return None if local is None else _read_record(Path(local))

    def publish(self, folder: Path, path_in_repo: str, message: str) -> str:
        self._retry(lambda: self.api.create_repo(self.repo_id, private=self.private,
                                                 exist_ok=True), "create the repo")
        # delete_patterns="*": the cell's folder ends up holding exactly this upload, so a
        # re-push with fewer or renamed shards leaves none of the old ones behind.
        commit = self._retry(lambda: self.api.upload_folder(
            folder_path=str(folder), repo_id=self.repo_id, path_in_repo=path_in_repo,
            commit_message=message, delete_patterns="*"), "upload")
        return str(getattr(commit, "commit_url", commit))

    def _retry(self, call: Callable[[], Any], what: str) -> Any:
        from huggingface_hub.errors import HfHubHTTPError

        for attempt in range(1, MAX_TRIES + 1):
            try:
                return call()
            except (HfHubHTTPError, *_transport_errors()) as e:
                if isinstance(e, HfHubHTTPError):
                    status = getattr(e.response, "status_code", None)
                    retryable, why = status in RETRY_STATUSES, f"HTTP {status}"
                else:  # a reset or timeout, e.g. through the compute nodes' proxy
                    retryable, why = True, type(e).__name__
                if not retryable or attempt == MAX_TRIES:
                    raise PushError(f"{self.repo_id}: could not {what}: {why}: {e}") from None
                delay = random.uniform(0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** attempt))
                log.warning("%s: %s got %s (try %d/%d); retrying in %.1f s",
                            self.repo_id, what, why, attempt, MAX_TRIES, delay)
                self.sleep(delay)


def _transport_errors() -> tuple[type[Exception], ...]:
    """Connection-level failures of the HTTP client huggingface_hub uses (httpx2 from 2.x,
    httpx in 1.x)."""
    errors = []
    for module in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(module).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def _read_record(record: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(record.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def make_target(push: PushTarget, api: Any = None) -> Target:
    if push.kind == "dir":
        return DirTarget(Path(push.location))
    return HubTarget(push.location, private=push.private, api=api)


def render_card(cell: Cell, recipe: str, record: dict[str, Any]) -> str:
    """The model card (README.md) of a published cell: metadata, how to load, recipe, provenance."""
    def resolved(identity: dict[str, Any]) -> str:
        return f"commit {identity['commit']}" if identity.get("commit") else (
            f"sha256 {identity['sha256'][:16]}")

    inputs = [("base", cell.base.describe(), resolved(record["inputs"]["base"]))] + [
        (f"adapter {name}", source.describe(), resolved(record["inputs"]["adapters"][name]))
        for name, source in cell.adapters]
    return render("model_card.md.j2", cell=cell, recipe=recipe,
                  base_models=[cell.base.repo] if cell.base.repo else [],
                  repo=cell.push.location, adapter_names=[name for name, _ in cell.adapters],
                  inputs=inputs, output_sha256=record["output"]["content_sha256"],
                  device=record["device"], fallback_reason=record["fallback_reason"],
                  versions=record["versions"])


def build_publish_folder(final: Path, out: Path, card: str, recipe: str,
                         record: dict[str, Any]) -> None:
    """`out` = the verified checkpoint (hardlinked) + README.md + mergekit_config.yml + bakery.json."""
    with fsutil.staging_dir(out) as tmp:
        for item in final.iterdir():
            fsutil.link_or_copy(item, tmp / item.name)
        (tmp / "README.md").write_text(card)
        (tmp / "mergekit_config.yml").write_text(recipe)
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
