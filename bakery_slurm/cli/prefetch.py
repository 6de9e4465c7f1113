"""`bakery-slurm prefetch`: download the Hub inputs of a matrix into its Hub cache, once."""

from __future__ import annotations

import fnmatch
import importlib.util
import os
from pathlib import Path

import click

from .. import fsutil, preflight
from ..errors import BakeryError, ConfigError
from ..eval_prefetch import child_environment, prefetch_tasks
from ..evaluation import EvalTarget, expand_eval, target_inputs
from ..executors import resolve_executor
from ..matrix import Matrix, ModelSource
from ..output import echo_rows, output_options
from ..pins import hub_sources
from ..preflight import datasets_cache_dir, hub_cache_dir
from ..sources import hub_patterns, missing_files, share_cache_entry
from .common import selected_cells
from . import cli

COLUMNS = ["input", "commit", "files", "bytes"]


@cli.command()
@click.argument("matrix", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--only", metavar="GLOB",
              help="Only the inputs of cells and baselines matching GLOB, and the datasets of "
                   "the eval tasks that run on them.")
@output_options
def prefetch(matrix: Path, only: str | None, fmt: str) -> None:
    """Download every Hub base and adapter of MATRIX, and the datasets of its [eval] tasks, into
    the caches its tasks read.

    Run it on the login node: the caches are the tasks' (HF_HUB_CACHE, HUGGINGFACE_HUB_CACHE or
    HF_HOME/hub, as huggingface_hub reads them) and
    HF_DATASETS_CACHE or HF_HOME/datasets ([runtime] env; in a container <work>/hf-home by
    default; else this environment's), so the tasks do not each download their base through
    the proxy at once, and with [runtime] offline = true the tasks never touch the network. Only
    what a cell reads is fetched (safetensors weights, configs, tokenizer files; no .bin/.pth
    copies, optimizer states or checkpoint-* folders), plus the Hub inputs of the baselines.
    Each eval task is loaded with lm-eval once, which downloads and prepares its dataset. A
    second run resumes or skips what is there. Prints each input's commit, files and bytes (an
    eval task as eval:<task>, with its dataset's cache files).

    \b
    Example:
        bakery-slurm prefetch matrix.toml
        bakery-slurm prefetch matrix.toml --only '4b-*'
    """
    loaded, cells = selected_cells(matrix, only, or_baselines=True)
    container = loaded.spec.runtime.resolve(resolve_executor("auto"))
    targets = [t for t in expand_eval(loaded, cells)
               if only is None or fnmatch.fnmatchcase(t.id, only)]
    if targets and importlib.util.find_spec("lm_eval") is None:
        # Before any download: the eval tasks' datasets would be missing offline.
        raise ConfigError(f"{loaded.path}: eval: lm-eval is not installed here, and prefetch "
                          f"loads the eval tasks with it: pip install 'bakery-slurm[eval]'")
    hub_cache = hub_cache_dir(loaded, container)
    rows = _prefetch_models({**hub_sources(cells), **_baseline_sources(targets)}, loaded,
                            hub_cache)
    if targets:
        cache = datasets_cache_dir(loaded, container)
        click.echo(f"loading eval tasks into {cache}", err=True)
        tasks = list(dict.fromkeys(task for t in targets for task in t.tasks))
        # Made here (HF_HOME too), not by `datasets`: as a group's folder above gives.
        fsutil.make_folder(cache)
        try:
            rows += prefetch_tasks(tasks, targets[0].include_path,
                                   child_environment(os.environ, loaded.task_env(container),
                                                     container),
                                   loaded.path, cache=cache,
                                   include_identity=targets[0].include_identity)
        finally:
            # What `datasets` prepared (and downloaded from the Hub), under this user's umask:
            # a group's caches must stay readable by the teammates' offline evals.
            for folder in (cache, hub_cache):
                if folder.is_dir():
                    fsutil.share_tree(folder)
    echo_rows(rows, COLUMNS, fmt)
    total = sum(r["bytes"] for r in rows)
    click.echo(f"prefetched {len(rows)} input(s), {total / 1e9:.2f} GB", err=True)


def _baseline_sources(targets: list[EvalTarget]) -> dict[str, ModelSource]:
    """The Hub inputs of the baselines (at a size and variant without cells, nothing else reads
    them), by key."""
    return {source.key: source for target in targets
            for source in target_inputs(target).values() if source.repo is not None}


def _prefetch_models(sources: dict[str, ModelSource], loaded: Matrix,
                     cache: Path) -> list[dict]:
    """Download each Hub source into `cache`; one row per source (commit, files, bytes)."""
    from huggingface_hub.errors import (GatedRepoError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    api = preflight.hub_api()
    if sources:
        fsutil.make_folder(cache)  # and HF_HOME: as a group's folder above gives
    rows = []
    for key, source in sources.items():
        allow, ignore = hub_patterns(source.subfolder)
        click.echo(f"fetching {key} into {cache}", err=True)
        try:
            snapshot = Path(api.snapshot_download(source.repo, revision=source.revision,
                                                  cache_dir=cache, allow_patterns=allow,
                                                  ignore_patterns=ignore))
        except GatedRepoError:
            # A RepositoryNotFoundError too, but the repo is there: its terms are not accepted.
            raise ConfigError(f"{loaded.path}: {key}: {source.repo} is gated and this token has "
                              f"no access (accept its terms on the Hub, then run prefetch "
                              f"again)") from None
        except (RepositoryNotFoundError, RevisionNotFoundError) as e:
            raise ConfigError(f"{loaded.path}: {key}: not on the Hub ({e})") from None
        except Exception as e:  # the network: httpx's errors, timeouts, a refused proxy
            raise BakeryError(f"cannot download {key} ({type(e).__name__}: {e}); run prefetch "
                              f"again to resume") from None
        share_cache_entry(snapshot)
        folder = snapshot / (source.subfolder or "")
        missing = missing_files(folder) if folder.is_dir() else [str(folder)]
        if missing:
            raise BakeryError(f"{key}: the download lacks {', '.join(missing)} (in {folder})")
        files = [p for p in folder.rglob("*") if p.is_file()]
        rows.append({"input": key, "commit": snapshot.name, "files": len(files),
                     "bytes": sum(p.stat().st_size for p in files)})
    return rows
