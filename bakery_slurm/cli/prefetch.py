"""`bakery-slurm prefetch`: download the Hub inputs of a matrix into its Hub cache, once."""

from __future__ import annotations

from pathlib import Path

import click

from .. import preflight
from ..errors import BakeryError, ConfigError
from ..executors import resolve_executor
from ..output import format_rows, output_options
from ..pins import hub_sources
from ..preflight import hub_cache_dir
from ..sources import hub_patterns, missing_files
from .common import selected_cells
from . import cli

COLUMNS = ["input", "commit", "files", "bytes"]


@cli.command()
@click.argument("matrix", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--only", metavar="GLOB", help="Only the inputs of cells matching GLOB.")
@output_options
def prefetch(matrix: Path, only: str | None, fmt: str) -> None:
    """Download every Hub base and adapter of MATRIX into the Hub cache its tasks read.

    Run it on the login node: the cache is the tasks' HF_HUB_CACHE or HF_HOME/hub ([runtime]
    env; in a container <work>/hf-home by default; else this environment's), so twelve tasks do
    not download the same bases through the proxy at once, and with [runtime] offline = true the
    tasks never touch the network. Only what a cell reads is fetched (safetensors weights,
    configs, tokenizer files; no .bin/.pth copies, optimizer states or checkpoint-* folders). A
    second run resumes or skips what is there. Prints each input's commit, files and bytes.

    \b
    Example:
        bakery-slurm prefetch matrix.toml
        bakery-slurm prefetch matrix.toml --only '4b-*'
    """
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    loaded, cells = selected_cells(matrix, only)
    cache = hub_cache_dir(loaded, loaded.spec.runtime.resolve(resolve_executor("auto")))
    api = preflight.hub_api()
    rows = []
    for key, source in hub_sources(cells).items():
        allow, ignore = hub_patterns(source.subfolder)
        click.echo(f"fetching {key} into {cache or 'the default Hub cache'}", err=True)
        try:
            snapshot = Path(api.snapshot_download(source.repo, revision=source.revision,
                                                  cache_dir=cache, allow_patterns=allow,
                                                  ignore_patterns=ignore))
        except (RepositoryNotFoundError, RevisionNotFoundError) as e:
            raise ConfigError(f"{loaded.path}: {key}: not on the Hub ({e})") from None
        except Exception as e:  # the network: httpx's errors, timeouts, a refused proxy
            raise BakeryError(f"cannot download {key} ({type(e).__name__}: {e}); run prefetch "
                              f"again to resume") from None
        folder = snapshot / (source.subfolder or "")
        missing = missing_files(folder) if folder.is_dir() else [str(folder)]
        if missing:
            raise BakeryError(f"{key}: the download lacks {', '.join(missing)} (in {folder})")
        files = [p for p in folder.rglob("*") if p.is_file()]
        rows.append({"input": key, "commit": snapshot.name, "files": len(files),
                     "bytes": sum(p.stat().st_size for p in files)})
    click.echo(format_rows(rows, COLUMNS, fmt))
    total = sum(r["bytes"] for r in rows)
    click.echo(f"prefetched {len(rows)} input(s), {total / 1e9:.2f} GB in "
               f"{cache or 'the default Hub cache'}", err=True)
