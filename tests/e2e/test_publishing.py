"""Publishing as a user meets it: the demo's root card (against a golden file), `[push] defer`
then `bakery-slurm push` from the login node, and a failed Hub push published later without a
rerun. Real pipeline on the tiny models; the Hub is `FakeHubApi` (tests/fakes.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from fakes import FakeHubApi, http_error

from bakery_slurm.cli import cli
from bakery_slurm.errors import StageError
from bakery_slurm.ledger import load_ledger
from bakery_slurm.login_push import push_verified
from bakery_slurm.matrix import expand, load_matrix
from bakery_slurm.pipeline import CellPaths, read_result, run_cell
from bakery_slurm.rootcard import CardContext
from support import assert_matches_golden, held_lock, settled, wait_for

pytestmark = pytest.mark.e2e

GOLDEN = Path(__file__).parent / "golden"


def invoke(*args, **kwargs):
    return CliRunner().invoke(cli, [str(a) for a in args], **kwargs)


def normalised(card: str, folder: Path) -> str:
    """The card without what differs between machines and library versions: the demo folder,
    content hashes, the devices (CPU here, CUDA on a GPU node) and the versions list."""
    card = card.replace(str(folder), "<demo>")
    card = re.sub(r"\b[0-9a-f]{64}\b", "<sha256>", card)
    card = re.sub(r"(## Devices\n\n).*?(\n## )", r"\1<devices>\n\2", card, flags=re.S)
    head, _, _ = card.partition("## Tool versions\n")
    return head + "## Tool versions\n\n<versions>\n"


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory) -> Path:
    """The folder of one whole demo run, shared by the tests that read it or run the demo again
    there (it is the slow part)."""
    folder = tmp_path_factory.mktemp("demo-run") / "demo"
    result = invoke("demo", folder)
    assert result.exit_code == 0, result.output
    return folder


def test_the_demo_publishes_a_root_card_with_its_table(demo_folder):
    folder = demo_folder
    card = (folder / "published" / "README.md").read_text()
    assert_matches_golden(normalised(card, folder), GOLDEN / "demo_root_card.md",
                          "root card of the demo")
    # Every cell's card carries the same Hub metadata as the root card.
    meta = card.split("---\n")[1]
    for cell in ("tiny1b-std/eng-nob__ties", "tiny4b-std/eng-nob__linear"):
        assert (folder / "published" / cell / "README.md").read_text().split("---\n")[1] == meta
    # `card` renders what the last push wrote.
    assert invoke("card", folder / "matrix.toml").output == card


def test_the_demo_run_again_in_its_folder_submits_no_cell_twice(demo_folder, monkeypatch):
    """Every cell is published already: a second run skips each as `submit` does, starts no
    array and prints the first run's results."""
    from bakery_slurm.executors import LocalBackend

    def no_array(request):
        raise AssertionError(f"the demo run again started array {request.array.name}")

    monkeypatch.setattr(LocalBackend, "submit", staticmethod(no_array))
    result = invoke("demo", demo_folder)
    assert result.exit_code == 0, result.output
    cells = sorted(load_ledger(demo_folder / "bakery-ledger.json").cells)
    assert len(cells) == 6
    assert sorted(line for line in result.stderr.splitlines() if line.startswith("skip ")) == [
        f"skip {cell}: already completed and published with this recipe (use --force)"
        for cell in cells]
    assert all(len(attempts) == 1 for attempts in
               load_ledger(demo_folder / "bakery-ledger.json").cells.values())
    assert result.stdout.count("COMPLETED") == 6


def test_deferred_cells_are_published_from_the_login_node(tmp_path, write_tiny_matrix):
    path = write_tiny_matrix(tmp_path, methods=("linear",))
    path.write_text(path.read_text().replace('target = "dir:published"',
                                             'target = "dir:published"\ndefer = true'))
    ledger = tmp_path / "bakery-ledger.json"
    result = invoke("submit", path, "--executor", "local", "--ledger", ledger)
    assert result.exit_code == 0, result.output
    statuses = wait_for(lambda: settled(ledger), "the cells to settle", deadline_s=600)
    assert {s.state for s in statuses} == {"UNPUBLISHED"}
    assert not (tmp_path / "published").exists()  # the tasks stopped after verify

    status = invoke("status", "--ledger", ledger)
    assert status.exit_code == 0 and "2 cell(s) verified but not published" in status.output
    resubmit = invoke("resubmit", "--ledger", ledger, "--dry-run")
    assert "refused: verified, only publishing is left" in resubmit.output
    again = invoke("submit", path, "--executor", "local", "--ledger", ledger)
    assert again.exit_code == 0 and "verified, not published" in again.output

    assert "would publish" in invoke("push", path, "--dry-run").output
    # One cell being run again (its run lock, exclusive), the other being evaluated (shared):
    # the first waits for the next push, the second is published beside its eval.
    matrix = load_matrix(path)
    running, evaluated = (CellPaths(matrix.work_dir, cell.id) for cell in expand(matrix))
    with held_lock(running.lock), held_lock(evaluated.lock, shared=True):
        busy = json.loads(invoke("push", path, "--json").stdout)
        with held_lock(evaluated.push_lock):
            assert json.loads(invoke("push", path, "--json").stdout) == [
                {"cell": running.cell_id, "action": "skipped: a task is running it"},
                {"cell": evaluated.cell_id, "action": "skipped: another push is publishing it"}]
    assert busy[0] == {"cell": running.cell_id, "action": "skipped: a task is running it"}
    assert busy[1]["cell"] == evaluated.cell_id and busy[1]["action"].startswith("published: ")
    pushed = invoke("push", path)
    assert pushed.exit_code == 0, pushed.output
    assert pushed.output.count("published: ") == 1
    rows = json.loads(invoke("status", "--ledger", ledger, "--json").output)
    assert {row["state"] for row in rows} == {"COMPLETED"}
    card = (tmp_path / "published" / "README.md").read_text()
    assert "| tiny1b | std | linear |" in card and "| tiny4b | std | linear |" in card
    for cell in load_matrix(path).spec.sizes:
        assert (tmp_path / "published" / f"{cell}-std/eng-nob__linear" / "model.safetensors").exists()
    assert "skipped: already published" in invoke("push", path).output


def test_a_failed_hub_push_is_published_later_without_a_rerun(tmp_path, write_tiny_matrix):
    matrix = load_matrix(write_tiny_matrix(tmp_path, push="hub:owner/merges", methods=("ties",)))
    cell = {c.id: c for c in expand(matrix)}["tiny1b-std/eng-nob__ties"]
    api = FakeHubApi(download_dir=tmp_path / "downloads", failures={"create_commit": [403]})
    with pytest.raises(StageError, match="HTTP 403"):
        run_cell(cell, matrix.work_dir, device="cpu", hub_api=api)
    paths = CellPaths(matrix.work_dir, cell.id)
    before = read_result(paths)
    assert before["status"] == "failed" and before["stages"]["push"]["status"] == "failed"

    rows = push_verified([cell], matrix.work_dir, matrix.push_target,
                         CardContext.of_matrix(matrix), api=api)
    assert rows == [{"cell": cell.id, "action": f"published: {api.commits[-1].commit_url}"}]
    after = read_result(paths)
    assert after["status"] == "done" and after["stages"]["push"]["pushed_by"] == "bakery-slurm push"
    assert after["stages"]["merge"] == before["stages"]["merge"]  # nothing ran again
    assert "| tiny1b | std | ties |" in api.repos["owner/merges"]["README.md"].decode()


def test_a_task_whose_push_failed_is_unpublished_then_completed_by_push(tmp_path, write_tiny_matrix):
    path = write_tiny_matrix(tmp_path, methods=("linear",))
    (tmp_path / "published").write_text("a file where the target folder should be")
    ledger = tmp_path / "bakery-ledger.json"
    result = invoke("submit", path, "--only", "tiny1b-*", "--executor", "local", "--ledger", ledger)
    assert result.exit_code == 0, result.output
    (status,) = wait_for(lambda: settled(ledger), "the cell to settle", deadline_s=600)
    assert status.state == "UNPUBLISHED"  # its task exited 1 (FAILED), but only the push failed
    assert invoke("status", "--ledger", ledger).exit_code == 0

    failed = invoke("push", path)
    assert failed.exit_code == 1 and "Error:" in failed.output
    (tmp_path / "published").unlink()  # the user fixes the target
    assert invoke("push", path, "--only", "tiny1b-*").exit_code == 0
    rows = json.loads(invoke("status", "--ledger", ledger, "--json").output)
    assert [(row["state"], row["exit_code"]) for row in rows] == [("COMPLETED", "1:0")]
    assert (tmp_path / "published" / "tiny1b-std/eng-nob__linear" / "bakery.json").exists()


# reading whether the target holds the cell already, committing
@pytest.mark.parametrize("call", ["repo_info", "create_commit"])
def test_a_task_rate_limited_past_its_time_limit_stops_in_time_and_is_published_later(
        tmp_path, write_tiny_matrix, call):
    """A 429 asking for 10 minutes, in a task with 6 minutes in all: the push gives up at once,
    not waiting into SLURM's kill, and the cell is published from the login node, as the error
    says, whichever request failed: the publish folder is prepared before the target is read."""
    path = write_tiny_matrix(tmp_path, push="hub:owner/merges", methods=("ties",))
    path.write_text(path.read_text() + '[resources]\ntime = "00:06:00"\n')
    matrix = load_matrix(path)
    cell = {c.id: c for c in expand(matrix)}["tiny1b-std/eng-nob__ties"]
    api = FakeHubApi(download_dir=tmp_path / "downloads",
                     failures={call: [http_error(429, retry_after=600)]})
    with pytest.raises(StageError, match=r"HTTP 429.*past the task's time limit.*bakery-slurm push"):
        run_cell(cell, matrix.work_dir, device="cpu", hub_api=api)
    assert len(api.calls_to(call)) == 1
    assert read_result(CellPaths(matrix.work_dir, cell.id))["stages"]["push"]["status"] == "failed"

    rows = push_verified([cell], matrix.work_dir, matrix.push_target,
                         CardContext.of_matrix(matrix), api=api)
    assert rows == [{"cell": cell.id, "action": f"published: {api.commits[-1].commit_url}"}]
