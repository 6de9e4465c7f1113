"""The JSON ledger: validation at load, atomic locked updates, attempts keyed by cell id."""

from __future__ import annotations

import json
import multiprocessing
from datetime import datetime, timezone
from pathlib import Path

import pytest

from bakery_slurm.errors import LedgerError
from bakery_slurm.ledger import (
    SCHEMA_VERSION,
    Ledger,
    PlannedArray,
    all_arrays,
    attempts,
    confirm_array,
    find_array,
    forget_array,
    latest_attempt,
    load_ledger,
    record_intent,
    save_ledger,
    update_ledger,
)

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)
T1 = datetime(2025, 3, 2, 12, 0, tzinfo=timezone.utc)
SHA = "ab" * 32


def planned(*cells: str, executor: str = "slurm") -> PlannedArray:
    return PlannedArray(
        executor=executor,
        resources={"partition": "accel", "gpus_per_node": 1},
        folder="/w/submitit/%j",
        cells=list(cells),
    )


def intent(ledger: Ledger, *arrays: PlannedArray, now: datetime = T0, recipe: str = "r1"):
    cells = [c for a in arrays for c in a.cells]
    return record_intent(
        ledger,
        matrix_path="/w/matrix.toml",
        matrix_sha256=SHA,
        arrays=list(arrays),
        recipe_hashes=dict.fromkeys(cells, recipe),
        now=now,
    )


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    """A ledger file with one confirmed submission of two arrays."""
    ledger = Ledger()
    sub = intent(ledger, planned("1b-std/eng-nob__ties", "1b-std/eng-nob__linear"), planned("12b-std/eng-nob__ties"))
    confirm_array(ledger, sub.arrays[0].name, "1001")
    confirm_array(ledger, sub.arrays[1].name, "1002")
    path = tmp_path / "ledger.json"
    save_ledger(path, ledger)
    return path


def test_round_trip(saved: Path):
    ledger = load_ledger(saved)
    assert load_ledger(saved) == ledger
    data = json.loads(saved.read_text())
    assert data["schema_version"] == SCHEMA_VERSION
    assert data["submissions"][0]["created"] == "2025-03-01T12:00:00Z"
    assert [a.job_id for a in all_arrays(ledger)] == ["1001", "1002"]
    assert all_arrays(ledger)[0].resources == {"partition": "accel", "gpus_per_node": 1}


def test_record_intent_names_arrays_and_leaves_them_unconfirmed():
    ledger = Ledger()
    sub = intent(ledger, planned("a", "b"), planned("c"))
    assert len(sub.id) == 32
    assert [a.name for a in sub.arrays] == [f"bakery-{sub.id[:8]}-0", f"bakery-{sub.id[:8]}-1"]
    assert [a.job_id for a in sub.arrays] == [None, None]
    assert [(x.array, x.index) for x in attempts(ledger, "c")] == [(sub.arrays[1].name, 0)]


def test_attempts_are_keyed_by_cell_across_arrays_numbered_from_zero():
    ledger = Ledger()
    first = intent(ledger, planned("a", "b"), now=T0, recipe="r1")
    second = intent(ledger, planned("b"), now=T1, recipe="r2")  # resubmission: b is index 0 again
    history = attempts(ledger, "b")
    assert [(x.array, x.index, x.recipe_hash) for x in history] == [
        (first.arrays[0].name, 1, "r1"),
        (second.arrays[0].name, 0, "r2"),
    ]
    assert latest_attempt(ledger, "b") == history[-1]
    assert latest_attempt(ledger, "a").array == first.arrays[0].name
    assert latest_attempt(ledger, "never") is None
    assert attempts(ledger, "never") == []


@pytest.mark.parametrize(
    "arrays, hashes, message",
    [
        ([["a"], ["a"]], {"a": "r"}, "more than one array: a"),
        ([["a", "b"]], {"a": "r"}, "no recipe hash for: b"),
    ],
)
def test_record_intent_refuses_bad_plans(arrays, hashes, message):
    ledger = Ledger()
    with pytest.raises(ValueError, match=message):
        record_intent(
            ledger, matrix_path="m", matrix_sha256=SHA, arrays=[planned(*a) for a in arrays], recipe_hashes=hashes
        )
    assert ledger == Ledger()


def test_planned_array_refuses_a_cell_twice_and_unknown_fields():
    with pytest.raises(ValueError, match="more than once in one array: a"):
        planned("a", "b", "a")
    with pytest.raises(ValueError, match="extra"):
        PlannedArray(executor="slurm", resources={}, folder="f", cells=["a"], partition="accel")


def test_record_intent_refuses_a_reused_submission_id():
    ledger = Ledger()
    sub = intent(ledger, planned("a"))
    with pytest.raises(ValueError, match="clashes"):
        record_intent(
            ledger,
            matrix_path="m",
            matrix_sha256=SHA,
            arrays=[planned("b")],
            recipe_hashes={"b": "r"},
            submission_id=sub.id,
        )


def test_confirm_array():
    ledger = Ledger()
    name = intent(ledger, planned("a")).arrays[0].name
    assert confirm_array(ledger, name, "77").job_id == "77"
    confirm_array(ledger, name, "77")  # idempotent
    assert find_array(ledger, name).job_id == "77"
    with pytest.raises(LedgerError, match=f"{name} already has job id 77"):
        confirm_array(ledger, name, "78")
    with pytest.raises(LedgerError, match="no array named bakery-nope-0"):
        confirm_array(ledger, "bakery-nope-0", "1")


def test_missing_ledger(tmp_path: Path):
    path = tmp_path / "ledger.json"
    with pytest.raises(LedgerError, match=str(path)):
        load_ledger(path)
    assert load_ledger(path, missing_ok=True) == Ledger()


def test_truncated_ledger_is_refused_and_left_byte_identical(saved: Path):
    saved.write_bytes(saved.read_bytes()[:200])
    before = saved.read_bytes()
    with pytest.raises(LedgerError) as err:
        load_ledger(saved)
    assert str(saved) in str(err.value)
    assert "truncated or corrupt" in str(err.value)
    with pytest.raises(LedgerError, match="truncated"):
        with update_ledger(saved) as ledger:
            intent(ledger, planned("x"))
    assert saved.read_bytes() == before


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.update(schema_version=SCHEMA_VERSION + 1), f"newer bakery-slurm \\(schema_version {SCHEMA_VERSION + 1}"),
        (lambda d: d.pop("schema_version"), "no integer schema_version"),
        (lambda d: d.update(schema_version=0), "schema_version: Input should be 1, 2 or 3"),
        (lambda d: d.update(surprise=1), "surprise: Extra inputs are not permitted"),
        (lambda d: d["submissions"][0]["arrays"][0].update(job_id="1_2"), "job_id: String should match"),
        (lambda d: d["cells"]["12b-std/eng-nob__ties"][0].update(index=5), "has no such target at index 5"),
        (lambda d: d["cells"].pop("12b-std/eng-nob__ties"), "index 0 \\(12b-std/eng-nob__ties\\) has no attempt"),
    ],
)
def test_invalid_ledger_is_refused_and_left_untouched(saved: Path, edit, message):
    data = json.loads(saved.read_text())
    edit(data)
    saved.write_text(json.dumps(data))
    before = saved.read_bytes()
    with pytest.raises(LedgerError, match=message) as err:
        load_ledger(saved)
    assert str(saved) in str(err.value)
    assert saved.read_bytes() == before


@pytest.mark.parametrize("content", [b"", b"[]", b"\xff\xfe"])
def test_non_ledger_content_is_refused(tmp_path: Path, content: bytes):
    path = tmp_path / "ledger.json"
    path.write_bytes(content)
    with pytest.raises(LedgerError, match=str(path)):
        load_ledger(path)


def test_save_refuses_an_inconsistent_ledger(saved: Path):
    before = saved.read_bytes()
    ledger = load_ledger(saved)
    ledger.cells["1b-std/eng-nob__ties"][0].array = "bakery-gone-0"
    with pytest.raises(LedgerError, match="refusing to save.*unknown merge array 'bakery-gone-0'"):
        save_ledger(saved, ledger)
    assert saved.read_bytes() == before


def test_update_ledger_saves_on_success_only(tmp_path: Path):
    path = tmp_path / "ledger.json"
    with update_ledger(path) as ledger:
        intent(ledger, planned("a"))
    assert list(load_ledger(path).cells) == ["a"]
    with pytest.raises(RuntimeError):
        with update_ledger(path) as ledger:
            intent(ledger, planned("b"))
            raise RuntimeError("sbatch exploded")
    assert list(load_ledger(path).cells) == ["a"]
    assert (tmp_path / "ledger.json.lock").exists()


UPDATES_PER_PROCESS = 15


def _add_submissions(path: str, worker: int) -> None:
    for n in range(UPDATES_PER_PROCESS):
        with update_ledger(path) as ledger:
            intent(ledger, planned(f"w{worker}-{n}"))


def test_concurrent_updates_lose_nothing(tmp_path: Path):
    path = tmp_path / "ledger.json"
    # fork: the children inherit the imported modules, which keeps this test fast.
    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=_add_submissions, args=(str(path), w)) for w in range(2)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(timeout=60)
    assert [p.exitcode for p in workers] == [0, 0]
    ledger = load_ledger(path)
    assert len(ledger.submissions) == 2 * UPDATES_PER_PROCESS
    assert sorted(ledger.cells) == sorted(f"w{w}-{n}" for w in range(2) for n in range(UPDATES_PER_PROCESS))


def test_a_version_1_ledger_reads_and_is_written_back_as_the_current_version(saved: Path):
    data = json.loads(saved.read_text())
    for attempts in data["cells"].values():
        for attempt in attempts:
            attempt.pop("pins", None)
            attempt.pop("cancelled", None)
    saved.write_text(json.dumps({**data, "schema_version": 1}))
    ledger = load_ledger(saved)
    assert all(a.pins == {} and a.cancelled is None for c in ledger.cells.values() for a in c)
    with update_ledger(saved):
        pass
    assert json.loads(saved.read_text())["schema_version"] == SCHEMA_VERSION


def eval_planned(*targets: str, after: str | None = None,
                 after_indices: list[int] | None = None) -> PlannedArray:
    return PlannedArray(executor="slurm", resources={"gpus_per_node": 1}, folder="/w/e",
                        cells=list(targets), stage="eval", after=after, after_indices=after_indices)


def test_eval_attempts_are_kept_apart_from_merge_attempts_of_the_same_id():
    ledger = Ledger()
    merge = planned("1b-std/eng-nob__ties", "1b-std/eng-nob__linear")
    name = "bakery-00000000-0"
    record_intent(ledger, matrix_path="m", matrix_sha256=SHA, submission_id="0" * 32,
                  arrays=[merge, eval_planned("1b-std/eng-nob__ties", "1b-std/eng-nob__linear",
                                              after=name, after_indices=[0, 1]),
                          eval_planned("1b-std/base")],
                  recipe_hashes=dict.fromkeys(merge.cells, "recipe"),
                  eval_hashes={"1b-std/eng-nob__ties": "s", "1b-std/eng-nob__linear": "s",
                               "1b-std/base": "s"},
                  eval_pins={"1b-std/base": {"hub:org/base@main": "c" * 40}}, now=T0)
    assert attempts(ledger, "1b-std/eng-nob__ties")[0].recipe_hash == "recipe"
    assert attempts(ledger, "1b-std/eng-nob__ties", stage="eval")[0].recipe_hash == "s"
    assert latest_attempt(ledger, "1b-std/base") is None
    assert latest_attempt(ledger, "1b-std/base", stage="eval").pins == {"hub:org/base@main": "c" * 40}
    assert Ledger.model_validate(json.loads(ledger.model_dump_json())) == ledger
    # A merge array whose sbatch definitely failed takes the eval array chained to it along.
    forget_array(ledger, name)
    assert set(ledger.evals) == {"1b-std/base"} and ledger.cells == {}


@pytest.mark.parametrize("make, message", [
    (lambda: eval_planned("a", after="m"), "after and after_indices go together"),
    (lambda: eval_planned("a", "b", after="m", after_indices=[0]), "1 entries for 2 tasks"),
    (lambda: PlannedArray(executor="slurm", resources={}, folder="f", cells=["a"], after="m",
                          after_indices=[0]), "only an eval array waits"),
])
def test_a_chained_array_names_one_merge_task_per_task(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_a_ledger_whose_eval_array_waits_for_an_unknown_array_is_refused(saved: Path):
    data = json.loads(saved.read_text())
    data["submissions"][0]["arrays"].append({
        **data["submissions"][0]["arrays"][0], "name": "bakery-eval-0", "stage": "eval",
        "after": "bakery-nope-0", "after_indices": [0, 1]})
    data["evals"] = {c: [{**a[0], "array": "bakery-eval-0"}] for c, a in data["cells"].items()
                     if a[0]["array"] == data["submissions"][0]["arrays"][0]["name"]}
    saved.write_text(json.dumps(data))
    with pytest.raises(LedgerError, match="waits for unknown merge array 'bakery-nope-0'"):
        load_ledger(saved)


@pytest.mark.parametrize("text", ['{"schema_version": 3, "x": ' + "1" * 5000 + "}",
                                  '{"schema_version": 3, "x": ' + "[" * 100_000 + "]" * 100_000 + "}"])
def test_a_corrupt_ledger_is_a_ledger_error(tmp_path, text):
    path = tmp_path / "bakery-ledger.json"
    path.write_text(text)
    with pytest.raises(LedgerError, match="bakery-ledger.json"):
        load_ledger(path)


def test_updating_a_symlinked_ledger_updates_the_shared_file_under_its_lock(tmp_path):
    shared = tmp_path / "project" / "bakery-ledger.json"
    shared.parent.mkdir()
    save_ledger(shared, Ledger())
    link = tmp_path / "mine.json"
    link.symlink_to(shared)
    with update_ledger(link) as ledger:
        record_intent(ledger, matrix_path="/m.toml", matrix_sha256="0" * 64,
                      arrays=[PlannedArray(executor="slurm", resources={}, cells=["c"],
                                           folder="/w/arrays/a")],
                      recipe_hashes={"c": "r"})
    assert link.is_symlink()
    assert load_ledger(shared).cells.keys() == {"c"}
    # the lock a teammate updating `shared` directly takes is the one this update took
    assert (shared.parent / "bakery-ledger.json.lock").exists()
