"""`bakery-slurm report` on literal lm-eval results files written into a work folder: output
formats, files, targets without results, bad input, and no heavy imports."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from bakery_slurm.cli import cli
from bakery_slurm.evaluation import results_path
from conftest import MINIMAL_MATRIX

MATRIX = MINIMAL_MATRIX.replace("[methods.ties]", "[methods.linear]\nweight = 0.5\n[methods.ties]") + """
[eval]
tasks = ["mc"]
baselines = [{ name = "base" }]
"""
SCORES = {"tiny-std/eng-nob__linear": 0.5, "tiny-std/eng-nob__ties": 0.6, "tiny-std/base": 0.45}


def lm_eval_results(acc: float) -> dict:
    return {"results": {"mc": {"alias": "mc", "acc,none": acc, "acc_stderr,none": 0.05}},
            "versions": {"mc": 1.0}, "lm_eval_version": "0.4.13"}


@pytest.fixture
def matrix(write_matrix, tmp_path):
    path = write_matrix(MATRIX)
    for target, acc in SCORES.items():
        out = results_path(tmp_path / "bakery-work", target)
        out.parent.mkdir(parents=True)
        out.write_text(json.dumps(lm_eval_results(acc)))
    return path


def report(*args):
    return CliRunner().invoke(cli, ["report", *map(str, args)])


def test_table_has_the_pivot_and_the_ranking(matrix):
    result = report(matrix)
    assert result.exit_code == 0, result.output
    assert result.stdout == (
        "Per-task absolute scores (x 100, ± stderr)\n"
        "target                    mc/acc\n"
        "tiny-std/eng-nob__linear  50.0 ± 5.0\n"
        "tiny-std/eng-nob__ties    60.0 ± 5.0\n"
        "tiny-std/base             45.0 ± 5.0\n"
        "\n"
        "tiny method ranking (Δ vs tiny-std/base, points)\n"
        "#  Method  Mean Δ over (std)  std\n"
        "1  ties    +15.00 pp          +15.00\n"
        "2  linear  +5.00 pp           +5.00\n")


def test_json_and_files(matrix, tmp_path):
    md, table = tmp_path / "out" / "eval.md", tmp_path / "out" / "pivot.csv"
    result = report(matrix, "--json", "--markdown", md, "--csv", table)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["columns"] == ["mc/acc"]
    assert data["rows"][1]["values"] == {"mc/acc": {"value": 0.6, "stderr": 0.05}}
    assert [(e["rank"], e["method"], e["mean"]) for e in data["ranking"]] == [
        (1, "ties", pytest.approx(15.0)), (2, "linear", pytest.approx(5.0))]
    assert md.read_text().startswith("### Per-task absolute scores")
    assert table.read_text().splitlines()[1] == "tiny-std/eng-nob__linear,cell,tiny,std,linear,0.5,0.05"


def test_targets_without_results_are_named_on_stderr(matrix, tmp_path):
    results_path(tmp_path / "bakery-work", "tiny-std/base").unlink()
    result = report(matrix, "--json", "--baseline", "tiny-std/base")
    assert result.exit_code == 2
    assert "1 of 3 eval targets have no results yet: tiny-std/base" in result.stderr
    assert "--baseline tiny-std/base: no results for such a baseline (baselines with results: none)" in result.stderr


def test_a_corrupt_results_file_is_named(matrix, tmp_path):
    path = results_path(tmp_path / "bakery-work", "tiny-std/eng-nob__ties")
    path.write_text("{")
    result = report(matrix)
    assert result.exit_code == 2
    assert f"Error: {path}: not a readable lm-eval results file" in result.stderr


def test_a_matrix_without_eval_is_refused(write_matrix):
    path = write_matrix(MINIMAL_MATRIX)
    result = report(path)
    assert result.exit_code == 2
    assert f"Error: {path.resolve()}: eval: the matrix has no [eval] table" in result.stderr


def test_report_does_not_import_heavy_libraries(matrix, tmp_path):
    """`report` runs on a login node: no torch, transformers, lm_eval."""
    code = (
        "import sys\n"
        "from bakery_slurm.cli import cli\n"
        f"cli.main(['report', {str(matrix)!r}, '--json'], standalone_mode=False)\n"
        "heavy = [m for m in ('torch', 'transformers', 'lm_eval', 'datasets') if m in sys.modules]\n"
        "print('HEAVY=' + ','.join(heavy), file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)["rows"]) == 3
    assert "HEAVY=\n" in proc.stderr
