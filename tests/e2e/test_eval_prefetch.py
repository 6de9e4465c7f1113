"""`prefetch` and the eval datasets, with the real lm-eval and `datasets`, offline.

The tiny matrix gets `[eval]` over the local multiple-choice task of tests/eval_tasks and
`[runtime] offline = true` with a fresh HF_HOME in `[runtime] env` (the tasks' caches). prefetch
loads the task in a child process with that environment, which prepares its dataset into
HF_HOME/datasets; `run-eval` then runs as a task does (its own process, the tasks' environment,
HF_DATASETS_OFFLINE=1) and reuses those files.

What offline cannot show here: the local task's data files are JSON lines beside its YAML, which
`datasets` prepares without the network, so an eval of it works offline with or without prefetch.
A task whose dataset is on the Hub is what fails offline when it was not prefetched; no test
reaches the Hub, so that failure is shown with a Hub dataset that is in no cache
(`bakery-test/absent`), for `run-eval` and for `prefetch` itself. The check before sbatch (an
offline `check` wants each task prefetched, unless its YAML shows local data files) is shown with
a task whose `dataset_path` is a folder: `datasets` loads it offline, but only lm-eval could tell
it from a Hub dataset, so check wants it prefetched like one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from bakery_slurm.cli import cli
from bakery_slurm.evaluation import results_path
from support import unshared

pytestmark = pytest.mark.e2e

TASKS = Path(__file__).resolve().parents[1] / "eval_tasks"
BASE = "tiny1b-std/base"


def eval_table(include: Path, task: str) -> str:
    return (f'[eval]\ntasks = ["{task}"]\ninclude_path = {json.dumps(str(include))}\n'
            f'baselines = [{{ name = "base", sizes = ["tiny1b"] }}]\n')


def offline_matrix(write_tiny_matrix, folder: Path, include: Path, task: str) -> SimpleNamespace:
    """The tiny matrix (ties only) with [eval] over `task` and offline tasks whose HF_HOME is
    `folder/hf-home`."""
    hf_home = folder / "hf-home"
    matrix = write_tiny_matrix(folder, methods=("ties",))
    text = matrix.read_text().replace(
        '[runtime]\ncontainer = "none"\n',
        f'[runtime]\ncontainer = "none"\noffline = true\nenv = {{ HF_HOME = "{hf_home}" }}\n')
    matrix.write_text(text + eval_table(include, task))
    return SimpleNamespace(path=matrix, hf_home=hf_home, work=folder / "bakery-work")


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def run_eval_as_a_task(matrix: SimpleNamespace, target: str) -> subprocess.CompletedProcess:
    """`run-eval` in a process of its own with the tasks' environment, as the executors start
    it (`array_task.run_task`: this environment with [runtime] env over it)."""
    env = {**os.environ, "HF_HOME": str(matrix.hf_home)}
    env.pop("HF_DATASETS_OFFLINE", None)  # run-eval sets it itself for offline = true
    return subprocess.run([sys.executable, "-m", "bakery_slurm", "run-eval", str(matrix.path),
                           target, "--device", "cpu"], env=env, capture_output=True, text=True,
                          timeout=600)


def arrow_files(hf_home: Path) -> dict[str, int]:
    return {str(p.relative_to(hf_home)): p.stat().st_mtime_ns
            for p in (hf_home / "datasets").rglob("*.arrow")}


@pytest.fixture(scope="module")
def prefetched(tmp_path_factory, write_tiny_matrix):
    matrix = offline_matrix(write_tiny_matrix, tmp_path_factory.mktemp("prefetch"), TASKS,
                            "tiny_mc")
    result = invoke("prefetch", matrix.path, "--json")
    cached = arrow_files(matrix.hf_home) if matrix.hf_home.is_dir() else {}
    evaluated = run_eval_as_a_task(matrix, BASE)
    return SimpleNamespace(matrix=matrix, result=result, cached=cached, evaluated=evaluated)


def test_prefetch_prepares_each_eval_tasks_dataset_in_the_tasks_hf_home(prefetched):
    result = prefetched.result
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)  # the tiny models are local: no Hub input to fetch
    assert row["input"] == "eval:tiny_mc" and row["commit"] is None and row["files"] == 2
    assert sorted(Path(name).name for name in prefetched.cached) == [
        "json-train.arrow", "json-validation.arrow"]
    assert all(name.startswith("datasets/json/") for name in prefetched.cached)
    assert row["bytes"] == sum((prefetched.matrix.hf_home / name).stat().st_size
                               for name in prefetched.cached)
    assert f"loading eval tasks into {prefetched.matrix.hf_home / 'datasets'}" in result.stderr


def test_an_offline_eval_then_reads_the_prefetched_dataset(prefetched):
    done = prefetched.evaluated
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["status"] == "done"
    results = json.loads(results_path(prefetched.matrix.work, BASE).read_text())
    assert results["results"]["tiny_mc"]["sample_len"] == 10
    # The same Arrow files, untouched: the eval used the prepared dataset, not a new one.
    assert arrow_files(prefetched.matrix.hf_home) == prefetched.cached


@pytest.fixture(scope="module")
def absent_task(tmp_path_factory):
    """An include folder with `absent_mc`: tiny_mc's questions, said to be the Hub dataset
    `bakery-test/absent`, which no cache holds."""
    folder = tmp_path_factory.mktemp("absent-task")
    text = (TASKS / "tiny_mc.yaml").read_text().replace("task: tiny_mc", "task: absent_mc")
    head, _, tail = text.partition("dataset_path: json\n")
    tail = tail.split("output_type:", 1)[1]  # without dataset_kwargs (the local data files)
    (folder / "absent_mc.yaml").write_text(
        head + "dataset_path: bakery-test/absent\noutput_type:" + tail)
    return folder


def test_an_offline_eval_of_a_hub_dataset_not_prefetched_fails_naming_it(
        tmp_path, write_tiny_matrix, absent_task):
    matrix = offline_matrix(write_tiny_matrix, tmp_path, absent_task, "absent_mc")
    done = run_eval_as_a_task(matrix, BASE)
    assert done.returncode == 1
    assert (f"{BASE}: stage eval failed: ConnectionError: Couldn't reach 'bakery-test/absent' on "
            "the Hub (OfflineModeIsEnabled)") in done.stderr
    assert not results_path(matrix.work, BASE).exists()


def test_prefetch_names_the_task_whose_dataset_it_cannot_load(tmp_path, write_tiny_matrix,
                                                              absent_task):
    matrix = offline_matrix(write_tiny_matrix, tmp_path, absent_task, "absent_mc")
    result = invoke("prefetch", matrix.path)
    assert result.exit_code == 1
    assert ("cannot load the dataset of eval:absent_mc (ConnectionError: Couldn't reach "
            "'bakery-test/absent' on the Hub (OfflineModeIsEnabled)): run prefetch again when the "
            "Hub is reachable") in result.stderr
    assert result.stdout == ""


@pytest.fixture(scope="module")
def folder_task(tmp_path_factory):
    """An include folder with `folder_mc`: tiny_mc's questions in a folder of data files named as
    its `dataset_path`, which `datasets` loads without the network, but which check cannot tell
    from a Hub dataset without lm-eval: it must be prefetched, like one."""
    folder = tmp_path_factory.mktemp("folder-task")
    (folder / "tiny_mc_data").mkdir()
    for split in ("train", "validation"):
        shutil.copy(TASKS / f"tiny_mc.{split}.jsonl", folder / "tiny_mc_data" / f"{split}.jsonl")
    shutil.copy(TASKS / "tiny_mc.yaml", folder)
    (folder / "folder_mc.yaml").write_text("include: tiny_mc.yaml\ntask: folder_mc\n"
                                           "dataset_path: tiny_mc_data\ndataset_kwargs: null\n")
    return folder


def test_an_offline_check_passes_once_prefetch_loaded_the_eval_tasks_dataset(
        tmp_path, write_tiny_matrix, folder_task):
    matrix = offline_matrix(write_tiny_matrix, tmp_path, folder_task, "folder_mc")
    before = invoke("check", matrix.path)
    assert before.exit_code == 2, before.output
    assert (f"eval.tasks: the dataset of eval task 'folder_mc' is not in the datasets cache "
            f"{matrix.hf_home / 'datasets'} and runtime.offline is true: run `bakery-slurm "
            f"prefetch {matrix.path}` first") in before.stderr
    prefetched = invoke("prefetch", matrix.path, "--json")
    assert prefetched.exit_code == 0, prefetched.output
    assert [row["input"] for row in json.loads(prefetched.stdout)] == ["eval:folder_mc"]
    after = invoke("check", matrix.path)
    assert after.exit_code == 0, after.output


def test_prefetch_refuses_a_task_lm_eval_does_not_know(tmp_path, write_tiny_matrix):
    matrix = offline_matrix(write_tiny_matrix, tmp_path, TASKS, "tiny_mcq")
    result = invoke("prefetch", matrix.path)
    assert result.exit_code == 2
    assert (f"Error: {matrix.path}: eval.tasks: not a task or group lm-eval knows (with "
            f"eval.include_path {TASKS}) (got tiny_mcq)") in result.stderr


def test_prefetch_without_lm_eval_says_how_to_install_it(tmp_path, write_tiny_matrix,
                                                         monkeypatch):
    matrix = offline_matrix(write_tiny_matrix, tmp_path, TASKS, "tiny_mc")
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what find_spec reports when it is absent
    result = invoke("prefetch", matrix.path)
    assert result.exit_code == 2
    assert (f"Error: {matrix.path}: eval: lm-eval is not installed here, and prefetch loads the "
            "eval tasks with it: pip install 'bakery-slurm[eval]'") in result.stderr
    assert not matrix.hf_home.exists()


def test_what_prefetch_prepares_in_a_groups_datasets_cache_the_group_may_read(
        tmp_path, write_tiny_matrix):
    """`datasets` writes the prepared dataset (and its locks and folders) under the umask: under
    a member's umask 077 a teammate's offline eval could not read the group's cache."""
    group = tmp_path / "group"
    group.mkdir()
    os.chmod(group, 0o2770)
    matrix = offline_matrix(write_tiny_matrix, group, TASKS, "tiny_mc")
    old = os.umask(0o077)
    try:
        result = invoke("prefetch", matrix.path)
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    assert arrow_files(matrix.hf_home) and unshared(matrix.hf_home) == {}
