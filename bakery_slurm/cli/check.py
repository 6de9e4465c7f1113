"""`bakery-slurm check`: the checks `submit` runs before any sbatch, alone."""

from __future__ import annotations

from pathlib import Path

import click

from ..evaluation import baseline_carriers, expand_eval
from ..executors import resolve_executor
from ..matrix import select
from ..output import echo_rows, output_options
from ..preflight import preflight, raise_problems
from ..submission import resolve_container
from .common import selected_cells
from . import cli

COLUMNS = ["input", "commit"]


@cli.command()
@click.argument("matrix", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--only", metavar="GLOB", help="Only cells whose id matches GLOB, e.g. '4b-*'.")
@click.option("--executor", type=click.Choice(["auto", "slurm", "local"]), default="auto",
              show_default=True, help="The executor whose runtime to check (as for submit).")
@output_options
def check(matrix: Path, only: str | None, executor: str, fmt: str) -> None:
    """Check that the cells of MATRIX can start: image, apptainer, inputs, token, variables.

    Checks the image file (readable) and apptainer where the runtime needs them; every local
    input folder; every Hub base and adapter, the [eval] baselines' too (repo, revision,
    subfolder: resolved to the commit a submit now would pin, or read from the Hub cache when
    the runtime is offline); when it is, that prefetch loaded the dataset of each [eval] task
    into the datasets cache (a task reading local data files needs none); that the
    Hub token may write to (or create) the push repo; and that the variables in
    [runtime] require_env are set. Prints each Hub input with its commit; exits 2 naming every
    problem with its matrix key and value.

    \b
    Example:
        bakery-slurm check matrix.toml
        bakery-slurm check matrix.toml --only '12b-*' --json
    """
    loaded, cells = selected_cells(matrix, only, or_baselines=True)
    kind = resolve_executor(executor)
    # The [eval] baselines' inputs too (a baseline at a size and variant without cells reads a
    # base no cell does), and offline the eval tasks' datasets, as submit checks them.
    targets = select(expand_eval(loaded, cells), only)
    checked = cells + [c for c in baseline_carriers(loaded, targets) if c not in cells]
    report = preflight(loaded, checked, kind, container=resolve_container(loaded, kind),
                       evals=targets)
    for note in report.notes:
        click.echo(f"note: {note}", err=True)
    raise_problems(loaded, report)
    rows = [{"input": key, "commit": commit} for key, commit in sorted(report.pins.items())]
    echo_rows(rows, COLUMNS, fmt)
    click.echo(f"ok: {len(cells)} cell(s) of {loaded.path} can be submitted", err=True)
