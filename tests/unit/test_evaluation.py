"""[eval] expanded into eval targets (bakery_slurm.evaluation.expand_eval) on literal matrices,
pins on baselines, and the eval stage's refusal of an unverified cell (no lm-eval needed).
Bad [eval] tables are tested through the CLI in tests/cli/test_eval_config.py."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from bakery_slurm.cell_status import CellStatus
from bakery_slurm.errors import BakeryError, ConfigError, StageError
from bakery_slurm.eval_results import as_configured
from bakery_slurm.evaluation import (expand_eval, failure_path, is_evaluated, pin_target,
                                     read_eval_failure, results_path)
from bakery_slurm.ledger import ArrayRecord
from bakery_slurm.manifest import write_marker
from bakery_slurm.matrix import load_matrix
from bakery_slurm.pipeline import CellPaths
from bakery_slurm.stages import evaluate
from bakery_slurm.stages.evaluate import _model, run_eval
from bakery_slurm.status_snapshot import _eval_outcome
from conftest import MINIMAL_MATRIX
from support import held_lock, may_lock

EVAL_WITH_BASELINE = '[eval]\ntasks = ["mc"]\nbaselines = [{ name = "base" }]\n'
TWO_BY_TWO = MINIMAL_MATRIX.replace("[variants.std]\n", "[variants.std]\n[variants.open]\n").replace(
    "[sizes.tiny]\n", "[sizes.tiny]\n[sizes.big]\nresources = { mem = \"64G\" }\n")

EVAL = """
[resources]
time = "00:30:00"
mem = "8G"

[eval]
tasks = ["mc", "qa", "pref"]
include_path = "tasks"
num_fewshot = { mc = 5 }
limit = 0.5
batch_size = "auto"
only = { pref = ["big-*/*__ties", "*/lora-nob"] }
baselines = [{ name = "base" }, { name = "lora-nob", adapters = ["nob"], sizes = ["big"], variants = ["std"] }]
resources = { gpus_per_node = 1, time = "02:00:00" }
"""


@pytest.fixture
def targets(tmp_path, write_matrix):
    (tmp_path / "tasks").mkdir()
    return expand_eval(load_matrix(write_matrix(TWO_BY_TWO + EVAL)))


def test_cells_then_baselines_in_matrix_order(targets):
    assert [(t.id, t.kind, t.label) for t in targets] == [
        ("tiny-std/eng-nob__ties", "cell", "ties"),
        ("tiny-open/eng-nob__ties", "cell", "ties"),
        ("big-std/eng-nob__ties", "cell", "ties"),
        ("big-open/eng-nob__ties", "cell", "ties"),
        ("tiny-std/base", "baseline", "base"),
        ("tiny-open/base", "baseline", "base"),
        ("big-std/base", "baseline", "base"),
        ("big-open/base", "baseline", "base"),
        ("big-std/lora-nob", "baseline", "lora-nob"),
    ]


def test_only_narrows_a_task_to_the_targets_its_globs_name(targets):
    tasks = {t.id: t.tasks for t in targets}
    assert tasks["tiny-std/eng-nob__ties"] == ("mc", "qa")
    assert tasks["big-open/eng-nob__ties"] == ("mc", "qa", "pref")
    assert tasks["big-std/base"] == ("mc", "qa")
    assert tasks["big-std/lora-nob"] == ("mc", "qa", "pref")


def test_settings_fewshot_limit_batch_and_include_path(targets, tmp_path):
    target = targets[0]
    assert target.num_fewshot == {"mc": 5}
    assert (target.limit, target.batch_size) == (0.5, "auto")
    assert target.include_path == str((tmp_path / "tasks").resolve())
    assert target.settings["tasks"] == ["mc", "qa"]


def test_eval_resources_override_the_size_and_the_matrix(targets):
    by_id = {t.id: t.resources for t in targets}
    assert by_id["tiny-std/base"].model_dump(exclude_none=True) == {
        "mem": "8G", "time": "02:00:00", "gpus_per_node": 1}
    assert by_id["big-std/eng-nob__ties"].mem == "64G"
    assert by_id["big-std/eng-nob__ties"].time == "02:00:00"


def test_baselines_carry_the_base_and_their_adapter(targets, tmp_path):
    by_id = {t.id: t for t in targets}
    lora = by_id["big-std/lora-nob"]
    assert lora.base.path == str((tmp_path / "models/base-big").resolve())
    assert lora.adapter[0] == "nob"
    assert lora.adapter[1].path == str((tmp_path / "models/adapter-big-std-nob").resolve())
    assert by_id["big-std/base"].adapter is None
    assert by_id["big-std/eng-nob__ties"].base is None


def test_a_single_num_fewshot_applies_to_every_task(tmp_path, write_matrix):
    matrix = load_matrix(write_matrix(MINIMAL_MATRIX + '[eval]\ntasks = ["a", "b"]\nnum_fewshot = 0\n'))
    assert expand_eval(matrix)[0].num_fewshot == {"a": 0, "b": 0}


def test_excluded_size_variant_has_no_baseline(tmp_path, write_matrix):
    text = 'exclude = [{ size = "big", variant = "open" }]\n' + TWO_BY_TWO
    matrix = load_matrix(write_matrix(text + '[eval]\ntasks = ["a"]\nbaselines = [{ name = "base" }]\n'))
    assert "big-open/base" not in [t.id for t in expand_eval(matrix)]


def test_settings_hash_follows_the_settings(tmp_path, write_matrix):
    one = expand_eval(load_matrix(write_matrix(MINIMAL_MATRIX + '[eval]\ntasks = ["a"]\n')))[0]
    two = expand_eval(load_matrix(write_matrix(MINIMAL_MATRIX + '[eval]\ntasks = ["a"]\nlimit = 3\n')))[0]
    assert one.settings_hash != two.settings_hash


def test_the_settings_name_the_include_folder_as_the_matrix_does_not_where_it_is_mounted(
        tmp_path, write_matrix):
    """A login node and a container may mount the matrix folder at other paths (or resolve its
    symlinks otherwise): the settings, and so whether a target counts as evaluated, must not
    depend on it. The folder itself is still found where this process sees it."""
    def target(folder: str, include_path: str):
        (tmp_path / folder / "tasks").mkdir(parents=True)
        text = MINIMAL_MATRIX + f'[eval]\ntasks = ["a"]\ninclude_path = "{include_path}"\n'
        return expand_eval(load_matrix(write_matrix(text, name=f"{folder}/matrix.toml")))[0]

    login, container = target("login", "tasks"), target("container", "./tasks/")
    assert login.settings_hash == container.settings_hash
    assert login.settings["include_path"] == "tasks"
    assert container.include_path == str((tmp_path / "container/tasks").resolve())


def test_no_eval_table_means_no_targets(tmp_path, write_matrix):
    assert expand_eval(load_matrix(write_matrix(MINIMAL_MATRIX))) == []


def test_a_baseline_id_may_not_be_a_cell_id(tmp_path, write_matrix):
    text = MINIMAL_MATRIX + '[eval]\ntasks = ["a"]\nbaselines = [{ name = "eng-nob__ties" }]\n'
    with pytest.raises(ConfigError, match=r"eval\.baselines\.0\.name: the baseline id "
                       r"tiny-std/eng-nob__ties is a cell id too"):
        load_matrix(write_matrix(text))


def test_results_live_beside_the_cell(tmp_path):
    assert results_path(tmp_path, "4b-std/lora-nob") == tmp_path / "cells/4b-std/lora-nob/eval/results.json"


def test_the_readme_suite_is_a_valid_eval_table_for_the_repo_matrix(tmp_path):
    """README's Evaluation section writes the seed card's suite as [eval]: it must load with the
    repo's matrix and run the preference set on the card's 6 cells and its baseline only."""
    repo = Path(__file__).resolve().parents[2]
    section = (repo / "README.md").read_text().split("\n## Evaluation\n", 1)[1]
    table = section.split("```toml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "eval-tasks").mkdir()
    path = tmp_path / "matrix.toml"
    path.write_text((repo / "matrix.toml").read_text() + "\n" + table)
    targets = expand_eval(load_matrix(path))
    assert len(targets) == 14 + 1 + 6
    assert sorted(t.id for t in targets if "hh_rlhf_no" in t.tasks) == [
        "12b-open/eng-nob__ties", "12b-std/eng-nob__ties", "1b-std/eng-nob__ties",
        "4b-open/eng-nob__ties", "4b-std/eng-nob__ties", "4b-std/lora-nob"]
    assert {t.num_fewshot["norbelebele_p0"] for t in targets} == {5}


def test_pins_apply_to_a_baselines_hub_inputs(tmp_path, write_matrix):
    text = MINIMAL_MATRIX.replace('path = "models/base-{size}"', 'repo = "org/base-{size}"') + (
        '[eval]\ntasks = ["a"]\nbaselines = [{ name = "lora", adapters = ["nob"] }]\n')
    cell, lora = expand_eval(load_matrix(write_matrix(text)))
    commit = "a" * 40
    pinned = pin_target(lora, {"base": commit})
    assert (pinned.base.repo, pinned.base.commit) == ("org/base-tiny", commit)
    assert pinned.adapter == lora.adapter
    with pytest.raises(ConfigError, match=r"tiny-std/lora: --pin nob: a local folder cannot be pinned"):
        pin_target(lora, {"nob": commit})
    with pytest.raises(ConfigError, match=r"tiny-std/lora: --pin eng: not an input"):
        pin_target(lora, {"eng": commit})
    with pytest.raises(ConfigError, match=r"tiny-std/eng-nob__ties: --pin base: not an input"):
        pin_target(cell, {"base": commit})


@pytest.mark.parametrize("record", ["final_sha256", "step inputs"])
def test_a_cell_is_scored_only_on_its_verified_output(tmp_path, write_matrix, record):
    (target,) = expand_eval(load_matrix(write_matrix(MINIMAL_MATRIX + '[eval]\ntasks = ["a"]\n')))
    paths = CellPaths(tmp_path / "work", target.id)
    paths.final.mkdir(parents=True)
    (paths.final / "model.safetensors").write_bytes(b"weights")
    sha = write_marker(paths.final, {})["content_sha256"]
    verified = {"final_sha256": sha} if record == "final_sha256" else {"inputs": {"final": sha}}
    paths.verified.write_text(json.dumps(verified))
    assert _model(target, tmp_path / "work", offline=False)[0] == paths.final
    (paths.final / "model.safetensors").write_bytes(b"changed weights")  # not what verify saw
    with pytest.raises(StageError, match=r"stage eval failed: no verified output in"):
        run_eval(target, tmp_path / "work", device="cpu")
    assert not results_path(tmp_path / "work", target.id).exists()
    failure = read_eval_failure(tmp_path / "work", target.id)
    assert "stage eval failed: no verified output in" in failure["error"] and failure["finished"]


def verified_cell(work: Path, cell_id: str) -> None:
    """A cell with a verified (placeholder) output, as the pipeline leaves it."""
    paths = CellPaths(work, cell_id)
    paths.final.mkdir(parents=True)
    (paths.final / "model.safetensors").write_bytes(b"weights")
    paths.verified.write_text(json.dumps({"final_sha256": write_marker(paths.final, {})["content_sha256"]}))


def test_a_cells_eval_keeps_a_run_cell_of_it_from_replacing_its_output(tmp_path, write_matrix,
                                                                      monkeypatch):
    """A hand-run `run-eval` reads `final` while lm-eval runs: a run-cell of the same cell (which
    holds the cell's run lock exclusively) must not merge again and replace it meanwhile. Evals
    of the cell take the lock shared."""
    (target,) = expand_eval(load_matrix(write_matrix(MINIMAL_MATRIX + '[eval]\ntasks = ["a"]\n')))
    work = tmp_path / "work"
    verified_cell(work, target.id)
    cell_lock = CellPaths(work, target.id).lock
    seen = {}

    def fake_evaluate(*args):
        seen.update(run_cell=may_lock(cell_lock), reader=may_lock(cell_lock, shared=True))
        return {"results": {"a": {"acc,none": 1.0}}}

    monkeypatch.setattr(evaluate, "_simple_evaluate", fake_evaluate)
    assert run_eval(target, work, device="cpu")["status"] == "done"
    assert seen == {"run_cell": False, "reader": True}
    assert may_lock(cell_lock)  # released when the eval ends


def test_a_cells_eval_refuses_while_a_run_cell_of_it_runs(tmp_path, write_matrix, monkeypatch):
    (target,) = expand_eval(load_matrix(write_matrix(MINIMAL_MATRIX + '[eval]\ntasks = ["a"]\n')))
    work = tmp_path / "work"
    verified_cell(work, target.id)
    monkeypatch.setattr(evaluate, "_simple_evaluate", lambda *args: pytest.fail("evaluated"))
    cell_lock = CellPaths(work, target.id).lock
    with held_lock(cell_lock):
        with pytest.raises(BakeryError, match=r"a task is running this cell .*: evaluate it when "
                                              r"that run has ended"):
            run_eval(target, work, device="cpu")
    assert not results_path(work, target.id).exists()


def test_a_successful_eval_removes_the_failure_record(tmp_path, write_matrix, monkeypatch):
    from bakery_slurm.stages import evaluate

    (target,) = expand_eval(load_matrix(write_matrix(MINIMAL_MATRIX + '[eval]\ntasks = ["a"]\n')))
    work = tmp_path / "work"
    verified_cell(work, target.id)
    failure_path(work, target.id).parent.mkdir(parents=True)
    failure_path(work, target.id).write_text('{"error": "an earlier try", "finished": "2026-01-01"}')
    monkeypatch.setattr(evaluate, "_simple_evaluate", lambda *args: {"results": {"a": {"acc": 1.0}}})
    assert run_eval(target, work, device="cpu")["status"] == "done"
    assert read_eval_failure(work, target.id) == {} and not failure_path(work, target.id).exists()
    assert json.loads(results_path(work, target.id).read_text())["results"] == {"a": {"acc": 1.0}}


# ---------------------------------------------------------------------------------------------
# group_evals: which eval array waits for which merge task


def ids(groups):
    return [([t.id for t in g.targets], g.after, g.after_indices) for g in groups]


def test_evals_aligned_with_a_merge_array_wait_task_by_task(targets):
    from bakery_slurm.submission import group_evals

    # As grouped by resources, the tiny cells make one merge array, the big ones another.
    tiny = [t.id for t in targets if t.kind == "cell" and t.size == "tiny"]
    big = [t.id for t in targets if t.kind == "cell" and t.size == "big"]
    groups = group_evals(targets, {"m0": tiny, "m1": big}, {}, 1001)
    assert ids(groups) == [
        (tiny, "m0", [0, 1]), (big, "m1", [0, 1]),
        (["tiny-std/base", "tiny-open/base"], None, None),  # baselines: by resources, at once
        (["big-std/base", "big-open/base", "big-std/lora-nob"], None, None)]


def test_evals_that_do_not_line_up_wait_one_job_each(targets):
    from bakery_slurm.submission import group_evals

    tiny_std, tiny_open, big_std, _ = [t for t in targets if t.kind == "cell"]
    # The merge array also runs a cell with no eval target first: indices no longer correspond.
    groups = group_evals([tiny_open, big_std], {"m0": ["x", tiny_open.id, big_std.id]}, {}, 1001)
    assert ids(groups) == [([tiny_open.id], "m0", [1]), ([big_std.id], "m0", [2])]
    # A merge still queued from an earlier submission: its cell's eval waits for that task.
    groups = group_evals([tiny_std, big_std], {}, {tiny_std.id: ("old", 3)}, 1001)
    assert ids(groups) == [([tiny_std.id], "old", [3]), ([big_std.id], None, None)]


def test_evals_with_other_resources_than_their_merge_array_mates_wait_one_job_each(targets):
    import dataclasses

    from bakery_slurm.submission import group_evals

    first, second = [t for t in targets if t.kind == "cell"][:2]
    longer = dataclasses.replace(second, resources=second.resources.model_copy(
        update={"time": "09:00:00"}))
    groups = group_evals([first, longer], {"m0": [first.id, second.id]}, {}, 1001)
    assert ids(groups) == [([first.id], "m0", [0]), ([second.id], "m0", [1])]


def test_a_baselines_inputs_are_checked_and_pinned_through_a_cell_reading_them(tmp_path,
                                                                             write_matrix):
    from bakery_slurm.evaluation import baseline_carriers
    from bakery_slurm.pins import cell_inputs

    (tmp_path / "tasks").mkdir()
    matrix = load_matrix(write_matrix(TWO_BY_TWO + EVAL))
    targets = {t.id: t for t in expand_eval(matrix)}
    carriers = baseline_carriers(matrix, [targets["big-std/lora-nob"], targets["tiny-open/base"],
                                          targets["big-std/base"], targets["big-std/eng-nob__ties"]])
    assert [(c.size, c.variant) for c in carriers] == [("tiny", "open"), ("big", "std")]
    lora = targets["big-std/lora-nob"]
    carried = {s.key for s in cell_inputs(carriers[1]).values()}
    assert {lora.base.key, lora.adapter[1].key} <= carried


def test_a_baseline_scored_in_another_dtype_is_not_taken_as_evaluated(tmp_path, write_matrix):
    """lm-eval loads a baseline in the matrix's dtype, so its scores depend on it (a cell's
    checkpoint changes with it anyway): a dtype change evaluates the baseline again."""
    def baseline(dtype: str):
        text = f'dtype = "{dtype}"\n' + MINIMAL_MATRIX + EVAL_WITH_BASELINE
        return next(t for t in expand_eval(load_matrix(write_matrix(text))) if t.kind == "baseline")

    old, new = baseline("float32"), baseline("bfloat16")
    assert not is_evaluated(new, {"settings_hash": old.settings_hash, "settings": old.settings}, None)
    assert is_evaluated(new, {"settings_hash": new.settings_hash, "settings": new.settings}, None)


LORA_BASELINE = '[eval]\ntasks = ["a"]\nbaselines = [{ name = "lora", adapters = ["nob"] }]\n'


def baseline_of(write_matrix, text: str):
    return next(t for t in expand_eval(load_matrix(write_matrix(text))) if t.kind == "baseline")


def test_a_baseline_whose_adapter_changed_is_not_taken_as_evaluated(tmp_path, write_matrix,
                                                                     monkeypatch):
    """Same baseline name, another model: its adapter moved to another folder, or it attaches
    another of the matrix's adapters. Its results scored the old model, so submit evaluates it
    again and report and the cards leave them out, as a cell's of another checkpoint."""
    for folder in ("base-tiny", "adapter-tiny-std-nob", "adapter-tiny-std-eng", "retrained-tiny-std-nob"):
        (tmp_path / "models" / folder).mkdir(parents=True)
        (tmp_path / "models" / folder / "weights.safetensors").write_bytes(folder.encode())
    before = baseline_of(write_matrix, MINIMAL_MATRIX + LORA_BASELINE)
    work = tmp_path / "work"
    monkeypatch.setattr(evaluate, "_simple_evaluate", lambda *args: {"results": {"a": {"acc,none": 1.0}}})
    assert run_eval(before, work, device="cpu")["status"] == "done"
    results = json.loads(results_path(work, before.id).read_text())
    assert is_evaluated(before, results["bakery"], None) and as_configured(before, results)
    moved = baseline_of(write_matrix, MINIMAL_MATRIX.replace("adapter-{size}", "retrained-{size}")
                        + LORA_BASELINE)
    other = baseline_of(write_matrix, MINIMAL_MATRIX + LORA_BASELINE.replace('["nob"]', '["eng"]'))
    for changed in (moved, other):
        assert changed.id == before.id and changed.settings_hash == before.settings_hash
        assert not is_evaluated(changed, results["bakery"], None)
        assert not as_configured(changed, results)


def test_a_hub_baseline_at_another_revision_or_pinned_commit_is_not_taken_as_evaluated(
        tmp_path, write_matrix):
    hub = MINIMAL_MATRIX.replace('path = "models/base-{size}"', 'repo = "org/base-{size}"')
    target = baseline_of(write_matrix, hub + EVAL_WITH_BASELINE)
    scored = {"repo": "org/base-tiny", "subfolder": None, "revision": None, "commit": "a" * 40}
    record = {"settings_hash": target.settings_hash, "inputs": {"base": scored}}
    assert is_evaluated(target, record, None)
    assert is_evaluated(pin_target(target, {"base": "a" * 40}), record, None)
    assert not is_evaluated(pin_target(target, {"base": "b" * 40}), record, None)
    revised = baseline_of(write_matrix, hub.replace('repo = "org/base-{size}"',
                                                    'repo = "org/base-{size}"\nrevision = "v2"')
                          + EVAL_WITH_BASELINE)
    assert not is_evaluated(revised, record, None)


def test_a_cells_settings_leave_the_dtype_to_its_checkpoint(tmp_path, write_matrix):
    """A cell's dtype is in its checkpoint's hash already: results scored before the dtype joined
    the baselines' settings still score the cell."""
    def cell(dtype: str):
        text = f'dtype = "{dtype}"\n' + MINIMAL_MATRIX + EVAL_WITH_BASELINE
        return next(t for t in expand_eval(load_matrix(write_matrix(text))) if t.kind == "cell")

    assert cell("float32").settings_hash == cell("bfloat16").settings_hash
    assert "dtype" not in cell("bfloat16").settings


def test_without_accounting_an_eval_task_that_kept_its_results_is_completed(
        tmp_path, write_matrix, monkeypatch):
    """An eval task that kept the results of the same model and settings (a chained eval after a
    merge that rebuilt the same bytes) notes when it checked them: without accounting, `status`
    tells by that note that the task ran and succeeded (COMPLETED, not LOST)."""
    (target,) = expand_eval(load_matrix(write_matrix(MINIMAL_MATRIX + '[eval]\ntasks = ["a"]\n')))
    work = tmp_path / "work"
    verified_cell(work, target.id)
    monkeypatch.setattr(evaluate, "_simple_evaluate", lambda *args: {"results": {"a": {"acc,none": 1.0}}})
    assert run_eval(target, work, device="cpu")["status"] == "done"
    # Rewind the first results' time: they were written by an earlier submission.
    out = results_path(work, target.id)
    stored = json.loads(out.read_text())
    stored["bakery"]["finished"] = (datetime.now(timezone.utc) - timedelta(hours=1)).isoformat()
    out.write_text(json.dumps(stored))

    array = ArrayRecord(name="bakery-abc-1", executor="slurm", resources={}, stage="eval",
                        folder=str(work / "arrays" / "bakery-abc-1"), cells=[target.id],
                        submitted=datetime.now(timezone.utc) - timedelta(minutes=5))
    # The task of that array ran (and exited 0) ...
    assert run_eval(target, work, device="cpu")["status"] == "skipped"
    # ... and has left squeue; no accounting.
    gone = CellStatus(cell=target.id, state="NOT_FOUND", attempt=2, array_name=array.name,
                      array_job_id="42", index=0, recipe_hash="h", stage="eval")
    assert _eval_outcome(gone, {array.name: array}) == "COMPLETED"
