"""Submit cells as job arrays and record every attempt in the ledger (shared by submit/resubmit).

Cells run as merge arrays; their evaluations (`[eval]`) as eval arrays chained to them: each eval
task starts only when the merge task of its cell succeeded (`group_evals`), and is cancelled by
the scheduler when that one fails. Baselines, and cells whose merge already succeeded, wait for
nothing.

The order is what makes a crash recoverable: the intent (arrays with unique job names, one attempt
per cell) is saved under the ledger lock before any sbatch runs; each array's job id is confirmed
after its sbatch returns. An sbatch that definitely failed is rolled back from the ledger; a crash
in between leaves an UNCONFIRMED array that `status` recovers from sacct by its job name. An array
whose own files could not be written never reached sbatch: it is rolled back too.
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
from .evaluation import EvalTarget, target_inputs
from .fsutil import held_while_alive, make_folder
from .ledger import (
    ArrayRecord,
    Ledger,
    PlannedArray,
    all_arrays,
    array_name,
    confirm_array,
    forget_array,
    record_intent,
    submitting_path,
    update_ledger,
)
from .matrix import Cell, Matrix, ModelSource, Resources
from .pins import cell_inputs, input_pins
from .task_command import apptainer_prefix, cell_args, eval_args, launcher_script, task_argv

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
    if container == "apptainer":
        # Both are bound at their own paths, as `--bind SRC,...`: a ':' would be read as the
        # start of a destination and a ',' as the next bind.
        for key, folder in (("the matrix's folder", matrix.root), ("paths.work", matrix.work_dir)):
            if {",", ":"} & set(str(folder)):
                raise ConfigError(f"{matrix.path}: {key}: apptainer cannot bind a folder whose "
                                  f"path holds ',' or ':' (got {str(folder)!r}); move it")
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
    # An empty HF_TOKEN is set but not a token: the tasks would inherit it, and their HF_HOME has
    # no token file. Put the token found (it is HF_TOKEN's own value when that holds one) there.
    os.environ["HF_TOKEN"] = token


@dataclass(frozen=True)
class EvalGroup:
    """Eval targets that run as one array, and the merge task each of them waits for."""

    targets: list[EvalTarget]
    after: str | None = None
    after_indices: list[int] | None = None


def group_evals(targets: Sequence[EvalTarget], merge_arrays: Mapping[str, Sequence[str]],
                live: Mapping[str, tuple[str, int]], max_array_size: int) -> list[EvalGroup]:
    """Eval targets grouped into arrays, each chained to the merge its cell needs (pure).

    Parameters
    ----------
    merge_arrays
        Name -> cell ids in task order, of the merge arrays submitted along with these evals.
    live
        Cell id -> (array name, index) of a merge task from an earlier submission that has not
        ended: its eval waits for that one.

    Returns
    -------
    The eval arrays: for each merge array, one array whose task i waits for merge task i
    (`aftercorr`) when its targets are the merge array's first cells in order and share
    resources, else one single-task array per target waiting for its merge task (`afterok`);
    one per live merge task; then the rest (baselines, cells already merged), grouped by
    resources, waiting for nothing.
    """
    by_id = {t.id: t for t in targets}
    groups: list[EvalGroup] = []
    for name, cells in merge_arrays.items():
        chained = [by_id[c] for c in cells if c in by_id]
        if not chained:
            continue
        aligned = [t.id for t in chained] == list(cells[:len(chained)])
        if aligned and len({t.resources.model_dump_json() for t in chained}) == 1:
            groups.append(EvalGroup(chained, name, list(range(len(chained)))))
        else:
            groups += [EvalGroup([t], name, [list(cells).index(t.id)]) for t in chained]
    placed = {t.id for g in groups for t in g.targets}
    for target in targets:
        if target.id in live and target.id not in placed:
            name, index = live[target.id]
            groups.append(EvalGroup([target], name, [index]))
            placed.add(target.id)
    rest = [t for t in targets if t.id not in placed]
    return groups + [EvalGroup(group) for group in group_cells(rest, max_array_size)]


def plan_arrays(matrix: Matrix, cells: Sequence[Cell], executor: str, max_array_size: int,
                submission_id: str, pins: Mapping[str, str],
                evals: Sequence[EvalTarget] = (),
                live: Mapping[str, tuple[str, int]] | None = None,
                force_evals: bool = False) -> Planned:
    """Group `cells` into merge arrays and `evals` into eval arrays (`group_evals`), and build
    every task's command line (no I/O).

    `pins` maps a Hub source's key to the commit this submission reads it at; `live` is as in
    `group_evals`.
    """
    runtime = matrix.runtime
    container = resolve_container(matrix, executor)
    env = matrix.task_env(container)
    planned = Planned(arrays=[], cell_args=[], argvs=[], launchers=[], container=container)

    def add(array: PlannedArray, resources: Resources, args: list[list[str]]) -> None:
        # One array shares its resources, so its tasks share the container command too.
        prefix = (apptainer_prefix(runtime, env, matrix.path, matrix.work_dir,
                                   resources.gpus_per_node)
                  if container == "apptainer" else None)
        planned.arrays.append(array)
        planned.cell_args.append(args)
        planned.argvs.append([task_argv(prefix, env, a) for a in args])
        planned.launchers.append(launcher_script(prefix, runtime.pass_env) if prefix else None)

    def folder() -> str:
        return str(matrix.work_dir / "arrays" / array_name(submission_id, len(planned.arrays)))

    merge_arrays = {}
    for group in group_cells(cells, max_array_size):
        merge_arrays[array_name(submission_id, len(planned.arrays))] = [c.id for c in group]
        add(PlannedArray(executor=executor, folder=folder(), cells=[c.id for c in group],
                         resources=group[0].resources.model_dump(exclude_none=True)),
            group[0].resources,
            [cell_args(matrix.path, c.id, c.recipe_hash, matrix.work_dir,
                       input_pins(cell_inputs(c), pins)) for c in group])
    for group in group_evals(evals, merge_arrays, live or {}, max_array_size):
        resources = group.targets[0].resources
        add(PlannedArray(executor=executor, folder=folder(), cells=[t.id for t in group.targets],
                         resources=resources.model_dump(exclude_none=True), stage="eval",
                         after=group.after, after_indices=group.after_indices),
            resources,
            [eval_args(matrix.path, t.id, matrix.work_dir, input_pins(target_inputs(t), pins),
                       force_evals)
             for t in group.targets])
    return planned


def attempt_pins(owners: Sequence[Cell | EvalTarget],
                 inputs: Callable[..., Mapping[str, ModelSource]],
                 pins: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """Cell (or eval target) id -> {source key: commit} of its pinned Hub inputs, for the
    ledger; `inputs` gives an owner's inputs by name."""
    return {o.id: {s.key: pins[s.key] for s in inputs(o).values() if s.key in pins}
            for o in owners}


def submit_cells(ledger_path: Path, matrix: Matrix, cells: Sequence[Cell], executor: str, *,
                 evals: Sequence[EvalTarget] = (), live: Mapping[str, tuple[str, int]] | None = None,
                 pins: Mapping[str, str] | None = None, dry_run: bool = False,
                 force_evals: bool = False,
                 guard: Callable[[Ledger], tuple[list[Cell], list[EvalTarget]]] | None = None
                 ) -> list[SubmitRequest]:
    """Submit `cells` as merge arrays and `evals` as eval arrays chained to them (one sbatch
    each, merges first) and record them; return what was submitted.

    Parameters
    ----------
    evals:
        Eval targets to submit; one whose cell is among `cells` waits for that cell's merge task.
    live:
        Cell id -> (array name, index) of a merge task of an earlier submission still pending or
        running: the cell's eval in `evals` waits for it.
    pins:
        Hub source key -> the commit every task reads it at (`preflight.resolve_pins`); sources
        not in it are resolved by each task when it starts.
    guard:
        Called with the locked, freshly loaded ledger just before the intent is recorded; returns
        the cells and eval targets that may still be submitted (so two racing submits or
        resubmits submit each once).
    dry_run:
        Plan and return the requests; submit nothing and write nothing.
    force_evals:
        The eval tasks score their targets again even where results for the same model and
        settings exist (`run-eval --force`).
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

    def record(ledger: Ledger, chosen: Sequence[Cell], targets: Sequence[EvalTarget], **when):
        planned = plan_arrays(matrix, chosen, executor, max_size, submission_id, pins, targets,
                              live, force_evals)
        submission = record_intent(
            ledger, matrix_path=str(matrix.path), matrix_sha256=matrix.sha256,
            arrays=planned.arrays, recipe_hashes={c.id: c.recipe_hash for c in chosen},
            submission_id=submission_id, pins=attempt_pins(chosen, cell_inputs, pins),
            eval_hashes={t.id: t.settings_hash for t in targets},
            eval_pins=attempt_pins(targets, target_inputs, pins), **when)
        # The merge arrays an eval array waits for: planned here, or of an earlier submission.
        known = {a.name: a for a in [*all_arrays(ledger), *submission.arrays]}
        return _requests(matrix, planned, submission.arrays, known)

    if dry_run:
        return record(Ledger(), cells, evals)
    with held_while_alive(submitting_path(ledger_path, submission_id)):
        return _submit_recorded(ledger_path, matrix, runner, cells, evals, guard, record)


def _submit_recorded(ledger_path, matrix, runner, cells, evals, guard, record) -> list[SubmitRequest]:
    with update_ledger(ledger_path) as ledger:
        chosen, targets = guard(ledger) if guard else (list(cells), list(evals))
        if not chosen and not targets:
            return []
        _arrays_folder(matrix)  # under the lock: a ledger the user may not write is said first
        requests = record(ledger, chosen, targets, now=datetime.now(timezone.utc))
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
        except OSError as e:
            # Writing the array's own files failed (`Backend.submit`: before any sbatch): neither
            # this array nor the rest ever existed.
            _forget(ledger_path, requests[i:])
            raise ConfigError(f"{matrix.path}: paths.work: cannot write the files of array "
                              f"{request.array.name} in {request.array.folder}: {e.strerror or e} "
                              "(nothing was submitted for it)") from e
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


def _arrays_folder(matrix: Matrix) -> None:
    """Create <work>/arrays before the intent is recorded: a work folder that cannot be written
    is a config error, not an array left unconfirmed in the ledger."""
    folder = matrix.work_dir / "arrays"
    try:
        make_folder(folder)
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as e:
        raise ConfigError(f"{matrix.path}: paths.work: cannot create array folders in {folder}: "
                          f"{e.strerror or e} (got {matrix.spec.paths.work!r})") from None


def _forget(ledger_path: Path, requests: Sequence[SubmitRequest]) -> None:
    with update_ledger(ledger_path) as ledger:
        for request in requests:
            # An eval array went already with the merge array it waits for.
            if any(a.name == request.array.name for a in all_arrays(ledger)):
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


def _requests(matrix: Matrix, planned: Planned, arrays: list[ArrayRecord],
              known: Mapping[str, ArrayRecord]) -> list[SubmitRequest]:
    runtime = matrix.spec.runtime
    return [SubmitRequest(array=array, cell_args=args, argvs=argvs,
                          fixed_env=matrix.task_env(planned.container),
                          launcher=launcher, pass_env=list(runtime.pass_env),
                          container=planned.container, parallelism=matrix.spec.array_parallelism,
                          resources=Resources.model_validate(array.resources),
                          after=known[array.after] if array.after else None)
            for array, args, argvs, launcher in zip(arrays, planned.cell_args, planned.argvs,
                                                    planned.launchers)]
