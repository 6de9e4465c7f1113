"""The lm-eval results stored in the work folder, read back for `report` and the model cards.

`run-eval` keeps each target's results JSON in `cells/<id>/eval/results.json`. `report` reads
them all; the cards read them when they are rendered (`EvalSource`): the root card's evaluation
section from every target's results, a cell card's `model-index` from that cell's, but only
results that scored the very checkpoint the card describes (a cell merged again since its eval
has no results until its eval runs again).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .evaluation import (EvalTarget, expand_eval, results_path, scored_named_inputs,
                         verified_output)
from .matrix import Matrix
from .report import Row
from .rootcard import CardEvaluation


def read_results(targets: list[EvalTarget], work: Path) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """({target id: its results JSON} of the targets that have results, ids of those without).

    Raises
    ------
    ConfigError
        A results file exists but is not JSON.
    """
    found, missing = {}, []
    for target in targets:
        path = results_path(work, target.id)
        try:
            found[target.id] = json.loads(path.read_text())
        except FileNotFoundError:
            missing.append(target.id)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{path}: not a readable lm-eval results file: {e}") from None
    return found, missing


def scored_checkpoint(results: dict[str, Any]) -> str | None:
    """The content hash of the cell checkpoint these results scored (None for a baseline)."""
    return ((results.get("bakery") or {}).get("inputs") or {}).get("final_sha256")


@dataclass(frozen=True)
class EvalSource:
    """Where the cards find eval results: a work folder and the matrix's eval targets."""

    work: Path
    targets: tuple[EvalTarget, ...]
    # The baseline the root card ranks methods against: [eval] baselines' first.
    baseline: str | None

    @classmethod
    def of_matrix(cls, matrix: Matrix, work: Path | None = None) -> "EvalSource | None":
        """None without [eval]."""
        if matrix.spec.eval is None:
            return None
        names = [b.name for b in matrix.spec.eval.baselines]
        return cls(Path(work or matrix.work_dir), tuple(expand_eval(matrix)),
                   names[0] if names else None)

    def evaluation(self) -> CardEvaluation | None:
        """The results there now, for the root card; None when no target has any."""
        found, _ = read_results(list(self.targets), self.work)
        found = {t.id: found[t.id] for t in self.targets
                 if t.id in found and as_configured(t, found[t.id])}
        if not found:
            return None
        return CardEvaluation(
            rows=tuple(Row.of(t, found[t.id]) for t in self.targets if t.id in found),
            scored={cell: scored_checkpoint(results) for cell, results in found.items()},
            baseline=self.baseline,
            without_results=frozenset((t.size, t.variant) for t in self.targets
                                      if t.kind == "baseline" and t.label == self.baseline
                                      and t.id not in found))

    def cell_results(self, cell_id: str, content_sha256: str) -> dict[str, Any] | None:
        """The cell's results if they scored the checkpoint with this content hash."""
        targets = [t for t in self.targets if t.id == cell_id]
        found, _ = read_results(targets, self.work)
        results = found.get(cell_id)
        return (results if results and scored_checkpoint(results) == content_sha256
                and as_configured(targets[0], results) else None)


def scores_now(target: EvalTarget, results: dict[str, Any], work: Path) -> bool:
    """Do `results` score `target` as it is now (`as_configured`), and for a cell the checkpoint
    verified in the work folder (when there still is one: gc removes a published cell's)?"""
    if not as_configured(target, results):
        return False
    if target.kind != "cell":
        return True
    now = verified_output(work, target.id)
    return now is None or now == scored_checkpoint(results)


def as_configured(target: EvalTarget, results: dict[str, Any]) -> bool:
    """Were `results` scored with `target`'s eval settings and, for a baseline, on the inputs
    the matrix names for it? Results without a `bakery` block, not written by run-eval, are taken
    as they are."""
    record = results.get("bakery") or {}
    return record.get("settings_hash", target.settings_hash) == target.settings_hash and (
        target.kind != "baseline" or scored_named_inputs(target, record))
