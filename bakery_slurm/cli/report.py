"""`bakery-slurm report`: the evaluation pivot and method ranking from the stored lm-eval results."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import click

from .. import fsutil
from ..errors import ConfigError
from ..eval_results import read_results, scores_now
from ..evaluation import expand_eval
from ..matrix import load_matrix
from ..report import Row, not_compared, pivot, ranking, render, to_csv
from . import cli

log = logging.getLogger(__name__)


@cli.command("report")
@click.argument("matrix", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--baseline", metavar="NAME|ID",
              help="Rank methods against this baseline: a name from [eval] baselines (each "
                   "cell against that baseline at its size and variant), or one baseline id. "
                   "Default: the first baseline.")
@click.option("--work", type=click.Path(file_okay=False, path_type=Path),
              help="Work folder (default: [paths] work of the matrix).")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the pivot as CSV (raw values and stderrs) to this file.")
@click.option("--markdown", "markdown_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the report as Markdown (the model card's layout) to this file.")
@click.option("--json", "as_json", is_flag=True,
              help="Print columns, rows, ranking and targets without results as JSON.")
def report(matrix: Path, baseline: str | None, work: Path | None, csv_path: Path | None,
           markdown_path: Path | None, as_json: bool) -> None:
    """Print the evaluation pivot (one row per evaluated cell and baseline, one column per task
    metric with its stderr) and the method ranking (mean delta against a baseline, per variant
    and overall), from the results `run-eval` stored in the work folder.

    \b
    Example:
        bakery-slurm report matrix.toml
        bakery-slurm report matrix.toml --baseline lora-nob --markdown eval.md --csv pivot.csv
    """
    loaded = load_matrix(matrix)
    targets = expand_eval(loaded)
    if not targets:
        raise ConfigError(f"{loaded.path}: eval: the matrix has no [eval] table")
    work = work or loaded.work_dir
    found, missing = read_results(targets, work)
    stale = [t.id for t in targets if t.id in found and not scores_now(t, found[t.id], work)]
    for target_id in stale:
        del found[target_id]
    rows = [Row.of(t, found[t.id]) for t in targets if t.id in found]
    if missing:
        log.warning("%d of %d eval targets have no results yet: %s", len(missing), len(targets),
                    ", ".join(missing))
    if stale:
        log.warning("%d eval targets have results of other eval settings or of an older "
                    "checkpoint only (left out until evaluated again): %s", len(stale),
                    ", ".join(stale))
    names = [b.name for b in loaded.spec.eval.baselines]
    chosen = baseline or (names[0] if names else None)
    if baseline is None and not any(r.kind == "baseline" and chosen in (r.id, r.label)
                                    for r in rows):
        chosen = None  # the default baseline has no results yet: the pivot only
    pending = {(t.size, t.variant) for t in targets
               if t.kind == "baseline" and chosen in (t.id, t.label) and t.id not in found}
    ranked = ranking(rows, chosen, pending) if chosen and rows else []
    unmatched = not_compared(rows, chosen, pending) if chosen and rows else {}
    columns = pivot(rows)
    if csv_path:
        fsutil.atomic_write_text(csv_path, to_csv(rows, columns))
    if markdown_path:
        fsutil.atomic_write_text(markdown_path, render(rows, ranked, markdown=True, not_compared=unmatched))
    if as_json:
        click.echo(json.dumps({
            "columns": columns,
            "rows": [{"target": r.id, "kind": r.kind, "size": r.size, "variant": r.variant,
                      "label": r.label,
                      "values": {c: {"value": v, "stderr": e} for c, (v, e) in r.values.items()},
                      "partial": {c: {"effective": n, "original": of}
                                  for c, (n, of) in r.partial.items()}}
                     for r in rows],
            "baseline": chosen, "ranking": ranked, "not_compared": unmatched,
            "missing": missing}, indent=2))
    else:
        click.echo(render(rows, ranked, markdown=False, not_compared=unmatched), nl=False)
