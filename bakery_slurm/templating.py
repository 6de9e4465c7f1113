"""The Jinja2 environment over templates/ (recipes and the model card)."""

from __future__ import annotations

import functools
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
    return jinja2.Environment(
        loader=jinja2.FunctionLoader(lambda name: (root / name).read_text(encoding="utf-8")),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )


def render(name: str, **context) -> str:
    return environment().get_template(name).render(**context)
