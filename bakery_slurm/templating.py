"""The Jinja2 environment over templates/ (recipes and the model card)."""

from __future__ import annotations

import functools
import json
from importlib import resources
from pathlib import Path

import jinja2


@functools.cache
def environment() -> jinja2.Environment:
    # A wheel installs the top-level templates/ folder as the package bakery_slurm.templates
    # (setup.cfg package_dir); an editable install only puts the checkout on sys.path.
    try:
        root = resources.files("bakery_slurm.templates")
    except ModuleNotFoundError:
        root = Path(__file__).resolve().parent.parent / "templates"
    env = jinja2.Environment(
        loader=jinja2.FunctionLoader(lambda name: (root / name).read_text(encoding="utf-8")),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["yaml_number"] = yaml_number
    return env


def yaml_number(value) -> str:
    """A number as YAML 1.1 (PyYAML, mergekit) reads it back as a number: JSON's `1e-05` is a
    string there (its floats need a '.'), `1.0e-05` is a float."""
    text = json.dumps(value)
    if isinstance(value, float) and "e" in text and "." not in text:
        mantissa, exponent = text.split("e")
        text = f"{mantissa}.0e{exponent if exponent[0] in '+-' else '+' + exponent}"
    return text


def render(name: str, **context) -> str:
    return environment().get_template(name).render(**context)
