"""push: publish verified cells at path_in_repo = cell id, with the repo's root card.

A target is a Hub repo (`hub:owner/name`) or a local folder (`dir:/path`) with the same layout, so
`from_pretrained(root, subfolder=cell_id)` loads either. Each published folder carries
`bakery.json` (recipe hash, inputs as repo ids and commits, file hashes); a target that already
holds the same recipe hash and inputs at that path is not pushed again.

Every commit also rewrites the root README.md (`rootcard.py`) from the records published at the
commit it builds on. Several array tasks finish at once, so the Hub commit is optimistic: read
the head of main, render the card from the records at exactly that commit, and commit with
`parent_commit=head`; when another task committed first the Hub answers 412, and we read again.
A `dir:` target does the same under a lock. Reads are pinned to the head commit: `hf_hub_download`
of `main` falls back silently to the copy cached earlier on a connection error, which would make a
stale record or card look current; a file cached for a commit can only be that commit's.

Each read lists the files at the commit with their git blob ids (`list_repo_tree`, one request per
1,000 files) and downloads only the records and card whose blob id this target has not read yet.
A blob id names its content, so what is kept by blob id is exactly the file at that commit, and a
conflict costs the files committed meanwhile, not every cell's record again: 100 tasks re-reading
100 records per conflict would spend the account's requests (about 1,000 per 5 minutes, then 429)
and make each try slow, so that more tasks collide and the conflict cap runs out.

The files are uploaded (`preupload_lfs_files`) before the commit loop, so a conflict costs a
re-read, not a re-upload. A commit whose answer was lost (a reset or timeout after the Hub took it)
is retried, meets a moved main, and reads again: main then holds exactly what we meant to commit
(each file by its blob id, and the root card), so nothing is committed twice. Failed transfers
(huggingface_hub wraps a failed LFS/Xet transfer in a `RuntimeError`), 429, 5xx and connection
errors are retried with capped exponential backoff and full jitter; a 429's `Retry-After` is
honoured. A retried upload resumes: the Hub reports content it already holds, and only the rest is
transferred again. In a task, no wait may run into the task's time limit: the push gives up first,
with a PushError, so that the cell is left for `bakery-slurm push` rather than killed mid-push by
SLURM.

The token is whatever huggingface_hub finds in HF_TOKEN or its token file; it is never passed,
logged or written by us.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol

import yaml

from .. import fsutil
from ..errors import PushError
from ..matrix import Cell, PushTarget
from ..report import PARTIAL_LEGEND, model_index, partial_tasks, results_table, tasks_off_hub
from ..rootcard import TAGS, CardContext, card_metadata, front_matter, reference, render_root_card
from ..templating import render
from .merge import WEIGHT_SUFFIXES

if TYPE_CHECKING:
    from ..eval_results import EvalSource

log = logging.getLogger(__name__)

RECORD_FILE = "bakery.json"
ROOT_CARD = "README.md"
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
CONFLICT = 412  # the branch moved since the commit we built on: read again
MAX_TRIES = 6
MAX_CONFLICTS = 20  # N tasks committing at once need up to N - 1 re-reads each
BACKOFF_BASE_S = 2.0
BACKOFF_CAP_S = 120.0
# A longer Retry-After (the hourly commit limit) is not worth holding a GPU node for.
MAX_RETRY_AFTER_S = 600.0
# A task's push gives up this long before the task's time limit, leaving the time to record why
# (and the time the task spent before its run began: the container, imports, the cell's lock).
TIME_LIMIT_RESERVE_S = 300.0
# Far below create_commit's documented limits (25k LFS files, 1 GB of regular files).
MAX_OPERATIONS_PER_COMMIT = 1000
# The Hub keeps a larger file in LFS (git holds its pointer), whatever `.gitattributes` says.
MAX_REGULAR_FILE = 10 * 1024 * 1024
LFS_POINTER = "version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n"

# Renders the root card from every published record (cell id -> record) and the card it replaces.
RenderRoot = Callable[[dict[str, dict[str, Any]], "str | None"], str]


@dataclass(frozen=True)
class Publication:
    """One prepared cell: its publish folder (checkpoint, card, recipe, `bakery.json`)."""

    cell_id: str
    folder: Path
    record: dict[str, Any]
    # False: `folder` holds some files only (a refreshed card), put over the published ones,
    # which stay. True: the cell's published folder becomes exactly `folder`.
    replace: bool = True


class Target(Protocol):
    """Where cells are published (`DirTarget`, `HubTarget`).

    `published_records` maps every published cell id to its `bakery.json`; `root_card` is the
    current README.md; `publish` puts the cells' folders in place and rewrites README.md with
    `render_root(records after this commit, previous README)`, atomically with the cells, and
    returns where they went.
    """

    def published_records(self) -> dict[str, dict[str, Any]]: ...

    def published_record(self, path_in_repo: str) -> dict[str, Any] | None: ...

    def root_card(self) -> str | None: ...

    def publish(self, items: list[Publication], message: str, render_root: RenderRoot) -> str: ...


class _Conflict(Exception):
    """HTTP 412 on a commit with `parent_commit`: someone else committed first."""


class DirTarget:
    """A local folder laid out like the Hub repo: <root>/<cell id>/..., <root>/README.md."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def published_records(self) -> dict[str, dict[str, Any]]:
        records = {}
        for path in _record_files(self.root):
            cell_id = path.parent.relative_to(self.root).as_posix()
            if any(part.startswith(".") for part in cell_id.split("/")):
                continue  # a staging folder
            record = _read_record(path)
            if record is not None:
                records[cell_id] = record
        return records

    def published_record(self, path_in_repo: str) -> dict[str, Any] | None:
        return _read_record(self.root / path_in_repo / RECORD_FILE)

    def root_card(self) -> str | None:
        try:
            return (self.root / ROOT_CARD).read_text()
        except FileNotFoundError:
            # Only a missing card is no card: one this user may not read (a teammate's umask)
            # would be rewritten without its notes.
            return None

    def publish(self, items: list[Publication], message: str, render_root: RenderRoot) -> str:
        try:
            with fsutil.locked(self.root / ".bakery-push.lock"):
                # Every publish stages under this lock: a staging folder found now is a killed
                # publish's (a checkpoint's copy, where the target is on another filesystem).
                for leftover in [*self.root.glob(".*.partial"), *self.root.glob("*/.*.partial")]:
                    shutil.rmtree(leftover, ignore_errors=True)
                if any(not item.replace for item in items):  # a card refresh: read the records
                    _check_unchanged(str(self.root), items, self.published_records())
                for item in items:
                    if not item.replace:
                        for path in item.folder.iterdir():
                            fsutil.atomic_write_bytes(self.root / item.cell_id / path.name,
                                                      path.read_bytes())
                        continue
                    with fsutil.staging_dir(self.root / item.cell_id) as tmp:
                        for path in item.folder.iterdir():
                            _place(path, tmp / path.name)
                fsutil.atomic_write_text(self.root / ROOT_CARD,
                                         render_root(self.published_records(), self.root_card()))
        except OSError as e:
            raise PushError(f"{self.root}: could not publish: {e}") from None
        return str(self.root / items[0].cell_id) if len(items) == 1 else str(self.root)


def _place(src: Path, dst: Path) -> None:
    """Put one published file into a `dir:` target's staging folder.

    Weights are hard links to the verified checkpoint where one filesystem holds both: no second
    copy of a checkpoint (2 GB for a 1b cell, 24 GB for a 12b one), and bakery-slurm only ever
    replaces such files, never edits them; `gc` removing the work folder's name leaves the
    published one. Every other file (card, record, recipe, config, tokenizer) is a copy of its
    own, so a published card can be edited without touching the work folder.
    """
    if src.name.endswith(WEIGHT_SUFFIXES):
        fsutil.link_or_copy(src, dst)
    else:
        shutil.copy2(src, dst)


class HubTarget:
    """A Hub model repo. `api` is an `HfApi`; tests pass a documented stand-in (tests/fakes.py).

    `deadline` is the `clock()` time by which to have given up rather than wait any longer (a
    task's time limit, less `TIME_LIMIT_RESERVE_S`); None (the login node) sets none.
    """

    def __init__(self, repo_id: str, private: bool = False, api: Any = None,
                 sleep: Callable[[float], None] = time.sleep, deadline: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        if api is None:
            from huggingface_hub import HfApi

            api = HfApi()
        self.repo_id, self.private, self.api, self.sleep = repo_id, private, api, sleep
        self.deadline, self.clock = deadline, clock
        self._blobs: dict[str, bytes] = {}  # git blob id -> the content it names, as downloaded

    # -- reading, always at one commit ----------------------------------------------------------

    def head(self) -> tuple[str, dict[str, str]] | None:
        """(commit at the head of main, {path: git blob id} of its files), or None when the repo
        does not exist."""
        from huggingface_hub import RepoFile
        from huggingface_hub.errors import RepositoryNotFoundError

        def info() -> str | None:
            try:
                return self.api.repo_info(self.repo_id).sha
            except RepositoryNotFoundError:
                return None

        sha = self._retry(info, "read the head commit")
        if sha is None:
            return None
        # list_repo_tree fetches its pages as it is iterated: iterated inside the retried call, so
        # that a failed page is retried too
        files = self._retry(lambda: {
            entry.path: entry.blob_id
            for entry in self.api.list_repo_tree(self.repo_id, recursive=True, revision=sha)
            if isinstance(entry, RepoFile)}, "list the repo's files")
        return sha, files

    def read(self, sha: str, name: str, blob_id: str) -> bytes:
        """File `name` at commit `sha`, whose blob id there is `blob_id`: downloaded only the first
        time this target meets that blob id."""
        if blob_id not in self._blobs:
            local = self._retry(lambda: self.api.hf_hub_download(self.repo_id, name, revision=sha),
                                f"read {name}")
            self._blobs[blob_id] = Path(local).read_bytes()
        return self._blobs[blob_id]

    def records_at(self, sha: str, files: Mapping[str, str], cells: list[str] | None = None
                   ) -> dict[str, dict[str, Any]]:
        """The records published at commit `sha`, whose files are `files` (path -> blob id; only
        `cells`' records when given)."""
        suffix = f"/{RECORD_FILE}"
        records = {}
        for name, blob_id in files.items():
            cell_id = name[:-len(suffix)]
            if name.endswith(suffix) and (cells is None or cell_id in cells):
                record = _parse_record(self.read(sha, name, blob_id))
                if record is not None:
                    records[cell_id] = record
        return records

    def published_records(self) -> dict[str, dict[str, Any]]:
        state = self.head()
        return {} if state is None else self.records_at(*state)

    def published_record(self, path_in_repo: str) -> dict[str, Any] | None:
        state = self.head()
        return None if state is None else self.records_at(*state, [path_in_repo]).get(path_in_repo)

    def root_card(self) -> str | None:
        state = self.head()
        if state is None or ROOT_CARD not in state[1]:
            return None
        sha, files = state
        return self.read(sha, ROOT_CARD, files[ROOT_CARD]).decode()

    # -- publishing ---------------------------------------------------------------------------

    def publish(self, items: list[Publication], message: str, render_root: RenderRoot) -> str:
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete

        self._retry(lambda: self.api.create_repo(self.repo_id, private=self.private,
                                                 exist_ok=True), "create the repo")
        if self.private and self._retry(lambda: self.api.repo_info(self.repo_id).private,
                                        "read the repo's visibility") is False:
            raise PushError(public_repo_problem(self.repo_id))
        additions = [
            CommitOperationAdd(f"{item.cell_id}/{path.relative_to(item.folder).as_posix()}", str(path))
            for item in items for path in sorted(item.folder.rglob("*")) if path.is_file()]
        self._retry(lambda: self.api.preupload_lfs_files(self.repo_id, additions=additions),
                    "upload", transfer=True)
        uploaded = {op.path_in_repo for op in additions}
        # the checkpoint's files were hashed when verified: their LFS pointers cost no read
        hashed = {f"{item.cell_id}/{name}": info["sha256"]
                  for item in items for name, info in item.record["output"]["files"].items()}
        prefixes = tuple(f"{item.cell_id}/" for item in items if item.replace)
        for conflict in range(1, MAX_CONFLICTS + 1):
            state = self.head()
            if state is None:
                raise PushError(f"{self.repo_id}: the repo vanished while publishing")
            sha, files = state
            records = self.records_at(sha, files)
            _check_unchanged(self.repo_id, items, records)
            records.update({item.cell_id: item.record for item in items})
            previous = (self.read(sha, ROOT_CARD, files[ROOT_CARD]).decode()
                        if ROOT_CARD in files else None)
            card = render_root(records, previous)
            # The cells' folders end up holding exactly this upload: a re-push with fewer or
            # renamed shards leaves none of the old ones behind.
            stale = [CommitOperationDelete(name) for name in files
                     if name.startswith(prefixes) and name not in uploaded]
            if not stale and card == previous and _holds(files, additions, hashed):
                # Our earlier try landed though its answer was lost, or another push published
                # exactly this: a commit now would change nothing and spend the commit budget.
                log.info("%s: main holds these files already (commit %s): nothing to commit",
                         self.repo_id, sha)
                return f"{self.api.endpoint}/{self.repo_id}/commit/{sha}"
            try:
                operations = [*additions, CommitOperationAdd(ROOT_CARD, card.encode()), *stale]
                commit = self._retry(lambda: self.api.create_commit(
                    self.repo_id, operations, commit_message=message, parent_commit=sha),
                    "commit", transfer=True, conflicts=True)
            except _Conflict:
                delay = random.uniform(0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** conflict))
                self._give_up_if_past_deadline(
                    delay, f"could not commit: main moved {conflict} time(s) while committing")
                log.info("%s: main moved while committing (try %d/%d); reading again in %.1f s",
                         self.repo_id, conflict, MAX_CONFLICTS, delay)
                self.sleep(delay)
                continue
            return str(getattr(commit, "commit_url", commit))
        raise PushError(f"{self.repo_id}: could not commit: main kept moving "
                        f"({MAX_CONFLICTS} conflicting commits)")

    def _retry(self, call: Callable[[], Any], what: str, transfer: bool = False,
               conflicts: bool = False) -> Any:
        from huggingface_hub.errors import (
            HfHubHTTPError,
            LocalEntryNotFoundError,
            OfflineModeIsEnabled,
        )

        for attempt in range(1, MAX_TRIES + 1):
            wait = 0.0
            try:
                return call()
            except OfflineModeIsEnabled:
                raise PushError(f"{self.repo_id}: could not {what}: HF_HUB_OFFLINE is set here; "
                                "publish from a machine that reaches the Hub") from None
            except HfHubHTTPError as e:
                status = getattr(e.response, "status_code", None)
                if status == CONFLICT and conflicts:
                    raise _Conflict() from None
                retryable, why, error = status in RETRY_STATUSES, f"HTTP {status}", e
                wait = _retry_after(e.response) if status == 429 else None
                if wait is not None and wait > MAX_RETRY_AFTER_S:
                    raise PushError(f"{self.repo_id}: could not {what}: rate limited for "
                                    f"{wait:.0f} s (Retry-After); publish later with "
                                    "`bakery-slurm push`") from None
            except (*_transport_errors(), LocalEntryNotFoundError) as e:
                # a reset or timeout, e.g. through the compute nodes' proxy
                retryable, why, error = True, type(e).__name__, e
            except json.JSONDecodeError as e:
                # An answer that is not JSON: a proxy's or load balancer's HTML error page, where
                # create_commit reads validate-yaml's answer before looking at its status
                retryable, why, error = True, "an answer that is not JSON", e
            except ValueError as e:
                # huggingface_hub refusing what we sent, e.g. root card metadata the Hub's
                # validate-yaml rejects (a license it does not know): it would be refused again
                raise PushError(f"{self.repo_id}: could not {what}: "
                                f"{' '.join(str(e).split())}") from None
            except (RuntimeError, OSError) as e:
                if not transfer:
                    raise
                # huggingface_hub wraps a failed LFS/Xet transfer in RuntimeError; hf_xet raises
                # its own errors, of which a refused token (PermissionError) and a missing
                # file (FileNotFoundError) would fail again
                retryable = not isinstance(e, (PermissionError, FileNotFoundError))
                why, error = "transfer failed", e
            cause = f" ({error.__cause__})" if error.__cause__ else ""
            failure = f"could not {what}: {why}: {error}{cause}"
            if not retryable or attempt == MAX_TRIES:
                raise PushError(f"{self.repo_id}: {failure}") from None
            delay = max(wait or 0.0,
                        random.uniform(0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** attempt)))
            self._give_up_if_past_deadline(delay, failure)
            log.warning("%s: %s got %s (try %d/%d); retrying in %.1f s",
                        self.repo_id, what, why, attempt, MAX_TRIES, delay)
            self.sleep(delay)

    def _give_up_if_past_deadline(self, delay: float, failure: str) -> None:
        """Raise PushError (`failure` says what failed) where waiting `delay` s more would run past
        the deadline: SLURM kills a task at its time limit mid-push, with no record of why, and a
        cell left so is not one `bakery-slurm push` takes; a failed push is."""
        if self.deadline is not None and self.clock() + delay > self.deadline:
            raise PushError(f"{self.repo_id}: {failure}; waiting {delay:.0f} s more would run past "
                            "the task's time limit: publish later with `bakery-slurm push`")


def public_repo_problem(repo_id: str) -> str:
    """`[push] private = true` and the repo exists, public: `create_repo` leaves an existing repo's
    visibility as it is, so publishing would make the merges public."""
    return (f"{repo_id} exists and is public, but push.private = true: make the repo private on "
            "the Hub (its Settings), or set private = false")


def _check_unchanged(where: str, items: list[Publication], records: Mapping[str, Any]) -> None:
    """A refreshed card (replace=False) was rendered from its cell's published record: refuse to
    put it over another one (the cell was published again since)."""
    moved = [item.cell_id for item in items
             if not item.replace and records.get(item.cell_id) != item.record]
    if moved:
        raise PushError(f"{where}: {', '.join(moved)} changed since the card was rendered (published "
                        "again meanwhile); run `bakery-slurm push --cards` again")


def _holds(files: Mapping[str, str], additions: list[Any], hashed: Mapping[str, str]) -> bool:
    """Whether a commit whose files are `files` (path -> git blob id) holds every addition's
    content at its path; `hashed` gives the sha256 of files hashed already."""
    return (all(op.path_in_repo in files for op in additions)
            and all(files[op.path_in_repo] in hub_blob_ids(Path(op.path_or_fileobj),
                                                           hashed.get(op.path_in_repo))
                    for op in additions))


def hub_blob_ids(path: Path, sha256: str | None = None) -> set[str]:
    """The git blob ids the Hub may list for the content of `path`: that of the content (a
    regular file, only up to MAX_REGULAR_FILE) and that of its LFS pointer."""
    from ..manifest import sha256_file

    size = path.stat().st_size
    ids = set()
    if size <= MAX_REGULAR_FILE:
        data = path.read_bytes()
        ids.add(git_blob_id(data))
        sha256 = sha256 or hashlib.sha256(data).hexdigest()
    pointer = LFS_POINTER.format(sha256=sha256 or sha256_file(path), size=size)
    return ids | {git_blob_id(pointer.encode())}


def git_blob_id(data: bytes) -> str:
    """git's object id of a file holding `data` (what the Hub lists as a file's blob id)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _retry_after(response: Any) -> float | None:
    """Seconds a 429 asks us to wait (`Retry-After`: seconds or an HTTP date), or None."""
    value = (getattr(response, "headers", None) or {}).get("Retry-After", "").strip()
    if value.isdigit():
        return float(value)
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, IndexError):
        return None


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


def _parse_record(data: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(data)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _read_record(record: Path) -> dict[str, Any] | None:
    """The record at `record`, None where there is none. One that cannot be read raises: taken
    for unpublished, its cell would vanish from the root card rewritten next."""
    try:
        return _parse_record(record.read_bytes())
    except (FileNotFoundError, NotADirectoryError):
        return None


def _record_files(root: Path) -> list[Path]:
    """Every record file under a `dir:` target, sorted. A folder this user may not read raises
    PermissionError (`Path.rglob` skips it silently, and the root card rewritten next would lose
    the cells in it: a cell a teammate published under umask 077)."""
    if not root.is_dir():
        return []

    def unreadable(error: OSError) -> None:
        raise error

    return sorted(Path(folder) / RECORD_FILE
                  for folder, _, files in os.walk(root, onerror=unreadable)
                  if RECORD_FILE in files)


def make_target(push: PushTarget, api: Any = None, deadline: float | None = None) -> Target:
    """The target `push` names; a Hub target gives up waiting on the Hub by `deadline`
    (a `time.monotonic()` time; None: never)."""
    if push.kind == "dir":
        return DirTarget(Path(push.location))
    return HubTarget(push.location, private=push.private, api=api, deadline=deadline)


def root_renderer(push: PushTarget, context: CardContext | None) -> RenderRoot:
    """The root card renderer for a target; without a matrix the title is the target's name.
    The eval results are read on each render: an eval may have finished since the last try."""
    context = context or CardContext(title=Path(push.location).name)

    def render_root(records: dict[str, dict[str, Any]], previous: str | None) -> str:
        evaluation = context.evals.evaluation() if context.evals else None
        return render_root_card(records, context, push.location, previous, evaluation)

    return render_root


# -- what a cell publishes ---------------------------------------------------------------------


def public_identity(identity: Mapping[str, Any]) -> dict[str, Any]:
    """An input's identity as published: a Hub source by repo and commit; a local one by its
    folder's last two names and content hash, never by the cluster path it was read from."""
    if identity.get("commit"):
        return {key: identity.get(key) for key in ("repo", "subfolder", "revision", "commit")}
    return {"local": "/".join(Path(identity["path"]).parts[-2:]), "sha256": identity["sha256"]}


def public_inputs(inputs: Mapping[str, Any]) -> dict[str, Any]:
    return {"base": public_identity(inputs["base"]),
            "adapters": {name: public_identity(i) for name, i in inputs["adapters"].items()}}


def base_card(base_dir: Path) -> dict[str, Any]:
    """License and language from the base's own model card, where it has them."""
    try:
        meta = front_matter((Path(base_dir) / "README.md").read_text())
    except (OSError, UnicodeDecodeError):
        return {}
    keys = ("license", "language") + (("license_name", "license_link")
                                      if meta.get("license") == "other" else ())
    return {key: meta[key] for key in keys if meta.get(key)}


def public_recipe(cell: Cell, inputs: Mapping[str, Any]) -> str:
    """The cell's mergekit recipe with each model named by its published inputs
    (`base@commit+adapter@commit`: the base with that adapter baked in) instead of the bake
    folders it was merged from."""
    from ..recipe import render_recipe

    base = reference(inputs["base"])
    baked = {name: f"{base}+{reference(identity)}" for name, identity in inputs["adapters"].items()}
    return ("# Each model below is the base with one adapter baked in (PEFT merge_and_unload, "
            f"{cell.dtype}),\n# named `base@commit+adapter@commit`; see bakery.json for hashes.\n"
            + render_recipe(cell, base, baked))


def prepare(cell: Cell, final: Path, out: Path, inputs: Mapping[str, Any], base_dir: Path,
            merge: Mapping[str, Any], versions: Mapping[str, str],
            evals: EvalSource | None = None) -> dict[str, Any]:
    """Write `out` (the publish folder) for a verified cell and return its record; its card
    carries the cell's eval results from `evals` if they scored this checkpoint."""
    from ..manifest import intact_marker

    marker = intact_marker(final)
    if marker is None:
        raise PushError(f"{cell.id}: {final} is not intact; run the cell again")
    published_inputs = public_inputs(inputs)
    record = {"cell": cell.id, "size": cell.size, "variant": cell.variant, "method": cell.method,
              "adapters": [name for name, _ in cell.adapters], "recipe_hash": cell.recipe_hash,
              "inputs": published_inputs, "parameters": cell.parameters, "dtype": cell.dtype,
              "base_card": base_card(base_dir),
              "output": {"content_sha256": marker["content_sha256"], "files": marker["files"]},
              "device": merge["device"], "fallback_reason": merge["fallback_reason"],
              "versions": dict(versions)}
    results = evals.cell_results(cell.id, marker["content_sha256"]) if evals else None
    build_publish_folder(final, out, cell_card(cell, record, results),
                         public_recipe(cell, published_inputs), record)
    return record


def prepared(out: Path) -> dict[str, Any] | None:
    """The record of a publish folder `prepare` wrote, or None."""
    return _read_record(Path(out) / RECORD_FILE)


ALREADY_PUBLISHED = "the target holds this recipe hash and these inputs already"


def is_published(record: Mapping[str, Any], published: Mapping[str, Any] | None) -> bool:
    """The target holds this recipe hash and these inputs already. (The recipe hash names
    sources, not their content: a retrained adapter at the same path, or a new commit of an
    unpinned repo, keeps it; the inputs tell.)"""
    return bool(published) and (published.get("recipe_hash"), published.get("inputs")) == (
        record["recipe_hash"], record["inputs"])


def publish_cells(target: Target, push: PushTarget, items: list[Publication],
                  context: CardContext | None) -> dict[str, str]:
    """Publish `items` to `target`, at most MAX_OPERATIONS_PER_COMMIT files per commit, each
    commit with the root card; returns where each cell went (its commit's URL, or its folder)."""
    batches: list[list[Publication]] = []
    count = MAX_OPERATIONS_PER_COMMIT
    for item in items:
        files = sum(1 for p in item.folder.rglob("*") if p.is_file())
        if count + files > MAX_OPERATIONS_PER_COMMIT:
            batches.append([])
            count = 0
        batches[-1].append(item)
        count += files
    render_root = root_renderer(push, context)
    where = {}
    for batch in batches:
        url = target.publish(batch, _message(batch), render_root)
        where.update({item.cell_id: url for item in batch})
    return where


def _message(items: list[Publication]) -> str:
    if not any(item.replace for item in items):
        return f"bakery-slurm: cards of {len(items)} cell(s) ({', '.join(i.cell_id for i in items)})"
    if len(items) == 1:
        return f"bakery-slurm: {items[0].cell_id} (recipe {items[0].record['recipe_hash'][:12]})"
    return f"bakery-slurm: {len(items)} cells ({', '.join(i.cell_id for i in items)})"


def cell_card(cell: Cell, record: Mapping[str, Any], results: Mapping[str, Any] | None) -> str:
    """The card of a cell as published with `record` (its `bakery.json`), with its lm-eval
    `results` if any."""
    return render_card(cell, public_recipe(cell, record["inputs"]), record, results)


def render_card(cell: Cell, recipe: str, record: Mapping[str, Any],
                results: Mapping[str, Any] | None = None) -> str:
    """The model card (README.md) of a published cell: metadata consistent with the root card's
    (and the Hub's `model-index` of its eval results), how to load, recipe, provenance."""
    inputs = [("base", reference(record["inputs"]["base"]))] + [
        (f"adapter {name}", reference(identity))
        for name, identity in record["inputs"]["adapters"].items()]
    results = dict(results or {})
    index = model_index(cell.id, results)
    return render("model_card.md.j2", cell=cell, recipe=recipe, metadata=card_metadata([record]),
                  tags=TAGS, repo=cell.push.location, adapter_names=record["adapters"],
                  inputs=inputs, output_sha256=record["output"]["content_sha256"],
                  device=record["device"], fallback_reason=record["fallback_reason"],
                  versions=record["versions"],
                  model_index=yaml.safe_dump({"model-index": index}, sort_keys=False,
                                             allow_unicode=True) if index else "",
                  scores=results_table(results), off_hub=tasks_off_hub(results),
                  partial_legend=PARTIAL_LEGEND if partial_tasks(results) else "",
                  lm_eval_version=results.get("lm_eval_version"),
                  n_shot=results.get("n-shot") or {})


def build_publish_folder(final: Path, out: Path, card: str, recipe: str,
                         record: dict[str, Any]) -> None:
    """`out` = the verified checkpoint (hardlinked) + README.md + mergekit_config.yml + bakery.json."""
    ours = {"README.md", "mergekit_config.yml", RECORD_FILE}
    with fsutil.staging_dir(out) as tmp:
        for item in final.iterdir():
            if item.name not in ours:  # a hardlink written through would change `final` too
                fsutil.link_or_copy(item, tmp / item.name)
        (tmp / "README.md").write_text(card)
        (tmp / "mergekit_config.yml").write_text(recipe)
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
