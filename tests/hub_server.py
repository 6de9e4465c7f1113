"""A local HTTP server standing in for the Hub's download endpoints, so that huggingface_hub's real
`snapshot_download` (and everything it writes into a Hub cache: blobs, refs, the tree listing,
locks) runs offline. Point huggingface_hub at it with HF_ENDPOINT=`server.endpoint` (read at
import: a child process's environment).

It serves one commit (`COMMIT`) of each repo given, read-only, public, and answers exactly the
requests `snapshot_download` makes:

- ``GET /api/models/<owner>/<name>/revision/<revision>``: the repo's info (`sha`: COMMIT);
- ``GET /api/models/<owner>/<name>/tree/<revision>``: every file (`recursive` is assumed), with
  git's blob id as `oid`;
- ``HEAD``/``GET /<owner>/<name>/resolve/<revision>/<path>``: a file, with the headers
  huggingface_hub reads (`X-Repo-Commit`, `ETag`, `Content-Length`).

Any other request (huggingface_hub also asks for its registry of agent harnesses, which it does
without), and an unknown repo, revision or file, is answered 404 and recorded in `unknown`, so a
test can see huggingface_hub asking for something this stand-in lacks.
Not modelled: LFS and Xet (files are served as plain git files), gated or private repos, pagination,
tokens.
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubServer:
    """`with HubServer({"owner/name": folder}) as hub:` serves the files below each folder."""

    def __init__(self, repos: dict[str, Path]):
        self.files = {repo: {p.relative_to(folder).as_posix(): p.read_bytes()
                             for p in sorted(Path(folder).rglob("*")) if p.is_file()}
                      for repo, folder in repos.items()}
        self.unknown: list[str] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> HubServer:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _answer(self, method: str, path: str) -> tuple[int, dict[str, str], bytes]:
        parts = unquote(urlsplit(path).path).strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("revision", "tree"):
            repo, kind, revision = "/".join(parts[2:4]), parts[4], parts[5]
            files = self.files.get(repo) if revision in ("main", COMMIT) else None
            if files is not None:
                if kind == "revision":
                    body = {"id": repo, "sha": COMMIT, "private": False,
                            "siblings": [{"rfilename": name} for name in files]}
                else:
                    body = [{"type": "file", "path": name, "size": len(data),
                             "oid": git_blob_id(data)} for name, data in files.items()]
                return 200, {"Content-Type": "application/json"}, json.dumps(body).encode()
        elif len(parts) >= 5 and parts[2] == "resolve":
            repo, revision, name = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
            data = self.files.get(repo, {}).get(name) if revision in ("main", COMMIT) else None
            if data is not None:
                return 200, {"X-Repo-Commit": COMMIT, "ETag": f'"{git_blob_id(data)}"',
                             "Content-Type": "application/octet-stream"}, data
        self.unknown.append(f"{method} {path}")
        return 404, {"X-Error-Code": "EntryNotFound"}, b"{}"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def _reply(self, method: str) -> None:
                status, headers, body = hub._answer(method, self.path)
                self.send_response(status)
                for key, value in {**headers, "Content-Length": str(len(body))}.items():
                    self.send_header(key, value)
                self.end_headers()
                if method == "GET":
                    self.wfile.write(body)

            def do_GET(self) -> None:
                self._reply("GET")

            def do_HEAD(self) -> None:
                self._reply("HEAD")

            def log_message(self, *args) -> None:
                pass  # pytest shows a failing test's own output, not every request

        return Handler
