"""Options and helpers shared by the ledger commands (submit, status, resubmit, logs, cancel)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable

import click

from ..errors import ConfigError
from ..ledger import Ledger
from ..matrix import Cell, Matrix, expand, load_matrix, select
from ..cell_status import CellStatus
from ..status_snapshot import Snapshot

LEDGER_NAME = "bakery-ledger.json"
STATUS_COLUMNS = ["cell", "state", "eval", "exit_code", "elapsed", "node", "attempt", "task",
                  "detail", "log"]


def selected_cells(matrix: Path, only: str | None,
                   or_baselines: bool = False) -> tuple[Matrix, list[Cell]]:
    """The matrix and its cells matching `--only` (all without it); matching none is a usage
    error, unless `or_baselines` and the glob names an [eval] baseline (for the commands that
    also act on baselines: check, prefetch)."""
    from ..evaluation import expand_eval

    loaded = load_matrix(matrix)
    cells = select(expand(loaded), only)
    if not cells and or_baselines and select(expand_eval(loaded, []), only):
        return loaded, cells
    if not cells:
        what = ("no cell or [eval] baseline" if or_baselines and loaded.spec.eval is not None
                else "no cell")
        raise click.UsageError(f"--only {only!r} matches {what} of {loaded.path}")
    return loaded, cells


def preflight_option(f: Callable) -> Callable:
    """--no-preflight: for a login node that cannot reach the Hub."""
    return click.option(
        "--no-preflight", "no_preflight", is_flag=True,
        help="Skip the checks before sbatch (image, apptainer, Hub inputs, token, required "
             "variables); Hub inputs are then pinned from the Hub cache where it has them.")(f)


def ledger_option(f: Callable) -> Callable:
    """--ledger PATH (env BAKERY_LEDGER), default ./bakery-ledger.json."""
    return click.option(
        "--ledger", "ledger_path", type=click.Path(dir_okay=False, path_type=Path),
        envvar="BAKERY_LEDGER", default=LEDGER_NAME, show_default=True,
        help="The ledger file (env BAKERY_LEDGER); `submit` writes it beside the matrix.")(f)


@functools.lru_cache(maxsize=None)
def _push_root(matrix_path: str) -> str | None:
    try:
        return str(load_matrix(matrix_path, check_cells=False).push_target)
    except ConfigError:
        return None


def status_columns(snap: Snapshot) -> list[str]:
    """The status table's columns: `eval` only when the ledger has evaluations."""
    return STATUS_COLUMNS if snap.evals else [c for c in STATUS_COLUMNS if c != "eval"]


def status_rows(ledger: Ledger, snap: Snapshot) -> list[dict[str, Any]]:
    """One row per cell: its merge's state, exit code, elapsed, node, attempt, task id, detail
    (stage or failure reason), log and output, and its eval's state (`eval`, the rest of it as
    `eval_*` fields); then one row per baseline, with its eval only."""
    matrix_of = {array.name: submission.matrix_path
                 for submission in ledger.submissions for array in submission.arrays}
    evals = {s.cell: s for s in snap.evals}
    rows = []
    for s in snap.statuses:
        root = _push_root(matrix_of[s.array_name])
        rows.append({"cell": s.cell, **_task_fields(s, snap),
                     "output": f"{root}/{s.cell}" if root else None,
                     **_eval_fields(evals.pop(s.cell, None), snap)})
    rows += [{"cell": e.cell, "state": None, **_eval_fields(e, snap)} for e in evals.values()]
    for row in rows:
        if row.get("detail") is None and row.get("eval_detail"):
            row["detail"] = f"eval: {row['eval_detail']}"
    return rows


def _task_fields(s: CellStatus, snap: Snapshot) -> dict[str, Any]:
    from ..executors import backend

    array = snap.arrays[s.array_name]
    log = backend(array.executor).log_paths(array, s.index)[0] if s.array_job_id else None
    return {"state": s.state, "exit_code": s.exit_code, "elapsed": s.elapsed, "node": s.node,
            "attempt": s.attempt, "array_job_id": s.array_job_id, "index": s.index,
            "task": s.task_id, "executor": array.executor, "detail": s.detail,
            "log": str(log) if log else None}


def _eval_fields(s: CellStatus | None, snap: Snapshot) -> dict[str, Any]:
    if s is None:
        return {"eval": None}
    fields = _task_fields(s, snap)
    return {"eval": fields.pop("state"), **{f"eval_{k}": v for k, v in fields.items()}}
