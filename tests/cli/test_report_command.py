"""`bakery-slurm report` on literal lm-eval results files written into a work folder: output
formats, files, targets without results, bad input, and no heavy imports."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from bakery_slurm.cli import cli
from bakery_slurm.eval_results import EvalSource
from bakery_slurm.evaluation import expand_eval, results_path
from bakery_slurm.manifest import write_marker
from bakery_slurm.matrix import load_matrix
from bakery_slurm.pipeline import CellPaths
from bakery_slurm.rootcard import evaluation_section
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


# ---------------------------------------------------------------------------------------------
# What is ranked against what

BASELINE_EVAL = '[eval]\ntasks = ["mc"]\nbaselines = [{ name = "base" }]\n'
TWO_VARIANTS = MINIMAL_MATRIX.replace("[variants.std]\n", "[variants.std]\n[variants.open]\n")


def write_results(work, scores):
    for target, acc in scores.items():
        out = results_path(work, target)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(lm_eval_results(acc)))


def test_a_cell_is_not_ranked_against_another_variants_baseline(tmp_path, write_matrix):
    """`base` is a baseline at every variant (tiny-std/base, tiny-open/base): the open cell's
    reference is tiny-open/base. While that one has no results (its eval failed or is pending),
    the open cell must not be ranked against tiny-std/base, a different base model."""
    matrix = write_matrix(TWO_VARIANTS + BASELINE_EVAL)
    write_results(tmp_path / "bakery-work", {"tiny-std/eng-nob__ties": 0.6,
                                             "tiny-open/eng-nob__ties": 0.7,
                                             "tiny-std/base": 0.45})
    result = CliRunner().invoke(cli, ["report", str(matrix), "--json"])
    assert result.exit_code == 0, result.output
    ranking = json.loads(result.stdout)["ranking"]
    references = {v: ref for e in ranking for v, ref in e["references"].items()}
    assert references.get("open") != "tiny-std/base", ranking


def test_report_prints_the_pivot_while_the_default_baseline_has_no_results(tmp_path, write_matrix):
    """The cells are evaluated, the first baseline's eval failed (or is still pending): without
    --baseline, report prints the pivot without a ranking, as the root card does."""
    matrix = write_matrix(MINIMAL_MATRIX + BASELINE_EVAL)
    write_results(tmp_path / "bakery-work", {"tiny-std/eng-nob__ties": 0.6})
    result = CliRunner().invoke(cli, ["report", str(matrix)])
    assert result.exit_code == 0, result.output
    assert "tiny-std/eng-nob__ties  60.0 ± 5.0" in result.stdout


def test_report_leaves_out_a_cell_merged_again_since_its_eval(tmp_path, write_matrix):
    """The cell's results scored another checkpoint than its verified output (merged again since,
    its new eval not run yet or failed): report leaves it out, as the cards do, until its eval
    runs again."""
    matrix = write_matrix(MINIMAL_MATRIX + BASELINE_EVAL)
    work = tmp_path / "bakery-work"
    cell = "tiny-std/eng-nob__ties"
    paths = CellPaths(work, cell)
    paths.final.mkdir(parents=True)
    (paths.final / "model.safetensors").write_bytes(b"new weights")
    paths.verified.write_text(json.dumps({"final_sha256": write_marker(paths.final, {})["content_sha256"]}))
    write_results(work, {cell: 0.6, "tiny-std/base": 0.45})
    stale = json.loads(results_path(work, cell).read_text())
    stale["bakery"] = {"inputs": {"final_sha256": "0" * 64}}
    results_path(work, cell).write_text(json.dumps(stale))
    result = CliRunner().invoke(cli, ["report", str(matrix), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert cell not in [r["target"] for r in data["rows"]]
    assert data["ranking"] == []


def test_report_does_not_rank_results_of_other_eval_settings_against_each_other(tmp_path,
                                                                                  write_matrix):
    """num_fewshot changed 0 -> 5; the baseline was evaluated again (5-shot), the cell's new eval
    failed, so its results are the 0-shot ones (their settings_hash says so): not ranked against
    the 5-shot baseline."""
    old = write_matrix(MINIMAL_MATRIX + BASELINE_EVAL + "num_fewshot = 0\n", "old/matrix.toml")
    new = write_matrix(MINIMAL_MATRIX + BASELINE_EVAL + "num_fewshot = 5\n")
    old_hash = {t.id: t.settings_hash for t in expand_eval(load_matrix(old))}
    new_hash = {t.id: t.settings_hash for t in expand_eval(load_matrix(new))}
    work = tmp_path / "bakery-work"
    cell, base = "tiny-std/eng-nob__ties", "tiny-std/base"
    write_results(work, {cell: 0.6, base: 0.45})
    for target, hashes in ((cell, old_hash), (base, new_hash)):
        stored = json.loads(results_path(work, target).read_text())
        stored["bakery"] = {"settings_hash": hashes[target]}
        results_path(work, target).write_text(json.dumps(stored))
    result = CliRunner().invoke(cli, ["report", str(new), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["ranking"] == []


def test_the_root_card_does_not_rank_a_cell_against_another_variants_baseline(tmp_path,
                                                                              write_matrix):
    """The same as report's, in the root card's evaluation section (EvalSource -> ranking)."""
    matrix = load_matrix(write_matrix(TWO_VARIANTS + BASELINE_EVAL))
    work = tmp_path / "bakery-work"
    write_results(work, {"tiny-std/eng-nob__ties": 0.6, "tiny-open/eng-nob__ties": 0.7,
                         "tiny-std/base": 0.45})
    evaluation = EvalSource.of_matrix(matrix, work).evaluation()
    records = {c: {"output": {"content_sha256": None}} for c in
               ("tiny-std/eng-nob__ties", "tiny-open/eng-nob__ties")}
    section = evaluation_section(evaluation, records)
    assert "Mean Δ over (std)" in section, section


def test_the_cards_leave_out_results_of_other_eval_settings_as_report_does(tmp_path, write_matrix):
    matrix = load_matrix(write_matrix(MINIMAL_MATRIX + BASELINE_EVAL))
    work = tmp_path / "bakery-work"
    write_results(work, {"tiny-std/eng-nob__ties": 0.6, "tiny-std/base": 0.45})
    stale = json.loads(results_path(work, "tiny-std/base").read_text())
    stale["bakery"] = {"settings_hash": "0" * 64}  # scored with other [eval] settings
    results_path(work, "tiny-std/base").write_text(json.dumps(stale))
    evaluation = EvalSource.of_matrix(matrix, work).evaluation()
    assert [row.id for row in evaluation.rows] == ["tiny-std/eng-nob__ties"]
