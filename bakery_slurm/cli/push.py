"""`bakery-slurm push`: publish verified cells from the login node. Never reruns a stage."""

from __future__ import annotations

from pathlib import Path

import click

from ..login_push import push_verified
from ..output import format_rows, output_options
from ..rootcard import CardContext
from .common import selected_cells
from . import cli

COLUMNS = ["cell", "action"]


@cli.command()
@click.argument("matrix", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--only", metavar="GLOB", help="Only cells whose id matches GLOB, e.g. '4b-*'.")
@click.option("--work", type=click.Path(file_okay=False, path_type=Path),
              help="Work folder (default: [paths] work of the matrix).")
@click.option("--dry-run", is_flag=True, help="Show what would be published; publish nothing.")
@output_options
def push(matrix: Path, only: str | None, work: Path | None, dry_run: bool, fmt: str) -> None:
    """Publish the cells of MATRIX that are verified but not published, with the root card.

    For cells whose push failed, and for every cell when `[push] defer = true` makes tasks stop
    after verify. Their prepared folders are uploaded as they are, many cells per commit (the Hub
    allows a repo about 128 commits an hour); nothing is baked or merged again. Exits 1 when the
    target refuses; the cells stay ready for the next try.

    \b
    Example:
        bakery-slurm push matrix.toml --dry-run
        bakery-slurm push matrix.toml --only '12b-*'
    """
    loaded, cells = selected_cells(matrix, only)
    rows = push_verified(cells, work or loaded.work_dir, loaded.push_target,
                         CardContext.of_matrix(loaded), dry_run=dry_run)
    click.echo(format_rows(rows, COLUMNS, fmt))
    done = sum(row["action"].startswith(("published", "would publish")) for row in rows)
    click.echo(f"{'would publish' if dry_run else 'published'} {done} cell(s) to "
               f"{loaded.push_target}", err=True)
