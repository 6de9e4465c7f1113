"""`bakery-slurm gc` after a real local run: it frees the bytes it says, and published cells stay
published (loadable from the target, skipped by the next submit)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from bakery_slurm.cli import cli
from support import settled, wait_for

pytestmark = pytest.mark.e2e


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def disk(folder) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


def used(*folders) -> int:
    """Bytes of the files under `folders`, each hard-linked file once."""
    inodes = {(p.stat().st_dev, p.stat().st_ino): p.stat().st_size
              for folder in folders for p in folder.rglob("*") if p.is_file()}
    return sum(inodes.values())


def test_gc_frees_what_published_cells_no_longer_need(tmp_path, write_tiny_matrix):
    from transformers import AutoModelForCausalLM

    # The mergekit engine bakes each adapter into a checkpoint: a run that leaves bakes behind.
    matrix = write_tiny_matrix(tmp_path, methods=("linear",), engine="mergekit")
    ledger = tmp_path / "bakery-ledger.json"
    assert invoke("submit", matrix, "--executor", "local", "--ledger", ledger).exit_code == 0
    statuses = wait_for(lambda: settled(ledger), "the cells to finish", deadline_s=300, interval_s=0.5)
    assert {s.state for s in statuses} == {"COMPLETED"}
    work, published = tmp_path / "bakery-work", tmp_path / "published"
    before, used_before = disk(work), used(work, published)

    dry = invoke("gc", "--dry-run", "--json", "--ledger", ledger)
    assert dry.exit_code == 0, dry.output
    assert disk(work) == before
    rows = {r["kind"]: r for r in json.loads(dry.stdout)}
    assert list(rows) == ["cell outputs", "bakes", "base copies", "leftovers"]
    assert rows["cell outputs"]["bytes"] > 0 and rows["bakes"]["bytes"] > 0

    done = invoke("gc", "--json", "--ledger", ledger)
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout) == json.loads(dry.stdout)
    # The bytes reported are the bytes freed: hard links count once, and the weights the `dir:`
    # target links to stay on disk.
    assert sum(r["bytes"] for r in rows.values()) == used_before - used(work, published)
    assert not (work / "cache" / "bakes").exists() or not any(
        p for p in (work / "cache" / "bakes").iterdir() if not p.name.endswith(".lock"))
    for s in statuses:
        assert (work / "cells" / s.cell / "result.json").is_file()
        assert not (work / "cells" / s.cell / "merged").exists()
        model = AutoModelForCausalLM.from_pretrained(published, subfolder=s.cell)
        assert model is not None
    again = invoke("submit", matrix, "--executor", "local", "--ledger", ledger)
    assert again.exit_code == 0 and again.stderr.count("already completed and published") == len(statuses)
