"""bakery-slurm on a real single-node SLURM cluster with accounting (`-m slurm`).

Everything goes through the tool's own commands (submit, status, resubmit, logs, cancel via Click's
CliRunner; two racing `resubmit`s as real processes) on tiny Gemma 3 models built once per session
(`tiny_models`, tests/conftest.py). Waits poll `status --json` until a condition holds, under a
deadline; no sleep stands in for a state.

Three submissions are shared by several tests each (module fixtures):

- `happy`: tiny1b x {linear, ties} + tiny4b x {ties}, where tiny4b asks for more memory: two
  resource groups, so two arrays, one sbatch each. Everything completes.
- `faults`: four one-method sizes, in this order: `slow` (time limit 1 minute), `broken` (its
  models are a copy whose `eng` adapter holds garbage), `stuck` and `ok`. While the cells run, the
  test holds the lock of the `dir:` push target (`published/.bakery-push.lock`, the lock every
  publisher takes), from another process, as a long push of another task would: cells that reach
  push wait there, RUNNING. So `slow` outlives its minute and ends TIMEOUT, `stuck` is certain to
  be RUNNING when `bakery-slurm cancel --only` cancels it, and `ok` is certain to be RUNNING when
  `resubmit` must refuse it; once the lock is released `ok` publishes and completes. `broken` fails
  in bake. No test hook in the product is involved: only its real locks, a real time limit and a
  real corrupt file.
- `resubmitted`: then the faults are fixed (adapter restored, the time limit raised in the matrix,
  which changes its sha256) and `resubmit` sends exactly the three failed cells as one new array.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickletools
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from bakery_slurm.executors import SlurmBackend
from bakery_slurm.ledger import all_arrays, load_ledger
from bakery_slurm.matrix import expand, load_matrix
from support import wait_for

pytestmark = pytest.mark.slurm

BIN = Path(sys.executable).parent
METHODS = {"linear": {"weight": 0.5}, "ties": {"density": 0.5, "weight": 0.5}}
DEFAULT_TIME = "00:10:00"
CLUSTER_SCRIPT = Path(__file__).with_name("slurm_cluster.sh")
# Upper bound for the queue to drain and the controller to restart; only hit on a hang.
RESET_DEADLINE_S = 240


def cid(size: str, method: str = "ties") -> str:
    return f"{size}-std/eng-nob__{method}"


def size(root: Path, kind: str, methods: list[str], **resources: str) -> dict[str, Any]:
    return {"root": Path(root).resolve(), "kind": kind, "methods": methods, "resources": resources}


def write_matrix(folder: Path, sizes: dict[str, dict[str, Any]]) -> Path:
    """folder/matrix.toml over `sizes` (name -> `size(...)`), pushing to dir:published, working in
    folder/work, in the stand-in image (BAKERY_STANDIN_IMAGE, conftest.py) with the sizes' model
    folders bound, 1 CPU and 2G per task, at most 2 tasks of an array at once."""
    lines = [
        'name = "integration"',
        'adapters = ["eng", "nob"]',
        "array_parallelism = 2",
        "[base]",
        'path = "{root}/bases/{kind}"',
        "[adapter]",
        'path = "{root}/adapters/{kind}/{adapter}"',
        "[push]",
        'target = "dir:published"',
        "[variants.std]",
    ]
    for name, spec in sizes.items():
        lines += [f"[sizes.{name}]",
                  f"vars = {{ kind = {json.dumps(spec['kind'])}, root = {json.dumps(str(spec['root']))} }}",
                  f"methods = {json.dumps(spec['methods'])}"]
        if spec["resources"]:
            pairs = ", ".join(f"{k} = {json.dumps(v)}" for k, v in spec["resources"].items())
            lines.append(f"resources = {{ {pairs} }}")
    used = {m for spec in sizes.values() for m in spec["methods"]}
    for method in sorted(used):
        lines.append(f"[methods.{method}]")
        lines += [f"{k} = {v}" for k, v in METHODS[method].items()]
    binds = sorted({str(spec["root"]) for spec in sizes.values() if spec["root"].exists()})
    lines += ["[resources]", "cpus_per_task = 1", 'mem = "2G"', f'time = "{DEFAULT_TIME}"',
              "[runtime]", 'container = "apptainer"',
              f"image = {json.dumps(os.environ['BAKERY_STANDIN_IMAGE'])}",
              f"binds = {json.dumps(binds)}", "[paths]", 'work = "work"']
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "matrix.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def sacct_jobs(prefix: str) -> dict[str, set[str]]:
    """Job name -> array job ids, for every job in accounting whose name starts with `prefix`."""
    out = subprocess.run(["sacct", "-X", "-P", "-n", "-o", "JobID,JobName", "-a",
                          "--starttime", "now-2hours"], capture_output=True, text=True, check=True)
    jobs: dict[str, set[str]] = {}
    for line in out.stdout.splitlines():
        job_id, name = line.split("|", 1)
        if name.startswith(prefix):
            jobs.setdefault(name, set()).add(job_id.split("_")[0])
    return jobs


def listing(root: Path) -> list[tuple[str, int]]:
    """Every path under `root` with its size (0 for folders), to prove nothing was written."""
    return sorted((str(p.relative_to(root)), p.stat().st_size if p.is_file() else 0)
                  for p in root.rglob("*"))


def with_corrupt_adapter(models: Path, copy: Path) -> tuple[Path, bytes]:
    """Copy the tiny models to `copy` and replace the text kind's `eng` adapter weights with
    garbage; return that file and its good bytes, to restore it."""
    shutil.copytree(models, copy)
    corrupt = copy / "adapters" / "text" / "eng" / "adapter_model.safetensors"
    good = corrupt.read_bytes()
    corrupt.write_bytes(b"not a safetensors file " * 64)
    return corrupt, good


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------
# 1. Everything completes: one array per resource group, outputs load, logs


HAPPY = [cid("tiny1b", "linear"), cid("tiny1b", "ties"), cid("tiny4b", "ties")]


@pytest.fixture(scope="module")
def happy(tmp_path_factory, tiny_models, bakery):
    root = tmp_path_factory.mktemp("happy")
    matrix = write_matrix(root, {
        "tiny1b": size(tiny_models, "text", ["linear", "ties"]),
        "tiny4b": size(tiny_models, "multimodal", ["ties"], mem="3G"),
    })
    ledger = root / "bakery-ledger.json"
    submitted = json.loads(bakery.ok("submit", matrix, "--executor", "slurm", "--json",
                                     ledger=ledger).stdout)
    rows = bakery.wait_settled(ledger)
    return SimpleNamespace(root=root, matrix=matrix, ledger=ledger, submitted=submitted, rows=rows,
                           published=root / "published")


def test_all_cells_complete_in_one_array_per_resource_group(happy):
    assert {cell: row["state"] for cell, row in happy.rows.items()} == dict.fromkeys(HAPPY, "COMPLETED")
    ledger = load_ledger(happy.ledger)
    [submission] = ledger.submissions
    assert submission.matrix_sha256 == sha256(happy.matrix)
    arrays = {tuple(a.cells): a for a in submission.arrays}
    assert set(arrays) == {(HAPPY[0], HAPPY[1]), (HAPPY[2],)}
    assert arrays[HAPPY[0], HAPPY[1]].resources["mem"] == "2G"
    assert arrays[(HAPPY[2],)].resources["mem"] == "3G"
    # What submit printed is what the ledger holds.
    assert sorted((r["array"], r["job_id"], tuple(r["cell_ids"])) for r in happy.submitted) == \
        sorted((a.name, a.job_id, tuple(a.cells)) for a in submission.arrays)
    # One sbatch per array: accounting knows exactly one job per array name of this submission,
    # with the id the ledger recorded, and no other job of the submission.
    jobs = sacct_jobs(f"bakery-{submission.id[:8]}-")
    assert jobs == {a.name: {a.job_id} for a in submission.arrays}
    for cell, row in happy.rows.items():
        [attempt] = ledger.cells[cell]
        array = next(a for a in submission.arrays if a.name == attempt.array)
        assert {k: row[k] for k in ("cell", "state", "array_job_id", "index", "attempt")} == {
            "cell": cell, "state": "COMPLETED", "array_job_id": array.job_id,
            "index": attempt.index, "attempt": 1}
        assert row["output"] == f"dir:{happy.published}/{cell}"


def test_published_cells_load_with_transformers(happy):
    from transformers import AutoModelForCausalLM

    for cell in HAPPY:
        model, info = AutoModelForCausalLM.from_pretrained(happy.published, subfolder=cell,
                                                           output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], (cell, info)
        expected = "Gemma3ForConditionalGeneration" if cell.startswith("tiny4b") else "Gemma3ForCausalLM"
        assert type(model).__name__ == expected
        record = json.loads((happy.published / cell / "bakery.json").read_text())
        assert record["cell"] == cell


def test_logs_prints_the_task_log(happy, bakery):
    cell = HAPPY[1]
    out = bakery.ok("logs", cell, ledger=happy.ledger)
    # stdout of the task: the cell's result record, printed by run-cell when it succeeded
    assert f'"cell": "{cell}"' in out.stdout and '"status": "done"' in out.stdout
    log_path = happy.rows[cell]["log"]
    assert out.stderr.strip() == f"== {log_path}"
    err = bakery.ok("logs", cell, "--stderr", ledger=happy.ledger)
    # The bakery engine (the default) bakes in memory and writes hub-layout names itself.
    for stage, status in (("bake", "skipped"), ("merge", "done"), ("strip", "skipped"),
                          ("verify", "done"), ("push", "done")):
        assert f"{cell}: {stage} {status}" in err.stdout
    missing = bakery.run("logs", cell, "--attempt", "2", ledger=happy.ledger)
    assert missing.exit_code == 2 and "has attempts 1..1, not 2" in missing.stderr


# ---------------------------------------------------------------------------------------------
# 5. A truncated ledger is refused and left alone; 7. an unconfirmed array is recovered


def test_truncated_ledger_is_refused_and_left_untouched(happy, bakery, tmp_path):
    ledger = tmp_path / "bakery-ledger.json"
    data = happy.ledger.read_bytes()
    ledger.write_bytes(data[: len(data) // 2])  # cut mid-write
    before, files = ledger.read_bytes(), listing(tmp_path)
    for command in (["status"], ["status", "--json"], ["resubmit"], ["cancel"]):
        result = bakery.run(*command, ledger=ledger)
        assert result.exit_code == 2, (command, result.output)
        assert result.stdout == ""
        assert result.stderr.startswith(f"Error: {ledger}: not valid JSON, the ledger is truncated "
                                        "or corrupt"), result.stderr
        assert "left untouched" in result.stderr
        assert ledger.read_bytes() == before and listing(tmp_path) == files


def test_status_recovers_an_unconfirmed_array_from_sacct(happy, bakery, tmp_path):
    # A crash between sbatch and the ledger write leaves the array's intent without a job id.
    data = json.loads(happy.ledger.read_text())
    array = next(a for a in data["submissions"][0]["arrays"] if a["cells"] == [HAPPY[2]])
    job_id, array["job_id"] = array["job_id"], None
    ledger = tmp_path / "bakery-ledger.json"
    ledger.write_text(json.dumps(data))
    assert load_ledger(ledger).submissions[0].arrays  # still a valid ledger
    result = bakery.run("status", "--json", ledger=ledger)
    assert result.exit_code == 0, result.output
    assert f"note: recovered job id {job_id} of array {array['name']} by its job name" in result.stderr
    row = next(r for r in json.loads(result.stdout) if r["cell"] == HAPPY[2])
    assert (row["state"], row["array_job_id"]) == ("COMPLETED", job_id)
    recovered = next(a for a in all_arrays(load_ledger(ledger)) if a.name == array["name"])
    assert recovered.job_id == job_id  # written back, so the next command needs no recovery


class Crash(Exception):
    """The submitting process dies right after sbatch returned, before the ledger write."""


def test_status_recovers_the_job_id_lost_in_a_crash_after_sbatch(tmp_path, bakery, monkeypatch):
    sbatched: list[str] = []
    real_submit = SlurmBackend.submit

    def submit_then_crash(self, request):
        sbatched.append(real_submit(self, request))
        raise Crash(f"killed after sbatch printed job {sbatched[-1]}")

    # A cell whose sources do not exist (preflight, which would refuse it, is skipped): its task
    # ends FAILED within seconds.
    matrix = write_matrix(tmp_path, {"gone": size(tmp_path / "no-models", "text", ["ties"])})
    ledger = tmp_path / "bakery-ledger.json"
    with monkeypatch.context() as patch, pytest.raises(Crash):
        patch.setattr(SlurmBackend, "submit", submit_then_crash)
        bakery.run("submit", matrix, "--executor", "slurm", "--no-preflight", ledger=ledger)
    [job_id] = sbatched
    [array] = all_arrays(load_ledger(ledger))
    assert array.job_id is None  # the intent was saved before sbatch; the confirmation never was
    note = f"note: recovered job id {job_id} of array {array.name} by its job name"

    def recovered(result) -> bool:
        assert result.exit_code in (0, 1), result.output
        if note in result.stderr:
            return True
        # Until sacct knows the job (it lags sbatch by a few seconds) the cell is UNCONFIRMED.
        assert [r["state"] for r in json.loads(result.stdout)] == ["UNCONFIRMED"], result.output
        return False

    result = bakery.poll(("status", "--json"), ledger, recovered, f"recovery of job {job_id}")
    assert [r["array_job_id"] for r in json.loads(result.stdout)] == [job_id]
    assert [a.job_id for a in all_arrays(load_ledger(ledger))] == [job_id]
    rows = bakery.wait_settled(ledger)
    assert [(r["state"], r["array_job_id"], r["attempt"]) for r in rows.values()] == \
        [("FAILED", job_id, 1)]


# ---------------------------------------------------------------------------------------------
# 6. --dry-run prints the sbatch script and submits and writes nothing


def test_dry_run_prints_the_sbatch_script_and_submits_nothing(tmp_path, tiny_models, bakery):
    matrix = write_matrix(tmp_path, {"tiny1b": size(tiny_models, "text", ["linear", "ties"])})
    before = listing(tmp_path)
    out = bakery.ok("submit", matrix, "--executor", "slurm", "--dry-run").stdout
    for line in ("#SBATCH --array=0-1%2", "#SBATCH --time=10", "#SBATCH --cpus-per-task=1",
                 "#SBATCH --mem=2G"):
        assert line in out.splitlines(), line
    name = re.search(r"^#SBATCH --job-name=(bakery-[0-9a-f]{8}-0)$", out, re.MULTILINE)
    assert name, out
    recipes = {c.id: c.recipe_hash for c in expand(load_matrix(matrix))}
    for cell in (cid("tiny1b", "linear"), cid("tiny1b", "ties")):
        command = (f"-m bakery_slurm run-cell {matrix} {cell} --recipe-hash {recipes[cell]} "
                   f"--work {tmp_path / 'work'}")
        assert any(line.strip().endswith(command) for line in out.splitlines()), (cell, out)
    assert "dry run: 1 array(s), 2 task(s); nothing submitted or written." in out
    assert listing(tmp_path) == before  # no ledger, no work folder
    queued = subprocess.run(["squeue", "-h", "--states=all", f"--name={name[1]}"],
                            capture_output=True, text=True, check=True).stdout
    accounted = subprocess.run(["sacct", "-X", "-n", "-a", f"--name={name[1]}",
                                "--starttime", "now-2hours"],
                               capture_output=True, text=True, check=True).stdout
    assert queued.strip() == "" and accounted.strip() == ""


# ---------------------------------------------------------------------------------------------
# 2. FAILED, TIMEOUT and CANCELLED, named by status; 3. fixed and resubmitted


SLOW, BROKEN, STUCK, OK = cid("slow"), cid("broken"), cid("stuck"), cid("ok")
FAULTS = [SLOW, BROKEN, STUCK, OK]


@pytest.fixture(scope="module")
def faults(tmp_path_factory, tiny_models, bakery, held_lock):
    root = tmp_path_factory.mktemp("faults")
    broken_models = root / "broken-models"
    corrupt, good_adapter = with_corrupt_adapter(tiny_models, broken_models)
    matrix = write_matrix(root, {  # in this order: slow's array goes first, then one array of 3
        "slow": size(tiny_models, "text", ["ties"], time="00:01:00"),
        "broken": size(broken_models, "text", ["ties"]),
        "stuck": size(tiny_models, "text", ["ties"]),
        "ok": size(tiny_models, "text", ["ties"]),
    })
    ledger = root / "bakery-ledger.json"
    seen = SimpleNamespace(root=root, matrix=matrix, ledger=ledger, corrupt=corrupt,
                           good_adapter=good_adapter, first_sha256=sha256(matrix))
    with held_lock(root / "published" / ".bakery-push.lock"):
        bakery.ok("submit", matrix, "--executor", "slurm", ledger=ledger)
        bakery.wait(ledger, lambda rows: rows[STUCK]["state"] == "RUNNING", f"{STUCK} RUNNING")
        seen.cancel = bakery.ok("cancel", "--only", "stuck-*", ledger=ledger)
        bakery.wait(ledger, lambda rows: rows[OK]["state"] == "RUNNING", f"{OK} RUNNING")
        # ok waits on the push lock: it is RUNNING for as long as we hold it.
        arrays_before = len(all_arrays(load_ledger(ledger)))
        seen.refuse_running = bakery.ok("resubmit", "--only", OK, "--json", ledger=ledger)
        seen.arrays_after_refusal = len(all_arrays(load_ledger(ledger))) - arrays_before
        bakery.wait_settled(ledger, [SLOW, BROKEN, STUCK])
    seen.rows = bakery.wait_settled(ledger)
    seen.status = bakery.run("status", ledger=ledger)
    seen.broken_log = bakery.ok("logs", BROKEN, "--stderr", ledger=ledger)
    return seen


def test_faults_end_failed_timeout_cancelled_and_status_names_them(faults):
    states = {cell: row["state"] for cell, row in faults.rows.items()}
    assert states == {SLOW: "TIMEOUT", BROKEN: "FAILED", STUCK: "CANCELLED", OK: "COMPLETED"}
    assert faults.rows[BROKEN]["exit_code"] == "1:0"
    assert faults.status.exit_code == 1, faults.status.output
    table = faults.status.stdout.splitlines()
    for cell, state in states.items():
        assert any(line.split()[:2] == [cell, state] for line in table), (cell, state, table)
    assert "totals: CANCELLED 1, COMPLETED 1, FAILED 1, TIMEOUT 1" in table
    # The log of the failed cell says which stage failed and why.
    assert f"{BROKEN}: bake failed" in faults.broken_log.stdout
    # The time-limited size got its own array (its resources differ), the rest one array.
    arrays = all_arrays(load_ledger(faults.ledger))
    assert [(a.cells, a.resources["time"]) for a in arrays] == [
        ([SLOW], "00:01:00"), ([BROKEN, STUCK, OK], DEFAULT_TIME)]


def test_cancel_only_cancels_the_matching_live_cell(faults):
    lines = faults.cancel.stdout.splitlines()
    assert len(lines) == 1 and re.fullmatch(rf"cancelled {re.escape(STUCK)} \(\d+_1, was RUNNING\)",
                                            lines[0]), lines


def test_resubmit_refuses_a_running_cell(faults):
    rows = json.loads(faults.refuse_running.stdout)
    assert rows == [{"cell": OK, "stage": "merge", "state": "RUNNING",
                     "action": "refused: latest attempt is RUNNING, not a terminal failure"}]
    assert "resubmitted 0 task(s)" in faults.refuse_running.stderr
    assert faults.arrays_after_refusal == 0


@pytest.fixture(scope="module")
def resubmitted(faults, bakery):
    faults.corrupt.write_bytes(faults.good_adapter)
    text = faults.matrix.read_text()
    assert text.count('time = "00:01:00"') == 1
    faults.matrix.write_text(text.replace('time = "00:01:00"', f'time = "{DEFAULT_TIME}"'))
    before = load_ledger(faults.ledger)
    result = bakery.ok("resubmit", "--json", ledger=faults.ledger)
    after = load_ledger(faults.ledger)
    rows = bakery.wait_settled(faults.ledger)
    status = bakery.run("status", ledger=faults.ledger)
    ledger_bytes = faults.ledger.read_bytes()
    again = bakery.ok("resubmit", "--json", ledger=faults.ledger)
    return SimpleNamespace(before=before, after=after, result=result, rows=rows, status=status,
                           again=again, ledger_bytes=ledger_bytes)


def test_resubmit_sends_exactly_the_failed_cells_as_one_new_array(faults, resubmitted):
    old = {a.name for a in all_arrays(resubmitted.before)}
    new = [a for a in all_arrays(resubmitted.after) if a.name not in old]
    assert len(new) == 1, new
    [array] = new
    assert sorted(array.cells) == sorted([SLOW, BROKEN, STUCK])
    assert array.job_id and array.resources["time"] == DEFAULT_TIME
    assert [a.model_dump() for a in all_arrays(resubmitted.before)] == \
        [a.model_dump() for a in all_arrays(resubmitted.after) if a.name in old]
    rows = {r["cell"]: r for r in json.loads(resubmitted.result.stdout)}
    assert {c: r["state"] for c, r in rows.items()} == {SLOW: "TIMEOUT", BROKEN: "FAILED",
                                                        STUCK: "CANCELLED"}
    for row in rows.values():
        assert row["action"] == f"resubmitted in {array.name} job {array.job_id}"
    # The ledger: two attempts for each resubmitted cell, the second in the new array; one for ok.
    for cell in (SLOW, BROKEN, STUCK):
        first, second = resubmitted.after.cells[cell]
        assert second.array == array.name and array.cells[second.index] == cell
        assert first.array != array.name
    assert len(resubmitted.after.cells[OK]) == 1
    # The new submission read the edited matrix and records its sha256.
    first_sub, second_sub = resubmitted.after.submissions
    assert first_sub.matrix_sha256 == faults.first_sha256
    assert second_sub.matrix_sha256 == sha256(faults.matrix) != faults.first_sha256
    assert second_sub.matrix_path == str(faults.matrix)


def test_resubmitted_cells_complete_with_the_edited_matrix(faults, resubmitted):
    # The edited matrix (longer time limit) keeps every recipe, so tasks of both submissions run;
    # a task whose cell's recipe changed since submission is refused.
    assert {c: (r["state"], r["attempt"]) for c, r in resubmitted.rows.items()} == {
        SLOW: ("COMPLETED", 2), BROKEN: ("COMPLETED", 2), STUCK: ("COMPLETED", 2),
        OK: ("COMPLETED", 1)}
    assert resubmitted.status.exit_code == 0, resubmitted.status.output
    stale = subprocess.run([str(BIN / "bakery-slurm"), "run-cell", str(faults.matrix), OK,
                            "--recipe-hash", "0" * 64], capture_output=True, text=True)
    assert stale.returncode == 2, stale.stderr
    assert f"the recipe of {OK} changed since submission" in stale.stderr, stale.stderr
    for cell in FAULTS:
        record = json.loads((faults.root / "published" / cell / "bakery.json").read_text())
        assert record["cell"] == cell


def test_resubmit_refuses_completed_cells(faults, resubmitted):
    # Completed cells are refused without a row each (they would bury the failures).
    assert json.loads(resubmitted.again.stdout) == []
    assert "resubmitted 0 task(s)" in resubmitted.again.stderr
    assert faults.ledger.read_bytes() == resubmitted.ledger_bytes


# ---------------------------------------------------------------------------------------------
# 4. Two resubmits racing from two processes


def test_racing_resubmits_submit_each_failed_cell_once(tmp_path, bakery):
    # Sources that do not exist: both cells fail at once, in bake.
    matrix = write_matrix(tmp_path, {"gone": size(tmp_path / "no-models", "text", ["linear", "ties"])})
    ledger = tmp_path / "bakery-ledger.json"
    cells = [cid("gone", "linear"), cid("gone", "ties")]
    # Preflight would refuse them: skip it, so that they fail on the node.
    bakery.ok("submit", matrix, "--executor", "slurm", "--no-preflight", ledger=ledger)
    rows = bakery.wait_settled(ledger)
    assert {c: r["state"] for c, r in rows.items()} == dict.fromkeys(cells, "FAILED")
    arrays_before = {a.name for a in all_arrays(load_ledger(ledger))}
    command = [str(BIN / "bakery-slurm"), "resubmit", "--json", "--no-preflight", "--ledger",
               str(ledger)]
    racers = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for _ in range(2)]
    try:
        outputs = [racer.communicate(timeout=120) for racer in racers]
    finally:  # a racer that hangs must not outlive the test
        for racer in racers:
            racer.kill()
            racer.wait()
    for racer, (out, err) in zip(racers, outputs):
        assert racer.returncode == 0, (out, err)
    after = load_ledger(ledger)
    new = [a for a in all_arrays(after) if a.name not in arrays_before]
    assert sorted(c for a in new for c in a.cells) == sorted(cells)  # each cell in one new task
    for cell in cells:
        assert len(after.cells[cell]) == 2, after.cells[cell]
    rows = [row for out, _ in outputs for row in json.loads(out)]
    resubmitted = Counter(r["cell"] for r in rows if r["action"].startswith("resubmitted in "))
    assert resubmitted == dict.fromkeys(cells, 1), rows
    # The other process saw each cell taken, before or after it looked at the states.
    assert all(r["action"].startswith(("skipped: resubmitted meanwhile", "refused: "))
               for r in rows if not r["action"].startswith("resubmitted in ")), rows
    # The new tasks fail the same way; cancel what is left of them and let them settle.
    bakery.ok("cancel", ledger=ledger)
    assert {r["attempt"] for r in bakery.wait_settled(ledger).values()} == {2}


# ---------------------------------------------------------------------------------------------
# Nothing on the compute node but apptainer and the image


def test_tasks_run_inside_the_image_and_need_nothing_of_the_submitting_python(happy, standin_image):
    """The sbatch script starts submitit's runner through the launcher, inside the (stand-in)
    image, where the submitting venv is invisible; what submitit pickled names importable code,
    not bytecode tied to the login node's Python version."""
    folder = Path(all_arrays(load_ledger(happy.ledger))[0].folder)
    script = next(folder.glob("*_submission.sh")).read_text()
    assert f"{folder / 'apptainer-launch.sh'} -u -m submitit.core._submit {folder}" in script
    assert sys.executable not in script
    launcher = (folder / "apptainer-launch.sh").read_text()
    assert "apptainer exec --cleanenv --bind" in launcher and str(standin_image) in launcher
    pickled = next(folder.glob("*_submitted.pkl")).read_bytes()
    assert b"_make_function" not in pickled and b"CodeType" not in pickled  # no bytecode
    strings = [arg for op, arg, _ in pickletools.genops(pickled) if isinstance(arg, str)]
    assert "bakery_slurm.array_task" in strings and "run_task" in strings
    for cell in HAPPY:
        result = json.loads((happy.root / "work" / "cells" / cell / "result.json").read_text())
        assert result["runtime"]["container"] == str(standin_image)
        assert not result["runtime"]["python"].startswith(sys.prefix)
        # The tasks asked for no GPU: device auto keeps to the CPU, and says why.
        assert result["stages"]["merge"]["fallback_reason"] == "SLURM gave this task no GPU"


def test_the_standin_hides_the_submitting_venv_and_host_paths(tmp_path, standin_image):
    """The stand-in keeps apptainer's rules that make a task needing the login node's Python
    fail: --cleanenv empties the environment, host executables are not found, the submitting
    venv is empty inside, and a bind whose source is missing refuses to start."""
    probe = ("import os, sys; print(sys.prefix); print(sorted(os.listdir(sys.argv[1]))); "
             "print(sorted(k for k in os.environ if k.startswith(('VIRTUAL_ENV', 'PYTHON', 'SECRET', 'FWD'))))")
    env = {**os.environ, "SECRET_HOST": "x", "APPTAINERENV_FWD": "yes"}
    inside = subprocess.run(["apptainer", "exec", "--cleanenv", "--bind", str(tmp_path),
                             str(standin_image), "python3", "-c", probe, sys.prefix],
                            env=env, capture_output=True, text=True)
    assert inside.returncode == 0, inside.stderr
    prefix, listing, names = inside.stdout.splitlines()
    assert not prefix.startswith(sys.prefix) and listing == "[]" and names == "['FWD']"
    host_python = subprocess.run(["apptainer", "exec", str(standin_image), sys.executable, "-V"],
                                 capture_output=True, text=True)
    assert host_python.returncode == 255 and "not found in the container" in host_python.stderr
    missing = subprocess.run(["apptainer", "exec", "--bind", str(tmp_path / "nope"),
                              str(standin_image), "true"], capture_output=True, text=True)
    assert missing.returncode == 255 and "doesn't exist" in missing.stderr


# ---------------------------------------------------------------------------------------------
# sbatch refusing an array


def test_sbatch_refusing_an_array_exits_3_and_leaves_no_stuck_cells(tmp_path, tiny_models, bakery):
    """Three resource groups, the second with a partition the cluster lacks: the first array is
    submitted and recorded, the refused one and the one after it leave no trace in the ledger."""
    matrix = write_matrix(tmp_path, {
        "a": size(tiny_models, "text", ["linear"]),
        "b": size(tiny_models, "text", ["linear"], partition="nosuchpartition"),
        "c": size(tiny_models, "text", ["linear"], mem="3G"),
    })
    ledger = tmp_path / "bakery-ledger.json"
    result = bakery.run("submit", matrix, "--executor", "slurm", ledger=ledger)
    assert result.exit_code == 3, result.output
    assert "sbatch failed for array" in result.stderr and "nosuchpartition" in result.stderr
    recorded = load_ledger(ledger)
    [submission] = recorded.submissions
    [array] = submission.arrays
    assert array.cells == [cid("a", "linear")] and array.job_id is not None
    assert set(recorded.cells) == {cid("a", "linear")}
    rows = bakery.wait_settled(ledger)
    assert rows[cid("a", "linear")]["state"] == "COMPLETED"
    # The refused cells were never submitted: submit takes them again (and fails the same way).
    again = bakery.run("submit", matrix, "--executor", "slurm", "--only", "b-*", ledger=ledger)
    assert again.exit_code == 3 and "an attempt is" not in again.stderr


# ---------------------------------------------------------------------------------------------
# Job ids handed out again (last in this module: it restarts the controller)


def test_states_come_from_our_jobs_when_the_controller_reuses_job_ids(tmp_path, tiny_models,
                                                                      bakery):
    """A controller restored from an older copy of its state (as a machine image is) or with its
    state cleared hands out job ids again, while accounting keeps the earlier jobs: `sacct -j ID`
    then also prints the earlier job's rows, finished long ago. Read as ours, they made a cell look
    COMPLETED before its task had run (CI saw it once). Here the ids really are reused."""
    # A job of its own first: the id handed out after the reset has been used even when this test
    # runs alone on a fresh cluster.
    subprocess.run(["sbatch", "--wait", "-J", "bakery-reuse-seed", "-o", str(tmp_path / "seed.out"),
                    "--wrap", "true"], check=True, capture_output=True, timeout=RESET_DEADLINE_S)
    queue = ["squeue", "-h", "-o", "%i"]
    wait_for(lambda: not subprocess.run(queue, capture_output=True, text=True, check=True).stdout.strip(),
             "the queue to drain", deadline_s=RESET_DEADLINE_S, interval_s=1.0)
    reset = subprocess.run([str(CLUSTER_SCRIPT), "reset-job-ids"], capture_output=True, text=True,
                           timeout=RESET_DEADLINE_S)
    assert reset.returncode == 0, reset.stderr
    cells = [cid("again", "linear"), cid("again", "ties")]
    matrix = write_matrix(tmp_path, {"again": size(tiny_models, "text", ["linear", "ties"])})
    ledger = tmp_path / "bakery-ledger.json"
    bakery.ok("submit", matrix, "--executor", "slurm", ledger=ledger)
    [array] = all_arrays(load_ledger(ledger))
    accounted = subprocess.run(["sacct", "-X", "-D", "-n", "-P", "-o", "JobName", "-j", array.job_id,
                                "--starttime", "now-1days"], capture_output=True, text=True, check=True)
    assert set(accounted.stdout.split()) - {array.name}, \
        f"job id {array.job_id} was not used before, so nothing is tested: {accounted.stdout!r}"
    rows = bakery.wait_settled(ledger)
    assert {c: (r["state"], r["array_job_id"], r["attempt"]) for c, r in rows.items()} == \
        dict.fromkeys(cells, ("COMPLETED", array.job_id, 1))
    for cell in cells:  # really done: published, not a finished stranger's row
        assert json.loads((tmp_path / "published" / cell / "bakery.json").read_text())["cell"] == cell
