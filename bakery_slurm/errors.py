"""The exceptions bakery-slurm raises. Library code raises these; only `bakery_slurm.cli` turns them
into messages and exit codes (2 config, ledger or lock, 3 scheduler, 1 everything else)."""


class BakeryError(Exception):
    """Base class of every error bakery-slurm raises on purpose."""


class ConfigError(BakeryError):
    """The matrix (or another input file) is invalid. The message names the file, key and value."""


class SchedulerError(BakeryError):
    """sbatch, sacct, squeue, scancel or scontrol failed or printed something we cannot parse."""


class SchedulerMissing(SchedulerError):
    """A SLURM command is not installed or not on PATH."""


class CancelRefused(SchedulerError):
    """scancel cancelled the tasks it was allowed to and refused `refused`, (array name, index)
    keys (a teammate's tasks on a shared ledger)."""

    def __init__(self, message: str, refused: frozenset[tuple[str, int]]):
        super().__init__(message)
        self.refused = refused


class LedgerError(BakeryError):
    """The ledger cannot be read (missing, truncated, corrupt, newer schema). It is never overwritten."""


class LockError(BakeryError):
    """A lock file cannot be opened (a teammate's file the group may not write) or the
    filesystem does not support POSIX locks. The message says which, and what fixes it."""


class StageError(BakeryError):
    """A pipeline stage failed for one cell."""

    def __init__(self, cell_id: str, stage: str, message: str):
        super().__init__(f"{cell_id}: stage {stage} failed: {message}")
        self.cell_id = cell_id
        self.stage = stage


class PushError(BakeryError):
    """Publishing a cell failed after every retry."""


class RepairError(BakeryError):
    """A checkpoint cannot be brought to the hub tensor-name layout: unreadable safetensors, an index
    that disagrees with its shards, or tensor names that are not a bijection with the base's."""
