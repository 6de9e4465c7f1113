"""The pipeline's declared data flow: every step needs only what the run starts with or what an
earlier step gives, every given field exists, and the stage names are the result record's."""

from __future__ import annotations

import dataclasses

from bakery_slurm.pipeline import STAGES, STEPS, Flow, slurm_task


def test_steps_need_only_what_earlier_steps_give():
    fields = {f.name for f in dataclasses.fields(Flow)}
    available = {f.name for f in dataclasses.fields(Flow)
                 if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    for step in STEPS:
        assert set(step.needs) <= available, (step.name, set(step.needs) - available)
        assert set(step.gives) <= fields, (step.name, set(step.gives) - fields)
        available |= set(step.gives)
    given = [name for step in STEPS for name in step.gives]
    assert len(given) == len(set(given)), "a field is given by two steps"


def test_stage_names_are_the_steps_in_order():
    assert STAGES == ("bake", "merge", "strip", "verify", "push")


def test_the_result_record_names_the_task_as_the_ledger_does(monkeypatch):
    for name in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(name, raising=False)
    assert slurm_task() is None
    monkeypatch.setenv("SLURM_JOB_ID", "9")  # a plain job: submitit's one-task array
    assert slurm_task() == "9"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "7")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert slurm_task() == "7_3"


def test_a_stage_error_is_raised_even_when_its_failure_cannot_be_recorded(tmp_path, write_matrix,
                                                                       monkeypatch):
    """The disk a stage filled may refuse the failed record too: the stage's own error (naming
    what it was writing) is the one raised, not the record's."""
    import errno

    import pytest

    from bakery_slurm import fsutil
    from bakery_slurm.errors import StageError
    from bakery_slurm.matrix import expand, load_matrix
    from bakery_slurm.pipeline import CellPaths, _Run
    from conftest import MINIMAL_MATRIX

    [cell] = expand(load_matrix(write_matrix(MINIMAL_MATRIX)))
    run = _Run(cell, CellPaths(tmp_path, cell.id))

    def full_disk():
        monkeypatch.setattr(fsutil, "atomic_write_json", refuse)
        error = OSError(errno.ENOSPC, "No space left on device")
        error.add_note("writing final")
        raise error

    def refuse(path, obj):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(StageError, match=r"stage merge failed: writing final: OSError: \[Errno 28\]"):
        run.stage("merge", full_disk)
