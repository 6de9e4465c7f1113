"""Stand-ins for services the tests cannot reach.

`FakeHubApi` replaces `huggingface_hub.HfApi` for `bakery_slurm.stages.push.HubTarget` and for
`bakery_slurm.preflight.hub_api` (preflight, pinning, `prefetch`), and only there. It implements
exactly the methods those call, with HfApi's argument names for the arguments they pass (anything
else is a TypeError, so a change in how they call the Hub shows up here instead of passing
silently), and takes HfApi's own `CommitOperationAdd` and `CommitOperationDelete` objects:

- ``create_repo(repo_id, *, private=None, exist_ok=False, repo_type=None)``: a new repo starts
  with one commit holding `.gitattributes`, as on the Hub.
- ``repo_info(repo_id, *, revision=None, repo_type=None)``: an object whose `sha` is the commit
  `revision` (default: the head of main) points to and whose `private` is the repo's visibility
  (`create_repo`'s or `seed`'s `private`, public by default, as on the Hub); an unknown revision raises `RevisionNotFoundError`.
- ``list_repo_files(repo_id, *, revision=None, repo_type=None)``: every path at that commit.
- ``list_repo_tree(repo_id, *, recursive=False, revision=None, repo_type=None)``: the files and
  folders at that commit (the top level only unless `recursive`), as huggingface_hub's `RepoFile`
  (`blob_id`: git's blob id of what git holds, as the Hub's: the content, or for a
  `*.safetensors` file, kept in LFS, its LFS pointer, with the content's sha256 in `lfs`) and `RepoFolder`
  (a `tree_id` that changes with what is below it, not git's). A generator, like HfApi's, which
  fetches its pages as it is iterated: the call is recorded, and a scripted failure raised, when
  the first entry is asked for.
- ``preupload_lfs_files(repo_id, *, additions, repo_type=None)``: transfers the content of every
  addition not yet `_is_uploaded` into the repo's content store, skipping content the store holds
  already (the server answers "already present" for those, which is how a rerun resumes), then
  marks the additions uploaded. Each transfer is recorded in `transfers` (path in repo).
- ``create_commit(repo_id, operations, *, commit_message, parent_commit=None, repo_type=None)``:
  uploads what is not uploaded yet, then applies the operations as one commit. With
  `parent_commit` it fails with HTTP 412 when main has moved on since that commit (optimistic
  concurrency, as the Hub does); it refuses an addition already committed (`ValueError`, as
  HfApi does). Returns an object with `commit_url` and `oid`, like HfApi's `CommitInfo`.
  The scripted entry `ANSWER_LOST` applies the commit, then raises `httpx2.ReadTimeout` with
  the additions left uncommitted, as HfApi does when the connection drops before the answer.
- ``hf_hub_download(repo_id, filename, *, subfolder=None, repo_type=None, revision=None)``:
  writes the file as of `revision` (default main) under `download_dir` and returns its path,
  keeping a local cache like the Hub's (files by commit, plus the commit main last resolved to).
  A missing repo raises `RepositoryNotFoundError`, a missing file `RemoteEntryNotFoundError`.

- ``auth_check(repo_id, *, repo_type=None, write=False)``: `GatedRepoError` (403) for a repo in
  `gated`, `RepositoryNotFoundError` for an unknown one. As on the Hub, a gated repo still answers
  `repo_info` and `list_repo_files`; only this and downloads refuse.
- ``whoami()``: `identity`, by default a classic write token of user `tester`.
- ``snapshot_download(repo_id, *, revision=None, cache_dir=None, allow_patterns=None,
  ignore_patterns=None)``: writes the files of that commit that huggingface_hub's own
  `filter_repo_objects` keeps into the cache layout huggingface_hub reads offline
  (`models--<owner>--<name>/snapshots/<commit>/...`, plus `refs/<revision>` unless the revision
  is a commit), as plain files rather than links into `blobs/`; returns the snapshot folder.
  A repo in `gated` raises `GatedRepoError` (403), as the real download of its files does.

Failures are scripted per method: `failures={"create_commit": [412, 503]}` makes the next two
calls raise a real `huggingface_hub.errors.HfHubHTTPError` whose `response.status_code` is 412,
then 503, before touching any state; the call after that succeeds. An entry may also be an
exception instance: `http_error(429, retry_after=90)` carries a `Retry-After` header, and a
connection error (`httpx2.ConnectError`) on `hf_hub_download` falls back to the local cache as
the real one does: a download at a commit returns that commit's cached file, a download of main
silently returns the copy cached when main was last resolved (a stale read), and with nothing
cached it raises `LocalEntryNotFoundError`. The entry `TRANSFER_FAILURE` on `preupload_lfs_files`
transfers the first pending file, then fails on the next one with the `RuntimeError` that
huggingface_hub 2.x wraps failed LFS/Xet transfers in. The Hub's check of README.md metadata
(`create_commit` posts it to /api/validate-yaml first, hf_api.py `_validate_yaml`) is not
modelled; script what it raises: `ValueError("Invalid metadata in README.md. ...")` for a refusal,
`json.JSONDecodeError` for an HTML error page read as its JSON answer.

`before={"create_commit": fn}` calls `fn()` on entering that method (outside the fake's lock),
so a test can hold several threads at the same point. Every call is recorded in `calls` as
(method, arguments) and every commit in `commits`. The fake is thread-safe.

`endpoint` is the Hub's address, as `HfApi.endpoint`.

Not modelled: branches other than main, pull requests, the LFS/regular split of uploads (every
file goes through the content store; only the tree listing tells LFS files apart), rate limits other than scripted ones, tokens (HfApi finds its own;
HubTarget never passes one, so the fake accepts none).
"""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import httpx2
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, RepoFile, RepoFolder
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import filter_repo_objects

HUB = "https://huggingface.co"
TRANSFER_FAILURE = "transfer failure"
ANSWER_LOST = "answer lost"
# Paths the Hub keeps in LFS here (the `.gitattributes` a new repo starts with).
LFS_SUFFIX = ".safetensors"


def http_error(status: int, url: str = f"{HUB}/api/models/owner/name/commit/main",
               cls: type[HfHubHTTPError] = HfHubHTTPError,
               retry_after: int | None = None) -> HfHubHTTPError:
    """A real huggingface_hub HTTP error carrying an httpx2 response with `status` (and a
    `Retry-After` header in seconds), built the way huggingface_hub 2.x builds them."""
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
    response = httpx2.Response(status, headers=headers, request=httpx2.Request("POST", url))
    return cls(f"{status} Client Error for url: {url} (scripted by tests/fakes.py)",
               response=response)


@dataclass(frozen=True)
class FakeCommit:
    """What `create_commit` returns: the parts of `CommitInfo` HubTarget may read, plus the
    commit's message and the files it added or changed (for assertions)."""

    repo_id: str
    oid: str
    parent: str | None
    message: str
    files: dict[str, bytes]

    @property
    def commit_url(self) -> str:
        return f"{HUB}/{self.repo_id}/commit/{self.oid}"


@dataclass(frozen=True)
class FakeRepoInfo:
    sha: str
    private: bool


@dataclass
class FakeHubApi:
    """See the module docstring. `repos` maps repo id -> {path in repo: bytes} at main's head."""

    download_dir: Path
    endpoint: str = HUB
    failures: dict[str, list[Any]] = field(default_factory=dict)
    before: dict[str, Callable[[], None]] = field(default_factory=dict)
    repos: dict[str, dict[str, bytes]] = field(default_factory=dict)
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    commits: list[FakeCommit] = field(default_factory=list)
    transfers: list[str] = field(default_factory=list)
    gated: set[str] = field(default_factory=set)  # repos whose terms this token has not accepted
    identity: dict[str, Any] = field(default_factory=lambda: {
        "type": "user", "name": "tester", "orgs": [],
        "auth": {"type": "access_token", "accessToken": {"role": "write"}}})

    def __post_init__(self) -> None:
        self._lock = threading.RLock()
        self._snapshots: dict[str, dict[str, bytes]] = {}  # commit oid -> files
        self._heads: dict[str, str] = {}  # repo id -> head of main
        self._store: dict[str, set[str]] = {}  # repo id -> sha256 of transferred contents
        self._cache: dict[tuple[str, str, str], bytes] = {}  # (repo, commit, path) -> bytes
        self._cached_main: dict[str, str] = {}  # repo id -> commit main resolved to last time
        self._private: dict[str, bool] = {}  # repo id -> private?

    def _enter(self, method: str, **arguments: Any) -> Any:
        """Record the call, run its `before` hook, and raise its next scripted failure. Returns
        a scripted entry the method handles itself (a connection error on a download, a
        transfer failure), or None."""
        if method in self.before:
            self.before[method]()
        with self._lock:
            self.calls.append((method, arguments))
            scripted = self.failures.get(method)
            failure = scripted.pop(0) if scripted else None
        if failure is None:
            return None
        if method == "hf_hub_download" and isinstance(failure, httpx2.TransportError):
            return failure
        if failure in (TRANSFER_FAILURE, ANSWER_LOST):
            return failure
        raise failure if isinstance(failure, BaseException) else http_error(failure)

    def calls_to(self, method: str) -> list[dict[str, Any]]:
        return [arguments for name, arguments in self.calls if name == method]

    def head(self, repo_id: str) -> str:
        return self._heads[repo_id]

    # -- the HfApi methods --------------------------------------------------------------------

    def create_repo(self, repo_id: str, *, private: bool | None = None, exist_ok: bool = False,
                    repo_type: str | None = None) -> str:
        self._enter("create_repo", repo_id=repo_id, private=private, exist_ok=exist_ok,
                    repo_type=repo_type)
        with self._lock:
            if repo_id in self.repos and not exist_ok:
                raise http_error(409, f"{HUB}/api/repos/create")
            if repo_id not in self.repos:
                self._private[repo_id] = bool(private)
                self.repos[repo_id] = {}
                self._store[repo_id] = set()
                self._commit(repo_id, None, "initial commit",
                             {".gitattributes": b"*.safetensors filter=lfs\n"}, [])
        return f"{HUB}/{repo_id}"

    def repo_info(self, repo_id: str, *, revision: str | None = None,
                  repo_type: str | None = None) -> FakeRepoInfo:
        self._enter("repo_info", repo_id=repo_id, revision=revision, repo_type=repo_type)
        with self._lock:
            return FakeRepoInfo(sha=self._resolve(repo_id, revision),
                                private=self._private[repo_id])

    def list_repo_files(self, repo_id: str, *, revision: str | None = None,
                        repo_type: str | None = None) -> list[str]:
        self._enter("list_repo_files", repo_id=repo_id, revision=revision, repo_type=repo_type)
        with self._lock:
            return sorted(self._snapshots[self._resolve(repo_id, revision)])

    def list_repo_tree(self, repo_id: str, *, recursive: bool = False, revision: str | None = None,
                       repo_type: str | None = None) -> Iterator[RepoFile | RepoFolder]:
        self._enter("list_repo_tree", repo_id=repo_id, recursive=recursive, revision=revision,
                    repo_type=repo_type)
        with self._lock:
            files = dict(self._snapshots[self._resolve(repo_id, revision)])
        folders = {name.rsplit("/", depth)[0] for name in files
                   for depth in range(1, name.count("/") + 1)}
        for folder in sorted(folders):
            if recursive or "/" not in folder:
                below = sorted((n, _blob_id(d)) for n, d in files.items()
                               if n.startswith(f"{folder}/"))
                yield RepoFolder(path=folder, oid=hashlib.sha1(repr(below).encode()).hexdigest())
        for name, data in sorted(files.items()):
            if recursive or "/" not in name:
                yield _repo_file(name, data)

    def auth_check(self, repo_id: str, *, repo_type: str | None = None,
                   write: bool = False) -> None:
        self._enter("auth_check", repo_id=repo_id, repo_type=repo_type, write=write)
        if repo_id in self.gated:
            raise http_error(403, f"{HUB}/api/models/{repo_id}/auth-check", cls=GatedRepoError)
        with self._lock:
            self._resolve(repo_id, None)

    def whoami(self) -> dict[str, Any]:
        self._enter("whoami")
        return self.identity

    def snapshot_download(self, repo_id: str, *, revision: str | None = None,
                          cache_dir: str | Path | None = None,
                          allow_patterns: list[str] | None = None,
                          ignore_patterns: list[str] | None = None) -> str:
        self._enter("snapshot_download", repo_id=repo_id, revision=revision, cache_dir=cache_dir,
                    allow_patterns=allow_patterns, ignore_patterns=ignore_patterns)
        if repo_id in self.gated:
            raise http_error(403, f"{HUB}/{repo_id}/resolve/{revision or 'main'}/config.json",
                             cls=GatedRepoError)
        with self._lock:
            commit = self._resolve(repo_id, revision)
            files = dict(self._snapshots[commit])
        entry = Path(cache_dir) / f"models--{repo_id.replace('/', '--')}"
        snapshot = entry / "snapshots" / commit
        snapshot.mkdir(parents=True, exist_ok=True)
        for name in filter_repo_objects(sorted(files), allow_patterns=allow_patterns,
                                        ignore_patterns=ignore_patterns):
            (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
            (snapshot / name).write_bytes(files[name])
        if revision != commit:
            (entry / "refs").mkdir(parents=True, exist_ok=True)
            (entry / "refs" / (revision or "main")).write_text(commit)
        return str(snapshot)

    def preupload_lfs_files(self, repo_id: str, *, additions: Iterable[CommitOperationAdd],
                            repo_type: str | None = None) -> None:
        additions = list(additions)
        scripted = self._enter("preupload_lfs_files", repo_id=repo_id,
                               additions=[a.path_in_repo for a in additions], repo_type=repo_type)
        self._transfer(repo_id, additions, fail_after_one=scripted == TRANSFER_FAILURE)

    def create_commit(self, repo_id: str, operations: Iterable[Any], *, commit_message: str,
                      parent_commit: str | None = None, repo_type: str | None = None) -> FakeCommit:
        operations = list(operations)
        scripted = self._enter("create_commit", repo_id=repo_id,
                    operations=[(type(op).__name__, op.path_in_repo) for op in operations],
                    commit_message=commit_message, parent_commit=parent_commit,
                    repo_type=repo_type)
        additions = [op for op in operations if isinstance(op, CommitOperationAdd)]
        if any(op._is_committed for op in additions):
            raise ValueError("CommitOperationAdd has already being committed and cannot be reused")
        self._transfer(repo_id, additions, fail_after_one=False)
        with self._lock:
            self._resolve(repo_id, None)
            if parent_commit is not None and parent_commit != self._heads[repo_id]:
                raise http_error(412, f"{HUB}/api/models/{repo_id}/commit/main")
            added = {op.path_in_repo: _content(op) for op in additions}
            deleted = [op for op in operations if isinstance(op, CommitOperationDelete)]
            commit = self._commit(repo_id, self._heads[repo_id], commit_message, added, deleted)
        if scripted == ANSWER_LOST:
            # committed, but the answer never arrived: HfApi leaves the additions uncommitted
            raise httpx2.ReadTimeout("the answer to the commit was lost (scripted by tests/fakes.py)")
        for op in additions:
            op._is_committed = True
        return commit

    def hf_hub_download(self, repo_id: str, filename: str, *, subfolder: str | None = None,
                        repo_type: str | None = None, revision: str | None = None) -> str:
        offline = self._enter("hf_hub_download", repo_id=repo_id, filename=filename,
                              subfolder=subfolder, repo_type=repo_type, revision=revision)
        name = f"{subfolder}/{filename}" if subfolder else filename
        with self._lock:
            if offline is not None:
                # As huggingface_hub: on a connection error, whatever the cache holds.
                commit = revision if revision in self._snapshots else self._cached_main.get(repo_id)
                data = self._cache.get((repo_id, commit or "", name))
                if data is None:
                    raise LocalEntryNotFoundError(f"{name}: not cached and the Hub is unreachable")
                return self._write(repo_id, commit, name, data)
            commit = self._resolve(repo_id, revision)
            if revision is None or revision == "main":
                self._cached_main[repo_id] = commit
            files = self._snapshots[commit]
            if name not in files:
                raise http_error(404, f"{HUB}/{repo_id}/resolve/{commit}/{name}",
                                 cls=RemoteEntryNotFoundError)
            self._cache[(repo_id, commit, name)] = files[name]
            return self._write(repo_id, commit, name, files[name])

    # -- internals ----------------------------------------------------------------------------

    def _resolve(self, repo_id: str, revision: str | None) -> str:
        if repo_id not in self.repos:
            raise http_error(404, f"{HUB}/api/models/{repo_id}", cls=RepositoryNotFoundError)
        if revision in (None, "main"):
            return self._heads[repo_id]
        if revision not in self._snapshots:
            raise http_error(404, f"{HUB}/api/models/{repo_id}/revision/{revision}",
                             cls=RevisionNotFoundError)
        return revision

    def _transfer(self, repo_id: str, additions: list[CommitOperationAdd],
                  fail_after_one: bool) -> None:
        with self._lock:
            if repo_id not in self.repos:
                raise http_error(404, f"{HUB}/api/models/{repo_id}/preupload/main",
                                 cls=RepositoryNotFoundError)
            pending = [op for op in additions if not op._is_uploaded]
            for number, op in enumerate(pending):
                sha = op.upload_info.sha256.hex()
                if sha in self._store[repo_id]:
                    continue  # "already present upstream"
                if fail_after_one and number > 0:
                    raise RuntimeError(f"Error while uploading '{op.path_in_repo}' to the Hub.")
                self._store[repo_id].add(sha)
                self.transfers.append(op.path_in_repo)
            for op in pending:
                op._is_uploaded = True

    def _commit(self, repo_id: str, parent: str | None, message: str, added: dict[str, bytes],
                deleted: list[CommitOperationDelete]) -> FakeCommit:
        files = dict(self._snapshots[parent]) if parent else {}
        for op in deleted:
            prefix = op.path_in_repo.rstrip("/") + "/"
            gone = [n for n in files
                    if n == op.path_in_repo or (op.is_folder and n.startswith(prefix))]
            if not gone:
                raise http_error(404, f"{HUB}/api/models/{repo_id}/commit/main",
                                 cls=RemoteEntryNotFoundError)
            for name in gone:
                del files[name]
        files.update(added)
        key = repr((repo_id, len(self.commits), parent, sorted(files)))
        oid = hashlib.sha1(key.encode()).hexdigest()
        self._snapshots[oid] = files
        self._heads[repo_id] = oid
        self.repos[repo_id] = files
        commit = FakeCommit(repo_id, oid, parent, message, added)
        self.commits.append(commit)
        return commit

    def _write(self, repo_id: str, commit: str | None, name: str, data: bytes) -> str:
        local = Path(self.download_dir) / repo_id / (commit or "main") / name
        local.parent.mkdir(parents=True, exist_ok=True)
        # Renamed into place, as huggingface_hub does: a thread reading the file another thread
        # is downloading again sees all of it, never a truncated copy.
        partial = local.with_name(f"{local.name}.{threading.get_ident()}.incomplete")
        partial.write_bytes(data)
        os.replace(partial, local)
        return str(local)

    # -- for tests ----------------------------------------------------------------------------

    def seed(self, repo_id: str, files: dict[str, bytes], private: bool = False) -> str:
        """A repo holding `files` in its first commit, made without recording a call (a test's
        setup); returns the commit."""
        with self._lock:
            self._private[repo_id] = private
            self.repos[repo_id] = {}
            self._store[repo_id] = set()
            return self._commit(repo_id, None, "initial commit", files, []).oid

    def put(self, repo_id: str, files: dict[str, bytes], message: str = "edited on the Hub") -> str:
        """Commit `files` directly (as a person editing on the Hub would); returns the commit."""
        with self._lock:
            return self._commit(repo_id, self._heads[repo_id], message, files, []).oid

    def materialize(self, repo_id: str, root: Path) -> Path:
        """Write the repo's files under `root` (a local clone, for `from_pretrained`)."""
        for name, data in self.repos[repo_id].items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(data)
        return root


def _blob_id(data: bytes) -> str:
    """Git's object id of a file holding `data`, which the Hub reports as its `blob_id`."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _repo_file(name: str, data: bytes) -> RepoFile:
    """The tree entry the Hub lists for `data` at `name`: a file kept in LFS is in git as its
    pointer, whose blob id the Hub reports, with the content's sha256 under `lfs`."""
    if not name.endswith(LFS_SUFFIX):
        return RepoFile(path=name, size=len(data), oid=_blob_id(data))
    sha256 = hashlib.sha256(data).hexdigest()
    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {len(data)}\n"
    return RepoFile(path=name, size=len(data), oid=_blob_id(pointer.encode()),
                    lfs={"size": len(data), "oid": sha256, "pointerSize": len(pointer)})


def _content(op: CommitOperationAdd) -> bytes:
    with op.as_file() as f:
        return f.read()
