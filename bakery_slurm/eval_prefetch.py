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
Beside it prefetch records each task it loaded (`marker_path`), so that an offline `submit` can
tell before any sbatch, without lm-eval, whether a task's dataset is there (`is_prefetched`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence
from urllib.parse import quote

import yaml

from . import fsutil
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


# The folder of the datasets cache where prefetch records the tasks it loaded into that cache.
MARKERS = "bakery-slurm-prefetched"


def marker_path(cache: Path, task: str, include_identity: str | None) -> Path:
    """Where prefetch records that it loaded `task` into the datasets cache `cache`. The task is
    identified as the eval settings identify it: its name and the `include_path` as the matrix
    writes it (another folder's task of that name may read another dataset)."""
    identity = json.dumps({"task": task, "include_path": include_identity}, sort_keys=True)
    digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
    return cache / MARKERS / f"{quote(task, safe='')}-{digest}.json"


def record_prefetched(cache: Path, task: str, include_identity: str | None,
                      files: Sequence[str]) -> None:
    """Record in `cache` that prefetch loaded `task`, which prepared its dataset as `files`
    (absolute) there."""
    fsutil.atomic_write_json(marker_path(cache, task, include_identity),
                             {"task": task, "include_path": include_identity, "files": list(files)})


def is_prefetched(cache: Path, task: str, include_identity: str | None) -> bool:
    """Did prefetch load `task` into `cache`, and are the files it prepared there all still
    there (work areas are purged by age)?"""
    try:
        files = json.loads(marker_path(cache, task, include_identity).read_text())["files"]
    except (OSError, ValueError):
        return False
    return all(Path(name).is_file() for name in files)


# The `datasets` builders that read the data files they are given and nothing else.
FILE_BUILDERS = ("json", "csv", "parquet", "text", "arrow")


def reads_local_files(task: str, include_path: str | None) -> bool:
    """Is `task` defined in a YAML of `include_path` that loads local data files only (a file
    builder as `dataset_path`, `dataset_kwargs.data_files` without URLs, no code that loads it
    instead)? Such a task needs no download, so no prefetch. Read with pyyaml alone (lm-eval's
    task index imports `datasets` and all of lm-eval's tasks); what it cannot tell is not local."""
    if include_path is None:
        return False
    for path in sorted(Path(include_path).glob("**/*.yaml")):
        try:
            config = _task_config(path)
        except (OSError, yaml.YAMLError, RecursionError, TypeError, ValueError):
            continue  # lm-eval skips a YAML it cannot read too
        if config.get("task") == task:
            files = (config.get("dataset_kwargs") or {}).get("data_files")
            return (config.get("dataset_path") in FILE_BUILDERS
                    and not {"class", "custom_dataset"} & config.keys()
                    and bool(files) and all("://" not in name for name in _names(files)))
    return False


class _TagsKept(yaml.SafeLoader):
    """Reads lm-eval's `!function` tags (and any other) as their text: nothing is imported."""


_TagsKept.add_multi_constructor("!", lambda loader, tag, node: str(node.value))


def _task_config(path: Path) -> dict[str, Any]:
    """A task YAML as lm-eval merges it: each `include` first, the file's own keys over them."""
    config = yaml.load(path.read_text(), Loader=_TagsKept)
    if not isinstance(config, dict):
        raise ValueError(f"{path} is not a mapping")
    includes = config.pop("include", [])
    merged: dict[str, Any] = {}
    for name in includes if isinstance(includes, list) else [includes]:
        merged.update(_task_config(path.parent / name))
    return {**merged, **config}


def _names(data_files: Any) -> list[str]:
    """Every file named in `data_files` (a name, a list, or a list per split)."""
    if isinstance(data_files, dict):
        return [name for value in data_files.values() for name in _names(value)]
    return [str(name) for name in data_files] if isinstance(data_files, list) else [str(data_files)]


def prefetch_tasks(tasks: Sequence[str], include_path: str | None, env: Mapping[str, str],
                   matrix: Path, *, cache: Path,
                   include_identity: str | None) -> list[dict[str, Any]]:
    """Load every task in a child with environment `env`, whose datasets cache is `cache`; one
    row per task, and a marker (`marker_path`) for each task loaded.

    Raises
    ------
    ConfigError
        A task name lm-eval does not know (here, with `include_path`).
    BakeryError
        A dataset could not be loaded (the network, an offline cache without it), or the child
        died.
    """
    with tempfile.TemporaryDirectory(prefix="bakery-prefetch-") as tmp:
        out = Path(tmp) / "loaded.json"
        request = json.dumps({"tasks": list(tasks), "include_path": include_path})
        done = subprocess.run([sys.executable, "-m", __name__, request, str(out)], env=dict(env),
                              stdin=subprocess.DEVNULL, check=False)
        try:
            answer = json.loads(out.read_text())
        except (OSError, ValueError):
            raise BakeryError(f"loading the eval tasks' datasets failed (exit {done.returncode}; "
                              f"lm-eval's messages are above)") from None
    for task, files in answer["files"].items():
        record_prefetched(cache, task, include_identity, files)
    if answer["unknown"]:
        where = f" (with eval.include_path {include_path})" if include_path else ""
        raise ConfigError(f"{matrix}: eval.tasks: not a task or group lm-eval knows{where} "
                          f"(got {', '.join(answer['unknown'])})")
    if answer["failed"]:
        raise BakeryError("cannot load the dataset of " + "; ".join(
            f"eval:{task} ({why})" for task, why in answer["failed"].items())
            + ": run prefetch again when the Hub is reachable")
    return [row(task, map(Path, files)) for task, files in answer["files"].items()]


def _load(tasks: Sequence[str], include_path: str | None) -> dict[str, Any]:
    """In the child: instantiate each task (which downloads its dataset) and report its cache
    files, the names lm-eval does not know, and the tasks whose dataset failed to load."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path)
    answer: dict[str, Any] = {"files": {}, "failed": {},
                              "unknown": [t for t in tasks if t not in manager.all_tasks]}
    with contextlib.chdir(include_path or Path.cwd()):
        for task in (t for t in tasks if t not in answer["unknown"]):
            try:
                loaded = manager.load([task])["tasks"].values()
            except Exception as e:  # datasets and the network raise anything
                answer["failed"][task] = f"{type(e).__name__}: {e}"
                continue
            # Absolute: a relative datasets cache is relative to this folder, not the parent's.
            answer["files"][task] = sorted({
                os.path.abspath(entry["filename"]) for each in loaded
                for split in (getattr(each, "dataset", None) or {}).values()
                for entry in getattr(split, "cache_files", [])})
    return answer


if __name__ == "__main__":
    os.dup2(2, 1)  # lm-eval's prints would go to prefetch's stdout, which is its table
    request = json.loads(sys.argv[1])
    Path(sys.argv[2]).write_text(json.dumps(_load(request["tasks"], request["include_path"])))
