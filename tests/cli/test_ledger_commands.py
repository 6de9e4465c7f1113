"""submit, status, logs, resubmit and cancel through CliRunner, on the LOCAL executor.

Ledgers are built with `submission.submit_cells` from a matrix whose local model folders hold
only the files preflight looks for (config.json, adapter_config.json) and no weights, so every
`run-cell` task fails fast with a clear error and ends FAILED. Where a cell must
look COMPLETED, its local state file says so (the executor is faked, not the commands); where a
task must stay PENDING or RUNNING, `submission.task_argv` is replaced by a sleeper.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from click.testing import CliRunner

from bakery_slurm import submission
from bakery_slurm.cell_status import CellStatus, reduce_cells
from bakery_slurm.cli import cli
from bakery_slurm.cli import cancel as cancel_command
from bakery_slurm.cli import resubmit as resubmit_command
from bakery_slurm.cli.common import STATUS_COLUMNS
from bakery_slurm.executors import SlurmBackend
from bakery_slurm.ledger import (Ledger, PlannedArray, all_arrays, confirm_array, load_ledger,
                                 record_intent, save_ledger)
from bakery_slurm.matrix import expand, load_matrix
from bakery_slurm.pipeline import CellPaths
from bakery_slurm.resubmit_policy import is_live
from bakery_slurm.slurm_commands import TaskState
from bakery_slurm.status_snapshot import Snapshot, snapshot
from conftest import MINIMAL_MATRIX
from support import Recorder, settled, wait_for

# Three cells, all with local sources under models/ that hold no weights.
FAILING_MATRIX = MINIMAL_MATRIX.replace(
    'adapters = ["eng", "nob"]\n', 'adapters = ["eng", "nob"]\nmax_attempts = {max_attempts}\n'
    "array_parallelism = {parallelism}\n") + """
[methods.linear]
weight = 0.5

[methods.task_arithmetic]
weight = 0.5
"""
CELLS = sorted(["tiny-std/eng-nob__ties", "tiny-std/eng-nob__linear",
                "tiny-std/eng-nob__task_arithmetic"])
LEDGER = "bakery-ledger.json"


# ---------------------------------------------------------------------------------------------
# Helpers


def invoke(*args, **kwargs):
    return CliRunner().invoke(cli, [str(a) for a in args], **kwargs)




def write_project(root: Path, max_attempts: int = 3, parallelism: int = 16) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "matrix.toml"
    path.write_text(FAILING_MATRIX.replace("{max_attempts}", str(max_attempts))
                    .replace("{parallelism}", str(parallelism)))
    for folder, marker in [("base-tiny", "config.json"), *[
            (f"adapter-tiny-std-{name}", "adapter_config.json") for name in ("eng", "nob")]]:
        (root / "models" / folder).mkdir(parents=True, exist_ok=True)
        (root / "models" / folder / marker).write_text("{}")
    return path


def failed_project(root: Path, max_attempts: int = 3) -> tuple[Path, Path]:
    """Submit the three cells with the local executor and wait until they have all FAILED."""
    matrix_path = write_project(root, max_attempts)
    matrix = load_matrix(matrix_path)
    ledger = root / LEDGER
    submission.submit_cells(ledger, matrix, expand(matrix), "local")
    statuses = wait_for(lambda: settled(ledger), "the cells to fail")
    assert [(s.cell, s.state) for s in statuses] == [(c, "FAILED") for c in CELLS]
    return matrix_path, ledger


def fake_completed(ledger_path: Path, cell: str) -> None:
    """Make the local executor report `cell`'s latest task as COMPLETED."""
    ledger = load_ledger(ledger_path)
    attempt = ledger.cells[cell][-1]
    array = next(a for a in all_arrays(ledger) if a.name == attempt.array)
    state_file = Path(array.folder) / f"{attempt.index}.state.json"
    record = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**record, "state": "COMPLETED", "exit_code": "0:0"}))


def kill_our_processes(root: Path) -> None:
    """Kill, by pid, supervisors and tasks started under `root` that are still alive."""
    for record in [*root.rglob("supervisor.json"), *root.rglob("*.state.json")]:
        try:
            pid = json.loads(record.read_text())["pid"]
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError, KeyError):
            continue
        if str(root) in cmdline:
            try:
                # tasks lead their own process group; a supervisor's group is the test's
                if record.name == "supervisor.json":
                    os.kill(pid, signal.SIGKILL)
                else:
                    os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(autouse=True)
def _restore_logging():
    """Each CLI run points the bakery_slurm logger at that run's captured stderr; put it back."""
    logger = logging.getLogger("bakery_slurm")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved[0], saved[1], saved[2]


@pytest.fixture
def project(tmp_path):
    yield tmp_path
    kill_our_processes(tmp_path)


@pytest.fixture(scope="module")
def failed(tmp_path_factory):
    """A ledger whose three cells all FAILED (shared; tests on it must not change it)."""
    root = tmp_path_factory.mktemp("failed")
    matrix, ledger = failed_project(root)
    yield matrix, ledger
    kill_our_processes(root)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Like `failed`, but the ties cell's task reads COMPLETED (shared; read-only)."""
    root = tmp_path_factory.mktemp("mixed")
    matrix, ledger = failed_project(root)
    fake_completed(ledger, "tiny-std/eng-nob__ties")
    yield matrix, ledger
    kill_our_processes(root)


# ---------------------------------------------------------------------------------------------
# status


def test_status_shows_failed_cells_and_exits_1(failed):
    _, ledger = failed
    result = invoke("status", "--ledger", ledger)
    assert result.exit_code == 1, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == [c for c in STATUS_COLUMNS if c != "eval"]  # no [eval]: no column
    rows = [line.split() for line in lines[1:-1]]
    assert [r[0] for r in rows] == CELLS
    assert all(r[1:3] == ["FAILED", "1:0"] for r in rows), rows
    assert lines[-1] == "totals: FAILED 3"


def test_status_json_parses(failed):
    _, ledger = failed
    result = invoke("status", "--ledger", ledger, "--json")
    assert result.exit_code == 1, result.output
    rows = json.loads(result.stdout)
    assert [r["cell"] for r in rows] == CELLS
    array = all_arrays(load_ledger(ledger))[0]
    for row in rows:
        assert row["state"] == "FAILED"
        assert row["attempt"] == 1
        assert row["array_job_id"] == array.job_id and row["array_job_id"].startswith("local-")
        assert row["index"] == array.cells.index(row["cell"])
        assert row["task"] == f"{array.job_id}_{row['index']}"
        assert row["log"] == str(Path(array.folder) / f"{row['index']}.out")


def test_status_nl_is_one_object_per_line(failed):
    _, ledger = failed
    result = invoke("status", "--ledger", ledger, "--nl")
    assert [json.loads(line)["cell"] for line in result.stdout.splitlines()] == CELLS


def test_nl_without_rows_prints_nothing(tmp_path):
    """A script reading --nl lines must not read an empty one (a ledger without submissions has
    no row to show)."""
    ledger = tmp_path / LEDGER
    save_ledger(ledger, Ledger())
    result = invoke("status", "--ledger", ledger, "--nl")
    assert result.exit_code == 0, result.output
    assert result.stdout == ""


def test_status_watch_with_json_is_a_usage_error_pointing_to_nl(failed, monkeypatch):
    """Every refresh would print a JSON list of its own: several JSON documents, which no JSON
    reader takes."""
    _, ledger = failed
    monkeypatch.setattr(time, "sleep", lambda s: pytest.fail("watched"))
    result = invoke("status", "--ledger", ledger, "--watch", "60", "--json")
    assert result.exit_code == 2
    assert result.stdout == ""
    assert "use --nl" in result.stderr


def test_status_on_a_missing_ledger_exits_2_naming_it(tmp_path):
    missing = tmp_path / "nowhere.json"
    result = invoke("status", "--ledger", missing)
    assert result.exit_code == 2
    assert result.stderr == (f"Error: {missing.resolve()}: no ledger at this path (nothing submitted "
                             "with it yet? `submit` writes it beside the matrix; pass --ledger or "
                             "set BAKERY_LEDGER)\n")
    assert result.stdout == ""
    assert not missing.exists()


@pytest.mark.parametrize("command", [["status"], ["resubmit"], ["cancel"],
                                     ["logs", "tiny-std/eng-nob__ties"]])
def test_a_truncated_ledger_exits_2_and_is_left_alone(failed, tmp_path, command):
    _, ledger = failed
    data = ledger.read_bytes()
    broken = tmp_path / "broken.json"
    broken.write_bytes(data[: len(data) // 2])
    before = broken.read_bytes()
    result = invoke(*command, "--ledger", broken)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"Error: {broken}: not valid JSON, the ledger is truncated or corrupt")
    assert "left untouched" in result.stderr
    assert broken.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.json"]


def test_status_watch_below_30_s_warns_and_returns_when_all_cells_ended(failed, monkeypatch):
    _, ledger = failed
    slept = []
    monkeypatch.setattr(time, "sleep", slept.append)
    result = invoke("status", "--ledger", ledger, "--watch", "5")
    assert slept == []  # one pass: nothing left to watch
    assert result.exit_code == 1
    assert "--watch 5 is below 30 s; refreshing every 30 s" in result.stderr
    assert result.stdout.count("totals:") == 1


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_status_watch_must_be_a_finite_number_of_seconds(failed, value):
    _, ledger = failed
    result = invoke("status", "--ledger", ledger, "--watch", value)
    assert result.exit_code == 2
    assert f"Invalid value for --watch: {value} is not a number of seconds" in result.stderr


# ---------------------------------------------------------------------------------------------
# logs


def test_logs_stderr_shows_the_error(failed):
    matrix, ledger = failed
    result = invoke("logs", "tiny-std/eng-nob__linear", "--stderr", "--ledger", ledger)
    assert result.exit_code == 0, result.output
    empty = matrix.parent / "models" / "base-tiny"
    assert f"{empty}: neither model.safetensors nor model.safetensors.index.json" in result.stdout
    assert "stage bake failed" in result.stdout
    array = all_arrays(load_ledger(ledger))[0]
    index = array.cells.index("tiny-std/eng-nob__linear")
    assert result.stderr == f"== {Path(array.folder) / f'{index}.err'}\n"


def test_logs_stdout_is_the_other_file(failed):
    _, ledger = failed
    result = invoke("logs", "tiny-std/eng-nob__linear", "--ledger", ledger)
    assert result.exit_code == 0, result.output
    assert result.stderr.rstrip().endswith(".out")
    assert "neither model.safetensors" not in result.stdout


@pytest.mark.parametrize("args, message", [
    (["no-such/cell"], "'no-such/cell' has no attempt in"),
    (["tiny-std/eng-nob__ties", "--attempt", "2"], "tiny-std/eng-nob__ties has attempts 1..1, not 2"),
    (["tiny-std/eng-nob__ties", "--attempt", "0"], "tiny-std/eng-nob__ties has attempts 1..1, not 0"),
])
def test_logs_refuses_unknown_cells_and_attempts(failed, args, message):
    _, ledger = failed
    result = invoke("logs", *args, "--ledger", ledger)
    assert result.exit_code == 2
    assert message in result.stderr


# ---------------------------------------------------------------------------------------------
# resubmit

FAILED_CELLS = [c for c in CELLS if c != "tiny-std/eng-nob__ties"]


def test_resubmit_dry_run_lists_exactly_the_failed_cells_and_writes_nothing(mixed):
    matrix, ledger = mixed
    before = ledger.read_bytes()
    arrays_before = sorted((matrix.parent / "bakery-work" / "arrays").iterdir())
    result = invoke("resubmit", "--dry-run", "--ledger", ledger, "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["cell"] for r in rows] == FAILED_CELLS
    assert all(r["state"] == "FAILED" and r["action"].endswith("(dry run)") for r in rows)
    assert "would resubmit 2 task(s)" in result.stderr
    assert ledger.read_bytes() == before
    assert sorted((matrix.parent / "bakery-work" / "arrays").iterdir()) == arrays_before


def test_resubmit_makes_one_new_array_of_exactly_the_failed_cells(project):
    matrix, ledger = failed_project(project)
    fake_completed(ledger, "tiny-std/eng-nob__ties")
    old = load_ledger(ledger)
    result = invoke("resubmit", "--ledger", ledger, "--json")
    assert result.exit_code == 0, result.output
    new = load_ledger(ledger)
    assert len(new.submissions) == len(old.submissions) + 1
    (array,) = new.submissions[-1].arrays
    assert array.cells == FAILED_CELLS and array.executor == "local" and array.job_id
    assert {c: len(a) for c, a in new.cells.items()} == {
        "tiny-std/eng-nob__linear": 2, "tiny-std/eng-nob__task_arithmetic": 2,
        "tiny-std/eng-nob__ties": 1}
    for cell in FAILED_CELLS:
        assert (new.cells[cell][-1].array, new.cells[cell][-1].index) == (array.name, array.cells.index(cell))
    rows = json.loads(result.stdout)
    assert [(r["cell"], r["action"]) for r in rows] == [
        (c, f"resubmitted in {array.name} job {array.job_id}") for c in FAILED_CELLS]
    statuses = wait_for(lambda: settled(ledger), "the resubmitted cells to end")
    assert {s.cell: (s.state, s.attempt) for s in statuses} == {
        "tiny-std/eng-nob__linear": ("FAILED", 2), "tiny-std/eng-nob__task_arithmetic": ("FAILED", 2),
        "tiny-std/eng-nob__ties": ("COMPLETED", 1)}


def test_resubmit_stops_at_max_attempts(project):
    matrix, ledger = failed_project(project, max_attempts=2)
    first = invoke("resubmit", "--ledger", ledger)
    assert first.exit_code == 0, first.output
    assert "resubmitted 3 task(s)" in first.stderr
    wait_for(lambda: settled(ledger), "the second attempts to end")
    before = ledger.read_bytes()
    result = invoke("resubmit", "--ledger", ledger, "--json")
    rows = json.loads(result.stdout)
    assert [(r["cell"], r["state"], r["action"]) for r in rows] == [
        (c, "FAILED", "refused: reached the attempt cap (2 of 2)") for c in CELLS]
    assert "resubmitted 0 task(s)" in result.stderr
    assert result.exit_code == 1  # failed cells that cannot run again are still failures
    assert ledger.read_bytes() == before


def test_resubmit_state_exits_by_the_cells_in_that_state_only(failed):
    """Three FAILED cells and `--state TIMEOUT`: nothing asked for has failed, so exit 0 (it used
    to exit 1 for the FAILED cells it was not asked about)."""
    _, ledger = failed
    before = ledger.read_bytes()
    result = invoke("resubmit", "--state", "TIMEOUT", "--ledger", ledger, "--json")
    assert result.exit_code == 0, result.output
    assert {(r["state"], r["action"]) for r in json.loads(result.stdout)} == {
        ("FAILED", "refused: FAILED is not among the selected states (TIMEOUT)")}
    assert invoke("resubmit", "--state", "FAILED", "--dry-run", "--ledger", ledger).exit_code == 0
    assert ledger.read_bytes() == before


# ---------------------------------------------------------------------------------------------
# cancel


def test_cancel_running_and_pending_local_tasks(project, monkeypatch):
    matrix_path = write_project(project, parallelism=1)
    matrix = load_matrix(matrix_path)
    ledger = project / LEDGER
    monkeypatch.setattr(submission, "task_argv", lambda *a, **k: [
        sys.executable, "-c", "import time; time.sleep(60)", str(project)])
    (request,) = submission.submit_cells(ledger, matrix, expand(matrix), "local")
    running, *pending = request.array.cells

    def states():
        return {s.cell: s.state for s in snapshot(ledger, load_ledger(ledger)).statuses}

    wait_for(lambda: states()[running] == "RUNNING", "the first task to start")
    assert {states()[c] for c in pending} == {"PENDING"}

    result = invoke("cancel", "--ledger", ledger, "--only", pending[0])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"cancelled {pending[0]} ({request.array.job_id}_1, was PENDING)\n"
    wait_for(lambda: states()[pending[0]] == "CANCELLED", "the pending task to be cancelled")
    assert states()[running] == "RUNNING" and states()[pending[1]] == "PENDING"

    result = invoke("cancel", "--ledger", ledger)
    assert result.exit_code == 0, result.output
    assert sorted(result.stdout.splitlines()) == sorted([
        f"cancelled {running} ({request.array.job_id}_0, was RUNNING)",
        f"cancelled {pending[1]} ({request.array.job_id}_2, was PENDING)"])
    final = wait_for(lambda: (s := states()) and not any(map(is_live, s.values())) and s,
                     "every task to end")
    assert final == {c: "CANCELLED" for c in request.array.cells}
    folder = Path(request.array.folder)
    assert not (folder / "1.out").exists() and not (folder / "2.out").exists()  # never started

    again = invoke("cancel", "--ledger", ledger)
    assert (again.exit_code, again.stdout, again.stderr) == (0, "", "nothing to cancel\n")
    status = invoke("status", "--ledger", ledger)
    assert status.exit_code == 1 and "totals: CANCELLED 3" in status.stdout


# ---------------------------------------------------------------------------------------------
# submit


def fake_done(matrix_path: Path, cells) -> None:
    matrix = load_matrix(matrix_path)
    for cell in cells:
        paths = CellPaths(matrix.work_dir, cell.id)
        paths.result.parent.mkdir(parents=True, exist_ok=True)
        paths.result.write_text(json.dumps({"cell": cell.id, "recipe_hash": cell.recipe_hash,
                                            "push": str(cell.push), "status": "done",
                                            "stages": {}}))


def test_submit_skips_cells_already_completed(project):
    matrix_path = write_project(project)
    cells = expand(load_matrix(matrix_path))
    fake_done(matrix_path, cells)
    result = invoke("submit", matrix_path, "--executor", "local")
    assert result.exit_code == 0, result.output
    assert sorted(line for line in result.stderr.splitlines() if line.startswith("skip ")) == [
        f"skip {c}: already completed and published with this recipe (use --force)" for c in CELLS]
    assert not (project / LEDGER).exists()
    assert not (project / f"{LEDGER}.lock").exists()
    assert not (project / "bakery-work" / "arrays").exists()


def test_submit_publishes_completed_cells_again_when_the_push_target_changed(project):
    matrix_path = write_project(project)
    fake_done(matrix_path, expand(load_matrix(matrix_path)))
    text = matrix_path.read_text()
    assert '"dir:published"' in text
    matrix_path.write_text(text.replace('"dir:published"', '"dir:elsewhere"'))
    result = invoke("submit", matrix_path, "--executor", "local", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "skip " not in result.stderr
    assert "3 task(s)" in result.stdout


def test_submit_dry_run_plans_only_the_cells_not_done(project):
    matrix_path = write_project(project)
    cells = expand(load_matrix(matrix_path))
    done = [c for c in cells if c.id == "tiny-std/eng-nob__ties"]
    fake_done(matrix_path, done)
    result = invoke("submit", matrix_path, "--executor", "local", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "skip tiny-std/eng-nob__ties: already completed and published with this recipe (use --force)" in result.stderr
    tasks = sorted(line.split()[-1] for line in result.stdout.splitlines() if line.startswith("-- task "))
    assert tasks == FAILED_CELLS
    assert "dry run: 1 array(s), 2 task(s); nothing submitted or written." in result.stdout
    assert not (project / LEDGER).exists()


def test_submit_without_mergekit_importable_says_what_to_install(project, monkeypatch):
    """A login node whose venv lacks torch: mergekit (which submit validates recipes with)
    cannot be imported. A message, not a traceback; nothing written."""
    matrix_path = write_project(project)
    monkeypatch.setitem(sys.modules, "mergekit.config", None)  # import raises ImportError
    result = invoke("submit", matrix_path, "--executor", "local", "--dry-run")
    assert result.exit_code == 1 and not isinstance(result.exception, ImportError), result.output
    assert result.stderr.startswith("Error: tiny-std/eng-nob__ties: recipes are validated with "
                                    "mergekit, which cannot be imported here ("), result.stderr
    assert "`make install`" in result.stderr
    assert not (project / LEDGER).exists()


def test_submit_force_plans_completed_cells_too(project):
    matrix_path = write_project(project)
    fake_done(matrix_path, expand(load_matrix(matrix_path)))
    result = invoke("submit", matrix_path, "--executor", "local", "--dry-run", "--force")
    assert result.exit_code == 0, result.output
    assert "skip " not in result.stderr
    assert "dry run: 1 array(s), 3 task(s)" in result.stdout


def test_submit_only_matching_nothing_exits_2(project):
    matrix_path = write_project(project)
    result = invoke("submit", matrix_path, "--executor", "local", "--only", "99b-*")
    assert result.exit_code == 2
    assert f"--only '99b-*' matches no cell of {matrix_path}" in result.stderr
    assert sorted(p.name for p in project.iterdir()) == ["matrix.toml", "models"]


def test_submit_apptainer_without_image_exits_2(project):
    matrix_path = write_project(project)
    matrix_path.write_text(matrix_path.read_text() + '\n[runtime]\ncontainer = "apptainer"\n')
    result = invoke("submit", matrix_path, "--executor", "local")
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"Error: {matrix_path}: runtime.image: container 'apptainer' "
                                    "needs the path of the .sif image")
    assert not (project / LEDGER).exists()
    assert not (project / "bakery-work" / "arrays").exists()


def test_submit_with_a_work_folder_it_cannot_create_exits_2_and_records_nothing(project):
    matrix_path = write_project(project)
    (project / "afile").write_text("a file, not a folder")
    matrix_path.write_text(matrix_path.read_text() + '\n[paths]\nwork = "afile/work"\n')
    result = invoke("submit", matrix_path, "--executor", "local", "--no-preflight")
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"Error: {matrix_path}: paths.work: cannot create array folders "
                                    f"in {project / 'afile' / 'work' / 'arrays'}: "), result.stderr
    assert not (project / LEDGER).exists()


def test_a_submit_whose_array_files_cannot_be_written_exits_2_and_records_nothing(project,
                                                                                  monkeypatch):
    """Writing an array's own files fails (a full disk) before it reaches the scheduler: the
    array never existed, so the ledger keeps nothing of it (it used to keep it unconfirmed, and
    status then called it LOST)."""
    from bakery_slurm import local

    def disk_full(folder, *args, **kwargs):
        raise OSError(28, "No space left on device", str(folder / "array.json"))

    monkeypatch.setattr(local, "submit", disk_full)
    matrix_path = write_project(project)
    result = invoke("submit", matrix_path, "--executor", "local", "--no-preflight")
    assert result.exit_code == 2, result.output
    assert "No space left on device (nothing was submitted for it)" in result.stderr
    ledger = load_ledger(project / LEDGER)
    assert (ledger.submissions, ledger.cells) == ([], {})


# ---------------------------------------------------------------------------------------------
# Light commands stay light

HEAVY = ("torch", "transformers", "mergekit", "peft")
IMPORT_CHECK = """\
import json, sys
from bakery_slurm.cli import cli
try:
    cli.main(json.loads(sys.argv[1]), standalone_mode=False)
except SystemExit:
    pass
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules} & set(json.loads(sys.argv[2])))))
"""


@pytest.mark.parametrize("command", ["status", "plan", "--help"])
def test_light_commands_do_not_import_torch(failed, command):
    matrix, ledger = failed
    args = {"status": ["status", "--ledger", str(ledger)], "plan": ["plan", str(matrix)],
            "--help": ["--help"]}[command]
    done = subprocess.run([sys.executable, "-c", IMPORT_CHECK, json.dumps(args), json.dumps(HEAVY)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    *output, imported = done.stdout.splitlines()
    assert json.loads(imported) == []
    # the command really ran
    expected = {"status": "totals: FAILED 3", "plan": "tiny-std/eng-nob__ties", "--help": "resubmit"}
    assert expected[command] in "\n".join(output)


def test_submit_and_status_agree_on_the_ledger_named_by_bakery_ledger(project, monkeypatch):
    ledger = project / "elsewhere" / "my-ledger.json"
    monkeypatch.setenv("BAKERY_LEDGER", str(ledger))
    matrix_path = write_project(project)
    result = invoke("submit", matrix_path, "--executor", "local")
    assert result.exit_code == 0, result.output
    assert ledger.exists() and not (project / LEDGER).exists()
    status = invoke("status", "--json")  # no --ledger: BAKERY_LEDGER names it
    assert sorted(row["cell"] for row in json.loads(status.stdout)) == sorted(CELLS)


def test_a_submit_overtaken_after_judging_its_cells_submits_none_of_them(project, monkeypatch):
    """The race of two submits, made deterministic: another submission lands between this one's
    look at the ledger and its taking the ledger lock."""
    from bakery_slurm.cli import submit as submit_command

    matrix_path = write_project(project)
    judge = submit_command.skip_done_or_live

    def judged_then_overtaken(*args, **kwargs):
        verdict = judge(*args, **kwargs)
        matrix = load_matrix(matrix_path)
        submission.submit_cells(project / LEDGER, matrix, expand(matrix), "local")
        return verdict

    monkeypatch.setattr(submit_command, "skip_done_or_live", judged_then_overtaken)
    result = invoke("submit", matrix_path, "--executor", "local")
    assert result.exit_code == 0, result.output
    ledger = load_ledger(project / LEDGER)
    assert {cell: len(attempts) for cell, attempts in ledger.cells.items()} == dict.fromkeys(CELLS, 1)
    assert sorted(line for line in result.stderr.splitlines() if line.startswith("skip ")) == [
        f"skip {cell}: submitted meanwhile by another process" for cell in sorted(CELLS)]


def test_running_cells_show_their_stage_and_merge_progress():
    from bakery_slurm.status_snapshot import describe_progress

    record = {"status": "running", "stages": {
        "bake": {"status": "done"}, "merge": {"status": "running", "started": "T0"}}}
    assert describe_progress("RUNNING", record) == "merge since T0"
    record["progress"] = {"stage": "merge", "tensors_done": 120, "tensors_total": 340}
    assert describe_progress("RUNNING", record) == "merge since T0, 120/340 tensors"
    assert describe_progress("TIMEOUT", record) == "stopped in merge (started T0)"
    assert describe_progress("COMPLETED", {**record, "status": "done"}) is None


def test_run_cell_in_process_removes_and_forgets_its_private_xet_cache(write_matrix, tmp_path,
                                                                       monkeypatch):
    """A task's HF_XET_CACHE is its own: run in-process (as here), the next one gets a new one."""
    monkeypatch.delenv("HF_XET_CACHE", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "node-tmp"))
    (tmp_path / "node-tmp").mkdir()
    result = invoke("run-cell", write_matrix(MINIMAL_MATRIX), "no-such/cell")
    assert result.exit_code == 2, result.output
    assert "HF_XET_CACHE" not in os.environ
    assert list((tmp_path / "node-tmp").iterdir()) == []


def test_a_task_process_collects_nothing_on_its_way_out(tmp_path):
    """Python's exit would walk every object torch and mergekit made looking for cycles; a task
    skips that. A cycle made before the exit is not collected then (its finalizer never runs)."""
    code = ("import sys\n"
            "from bakery_slurm.cli.run_cell import task_process\n"
            "class Cycle:\n"
            "    def __del__(self):\n"
            "        print('collected', flush=True)\n"
            "with task_process():\n"
            "    cycle = Cycle(); cycle.me = cycle\n"
            "    del cycle\n"
            "    if sys.argv[1:] == ['collect']:\n"
            "        import gc; gc.collect()\n")
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    skipped = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert skipped.returncode == 0 and skipped.stdout == "", skipped.stderr
    collected = subprocess.run([sys.executable, "-c", code, "collect"], env=env,
                               capture_output=True, text=True)
    assert collected.stdout == "collected\n"


def test_resubmit_does_not_need_the_matrix_of_a_submission_with_nothing_failed(tmp_path,
                                                                              monkeypatch):
    """A shared ledger holds alice's old submission (all COMPLETED, from a matrix bob cannot read
    or that was moved since) and bob's, with a FAILED cell: bob's `resubmit` runs his cell
    without reading alice's matrix."""
    bob = write_project(tmp_path / "bob")
    bob.write_text(bob.read_text() + '\n[runtime]\ncontainer = "none"\n')
    alice = tmp_path / "alice" / "matrix.toml"  # gone (or mode 600 in alice's home)
    ledger = Ledger()
    statuses = []
    for n, (matrix, cell, state) in enumerate([(alice, "tiny-std/eng-nob__old", "COMPLETED"),
                                               (bob, "tiny-std/eng-nob__ties", "FAILED")]):
        planned = PlannedArray(executor="slurm", resources={}, cells=[cell],
                               folder=str(matrix.parent / "work" / "arrays" / f"a{n}"))
        sub = record_intent(ledger, matrix_path=str(matrix), matrix_sha256="0" * 64,
                            arrays=[planned], recipe_hashes={cell: "r"},
                            now=datetime.now(timezone.utc) - timedelta(hours=1))
        confirm_array(ledger, sub.arrays[0].name, str(100 + n))
        statuses.append(CellStatus(cell, state, 1, sub.arrays[0].name, str(100 + n), 0, "r"))
    path = tmp_path / "bakery-ledger.json"
    save_ledger(path, ledger)
    arrays = {a.name: a for s in ledger.submissions for a in s.arrays}
    monkeypatch.setattr(resubmit_command, "snapshot",
                        lambda *a, **k: Snapshot(statuses=statuses, arrays=arrays, notes=[]))
    result = invoke("resubmit", "--dry-run", "--no-preflight", "--ledger", path, "--json")
    assert result.exit_code == 0, result.output
    assert "would resubmit 1 task(s)" in result.stderr


MINE = ["1b-std/eng-nob__ties", "1b-std/eng-nob__linear"]
THEIRS = "1b-std/eng-nob__dare"


def ledger_shared_with_a_teammate(tmp_path: Path) -> Path:
    ledger = Ledger()
    for cells, job in ((MINE, "100"), ([THEIRS], "200")):
        planned = PlannedArray(executor="slurm", resources={}, cells=cells,
                               folder=str(tmp_path / "work" / "arrays" / job))
        sub = record_intent(ledger, matrix_path=str(tmp_path / "matrix.toml"),
                            matrix_sha256="0" * 64, arrays=[planned],
                            recipe_hashes={c: "r" for c in cells})
        confirm_array(ledger, sub.arrays[0].name, job)
    path = tmp_path / "bakery-ledger.json"
    save_ledger(path, ledger)
    return path


def test_cancel_records_the_tasks_scancel_did_cancel_when_a_teammates_task_is_refused(
        tmp_path, monkeypatch):
    """A shared ledger: my array 100 (2 pending tasks) and a teammate's single-task job 200.
    `scancel 100_0 100_1 200` (checked on this cluster as a non-owner) cancels 100_0 and 100_1,
    refuses 200 and exits non-zero. The ledger must note my two cancels: SLURM keeps no row of a
    pending array task cancelled before it started, so without the note status shows them
    PENDING while the array's pending range still covers them, and LOST without accounting."""
    path = ledger_shared_with_a_teammate(tmp_path)
    ledger = load_ledger(path)
    pending = {"100_0": TaskState("PENDING"), "100_1": TaskState("PENDING"),
               "200": TaskState("PENDING")}
    snap = Snapshot(statuses=reduce_cells(ledger, pending),
                    arrays={a.name: a for a in all_arrays(ledger)}, notes=[])
    runner = Recorder({"scancel": (1, "", "scancel: error: Kill job error on job id 200: "
                                          "Access/permission denied\n")})
    monkeypatch.setattr(cancel_command, "snapshot", lambda *a, **k: snap)
    monkeypatch.setattr(cancel_command, "backend", lambda name: SlurmBackend(runner))
    result = invoke("cancel", "--ledger", path)
    assert sorted(runner.calls[0][1:]) == ["100_0", "100_1", "200"]
    after = load_ledger(path)
    noted = {cell: after.cells[cell][-1].cancelled is not None for cell in [*MINE, THEIRS]}
    assert noted == {MINE[0]: True, MINE[1]: True, THEIRS: False}
    assert result.exit_code == 3 and "Access/permission denied" in result.stderr
    assert all(f"cancelled {cell} (100_" in result.stdout for cell in MINE)


def test_a_task_ended_by_sigterm_removes_its_private_xet_cache(tmp_path):
    """scancel, the time limit and preemption start with SIGTERM (SIGKILL comes KillWait seconds
    later; the local executor's cancel sends SIGTERM only): the task ends through its cleanup."""
    script = ("import os, pathlib, time\n"
              "from bakery_slurm.cli.run_cell import task_process\n"
              "with task_process():\n"
              "    folder = pathlib.Path(os.environ['HF_XET_CACHE'])\n"
              "    folder.mkdir()\n"
              "    print(folder, flush=True)\n"
              "    time.sleep(60)\n")
    env = {**{k: v for k, v in os.environ.items() if k != "HF_XET_CACHE"}, "TMPDIR": str(tmp_path)}
    task = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
    try:
        folder = Path(task.stdout.readline().strip())
        assert folder.is_dir() and folder.parent == tmp_path
        task.send_signal(signal.SIGTERM)
        assert task.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        task.kill()
    assert not folder.exists()
