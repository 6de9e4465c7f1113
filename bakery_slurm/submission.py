"""Submit cells as job arrays and record every attempt in the ledger (shared by submit/resubmit).

The order is what makes a crash recoverable: the intent (arrays with unique job names, one attempt
per cell) is saved under the ledger lock before any sbatch runs; each array's job id is confirmed
after its sbatch returns. An sbatch that definitely failed is rolled back from the ledger; a crash
in between leaves an UNCONFIRMED array that `status` recovers from sacct by its job name.
"""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

from .container import task_argv
from .errors import ConfigError, SchedulerError, SchedulerMissing
from .executors import DEFAULT_MAX_ARRAY_SIZE, SubmitRequest, backend, group_cells
from .ledger import (
    ArrayRecord,
    Ledger,
    PlannedArray,
    array_name,
    confirm_array,
    forget_array,
    record_intent,
    update_ledger,
)
from .matrix import Cell, Matrix, Resources

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Planned:
    """Arrays as planned (not yet named in a ledger) and each one's task commands."""

    arrays: list[PlannedArray]
    argvs: list[list[list[str]]]
    container: str


def resolve_container(matrix: Matrix, executor: str) -> str:
    """The container runtime for tasks on `executor`; apptainer needs an image."""
    runtime = matrix.spec.runtime
    container = runtime.resolve(executor)
    if container == "apptainer" and not runtime.image:
        raise ConfigError(f"{matrix.path}: runtime.image: container 'apptainer' needs the path of "
                          f"the .sif image (got {runtime.image!r})")
    return container


def export_hub_token(cells: Sequence[Cell]) -> None:
    """Make the Hub token reach the tasks, or refuse before any sbatch.

    Tasks see environment variables only (SLURM exports ours; the local executor inherits them):
    a token kept in the login node's token file is read and put in this process's environment,
    never written anywhere. Without any token, cells pushing to the Hub would bake and merge for
    hours and then fail at push.
    """
    if not any(cell.push.kind == "hub" for cell in cells):
        return
    from huggingface_hub import get_token

    token = get_token()
    if token is None:
        raise ConfigError("the cells push to the Hub, but no Hub token was found: set HF_TOKEN or "
                          "log in with `hf auth login` on this machine")
    os.environ.setdefault("HF_TOKEN", token)


def plan_arrays(matrix: Matrix, cells: Sequence[Cell], executor: str, max_array_size: int,
                submission_id: str) -> Planned:
    """Group `cells` into arrays and build every task's command line (no I/O)."""
    runtime = matrix.spec.runtime
    container = resolve_container(matrix, executor)
    arrays, argvs = [], []
    for n, group in enumerate(group_cells(cells, max_array_size)):
        folder = matrix.work_dir / "arrays" / array_name(submission_id, n)
        arrays.append(PlannedArray(
            executor=executor, folder=str(folder), cells=[c.id for c in group],
            resources=group[0].resources.model_dump(exclude_none=True)))
        argvs.append([task_argv(runtime, container, matrix.path, c.recipe_hash, c.id,
                                matrix.work_dir, c.resources.gpus_per_node) for c in group])
    return Planned(arrays=arrays, argvs=argvs, container=container)


def submit_cells(ledger_path: Path, matrix: Matrix, cells: Sequence[Cell], executor: str, *,
                 dry_run: bool = False,
                 guard: Callable[[Ledger], list[Cell]] | None = None) -> list[SubmitRequest]:
    """Submit `cells` as arrays (one sbatch each) and record them; return what was submitted.

    Parameters
    ----------
    guard:
        Called with the locked, freshly loaded ledger just before the intent is recorded; returns
        the cells that may still be submitted (resubmit uses it so two racing resubmits submit
        each cell once).
    dry_run:
        Plan and return the requests; submit nothing and write nothing.
    """
    resolve_container(matrix, executor)  # a config error must come before any lock or file
    if not dry_run:
        export_hub_token(cells)
    runner = backend(executor)
    try:
        max_size = runner.max_array_size()
    except SchedulerError:
        if not dry_run:
            raise
        log.warning("cannot read MaxArraySize; planning with SLURM's default %d",
                    DEFAULT_MAX_ARRAY_SIZE)
        max_size = DEFAULT_MAX_ARRAY_SIZE
    submission_id = uuid.uuid4().hex
    recipe_hashes = {c.id: c.recipe_hash for c in cells}
    if dry_run:
        planned = plan_arrays(matrix, cells, executor, max_size, submission_id)
        submission = record_intent(Ledger(), matrix_path=str(matrix.path),
                                   matrix_sha256=matrix.sha256, arrays=planned.arrays,
                                   recipe_hashes=recipe_hashes, submission_id=submission_id)
        return _requests(matrix, planned, submission.arrays)
    with update_ledger(ledger_path) as ledger:
        chosen = guard(ledger) if guard else list(cells)
        if not chosen:
            return []
        planned = plan_arrays(matrix, chosen, executor, max_size, submission_id)
        submission = record_intent(ledger, matrix_path=str(matrix.path),
                                   matrix_sha256=matrix.sha256, arrays=planned.arrays,
                                   recipe_hashes=recipe_hashes, now=datetime.now(timezone.utc),
                                   submission_id=submission_id)
    requests = _requests(matrix, planned, submission.arrays)
    for i, request in enumerate(requests):
        try:
            job_id = runner.submit(request)
        except SchedulerError as e:
            job_id = _accepted_anyway(runner, request, e)
            if not job_id:
                # Arrays not yet handed to sbatch never existed, and neither did this one if the
                # queue does not have it. If the queue could not be asked (None), it stays
                # unconfirmed: `status` finds it by name later, or calls it LOST.
                _forget(ledger_path, requests[i + 1:] + ([request] if job_id == "" else []))
                if job_id is None:
                    raise SchedulerError(
                        f"{e}; array {request.array.name} may have been accepted: the ledger keeps "
                        "it unconfirmed, and `bakery-slurm status` finds it by name or calls it "
                        "LOST") from e
                raise
            log.warning("sbatch reported a failure for array %s, but the controller has it as "
                        "job %s: recorded it (%s)", request.array.name, job_id, e)
        except BaseException:
            # Ctrl-C mid-sbatch: this array stays unconfirmed (`status` finds it by name, or calls
            # it LOST); the ones not yet handed to sbatch never existed.
            _forget(ledger_path, requests[i + 1:])
            raise
        with update_ledger(ledger_path) as ledger:
            confirm_array(ledger, request.array.name, job_id)
        request.array.job_id = job_id
        log.info("submitted array %s as job %s (%d cells)", request.array.name, job_id,
                 len(request.argvs))
    return requests


def _forget(ledger_path: Path, requests: Sequence[SubmitRequest]) -> None:
    with update_ledger(ledger_path) as ledger:
        for request in requests:
            forget_array(ledger, request.array.name)


def _accepted_anyway(runner, request: SubmitRequest, error: SchedulerError) -> str | None:
    """The job id of an array whose sbatch failed after the controller accepted it (a socket
    timeout on the reply, say): found in the queue by its unique job name. "" when the queue
    surely does not have it, None when the queue could not be asked."""
    try:
        found = runner.find_by_name(request.array.name)
    except SchedulerMissing:
        return ""  # no squeue here: no SLURM controller took anything from this machine
    except SchedulerError as lookup:
        log.warning("sbatch failed for array %s (%s) and squeue could not be asked whether the "
                    "controller accepted it anyway: %s", request.array.name, error, lookup)
        return None
    return found or ""


def _requests(matrix: Matrix, planned: Planned, arrays: list[ArrayRecord]) -> list[SubmitRequest]:
    return [SubmitRequest(array=array, argvs=argvs, pass_env=list(matrix.spec.runtime.pass_env),
                          container=planned.container, parallelism=matrix.spec.array_parallelism,
                          resources=Resources.model_validate(array.resources),
                          host_python=matrix.spec.runtime.host_python)
            for array, argvs in zip(arrays, planned.argvs)]
