"""The `bakery-slurm` command line: a Click group, one module per command.

Library code raises `BakeryError`s; this is the only place that turns them into messages and exit
codes: 0 success, 1 a cell or stage failed, 2 usage or config error, 3 scheduler unreachable.
Handlers for logging are configured here and nowhere else.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click

from .. import __version__, fsutil
from ..errors import BakeryError, ConfigError, LedgerError, LockError, SchedulerError

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
EXIT_FAILED, EXIT_CONFIG, EXIT_SCHEDULER = 1, 2, 3


class BakeryGroup(click.Group):
    """A group that turns library errors into `Error: ...` on stderr and the documented exit code."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (ConfigError, LedgerError, LockError) as e:
            _die(e, EXIT_CONFIG)
        except SchedulerError as e:
            _die(e, EXIT_SCHEDULER)
        except BakeryError as e:
            _die(e, EXIT_FAILED)
        except PermissionError as e:
            # A teammate's file or folder this user may not read or write (umask 077 or 027 on a
            # shared project folder): a message naming it, not a traceback, wherever it is met.
            if e.filename is None:
                raise
            _die(f"permission denied on {e.filename} ({e.strerror}): "
                 f"{fsutil.who_may_access(Path(os.fsdecode(e.filename)))}", EXIT_CONFIG)


def _die(error: Exception | str, code: int) -> None:
    click.echo(f"Error: {error}", err=True)
    sys.exit(code)


@click.group(cls=BakeryGroup, context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, prog_name="bakery-slurm")
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors on stderr.")
def cli(verbose: int, quiet: bool) -> None:
    """Bake LoRA adapters into Gemma 3 bases, merge them with mergekit and push one Hub
    subfolder per cell, as SLURM job arrays.

    \b
    Example:
        bakery-slurm plan matrix.toml
        bakery-slurm submit matrix.toml --dry-run
        bakery-slurm status
    """
    if not sys.stderr.isatty():
        # Progress bars (huggingface_hub, transformers) only for a person at a terminal.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    root = logging.getLogger("bakery_slurm")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def main() -> None:
    cli(prog_name="bakery-slurm")


# Each module registers its command on `cli` at import.
from . import (  # noqa: E402,F401
    cancel, card, check, demo, gc, logs, plan, prefetch, push, report, resubmit, run_cell, run_eval,
    status, submit,
)
