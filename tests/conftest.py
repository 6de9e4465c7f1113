"""Fixtures shared by every test tier.

`MINIMAL_MATRIX` is the smallest valid matrix: one size, one variant, one method (one cell,
`tiny-std/eng-nob__ties`), local `path` sources and a `dir:` push target, all relative to the
matrix file. `write_matrix(text)` writes a matrix into the test's tmp_path and returns its path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

MINIMAL_MATRIX = """\
name = "minimal"
adapters = ["eng", "nob"]

[base]
path = "models/base-{size}"

[adapter]
path = "models/adapter-{size}-{variant}-{adapter}"

[push]
target = "dir:published"

[variants.std]

[sizes.tiny]

[methods.ties]
density = 0.5
weight = 0.5
"""


@pytest.fixture
def minimal_matrix() -> str:
    """The text of `MINIMAL_MATRIX` (a valid one-cell matrix with local sources)."""
    return MINIMAL_MATRIX


@pytest.fixture
def write_matrix(tmp_path: Path) -> Callable[..., Path]:
    """Write matrix text to `tmp_path / name` (folders created) and return the file's path."""

    def write(text: str, name: str = "matrix.toml") -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return path

    return write
