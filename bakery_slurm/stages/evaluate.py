"""evaluate: score one eval target with lm-evaluation-harness and keep lm-eval's results JSON.

A cell is scored on its verified output in the work folder (`cells/<id>/final`, the folder
verify checked; the push need not have happened); a baseline on its base, with its adapter
attached unmerged through lm-eval's `peft=` model argument. lm-eval runs through its Python API
(`simple_evaluate`, model `hf`). Its results JSON (lm-eval's version, each task's version,
n-shot, configs, results) is written atomically to `cells/<id>/eval/results.json` with a `bakery`
block added: the target, the model's identity, the eval settings, the device, and the SLURM task
that wrote it (`status` reads a record as an attempt's by it). A rerun with the same model and
settings keeps it and evaluates nothing. A failed eval writes `cells/<id>/eval/failed.json` (the
error, when, the task), which the next successful one removes.

Task YAMLs from `[eval] include_path` often name their data files relatively; `datasets` reads
such paths from the working directory, so lm-eval runs with the include folder as working
directory.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from .. import fsutil
from ..errors import BakeryError, StageError
from ..evaluation import (EvalTarget, eval_dir, failure_path, read_eval_record, results_path,
                          verified_output)
from ..gc import in_use
from ..pipeline import CellPaths, now, slurm_task
from .merge import choose_device

log = logging.getLogger(__name__)


def run_eval(target: EvalTarget, work: Path, device: str = "auto",
             offline: bool = False, force: bool = False) -> dict[str, Any]:
    """Evaluate `target` (or keep its results when model and settings are unchanged); return a
    summary record (target, status, device, seconds, results path).

    A cell's eval holds the cell's run lock shared while it reads `final`: a run-cell of the
    same cell (which holds it exclusively) may otherwise merge again and replace that folder
    under it. Shared, as it only reads; its own eval lock keeps two evals of a target apart.

    Raises
    ------
    StageError
        The cell has no verified output, a source is missing, or lm-eval failed.
    BakeryError
        Another process is evaluating this target, or running this cell, right now.
    """
    work = Path(work)
    lock = eval_dir(work, target.id) / ".run.lock"
    cell_lock = CellPaths(work, target.id).lock
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(fsutil.locked(lock, blocking=False))
        except fsutil.LockBusy:
            raise BakeryError(f"{target.id}: another task is evaluating this target ({lock})") from None
        if target.kind == "cell":
            try:
                held.enter_context(fsutil.locked(cell_lock, blocking=False, shared=True))
            except fsutil.LockBusy:
                raise BakeryError(f"{target.id}: a task is running this cell ({cell_lock}): "
                                  "evaluate it when that run has ended") from None
        held.enter_context(in_use(work, target.id))
        return _run(target, work, device, offline, force)


def _run(target: EvalTarget, work: Path, device: str, offline: bool,
         force: bool = False) -> dict[str, Any]:
    try:
        summary = _evaluate(target, work, device, offline, force)
    except Exception as e:  # a StageError, or writing the results failed (disk full, ...)
        try:
            fsutil.atomic_write_json(failure_path(work, target.id),
                                     {"error": str(e), "finished": now(), "task": slurm_task()})
        except OSError as unwritten:  # the eval's own error is the one to report
            log.warning("%s: could not record the failure: %s", target.id, unwritten)
        raise
    failure_path(work, target.id).unlink(missing_ok=True)
    return summary


def _evaluate(target: EvalTarget, work: Path, device: str, offline: bool,
              force: bool = False) -> dict[str, Any]:
    start = time.monotonic()
    out = results_path(work, target.id)
    try:
        model, adapter, inputs = _model(target, work, offline)
        previous = read_eval_record(work, target.id)
        if (not force and previous.get("inputs") == inputs
                and previous.get("settings_hash") == target.settings_hash):
            log.info("%s: eval skipped (results for this model and these settings exist)", target.id)
            # Say when they were last found current: without accounting, `status` tells by it
            # that this task ran (and succeeded).
            kept = json.loads(out.read_text())
            kept["bakery"].update(checked=now(), task=slurm_task())
            fsutil.atomic_write_text(out, json.dumps(kept, indent=2) + "\n")
            return {"target": target.id, "status": "skipped", "device": previous.get("device"),
                    "seconds": round(time.monotonic() - start, 3), "results": str(out)}
        chosen, reason = choose_device(device)
        log.info("%s: eval started on %s (%s)", target.id, chosen, ", ".join(target.tasks))
        results = _simple_evaluate(target, model, adapter, chosen)
    except BakeryError as e:
        raise StageError(target.id, "eval", str(e)) from e
    except Exception as e:  # lm-eval, datasets and transformers raise anything
        raise StageError(target.id, "eval", f"{type(e).__name__}: {e}") from e
    from lm_eval.utils import handle_non_serializable  # imported above, by _simple_evaluate

    seconds = round(time.monotonic() - start, 3)
    results["bakery"] = {"target": target.id, "kind": target.kind, "inputs": inputs,
                         "settings": target.settings, "settings_hash": target.settings_hash,
                         "device": chosen, "fallback_reason": reason, "seconds": seconds,
                         # Which SLURM task wrote them: how `status` tells this attempt's.
                         "finished": now(), "task": slurm_task()}
    fsutil.atomic_write_text(out, json.dumps(results, indent=2, default=handle_non_serializable)
                             + "\n")
    log.info("%s: eval done in %.1f s", target.id, seconds)
    return {"target": target.id, "status": "done", "device": chosen, "fallback_reason": reason,
            "seconds": seconds, "results": str(out)}


def _model(target: EvalTarget, work: Path,
           offline: bool) -> tuple[Path, Path | None, dict[str, Any]]:
    """(model folder, adapter folder or None, the identity of what is scored)."""
    if target.kind == "cell":
        checked = verified_output(work, target.id)
        if checked is None:
            raise BakeryError(f"no verified output in {CellPaths(work, target.id).final}: run the "
                              f"cell first (bakery-slurm run-cell)")
        return CellPaths(work, target.id).final, None, {"final_sha256": checked}
    from ..sources import fetch

    hashes = CellPaths(work, target.id).cache / "hashes"
    base = fetch(target.base, hash_cache=hashes, offline=offline)
    inputs: dict[str, Any] = {"base": base.identity}
    if target.adapter is None:
        return base.path, None, inputs
    name, source = target.adapter
    adapter = fetch(source, hash_cache=hashes, offline=offline)
    return base.path, adapter.path, {**inputs, "adapter": {name: adapter.identity}}


def _simple_evaluate(target: EvalTarget, model: Path, adapter: Path | None,
                     device: str) -> dict[str, Any]:
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise BakeryError(f"lm-eval is not installed here ({e}): install bakery-slurm with its "
                          f"eval extra, pip install 'bakery-slurm[eval]'") from None

    manager = TaskManager(include_path=target.include_path)
    model_args = {"pretrained": str(model), "dtype": target.dtype}
    if adapter is not None:
        model_args["peft"] = str(adapter)
    with contextlib.chdir(target.include_path or Path.cwd()):
        tasks = [_with_fewshot(manager, task, target.num_fewshot[task])
                 if task in target.num_fewshot else task for task in target.tasks]
        return lm_eval.simple_evaluate(
            model="hf", model_args=model_args, tasks=tasks, task_manager=manager,
            limit=target.limit, batch_size=target.batch_size, device=device, log_samples=False)


def _with_fewshot(manager: Any, name: str, shots: int) -> Any:
    """The task (or group) `name` with every task in it set to `shots` few-shot examples.

    simple_evaluate's own `num_fewshot` is one number for every task (and leaves tasks whose
    YAML says 0 alone); the matrix gives it per task, so it is set on the loaded tasks."""
    loaded = manager.load([name])
    for task in loaded["tasks"].values():
        task.set_config(key="num_fewshot", value=shots)
    return loaded["groups"].get(name) or loaded["tasks"][name]
