"""[eval] expanded into eval targets (pure): which model each evaluation scores, and on what.

A target is a merge cell (its verified output, `cells/<id>/final` in the work folder) or a
baseline: an eval-only cell at one (size, variant), the base alone or the base with one adapter
attached unmerged, with the id `<size>-<variant>/<baseline name>`. Each target carries the tasks
that run on it (`[eval] only` narrows a task to the targets its globs name), its few-shot counts
and the resources of its task. Nothing here reads a model or writes a file.

This module must stay importable without torch: `report` uses it.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, NamedTuple, Sequence

from .manifest import intact_marker
from .matrix import (Cell, EvalBaseline, Matrix, ModelSource, Resources, _excluded, _fail,
                     expand, size_resources, size_variants, sources)
from .pins import pin_inputs
from .pipeline import CellPaths
from .sources import identifies


@dataclass(frozen=True)
class EvalTarget:
    """One model to evaluate and the lm-eval settings it is scored with."""

    id: str
    kind: Literal["cell", "baseline"]
    size: str
    variant: str
    # The cell's method and sweep point (its id after `__`, e.g. `ties-density0.3`), or the
    # baseline's name: what the ranking compares across variants.
    label: str
    tasks: tuple[str, ...]
    num_fewshot: dict[str, int] = field(hash=False)
    limit: int | float | None
    batch_size: int | str
    include_path: str | None   # the task YAMLs' folder, absolute, as resolved here
    # The same folder as the matrix names it (relative to the matrix folder unless absolute):
    # what the settings identify it by, so a login node and a container that mount the matrix
    # folder at other paths agree on what was evaluated.
    include_identity: str | None
    dtype: str
    resources: Resources
    # Baselines only: the base and the adapter attached to it (name, source), if any.
    base: ModelSource | None = None
    adapter: tuple[str, ModelSource] | None = None

    @property
    def settings(self) -> dict[str, Any]:
        """What, besides the model, decides the scores: a changed one makes a rerun evaluate again."""
        settings = {"tasks": list(self.tasks), "num_fewshot": self.num_fewshot,
                    "limit": self.limit, "batch_size": self.batch_size,
                    "include_path": self.include_identity}
        # A cell's dtype is in its checkpoint (final_sha256) already; a baseline's is not.
        return {**settings, "dtype": self.dtype} if self.kind == "baseline" else settings

    @property
    def settings_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.settings, sort_keys=True).encode()).hexdigest()


def expand_eval(matrix: Matrix, cells: list[Cell] | None = None) -> list[EvalTarget]:
    """Every eval target of the matrix: each cell (of `cells`, default all), then each baseline at
    each (size, variant) it applies to. Empty without [eval].

    Raises
    ------
    ConfigError
        A baseline id equals a cell id.
    """
    spec = matrix.spec.eval
    if spec is None:
        return []
    cells = expand(matrix) if cells is None else cells
    include = str((matrix.root / spec.include_path).resolve()) if spec.include_path else None
    include_identity = os.path.normpath(spec.include_path) if spec.include_path else None

    def target(target_id: str, kind: str, size: str, variant: str, label: str,
               **model: Any) -> EvalTarget | None:
        tasks = tuple(task for task in spec.tasks
                      if task not in spec.only
                      or any(fnmatch.fnmatchcase(target_id, glob) for glob in spec.only[task]))
        if not tasks:
            return None
        fewshot = spec.num_fewshot
        per_task = ({task: fewshot[task] for task in tasks if task in fewshot}
                    if isinstance(fewshot, dict)
                    else {task: fewshot for task in tasks} if fewshot is not None else {})
        return EvalTarget(id=target_id, kind=kind, size=size, variant=variant, label=label,
                          tasks=tasks, num_fewshot=per_task, limit=spec.limit,
                          batch_size=spec.batch_size, include_path=include,
                          include_identity=include_identity,
                          dtype=matrix.spec.dtype,
                          resources=size_resources(matrix, size, eval_=True), **model)

    targets = [target(cell.id, "cell", cell.size, cell.variant, cell.id.split("__", 1)[1])
               for cell in cells]
    cell_ids = {cell.id for cell in cells}
    for i, baseline, size, variant, target_id in _kept_baseline_places(matrix):
        if target_id in cell_ids:
            raise _fail(matrix, f"eval.baselines.{i}.name", baseline.name,
                        f"the baseline id {target_id} is a cell id too")
        base, adapters = sources(matrix, size, variant)
        adapter = next(((name, source) for name, source in adapters
                        if name in baseline.adapters), None)
        targets.append(target(target_id, "baseline", size, variant, baseline.name,
                              base=base, adapter=adapter))
    return [t for t in targets if t is not None]


class BaselinePlace(NamedTuple):
    """One [eval] baseline at one (size, variant); `index` is its place in [eval] baselines."""

    index: int
    baseline: EvalBaseline
    size: str
    variant: str
    id: str


def baseline_places(matrix: Matrix) -> list[BaselinePlace]:
    """Every [eval] baseline at each (size, variant) it names, before `exclude` removes any."""
    spec = matrix.spec.eval
    return [BaselinePlace(i, baseline, size, variant, f"{size}-{variant}/{baseline.name}")
            for i, baseline in enumerate(spec.baselines if spec else [])
            for size, variant in size_variants(matrix)
            if (baseline.sizes is None or size in baseline.sizes)
            and (baseline.variants is None or variant in baseline.variants)]


def _kept_baseline_places(matrix: Matrix) -> list[BaselinePlace]:
    return [place for place in baseline_places(matrix)
            if not _excluded(matrix.spec.exclude, place.size, place.variant, "", place.id)]


def check_only(matrix: Matrix, cells: list[Cell]) -> None:
    """Refuse an `[eval] only` glob that names no cell (of `cells`: all of the matrix) or
    baseline: a typo would otherwise run the task nowhere it was meant to, silently.

    Raises
    ------
    ConfigError
        Naming the task's key and the glob.
    """
    if matrix.spec.eval is None:
        return
    ids = [cell.id for cell in cells] + [place.id for place in _kept_baseline_places(matrix)]
    for task, globs in matrix.spec.eval.only.items():
        for glob in globs:
            if not any(fnmatch.fnmatchcase(target_id, glob) for target_id in ids):
                raise _fail(matrix, f"eval.only.{task}", glob,
                            "matches no cell or baseline of the matrix")


def baseline_carriers(matrix: Matrix, targets: Sequence[EvalTarget]) -> list[Cell]:
    """One cell of the matrix at each (size, variant) of the baselines among `targets`: it reads
    the same base and adapters, so preflight checks and pins a baseline's Hub inputs through it
    (and a baseline scores the same commits as the cells it is compared with)."""
    wanted: dict[tuple[str, str], set[str]] = {}
    for t in targets:
        if t.kind == "baseline":
            wanted.setdefault((t.size, t.variant), set()).update([t.adapter[0]] if t.adapter else [])
    carriers: dict[tuple[str, str], Cell] = {}
    cells = expand(matrix)
    for cell in cells:
        if (cell.size, cell.variant) in wanted:
            carriers.setdefault((cell.size, cell.variant), cell)
    for (size, variant), names in wanted.items():
        if (size, variant) not in carriers and cells:
            # No cell reads this (size, variant): a stand-in reading what its baselines read.
            base, adapters = sources(matrix, size, variant)
            carriers[(size, variant)] = dataclasses.replace(
                cells[0], id=f"{size}-{variant}/(baselines)", size=size, variant=variant,
                base=base, adapters=tuple((n, s) for n, s in adapters if n in names))
    return list(carriers.values())


def target_inputs(target: EvalTarget) -> dict[str, ModelSource]:
    """A baseline's inputs by name (`base`, its adapter's name); a cell's output is its own."""
    if target.kind == "cell":
        return {}
    return {"base": target.base, **dict([target.adapter] if target.adapter else [])}


def pin_target(target: EvalTarget, pins: Mapping[str, str]) -> EvalTarget:
    """The target reading its Hub inputs at the given commits ({input name: commit})."""
    pinned = pin_inputs(target.id, target_inputs(target), pins)
    if target.kind == "cell":
        return target
    adapter = (target.adapter[0], pinned[target.adapter[0]]) if target.adapter else None
    return dataclasses.replace(target, base=pinned["base"], adapter=adapter)


def eval_dir(work: Path, target_id: str) -> Path:
    """A target's eval folder, `cells/<id>/eval`, beside the cell's outputs."""
    return CellPaths(Path(work), target_id).root / "eval"


def results_path(work: Path, target_id: str) -> Path:
    """Where a target's lm-eval results JSON lives."""
    return eval_dir(work, target_id) / "results.json"


def failure_path(work: Path, target_id: str) -> Path:
    """Where a target's failed eval says why and when (removed when an eval succeeds): without
    accounting, `status` tells a failed eval from one that never ran by it."""
    return eval_dir(work, target_id) / "failed.json"


def read_eval_failure(work: Path, target_id: str) -> dict[str, Any]:
    """A target's failure record ({"error", "finished"}), empty when its last eval did not fail."""
    try:
        record = json.loads(failure_path(work, target_id).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def verified_output(work: Path, cell_id: str) -> str | None:
    """The content hash of the cell's verified checkpoint (`cells/<id>/final`, intact and the one
    its verify record checked), or None when it has none: what a cell's eval scores."""
    paths = CellPaths(Path(work), cell_id)
    marker = intact_marker(paths.final)
    try:
        verified = json.loads(paths.verified.read_text())
    except (OSError, ValueError):
        return None
    # The verify record names the checkpoint it checked: `final_sha256`, or (in the
    # declared-steps pipeline) its step inputs' `final`.
    checked = verified.get("final_sha256") or (verified.get("inputs") or {}).get("final")
    if marker is None or checked != marker["content_sha256"]:
        return None
    return checked


def read_eval_record(work: Path, target_id: str) -> dict[str, Any]:
    """The `bakery` block of a target's results JSON: what was scored, with which settings
    (empty when there are no results)."""
    try:
        return json.loads(results_path(work, target_id).read_text()).get("bakery") or {}
    except (OSError, ValueError, AttributeError):
        return {}


def is_evaluated(target: EvalTarget, record: Mapping[str, Any], final_sha256: str | None) -> bool:
    """Do results with `record` (`read_eval_record`) score `target` as it is now: its settings,
    and for a cell its verified checkpoint `final_sha256`, for a baseline its inputs as the
    matrix names them (`scored_named_inputs`)?"""
    if record.get("settings_hash") != target.settings_hash:
        return False
    if target.kind == "baseline":
        return scored_named_inputs(target, record)
    return final_sha256 is not None and (record.get("inputs") or {}).get("final_sha256") == final_sha256


def scored_named_inputs(target: EvalTarget, record: Mapping[str, Any]) -> bool:
    """Did results with `record` score the baseline `target` on the base and adapter the matrix
    names for it now (`sources.identifies`)? Results of a baseline whose adapter, source or
    revision was changed since score another model, as a cell's of another recipe do. The
    content of what they name is compared by the eval task itself, which fetches it. A record
    that does not say what it scored (not written by run-eval) is taken as it is."""
    if "inputs" not in record:
        return True
    inputs = record["inputs"] if isinstance(record["inputs"], dict) else {}
    adapter = inputs.get("adapter")
    scored = {"base": inputs.get("base"), **(adapter if isinstance(adapter, dict) else {})}
    wanted = target_inputs(target)
    return scored.keys() == wanted.keys() and all(
        isinstance(scored[name], dict) and identifies(scored[name], source)
        for name, source in wanted.items())
