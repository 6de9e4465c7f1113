"""The evaluation report (pure): lm-eval results -> a pivot and a method ranking, and their text.

`metrics(results)` reads one lm-eval results JSON into `{column: (value, stderr)}`, a column
being `<task>/<metric>` (plus `[<filter>]` for a filter other than lm-eval's `none`). `pivot`
lays out one row per cell and baseline; `ranking` compares each cell with a named baseline: the
baseline's row at the cell's size and variant, else its only row at the cell's size (the seed's
4B ranking against its one 4b-std baseline). A cell's delta is the mean, over the columns both
rows have, of (cell - baseline) x 100: points, for lm-eval's accuracy-like metrics in [0, 1]
(`fractions`: other metrics are shown as they are and not compared);
a metric lm-eval marks lower-is-better (brier_score, say) counts as (baseline - cell), so a
positive delta is always an improvement. A group with an aggregate (mmlu) counts by it alone:
its subtasks are in the pivot, not in the delta. A column whose task the two rows scored
otherwise (n-shot, task version, samples: `setups`) is left out, and named (`not_compared`).
Per method, the delta is given per variant and as the mean over the variants; methods are
ranked per size, best first.

`model_index(name, results)` is the same results JSON as the Hub's `model-index` metadata, for
the cell cards: the tasks whose data is a Hub dataset (`hub_dataset`). A score lm-eval's `limit`
cut to part of its task's documents (`partial_tasks`) says so wherever it is shown.

Imports nothing heavy: `report` runs on a login node.
"""

from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping, Sequence

from .errors import ConfigError
from .output import aligned


@dataclass(frozen=True)
class Row:
    """One evaluated cell or baseline and its scores."""

    id: str
    kind: str
    size: str
    variant: str
    label: str
    values: dict[str, tuple[float, float | None]]
    # Columns whose metric lm-eval marks lower-is-better.
    lower_is_better: frozenset[str] = frozenset()
    # Columns of the subtasks of a group whose aggregate is a column too: shown, not ranked.
    aggregated: frozenset[str] = frozenset()
    # How each column's task was scored (`setups`): rows compare a column only where it agrees.
    setups: dict[str, Any] = field(default_factory=dict)
    # Columns of a metric of NOT_FRACTIONS.
    not_fractions: frozenset[str] = frozenset()
    # Columns scored on part of their task's documents: (documents scored, documents it has).
    partial: dict[str, tuple[int, int]] = field(default_factory=dict)

    @classmethod
    def of(cls, target: Any, results: dict[str, Any]) -> "Row":
        """The row of an eval target (`evaluation.EvalTarget`) with its lm-eval results JSON."""
        return cls(id=target.id, kind=target.kind, size=target.size, variant=target.variant,
                   label=target.label, values=metrics(results),
                   lower_is_better=lower_is_better(results),
                   aggregated=aggregated_columns(results), setups=setups(results),
                   not_fractions=not_fraction_columns(results), partial=partial_columns(results))


def _scores(results: dict[str, Any]) -> Iterator[tuple[str, str, str, float, float | None]]:
    """(task, metric, filter, value, stderr or None) of every numeric metric in lm-eval's
    `results` table."""
    for task, entry in (results.get("results") or {}).items():
        for key, value in entry.items():
            metric, sep, filt = key.partition(",")
            if not sep or metric.endswith("_stderr") or not _number(value):
                continue
            stderr = entry.get(f"{metric}_stderr,{filt}")
            yield task, metric, filt, float(value), float(stderr) if _number(stderr) else None


def metrics(results: dict[str, Any]) -> dict[str, tuple[float, float | None]]:
    """{column: (value, stderr or None)} of every numeric metric in lm-eval's `results` table."""
    return {_column(task, metric, filt): (value, stderr)
            for task, metric, filt, value, stderr in _scores(results)}


def _tasks(results: dict[str, Any]) -> list[str]:
    """The tasks with a numeric metric, in lm-eval's order."""
    return list(dict.fromkeys(task for task, *_ in _scores(results)))


def _column(task: str, metric: str, filt: str) -> str:
    return f"{task}/{metric}" + ("" if filt == "none" else f"[{filt}]")


# A Hub dataset id: `owner/name`. A bare name is a `datasets` builder reading files of the
# cluster (`json`, `csv`) or a legacy name, and a folder is a path: no Hub page is theirs.
HUB_DATASET_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def model_index(name: str, results: dict[str, Any]) -> list[dict[str, Any]]:
    """The Hub's `model-index` for lm-eval's results JSON: one result per task whose data is a
    Hub dataset (type text-generation; the dataset as `hub_dataset` names it, with the few-shot
    count), each metric with lm-eval's value, its name marked where lm-eval scored part of the
    task's documents (`partial_tasks`). Empty when no such task has a numeric metric.

    The Hub requires `dataset.type` and links it to the dataset's page: a task read from
    elsewhere has no truthful entry, and is left out (the card's table shows it)."""
    shots, partial = results.get("n-shot") or {}, partial_tasks(results)
    datasets = {task: hub_dataset(task, results) for task in _tasks(results)}
    by_task: dict[str, dict[str, Any]] = {}
    for task, metric, filt, value, _ in _scores(results):
        if datasets[task] is None:
            continue
        entry = by_task.get(task)
        if entry is None:
            dataset = {"name": task, **datasets[task]}
            if isinstance(shots.get(task), int):
                dataset["args"] = {"num_few_shot": shots[task]}
            entry = by_task[task] = {"task": {"type": "text-generation"}, "dataset": dataset,
                                     "metrics": []}
        label = metric if filt == "none" else f"{metric} [{filt}]"
        entry["metrics"].append({"type": metric, "value": value,
                                 "name": label + partial_note(partial.get(task))})
    return [{"name": name, "results": list(by_task.values())}] if by_task else []


def hub_dataset(task: str, results: dict[str, Any]) -> dict[str, str] | None:
    """The Hub dataset lm-eval's `task` read: {type: its `owner/name`, config and split where
    it names them}; for a group, what all its subtasks share (lm-eval's `configs` hold only
    the subtasks). None where some of the task's data is no Hub dataset (a `datasets` builder
    over files, a folder, a `custom_dataset`), or its subtasks read different ones."""
    configs = results.get("configs") or {}
    read = [configs[t] for t in {task} | _below(task, results.get("group_subtasks") or {})
            if t in configs]
    if not read or not all(_on_hub(config) for config in read):
        return None
    found = [{"type": config["dataset_path"], "config": config.get("dataset_name"),
              "split": config.get("test_split") or config.get("validation_split")}
             for config in read]
    return {key: value for key, value in found[0].items()
            if value and all(each[key] == value for each in found)}


def _on_hub(config: dict[str, Any]) -> bool:
    """Does lm-eval load this task config's data from the Hub dataset its `dataset_path` names?"""
    path = config.get("dataset_path")
    return (isinstance(path, str) and bool(HUB_DATASET_ID.match(path))
            and not config.get("custom_dataset"))


def tasks_off_hub(results: dict[str, Any]) -> list[str]:
    """The scored tasks `model_index` leaves out: their data is no Hub dataset."""
    return [task for task in _tasks(results) if hub_dataset(task, results) is None]


def _below(task: str, subtasks: Mapping[str, Sequence[str]]) -> set[str]:
    """Every task and subgroup below `task` in lm-eval's `group_subtasks`, followed down."""
    below: set[str] = set()
    pending = list(subtasks.get(task) or [])
    while pending:
        child = pending.pop()
        if child not in below:
            below.add(child)
            pending += subtasks.get(child) or []
    return below


def partial_tasks(results: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """{task: (documents scored, documents it has)} of every scored task lm-eval ran on part of
    its documents (`limit`: its `n-samples` effective below original), a group by the sum over
    its subtasks. Such a score is no score on the task: a card or report shows it marked."""
    samples, subtasks = results.get("n-samples") or {}, results.get("group_subtasks") or {}
    partial: dict[str, tuple[int, int]] = {}
    for task in _tasks(results):
        counts = [samples[t] for t in {task} | _below(task, subtasks)
                  if isinstance(samples.get(t), dict)
                  and _number(samples[t].get("effective")) and _number(samples[t].get("original"))]
        effective = sum(int(count["effective"]) for count in counts)
        original = sum(int(count["original"]) for count in counts)
        if effective < original:
            partial[task] = (effective, original)
    return partial


def partial_columns(results: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """{column of `metrics(results)`: (documents scored, documents it has)} of the columns of a
    task of `partial_tasks`."""
    partial = partial_tasks(results)
    return {_column(task, metric, filt): partial[task]
            for task, metric, filt, *_ in _scores(results) if task in partial}


def partial_note(documents: tuple[int, int] | None) -> str:
    """` (on 100 of 900 documents)` after a score of part of its task's documents, else empty."""
    return "" if documents is None else f" (on {documents[0]} of {documents[1]} documents)"


PARTIAL_LEGEND = ("A score marked (on n of N documents) was scored on part of its task's "
                  "documents (lm-eval's limit): it is no score on the whole task.")


def lower_is_better(results: dict[str, Any]) -> frozenset[str]:
    """The columns of `metrics(results)` whose metric lm-eval's `higher_is_better` marks false."""
    lower = {(task, metric) for task, flags in (results.get("higher_is_better") or {}).items()
             for metric, higher in flags.items() if higher is False}
    return frozenset(_column(task, metric, filt) for task, metric, filt, *_ in _scores(results)
                     if (task, metric) in lower)


def aggregated_columns(results: dict[str, Any]) -> frozenset[str]:
    """The columns of `metrics(results)` of every task and subgroup below a group that has an
    aggregate of its own (lm-eval's `group_subtasks`, followed down). lm-eval lists the group's
    aggregate and each of its subtasks alike in `results`: ranked all, one mmlu would weigh 58
    times as much as a plain task, and count its own scores twice."""
    subtasks = results.get("group_subtasks") or {}
    scored = {task for task, *_ in _scores(results)}
    below = set().union(*(_below(group, subtasks) for group in subtasks if group in scored))
    return frozenset(_column(task, metric, filt) for task, metric, filt, *_ in _scores(results)
                     if task in below)


def setups(results: dict[str, Any]) -> dict[str, Any]:
    """{column of `metrics(results)`: how its task was scored}: lm-eval's n-shot, task version
    and number of samples scored, and for a group those of each of its subtasks. The eval
    settings do not pin them all: a task YAML in `include_path` edited between two evals, or
    another lm-eval, scores a task otherwise under the same settings."""
    shots, versions = results.get("n-shot") or {}, results.get("versions") or {}
    samples, subtasks = results.get("n-samples") or {}, results.get("group_subtasks") or {}

    def setup(task: str, seen: frozenset[str]) -> tuple:
        counted = samples.get(task)
        return (shots.get(task), versions.get(task),
                counted.get("effective") if isinstance(counted, dict) else None,
                tuple(setup(child, seen | {task}) for child in subtasks.get(task) or []
                      if child not in seen))

    return {_column(task, metric, filt): setup(task, frozenset())
            for task, metric, filt, *_ in _scores(results)}


# lm-eval's metrics that are no fraction in [0, 1], whatever values a run gives: perplexities
# and bits per byte (unbounded), log-likelihood, sacrebleu's bleu, chrf and ter (0 to 100).
NOT_FRACTIONS = frozenset({"perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte",
                           "likelihood", "bleu", "chrf", "chrf++", "ter"})


def not_fraction_columns(results: dict[str, Any]) -> frozenset[str]:
    """The columns of `metrics(results)` of a metric of NOT_FRACTIONS."""
    return frozenset(_column(task, metric, filt) for task, metric, filt, *_ in _scores(results)
                     if metric in NOT_FRACTIONS)


def fractions(rows: Sequence[Row]) -> frozenset[str]:
    """The columns shown and compared in points (x 100): every value `rows` have there lies in
    [0, 1], and the metric is not one of NOT_FRACTIONS. A difference in points of any other
    metric (a perplexity 5 lower is no 500 points) would outweigh every accuracy in a delta."""
    return frozenset(column for column in pivot(rows)
                     if not any(column in row.not_fractions for row in rows)
                     and all(0 <= row.values[column][0] <= 1
                             for row in rows if column in row.values))


def _number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def pivot(rows: Sequence[Row]) -> list[str]:
    """The columns of the pivot: every row's metrics, in order of first appearance."""
    return list(dict.fromkeys(column for row in rows for column in row.values))


def ranking(rows: Sequence[Row], baseline: str,
            without_results: Iterable[tuple[str, str]] = ()) -> list[dict[str, Any]]:
    """Methods ranked per size by mean delta against `baseline` (a baseline name, or one
    baseline row's id), best first. Cells with no reference row at their size are left out, and
    so are cells at a (size, variant) in `without_results`: the baseline is evaluated there but
    has no results (yet), so another variant's row is no reference for them.

    Raises
    ------
    ConfigError
        `baseline` names no baseline row.
    """
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    points = fractions(rows)
    for cell, ref in _compared(rows, baseline, without_results):
        shared = [c for c in _shared(cell, ref)
                  if c in points and cell.setups.get(c) == ref.setups.get(c)]
        if not shared:
            continue
        delta = sum((cell.values[c][0] - ref.values[c][0]) * (-1 if c in cell.lower_is_better else 1)
                    for c in shared) / len(shared) * 100
        group = groups.setdefault((cell.size, cell.label), {
            "size": cell.size, "method": cell.label, "variants": {}, "references": {},
            "metrics": {}})
        group["variants"][cell.variant] = delta
        group["references"][cell.variant] = ref.id
        group["metrics"][cell.variant] = len(shared)
    ranked: list[dict[str, Any]] = []
    for size in dict.fromkeys(size for size, _ in groups):
        entries = [g for (s, _), g in groups.items() if s == size]
        for entry in entries:
            entry["mean"] = sum(entry["variants"].values()) / len(entry["variants"])
        entries.sort(key=lambda e: -e["mean"])
        ranked += [{"rank": i, **entry} for i, entry in enumerate(entries, 1)]
    return ranked


def not_compared(rows: Sequence[Row], baseline: str,
                 without_results: Iterable[tuple[str, str]] = ()) -> dict[str, list[str]]:
    """{cell id: the columns it shares with its reference row (as `ranking` picks it) but whose
    task was scored otherwise there (`setups`)}: left out of its delta, to be said so."""
    return {cell.id: columns for cell, ref in _compared(rows, baseline, without_results)
            if (columns := [c for c in _shared(cell, ref)
                            if cell.setups.get(c) != ref.setups.get(c)])}


def _compared(rows: Sequence[Row], baseline: str,
              without_results: Iterable[tuple[str, str]]) -> list[tuple[Row, Row]]:
    """(cell, its reference row) of every cell `ranking` compares with `baseline`.

    Raises
    ------
    ConfigError
        `baseline` names no baseline row.
    """
    refs = [r for r in rows if r.kind == "baseline" and baseline in (r.id, r.label)]
    if not refs:
        known = sorted({r.label for r in rows if r.kind == "baseline"})
        raise ConfigError(f"--baseline {baseline}: no results for such a baseline "
                          f"(baselines with results: {', '.join(known) or 'none'})")
    pending = set(without_results)
    pairs = [(cell, None if (cell.size, cell.variant) in pending else _reference(cell, refs))
             for cell in rows if cell.kind == "cell"]
    return [(cell, ref) for cell, ref in pairs if ref is not None]


def _shared(cell: Row, ref: Row) -> list[str]:
    """The columns both rows have, but a subtask's of a group whose aggregate counts."""
    return [c for c in cell.values
            if c in ref.values and c not in cell.aggregated and c not in ref.aggregated]


def _reference(cell: Row, refs: Sequence[Row]) -> Row | None:
    same = [r for r in refs if (r.size, r.variant) == (cell.size, cell.variant)]
    if same:
        return same[0]
    at_size = [r for r in refs if r.size == cell.size]
    return at_size[0] if len(at_size) == 1 else None


# ---------------------------------------------------------------------------------------------
# Rendering


def score(value: tuple[float, float | None] | None, fraction: bool = True,
          documents: tuple[int, int] | None = None) -> str:
    """`48.1 ± 1.2` (a fraction, x 100), `20.31 ± 0.5` (another metric, as it is), or `—` for a
    metric that row did not run; `(on 100 of 900 documents)` after a partial score."""
    if value is None:
        return "—"
    v, err = value
    if fraction:
        shown = f"{v * 100:.1f}" + (f" ± {err * 100:.1f}" if err is not None else "")
    else:
        shown = f"{v:.4g}" + (f" ± {err:.2g}" if err is not None else "")
    return shown + partial_note(documents)


def heading(column: str, fraction: bool) -> str:
    """A pivot column's heading: its name, marked `(as is)` when it is not x 100."""
    return column if fraction else f"{column} (as is)"


def signed(delta: float) -> str:
    return f"{delta:+.2f}"


def pivot_table(rows: Sequence[Row], columns: Sequence[str]) -> list[list[str]]:
    """Header and one line per row: the target, then each column's score."""
    points = fractions(rows)
    return [["target", *(heading(c, c in points) for c in columns)]] + [
        [row.id, *(score(row.values.get(c), c in points, row.partial.get(c)) for c in columns)]
        for row in rows]


def results_table(results: dict[str, Any]) -> list[tuple[str, str]]:
    """(column heading, score) of every metric of one results JSON, as the pivot shows them (a
    cell card's table)."""
    alone = Row(id="", kind="cell", size="", variant="", label="", values=metrics(results),
                not_fractions=not_fraction_columns(results), partial=partial_columns(results))
    header, line = pivot_table([alone], pivot([alone]))
    return list(zip(header[1:], line[1:]))


def ranking_tables(ranked: Sequence[dict[str, Any]]) -> list[tuple[str, list[list[str]]]]:
    """(title, header and lines) per size: `# | Method | Mean Δ over (variants) | <variant>...`."""
    tables = []
    for size in dict.fromkeys(e["size"] for e in ranked):
        entries = [e for e in ranked if e["size"] == size]
        variants = list(dict.fromkeys(v for e in entries for v in e["variants"]))
        refs = sorted({ref for e in entries for ref in e["references"].values()})
        title = f"{size} method ranking (Δ vs {', '.join(refs)}, points)"
        lines = [["#", "Method", f"Mean Δ over ({', '.join(variants)})", *variants]]
        lines += [[str(e["rank"]), e["method"], signed(e["mean"]) + " pp",
                   *(signed(e["variants"][v]) if v in e["variants"] else "—" for v in variants)]
                  for e in entries]
        tables.append((title, lines))
    return tables


def markdown_table(lines: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(lines[0]) + " |", "|" + "---|" * len(lines[0])]
    out += ["| " + " | ".join(line) + " |" for line in lines[1:]]
    return "\n".join(out)


def render(rows: Sequence[Row], ranked: Sequence[dict[str, Any]], markdown: bool,
           not_compared: Mapping[str, Sequence[str]] | None = None) -> str:
    """The report for a terminal (aligned columns) or as Markdown (the seed card's layout), what
    a score of part of a task's documents is, and the columns left out of cells' deltas
    (`not_compared`)."""
    table = markdown_table if markdown else aligned
    title_line = (lambda title: f"### {title}\n") if markdown else (lambda title: f"{title}\n")
    parts = [title_line("Per-task absolute scores (x 100, ± stderr)")
             + table(pivot_table(rows, pivot(rows)))]
    if any(row.partial for row in rows):
        parts.append(PARTIAL_LEGEND)
    parts += [title_line(title) + table(lines) for title, lines in ranking_tables(ranked)]
    if not_compared:
        parts.append("Not compared with the baseline (scored with another n-shot, task version "
                     "or number of samples): " + "; ".join(
                         f"{cell}: {', '.join(left_out)}" for cell, left_out in not_compared.items()))
    return "\n\n".join(parts) + "\n"


def to_csv(rows: Iterable[Row], columns: Sequence[str]) -> str:
    """The pivot as CSV, raw lm-eval values: target, kind, size, variant, label, then per column
    its value and `<column>_stderr` (empty where the row did not run it)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["target", "kind", "size", "variant", "label",
                     *(name for c in columns for name in (c, f"{c}_stderr"))])
    for row in rows:
        values = [row.values.get(c, (None, None)) for c in columns]
        writer.writerow([row.id, row.kind, row.size, row.variant, row.label,
                         *("" if x is None else repr(x) for v in values for x in v)])
    return buffer.getvalue()
