"""The JSON ledger: what was submitted, as which arrays, and every attempt of every cell.

The ledger is the only memory bakery-slurm has between commands. It records, per submission, the
matrix it came from and its arrays (job name, job id, executor, resources, submitit folder, index ->
cell list, stage, and for an eval array the merge array it waits for), and per cell the list of its
merge attempts (and per eval target its eval attempts) in the order they were made. Attempts are keyed by
cell id and point at an array by its *name*: every (re)submission is a new array numbered from 0, so
an index alone means nothing, and the name exists before sbatch returns a job id.

Submitting is two steps so that a crash between them is recoverable: `record_intent` stores the
arrays with ``job_id=None`` (saved before sbatch runs), then `confirm_array` stores the job id sbatch
printed. An array left unconfirmed can be found again in sacct by its unique job name.

Reading is strict: a missing, unreadable, truncated or corrupt file, a newer ``schema_version`` or a
ledger whose attempts and arrays disagree raises `LedgerError` naming the file, and the file is left
as it was. Writing is atomic (`fsutil.atomic_write_json`), and `update_ledger` serialises
read-modify-write cycles between processes with a lock file beside the ledger.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Iterator, Literal, Mapping, Sequence

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import LedgerError
from .fsutil import atomic_write_json, locked

SCHEMA_VERSION = 3
"""The ledger layout this module writes; bump it on any change an older reader would refuse.
2 added `Attempt.pins` and `Attempt.cancelled`; 3 added eval arrays (`PlannedArray.stage`,
`after`, `after_indices`) and `Ledger.evals`. Older files read as they are (no pins, no cancels, no
evals), and are written back as version 3."""

Stage = Literal["merge", "eval"]

# How many validation errors a LedgerError quotes; the rest are counted, not listed.
_MAX_ERRORS_SHOWN = 5


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PlannedArray(_Model):
    """One job array as the submitter plans it, before it has a name or a job id.

    Attributes
    ----------
    executor
        ``"slurm"`` or ``"local"``.
    resources
        The scheduler options shared by every task (partition, gpus, time, ...).
    folder
        The submitit folder of the array (may contain submitit's ``%j``).
    cells
        Cell ids in task order: ``cells[i]`` runs as array index ``i`` (eval target ids in an
        eval array: a cell's id, or a baseline's).
    stage
        What its tasks run: ``"merge"`` (bake, merge, verify, push a cell) or ``"eval"`` (score a
        cell's verified output or a baseline with lm-eval).
    after, after_indices
        An eval array chained to a merge array: the merge array's name, and per task of this
        array the index of the merge task it waits for (it starts only once that one succeeded).
        Both None when the array waits for nothing.
    """

    executor: Literal["slurm", "local"]
    resources: dict[str, StrictStr | StrictInt]
    folder: str
    cells: list[str] = Field(min_length=1)
    stage: Stage = "merge"
    after: str | None = None
    after_indices: list[Annotated[int, Field(ge=0)]] | None = None

    @property
    def work(self) -> Path:
        """The work folder whose `cells/` its tasks write: `folder` is `<work>/arrays/<name>`."""
        return Path(self.folder).parent.parent

    @property
    def plain_job(self) -> bool:
        """A one-task SLURM array, which submitit submits as a plain job: SLURM knows its task by
        the job id alone (see `task_id`)."""
        return self.executor == "slurm" and len(self.cells) == 1

    @field_validator("cells")
    @classmethod
    def _cells_unique(cls, cells: list[str]) -> list[str]:
        # Two tasks of one array running the same cell would race on its output folder.
        duplicates = _repeated(cells)
        if duplicates:
            raise ValueError(f"cells listed more than once in one array: {', '.join(duplicates)}")
        return cells

    @model_validator(mode="after")
    def _chained_per_task(self) -> PlannedArray:
        if (self.after is None) != (self.after_indices is None):
            raise ValueError("after and after_indices go together")
        if self.after_indices is not None and len(self.after_indices) != len(self.cells):
            raise ValueError(f"after_indices has {len(self.after_indices)} entries for "
                             f"{len(self.cells)} tasks")
        if self.after is not None and self.stage != "eval":
            raise ValueError("only an eval array waits for another array")
        return self


class ArrayRecord(PlannedArray):
    """A `PlannedArray` once recorded: its unique job name, its job id once known, and when.

    Attributes
    ----------
    name
        Unique job name (``bakery-<submission id[:8]>-<n>``), passed to sbatch so that sacct can find
        the array by name if the job id was never recorded.
    job_id
        The array job id sbatch printed; None while the submission is not confirmed. Task ids are
        ``<job_id>_<index>``, so it may not contain ``_``.
    submitted
        When the intent was recorded (UTC), just before sbatch.
    """

    # Restricted to characters that survive `sacct --name=a,b,...` and a shell.
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    job_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9.-]+$")
    submitted: AwareDatetime

    def task_id(self, index: int) -> str | None:
        """Task `index` as the scheduler's commands take it (see `task_id`)."""
        return task_id(self.job_id, index, self.plain_job)


def task_id(job_id: str | None, index: int, plain_job: bool) -> str | None:
    """``<job_id>_<index>``, the job id alone for a plain job (`scontrol hold 8_0` is an invalid job
    id there), None while the job id is unconfirmed."""
    if job_id is None or plain_job:
        return job_id
    return f"{job_id}_{index}"


class Submission(_Model):
    """One `submit` or `resubmit` run: the matrix it read and the arrays it made."""

    id: str = Field(pattern=r"^[0-9a-f]{32}$")
    matrix_path: str
    matrix_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    created: AwareDatetime
    arrays: list[ArrayRecord] = Field(min_length=1)


class Attempt(_Model):
    """One run of one cell: which array (by name) and index ran it, when, with which recipe.

    Attributes
    ----------
    pins
        The commit each of its Hub inputs was pinned to, keyed by the source as the matrix names
        it (`ModelSource.key`); empty for local inputs, or when submitted without Hub access.
    cancelled
        When `bakery-slurm cancel` cancelled this attempt's task, None otherwise. SLURM keeps no
        accounting row for an array task cancelled before it started, so only this says what
        became of it.
    """

    array: str
    index: int = Field(ge=0)
    submitted: AwareDatetime
    recipe_hash: str
    pins: dict[str, Annotated[str, Field(pattern=r"^[0-9a-f]{40}$")]] = {}
    cancelled: AwareDatetime | None = None


class Ledger(_Model):
    """The whole ledger file.

    Attributes
    ----------
    schema_version
        `SCHEMA_VERSION` when written; a file of a later version is refused by `load_ledger`.
    submissions
        Every submission, oldest first.
    cells
        Cell id -> the attempts of its merge, oldest first. The list order, not the timestamps,
        decides which attempt is the latest: attempts are appended under the ledger lock, whereas
        clocks of different login nodes may disagree.
    evals
        Eval target id (a cell's or a baseline's) -> the attempts of its evaluation, oldest
        first: eval is a stage of its own, run and resubmitted apart from the merge.
    """

    schema_version: Literal[1, 2, 3] = SCHEMA_VERSION
    submissions: list[Submission] = []
    cells: dict[str, list[Attempt]] = {}
    evals: dict[str, list[Attempt]] = {}

    @model_validator(mode="after")
    def _attempts_match_arrays(self) -> Ledger:
        # Every array task must have exactly one attempt and every attempt must name the cell its
        # array lists at that index; otherwise status would report the wrong task for a cell.
        ids = [s.id for s in self.submissions]
        if len(set(ids)) != len(ids):
            raise ValueError("a submission id appears twice")
        arrays: dict[str, ArrayRecord] = {}
        for array in all_arrays(self):
            if array.name in arrays:
                raise ValueError(f"array name {array.name!r} appears twice")
            arrays[array.name] = array
        tasks: set[tuple[str, int]] = set()
        for stage, by_id in (("merge", self.cells), ("eval", self.evals)):
            for cell, cell_attempts in by_id.items():
                if not cell_attempts:
                    raise ValueError(f"{stage} {cell!r} has an empty attempt list")
                for attempt in cell_attempts:
                    array = arrays.get(attempt.array)
                    if array is None or array.stage != stage:
                        raise ValueError(f"{stage} {cell!r}: attempt names unknown {stage} array "
                                         f"{attempt.array!r}")
                    task = (attempt.array, attempt.index)
                    if attempt.index >= len(array.cells) or array.cells[attempt.index] != cell:
                        raise ValueError(f"{stage} {cell!r}: array {attempt.array!r} has no such "
                                         f"target at index {attempt.index}")
                    if task in tasks:
                        raise ValueError(f"array {attempt.array!r} index {attempt.index} is "
                                         "recorded twice")
                    tasks.add(task)
        for array in arrays.values():
            for index, cell in enumerate(array.cells):
                if (array.name, index) not in tasks:
                    raise ValueError(f"array {array.name!r} index {index} ({cell}) has no attempt "
                                     f"under {'cells' if array.stage == 'merge' else 'evals'}")
            if array.after is not None:
                merge = arrays.get(array.after)
                if merge is None or merge.stage != "merge":
                    raise ValueError(f"array {array.name!r} waits for unknown merge array "
                                     f"{array.after!r}")
                if max(array.after_indices or [0]) >= len(merge.cells):
                    raise ValueError(f"array {array.name!r} waits for a task {array.after!r} "
                                     "does not have")
        return self


def load_ledger(path: Path | str, *, missing_ok: bool = False) -> Ledger:
    """Read and validate the ledger at `path`.

    Parameters
    ----------
    path
        The ledger file.
    missing_ok
        Return an empty ledger when the file does not exist, instead of raising.

    Returns
    -------
    Ledger

    Raises
    ------
    LedgerError
        The file is missing (unless `missing_ok`), unreadable, not JSON (truncated or corrupt),
        written by a newer bakery-slurm, or inconsistent. The message names the file; the file is
        not touched.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        if missing_ok:
            return Ledger()
        raise LedgerError(f"{Path(path).resolve()}: no ledger at this path (nothing submitted with it "
                          "yet? `submit` writes it beside the matrix; pass --ledger or set "
                          "BAKERY_LEDGER)") from None
    except OSError as exc:
        raise LedgerError(f"{path}: cannot read the ledger: {exc.strerror or exc}") from exc
    untouched = "the file was left untouched; restore it from a backup or move it aside"
    try:
        data = json.loads(raw)
    # ValueError covers JSONDecodeError, UnicodeDecodeError and an over-long integer literal;
    # RecursionError a file of deeply nested brackets.
    except (ValueError, RecursionError) as exc:
        raise LedgerError(f"{path}: not valid JSON, the ledger is truncated or corrupt ({exc}); {untouched}") from exc
    if not isinstance(data, dict):
        raise LedgerError(f"{path}: the ledger must be a JSON object, found {type(data).__name__}; {untouched}")
    version = data.get("schema_version")
    # bool is an int subclass; `true` is not a version.
    if type(version) is not int:
        raise LedgerError(f"{path}: no integer schema_version (found {version!r}); {untouched}")
    if version > SCHEMA_VERSION:
        raise LedgerError(
            f"{path}: written by a newer bakery-slurm (schema_version {version}, this version reads "
            f"{SCHEMA_VERSION}); upgrade bakery-slurm. The file was left untouched."
        )
    try:
        return Ledger.model_validate(data)
    except ValidationError as exc:
        raise LedgerError(
            f"{path}: not a valid schema_version {version} ledger: {_summarise(exc)}; {untouched}"
        ) from exc


def save_ledger(path: Path | str, ledger: Ledger) -> None:
    """Validate `ledger` and write it to `path` atomically (temporary file, fsync, rename).

    Raises
    ------
    LedgerError
        The ledger is inconsistent (a bug in the caller); nothing is written, so the file on disk
        stays one that `load_ledger` accepts.
    """
    data = {**ledger.model_dump(mode="json"), "schema_version": SCHEMA_VERSION}
    try:
        # Mutations since loading bypassed validation; re-check exactly what will be read back.
        Ledger.model_validate(data)
    except ValidationError as exc:
        raise LedgerError(f"{path}: refusing to save an inconsistent ledger: {_summarise(exc)}") from exc
    atomic_write_json(Path(path), data)


@contextlib.contextmanager
def update_ledger(path: Path | str) -> Iterator[Ledger]:
    """Lock, load, let the caller mutate, and save the ledger at `path`.

    The exclusive lock on ``<path>.lock`` is held for the whole block, so concurrent updates from
    several processes (or nodes sharing the filesystem) are serialised and none is lost. A missing
    ledger starts empty. The ledger is saved only if the block finishes without an exception.

    Yields
    ------
    Ledger
        The loaded ledger, to be mutated in place.

    Raises
    ------
    LedgerError
        From `load_ledger` or `save_ledger`.
    """
    # The file a symlink names: its lock is beside it, and the atomic rename replaces it, not
    # the link (which would leave a private copy that no teammate sees).
    path = Path(path).resolve()
    with locked(path.with_name(path.name + ".lock")):
        ledger = load_ledger(path, missing_ok=True)
        yield ledger
        save_ledger(path, ledger)


def submitting_path(ledger_path: Path | str, submission_id: str) -> Path:
    """The file a submit holds (`fsutil.held_while_alive`) from recording its intent until its
    last sbatch returned: while it is held, that submission's unconfirmed arrays are not LOST."""
    ledger_path = Path(ledger_path).resolve()  # beside the file a symlink names, as its lock
    return ledger_path.with_name(f"{ledger_path.name}.submitting-{submission_id}")


def array_name(submission_id: str, n: int) -> str:
    """The job name of the `n`-th array of a submission: ``bakery-<submission_id[:8]>-<n>``."""
    return f"bakery-{submission_id[:8]}-{n}"


def record_intent(
    ledger: Ledger,
    *,
    matrix_path: str,
    matrix_sha256: str,
    arrays: Sequence[PlannedArray],
    recipe_hashes: Mapping[str, str],
    now: datetime | None = None,
    submission_id: str | None = None,
    pins: Mapping[str, Mapping[str, str]] | None = None,
    eval_hashes: Mapping[str, str] | None = None,
    eval_pins: Mapping[str, Mapping[str, str]] | None = None,
) -> Submission:
    """Append a submission whose arrays are not yet submitted, and one attempt per task.

    Save the ledger after this and before running sbatch, then call `confirm_array` per array.

    Parameters
    ----------
    ledger
        Mutated in place.
    matrix_path, matrix_sha256
        The matrix file the cells came from and its SHA-256 (hex).
    arrays
        The arrays to submit; a cell (an eval target) may appear in only one merge (eval) array.
        An eval array may wait for a merge array planned here (by name) or already recorded.
    recipe_hashes
        Cell id -> hash of its rendered recipe, for every cell in the merge `arrays`.
    now
        The time to record (default: the current UTC time).
    submission_id
        32 hex digits (default: a fresh uuid4 whose array names are unused in `ledger`).
    pins
        Cell id -> {source key: commit} of its Hub inputs (`Attempt.pins`).
    eval_hashes, eval_pins
        The same for every target of the eval `arrays` (the hash of its eval settings).

    Returns
    -------
    Submission
        The appended submission; its arrays carry the job names to pass to sbatch.

    Raises
    ------
    ValueError
        A cell is in two arrays or lacks a recipe hash, or `submission_id` is already used.
    """
    now = now or datetime.now(timezone.utc)
    taken = {array.name for array in all_arrays(ledger)}
    if submission_id is None:
        submission_id = uuid.uuid4().hex
        # Names use only 8 hex digits; redraw on the rare clash rather than record an ambiguous name.
        while array_name(submission_id, 0) in taken:
            submission_id = uuid.uuid4().hex
    elif array_name(submission_id, 0) in taken:
        raise ValueError(f"submission id {submission_id} clashes with an existing submission's array names")
    hashes = {"merge": recipe_hashes, "eval": eval_hashes or {}}
    all_pins = {"merge": pins or {}, "eval": eval_pins or {}}
    for stage in ("merge", "eval"):
        ids = [cell for planned in arrays if planned.stage == stage for cell in planned.cells]
        twice = _repeated(ids)
        if twice:
            raise ValueError(f"{stage} targets planned in more than one array: {', '.join(twice)}")
        missing = [c for c in ids if c not in hashes[stage]]
        if missing:
            raise ValueError(f"no {'recipe' if stage == 'merge' else 'eval settings'} hash for: "
                             f"{', '.join(missing)}")
    records = [
        ArrayRecord(name=array_name(submission_id, n), submitted=now, **planned.model_dump())
        for n, planned in enumerate(arrays)
    ]
    submission = Submission(
        id=submission_id, matrix_path=matrix_path, matrix_sha256=matrix_sha256, created=now, arrays=records
    )
    ledger.submissions.append(submission)
    for record in records:
        for index, cell in enumerate(record.cells):
            attempt = Attempt(array=record.name, index=index, submitted=now,
                              recipe_hash=hashes[record.stage][cell],
                              pins=dict(all_pins[record.stage].get(cell, {})))
            stage_attempts(ledger, record.stage).setdefault(cell, []).append(attempt)
    return submission


def confirm_array(ledger: Ledger, name: str, job_id: str) -> ArrayRecord:
    """Record the job id sbatch (or sacct, on recovery) gave the array called `name`.

    Confirming again with the same id is a no-op.

    Raises
    ------
    LedgerError
        No array has that name, or it is already confirmed with a different job id.
    """
    array = find_array(ledger, name)
    if array.job_id is not None and array.job_id != job_id:
        raise LedgerError(f"array {name} already has job id {array.job_id}, refusing to change it to {job_id}")
    array.job_id = job_id
    return array


def forget_array(ledger: Ledger, name: str) -> None:
    """Undo the recorded intent of an array whose sbatch definitely failed.

    Drops the array, the attempts that point at it, and a submission left with no array, so a
    refused submission leaves no trace; eval arrays chained to it go with it.
    """
    find_array(ledger, name)
    for dependent in [a.name for a in all_arrays(ledger) if a.after == name]:
        forget_array(ledger, dependent)
    for submission in ledger.submissions:
        submission.arrays = [array for array in submission.arrays if array.name != name]
    ledger.submissions = [submission for submission in ledger.submissions if submission.arrays]
    for by_id in (ledger.cells, ledger.evals):
        for cell in list(by_id):
            kept = [attempt for attempt in by_id[cell] if attempt.array != name]
            if kept:
                by_id[cell] = kept
            else:
                del by_id[cell]


def record_cancel(ledger: Ledger, cell_id: str, array: str, index: int,
                  now: datetime | None = None, stage: Stage = "merge") -> None:
    """Note that the attempt of `cell_id` (its merge, or its eval) in task (`array`, `index`) was
    cancelled, at `now`.

    An attempt that is no longer in the ledger (another process rewrote it) is left alone.
    """
    for attempt in stage_attempts(ledger, stage).get(cell_id, []):
        if (attempt.array, attempt.index) == (array, index) and attempt.cancelled is None:
            attempt.cancelled = now or datetime.now(timezone.utc)


def find_array(ledger: Ledger, name: str) -> ArrayRecord:
    """The array called `name`; raises `LedgerError` if there is none."""
    for array in all_arrays(ledger):
        if array.name == name:
            return array
    raise LedgerError(f"the ledger has no array named {name}")


def stage_attempts(ledger: Ledger, stage: Stage) -> dict[str, list[Attempt]]:
    """Id -> attempts of one stage: `Ledger.cells` (merge) or `Ledger.evals`."""
    return ledger.cells if stage == "merge" else ledger.evals


def attempts(ledger: Ledger, cell_id: str, stage: Stage = "merge") -> list[Attempt]:
    """Every attempt of `cell_id` at `stage`, oldest first (empty if never submitted)."""
    return list(stage_attempts(ledger, stage).get(cell_id, []))


def latest_attempt(ledger: Ledger, cell_id: str, stage: Stage = "merge") -> Attempt | None:
    """The most recent attempt of `cell_id` at `stage`, or None if it was never submitted."""
    cell_attempts = stage_attempts(ledger, stage).get(cell_id)
    return cell_attempts[-1] if cell_attempts else None


def all_arrays(ledger: Ledger) -> list[ArrayRecord]:
    """Every array of every submission, oldest first."""
    return [array for submission in ledger.submissions for array in submission.arrays]


def _repeated(items: list[str]) -> list[str]:
    return sorted(item for item, count in Counter(items).items() if count > 1)


def _summarise(exc: ValidationError) -> str:
    errors = exc.errors()
    parts = [f"{'.'.join(map(str, e['loc'])) or '(top level)'}: {e['msg']}" for e in errors[:_MAX_ERRORS_SHOWN]]
    if len(errors) > _MAX_ERRORS_SHOWN:
        parts.append(f"and {len(errors) - _MAX_ERRORS_SHOWN} more")
    return "; ".join(parts)
