"""The image definition builds the package it ships: every file it copies exists, it copies what
the wheel needs and nothing else, and it pins what the tests run with."""

from __future__ import annotations

import configparser
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFINITION = (ROOT / "apptainer" / "bakery-slurm.def").read_text()


def section(name: str) -> list[str]:
    match = re.search(rf"^%{name}\n(.*?)(?=^%|\Z)", DEFINITION, re.MULTILINE | re.DOTALL)
    assert match, f"no %{name} section"
    return [line.strip() for line in match.group(1).splitlines()
            if line.strip() and not line.strip().startswith("#")]


def test_files_copies_exactly_what_the_package_build_needs():
    sources = [line.split()[0] for line in section("files")]
    assert all((ROOT / source).exists() for source in sources), sources
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    package_roots = {p.split(".")[0] for p in config["options"]["packages"].split()}
    assert set(sources) == {"setup.cfg", "pyproject.toml", "constraints.txt", "README.md",
                            *package_roots, "templates"}


def test_image_uses_the_pinned_versions_but_keeps_ngc_torch():
    post = "\n".join(section("post"))
    assert "grep -v '^torch==' constraints.txt" in post
    assert "PIP_CONSTRAINT=/tmp/constraints-image.txt" in post
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert pins["mergekit"] == "0.1.5" and "transformers" in pins and "peft" in pins
