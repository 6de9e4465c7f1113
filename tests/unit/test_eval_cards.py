"""Eval results in the model cards (pure): a cell card's `model-index` and the root card's
evaluation section, from literal lm-eval results."""

from __future__ import annotations

import re

import pytest
import yaml
from conftest import MINIMAL_MATRIX
from test_report import ROWS, Target, mmlu_results
from test_rootcard import CONTEXT, REPO, record, seed_records

from bakery_slurm.matrix import expand, load_matrix
from bakery_slurm.report import Row, model_index
from bakery_slurm.rootcard import (
    EVAL_END,
    EVAL_START,
    MANUAL_END,
    MANUAL_START,
    CardEvaluation,
    DEFAULT_NOTES,
    render_root_card,
)
from bakery_slurm.stages.push import cell_card

# lm-eval 0.4's results JSON, cut to what the cards read, as `run-eval` stores it: a Hub dataset,
# a task reading a folder on the cluster, and the model's path in `config` (never published).
RESULTS = {
    "results": {
        "norbelebele_p0": {"alias": "norbelebele_p0", "acc,none": 0.699, "acc_stderr,none": 0.015},
        "hh_rlhf_no": {"alias": "hh_rlhf_no", "exact_match,strict-match": 0.2,
                       "exact_match_stderr,strict-match": "N/A"},
    },
    "configs": {
        "norbelebele_p0": {"dataset_path": "facebook/belebele", "dataset_name": "nob_Latn",
                           "test_split": "test"},
        "hh_rlhf_no": {"dataset_path": "/cluster/projects/nn1234k/data/hh_rlhf_no",
                       "validation_split": "validation"},
    },
    "n-shot": {"norbelebele_p0": 5, "hh_rlhf_no": 0},
    "config": {"model_args": {"pretrained": "/cluster/work/bakery-work/cells/x/final"}},
    "lm_eval_version": "0.4.13",
    "bakery": {"inputs": {"final_sha256": "1" * 64}},
}
NAME = "tiny-std/eng-nob__ties"


def test_model_index_is_the_hubs_format_one_result_per_task():
    assert model_index(NAME, RESULTS) == [{"name": NAME, "results": [
        {"task": {"type": "text-generation"},
         "dataset": {"name": "norbelebele_p0", "type": "facebook/belebele", "config": "nob_Latn",
                     "split": "test", "args": {"num_few_shot": 5}},
         "metrics": [{"type": "acc", "value": 0.699, "name": "acc"}]},
        {"task": {"type": "text-generation"},
         # a folder is named by its last name: the cluster's paths are not published
         "dataset": {"name": "hh_rlhf_no", "type": "hh_rlhf_no", "split": "validation",
                     "args": {"num_few_shot": 0}},
         "metrics": [{"type": "exact_match", "value": 0.2, "name": "exact_match [strict-match]"}]},
    ]}]
    assert model_index(NAME, {"results": {}}) == []


def test_huggingface_hub_reads_the_model_index_back():
    from huggingface_hub.repocard_data import model_index_to_eval_results

    name, results = model_index_to_eval_results(model_index(NAME, RESULTS))
    assert name == NAME
    assert [(r.task_type, r.dataset_type, r.dataset_config, r.metric_type, r.metric_value)
            for r in results] == [
        ("text-generation", "facebook/belebele", "nob_Latn", "acc", 0.699),
        ("text-generation", "hh_rlhf_no", None, "exact_match", 0.2)]


@pytest.fixture
def cell(write_matrix):
    return expand(load_matrix(write_matrix(MINIMAL_MATRIX)))[0]


def front(card: str) -> dict:
    return yaml.safe_load(re.match(r"\A---\n(.*?)\n---\n", card, re.S).group(1))


def test_a_cell_card_with_results_carries_model_index_and_a_table(cell):
    published = record("tiny", "std", "ties")
    card = cell_card(cell, published, RESULTS)
    meta = front(card)
    assert meta["model-index"] == model_index(cell.id, RESULTS)
    assert meta["base_model_relation"] == "merge"  # the rest of the metadata is still there
    assert "Scored with lm-evaluation-harness 0.4.13 on this checkpoint" in card
    assert "few-shot: norbelebele_p0 5, hh_rlhf_no 0" in card
    assert "| norbelebele_p0/acc | 69.9 ± 1.5 |" in card
    assert "| hh_rlhf_no/exact_match[strict-match] | 20.0 |" in card
    assert "/cluster" not in card


def test_a_cell_card_without_results_has_neither(cell):
    card = cell_card(cell, record("tiny", "std", "ties"), None)
    assert "model-index" not in front(card) and "## Evaluation" not in card
    assert "Merged on cuda.\n\n## Tool versions" in card


# The seed's 4B cells of test_report, published, and its lora-nob baseline.
def evaluation(**scored: str) -> CardEvaluation:
    return CardEvaluation(rows=tuple(ROWS), baseline="lora-nob",
                          scored={row.id: scored.get(row.id, "1" * 64) for row in ROWS
                                  if row.kind == "cell"})


def section(card: str) -> str:
    return card[card.index(EVAL_START):card.index(EVAL_END)]


def test_the_root_card_shows_the_pivot_and_ranking_of_the_published_cells():
    card = render_root_card(seed_records(), CONTEXT, REPO, evaluation=evaluation())
    shown = section(card)
    assert card.index("## Evaluation") < card.index("## Notes")
    assert "### Per-task absolute scores (x 100, ± stderr)" in shown
    assert "| target | a | b |" in shown
    assert "| 4b-std/eng-nob__ties | 53.0 ± 1.0 | 41.0 ± 1.0 |" in shown
    assert "| 4b-std/lora-nob | 50.0 ± 1.0 | 40.0 ± 1.0 |" in shown
    assert "### 4b method ranking (Δ vs 4b-std/lora-nob, points)" in shown
    assert "| 1 | ties | +2.00 pp | +2.00 | +2.00 |\n| 2 | linear | +0.75 pp | +1.00 | +0.50 |" in shown
    # 1b-std ties has results but no baseline at its size: in the pivot, not ranked
    assert "| 1b-std/eng-nob__ties |" in shown and "### 1b method ranking" not in shown


def test_results_of_another_checkpoint_or_an_unpublished_cell_are_left_out():
    records = seed_records()
    del records["4b-open/eng-nob__linear"]
    card = render_root_card(records, CONTEXT, REPO,
                            evaluation=evaluation(**{"4b-std/eng-nob__ties": "2" * 64}))
    shown = section(card)
    assert "4b-std/eng-nob__ties" not in shown and "4b-open/eng-nob__linear" not in shown
    assert "| 4b-std/eng-nob__linear |" in shown


def test_a_published_record_without_an_output_hash_is_left_out_not_fatal():
    """A record written by an older bakery-slurm, or edited by hand, may lack `output`."""
    records = seed_records()
    del records["4b-std/eng-nob__ties"]["output"]
    shown = section(render_root_card(records, CONTEXT, REPO, evaluation=evaluation()))
    assert "| 4b-std/eng-nob__ties |" not in shown and "| 4b-std/eng-nob__linear |" in shown


def test_without_a_ranking_baseline_the_pivot_alone():
    no_ranking = CardEvaluation(rows=tuple(ROWS), scored=evaluation().scored, baseline=None)
    shown = section(render_root_card(seed_records(), CONTEXT, REPO, evaluation=no_ranking))
    assert "| 4b-std/lora-nob |" in shown and "method ranking" not in shown


def test_the_notes_survive_and_a_renderer_without_results_keeps_the_section():
    first = render_root_card(seed_records(), CONTEXT, REPO, evaluation=evaluation())
    edited = first.replace(DEFAULT_NOTES, "Evaluated on an H200, by hand as well.")
    again = render_root_card(seed_records(), CONTEXT, REPO, previous=edited)
    assert section(again) == section(first)
    assert "Evaluated on an H200, by hand as well." in again
    assert again.count(MANUAL_START) == again.count(MANUAL_END) == 1
    assert again.count(EVAL_START) == again.count(EVAL_END) == 1


def test_no_results_anywhere_no_section():
    card = render_root_card(seed_records(), CONTEXT, REPO)
    assert "## Evaluation" not in card and EVAL_START not in card


def test_the_root_card_names_what_its_ranking_did_not_compare():
    rows = (Row.of(Target("4b-std/eng-nob__ties", "cell", "ties"),
                   mmlu_results(0.60, (0.55, 0.65), belebele=0.90)),
            Row.of(Target("4b-std/lora-nob", "baseline", "lora-nob"),
                   mmlu_results(0.50, (0.45, 0.55), belebele=0.40, belebele_shots=0)))
    shown = section(render_root_card(seed_records(), CONTEXT, REPO, evaluation=CardEvaluation(
        rows=rows, baseline="lora-nob", scored={"4b-std/eng-nob__ties": "1" * 64})))
    assert "| 1 | ties | +10.00 pp | +10.00 |" in shown
    assert "Not compared with the baseline (scored with another n-shot, task version or number " \
           "of samples): 4b-std/eng-nob__ties: norbelebele_p0/acc" in shown


def test_a_cell_card_shows_a_perplexity_as_it_is(cell):
    results = {**RESULTS, "results": {**RESULTS["results"], "wikitext": {
        "alias": "wikitext", "word_perplexity,none": 20.31, "word_perplexity_stderr,none": "N/A"}}}
    card = cell_card(cell, record("tiny", "std", "ties"), results)
    assert "| wikitext/word_perplexity (as is) | 20.31 |" in card
    assert "| norbelebele_p0/acc | 69.9 ± 1.5 |" in card
