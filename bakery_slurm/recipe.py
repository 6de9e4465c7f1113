"""Render a cell's mergekit recipe (pure) and validate it with mergekit's own MergeConfiguration.

`render_recipe` only fills templates/recipe.yaml.j2; `validate_recipe` imports mergekit (and so
torch), which is why it lives apart from anything `plan` or `status` import.
"""

from __future__ import annotations

from typing import Any, Mapping

import yaml

from . import methods
from .errors import BakeryError, ConfigError
from .matrix import Cell
from .templating import render

# libyaml's safe loader when PyYAML has it: ~10x faster over a 10,000-cell submit.
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def render_recipe(cell: Cell, base_path: str, baked_paths: Mapping[str, str]) -> str:
    """The mergekit YAML for `cell`, merging the baked checkpoints `baked_paths[adapter]`.

    Parameters
    ----------
    cell:
        The cell; its method decides whether `base_path` becomes `base_model`.
    base_path:
        Folder of the base checkpoint in the hub layout (task vectors are taken against it).
    baked_paths:
        Adapter name -> folder of the base with that adapter baked in.
    """
    spec = methods.get(cell.method)
    per_model = {name: value for name, value in cell.parameters.items()
                 if spec.params[name].per_model}
    models = [{"path": str(baked_paths[adapter]),
               "parameters": {name: values[adapter] for name, values in per_model.items()}}
              for adapter, _ in cell.adapters]
    return render(
        "recipe.yaml.j2", cell=cell,
        base_model=str(base_path) if spec.needs_base else None,
        merge_parameters={name: value for name, value in cell.parameters.items()
                          if name not in per_model},
        models=models,
    )


def validate_recipe(cell_id: str, text: str) -> Any:
    """Parse and validate with mergekit; return the MergeConfiguration or raise ConfigError.

    Raises BakeryError, saying what to install, where mergekit cannot be imported: a login node
    whose venv lacks torch or transformers, which mergekit imports (through peft).
    """
    from pydantic import ValidationError

    try:
        from mergekit.config import MergeConfiguration
    except ImportError as e:
        raise BakeryError(f"{cell_id}: recipes are validated with mergekit, which cannot be "
                          f"imported here ({e}): install bakery-slurm with its pinned dependencies "
                          "(torch, transformers, mergekit) on this node, `make install`") from None

    try:
        return MergeConfiguration.model_validate(yaml.load(text, Loader=SAFE_LOADER))
    except (ValidationError, ValueError, yaml.YAMLError) as e:
        raise ConfigError(f"{cell_id}: mergekit rejects the rendered recipe: {e}") from None
