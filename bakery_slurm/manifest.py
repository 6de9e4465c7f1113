"""What a stage produced: a manifest of files (size and sha256) and the done-marker beside the output.

A stage writes its output folder atomically, then `write_marker`; a rerun trusts the output only when
`intact_marker` finds the marker and every listed file at its recorded size. The marker lives beside
the folder (`<folder>.done.json`), not inside it, so the folder's content is exactly what was produced.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from . import fsutil

HASH_CHUNK = 16 * 1024 * 1024


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def manifest(folder: Path) -> dict[str, dict[str, Any]]:
    """{relative path: {"size", "sha256"}} for every regular file under `folder`."""
    folder = Path(folder)
    return {
        str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


def content_hash(files: dict[str, dict[str, Any]]) -> str:
    """One hash for a whole manifest: names and contents."""
    blob = json.dumps({name: info["sha256"] for name, info in files.items()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def total_size(files: dict[str, dict[str, Any]]) -> int:
    return sum(info["size"] for info in files.values())


def marker_path(output: Path) -> Path:
    return Path(output).with_name(Path(output).name + ".done.json")


def write_marker(output: Path, info: dict[str, Any]) -> dict[str, Any]:
    """Record `output`'s manifest plus `info`; returns the marker's content."""
    files = manifest(output)
    marker = {**info, "files": files, "content_sha256": content_hash(files)}
    fsutil.atomic_write_json(marker_path(output), marker)
    return marker


def intact_marker(output: Path) -> dict[str, Any] | None:
    """The marker of `output` if it and every file it lists (at its recorded size) exist."""
    output = Path(output)
    try:
        marker = json.loads(marker_path(output).read_text())
        files = marker["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    present = {str(p.relative_to(output)): p.stat().st_size
               for p in output.rglob("*") if p.is_file()} if output.is_dir() else {}
    if present != {name: info["size"] for name, info in files.items()}:
        return None
    return marker
