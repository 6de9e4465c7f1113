"""One renderer for every listing command: an aligned table for people, JSON or NDJSON for scripts.

stdout carries results only; logs and progress go to stderr.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Iterable, Sequence

import click


def output_options(f: Callable) -> Callable:
    """Add --json / --nl to a command; the command receives `fmt` ("table", "json" or "nl")."""
    f = click.option("--nl", "fmt", flag_value="nl", help="Print one JSON object per line.")(f)
    f = click.option("--json", "fmt", flag_value="json", help="Print a JSON list.")(f)
    return click.option("--table", "fmt", flag_value="table", default=True, hidden=True)(f)


def format_rows(rows: Sequence[dict[str, Any]], columns: Sequence[str], fmt: str) -> str:
    """Render `rows`; the table shows `columns`, JSON shows every key."""
    if fmt == "json":
        # One object per line: readable, and encoded by json's C encoder (indent= would not be).
        return "[" + ",".join(f"\n  {json.dumps(row, default=str)}" for row in rows) + "\n]"
    if fmt == "nl":
        return "\n".join(json.dumps(row, default=str) for row in rows)
    return format_table(rows, columns)


def format_table(rows: Iterable[dict[str, Any]], columns: Sequence[str]) -> str:
    cells = [[_text(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in cells]
    return "\n".join(lines)


def _text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict):
        return ",".join(f"{k}={_text(v)}" for k, v in value.items())
    if isinstance(value, float):
        return f"{value:g}"
    text = str(value)
    # One line per row: an error's newlines (lm-eval's, a library's) would break the table.
    return " ".join(text.split()) if any(c in text for c in "\n\r\t\v\f") else text
