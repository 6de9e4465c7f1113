"""The merge methods bakery-slurm knows, as a registry of data (after mergekit's merge_methods.registry).

A method is a mergekit `merge_method` name plus the recipe parameters it takes. The variants are data,
not code: one recipe template renders every method from its `MethodSpec`. Adding a method is one
`register(...)` call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class ParamSpec:
    """One recipe parameter.

    Parameters
    ----------
    name:
        The key in matrix.toml and in the mergekit recipe.
    per_model:
        True when mergekit reads it per input model (`models[i].parameters`), False when it is a
        merge-wide parameter (`parameters:` at the top of the recipe).
    check:
        Returns an error message for a bad value, or None.
    kind:
        The Python type accepted from TOML (float parameters also accept integers).
    required:
        True when mergekit has no default for it (the merge would fail after baking without it).
    not_all_zero:
        True when the per-model values of one cell may not all be zero (an all-zero weight merges
        nothing, and linear's normalisation divides by the sum).
    """

    name: str
    per_model: bool
    check: Callable[[object], str | None]
    kind: type = float
    required: bool = False
    not_all_zero: bool = False


@dataclass(frozen=True)
class MethodSpec:
    """A mergekit merge method: its name, whether it needs `base_model`, and its parameters."""

    name: str
    needs_base: bool
    params: dict[str, ParamSpec] = field(default_factory=dict)
    description: str = ""


def _finite_non_negative(value: object) -> str | None:
    if not math.isfinite(value) or value < 0:
        return "must be a finite number >= 0"
    return None


def _density(value: object) -> str | None:
    if not math.isfinite(value) or not 0 < value <= 1:
        return "must be in (0, 1]"
    return None


def _any_bool(value: object) -> str | None:
    return None


WEIGHT = ParamSpec("weight", per_model=True, check=_finite_non_negative, required=True,
                   not_all_zero=True)
DENSITY = ParamSpec("density", per_model=True, check=_density)
NORMALIZE = ParamSpec("normalize", per_model=False, check=_any_bool, kind=bool)

_REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Add a method; a second method of the same name is a programming error."""
    if spec.name in _REGISTRY:
        raise ValueError(f"merge method {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def get(name: str) -> MethodSpec:
    """Look a method up by name; the error lists every valid name."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(
            f"unknown merge method {name!r} (valid: {', '.join(registered_methods())})"
        ) from None


def registered_methods() -> list[str]:
    return sorted(_REGISTRY)


register(MethodSpec("linear", needs_base=False, params={p.name: p for p in (WEIGHT, NORMALIZE)},
                    description="weighted average of the baked checkpoints"))
register(MethodSpec("task_arithmetic", needs_base=True, params={p.name: p for p in (WEIGHT, NORMALIZE)},
                    description="base + sum of weight * (baked - base)"))
register(MethodSpec("ties", needs_base=True, params={p.name: p for p in (WEIGHT, DENSITY, NORMALIZE)},
                    description="TIES-merging: trim to density, elect signs, disjoint mean"))
