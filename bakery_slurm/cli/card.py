"""`bakery-slurm card`: render the target's root model card for review, without pushing."""

from __future__ import annotations

from pathlib import Path

import click

from .. import fsutil
from ..matrix import REPO_ID, PushTarget, load_matrix
from ..rootcard import CardContext
from ..stages.push import make_target, root_renderer
from . import cli


@cli.command()
@click.argument("matrix", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--target", metavar="hub:OWNER/NAME|dir:FOLDER",
              help="Read the published cells here (default: [push] target of the matrix).")
@click.option("--write", "out", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the card to this file instead of printing it.")
@click.option("--work", type=click.Path(file_okay=False, path_type=Path),
              help="Work folder whose eval results fill the evaluation section (default: "
                   "[paths] work of the matrix).")
def card(matrix: Path, target: str | None, out: Path | None, work: Path | None) -> None:
    """Print the root README.md that the next push would write: rendered from the records of
    the cells published at the target, titled and ordered by MATRIX, keeping the card's notes,
    with the eval results in the work folder (`bakery-slurm report`'s pivot and ranking) as its
    evaluation section. `bakery-slurm push --cards` publishes it.

    \b
    Example:
        bakery-slurm card matrix.toml
        bakery-slurm card matrix.toml --target dir:published --write README.preview.md
    """
    loaded = load_matrix(matrix, check_cells=False)
    push = _parse_target(target) if target else loaded.push_target
    published = make_target(push)
    text = root_renderer(push, CardContext.of_matrix(loaded, work))(
        published.published_records(), published.root_card())
    if out is None:
        click.echo(text, nl=False)
    else:
        fsutil.atomic_write_text(out, text)
        click.echo(f"wrote {out}", err=True)


def _parse_target(text: str) -> PushTarget:
    kind, _, location = text.partition(":")
    if kind == "dir" and location:
        return PushTarget("dir", str(Path(location).expanduser().resolve()))
    if kind == "hub" and REPO_ID.match(location):
        return PushTarget("hub", location)
    raise click.BadParameter(f"{text!r}: must be 'hub:<owner>/<name>' or 'dir:<folder>'",
                             param_hint="--target")
