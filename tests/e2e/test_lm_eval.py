"""Evaluation with the real lm-eval on tiny Gemma 3 models and a small local multiple-choice task
(tests/eval_tasks: YAML + JSON-lines files, through `[eval] include_path`), offline.

One module-scoped run: the tiny1b ties cell is baked and merged (`run-cell`), then `run-eval`
scores it and the baselines (the base alone; the base with the nob adapter attached unmerged, on
the text and the multimodal kind);
the tests read the stored results, `report`, and an independent `simple_evaluate` call.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from bakery_slurm.cli import cli
from bakery_slurm.evaluation import results_path

pytestmark = pytest.mark.e2e

TASKS = Path(__file__).resolve().parents[1] / "eval_tasks"
CELL = "tiny1b-std/eng-nob__ties"
BASE = "tiny1b-std/base"
LORA = "tiny1b-std/lora-nob"
LORA_MULTIMODAL = "tiny4b-std/lora-nob"  # Gemma3ForConditionalGeneration with a PEFT adapter
EVAL = f"""
[eval]
tasks = ["tiny_mc"]
include_path = {json.dumps(str(TASKS))}
num_fewshot = {{ tiny_mc = 1 }}
baselines = [{{ name = "base", sizes = ["tiny1b"] }},
             {{ name = "lora-nob", adapters = ["nob"] }}]
resources = {{ gpus_per_node = 1, time = "00:20:00" }}
"""


def invoke(*args: str):
    return CliRunner().invoke(cli, [*map(str, args)])


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, write_tiny_matrix):
    """The ties cell run, then it and the baselines evaluated; datasets cached in tmp."""
    import datasets.config

    folder = tmp_path_factory.mktemp("eval")
    matrix = write_tiny_matrix(folder, methods=("ties",))
    matrix.write_text(matrix.read_text() + EVAL)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", folder / "datasets-cache")
        ran = invoke("run-cell", matrix, CELL, "--device", "cpu")
        assert ran.exit_code == 0, ran.output
        records = {}
        for target in (CELL, BASE, LORA, LORA_MULTIMODAL):
            result = invoke("run-eval", matrix, target, "--device", "cpu")
            assert result.exit_code == 0, result.output
            records[target] = json.loads(result.stdout)
        again = invoke("run-eval", matrix, CELL, "--device", "cpu")
        yield SimpleNamespace(matrix=matrix, work=folder / "bakery-work", records=records,
                              again=again)


def stored(work: Path, target: str) -> dict:
    return json.loads(results_path(work, target).read_text())


def test_results_json_is_lm_evals_with_versions(evaluated):
    results = stored(evaluated.work, CELL)
    assert evaluated.records[CELL]["status"] == "done"
    assert results["lm_eval_version"] == "0.4.13"
    assert results["versions"] == {"tiny_mc": 1.0}
    assert results["n-shot"] == {"tiny_mc": 1}
    assert results["results"]["tiny_mc"]["sample_len"] == 10
    assert results["config"]["model_args"]["pretrained"] == str(evaluated.work / "cells" / CELL / "final")
    assert results["bakery"]["target"] == CELL
    assert results["bakery"]["inputs"]["final_sha256"]
    assert stored(evaluated.work, LORA)["config"]["model_args"]["peft"].endswith("adapters/text/nob")
    assert stored(evaluated.work, LORA_MULTIMODAL)["config"]["model_args"]["peft"].endswith(
        "adapters/multimodal/nob")


def test_report_values_equal_lm_evals_results(evaluated):
    result = invoke("report", evaluated.matrix, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [row["target"] for row in report["rows"]] == [CELL, BASE, LORA, LORA_MULTIMODAL]
    assert report["missing"] == ["tiny4b-std/eng-nob__ties"]
    for row in report["rows"]:
        entry = stored(evaluated.work, row["target"])["results"]["tiny_mc"]
        assert row["values"] == {
            "tiny_mc/acc": {"value": entry["acc,none"], "stderr": entry["acc_stderr,none"]},
            "tiny_mc/acc_norm": {"value": entry["acc_norm,none"],
                                 "stderr": entry["acc_norm_stderr,none"]}}
    (ties,) = report["ranking"]
    cell, base = (stored(evaluated.work, t)["results"]["tiny_mc"] for t in (CELL, BASE))
    expected = ((cell["acc,none"] - base["acc,none"])
                + (cell["acc_norm,none"] - base["acc_norm,none"])) / 2 * 100
    assert ties["method"] == "ties" and ties["variants"]["std"] == pytest.approx(expected)
    assert report["baseline"] == "base"


def test_stored_results_equal_a_direct_simple_evaluate(evaluated, monkeypatch):
    """The same model and task through lm-eval's API directly, outside bakery-slurm."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(TASKS)  # the task's data files are relative to its folder
    manager = TaskManager(include_path=str(TASKS))
    (task,) = manager.load(["tiny_mc"])["tasks"].values()
    task.set_config(key="num_fewshot", value=1)
    direct = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(evaluated.work / "cells" / CELL / "final"),
                                "dtype": "bfloat16"},
        tasks=[task], task_manager=manager, batch_size=1, device="cpu", log_samples=False)
    assert direct["results"] == stored(evaluated.work, CELL)["results"]


def test_report_markdown_and_csv_files(evaluated, tmp_path):
    md, table = tmp_path / "eval.md", tmp_path / "pivot.csv"
    result = invoke("report", evaluated.matrix, "--baseline", "lora-nob", "--markdown", md,
                    "--csv", table)
    assert result.exit_code == 0, result.output
    assert "tiny1b method ranking (Δ vs tiny1b-std/lora-nob, points)" in result.stdout
    assert "| # | Method | Mean Δ over (std) | std |" in md.read_text()
    lines = table.read_text().splitlines()
    assert lines[0] == ("target,kind,size,variant,label,tiny_mc/acc,tiny_mc/acc_stderr,"
                        "tiny_mc/acc_norm,tiny_mc/acc_norm_stderr")
    assert [line.split(",")[0] for line in lines[1:]] == [CELL, BASE, LORA, LORA_MULTIMODAL]


def test_a_rerun_keeps_the_results(evaluated):
    assert evaluated.again.exit_code == 0, evaluated.again.output
    assert json.loads(evaluated.again.stdout)["status"] == "skipped"


def test_a_cell_without_verified_output_fails_naming_it(evaluated):
    result = invoke("run-eval", evaluated.matrix, "tiny4b-std/eng-nob__ties", "--device", "cpu")
    assert result.exit_code == 1
    assert "tiny4b-std/eng-nob__ties: stage eval failed: no verified output in" in result.stderr
    assert not results_path(evaluated.work, "tiny4b-std/eng-nob__ties").exists()


def test_an_unknown_target_is_a_usage_error(evaluated):
    result = invoke("run-eval", evaluated.matrix, "tiny1b-std/nope")
    assert result.exit_code == 2
    assert "'tiny1b-std/nope' is not an eval target" in result.stderr


def test_push_cards_publishes_the_eval_results_in_the_cards(evaluated):
    """run-cell published the cell before its eval ran; `push --cards` then publishes its card
    with the results and the root card's evaluation section, and nothing else."""
    import yaml

    published = evaluated.matrix.parent / "published"
    card = published / CELL / "README.md"
    assert "model-index" not in card.read_text()
    others = {p.name: p.stat().st_mtime_ns for p in (published / CELL).iterdir()
              if p.name != "README.md"}
    preview = invoke("card", evaluated.matrix)
    assert preview.exit_code == 0, preview.output
    result = invoke("push", evaluated.matrix, "--cards", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == [
        {"cell": "tiny4b-std/eng-nob__ties", "action": "skipped: not published"},
        {"cell": CELL, "action": "published: card with its eval results"}]
    text = card.read_text()
    meta = yaml.safe_load(text.split("---\n")[1])
    # tiny_mc reads local json files: no Hub dataset for a model-index entry to name, so its
    # scores are in the card's table only, and the card says why.
    assert "model-index" not in meta
    scores = stored(evaluated.work, CELL)["results"]["tiny_mc"]
    assert f"{scores['acc,none'] * 100:.1f}" in text
    assert "Not in the `model-index`, whose entries name a Hub dataset: tiny_mc" in text
    root = (published / "README.md").read_text()
    assert root == preview.stdout  # `card` showed what the push wrote
    for target in (CELL, BASE, LORA, LORA_MULTIMODAL):
        assert f"| {target} | " in root
    assert "### tiny1b method ranking (Δ vs tiny1b-std/base, points)" in root
    assert str(evaluated.work) not in text + root and str(TASKS) not in text + root
    assert {p.name: p.stat().st_mtime_ns for p in (published / CELL).iterdir()
            if p.name != "README.md"} == others
