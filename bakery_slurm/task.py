"""What one array task executes on the compute node, before the container starts.

This module is pickled by value (cloudpickle.register_pickle_by_value), so the compute node's host
Python needs only submitit, not bakery-slurm, and the image's Python need not match the login
node's. Standard library only.

Secrets and proxies are read from the task's own environment when it runs (SLURM exports the
submitting shell's environment), never pickled: with `--cleanenv`, apptainer receives them as
APPTAINERENV_<NAME>, which keeps them out of every command line and log.
"""

from __future__ import annotations

import os
import signal
import subprocess

# Always forwarded into the container when set: the Hub token (read by huggingface_hub there),
# the GPUs SLURM gave this task (`--cleanenv` drops CUDA_VISIBLE_DEVICES, and `--nv` alone exposes
# every GPU of the node), and the task's ids (per-task HF_XET_CACHE, logs).
FORWARDED = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID",
             "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID")


def task_environment(environ: dict[str, str], pass_env: list[str], container: str) -> dict[str, str]:
    """The environment for the task's command: `environ`, plus the forwarded names for apptainer."""
    env = dict(environ)
    if container == "apptainer":
        for name in [*pass_env, *FORWARDED]:
            if name in environ:
                env[f"APPTAINERENV_{name}"] = environ[name]
    return env


def run_task(argv: list[str], pass_env: list[str], container: str) -> None:
    """Run the cell's command; a non-zero exit raises, so SLURM records the task as FAILED."""
    # submitit has SLURM send USR2 90 s before the time limit (--signal=USR2@90) and answers it,
    # for a function that cannot checkpoint, by failing the task at once: a cell that ran out of
    # time would end FAILED (90 s early, or at once under a short limit), never TIMEOUT. Ignore the
    # signal here and in the command (an ignored signal stays ignored across exec), so SLURM ends
    # the task at its limit and records TIMEOUT, which `resubmit --state TIMEOUT` relies on.
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    code = subprocess.run(argv, env=task_environment(dict(os.environ), pass_env, container)).returncode
    if code != 0:
        raise RuntimeError(f"{argv[0]} exited with status {code}: see this task's log")
