"""The evaluation report's pure functions (bakery_slurm.report) on literal lm-eval results."""

from __future__ import annotations

import csv
import io

import pytest

from bakery_slurm.errors import ConfigError
from bakery_slurm.output import display_width
from bakery_slurm.report import (Row, lower_is_better, metrics, not_compared, pivot, ranking, render,
                                  to_csv)

# The shape of lm-eval 0.4's results table: "<metric>,<filter>" and "<metric>_stderr,<filter>".
RESULTS = {
    "results": {
        "norbelebele_p0": {"alias": "norbelebele_p0", "sample_len": 900, "acc,none": 0.699,
                           "acc_stderr,none": 0.015, "acc_norm,none": 0.7,
                           "acc_norm_stderr,none": 0.0152},
        "norquad_p0": {"alias": "norquad_p0", "exact_match,strict-match": 0.2,
                       "exact_match_stderr,strict-match": "N/A", "f1,strict-match": 0.384,
                       "f1_stderr,strict-match": 0.01},
    },
    "versions": {"norbelebele_p0": 1.0, "norquad_p0": 2.0},
}


def test_metrics_reads_values_and_stderrs_and_skips_text():
    assert metrics(RESULTS) == {
        "norbelebele_p0/acc": (0.699, 0.015),
        "norbelebele_p0/acc_norm": (0.7, 0.0152),
        "norquad_p0/exact_match[strict-match]": (0.2, None),
        "norquad_p0/f1[strict-match]": (0.384, 0.01),
    }


def row(target: str, kind: str, label: str, **values: float) -> Row:
    size_variant = target.split("/")[0]
    size, variant = size_variant.split("-")
    return Row(id=target, kind=kind, size=size, variant=variant, label=label,
               values={task: (value, 0.01) for task, value in values.items()})


# The seed's 4B ranking, on two metrics: deltas in points are (cell - baseline) x 100, averaged
# over the metrics, then over std and open.
ROWS = [
    row("4b-std/eng-nob__linear", "cell", "linear", a=0.52, b=0.40),
    row("4b-std/eng-nob__ties", "cell", "ties", a=0.53, b=0.41),
    row("4b-open/eng-nob__linear", "cell", "linear", a=0.51, b=0.40),
    row("4b-open/eng-nob__ties", "cell", "ties", a=0.50, b=0.44),
    row("1b-std/eng-nob__ties", "cell", "ties", a=0.30, b=0.20),
    row("4b-std/lora-nob", "baseline", "lora-nob", a=0.50, b=0.40),
]


def test_ranking_against_one_baseline_row_per_variant_and_overall():
    ranked = ranking(ROWS, "4b-std/lora-nob")
    assert [(e["size"], e["rank"], e["method"]) for e in ranked] == [
        ("4b", 1, "ties"), ("4b", 2, "linear")]
    ties, linear = ranked
    # ties: std ((0.53-0.50) + (0.41-0.40)) / 2 = 2.0 pp; open ((0.50-0.50) + (0.44-0.40)) / 2 = 2.0
    assert ties["variants"] == pytest.approx({"std": 2.0, "open": 2.0})
    assert ties["mean"] == pytest.approx(2.0)
    # linear: std (2 + 0) / 2 = 1.0; open (1 + 0) / 2 = 0.5; mean 0.75
    assert linear["variants"] == pytest.approx({"std": 1.0, "open": 0.5})
    assert linear["mean"] == pytest.approx(0.75)
    assert linear["references"] == {"std": "4b-std/lora-nob", "open": "4b-std/lora-nob"}


def test_a_baseline_name_compares_each_cell_with_its_own_size_and_variant():
    rows = [row("1b-std/eng-nob__ties", "cell", "ties", a=0.30),
            row("1b-open/eng-nob__ties", "cell", "ties", a=0.40),
            row("1b-std/base", "baseline", "base", a=0.25),
            row("1b-open/base", "baseline", "base", a=0.41)]
    (ties,) = ranking(rows, "base")
    assert ties["variants"] == pytest.approx({"std": 5.0, "open": -1.0})
    assert ties["mean"] == pytest.approx(2.0)
    assert ties["references"] == {"std": "1b-std/base", "open": "1b-open/base"}


def test_only_shared_metrics_count():
    rows = [row("4b-std/eng-nob__ties", "cell", "ties", a=0.6, pref=0.9),
            row("4b-std/base", "baseline", "base", a=0.5)]
    (ties,) = ranking(rows, "base")
    assert ties["variants"]["std"] == pytest.approx(10.0)
    assert ties["metrics"] == {"std": 1}


def test_an_unknown_baseline_is_named():
    with pytest.raises(ConfigError, match=r"--baseline nope: no results for such a baseline "
                       r"\(baselines with results: lora-nob\)"):
        ranking(ROWS, "nope")


def test_render_lays_out_pivot_and_ranking_as_the_seed_card():
    text = render(ROWS, ranking(ROWS, "lora-nob"), markdown=True)
    assert "| target | a | b |\n|---|---|---|\n| 4b-std/eng-nob__linear | 52.0 ± 1.0 | 40.0 ± 1.0 |" in text
    assert "### 4b method ranking (Δ vs 4b-std/lora-nob, points)\n" in text
    assert "| # | Method | Mean Δ over (std, open) | std | open |" in text
    assert "| 1 | ties | +2.00 pp | +2.00 | +2.00 |" in text
    assert "| 2 | linear | +0.75 pp | +1.00 | +0.50 |" in text


def test_pivot_marks_what_a_row_did_not_run():
    rows = [row("4b-std/eng-nob__ties", "cell", "ties", a=0.6, pref=0.9),
            row("4b-std/base", "baseline", "base", a=0.5)]
    assert pivot(rows) == ["a", "pref"]
    assert "\n4b-std/base           50.0 ± 1.0  —\n" in render(rows, [], markdown=False)


def test_text_columns_line_up_on_screen_with_wide_characters():
    """A CJK task name takes two terminal columns per character: padding by len() would push
    every later column of its line left of the header's."""
    rows = [row("4b-std/eng-nob__ties", "cell", "ties", **{"理解": 0.6, "b": 0.5}),
            row("4b-std/base", "baseline", "base", **{"理解": 0.5, "b": 0.4})]
    header, first, _ = render(rows, [], markdown=False).splitlines()[1:4]
    assert header == f"{'target':20}  理解{' ' * 6}  b"  # 理解 is 4 columns wide, 2 characters
    assert first == "4b-std/eng-nob__ties  60.0 ± 1.0  50.0 ± 1.0"
    assert display_width(header) == display_width(first) - len("50.0 ± 1.0") + 1


def test_csv_has_raw_values_and_empty_cells_for_tasks_not_run():
    rows = [row("4b-std/eng-nob__ties", "cell", "ties", a=0.6, pref=0.9),
            row("4b-std/base", "baseline", "base", a=0.5)]
    table = list(csv.reader(io.StringIO(to_csv(rows, pivot(rows)))))
    assert table[0] == ["target", "kind", "size", "variant", "label", "a", "a_stderr", "pref",
                        "pref_stderr"]
    assert table[2] == ["4b-std/base", "baseline", "4b", "std", "base", "0.5", "0.01", "", ""]


def test_lower_is_better_metrics_count_with_their_sign_flipped():
    results = {"results": {"wiki": {"word_perplexity,none": 20.0, "acc,none": 0.5}},
               "higher_is_better": {"wiki": {"word_perplexity": False, "acc": True}}}
    assert lower_is_better(results) == {"wiki/word_perplexity"}
    lower = frozenset({"ppl"})
    rows = [Row("4b-std/eng-nob__ties", "cell", "4b", "std", "ties",
                {"ppl": (0.20, None), "acc": (0.55, None)}, lower),
            Row("4b-std/base", "baseline", "4b", "std", "base",
                {"ppl": (0.25, None), "acc": (0.50, None)}, lower)]
    (ties,) = ranking(rows, "base")
    # ppl fell by 5 points (better: +5), acc rose by 5 points (+5)
    assert ties["variants"]["std"] == pytest.approx(5.0)


class Target:
    """The fields of an eval target that `Row.of` reads."""

    def __init__(self, target_id: str, kind: str, label: str):
        self.id, self.kind, self.label = target_id, kind, label
        self.size, self.variant = target_id.split("/")[0].split("-")


def mmlu_results(stem: float, subtasks: tuple[float, float], belebele: float,
                 belebele_shots: int = 5) -> dict:
    """lm-eval 0.4.13's results JSON for a group with an aggregate (global_mmlu_full_en_stem:
    `aggregate_metric_list` acc, weighted by size) over two subtasks, and a plain task: the
    group's aggregate and every subtask are entries of `results` alike."""
    physics, biology = subtasks
    return {
        "results": {
            "global_mmlu_full_en_stem": {"alias": "global_mmlu_full_en_stem",
                                         "name": "global_mmlu_full_en_stem", "sample_len": 200,
                                         "acc,none": stem, "acc_stderr,none": 0.03},
            "global_mmlu_full_en_stem_college_physics": {
                "alias": " - college_physics", "name": "global_mmlu_full_en_stem_college_physics",
                "sample_len": 100, "acc,none": physics, "acc_stderr,none": 0.05},
            "global_mmlu_full_en_stem_high_school_biology": {
                "alias": " - high_school_biology",
                "name": "global_mmlu_full_en_stem_high_school_biology",
                "sample_len": 100, "acc,none": biology, "acc_stderr,none": 0.05},
            "norbelebele_p0": {"alias": "norbelebele_p0", "name": "norbelebele_p0",
                               "sample_len": 900, "acc,none": belebele, "acc_stderr,none": 0.015},
        },
        "groups": {"global_mmlu_full_en_stem": {"alias": "global_mmlu_full_en_stem",
                                                "acc,none": stem, "acc_stderr,none": 0.03}},
        "group_subtasks": {"global_mmlu_full_en_stem": [
            "global_mmlu_full_en_stem_college_physics",
            "global_mmlu_full_en_stem_high_school_biology"]},
        "versions": {"global_mmlu_full_en_stem": 0.0,
                     "global_mmlu_full_en_stem_college_physics": 0.0,
                     "global_mmlu_full_en_stem_high_school_biology": 0.0, "norbelebele_p0": 1.0},
        "n-shot": {"global_mmlu_full_en_stem": 0, "global_mmlu_full_en_stem_college_physics": 0,
                   "global_mmlu_full_en_stem_high_school_biology": 0,
                   "norbelebele_p0": belebele_shots},
        "higher_is_better": {"global_mmlu_full_en_stem": {"acc": True},
                             "global_mmlu_full_en_stem_college_physics": {"acc": True},
                             "global_mmlu_full_en_stem_high_school_biology": {"acc": True},
                             "norbelebele_p0": {"acc": True}},
        "n-samples": {"global_mmlu_full_en_stem_college_physics": {"original": 100, "effective": 100},
                      "global_mmlu_full_en_stem_high_school_biology": {"original": 100,
                                                                      "effective": 100},
                      "norbelebele_p0": {"original": 900, "effective": 900}},
    }


def test_a_group_counts_once_in_the_ranking_by_its_aggregate_not_by_each_subtask():
    """Two tasks were asked for, a group and a plain task: each weighs the same in the delta.
    Counting the subtasks as well would weigh the group three times (and mmlu's 57 subtasks
    would outweigh every other task 58 to 1)."""
    rows = [Row.of(Target("4b-std/eng-nob__ties", "cell", "ties"),
                   mmlu_results(0.60, (0.55, 0.65), belebele=0.70)),
            Row.of(Target("4b-std/base", "baseline", "base"),
                   mmlu_results(0.50, (0.45, 0.55), belebele=0.80))]
    (ties,) = ranking(rows, "base")
    # (+10 for the group's acc, -10 for norbelebele's) / 2
    assert ties["variants"]["std"] == pytest.approx(0.0)
    assert ties["metrics"] == {"std": 2}
    # the pivot still shows every subtask
    assert "global_mmlu_full_en_stem_college_physics/acc" in pivot(rows)


def test_a_task_scored_with_another_n_shot_than_the_baseline_is_not_compared_but_named():
    """The cell's norbelebele ran 5-shot, the baseline's 0-shot (its YAML was edited between the
    two evals, which leaves both as configured): its delta says nothing of the merge."""
    rows = [Row.of(Target("4b-std/eng-nob__ties", "cell", "ties"),
                   mmlu_results(0.60, (0.55, 0.65), belebele=0.90)),
            Row.of(Target("4b-std/base", "baseline", "base"),
                   mmlu_results(0.50, (0.45, 0.55), belebele=0.40, belebele_shots=0))]
    (ties,) = ranking(rows, "base")
    assert ties["variants"]["std"] == pytest.approx(10.0)  # the group's acc alone
    assert not_compared(rows, "base") == {"4b-std/eng-nob__ties": ["norbelebele_p0/acc"]}
    text = render(rows, [ties], markdown=True, not_compared=not_compared(rows, "base"))
    assert ("Not compared with the baseline (scored with another n-shot, task version or number "
            "of samples): 4b-std/eng-nob__ties: norbelebele_p0/acc") in text


def test_a_subtask_scored_otherwise_keeps_its_group_from_being_compared():
    cell = mmlu_results(0.60, (0.55, 0.65), belebele=0.70)
    cell["n-shot"]["global_mmlu_full_en_stem_college_physics"] = 5
    rows = [Row.of(Target("4b-std/eng-nob__ties", "cell", "ties"), cell),
            Row.of(Target("4b-std/base", "baseline", "base"),
                   mmlu_results(0.50, (0.45, 0.55), belebele=0.80))]
    assert not_compared(rows, "base") == {"4b-std/eng-nob__ties": ["global_mmlu_full_en_stem/acc"]}
    (ties,) = ranking(rows, "base")
    assert ties["variants"]["std"] == pytest.approx(-10.0)


def wikitext_results(word_perplexity: float, acc: float) -> dict:
    """lm-eval's wikitext (word_perplexity, bits_per_byte: lower is better, not fractions) and
    an accuracy task."""
    return {"results": {"wikitext": {"alias": "wikitext", "word_perplexity,none": word_perplexity,
                                     "word_perplexity_stderr,none": "N/A",
                                     "bits_per_byte,none": 0.8, "bits_per_byte_stderr,none": "N/A"},
                        "norbelebele_p0": {"alias": "norbelebele_p0", "acc,none": acc,
                                           "acc_stderr,none": 0.015}},
            "higher_is_better": {"wikitext": {"word_perplexity": False, "bits_per_byte": False},
                                 "norbelebele_p0": {"acc": True}}}


def test_metrics_that_are_not_fractions_are_shown_as_they_are_and_left_out_of_the_delta():
    """A perplexity 5 lower is no 500 points: in the delta it would outweigh every accuracy."""
    rows = [Row.of(Target("4b-std/eng-nob__ties", "cell", "ties"), wikitext_results(20.0, 0.70)),
            Row.of(Target("4b-std/base", "baseline", "base"), wikitext_results(25.0, 0.72))]
    (ties,) = ranking(rows, "base")
    assert ties["variants"]["std"] == pytest.approx(-2.0)  # norbelebele's acc alone
    assert ties["metrics"] == {"std": 1}
    text = render(rows, [ties], markdown=True)
    assert ("| target | wikitext/word_perplexity (as is) | wikitext/bits_per_byte (as is) "
            "| norbelebele_p0/acc |") in text
    assert "| 4b-std/eng-nob__ties | 20 | 0.8 | 70.0 ± 1.5 |" in text


def test_a_score_of_part_of_a_tasks_documents_is_marked_in_the_report():
    """lm-eval's `limit` (50 of each subtask's 100 documents): the group's score is one on 100 of
    its 200 documents, and says so; the full norbelebele is shown as it is."""
    results = mmlu_results(0.60, (0.55, 0.65), belebele=0.70)
    for subtask in results["group_subtasks"]["global_mmlu_full_en_stem"]:
        results["n-samples"][subtask] = {"original": 100, "effective": 50}
    row = Row.of(Target("4b-std/eng-nob__ties", "cell", "ties"), results)
    assert row.partial["global_mmlu_full_en_stem/acc"] == (100, 200)
    assert "norbelebele_p0/acc" not in row.partial
    text = render([row], [], markdown=True)
    assert ("| 4b-std/eng-nob__ties | 60.0 ± 3.0 (on 100 of 200 documents) "
            "| 55.0 ± 5.0 (on 50 of 100 documents) | 65.0 ± 5.0 (on 50 of 100 documents) "
            "| 70.0 ± 1.5 |") in text
    assert "was scored on part of its task's documents (lm-eval's limit)" in text
    assert "documents" not in render([Row.of(Target("4b-std/eng-nob__ties", "cell", "ties"),
                                             mmlu_results(0.60, (0.55, 0.65), 0.70))], [], True)
