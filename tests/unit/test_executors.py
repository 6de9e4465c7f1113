"""Job arrays without SLURM: grouping, MaxArraySize, submitit parameters and rendering, and the
SLURM backend's scancel/sacct calls against a recording fake at the subprocess boundary."""

from __future__ import annotations

import shutil
import sys
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import pytest

from bakery_slurm import executors
from bakery_slurm.errors import SchedulerError
from bakery_slurm.executors import (
    SlurmBackend,
    SubmitRequest,
    group_cells,
    hides_others_jobs,
    parse_max_array_size,
    slurm_parameters,
)
from bakery_slurm.ledger import ArrayRecord
from bakery_slurm.matrix import Resources, expand, load_matrix
from bakery_slurm.slurm_commands import TaskState
from conftest import MINIMAL_MATRIX
from support import Recorder, assert_matches_golden

GOLDEN = Path(__file__).resolve().parent / "golden"
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)
LAUNCHER = "#!/bin/sh\nexec apptainer exec --cleanenv /i.sif python3 \"$@\"\n"


@pytest.fixture
def cell(write_matrix):
    """The one cell of MINIMAL_MATRIX, as a template for synthetic cells."""
    return expand(load_matrix(write_matrix(MINIMAL_MATRIX)))[0]


def cells_with(template, resources: list[Resources]):
    return [replace(template, id=f"c{i}", resources=r) for i, r in enumerate(resources)]


# ---------------------------------------------------------------------------------------------
# group_cells


def test_group_cells_same_resources_make_one_group(cell):
    res = Resources(partition="accel", gpus_per_node=1, time="00:30:00")
    cells = cells_with(cell, [res] * 5)
    assert [[c.id for c in g] for g in group_cells(cells, 1001)] == [["c0", "c1", "c2", "c3", "c4"]]


def test_group_cells_splits_on_time_and_partition_and_keeps_order(cell):
    a = Resources(partition="accel", time="00:30:00")
    b = Resources(partition="accel", time="01:00:00")  # another time limit
    c = Resources(partition="normal", time="00:30:00")  # another partition
    cells = cells_with(cell, [a, b, a, c, b, a])
    groups = group_cells(cells, 1001)
    assert [[x.id for x in g] for g in groups] == [["c0", "c2", "c5"], ["c1", "c4"], ["c3"]]
    assert [g[0].resources for g in groups] == [a, b, c]


def test_group_cells_splits_at_max_array_size(cell):
    res = Resources(partition="accel")
    cells = cells_with(cell, [res] * 2501)
    groups = group_cells(cells, 1001)
    assert [len(g) for g in groups] == [1001, 1001, 499]
    assert [c.id for g in groups for c in g] == [c.id for c in cells]  # order kept across chunks


def test_group_cells_split_per_group(cell):
    a, b = Resources(time="00:10:00"), Resources(time="00:20:00")
    cells = cells_with(cell, [a, b, a, a, b])
    assert [[x.id for x in g] for g in group_cells(cells, 2)] == [["c0", "c2"], ["c3"], ["c1", "c4"]]


# ---------------------------------------------------------------------------------------------
# parse_max_array_size

SCONTROL_CONFIG = """\
Configuration data as of 2025-03-01T12:00:00
AccountingStorageBackupHost = (null)
AccountingStorageType   = accounting_storage/slurmdbd
MaxArraySize            = 40001
MaxBatchRequeue         = 5
MaxJobCount             = 10000
"""


def test_parse_max_array_size_reads_the_config_line():
    assert parse_max_array_size(SCONTROL_CONFIG) == 40001


def test_parse_max_array_size_ignores_lookalike_keys():
    text = "NotMaxArraySize = 7\nMaxArraySizeX = 9\nMaxArraySize = 1001\n"
    assert parse_max_array_size(text) == 1001


@pytest.mark.parametrize("params, expected", [
    ("bf_max_job_test=1000,max_array_tasks=1000,bf_continue", 1000),  # Sherlock's, say
    ("max_array_tasks=100000", 40001),  # above MaxArraySize: the index bound is the limit
    ("(null)", 40001),
])
def test_parse_max_array_size_honours_max_array_tasks(params, expected):
    """slurm.conf(5): "max_array_tasks=1000 and MaxArraySize=100001 would permit a maximum task
    ID of 100000, but limit the number of tasks in any single job array to 1000". An array cut
    at MaxArraySize alone was refused by sbatch ("Invalid job array specification")."""
    text = SCONTROL_CONFIG + f"SchedulerParameters     = {params}\n"
    assert parse_max_array_size(text) == expected


def test_parse_max_array_size_zero_means_one_cell_per_job(cell):
    """MaxArraySize = 0 disables job arrays (slurm.conf(5)). It used to be returned as 0, and
    group_cells then died on range()'s zero step; submitit submits a one-task array as a plain
    job, which such a cluster takes."""
    size = parse_max_array_size(SCONTROL_CONFIG.replace("= 40001", "= 0"))
    assert size == 1
    cells = cells_with(cell, [Resources(partition="accel")] * 3)
    assert [[c.id for c in g] for g in group_cells(cells, size)] == [["c0"], ["c1"], ["c2"]]


@pytest.mark.parametrize("text", ["", "MaxJobCount = 10000\n", "MaxArraySize = (null)\n"])
def test_parse_max_array_size_missing_raises(text):
    with pytest.raises(SchedulerError, match="no MaxArraySize"):
        parse_max_array_size(text)


# ---------------------------------------------------------------------------------------------
# slurm_parameters


def test_slurm_parameters_drop_unset_resources_and_give_minutes(tmp_path):
    res = Resources(partition="accel", gpus_per_node=1, mem="110G", time="01:30:00")
    assert slurm_parameters(request(tmp_path, resources=res, parallelism=4)) == {
        "partition": "accel", "gpus_per_node": 1, "mem": "110G", "time": 90,
        "job_name": "bakery-0123abcd-0", "array_parallelism": 4}


def test_slurm_parameters_pass_every_set_resource(tmp_path):
    res = Resources(partition="accel", account="nn1234k", qos="devel", constraint="gh200",
                    gpus_per_node=0, cpus_per_task=70, mem="64G", time="1-00:00:30")
    params = slurm_parameters(request(tmp_path, resources=res, parallelism=2, name="n"))
    assert params == {"partition": "accel", "account": "nn1234k", "qos": "devel",
                      "constraint": "gh200", "gpus_per_node": 0, "cpus_per_task": 70,
                      "mem": "64G", "time": 1441, "job_name": "n", "array_parallelism": 2}


def test_slurm_parameters_are_valid_submitit_parameters(tmp_path):
    from submitit.slurm.slurm import _get_default_parameters

    merge = request(tmp_path, n=2).array.model_copy(update={"job_id": "41"})
    chained = eval_request(tmp_path, merge, [0, 1])
    assert set(slurm_parameters(chained)) <= set(_get_default_parameters())


def eval_request(folder: Path, after: ArrayRecord, indices: list[int]) -> SubmitRequest:
    base = request(folder, n=len(indices), name="bakery-0123abcd-1")
    array = base.array.model_copy(update={"stage": "eval", "after": after.name,
                                          "after_indices": indices})
    return replace(base, array=array, after=after)


@pytest.mark.parametrize("merge_tasks, indices, expected", [
    (3, [0, 1, 2], "aftercorr:41"),       # task i waits for merge task i
    (3, [0, 1], "aftercorr:41"),          # the first merge cells only
    (3, [2], "afterok:41_2"),             # one eval, one merge task
    (1, [0], "afterok:41"),               # submitit submits a one-task array as a plain job
])
def test_an_eval_array_waits_for_its_merge_tasks_and_dies_with_them(tmp_path, merge_tasks,
                                                                     indices, expected):
    merge = request(tmp_path, n=merge_tasks).array.model_copy(update={"job_id": "41"})
    params = slurm_parameters(eval_request(tmp_path, merge, indices))
    assert params["dependency"] == expected
    assert params["additional_parameters"] == {"kill-on-invalid-dep": "yes"}
    text = SlurmBackend().render(eval_request(tmp_path, merge, indices))
    assert f"#SBATCH --dependency={expected}" in text.splitlines()
    assert "#SBATCH --kill-on-invalid-dep=yes" in text.splitlines()


def test_tasks_that_do_not_correspond_are_never_chained_as_one_array(tmp_path):
    merge = request(tmp_path, n=3).array.model_copy(update={"job_id": "41"})
    with pytest.raises(ValueError, match="one job each"):
        executors.dependency(merge, [1, 2], 2)


# ---------------------------------------------------------------------------------------------
# SlurmBackend.render: submitit's own sbatch renderer


def request(folder: Path, n: int = 3, parallelism: int = 2, resources: Resources | None = None,
            launcher: str | None = LAUNCHER, name: str = "bakery-0123abcd-0") -> SubmitRequest:
    resources = resources or Resources(partition="accel", account="nn1234k", gpus_per_node=1,
                                       cpus_per_task=70, mem="110G", time="00:30:00")
    cells = [f"1b-std/eng-nob__m{i}" for i in range(n)]
    array = ArrayRecord(name=name, executor="slurm", folder=str(folder), cells=cells,
                        resources=resources.model_dump(exclude_none=True), submitted=T0)
    return SubmitRequest(array=array, cell_args=[["run-cell", c] for c in cells],
                         argvs=[["true", c] for c in cells], fixed_env={}, launcher=launcher,
                         pass_env=[], container="apptainer" if launcher else "none",
                         parallelism=parallelism, resources=resources)


def test_render_has_the_array_and_resources(tmp_path):
    text = SlurmBackend().render(request(tmp_path / "arrays" / "a", n=12, parallelism=4))
    lines = text.splitlines()
    assert "#SBATCH --array=0-11%4" in lines
    assert "#SBATCH --job-name=bakery-0123abcd-0" in lines
    assert "#SBATCH --time=30" in lines
    assert "#SBATCH --partition=accel" in lines
    assert "#SBATCH --account=nn1234k" in lines
    assert "#SBATCH --gpus-per-node=1" in lines
    assert "#SBATCH --cpus-per-task=70" in lines
    assert "#SBATCH --mem=110G" in lines
    assert f"#SBATCH --output={tmp_path}/arrays/a/%A_%a_0_log.out" in lines


def test_render_throttle_never_exceeds_the_array(tmp_path):
    text = SlurmBackend().render(request(tmp_path, n=3, parallelism=16))
    assert "#SBATCH --array=0-2%3" in text.splitlines()


def test_render_leaves_out_unset_resources(tmp_path):
    text = SlurmBackend().render(request(tmp_path, resources=Resources(time="02:00:00")))
    assert "#SBATCH --time=120" in text.splitlines()
    for flag in ("--partition", "--gpus-per-node", "--account", "--qos", "--mem=", "--constraint"):
        assert flag not in text


def test_render_of_a_one_task_array_is_a_plain_job_as_submitit_submits_it(tmp_path):
    text = SlurmBackend().render(request(tmp_path, n=1))
    assert "--array" not in text
    assert f"#SBATCH --output={tmp_path}/%j_0_log.out" in text.splitlines()


def test_render_matches_the_golden_file(tmp_path):
    """As submitit's test_make_sbatch_string with `_sbatch_test_record.txt`; the folder path is
    normalised to {FOLDER}."""
    folder = tmp_path / "work" / "arrays" / "bakery-0123abcd-0"
    text = SlurmBackend().render(request(folder, n=5, parallelism=2)).replace(str(folder), "{FOLDER}")
    record = GOLDEN / "sbatch_array.txt"
    assert_matches_golden(text, record, "sbatch script")


def test_render_needs_no_srun_and_matches_the_executor_command(tmp_path, monkeypatch):
    """--dry-run works on a laptop; the command is the one a real SlurmExecutor submits."""
    from submitit.slurm.slurm import SlurmExecutor

    folder = tmp_path / "arrays" / "a"
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: "/usr/bin/srun" if name == "srun"
                        else real_which(name, *a, **k))
    launcher = folder / "apptainer-launch.sh"
    expected = SlurmExecutor(folder, python=str(launcher))._submitit_command_str
    with_srun = SlurmBackend().render(request(folder))
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None if name == "srun"
                        else real_which(name, *a, **k))
    without_srun = SlurmBackend().render(request(folder))
    assert without_srun == with_srun
    assert with_srun.splitlines()[-1].endswith(" " + expected)
    assert expected == f"{launcher} -u -m submitit.core._submit {folder}"


def test_without_a_container_the_runner_is_this_python(tmp_path):
    text = SlurmBackend().render(request(tmp_path, launcher=None))
    assert text.splitlines()[-1].endswith(f" {sys.executable} -u -m submitit.core._submit {tmp_path}")


# ---------------------------------------------------------------------------------------------
# SlurmBackend.cancel and .states with a fake at the subprocess boundary


def array(name: str, job_id: str | None, n: int) -> ArrayRecord:
    return ArrayRecord(name=name, executor="slurm", folder=f"/w/arrays/{name}", job_id=job_id,
                       cells=[f"{name}/cell{i}" for i in range(n)], resources={}, submitted=T0)


def test_cancel_is_one_scancel_for_many_tasks():
    runner = Recorder({"scancel": (0, "", "")})
    big, other, single = array("a", "100", 5), array("b", "200", 3), array("c", "300", 1)
    SlurmBackend(runner).cancel([(big, 0), (big, 4), (other, 2), (single, 0)])
    # A one-task array was submitted by submitit as a plain job: it has no `_0` task id.
    assert runner.calls == [["scancel", "100_0", "100_4", "200_2", "300"]]
    assert runner.kwargs[0]["check"] is True and runner.kwargs[0]["timeout"] > 0


def test_cancel_nothing_runs_nothing():
    runner = Recorder()
    SlurmBackend(runner).cancel([])
    assert runner.calls == []


def test_cancel_failure_is_a_scheduler_error_with_stderr():
    runner = Recorder({"scancel": (1, "", "scancel: error: Invalid job id specified\n")})
    with pytest.raises(SchedulerError, match=r"scancel 100_1 failed: scancel: error: Invalid job id"):
        SlurmBackend(runner).cancel([(array("a", "100", 2), 1)])


def test_cancel_without_scancel_is_a_scheduler_error():
    with pytest.raises(SchedulerError, match="scancel 100_1 failed"):
        SlurmBackend(Recorder()).cancel([(array("a", "100", 2), 1)])


def test_states_from_one_sacct_call_and_the_queue_for_live_tasks():
    # 100_1 also has a row of an earlier job 100 (ids reset): it is not ours.
    runner = Recorder({"sacct": (0, "100_0|COMPLETED|0:0|00:01:00|n1|a\n100_1|FAILED|1:0|00:00:02|n2|a\n"
                                    "100_1|COMPLETED|0:0|00:00:09|n9|old\n"
                                    "200|RUNNING|0:0|00:00:10|n3|b\n", ""),
                       "squeue": (0, "200|RUNNING|0:11|n3|b\n", "")})
    states, source = SlurmBackend(runner).states(
        [array("a", "100", 2), array("b", "200", 1), array("c", None, 1)], "2025-03-01T11:00:00")
    assert source == "sacct"
    # Accounting may be behind on a live task: the controller's word on it stands.
    assert states == {"100_0": TaskState("COMPLETED", "0:0", "00:01:00", "n1"),
                      "100_1": TaskState("FAILED", "1:0", "00:00:02", "n2"),
                      "200": TaskState("RUNNING", None, "0:11", "n3")}
    sacct, squeue = runner.calls
    assert sacct[0] == "sacct" and sacct[sacct.index("-j") + 1] == "100,200"
    assert sacct[sacct.index("--starttime") + 1] == "2025-03-01T11:00:00"
    # Only about the array with a task accounting has not settled.
    assert squeue[0] == "squeue" and squeue[-1] == "--name=b"


def test_states_ask_nothing_more_when_accounting_settled_every_task():
    runner = Recorder({"sacct": (0, "100_0|COMPLETED|0:0|00:01:00|n1|a\n100_1|TIMEOUT|0:0|01:00:00|n2|a\n", "")})
    states, _ = SlurmBackend(runner).states([array("a", "100", 2)], None)
    assert [c[0] for c in runner.calls] == ["sacct"] and set(states) == {"100_0", "100_1"}


def test_states_of_unconfirmed_arrays_only_asks_nothing():
    runner = Recorder()
    assert SlurmBackend(runner).states([array("c", None, 2)], None) == ({}, "sacct")
    assert runner.calls == []


def test_states_fall_back_to_squeue_when_accounting_is_disabled():
    runner = Recorder({
        "sacct": (1, "", "sacct: error: Slurm accounting storage is disabled\n"),
        "squeue": (0, "100_1|RUNNING|1:02|n1|a\n100_[2-3]|PENDING|0:00||a\n999_0|RUNNING|5:00|n9|z\n", ""),
    })
    states, source = SlurmBackend(runner).states([array("a", "100", 4)], "2025-03-01T11:00:00")
    assert [c[0] for c in runner.calls] == ["sacct", "squeue"]
    assert "squeue" in source and "SLURM accounting is disabled" in source
    assert source != "sacct"
    assert states == {"100_1": TaskState("RUNNING", None, "1:02", "n1"),
                      "100_2": TaskState("PENDING", None, "0:00", None),
                      "100_3": TaskState("PENDING", None, "0:00", None)}


def test_states_fall_back_to_squeue_when_sacct_is_not_installed():
    runner = Recorder({"squeue": (0, "100_0|RUNNING|0:05|n1|a\n", "")})  # no sacct to run
    states, source = SlurmBackend(runner).states([array("a", "100", 1)], None)
    assert [c[0] for c in runner.calls] == ["sacct", "squeue"]
    assert "sacct is not installed" in source
    assert states == {"100_0": TaskState("RUNNING", None, "0:05", "n1")}


@pytest.mark.parametrize("answer, message", [
    ((1, "", "sacct: error: Problem talking to the database: Connection refused\n"),
     "Problem talking to the database"),
    ((0, "", "sacct: error: slurmdbd: Connection refused\n"), "slurmdbd: Connection refused"),
    ((0, "garbage\n", ""), "expected 6 '|'-separated fields"),
])
def test_states_raise_for_other_sacct_failures(answer, message):
    runner = Recorder({"sacct": answer, "squeue": (0, "100_0|RUNNING|0:05|n1|a\n", "")})
    with pytest.raises(SchedulerError, match=message):
        SlurmBackend(runner).states([array("a", "100", 2)], None)
    assert [c[0] for c in runner.calls] == ["sacct"]  # no silent fallback


def test_states_raise_when_the_squeue_fallback_fails():
    runner = Recorder({
        "sacct": (1, "", "sacct: error: Slurm accounting storage is disabled\n"),
        "squeue": (1, "", "squeue: error: Unable to contact slurm controller\n"),
    })
    with pytest.raises(SchedulerError, match="Unable to contact slurm controller"):
        SlurmBackend(runner).states([array("a", "100", 2)], None)


def test_max_array_size_from_scontrol():
    runner = Recorder({"scontrol": (0, SCONTROL_CONFIG, "")})
    assert SlurmBackend(runner).max_array_size() == 40001
    assert runner.calls == [["scontrol", "show", "config"]]


def test_max_array_size_from_scontrol_with_max_array_tasks():
    text = SCONTROL_CONFIG + "SchedulerParameters     = max_array_tasks=100,bf_continue\n"
    assert SlurmBackend(Recorder({"scontrol": (0, text, "")})).max_array_size() == 100


def test_max_array_size_without_scontrol_is_a_scheduler_error():
    with pytest.raises(SchedulerError, match="scontrol show config failed"):
        SlurmBackend(Recorder()).max_array_size()


def test_resolve_executor(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    assert executors.resolve_executor("auto") == "local"
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: f"/usr/bin/{name}")
    assert executors.resolve_executor("auto") == "slurm"
    assert executors.resolve_executor("local") == "local"


@pytest.mark.parametrize("cells, index, job", [(["a/b", "c/d"], 1, "77_1"), (["a/b"], 0, "77")])
def test_slurm_log_paths_are_submitits(tmp_path, cells, index, job):
    from submitit.core.utils import JobPaths

    array = ArrayRecord(executor="slurm", resources={}, folder=str(tmp_path), cells=cells,
                        name="bakery-0123abcd-0", job_id="77",
                        submitted=datetime.now(timezone.utc))
    paths = JobPaths(tmp_path, job_id=job, task_id=0)
    assert SlurmBackend.log_paths(array, index) == (paths.stdout, paths.stderr)


def test_both_backends_implement_the_protocol():
    from bakery_slurm.executors import Backend, LocalBackend, SlurmBackend, backend

    for candidate in (SlurmBackend(), LocalBackend(), backend("slurm"), backend("local")):
        assert isinstance(candidate, Backend)
    members = {name for name in vars(Backend) if not name.startswith("_")} | {"name"}
    for cls in (SlurmBackend, LocalBackend):
        assert members <= set(dir(cls)), (cls, members - set(dir(cls)))


@pytest.mark.parametrize("line, hidden", [
    ("PrivateData             = none", False),
    ("PrivateData             = accounts,jobs,usage", True),
    ("PrivateData             = usage,users", False),
    ("PrivateData             = jobs", True),
    ("", False),  # a configuration that does not say
])
def test_hides_others_jobs_reads_private_data(line, hidden):
    assert hides_others_jobs(f"MaxArraySize            = 1001\n{line}\n") is hidden
