"""The repo's root model card (README.md), rendered from the published cells' records.

The Hub reads a repo's metadata (base models, license, tags) only from its root README.md, and a
reader looks there first for what the repo holds. This card is a pure function of the records
every published cell carries (`bakery.json`: cell, parameters, inputs with their commits, device,
the base's license and language) plus the matrix's name and order, so any process that publishes
(an array task, `bakery-slurm push` on the login node, `bakery-slurm card`) renders the same card
from the same repo state. The part between `MANUAL_START` and `MANUAL_END` is the user's
(evaluation results, notes): it is carried over from the previous card on every regeneration.

The evaluation section (between `EVAL_START` and `EVAL_END`) is the one input that is not in the
repo: `report`'s pivot and ranking of the lm-eval results in the work folder, passed in as a
`CardEvaluation` by whoever renders. A renderer that has none (no results in its work folder, or
no matrix) keeps the previous card's section, so a push from elsewhere never erases it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

import yaml

from .report import Row, not_compared, ranking, render as render_report
from .templating import render

if TYPE_CHECKING:
    from .eval_results import EvalSource

MANUAL_START = "<!-- bakery-slurm: notes start (kept when the card is regenerated) -->"
MANUAL_END = "<!-- bakery-slurm: notes end -->"
DEFAULT_NOTES = ("_Evaluation results and notes go here: edit between these two comments on the "
                 "Hub or in this file; bakery-slurm keeps this section when it rewrites the card._")
TAGS = ("merge", "mergekit", "lora", "bakery-slurm")
EVAL_START = "<!-- bakery-slurm: evaluation start (rewritten from the eval results) -->"
EVAL_END = "<!-- bakery-slurm: evaluation end -->"


@dataclass(frozen=True)
class CardEvaluation:
    """The lm-eval results in the work folder when a card is rendered."""

    rows: tuple[Row, ...]  # every target with results, in the matrix's order
    scored: Mapping[str, str | None]  # target id -> the cell checkpoint its results scored
    baseline: str | None  # the methods are ranked against it
    # (size, variant) where that baseline is a target but has no results yet.
    without_results: frozenset[tuple[str, str]] = frozenset()


@dataclass(frozen=True)
class CardContext:
    """What the card takes from the matrix rather than the records: a title and the order of
    sizes, variants and methods (values not listed sort after the listed ones)."""

    title: str
    sizes: tuple[str, ...] = ()
    variants: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()
    # Where the eval results are read when a card is rendered (None: the matrix has no [eval]).
    evals: "EvalSource | None" = None

    @classmethod
    def of_matrix(cls, matrix: Any, work: Any = None) -> "CardContext":
        """The matrix's title and orders, and its eval results in `work` (default: its work
        folder)."""
        from .eval_results import EvalSource

        spec = matrix.spec
        return cls(title=spec.name, sizes=tuple(spec.sizes), variants=tuple(spec.variants),
                   methods=tuple(spec.methods), evals=EvalSource.of_matrix(matrix, work))


def _section(card: str | None, start_marker: str, end_marker: str) -> str | None:
    """The text between two markers of a card (None when it has no such section)."""
    if card:
        start, end = card.find(start_marker), card.find(end_marker)
        if 0 <= start < end:
            return card[start + len(start_marker):end].strip("\n")
    return None


def manual_section(previous: str | None) -> str:
    """The user's section of an earlier card (without the markers), or the placeholder."""
    return _section(previous, MANUAL_START, MANUAL_END) or DEFAULT_NOTES


def evaluation_section(evaluation: CardEvaluation, records: Mapping[str, Mapping[str, Any]]) -> str:
    """`report`'s Markdown for the baselines and the published cells whose results scored the
    checkpoint published (a cell merged again since its eval is left out); the methods ranked
    against the baseline when it has results. Empty when no row is left."""
    def scored_as_published(row: Row) -> bool:
        if row.id not in records:
            return False
        published = (records[row.id].get("output") or {}).get("content_sha256")
        return evaluation.scored.get(row.id) == published

    rows = [row for row in evaluation.rows if row.kind == "baseline" or scored_as_published(row)]
    if not rows:
        return ""
    baselines = {name for row in rows if row.kind == "baseline" for name in (row.id, row.label)}
    if evaluation.baseline not in baselines:
        return render_report(rows, [], markdown=True)
    return render_report(rows, ranking(rows, evaluation.baseline, evaluation.without_results),
                         markdown=True, not_compared=not_compared(rows, evaluation.baseline,
                                                                  evaluation.without_results))


def front_matter(card: str) -> dict[str, Any]:
    """The YAML metadata block of a model card, scalars as strings ({} when it has none or it
    does not parse)."""
    match = re.match(r"\A---\s*\n(.*?)\n---\s*(\n|\Z)", card, re.S)
    if not match:
        return {}
    try:
        # Every scalar a string: YAML 1.1 reads the language code `no` (Norwegian) as False.
        data = yaml.load(match.group(1), Loader=yaml.BaseLoader)
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def reference(identity: Mapping[str, Any]) -> str:
    """A published input as anyone can name it: `repo[/subfolder]@commit` for a Hub source,
    `local:<folder>@sha256:<hash>` for a local one (its path is the cluster's business)."""
    if identity.get("commit"):
        subfolder = f"/{identity['subfolder']}" if identity.get("subfolder") else ""
        where = identity["repo"] + subfolder
        return f"{where}@{identity['commit']}"
    return f"local:{identity['local']}@sha256:{identity['sha256']}"


def card_metadata(records: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Hub metadata shared by the root card and every cell card: every Hub base (in the records'
    order), and the license and languages the bases' own cards declare (no license when the
    bases disagree)."""
    bases = list(dict.fromkeys(r["inputs"]["base"]["repo"] for r in records
                               if r["inputs"]["base"].get("repo")))
    # `other` is no license by itself: its name (and link) say which one.
    licenses = sorted({(str(r["base_card"]["license"]), r["base_card"].get("license_name"),
                        r["base_card"].get("license_link")) for r in records
                       if r.get("base_card", {}).get("license")}, key=str)
    languages: list[str] = []
    for r in records:
        value = r.get("base_card", {}).get("language") or []
        for language in [value] if isinstance(value, str) else value:
            if language not in languages:
                languages.append(language)
    license, license_name, license_link = licenses[0] if len(licenses) == 1 else (None,) * 3
    return {"base_model": bases, "license": license, "license_name": license_name,
            "license_link": license_link, "language": languages}


def render_root_card(records: Mapping[str, Mapping[str, Any]], context: CardContext,
                     location: str, previous: str | None = None,
                     evaluation: CardEvaluation | None = None) -> str:
    """The root README.md for the cells `records` (cell id -> its `bakery.json`).

    Parameters
    ----------
    records:
        Every cell published at the target after this commit.
    context:
        Title and orders, from the matrix.
    location:
        What `from_pretrained` takes: the Hub repo id, or the `dir:` folder.
    previous:
        The card this one replaces, whose notes section is kept (and its evaluation section,
        without `evaluation`).
    evaluation:
        The eval results to show.
    """
    cells = sorted(records.values(), key=lambda r: _sort_key(r, context))
    rows: dict[tuple[str, str], list[str]] = {}
    for r in cells:
        methods = rows.setdefault((r["size"], r["variant"]), [])
        if _method_label(r) not in methods:
            methods.append(_method_label(r))
    recipes: dict[str, list[str]] = {}
    for r in cells:
        params = _parameters(r)
        if params not in recipes.setdefault(r["method"], []):
            recipes[r["method"]].append(params)
    inputs: dict[str, tuple[str, list[str]]] = {}
    for r in cells:
        used_by = f"{r['size']}-{r['variant']}"
        roles = [("base", r["inputs"]["base"])] + [
            (f"adapter {name}", identity) for name, identity in r["inputs"]["adapters"].items()]
        for role, identity in roles:
            users = inputs.setdefault(reference(identity), (role, []))[1]
            if used_by not in users:
                users.append(used_by)
    devices: dict[str, int] = {}
    fallbacks: dict[str, list[str]] = {}
    for r in cells:
        devices[r["device"]] = devices.get(r["device"], 0) + 1
        if r.get("fallback_reason"):
            fallbacks.setdefault(r["fallback_reason"], []).append(r["cell"])
    versions: dict[str, list[str]] = {}
    for r in cells:
        for name, version in r["versions"].items():
            if version not in versions.setdefault(name, []):
                versions[name].append(version)
    adapters = cells[0]["adapters"] if cells else []
    return render(
        "root_card.md.j2", title=context.title, location=location, metadata=card_metadata(cells),
        tags=TAGS, cells=cells, rows=rows, adapters=adapters, recipes=recipes, inputs=inputs,
        devices=devices, fallbacks=fallbacks,
        versions=versions, example=cells[-1]["cell"] if cells else None,
        example_dtype=cells[-1]["dtype"] if cells else None,
        dtypes=sorted({r["dtype"] for r in cells}), manual_start=MANUAL_START,
        manual_end=MANUAL_END, notes=manual_section(previous),
        evaluation=(evaluation_section(evaluation, records) if evaluation is not None
                    else _section(previous, EVAL_START, EVAL_END)),
        eval_start=EVAL_START, eval_end=EVAL_END,
    )


def _sort_key(record: Mapping[str, Any], context: CardContext) -> tuple:
    def position(value: str, order: tuple[str, ...]) -> tuple:
        return (order.index(value), "") if value in order else (len(order), value)

    return (position(record["size"], context.sizes), position(record["variant"], context.variants),
            position(record["method"], context.methods), record["cell"])


def _method_label(record: Mapping[str, Any]) -> str:
    """`ties`, or `ties-density0.3` for a sweep point: the part of the cell id after `__`."""
    return record["cell"].rsplit("__", 1)[-1]


def _parameters(record: Mapping[str, Any]) -> str:
    """`density=0.5, weight: eng=0.5 nob=0.5`: a cell's merge parameters on one line."""
    parts = []
    for name, value in sorted(record["parameters"].items()):
        if isinstance(value, Mapping):
            value = " ".join(f"{adapter}={v}" for adapter, v in value.items())
            parts.append(f"{name}: {value}")
        else:
            parts.append(f"{name}={value}")
    return ", ".join(parts) or "mergekit defaults"
