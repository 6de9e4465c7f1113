"""`bakery-slurm push`: publish verified cells from the login node. Never reruns a stage."""

from __future__ import annotations

from pathlib import Path

import click

from ..login_push import push_verified, refresh_cards
from ..output import echo_rows, output_options
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
@click.option("--cards", is_flag=True,
              help="Publish the cards of cells published already, with the eval results in the "
                   "work folder (model-index, the root card's evaluation); only README.md files.")
@output_options
def push(matrix: Path, only: str | None, work: Path | None, dry_run: bool, cards: bool,
         fmt: str) -> None:
    """Publish the cells of MATRIX that are verified but not published, with the root card.

    For cells whose push failed, and for every cell when `[push] defer = true` makes tasks stop
    after verify. Their prepared folders are uploaded as they are, many cells per commit (the Hub
    allows a repo about 128 commits an hour); nothing is baked or merged again. Their cards are
    rendered again with the eval results in the work folder that scored their checkpoint. With
    --cards, only the cards of the cells published already are (for evals that ran after the
    push). Exits 1 when the target refuses; the cells stay ready for the next try.

    \b
    Example:
        bakery-slurm push matrix.toml --dry-run
        bakery-slurm push matrix.toml --only '12b-*'
        bakery-slurm push matrix.toml --cards
    """
    loaded, cells = selected_cells(matrix, only)
    publish = refresh_cards if cards else push_verified
    rows = publish(cells, work or loaded.work_dir, loaded.push_target,
                   CardContext.of_matrix(loaded, work), dry_run=dry_run)
    echo_rows(rows, COLUMNS, fmt)
    done = sum(row["action"].startswith(("published", "would publish")) for row in rows)
    click.echo(f"{'would publish' if dry_run else 'published'} {done} {'card' if cards else 'cell'}"
               f"(s) to {loaded.push_target}", err=True)
