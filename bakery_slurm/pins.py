"""Hub inputs pinned to commits (pure).

`submit` resolves every Hub revision a cell reads (a branch, a tag, or nothing: `main`) to a commit
once, records it with the cell's attempt in the ledger, and hands it to the task (`run-cell
--pin NAME=COMMIT`), so every cell of a submission bakes exactly the same inputs, whatever is pushed
to the repos while the tasks wait in the queue. Pins are keyed by `ModelSource.key`, the source as
the matrix names it: a source edited in the matrix has a new key and is resolved anew.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping

from .errors import ConfigError
from .matrix import Cell, ModelSource

COMMIT = re.compile(r"^[0-9a-f]{40}$")


def cell_inputs(cell: Cell) -> dict[str, ModelSource]:
    """The cell's inputs by name: `base` and each adapter's name."""
    return {"base": cell.base, **dict(cell.adapters)}


def hub_sources(cells: list[Cell]) -> dict[str, ModelSource]:
    """Every distinct Hub source the cells read, by key (local folders are identified by their
    content instead)."""
    return {source.key: source for cell in cells for source in cell_inputs(cell).values()
            if source.repo is not None}


def input_pins(inputs: Mapping[str, ModelSource], pins: Mapping[str, str]) -> dict[str, str]:
    """{input name: commit} of the Hub `inputs` (by name) that `pins` (keyed by source) has."""
    return {name: pins[source.key] for name, source in inputs.items()
            if source.repo is not None and source.key in pins}



def apply_pins(cell: Cell, pins: Mapping[str, str]) -> Cell:
    """The cell reading its inputs at the given commits ({input name: commit})."""
    pinned = pin_inputs(cell.id, cell_inputs(cell), pins)
    return dataclasses.replace(cell, base=pinned["base"],
                               adapters=tuple((name, pinned[name]) for name, _ in cell.adapters))


def pin_inputs(owner: str, inputs: Mapping[str, ModelSource],
               pins: Mapping[str, str]) -> dict[str, ModelSource]:
    """`inputs` (by name) with the given commits applied; `owner` (a cell or eval target id)
    names the culprit of a pin that is not a Hub input of it or not a commit."""
    for name, commit in pins.items():
        if name not in inputs:
            raise ConfigError(f"{owner}: --pin {name}: not an input of this target "
                              f"(inputs: {', '.join(inputs)})")
        if inputs[name].repo is None:
            raise ConfigError(f"{owner}: --pin {name}: a local folder cannot be pinned "
                              f"({inputs[name].key})")
        if not COMMIT.match(commit):
            raise ConfigError(f"{owner}: --pin {name}={commit}: not a 40-hex commit")
    return {name: dataclasses.replace(source, commit=pins[name]) if name in pins else source
            for name, source in inputs.items()}
