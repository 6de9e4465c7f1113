"""`bakery-slurm demo`: the whole tool on tiny offline models, on this machine, in a minute."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from .. import fsutil
from ..ledger import load_ledger
from ..matrix import expand, load_matrix
from ..output import echo_rows
from ..pipeline import CellPaths, read_result
from ..cell_status import COMPLETED
from ..submission import submit_cells
from ..templating import render
from ..resubmit_policy import is_live
from ..status_snapshot import snapshot
from . import EXIT_FAILED, cli
from .submit import ledger_and_snapshot, skip_done_or_live, still_as_judged

POLL_S = 1.0
COLUMNS = ["cell", "state", "bake_s", "merge_s", "verify_s", "device", "published"]


@cli.command()
@click.argument("folder", required=False, default="bakery-demo",
                type=click.Path(file_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="Also run cells already completed and published "
              "by an earlier run in FOLDER.")
def demo(folder: Path, force: bool) -> None:
    """Build tiny Gemma 3 bases and LoRA adapters offline, then bake, merge, verify and publish
    every cell of a 6-cell matrix with the local executor, into FOLDER (default ./bakery-demo).

    The tasks run exactly the command SLURM array tasks run (`run-cell`); results go to a `dir:`
    target at FOLDER/published, loadable with
    AutoModelForCausalLM.from_pretrained(FOLDER/published, subfolder=CELL).

    Run again in the same FOLDER, it skips cells as `submit` does (already published, unless
    --force, or still running from an earlier, interrupted run: it waits for those) and prints
    the table. Ctrl-C stops the waiting, not the cells: `bakery-slurm cancel` stops them.

    \b
    Example:
        bakery-slurm demo
        bakery-slurm status --ledger bakery-demo/bakery-ledger.json
    """
    from ..tiny import build_demo_models

    folder = folder.resolve()
    click.echo(f"building tiny models in {folder / 'models'}", err=True)
    build_demo_models(folder / "models")
    matrix_path = folder / "matrix.toml"
    if not matrix_path.exists():
        fsutil.atomic_write_text(matrix_path, render("demo_matrix.toml.j2"))
    matrix = load_matrix(matrix_path)
    ledger_path = folder / "bakery-ledger.json"
    # Run again in the same folder, the demo submits what `submit` would: not the cells already
    # published, nor those a first run (perhaps interrupted) still runs; it waits for those.
    ledger, snap = ledger_and_snapshot(ledger_path)
    cells, skipped, seen = skip_done_or_live(expand(matrix), ledger, snap, matrix.work_dir,
                                             force)
    for cell_id, reason in skipped:
        click.echo(f"skip {cell_id}: {reason}", err=True)
    if cells:
        submitted = submit_cells(ledger_path, matrix, cells, "local",
                                 guard=still_as_judged(cells, seen))
        click.echo(f"submitted {sum(len(r.array.cells) for r in submitted)} cells to the local "
                   "executor", err=True)
    click.echo("waiting for the cells to end", err=True)
    try:
        while True:
            snap = snapshot(ledger_path, load_ledger(ledger_path))
            if not any(is_live(s.state) for s in snap.statuses):
                break
            time.sleep(POLL_S)
    except KeyboardInterrupt:
        # The cells run in detached supervisors, which outlive this process.
        click.echo(f"\nthe cells keep running: `bakery-slurm demo {folder}` waits for them again "
                   f"(submitting none twice); `bakery-slurm cancel --ledger {ledger_path}` stops "
                   "them", err=True)
        raise click.Abort() from None
    rows = []
    for s in snap.statuses:
        result = read_result(CellPaths(matrix.work_dir, s.cell)) or {"stages": {}}
        stages = result["stages"]
        rows.append({
            "cell": s.cell, "state": s.state,
            **{f"{name}_s": stages.get(name, {}).get("seconds") for name in ("bake", "merge", "verify")},
            "device": stages.get("merge", {}).get("device"),
            "published": stages.get("push", {}).get("target"),
        })
    echo_rows(rows, COLUMNS, "table")
    if any(s.state != COMPLETED for s in snap.statuses):
        click.echo(f"some cells failed: bakery-slurm logs CELL --stderr --ledger {ledger_path}",
                   err=True)
        sys.exit(EXIT_FAILED)
    click.echo(f"all {len(rows)} cells published under {matrix.push_target.location}", err=True)
