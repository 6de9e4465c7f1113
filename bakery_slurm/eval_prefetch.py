"""Download the datasets of `[eval]` tasks into the datasets cache the eval tasks read.

lm-eval downloads a task's dataset when it instantiates the task (`TaskManager.load`), so that is
how `prefetch` fetches it: in a child process (`python -m bakery_slurm.eval_prefetch`) whose
environment is the tasks' (`Matrix.task_env` over this one). A child, because `datasets` and
huggingface_hub read HF_HOME, HF_DATASETS_CACHE and HF_HUB_CACHE once, at import, and this
process may have imported them already with other values. Like `run-eval`, the child works in
the `include_path` folder, whose task YAMLs name their data files relatively.

What lands in the cache is the dataset as `datasets` prepared it (Arrow files under
HF_DATASETS_CACHE, or HF_HOME/datasets), which is what an offline `load_dataset` of a Hub
dataset falls back to (`HF_DATASETS_OFFLINE=1`, as `run-eval` sets for `[runtime] offline`).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .errors import BakeryError, ConfigError


CACHE_VARIABLES = ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_DATASETS_CACHE",
                   "XDG_CACHE_HOME")


def child_environment(environ: Mapping[str, str], task_env: Mapping[str, str],
                      container: str = "none") -> dict[str, str]:
    """The child's environment: this one with the tasks' fixed variables over it (their Hub and
    datasets caches), as a task's process would see them. A container task (--cleanenv) does not
    inherit this environment's cache variables, so neither does the child."""
    inherited = {name: value for name, value in environ.items()
                 if container != "apptainer" or name not in CACHE_VARIABLES}
    return {**inherited, **task_env}


def row(task: str, cache_files: Iterable[Path]) -> dict[str, Any]:
    """A prefetch row for an eval task: its dataset's cache files (each once) and their bytes. A
    dataset has no commit that lm-eval reports, so none is claimed."""
    files = sorted(set(cache_files))
    return {"input": f"eval:{task}", "commit": None, "files": len(files),
            "bytes": sum(f.stat().st_size for f in files)}


def prefetch_tasks(tasks: Sequence[str], include_path: str | None, env: Mapping[str, str],
                   matrix: Path) -> list[dict[str, Any]]:
    """Load every task in a child with environment `env`; one row per task.

    Raises
    ------
    ConfigError
        A task name lm-eval does not know (here, with `include_path`).
    BakeryError
        A dataset could not be loaded (the network, an offline cache without it), or the child
        died.
    """
    with tempfile.TemporaryDirectory(prefix="bakery-prefetch-") as tmp:
        out = Path(tmp) / "rows.json"
        request = json.dumps({"tasks": list(tasks), "include_path": include_path})
        done = subprocess.run([sys.executable, "-m", __name__, request, str(out)], env=dict(env),
                              stdin=subprocess.DEVNULL, check=False)
        try:
            answer = json.loads(out.read_text())
        except (OSError, ValueError):
            raise BakeryError(f"loading the eval tasks' datasets failed (exit {done.returncode}; "
                              f"lm-eval's messages are above)") from None
    if answer["unknown"]:
        where = f" (with eval.include_path {include_path})" if include_path else ""
        raise ConfigError(f"{matrix}: eval.tasks: not a task or group lm-eval knows{where} "
                          f"(got {', '.join(answer['unknown'])})")
    if answer["failed"]:
        raise BakeryError("cannot load the dataset of " + "; ".join(
            f"eval:{task} ({why})" for task, why in answer["failed"].items())
            + ": run prefetch again when the Hub is reachable")
    return answer["rows"]


def _load(tasks: Sequence[str], include_path: str | None) -> dict[str, Any]:
    """In the child: instantiate each task (which downloads its dataset) and report its cache
    files, the names lm-eval does not know, and the tasks whose dataset failed to load."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path)
    answer: dict[str, Any] = {"rows": [], "unknown": [t for t in tasks if t not in manager.all_tasks],
                              "failed": {}}
    with contextlib.chdir(include_path or Path.cwd()):
        for task in (t for t in tasks if t not in answer["unknown"]):
            try:
                loaded = manager.load([task])["tasks"].values()
            except Exception as e:  # datasets and the network raise anything
                answer["failed"][task] = f"{type(e).__name__}: {e}"
                continue
            files = [Path(entry["filename"]) for each in loaded
                     for split in (getattr(each, "dataset", None) or {}).values()
                     for entry in getattr(split, "cache_files", [])]
            answer["rows"].append(row(task, files))
    return answer


if __name__ == "__main__":
    os.dup2(2, 1)  # lm-eval's prints would go to prefetch's stdout, which is its table
    request = json.loads(sys.argv[1])
    Path(sys.argv[2]).write_text(json.dumps(_load(request["tasks"], request["include_path"])))
