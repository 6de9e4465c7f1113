"""`bakery-slurm run-eval`: evaluate one cell or baseline here with lm-eval. What an eval task
will execute."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from ..errors import ConfigError
from ..matrix import load_matrix
from . import cli
from .run_cell import parse_pins, task_process


@cli.command("run-eval")
@click.argument("matrix", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("target")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True, help="Where lm-eval runs the model; auto falls back to CPU.")
@click.option("--work", type=click.Path(file_okay=False, path_type=Path),
              help="Work folder (default: [paths] work of the matrix).")
@click.option("--pin", "pins", multiple=True, metavar="INPUT=COMMIT",
              help="A baseline reads this Hub input (`base` or its adapter's name) at this "
                   "commit (repeatable).")
@click.option("--force", is_flag=True,
              help="Evaluate even when results for this model and these settings exist.")
def run_eval(matrix: Path, target: str, device: str, work: Path | None,
             pins: tuple[str, ...], force: bool) -> None:
    """Score one cell or baseline of MATRIX with lm-evaluation-harness ([eval] in the matrix).

    TARGET is a cell id (scored on its verified output in the work folder: run the cell first)
    or a baseline id, <size>-<variant>/<baseline name>. lm-eval's results JSON is kept in
    <work>/cells/TARGET/eval/results.json; a rerun with the same model and settings keeps it.
    Prints a summary record (JSON); exits 1 when the evaluation fails.

    \b
    Example:
        bakery-slurm run-eval matrix.toml 4b-std/eng-nob__ties
        bakery-slurm run-eval matrix.toml 4b-std/lora-nob --device cpu
        bakery-slurm run-eval matrix.toml 4b-std/base --pin base=<40-hex commit>
    """
    with task_process():
        _run_eval(matrix, target, device, work, pins, force)


def _run_eval(matrix: Path, target: str, device: str, work: Path | None,
              pins: tuple[str, ...], force: bool = False) -> None:
    from ..evaluation import expand_eval, pin_target
    from ..stages.evaluate import run_eval as run

    loaded = load_matrix(matrix)
    if loaded.spec.runtime.offline:
        # Eval datasets come from the Hub cache too (`datasets` reads this at import).
        os.environ["HF_DATASETS_OFFLINE"] = "1"
    targets = {t.id: t for t in expand_eval(loaded)}
    if not targets:
        raise ConfigError(f"{loaded.path}: eval: the matrix has no [eval] table")
    if target not in targets:
        raise click.BadParameter(f"{target!r} is not an eval target of {loaded.path} "
                                 f"(targets: {', '.join(targets)})", param_hint="TARGET")
    record = run(pin_target(targets[target], parse_pins(pins)), work or loaded.work_dir, device=device,
                 offline=loaded.spec.runtime.offline, force=force)
    click.echo(json.dumps(record, indent=2))
