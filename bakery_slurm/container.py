"""The command line one array task runs (pure): `bakery-slurm run-cell` inside apptainer or not."""

from __future__ import annotations

import sys
from pathlib import Path

from .matrix import Runtime


def task_argv(runtime: Runtime, container: str, matrix_path: Path, recipe_hash: str,
              cell_id: str, work: Path, gpus: int | None) -> list[str]:
    """argv for one cell.

    Parameters
    ----------
    container:
        "apptainer" or "none" (already resolved from the runtime and the executor).
    gpus:
        GPUs per node; apptainer gets `--nv` only when the task has GPUs.
    """
    run_cell = ["-m", "bakery_slurm", "run-cell", str(matrix_path), cell_id,
                "--recipe-hash", recipe_hash, "--work", str(work)]
    fixed_env = [f"{name}={value}" for name, value in sorted(runtime.env.items())]
    if container == "none":
        # The same fixed environment (HF_HOME on shared storage, ...) without a container.
        return [*(["env", *fixed_env] if fixed_env else []), sys.executable, *run_cell]
    # The matrix and work folders must be visible inside the container at the same paths.
    binds = list(dict.fromkeys([*runtime.binds, str(matrix_path.parent), str(work)]))
    argv = ["apptainer", "exec"]
    if gpus:
        argv.append("--nv")
    argv += ["--cleanenv", "--bind", ",".join(binds)]
    argv += [f"--env={assignment}" for assignment in fixed_env]
    return [*argv, str(runtime.image), runtime.python, *run_cell]
