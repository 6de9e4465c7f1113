"""`bakery-slurm plan`: print the cells a matrix expands to. Reads only; never imports torch."""

from __future__ import annotations

from pathlib import Path

import click

from ..matrix import expand, load_matrix, select
from ..output import format_rows, output_options
from . import cli

COLUMNS = ["id", "method", "parameters", "base"]


@cli.command()
@click.argument("matrix", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--only", metavar="GLOB", help="Only cells whose id matches GLOB, e.g. '4b-*'.")
@output_options
def plan(matrix: Path, only: str | None, fmt: str) -> None:
    """Show the cells MATRIX expands to, with their recipes, inputs and push target.

    \b
    Example:
        bakery-slurm plan matrix.toml
        bakery-slurm plan matrix.toml --only '12b-*' --json
    """
    loaded = load_matrix(matrix)
    cells = select(expand(loaded), only)
    if not cells:
        raise click.UsageError(f"--only {only!r} matches no cell of {loaded.path}")
    rows = [cell.as_dict() for cell in cells]
    if fmt == "table":
        rows = [{**row, "parameters": _summary(row["parameters"])} for row in rows]
    click.echo(format_rows(rows, COLUMNS, fmt))


def _summary(parameters: dict) -> str:
    """`density=0.5 weight=0.5`, or `weight=eng:0.3/nob:0.7` when adapters differ."""
    parts = []
    for name, value in parameters.items():
        if isinstance(value, dict):
            distinct = set(value.values())
            value = f"{distinct.pop():g}" if len(distinct) == 1 else "/".join(
                f"{k}:{v:g}" for k, v in value.items())
        parts.append(f"{name}={value}")
    return " ".join(parts)
