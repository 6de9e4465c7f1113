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
from bakery_slurm.report import Row, model_index, tasks_off_hub
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


def test_model_index_is_the_hubs_format_one_result_per_task_on_a_hub_dataset():
    # hh_rlhf_no read a folder of the cluster: the Hub requires `dataset.type` and links it to
    # hf.co/datasets/<type>, which no name of that folder is.
    assert model_index(NAME, RESULTS) == [{"name": NAME, "results": [
        {"task": {"type": "text-generation"},
         "dataset": {"name": "norbelebele_p0", "type": "facebook/belebele", "config": "nob_Latn",
                     "split": "test", "args": {"num_few_shot": 5}},
         "metrics": [{"type": "acc", "value": 0.699, "name": "acc"}]},
    ]}]
    assert model_index(NAME, {"results": {}}) == []


def test_huggingface_hub_reads_the_model_index_back():
    from huggingface_hub.repocard_data import model_index_to_eval_results

    name, results = model_index_to_eval_results(model_index(NAME, GROUPS))
    assert name == NAME
    assert [(r.dataset_name, r.dataset_type, r.dataset_config, r.dataset_split, r.metric_value)
            for r in results] == [
        ("global_mmlu_full_en_stem", "CohereForAI/Global-MMLU", "en", "test", 0.6),
        ("global_mmlu_full_en_stem_college_physics", "CohereForAI/Global-MMLU", "en", "test", 0.55),
        ("global_mmlu_full_en_stem_high_school_biology", "CohereForAI/Global-MMLU", "en", "test",
         0.65),
        ("norbelebele_p0", "facebook/belebele", "nob_Latn", "test", 0.699)]


# lm-eval 0.4.13's results JSON, cut to what the cards read, for two groups with an aggregate:
# global_mmlu_full_en_stem, whose subtasks read one Hub dataset, and a suite of the user's
# (include_path) over a Hub dataset and a `json` builder over a file of the cluster. A group has
# no entry in `configs`: only its subtasks do.
GROUPS = {
    "results": {
        "global_mmlu_full_en_stem": {"alias": "global_mmlu_full_en_stem", "acc,none": 0.6,
                                     "acc_stderr,none": 0.03},
        "global_mmlu_full_en_stem_college_physics": {"alias": " - college_physics",
                                                     "acc,none": 0.55, "acc_stderr,none": 0.05},
        "global_mmlu_full_en_stem_high_school_biology": {"alias": " - high_school_biology",
                                                         "acc,none": 0.65, "acc_stderr,none": 0.05},
        "nor_suite": {"alias": "nor_suite", "acc,none": 0.5, "acc_stderr,none": 0.02},
        "norbelebele_p0": {"alias": " - norbelebele_p0", "acc,none": 0.699,
                           "acc_stderr,none": 0.015},
        "hh_rlhf_no": {"alias": " - hh_rlhf_no", "acc,none": 0.3, "acc_stderr,none": 0.02},
    },
    "groups": {"global_mmlu_full_en_stem": {"alias": "global_mmlu_full_en_stem", "acc,none": 0.6,
                                            "acc_stderr,none": 0.03},
               "nor_suite": {"alias": "nor_suite", "acc,none": 0.5, "acc_stderr,none": 0.02}},
    "group_subtasks": {"global_mmlu_full_en_stem": ["global_mmlu_full_en_stem_college_physics",
                                                    "global_mmlu_full_en_stem_high_school_biology"],
                       "nor_suite": ["norbelebele_p0", "hh_rlhf_no"]},
    "configs": {
        "global_mmlu_full_en_stem_college_physics": {
            "task": "global_mmlu_full_en_stem_college_physics", "tag": "global_mmlu_full_en_stem",
            "dataset_path": "CohereForAI/Global-MMLU", "dataset_name": "en",
            "test_split": "test", "fewshot_split": "dev"},
        "global_mmlu_full_en_stem_high_school_biology": {
            "task": "global_mmlu_full_en_stem_high_school_biology",
            "tag": "global_mmlu_full_en_stem", "dataset_path": "CohereForAI/Global-MMLU",
            "dataset_name": "en", "test_split": "test", "fewshot_split": "dev"},
        "norbelebele_p0": {"task": "norbelebele_p0", "dataset_path": "facebook/belebele",
                           "dataset_name": "nob_Latn", "test_split": "test"},
        "hh_rlhf_no": {"task": "hh_rlhf_no", "dataset_path": "json",
                       "dataset_kwargs": {"data_files": {
                           "test": "/cluster/projects/nn1234k/eval-tasks/hh_rlhf_no.jsonl"}},
                       "test_split": "test"},
    },
    "n-shot": {"global_mmlu_full_en_stem": 0, "global_mmlu_full_en_stem_college_physics": 0,
               "global_mmlu_full_en_stem_high_school_biology": 0, "nor_suite": 0,
               "norbelebele_p0": 0, "hh_rlhf_no": 0},
    "lm_eval_version": "0.4.13",
}


def test_a_group_is_named_by_the_hub_dataset_of_its_subtasks_or_left_out():
    """A group is no dataset: `dataset.type` named after it links to a page that does not
    exist. global_mmlu's subtasks all read CohereForAI/Global-MMLU (en, test); nor_suite's read a
    Hub dataset and a file of the cluster, which no one dataset id names."""
    entries = {entry["dataset"]["name"]: entry["dataset"]
               for entry in model_index(NAME, GROUPS)[0]["results"]}
    assert entries["global_mmlu_full_en_stem"] == {
        "name": "global_mmlu_full_en_stem", "type": "CohereForAI/Global-MMLU", "config": "en",
        "split": "test", "args": {"num_few_shot": 0}}
    # the json builder's task is no Hub dataset either; its Hub-read sibling stays
    assert "nor_suite" not in entries and "hh_rlhf_no" not in entries
    assert entries["norbelebele_p0"]["type"] == "facebook/belebele"
    assert tasks_off_hub(GROUPS) == ["nor_suite", "hh_rlhf_no"]


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


def test_a_cell_card_names_the_tasks_its_model_index_leaves_out(cell):
    from huggingface_hub import ModelCard

    card = cell_card(cell, record("tiny", "std", "ties"), GROUPS)
    assert ("Not in the `model-index`, whose entries name a Hub dataset: nor_suite, hh_rlhf_no "
            "(data\nread from elsewhere).") in card
    assert "| hh_rlhf_no/acc | 30.0 ± 2.0 |" in card and "/cluster" not in card
    parsed = ModelCard(card).data.eval_results  # as the Hub's clients read the metadata
    assert {r.dataset_type for r in parsed} == {"CohereForAI/Global-MMLU", "facebook/belebele"}


def test_scores_of_part_of_a_tasks_documents_say_so_in_the_card_and_model_index(cell):
    """lm-eval's `limit` scores the first 100 of norbelebele's 900 documents: no score on the
    task, though the card would show it as one."""
    limited = {**RESULTS, "n-samples": {"norbelebele_p0": {"original": 900, "effective": 100},
                                        "hh_rlhf_no": {"original": 500, "effective": 500}},
               "config": {**RESULTS["config"], "limit": 100}}
    card = cell_card(cell, record("tiny", "std", "ties"), limited)
    assert "| norbelebele_p0/acc | 69.9 ± 1.5 (on 100 of 900 documents) |" in card
    assert "| hh_rlhf_no/exact_match[strict-match] | 20.0 |" in card
    assert "scored on part of its task's documents (lm-eval's limit)" in card
    (entry,) = front(card)["model-index"][0]["results"]
    assert entry["metrics"] == [{"type": "acc", "value": 0.699,
                                 "name": "acc (on 100 of 900 documents)"}]
    assert "documents" not in cell_card(cell, record("tiny", "std", "ties"), RESULTS)


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
