"""`bakery-slurm run-cell`: run one cell's pipeline here. What every array task executes."""

from __future__ import annotations

import atexit
import contextlib
import functools
import gc
import json
import os
import shutil
import signal
import socket
import threading
from pathlib import Path
from typing import Iterator

import click

from ..errors import ConfigError
from ..matrix import expand, load_matrix
from ..pins import apply_pins
from . import cli


@cli.command("run-cell")
@click.argument("matrix", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("cell_id")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True, help="Where mergekit computes; auto falls back to CPU.")
@click.option("--work", type=click.Path(file_okay=False, path_type=Path),
              help="Work folder (default: [paths] work of the matrix).")
@click.option("--pin", "pins", multiple=True, metavar="INPUT=COMMIT",
              help="Read this Hub input (`base` or an adapter name) at this commit (repeatable; "
                   "submit pins every Hub input so all cells of a submission read the same).")
@click.option("--recipe-hash", metavar="HEX",
              help="Refuse to run if this cell's recipe changed since it was submitted "
                   "(other edits to the matrix, such as a longer time limit, are fine).")
def run_cell(matrix: Path, cell_id: str, device: str, work: Path | None, pins: tuple[str, ...],
             recipe_hash: str | None) -> None:
    """Bake, merge, strip, verify and push one cell of MATRIX, resuming finished stages.

    Prints the cell's result record (JSON) on success; exits 1 naming the failed stage.

    \b
    Example:
        bakery-slurm run-cell matrix.toml 4b-std/eng-nob__ties --device cpu
        bakery-slurm run-cell matrix.toml 1b-std/eng-nob__ties --pin nob=<40-hex commit>
    """
    with task_process():
        _run_cell(matrix, cell_id, device, work, pins, recipe_hash)


def _run_cell(matrix: Path, cell_id: str, device: str, work: Path | None, pins: tuple[str, ...],
              recipe_hash: str | None) -> None:
    from ..pipeline import run_cell as run
    from ..rootcard import CardContext

    loaded = load_matrix(matrix)
    cells = {cell.id: cell for cell in expand(loaded)}
    if cell_id not in cells:
        raise click.BadParameter(f"{cell_id!r} is not a cell of {loaded.path} "
                                 f"(see `bakery-slurm plan {matrix}`)", param_hint="CELL_ID")
    if recipe_hash and recipe_hash != cells[cell_id].recipe_hash:
        raise ConfigError(f"{loaded.path}: the recipe of {cell_id} changed since submission "
                          f"(recipe hash {cells[cell_id].recipe_hash[:12]}, submitted "
                          f"{recipe_hash[:12]}); submit again to run the new recipe")
    cell = apply_pins(cells[cell_id], parse_pins(pins))
    result = run(cell, work or loaded.work_dir, device=device, offline=loaded.spec.runtime.offline,
                 card=CardContext.of_matrix(loaded, work))
    click.echo(json.dumps(result, indent=2))


def parse_pins(pins: tuple[str, ...]) -> dict[str, str]:
    """--pin INPUT=COMMIT options as {input name: commit}."""
    pinned = {}
    for pin in pins:
        name, sep, commit = pin.partition("=")
        if not sep:
            raise click.BadParameter(f"{pin!r} is not INPUT=COMMIT", param_hint="--pin")
        pinned[name] = commit
    return pinned


@contextlib.contextmanager
def task_process() -> Iterator[None]:
    """The settings of a task's process (`_task_environment`) for the block; its private
    HF_XET_CACHE is removed, and forgotten, when the block ends."""
    _no_collection_at_exit()
    xet_cache = _task_environment()
    # scancel, the time limit and preemption send SIGTERM first (SIGKILL KillWait s later):
    # end through `finally`, so the private cache goes too (exit status 128+15, as a shell says).
    # Only the main thread may set a handler (a task's process is its own main thread).
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _exit_on_signal) if main else None
    try:
        yield
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
        if xet_cache is not None:
            shutil.rmtree(xet_cache, ignore_errors=True)
            # Run in-process (a test's CliRunner), the next task must get a folder of its own.
            os.environ.pop("HF_XET_CACHE", None)


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


@functools.cache
def _no_collection_at_exit() -> None:
    """Python's exit would walk every object torch and mergekit made looking for cycles to
    collect (~0.5 s of a task's end, measured); a task ending has nothing worth collecting.
    Frozen at exit, not earlier: a process running several cells (a test's CliRunner) still
    collects between them."""
    atexit.register(gc.freeze)


def _task_environment() -> Path | None:
    """Per-task settings: no progress bars in logs, and a private HF_XET_CACHE (tasks sharing one
    have corrupted a shared one) unless the user chose one. Returns that private folder, which
    the task removes when it ends; folders of tasks killed before they could are removed here."""
    # SLURM's USR2 warning before the time limit (see array_task.run_task) may reach this process
    # too: the default action would kill the cell early, and its end would read FAILED instead of
    # TIMEOUT.
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "HF_XET_CACHE" in os.environ:
        return None
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    remove_dead_xet_caches(tmp)
    task = (os.environ.get("SLURM_ARRAY_JOB_ID", "") + "_" + os.environ.get("SLURM_ARRAY_TASK_ID", "")
            if "SLURM_ARRAY_JOB_ID" in os.environ else socket.gethostname())
    folder = tmp / f"{XET_PREFIX}{task}-{os.getpid()}"
    os.environ["HF_XET_CACHE"] = str(folder)
    return folder


XET_PREFIX = "bakery-xet-"


def remove_dead_xet_caches(tmp: Path) -> list[Path]:
    """Remove the private HF_XET_CACHE folders in `tmp` (node-local) whose task process is gone
    (killed at its time limit, say); return them. Folders of live or foreign processes stay."""
    removed = []
    for folder in tmp.glob(f"{XET_PREFIX}*-*"):
        pid = folder.name.rsplit("-", 1)[1]
        if not pid.isdigit() or _process_exists(int(pid)):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True
