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
from typing import Callable, Mapping, Sequence

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
from .pins import cell_inputs, cell_pins
from .task_command import apptainer_prefix, cell_args, launcher_script, task_argv

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Planned:
    """Arrays as planned (not yet named in a ledger), each task's arguments and command, and the
    launcher of each array (None without a container)."""

    arrays: list[PlannedArray]
    cell_args: list[list[list[str]]]
    argvs: list[list[list[str]]]
    launchers: list[str | None]
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
                submission_id: str, pins: Mapping[str, str]) -> Planned:
    """Group `cells` into arrays and build every task's command line (no I/O).

    `pins` maps a Hub source's key to the commit this submission reads it at.
    """
    runtime = matrix.spec.runtime
    container = resolve_container(matrix, executor)
    env = matrix.task_env(container)
    arrays, args, argvs, launchers = [], [], [], []
    for n, group in enumerate(group_cells(cells, max_array_size)):
        folder = matrix.work_dir / "arrays" / array_name(submission_id, n)
        arrays.append(PlannedArray(
            executor=executor, folder=str(folder), cells=[c.id for c in group],
            resources=group[0].resources.model_dump(exclude_none=True)))
        # One array shares its resources, so its tasks share the container command too.
        gpus = group[0].resources.gpus_per_node
        prefix = (apptainer_prefix(runtime, env, matrix.path, matrix.work_dir, gpus)
                  if container == "apptainer" else None)
        args.append([cell_args(matrix.path, c.id, c.recipe_hash, matrix.work_dir,
                               cell_pins(c, pins)) for c in group])
        argvs.append([task_argv(prefix, env, a) for a in args[-1]])
        launchers.append(launcher_script(prefix, runtime.pass_env) if prefix else None)
    return Planned(arrays=arrays, cell_args=args, argvs=argvs, launchers=launchers,
                   container=container)


def attempt_pins(cells: Sequence[Cell], pins: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """Cell id -> {source key: commit} of the cell's pinned Hub inputs, for the ledger."""
    return {c.id: {s.key: pins[s.key] for s in cell_inputs(c).values() if s.key in pins}
            for c in cells}


def submit_cells(ledger_path: Path, matrix: Matrix, cells: Sequence[Cell], executor: str, *,
                 pins: Mapping[str, str] | None = None, dry_run: bool = False,
                 guard: Callable[[Ledger], list[Cell]] | None = None) -> list[SubmitRequest]:
    """Submit `cells` as arrays (one sbatch each) and record them; return what was submitted.

    Parameters
    ----------
    pins:
        Hub source key -> the commit every task reads it at (`preflight.resolve_pins`); sources
        not in it are resolved by each task when it starts.
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
    pins = dict(pins or {})
    recipe_hashes = {c.id: c.recipe_hash for c in cells}
    if dry_run:
        planned = plan_arrays(matrix, cells, executor, max_size, submission_id, pins)
        submission = record_intent(Ledger(), matrix_path=str(matrix.path),
                                   matrix_sha256=matrix.sha256, arrays=planned.arrays,
                                   recipe_hashes=recipe_hashes, submission_id=submission_id,
                                   pins=attempt_pins(cells, pins))
        return _requests(matrix, planned, submission.arrays)
    with update_ledger(ledger_path) as ledger:
        chosen = guard(ledger) if guard else list(cells)
        if not chosen:
            return []
        planned = plan_arrays(matrix, chosen, executor, max_size, submission_id, pins)
        submission = record_intent(ledger, matrix_path=str(matrix.path),
                                   matrix_sha256=matrix.sha256, arrays=planned.arrays,
                                   recipe_hashes=recipe_hashes, now=datetime.now(timezone.utc),
                                   submission_id=submission_id, pins=attempt_pins(chosen, pins))
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
    runtime = matrix.spec.runtime
    return [SubmitRequest(array=array, cell_args=args, argvs=argvs,
                          fixed_env=matrix.task_env(planned.container),
                          launcher=launcher, pass_env=list(runtime.pass_env),
                          container=planned.container, parallelism=matrix.spec.array_parallelism,
                          resources=Resources.model_validate(array.resources))
            for array, args, argvs, launcher in zip(arrays, planned.cell_args, planned.argvs,
                                                    planned.launchers)]
