"""One renderer for every listing command: an aligned table for people, JSON or NDJSON for scripts.

stdout carries results only; logs and progress go to stderr.
"""

from __future__ import annotations

import json
import unicodedata
from typing import Any, Callable, Iterable, Sequence

import click


def output_options(f: Callable) -> Callable:
    """Add --json / --nl to a command; the command receives `fmt` ("table", "json" or "nl")."""
    f = click.option("--nl", "fmt", flag_value="nl", help="Print one JSON object per line.")(f)
    f = click.option("--json", "fmt", flag_value="json", help="Print a JSON list.")(f)
    return click.option("--table", "fmt", flag_value="table", default=True, hidden=True)(f)


def echo_rows(rows: Sequence[dict[str, Any]], columns: Sequence[str], fmt: str) -> None:
    """Print `rows` (`format_rows`) on stdout: nothing at all for --nl without rows, so that a
    script reading lines never reads an empty one."""
    text = format_rows(rows, columns, fmt)
    if text:
        click.echo(text)


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
    return aligned([list(columns), *cells])


def aligned(lines: Sequence[Sequence[str]]) -> str:
    """`lines` of cells as columns two spaces apart, each as wide as its widest cell on screen
    (`display_width`), without trailing spaces."""
    widths = [max(display_width(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(pad(v, w) for v, w in zip(line, widths)).rstrip()
                     for line in lines)


def display_width(text: str) -> int:
    """Columns `text` takes in a terminal: wide (W) and fullwidth (F) characters, CJK among them,
    take two; combining marks none."""
    return sum(0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF"
               else 1 for c in text)


def pad(text: str, width: int) -> str:
    """`text` with spaces after it up to `width` display columns (str.ljust counts characters)."""
    return text + " " * (width - display_width(text))


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
