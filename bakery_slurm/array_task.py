"""The function submitit runs for each array task: `python -m bakery_slurm run-cell ...`.

Pickled by reference (`bakery_slurm.array_task.run_task`), so it runs wherever bakery-slurm is
installed: inside the image under the apptainer runtime (submitit's runner itself started there by
the launcher of `task_command`), or in the submitting Python without a container.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Mapping, Sequence


TASK_UMASK = "BAKERY_TASK_UMASK"
"""The key of `fixed_env` that carries the submitter's umask (octal) to `run_task`."""


def run_task(args: Sequence[str], fixed_env: Mapping[str, str]) -> None:
    """Run `python -m bakery_slurm ARGS` with this Python, its environment with `fixed_env` over
    it; a non-zero exit raises, so SLURM records the task as FAILED.

    The task is started under the umask its array folder gives (`SLURM_UMASK`, so that SLURM's
    log files keep a group's access, see `executors.SlurmBackend.submit`): the command gets the
    submitter's own back (`TASK_UMASK` in `fixed_env`), lest it give the group what it writes
    outside a group's folder. It travels in `fixed_env`, not as an argument of its own, so that
    an image built before it was sent still runs (that image's `run_task` takes two)."""
    # submitit has SLURM send USR2 90 s before the time limit (--signal=USR2@90) and answers it,
    # for a function that cannot checkpoint, by failing the task at once: a cell that ran out of
    # time would end FAILED (90 s early, or at once under a short limit), never TIMEOUT. Ignore the
    # signal here and in the command (an ignored signal stays ignored across exec), so SLURM ends
    # the task at its limit and records TIMEOUT, which `resubmit --state TIMEOUT` relies on.
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    command = [sys.executable, "-m", "bakery_slurm", *args]
    env = {**os.environ, **fixed_env}
    umask = env.pop(TASK_UMASK, None)
    code = subprocess.run(command, env=env,
                          umask=-1 if umask is None else int(umask, 8)).returncode
    if code != 0:
        raise RuntimeError(f"bakery-slurm {args[0]} exited with status {code}: see this task's log")
