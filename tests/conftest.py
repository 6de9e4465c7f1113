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


# ---------------------------------------------------------------------------------------------
# Tiny Gemma 3 models and a matrix over them (tests/e2e, tests/unit/test_push.py)

import json  # noqa: E402
import os  # noqa: E402

# No test may reach the Hub. Set at import, before any test module imports huggingface_hub
# (which reads HF_HUB_OFFLINE once, at import); subprocesses inherit it.
os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(autouse=True)
def _hub_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep HF_HUB_OFFLINE=1 for every test, even one that edits the environment."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def _local_slots(tmp_path_factory: pytest.TempPathFactory):
    """The local executor's machine-wide slots in this session's temporary folder, capped at 4:
    test runs of other checkouts on this machine take none of this run's slots (nor it theirs),
    and no test depends on this machine's CPU count. Session-scoped, so that module-scoped
    fixtures that submit (a demo run) get it too."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BAKERY_LOCAL_SLOTS_DIR", str(tmp_path_factory.getbasetemp() / "local-slots"))
        patch.setenv("BAKERY_LOCAL_MAX_TASKS", "4")
        yield


TINY_METHODS = {
    "linear": {"weight": 0.5},
    "task_arithmetic": {"weight": 0.5},
    "ties": {"density": 0.5, "weight": 0.5},
}


def tiny_matrix_text(models: Path, push: str = "dir:published",
                     methods: tuple[str, ...] = tuple(TINY_METHODS), engine: str = "bakery") -> str:
    """A matrix like `bakery-slurm demo`'s: sizes tiny1b (text kind) and tiny4b (multimodal kind),
    variant std, the given methods, sources as absolute paths under `models` (a
    `build_demo_models` root), push target `push`, work folder `bakery-work` beside the file,
    `[merge] engine`."""
    lines = [
        'name = "tiny"',
        'adapters = ["eng", "nob"]',
        "[base]",
        f"path = {json.dumps(str(Path(models).resolve()) + '/bases/{kind}')}",
        "[adapter]",
        f"path = {json.dumps(str(Path(models).resolve()) + '/adapters/{kind}/{adapter}')}",
        "[push]",
        f"target = {json.dumps(push)}",
        "[variants.std]",
        "[sizes.tiny1b]",
        'vars = { kind = "text" }',
        "[sizes.tiny4b]",
        'vars = { kind = "multimodal" }',
    ]
    for method in methods:
        lines.append(f"[methods.{method}]")
        lines += [f"{name} = {value}" for name, value in TINY_METHODS[method].items()]
    lines += ["[runtime]", 'container = "none"', "[merge]", f"engine = {json.dumps(engine)}"]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root of the tiny demo models, built once per session (`bakery_slurm.tiny.build_demo_models`):
    bases/{text,multimodal}, adapters/{text,multimodal}/{eng,nob}. Treat it as read-only; a test
    that changes a model copies the tree first."""
    from bakery_slurm.tiny import build_demo_models

    root = tmp_path_factory.mktemp("tiny-models")
    build_demo_models(root)
    return root


@pytest.fixture(scope="session")
def write_tiny_matrix(tiny_models: Path) -> Callable[..., Path]:
    """`write(folder, models=tiny_models, push="dir:published", methods=..., engine="bakery")`
    writes `folder/matrix.toml` (see `tiny_matrix_text`) and returns its path. Session-scoped, so
    module-scoped fixtures can use it too."""

    def write(folder: Path, models: Path | None = None, push: str = "dir:published",
              methods: tuple[str, ...] = tuple(TINY_METHODS), engine: str = "bakery") -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "matrix.toml"
        path.write_text(tiny_matrix_text(models or tiny_models, push, methods, engine),
                        encoding="utf-8")
        return path

    return write


@pytest.fixture
def tiny_matrix(tmp_path: Path, write_tiny_matrix: Callable[..., Path]) -> Path:
    """`tmp_path/matrix.toml` over the session's tiny models: 6 cells (tiny1b, tiny4b) x std x
    (linear, task_arithmetic, ties), pushed to `dir:published` (tmp_path/published), work folder
    `bakery-work` (tmp_path/bakery-work), the default (bakery) engine."""
    return write_tiny_matrix(tmp_path)
