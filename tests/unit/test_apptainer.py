"""The image definition builds the package it ships: every file it copies exists, it copies what
the wheel needs and nothing else, and it pins what the tests run with."""

from __future__ import annotations

import configparser
import re
import subprocess
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


def test_image_uses_the_pinned_versions_but_keeps_ngc_torch(tmp_path):
    """%post's own command, run on constraints.txt: every pin but torch and torch's own
    dependencies (NGC's torch keeps the versions it was built with)."""
    post = section("post")
    assert "PIP_CONSTRAINT=/tmp/constraints-image.txt" in "\n".join(post)
    command = next(line for line in post if line.endswith("> /tmp/constraints-image.txt"))
    subprocess.run(["bash", "-c", command.replace("/tmp/", f"{tmp_path}/")], cwd=ROOT, check=True)
    image = pins_in((tmp_path / "constraints-image.txt").read_text())
    tested = pins_in((ROOT / "constraints.txt").read_text())
    assert image["mergekit"] == tested["mergekit"] and "transformers" in image and "peft" in image
    assert "lm-eval" in image and "regex" in image  # transitive dependencies are pinned too
    assert set(tested) - set(image) == {"torch", "filelock", "fsspec", "mpmath", "networkx", "sympy",
                                        "typing-extensions"}


def pins_in(text: str) -> dict[str, str]:
    return {name.lower().replace("_", "-"): version for name, version in
            (line.split("==") for line in text.splitlines() if "==" in line and not line.startswith("#"))}
