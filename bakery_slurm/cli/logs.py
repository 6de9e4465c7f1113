"""`bakery-slurm logs`: print the log of one attempt of one cell."""

from __future__ import annotations

from pathlib import Path

import click

from ..executors import backend
from ..ledger import attempts, find_array, load_ledger
from .common import ledger_option
from . import cli


@cli.command()
@ledger_option
@click.argument("cell")
@click.option("--attempt", type=int, metavar="N", help="Attempt number, 1 = first (default: latest).")
@click.option("--stderr", "stderr", is_flag=True, help="Print the task's stderr instead of stdout.")
@click.option("--eval", "of_eval", is_flag=True,
              help="The log of CELL's evaluation (CELL may be a baseline id), not its merge.")
def logs(ledger_path: Path, cell: str, attempt: int | None, stderr: bool, of_eval: bool) -> None:
    """Print the log of CELL's latest attempt (or attempt N).

    \b
    Example:
        bakery-slurm logs 4b-std/eng-nob__ties
        bakery-slurm logs 4b-std/eng-nob__ties --attempt 1 --stderr
        bakery-slurm logs 4b-std/lora-nob --eval
    """
    ledger = load_ledger(ledger_path)
    history = attempts(ledger, cell, "eval" if of_eval else "merge")
    if not history:
        what = "eval attempt" if of_eval else "attempt"
        raise click.BadParameter(f"{cell!r} has no {what} in {ledger_path}", param_hint="CELL")
    number = len(history) if attempt is None else attempt
    if not 1 <= number <= len(history):
        raise click.BadParameter(f"{cell} has attempts 1..{len(history)}, not {number}",
                                 param_hint="--attempt")
    chosen = history[number - 1]
    array = find_array(ledger, chosen.array)
    if array.job_id is None:
        raise click.ClickException(f"attempt {number} of {cell} was never confirmed as submitted")
    path = backend(array.executor).log_paths(array, chosen.index)[1 if stderr else 0]
    try:
        text = Path(path).read_text(errors="replace")
    except FileNotFoundError:
        raise click.ClickException(f"no log yet at {path} (the task may not have started)") from None
    click.echo(f"== {path}", err=True)
    click.echo(text, nl=False)
