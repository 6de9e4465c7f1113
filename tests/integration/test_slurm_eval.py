"""Evaluation chained to the merges on the real SLURM cluster (`-m slurm`), with the real lm-eval
in the stand-in image and the small local task of tests/eval_tasks.

One submission, `chained`, of two sizes: `good` and `bad`, whose `eng` adapter holds garbage, so
its merge fails. The task's validation file is missing at first, so every eval that runs fails;
the baseline `base` is evaluated at `good` only. Then the file and the adapter are restored and
`resubmit` runs exactly what failed: the bad merge with its eval chained again, the good cell's
eval alone (no second merge), the baseline's eval.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import pytest

from bakery_slurm.ledger import all_arrays, load_ledger

from .test_slurm import cid, size, with_corrupt_adapter, write_matrix

pytestmark = pytest.mark.slurm

TASKS = Path(__file__).resolve().parents[1] / "eval_tasks"
GOOD, BAD = cid("good", "linear"), cid("bad", "linear")
BASELINE = "good-std/base"


def eval_table(include: Path) -> str:
    return f"""
[eval]
tasks = ["tiny_mc"]
include_path = {json.dumps(str(include))}
limit = 4
baselines = [{{ name = "base", sizes = ["good"] }}]
resources = {{ time = "00:10:00" }}
"""


def task_times(arrays: list) -> dict[str, tuple[str, datetime | None, datetime | None]]:
    """Task id -> (state, start, end) of the tasks of `arrays` (ledger `ArrayRecord`s) from
    accounting, asked by job id and name: a cluster set up afresh numbers its jobs from 1 again,
    and accounting keeps earlier jobs' rows under the same ids."""
    out = subprocess.run(["sacct", "-X", "-P", "-n", "-o", "JobID,State,Start,End",
                          "-j", ",".join(a.job_id for a in arrays),
                          "--name=" + ",".join(a.name for a in arrays)],
                         capture_output=True, text=True, check=True).stdout

    def when(text: str) -> datetime | None:
        return None if text in ("None", "Unknown", "") else datetime.fromisoformat(text)

    times, ranges = {}, {}
    for job, state, start, end in (line.split("|") for line in out.splitlines()):
        row = (state.split()[0], when(start), when(end))
        if "_[" not in job:
            times[job] = row
            continue
        # A task that never started may have no row of its own, only its array's range
        # (`4_[1]`, `4_[0-1%2]`): each index of the range gets the range's row.
        array, spec = job.rstrip("]").split("_[")
        for part in spec.split("%")[0].split(","):
            first, _, last = part.partition("-")
            ranges.update({f"{array}_{i}": row for i in range(int(first), int(last or first) + 1)})
    return {**ranges, **times}


def task_of(ledger, stage: str, target: str, attempt: int = -1) -> str:
    """The SLURM task id that ran one attempt of a target at a stage."""
    record = (ledger.cells if stage == "merge" else ledger.evals)[target][attempt]
    array = next(a for a in all_arrays(ledger) if a.name == record.array)
    return array.job_id if len(array.cells) == 1 else f"{array.job_id}_{record.index}"


@pytest.fixture(scope="module")
def chained(tmp_path_factory, tiny_models, bakery):
    root = tmp_path_factory.mktemp("chained")
    bad_models = root / "bad-models"
    corrupt, good_adapter = with_corrupt_adapter(tiny_models, bad_models)
    include = root / "eval_tasks"
    shutil.copytree(TASKS, include)
    data = include / "tiny_mc.validation.jsonl"
    hidden = data.rename(data.with_suffix(".hidden"))
    matrix = write_matrix(root, {"good": size(tiny_models, "text", ["linear"]),
                                 "bad": size(bad_models, "text", ["linear"])})
    matrix.write_text(matrix.read_text() + eval_table(include))
    ledger = root / "bakery-ledger.json"
    seen = SimpleNamespace(root=root, matrix=matrix, ledger=ledger)
    seen.submitted = json.loads(bakery.ok("submit", matrix, "--executor", "slurm", "--json",
                                          ledger=ledger).stdout)
    seen.rows = bakery.wait_settled(ledger)
    seen.first = load_ledger(ledger)
    seen.status = bakery.run("status", ledger=ledger)
    seen.eval_log = bakery.ok("logs", GOOD, "--eval", "--stderr", ledger=ledger).stdout

    hidden.rename(data)
    corrupt.write_bytes(good_adapter)
    seen.resubmitted = json.loads(bakery.ok("resubmit", "--json", ledger=ledger).stdout)
    seen.rows_after = bakery.wait_settled(ledger)
    seen.second = load_ledger(ledger)
    seen.report = json.loads(bakery.ok("report", matrix, "--json").stdout)
    return seen


def test_submit_chains_each_cells_eval_to_its_merge_array(chained):
    arrays = {a["array"]: a for a in chained.submitted}
    merge = [a for a in arrays.values() if a["stage"] == "merge"]
    evals = [a for a in arrays.values() if a["stage"] == "eval"]
    assert [sorted(a["cell_ids"]) for a in merge] == [sorted([GOOD, BAD])]
    chained_evals = [a for a in evals if a["after"]]
    assert [(a["cell_ids"], a["after"]) for a in chained_evals] == \
        [(merge[0]["cell_ids"], merge[0]["job_id"])]
    assert [a["cell_ids"] for a in evals if not a["after"]] == [[BASELINE]]
    # The sbatch script submitit wrote asks SLURM for exactly that.
    eval_array = next(a for a in all_arrays(chained.first) if a.name == chained_evals[0]["array"])
    (script,) = Path(eval_array.folder).glob("*_submission.sh")
    lines = script.read_text().splitlines()
    assert f"#SBATCH --dependency=aftercorr:{merge[0]['job_id']}" in lines
    assert "#SBATCH --kill-on-invalid-dep=yes" in lines


def test_an_eval_starts_only_after_its_merge_succeeded_and_dies_with_a_failed_one(chained):
    rows = chained.rows
    assert (rows[GOOD]["state"], rows[GOOD]["eval"]) == ("COMPLETED", "FAILED")
    assert (rows[BAD]["state"], rows[BAD]["eval"]) == ("FAILED", "CANCELLED")
    assert (rows[BASELINE]["state"], rows[BASELINE]["eval"]) == (None, "FAILED")
    assert rows[BAD]["eval_detail"] == "never ran: its merge ended FAILED"
    ledger = chained.first
    tasks = {(stage, t): task_of(ledger, stage, t)
             for stage, t in [("merge", GOOD), ("merge", BAD), ("eval", GOOD), ("eval", BAD)]}
    jobs = {t.split("_")[0] for t in tasks.values()}
    times = task_times([a for a in all_arrays(ledger) if a.job_id in jobs])
    _, _, merged_at = times[tasks[("merge", GOOD)]]
    _, started, _ = times[tasks[("eval", GOOD)]]
    assert started >= merged_at, times
    # The scheduler cancelled the bad cell's eval (never started), not left it pending. A task
    # with a row of its own shows the cancel's time as its start too: it ran for no time.
    state, started, ended = times[tasks[("eval", BAD)]]
    assert state == "CANCELLED" and started in (None, ended), times
    assert chained.status.exit_code == 1
    assert "eval totals: CANCELLED 1, FAILED 2" in chained.status.stdout
    # Its log says why: the task's data file was missing.
    assert f"{GOOD}: stage eval failed" in chained.eval_log and "tiny_mc.validation.jsonl" in chained.eval_log


def test_resubmit_rechains_a_failed_merges_eval_and_reruns_a_failed_eval_alone(chained):
    rows = {(r["cell"], r["stage"]): r for r in chained.resubmitted}
    assert {key: r["state"] for key, r in rows.items()} == {
        (BAD, "merge"): "FAILED", (BAD, "eval"): "FAILED",  # the eval's row shows its merge's state
        (GOOD, "eval"): "FAILED", (BASELINE, "eval"): "FAILED"}
    ledger = chained.second
    # The good cell was not merged again; its eval ran again, waiting for nothing.
    assert len(ledger.cells[GOOD]) == 1 and len(ledger.evals[GOOD]) == 2
    bad_merge = next(a for a in all_arrays(ledger) if a.name == ledger.cells[BAD][-1].array)
    bad_eval = next(a for a in all_arrays(ledger) if a.name == ledger.evals[BAD][-1].array)
    good_eval = next(a for a in all_arrays(ledger) if a.name == ledger.evals[GOOD][-1].array)
    assert bad_eval.after == bad_merge.name and good_eval.after is None
    assert rows[(BAD, "eval")]["action"].endswith(f"after {bad_merge.name}")
    after = chained.rows_after
    assert {t: (r["state"], r["eval"]) for t, r in after.items()} == {
        GOOD: ("COMPLETED", "COMPLETED"), BAD: ("COMPLETED", "COMPLETED"),
        BASELINE: (None, "COMPLETED")}
    times = task_times([bad_merge, bad_eval])
    assert (times[task_of(ledger, "eval", BAD)][1]
            >= times[task_of(ledger, "merge", BAD)][2]), times


def test_the_report_holds_every_evaluated_cell_and_baseline(chained):
    assert sorted(row["target"] for row in chained.report["rows"]) == sorted([GOOD, BAD, BASELINE])
    for row in chained.report["rows"]:
        results = json.loads((chained.root / "work" / "cells" / row["target"] / "eval"
                              / "results.json").read_text())
        assert row["values"]["tiny_mc/acc"]["value"] == results["results"]["tiny_mc"]["acc,none"]
