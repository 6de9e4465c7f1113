"""Stand-ins for services the tests cannot reach.

`FakeHubApi` replaces `huggingface_hub.HfApi` for `bakery_slurm.stages.push.HubTarget` and for
`bakery_slurm.preflight.hub_api` (preflight, pinning and `prefetch`), and only there. It implements
exactly the methods those call, with HfApi's argument names for the arguments they pass
(anything else is a TypeError, so a change in how they call the Hub shows up here instead of
passing silently):

- ``create_repo(repo_id, *, private=None, exist_ok=False, repo_type=None)``
- ``upload_folder(*, repo_id, folder_path, path_in_repo=None, commit_message=None)``: one commit
  holding every file under `folder_path`, stored as bytes under `path_in_repo/`; returns an object
  with `commit_url` and `oid`, like HfApi's `CommitInfo`.
- ``hf_hub_download(repo_id, filename, *, subfolder=None, repo_type=None, revision=None)``: writes
  the stored file under `download_dir` and returns its path; a missing repo raises
  `RepositoryNotFoundError` and a missing file `RemoteEntryNotFoundError`, as the Hub does (404s).

- ``repo_info(repo_id, *, revision=None)``: an object with `sha`, the commit `revision` (default
  main) names in `refs`, or `revision` itself when it is a 40-hex commit (any commit of a known
  repo exists); a repo without refs gets one commit derived from its files. Unknown repo:
  `RepositoryNotFoundError`; unknown revision: `RevisionNotFoundError`.
- ``list_repo_files(repo_id, *, revision=None)``: every stored path (one version of the files is
  modelled; revisions only resolve).
- ``whoami()``: `identity`, by default a classic write token of user `tester`.
- ``snapshot_download(repo_id, *, revision=None, cache_dir=None, allow_patterns=None,
  ignore_patterns=None)``: writes the files huggingface_hub's own `filter_repo_objects` keeps into
  the cache layout huggingface_hub reads offline (`models--<owner>--<name>/snapshots/<commit>/...`
  and `refs/<revision>`), files as plain copies rather than links into `blobs/`; returns the
  snapshot folder.

Failures are scripted per method: `failures={"upload_folder": [412, 503]}` makes the next two
upload calls raise a real `huggingface_hub.errors.HfHubHTTPError` whose `response.status_code` is
412, then 503, before touching any state; the call after that succeeds. Every call is recorded in
`calls` as (method, arguments) and every successful upload in `commits`.

Not modelled: file versions per revision, pull requests, LFS, rate limits other than scripted
ones, tokens (HfApi finds its own; bakery-slurm never passes one, so the fake accepts none).
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx2
from huggingface_hub.errors import (
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import filter_repo_objects

HUB = "https://huggingface.co"


def http_error(status: int, url: str = f"{HUB}/api/models/owner/name/commit/main",
               cls: type[HfHubHTTPError] = HfHubHTTPError) -> HfHubHTTPError:
    """A real huggingface_hub HTTP error carrying an httpx2 response with `status`, built the way
    huggingface_hub 2.x builds them (`cls(message, response=response)`)."""
    response = httpx2.Response(status, request=httpx2.Request("POST", url))
    return cls(f"{status} Client Error for url: {url} (scripted by tests/fakes.py)",
               response=response)


@dataclass(frozen=True)
class FakeCommit:
    """What `upload_folder` returns: the parts of `CommitInfo` HubTarget may read."""

    repo_id: str
    path_in_repo: str
    message: str | None
    files: dict[str, bytes]
    oid: str

    @property
    def commit_url(self) -> str:
        return f"{HUB}/{self.repo_id}/commit/{self.oid}"


@dataclass
class FakeHubApi:
    """See the module docstring. `repos` maps repo id -> {path in repo: bytes}; `refs` maps repo
    id -> {revision: commit}."""

    download_dir: Path
    failures: dict[str, list[int]] = field(default_factory=dict)
    repos: dict[str, dict[str, bytes]] = field(default_factory=dict)
    refs: dict[str, dict[str, str]] = field(default_factory=dict)
    identity: dict[str, Any] = field(default_factory=lambda: {
        "type": "user", "name": "tester", "orgs": [],
        "auth": {"type": "access_token", "accessToken": {"role": "write"}}})
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    commits: list[FakeCommit] = field(default_factory=list)

    def _enter(self, method: str, **arguments: Any) -> None:
        self.calls.append((method, arguments))
        scripted = self.failures.get(method)
        if scripted:
            failure = scripted.pop(0)  # an HTTP status, or an exception such as a connect error
            raise failure if isinstance(failure, BaseException) else http_error(failure)

    def calls_to(self, method: str) -> list[dict[str, Any]]:
        return [arguments for name, arguments in self.calls if name == method]

    # -- the three HfApi methods --------------------------------------------------------------

    def create_repo(self, repo_id: str, *, private: bool | None = None, exist_ok: bool = False,
                    repo_type: str | None = None) -> str:
        self._enter("create_repo", repo_id=repo_id, private=private, exist_ok=exist_ok,
                    repo_type=repo_type)
        if repo_id in self.repos and not exist_ok:
            raise http_error(409, f"{HUB}/api/repos/create")
        self.repos.setdefault(repo_id, {})
        return f"{HUB}/{repo_id}"

    def upload_folder(self, *, repo_id: str, folder_path: str | Path, path_in_repo: str | None = None,
                      commit_message: str | None = None,
                      delete_patterns: str | list[str] | None = None) -> FakeCommit:
        self._enter("upload_folder", repo_id=repo_id, folder_path=str(folder_path),
                    path_in_repo=path_in_repo, commit_message=commit_message,
                    delete_patterns=delete_patterns)
        if repo_id not in self.repos:
            raise http_error(404, f"{HUB}/api/models/{repo_id}/commit/main",
                             cls=RepositoryNotFoundError)
        folder = Path(folder_path)
        prefix = f"{path_in_repo.strip('/')}/" if path_in_repo else ""
        # As HfApi: patterns match paths relative to path_in_repo; .gitattributes is never deleted.
        patterns = [delete_patterns] if isinstance(delete_patterns, str) else delete_patterns or []
        for name in [n for n in self.repos[repo_id] if n.startswith(prefix)]:
            relative = name[len(prefix):]
            if name != ".gitattributes" and any(fnmatch.fnmatch(relative, p) for p in patterns):
                del self.repos[repo_id][name]
        files = {prefix + p.relative_to(folder).as_posix(): p.read_bytes()
                 for p in sorted(folder.rglob("*")) if p.is_file()}
        self.repos[repo_id].update(files)
        oid = hashlib.sha1(repr((len(self.commits), sorted(files))).encode()).hexdigest()
        commit = FakeCommit(repo_id, path_in_repo or "", commit_message, files, oid)
        self.commits.append(commit)
        return commit

    def hf_hub_download(self, repo_id: str, filename: str, *, subfolder: str | None = None,
                        repo_type: str | None = None, revision: str | None = None) -> str:
        self._enter("hf_hub_download", repo_id=repo_id, filename=filename, subfolder=subfolder,
                    repo_type=repo_type, revision=revision)
        name = f"{subfolder}/{filename}" if subfolder else filename
        url = f"{HUB}/{repo_id}/resolve/main/{name}"
        if repo_id not in self.repos:
            raise http_error(404, url, cls=RepositoryNotFoundError)
        if name not in self.repos[repo_id]:
            raise http_error(404, url, cls=RemoteEntryNotFoundError)
        local = Path(self.download_dir) / repo_id / name
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(self.repos[repo_id][name])
        return str(local)

    def _commit(self, repo_id: str, revision: str | None) -> str:
        if repo_id not in self.repos:
            raise http_error(404, f"{HUB}/api/models/{repo_id}", cls=RepositoryNotFoundError)
        refs = self.refs.get(repo_id) or {
            "main": hashlib.sha1(repr(sorted(self.repos[repo_id].items())).encode()).hexdigest()}
        revision = revision or "main"
        if re.fullmatch(r"[0-9a-f]{40}", revision):
            return revision  # any commit of a known repo exists (history is not modelled)
        if revision not in refs:
            raise http_error(404, f"{HUB}/api/models/{repo_id}/revision/{revision}",
                             cls=RevisionNotFoundError)
        return refs[revision]

    def repo_info(self, repo_id: str, *, revision: str | None = None) -> Any:
        self._enter("repo_info", repo_id=repo_id, revision=revision)
        return SimpleNamespace(id=repo_id, sha=self._commit(repo_id, revision))

    def list_repo_files(self, repo_id: str, *, revision: str | None = None) -> list[str]:
        self._enter("list_repo_files", repo_id=repo_id, revision=revision)
        self._commit(repo_id, revision)
        return sorted(self.repos[repo_id])

    def whoami(self) -> dict[str, Any]:
        self._enter("whoami")
        return self.identity

    def snapshot_download(self, repo_id: str, *, revision: str | None = None,
                          cache_dir: str | Path | None = None,
                          allow_patterns: list[str] | None = None,
                          ignore_patterns: list[str] | None = None) -> str:
        self._enter("snapshot_download", repo_id=repo_id, revision=revision, cache_dir=cache_dir,
                    allow_patterns=allow_patterns, ignore_patterns=ignore_patterns)
        commit = self._commit(repo_id, revision)
        entry = Path(cache_dir) / f"models--{repo_id.replace('/', '--')}"
        snapshot = entry / "snapshots" / commit
        for name in filter_repo_objects(sorted(self.repos[repo_id]), allow_patterns=allow_patterns,
                                        ignore_patterns=ignore_patterns):
            (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
            (snapshot / name).write_bytes(self.repos[repo_id][name])
        snapshot.mkdir(parents=True, exist_ok=True)
        if revision != commit:
            (entry / "refs").mkdir(parents=True, exist_ok=True)
            (entry / "refs" / (revision or "main")).write_text(commit)
        return str(snapshot)

    def add_folder(self, repo_id: str, folder: Path, prefix: str = "") -> None:
        """Store every file under `folder` in the repo, under `prefix/`."""
        files = self.repos.setdefault(repo_id, {})
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file():
                files[f"{prefix}{path.relative_to(folder).as_posix()}"] = path.read_bytes()

    # -- for assertions -----------------------------------------------------------------------

    def materialize(self, repo_id: str, root: Path) -> Path:
        """Write the repo's files under `root` (a local clone, for `from_pretrained`)."""
        for name, data in self.repos[repo_id].items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(data)
        return root
