"""Which cells `bakery-slurm push` publishes, and which `status` calls UNPUBLISHED: pure
functions of the result record, the prepared record and the verified output's hash."""

from __future__ import annotations

import pytest
from conftest import MINIMAL_MATRIX

from bakery_slurm.login_push import VERIFIED, judge, unpublished
from bakery_slurm.matrix import expand, load_matrix

FINAL = "f" * 64


@pytest.fixture
def cell(write_matrix):
    return expand(load_matrix(write_matrix(MINIMAL_MATRIX)))[0]


def result(cell, status: str, **stages: str) -> dict:
    return {"cell": cell.id, "recipe_hash": cell.recipe_hash, "status": status,
            "stages": {name: {"status": state} for name, state in stages.items()}}


def prepared(cell, final: str = FINAL) -> dict:
    return {"recipe_hash": cell.recipe_hash, "output": {"content_sha256": final}}


def test_deferred_and_failed_pushes_are_unpublished(cell):
    assert unpublished(result(cell, VERIFIED, verify="done", push="deferred"))
    assert unpublished(result(cell, "failed", verify="skipped", push="failed"))
    assert not unpublished(result(cell, "failed", verify="failed"))
    assert not unpublished(result(cell, "failed", merge="failed"))
    assert not unpublished(result(cell, "done", verify="done", push="done"))
    assert not unpublished(None)


@pytest.mark.parametrize("record, prep, final, ready, reason", [
    ("deferred", True, FINAL, True, "verified, not published"),
    ("push failed", True, FINAL, True, "verified, not published"),
    ("deferred", False, FINAL, False, "publish folder is missing or stale"),
    ("deferred", True, "0" * 64, False, "publish folder is missing or stale"),
    ("deferred", True, None, False, "publish folder is missing or stale"),
    ("merge failed", True, FINAL, False, "not verified (its run is failed)"),
    ("done", True, FINAL, False, "already published"),
    ("other recipe", True, FINAL, False, "not run with this recipe"),
    ("never run", False, None, False, "not run with this recipe"),
])
def test_judge(cell, record, prep, final, ready, reason):
    records = {
        "deferred": result(cell, VERIFIED, verify="done", push="deferred"),
        "push failed": result(cell, "failed", verify="done", push="failed"),
        "merge failed": result(cell, "failed", merge="failed"),
        "done": result(cell, "done", verify="done", push="done"),
        "other recipe": {**result(cell, VERIFIED, verify="done"), "recipe_hash": "0" * 64},
        "never run": None,
    }
    verdict = judge(cell, records[record], prepared(cell) if prep else None, final)
    assert (verdict.ready, verdict.cell) == (ready, cell.id) and reason in verdict.reason
