"""What one array task runs, as command lines and text (pure).

A task is `python -m bakery_slurm run-cell MATRIX CELL ...` (`cell_args`), or `run-eval MATRIX
TARGET ...` in an eval array (`eval_args`). Under SLURM with the
apptainer runtime the whole task runs inside the image: the sbatch script starts submitit's own
runner through `launcher_script`, a shell script that needs only `sh` and `apptainer` on the
compute node, and that runner calls `array_task.run_task`, importable in the image. Nothing of the
login node's Python (its path, its architecture, its version) reaches the node. The local executor
runs `task_argv` directly.

Secrets and proxies are never written into any of these: with `--cleanenv`, apptainer receives
them as APPTAINERENV_<NAME>, set from the task's own environment when it starts.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Mapping, Sequence

from .matrix import Runtime

# Always forwarded into the container when set: the Hub token (read by huggingface_hub there),
# the GPUs SLURM gave this task (`--cleanenv` drops CUDA_VISIBLE_DEVICES, and `--nv` alone exposes
# every GPU of the node), and the task's ids (per-task HF_XET_CACHE, logs).
FORWARDED = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID",
             "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID")
# The launcher forwards every variable with these prefixes too: submitit's runner reads the job,
# array, rank and node variables of SLURM and its own SUBMITIT_* to find its job and folder.
FORWARDED_PREFIXES = ("SLURM_", "SUBMITIT_")
LAUNCHER_NAME = "apptainer-launch.sh"


def cell_args(matrix_path: Path, cell_id: str, recipe_hash: str, work: Path,
              pins: Mapping[str, str]) -> list[str]:
    """Arguments of `python -m bakery_slurm` for one cell; `pins` maps an input (`base` or an
    adapter name) to the Hub commit this submission resolved it to."""
    return ["run-cell", str(matrix_path), cell_id, "--recipe-hash", recipe_hash, "--work", str(work),
            *_pin_args(pins)]


def eval_args(matrix_path: Path, target_id: str, work: Path,
              pins: Mapping[str, str], force: bool = False) -> list[str]:
    """Arguments of `python -m bakery_slurm` for one eval target (`run-eval`); `pins` as in
    `cell_args`, for a baseline's inputs."""
    return ["run-eval", str(matrix_path), target_id, "--work", str(work), *_pin_args(pins),
            *(["--force"] if force else [])]


def _pin_args(pins: Mapping[str, str]) -> list[str]:
    return [arg for name, commit in sorted(pins.items()) for arg in ("--pin", f"{name}={commit}")]


def apptainer_prefix(runtime: Runtime, env: Mapping[str, str], matrix_path: Path, work: Path,
                     gpus: int | None) -> list[str]:
    """`apptainer exec ... IMAGE PYTHON`: what starts the image's Python, with the fixed
    environment `env` (`Matrix.task_env`).

    `runtime` is `Matrix.runtime` (its paths expanded and absolute). The matrix and work folders
    are bound (they must be visible inside at the same paths), after the runtime's own binds;
    `--nv` only when the task has GPUs.
    """
    binds = list(dict.fromkeys([*runtime.binds, str(matrix_path.parent), str(work)]))
    # As APPTAINERENV_* variables, not `--env`: apptainer parses an --env value holding a '='
    # as CSV, so `NO_PROXY=a,b` with another '=' or a quote in it would be split or refused.
    # Set after the launcher's forwarded ones, they win over those, as --env would.
    # PYTHONSAFEPATH: `python -m` would put the job's working directory (the folder submit ran
    # in, often a bakery-slurm checkout) first on sys.path, over the image's own packages.
    env = {"PYTHONSAFEPATH": "1", **env}
    argv = ["env", *[f"APPTAINERENV_{name}={value}" for name, value in sorted(env.items())],
            "apptainer", "exec"]
    if gpus:
        argv.append("--nv")
    argv += ["--cleanenv", "--bind", ",".join(binds)]
    return [*argv, str(runtime.image), runtime.python]


def task_argv(prefix: Sequence[str] | None, fixed_env: Mapping[str, str], args: Sequence[str]) -> list[str]:
    """The whole command of one task: inside the image when `prefix` is given, else this Python
    with the runtime's fixed environment (HF_HOME on shared storage, ...)."""
    if prefix is not None:
        return [*prefix, "-m", "bakery_slurm", *args]
    env = [f"{name}={value}" for name, value in sorted(fixed_env.items())]
    return [*(["env", *env] if env else []), sys.executable, "-m", "bakery_slurm", *args]


def forwarded_names(pass_env: Sequence[str]) -> list[str]:
    return list(dict.fromkeys([*pass_env, *FORWARDED]))


def task_environment(environ: dict[str, str], pass_env: list[str], container: str) -> dict[str, str]:
    """The environment for a task's command: `environ`, plus the forwarded names for apptainer."""
    env = dict(environ)
    if container == "apptainer":
        for name in forwarded_names(pass_env):
            if name in environ:
                env[f"APPTAINERENV_{name}"] = environ[name]
    return env


def launcher_script(prefix: Sequence[str], pass_env: Sequence[str]) -> str:
    """A POSIX shell script that runs `PREFIX "$@"` (submitit passes `-u -m
    submitit.core._submit FOLDER`), forwarding the task's variables into the container.

    Names only: values are read from the task's environment when it runs. Every name was
    checked to be a shell identifier when the matrix was loaded. The node's `$TMPDIR`, when it is
    a folder apptainer can bind, is bound and set inside too (`prefix` ends with IMAGE PYTHON,
    and the bind goes before them).
    """
    names = " ".join(forwarded_names(pass_env))
    patterns = " ".join(f"-e 's/^\\({p}[A-Za-z0-9_]*\\)=.*/\\1/p'" for p in FORWARDED_PREFIXES)
    options, image_python = shlex.join(prefix[:-2]), shlex.join(prefix[-2:])
    return f"""#!/bin/sh
# Written by `bakery-slurm submit`. SLURM runs this on the compute node in place of a Python: it
# starts submitit's task runner inside the image. Under --cleanenv the container sees only
# APPTAINERENV_* variables, so the job's own (SLURM_*, SUBMITIT_*), the GPUs, the Hub
# token and the proxies are forwarded by name; no value is written here.
for name in $(env | sed -n {patterns}) {names}; do
    eval "isset=\\${{$name+x}}"
    if [ -n "$isset" ]; then eval "export APPTAINERENV_$name=\\"\\$$name\\""; fi
done
# The node's temporary folder (often local disk where /tmp is small or in memory): apptainer
# binds only /tmp, and --cleanenv drops TMPDIR. A ',' or ':' in it cannot be bound.
tmpdir_bind=
case ${{TMPDIR:-}} in
    ''|*,*|*:*) ;;
    *) if [ -d "$TMPDIR" ]; then
           tmpdir_bind="--bind=$TMPDIR"
           export APPTAINERENV_TMPDIR="$TMPDIR"
       fi ;;
esac
exec {options} ${{tmpdir_bind:+"$tmpdir_bind"}} {image_python} "$@"
"""
