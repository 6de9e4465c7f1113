"""`bakery-slurm plan`: print the cells a matrix expands to. Reads only; never imports torch."""

from __future__ import annotations

from pathlib import Path

import click

from ..ledger import latest_attempt, load_ledger
from ..output import echo_rows, output_options
from .common import LEDGER_NAME, selected_cells
from . import cli

COLUMNS = ["id", "method", "parameters", "base", "pinned"]


@cli.command()
@click.argument("matrix", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--only", metavar="GLOB", help="Only cells whose id matches GLOB, e.g. '4b-*'.")
@click.option("--ledger", "ledger_path", type=click.Path(dir_okay=False, path_type=Path),
              envvar="BAKERY_LEDGER",
              help=f"Ledger to read pinned commits from (env BAKERY_LEDGER; default: "
                   f"{LEDGER_NAME} beside MATRIX, if there is one).")
@output_options
def plan(matrix: Path, only: str | None, ledger_path: Path | None, fmt: str) -> None:
    """Show the cells MATRIX expands to, with their recipes, inputs and push target.

    Where the ledger has submitted a cell, its Hub inputs are shown with the commits its latest
    attempt was pinned to (`pins` in --json; the table lists them as `input@<12 hex>`).

    \b
    Example:
        bakery-slurm plan matrix.toml
        bakery-slurm plan matrix.toml --only '12b-*' --json
    """
    loaded, cells = selected_cells(matrix, only)
    ledger = load_ledger(ledger_path or loaded.root / LEDGER_NAME, missing_ok=True)
    rows = []
    for cell in cells:
        attempt = latest_attempt(ledger, cell.id)
        rows.append({**cell.as_dict(), "pins": attempt.pins if attempt else {}})
    if fmt == "table":
        rows = [{**row, "parameters": _summary(row["parameters"]),
                 "pinned": "; ".join(f"{k}@{v[:12]}" for k, v in row["pins"].items()) or "-"}
                for row in rows]
    echo_rows(rows, COLUMNS, fmt)


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
