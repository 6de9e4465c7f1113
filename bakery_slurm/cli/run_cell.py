"""`bakery-slurm run-cell`: run one cell's pipeline here. What every array task executes."""

from __future__ import annotations

import json
import os
import signal
import socket
from pathlib import Path

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
    from ..pipeline import run_cell as run

    _task_environment()
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
    result = run(cell, work or loaded.work_dir, device=device, offline=loaded.spec.runtime.offline)
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


def _task_environment() -> None:
    """Per-task settings: no progress bars in logs, and a private HF_XET_CACHE (concurrent tasks
    sharing one have corrupted it) unless the user chose one."""
    # SLURM's USR2 warning before the time limit (see task.run_task) may reach us through
    # apptainer even where the host-side task ignored it: the default action would kill the cell
    # early, and its end would read FAILED instead of TIMEOUT.
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "HF_XET_CACHE" not in os.environ:
        task = (os.environ.get("SLURM_ARRAY_JOB_ID", "") + "_" + os.environ.get("SLURM_ARRAY_TASK_ID", "")
                if "SLURM_ARRAY_JOB_ID" in os.environ
                else f"{socket.gethostname()}-{os.getpid()}")
        os.environ["HF_XET_CACHE"] = os.path.join(os.environ.get("TMPDIR", "/tmp"),
                                                  f"bakery-xet-{task}")
