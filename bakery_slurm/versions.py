"""Versions of the libraries that determine a checkpoint's bytes (cache keys, cards, results)."""

from __future__ import annotations

from importlib import metadata

LIBRARIES = ("bakery-slurm", "torch", "transformers", "peft", "mergekit", "safetensors")


def library_versions() -> dict[str, str]:
    """{distribution: version}, read from package metadata (imports nothing heavy)."""
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out
