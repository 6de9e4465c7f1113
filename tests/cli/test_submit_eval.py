"""[eval] through submit, status and resubmit on this machine: the eval arrays as sbatch would get
them (--dry-run), which evals are skipped or started at once, and the chain run for real by the
local executor (merges that fail fast, so their evals never run, and a baseline whose eval fails).
The SLURM tier runs the same chain with the real lm-eval (tests/integration/test_slurm_eval.py).
"""

from __future__ import annotations

import json
import re
import shlex
from datetime import datetime, timezone
from pathlib import Path

from bakery_slurm.cell_status import CellStatus
from bakery_slurm.cli.submit import _evals_to_submit
from bakery_slurm.evaluation import expand_eval, results_path
from bakery_slurm.ledger import ArrayRecord, all_arrays, load_ledger
from bakery_slurm.manifest import write_marker
from bakery_slurm.matrix import expand, load_matrix
from bakery_slurm.pipeline import CellPaths
from bakery_slurm.stages import evaluate
from bakery_slurm.status_snapshot import Snapshot
from support import wait_for

from test_ledger_commands import CELLS, LEDGER, invoke, write_project

TASKS = Path(__file__).resolve().parents[1] / "eval_tasks"
BASELINE = "tiny-std/base"


def eval_project(root: Path) -> Path:
    matrix = write_project(root)
    matrix.write_text(matrix.read_text() + f"""
[runtime]
container = "none"

[eval]
tasks = ["tiny_mc"]
include_path = {json.dumps(str(TASKS))}
baselines = [{{ name = "base" }}]
resources = {{ time = "00:20:00" }}
""")
    return matrix


def test_dry_run_chains_each_eval_to_its_merge_task_and_starts_baselines_at_once(tmp_path):
    matrix = eval_project(tmp_path)
    result = invoke("submit", matrix, "--executor", "slurm", "--dry-run")
    assert result.exit_code == 0, result.output
    out = result.stdout
    merge_name = re.search(r"== merge array (\S+) \(slurm, 3 tasks\)", out).group(1)
    assert f"== eval array " in out and f"(slurm, 3 tasks, after {merge_name})" in out
    assert f"#SBATCH --dependency=aftercorr:{merge_name}" in out.splitlines()
    assert out.count("#SBATCH --kill-on-invalid-dep=yes") == 1  # the baseline waits for nothing
    assert re.search(r"== eval array \S+ \(slurm, 1 tasks\) resources .*\"time\": \"00:20:00\"", out)
    for target in [*CELLS, BASELINE]:
        assert f"-m bakery_slurm run-eval {matrix} {target} --work" in out
    assert "dry run: 3 array(s), 7 task(s)" in out
    no_eval = invoke("submit", matrix, "--executor", "slurm", "--dry-run", "--no-eval")
    assert "run-eval" not in no_eval.stdout and "dry run: 1 array(s), 3 task(s)" in no_eval.stdout
    assert not (tmp_path / LEDGER).exists()


def test_only_a_baseline_submits_its_eval_alone(tmp_path):
    matrix = eval_project(tmp_path)
    result = invoke("submit", matrix, "--executor", "slurm", "--dry-run", "--only", BASELINE)
    assert result.exit_code == 0, result.output
    assert "== merge array" not in result.stdout
    assert re.findall(r"-m bakery_slurm run-eval \S+ (\S+) --work", result.stdout) == [BASELINE]
    refused = invoke("submit", matrix, "--executor", "slurm", "--dry-run", "--only", BASELINE,
                     "--no-eval")
    assert refused.exit_code == 2 and "matches no cell of" in refused.stderr


def verified(work: Path, cell_id: str) -> str:
    """Fake a verified output for the cell, as verify records it; return its content hash."""
    paths = CellPaths(work, cell_id)
    paths.final.mkdir(parents=True)
    (paths.final / "model.safetensors").write_bytes(b"weights")
    sha = write_marker(paths.final, {})["content_sha256"]
    paths.verified.write_text(json.dumps({"final_sha256": sha}))
    return sha


def test_a_verified_cell_is_evaluated_at_once_and_an_evaluated_one_not_again(tmp_path):
    matrix_path = eval_project(tmp_path)
    matrix = load_matrix(matrix_path)
    cells = {c.id: c for c in expand(matrix)}
    targets = {t.id: t for t in expand_eval(matrix)}
    done, evaluated = CELLS[0], CELLS[1]
    for cell_id in (done, evaluated):
        cell = cells[cell_id]
        sha = verified(matrix.work_dir, cell_id)
        CellPaths(matrix.work_dir, cell_id).result.write_text(json.dumps(
            {"status": "done", "recipe_hash": cell.recipe_hash, "push": str(cell.push)}))
    results = results_path(matrix.work_dir, evaluated)
    results.parent.mkdir(parents=True)
    results.write_text(json.dumps({"bakery": {"settings_hash": targets[evaluated].settings_hash,
                                              "inputs": {"final_sha256": sha}}}))
    result = invoke("submit", matrix_path, "--executor", "slurm", "--dry-run")
    assert result.exit_code == 0, result.output
    assert f"skip {done}: already completed and published" in result.stderr
    assert f"skip {evaluated}: already evaluated with these settings (use --force)" in result.stderr
    out = result.stdout
    # One merge (CELLS[2]) with its eval chained; the done cell's eval and the baseline's at once.
    assert "(slurm, 1 tasks)" in out and re.search(r"\(slurm, 1 tasks, after bakery-\w+-0\)", out)
    assert re.search(r"== eval array \S+ \(slurm, 2 tasks\)", out)
    assert f"run-eval {matrix_path} {evaluated} " not in out
    forced = invoke("submit", matrix_path, "--executor", "slurm", "--dry-run", "--force")
    assert f"run-eval {matrix_path} {evaluated} " in forced.stdout


def test_a_published_cell_whose_outputs_gc_removed_is_not_evaluated_but_told_how(tmp_path):
    matrix_path = eval_project(tmp_path)
    matrix = load_matrix(matrix_path)
    cell = next(c for c in expand(matrix) if c.id == CELLS[0])
    paths = CellPaths(matrix.work_dir, cell.id)
    paths.root.mkdir(parents=True)  # published, then gc: the result record stays, final/ goes
    paths.result.write_text(json.dumps(
        {"status": "done", "recipe_hash": cell.recipe_hash, "push": str(cell.push)}))
    result = invoke("submit", matrix_path, "--executor", "slurm", "--dry-run")
    assert result.exit_code == 0, result.output
    assert (f"skip {cell.id}: eval not submitted: the cell has no verified output (gc removes a "
            f"published cell's) and no merge pending or running; `submit --force --only {cell.id}` "
            "merges it again and evaluates it") in result.stderr
    assert f"run-eval {matrix_path} {cell.id} " not in result.stdout
    again = invoke("submit", matrix_path, "--executor", "slurm", "--dry-run", "--force",
                   "--only", cell.id)
    assert again.exit_code == 0, again.output
    assert re.search(r"\(slurm, 1 tasks, after bakery-\w+-0\)", again.stdout)
    assert f"run-eval {matrix_path} {cell.id} " in again.stdout


def test_the_local_executor_runs_the_chain_and_resubmit_rechains_it(tmp_path):
    """Merges fail (the models hold no weights), so the scheduler side cancels their evals; the
    baseline's eval runs and fails. resubmit takes the merges with their evals chained again,
    and the baseline's eval alone."""
    matrix = eval_project(tmp_path)
    ledger = tmp_path / LEDGER
    submitted = invoke("submit", matrix, "--executor", "local", "--json", "--no-preflight",
                       "--ledger", ledger)
    assert submitted.exit_code == 0, submitted.output

    def settled_rows():
        result = invoke("status", "--ledger", ledger, "--json")
        rows = {r["cell"]: r for r in json.loads(result.stdout)}
        done = all(r["eval"] in ("FAILED", "CANCELLED", "COMPLETED") for r in rows.values())
        return (rows, result) if done else None

    # The baseline's eval imports lm-eval before it fails: seconds, more on a busy machine.
    rows, status = wait_for(settled_rows, "the merges and evals to end", deadline_s=180,
                            interval_s=0.5)
    assert {c: (r["state"], r["eval"]) for c, r in rows.items()} == {
        **{c: ("FAILED", "CANCELLED") for c in CELLS}, BASELINE: (None, "FAILED")}
    assert all(rows[c]["detail"] for c in CELLS)  # the merge's own failure
    assert {rows[c]["eval_detail"] for c in CELLS} == {"never ran: its merge ended FAILED"}
    # The baseline's eval says why it failed (its failure record), in the detail column too.
    assert rows[BASELINE]["eval_detail"].startswith(f"{BASELINE}: stage eval failed: ")
    assert rows[BASELINE]["detail"] == f"eval: {rows[BASELINE]['eval_detail']}"
    assert status.exit_code == 1
    table = invoke("status", "--ledger", ledger)
    assert "eval totals: CANCELLED 3, FAILED 1" in table.stdout
    assert re.search(rf"^{re.escape(BASELINE)}\s+-\s+FAILED", table.stdout, re.MULTILINE)
    log = invoke("logs", CELLS[0], "--eval", "--stderr", "--ledger", ledger)
    assert "(dependency never satisfied)" in log.stdout

    again = invoke("resubmit", "--ledger", ledger, "--json", "--no-preflight", "--dry-run")
    assert again.exit_code == 0, again.output
    actions = {(r["cell"], r["stage"]): r["action"] for r in json.loads(again.stdout)}
    assert set(actions) == {*((c, "merge") for c in CELLS), *((c, "eval") for c in CELLS),
                            (BASELINE, "eval")}
    merge_array = re.search(r"resubmitted in (\S+) ", actions[(CELLS[0], "merge")]).group(1)
    assert all(actions[(c, "eval")].endswith(f"after {merge_array}") for c in CELLS)
    assert "after" not in actions[(BASELINE, "eval")]
    arrays = all_arrays(load_ledger(ledger))
    assert [(a.stage, len(a.cells), a.after is not None) for a in arrays] == [
        ("merge", 3, False), ("eval", 3, True), ("eval", 1, False)]


def test_submit_force_evaluates_an_evaluated_target_again(tmp_path, monkeypatch):
    """`submit --force` of a target evaluated with the same settings on the same checkpoint: its
    eval task runs `run-eval --force`, which scores it again instead of keeping the results."""
    matrix_path = eval_project(tmp_path)
    matrix = load_matrix(matrix_path)
    cell = next(c for c in expand(matrix) if c.id == CELLS[0])
    verified(matrix.work_dir, cell.id)
    CellPaths(matrix.work_dir, cell.id).result.write_text(json.dumps(
        {"status": "done", "recipe_hash": cell.recipe_hash, "push": str(cell.push)}))
    calls = []

    def fake_simple_evaluate(*args):
        calls.append(args)
        return {"results": {"tiny_mc": {"acc,none": 0.25 * len(calls)}}}

    monkeypatch.setattr(evaluate, "_simple_evaluate", fake_simple_evaluate)
    first = invoke("run-eval", matrix_path, cell.id, "--device", "cpu")
    assert first.exit_code == 0, first.output
    assert len(calls) == 1

    forced = invoke("submit", matrix_path, "--executor", "slurm", "--dry-run", "--force",
                    "--only", cell.id)
    assert forced.exit_code == 0, forced.output
    line = next(l for l in forced.stdout.splitlines() if f" run-eval {matrix_path} {cell.id} " in l)
    argv = shlex.split(line)
    task_args = argv[argv.index("bakery_slurm") + 1:]  # what the eval task runs
    again = invoke(*task_args, "--device", "cpu")
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["status"] == "done"
    assert len(calls) == 2


def evals_beside_a_live_merge(tmp_path: Path, executor: str, job_id: str, state: str):
    """`_evals_to_submit` (for SLURM) of a verified cell whose merge from an earlier submit is
    `state` in an array of `executor`: (kept ids, chained, skipped)."""
    matrix = load_matrix(eval_project(tmp_path))
    cell = CELLS[0]
    verified(matrix.work_dir, cell)  # the previous merge's output, still verified
    target = next(t for t in expand_eval(matrix) if t.id == cell)
    array = ArrayRecord(name="bakery-abc-0", executor=executor, resources={},
                        folder=str(matrix.work_dir / "arrays" / "bakery-abc-0"), cells=[cell],
                        job_id=job_id, submitted=datetime.now(timezone.utc))
    merge = CellStatus(cell=cell, state=state, attempt=2, array_name=array.name,
                       array_job_id=job_id, index=0, recipe_hash="h")
    snap = Snapshot(statuses=[merge], arrays={array.name: array}, notes=[], evals=[])
    keep, live, skipped, _ = _evals_to_submit([target], set(), None, snap, matrix.work_dir,
                                              "slurm", force=False)
    return [t.id for t in keep], live, skipped


def test_the_eval_of_a_cell_being_merged_again_waits_for_that_merge(tmp_path):
    """A cell whose merge is pending from an earlier submit (`submit --force --no-eval`; this
    submit adds the evals) still has its older verified output in place: its eval waits for that
    merge instead of scoring the checkpoint the merge is about to replace."""
    keep, live, skipped = evals_beside_a_live_merge(tmp_path, "slurm", "1234", "PENDING")
    assert keep == [CELLS[0]] and live == {CELLS[0]: ("bakery-abc-0", 0)} and skipped == []


def test_the_eval_of_a_cell_whose_merge_cannot_be_chained_to_says_so(tmp_path):
    """A live merge this submit cannot wait for (another executor's, or one with no job id yet):
    the eval is not submitted, and the message names that merge."""
    keep, live, skipped = evals_beside_a_live_merge(tmp_path, "local", "local-1", "RUNNING")
    assert keep == [] and live == {}
    assert skipped == [(CELLS[0], "its merge is RUNNING in array bakery-abc-0, which this submit "
                                  "cannot chain to: submit again once it has ended")]
