"""Checks before any sbatch, and the Hub commits a submission pins its inputs to.

A typo in an image path, an adapter subfolder or a repo id otherwise shows only when a task starts,
after its wait in the queue, once per cell. `preflight` finds every such problem at once, naming
the matrix key and value of each, and resolves each Hub input's revision to a commit on the way
(which is what proves it exists). `submit`, `resubmit` and `check` run it; `--no-preflight`
skips it on a login node that cannot reach the Hub, and pins are then read from the Hub cache
where it has them.

The judgement on a token (`token_write_problem`) is a pure function of `HfApi.whoami()`'s answer.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from .errors import ConfigError
from .eval_prefetch import CACHE_VARIABLES, child_environment, is_prefetched, reads_local_files
from .matrix import Cell, Matrix, ModelSource
from .mounts import NODE_LOCAL_LOCKS, node_local_lock_mount
from .pins import COMMIT, cell_inputs, hub_sources

if TYPE_CHECKING:
    from .evaluation import EvalTarget

log = logging.getLogger(__name__)

# The file that shows a folder is a model (base) or a LoRA adapter.
MARKER = {"base": "config.json", "adapter": "adapter_config.json"}


@dataclass
class Report:
    """What preflight found: problems (each naming a matrix key and value) and the pins."""

    problems: list[str] = field(default_factory=list)
    pins: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def hub_cache_dir(matrix: Matrix, container: str) -> Path:
    """The Hub cache the tasks use, as huggingface_hub finds it in their environment
    (`huggingface_hub.constants`): HF_HUB_CACHE, else the legacy HUGGINGFACE_HUB_CACHE, else
    HF_HOME/hub (`_hf_home`); `~` and `$NAME` expanded, as it does."""
    env = _tasks_environment(matrix, container)
    cache = env.get("HF_HUB_CACHE",
                    env.get("HUGGINGFACE_HUB_CACHE",
                            os.path.join(_expanded(_hf_home(env), env), "hub")))
    return Path(_expanded(cache, env))


def datasets_cache_dir(matrix: Matrix, container: str) -> Path:
    """The datasets cache the eval tasks use, as `datasets` finds it in their environment
    (`datasets.config`): HF_DATASETS_CACHE, else HF_HOME/datasets (`_hf_home`); `~` expanded (its
    builders expand it), `$NAME` not: unlike huggingface_hub, `datasets` never expands those."""
    env = _tasks_environment(matrix, container)
    return Path(os.path.expanduser(env.get("HF_DATASETS_CACHE",
                                           os.path.join(_hf_home(env), "datasets"))))


def _hf_home(env: Mapping[str, str]) -> str:
    """HF_HOME in `env`, unexpanded, defaulting as huggingface_hub and `datasets` both default it:
    XDG_CACHE_HOME/huggingface, XDG_CACHE_HOME itself defaulting to ~/.cache."""
    return env.get("HF_HOME", os.path.join(env.get("XDG_CACHE_HOME", os.path.join("~", ".cache")),
                                           "huggingface"))


def _expanded(value: str, env: Mapping[str, str]) -> str:
    """`value` with `~` (the tasks' home is this user's) and `$NAME`/`${NAME}` expanded as in a
    process with environment `env`, not this one (os.path.expandvars's); unknown names stay."""
    return re.sub(r"\$(\w+|\{([^}]*)\})",
                  lambda m: env.get(m.group(2) or m.group(1), m.group(0)),
                  os.path.expanduser(value))


def _tasks_environment(matrix: Matrix, container: str) -> dict[str, str]:
    """The caches' variables as a task sees them (`child_environment`): without a container this
    environment's under [runtime] env (an HF_HUB_CACHE set here beats the HF_HOME of [runtime]
    env); in one (--cleanenv), [runtime] env's only."""
    return child_environment(os.environ, matrix.task_env(container), container)


def cached_repo(source: ModelSource, cache_dir: Path) -> Path:
    """The source's repo folder in the Hub cache `cache_dir`."""
    return cache_dir / f"models--{source.repo.replace('/', '--')}"


def cached_commit(source: ModelSource, cache_dir: Path) -> str | None:
    """The commit the Hub cache holds for the source's revision (a ref written by a download, as
    `prefetch` does), or None."""
    revision = source.revision or "main"
    if COMMIT.match(revision):
        return revision
    try:
        commit = (cached_repo(source, cache_dir) / "refs" / revision).read_text().strip()
    except OSError:
        return None
    return commit if COMMIT.match(commit) else None


def preflight(matrix: Matrix, cells: Sequence[Cell], executor: str, *, container: str,
              known_pins: Mapping[str, str] | None = None, api: Any = None,
              environ: Mapping[str, str] | None = None,
              evals: Sequence[EvalTarget] = ()) -> Report:
    """Every problem the cells (and the eval targets `evals`) would meet before running, and
    their inputs' commits.

    Parameters
    ----------
    container
        The runtime the tasks use ("apptainer" or "none").
    known_pins
        Commits already chosen for some sources (a resubmit reuses its cells' pins): kept, not
        resolved again, but still checked.
    api
        An `HfApi` (default: a new one, with the environment's token).
    """
    environ = os.environ if environ is None else environ
    report = Report()
    _check_runtime(matrix, executor, container, environ, report)
    if executor == "slurm":
        _check_locks_across_nodes(matrix, report)
    _check_local_sources(matrix, cells, report)
    if matrix.spec.runtime.offline and evals:
        _check_eval_datasets(matrix, evals, container, report)
    if container == "apptainer":
        _check_visible_in_container(matrix, cells, report)
    sources = hub_sources(list(cells))
    needs_hub = bool(sources) or any(c.push.kind == "hub" for c in cells)
    if not needs_hub:
        return report
    api = api or hub_api()
    if matrix.spec.runtime.offline:
        _pin_from_cache(matrix, cells, container, known_pins or {}, report)
    else:
        _resolve_hub_sources(matrix, cells, api, known_pins or {}, report)
    if any(c.push.kind == "hub" for c in cells):
        _check_push(matrix, api, report)
    return report


def hub_api() -> Any:
    """The Hub client (the environment's token); the one seam tests replace with tests/fakes.py."""
    from huggingface_hub import HfApi

    return HfApi()


def gate(matrix: Matrix, cells: Sequence[Cell], executor: str, *, run_checks: bool,
         known_pins: Mapping[str, str] | None = None,
         evals: Sequence[EvalTarget] = ()) -> dict[str, str]:
    """What `submit` and `resubmit` do before any sbatch: preflight of the cells and the eval
    targets `evals` (unless `run_checks` is False), notes logged, problems raised as one
    ConfigError; returns the pins."""
    from .submission import resolve_container

    container = resolve_container(matrix, executor)  # no image at all is a config error first
    report = (preflight(matrix, cells, executor, container=container, known_pins=known_pins,
                        evals=evals)
              if run_checks else pins_without_hub(matrix, cells, container, known_pins))
    for note in report.notes:
        log.warning("%s", note)
    raise_problems(matrix, report)
    return report.pins


def pins_without_hub(matrix: Matrix, cells: Sequence[Cell], container: str,
                     known_pins: Mapping[str, str] | None = None) -> Report:
    """Pins for `--no-preflight`: known ones, else what the Hub cache holds; sources in neither
    are left to each task (noted)."""
    report = Report()
    _pin_from_cache(matrix, cells, container, known_pins or {}, report,
                    required=matrix.spec.runtime.offline)
    return report


def raise_problems(matrix: Matrix, report: Report) -> None:
    if report.problems:
        raise ConfigError(f"preflight found {len(report.problems)} problem(s) in {matrix.path} "
                          f"(nothing was submitted; --no-preflight skips these checks):\n"
                          + "\n".join(f"  {p}" for p in report.problems))


# ---------------------------------------------------------------------------------------------


def _kind(name: str) -> str:
    """The matrix table an input comes from: [base] or [adapter]."""
    return "base" if name == "base" else "adapter"


def _where(cells: Sequence[Cell], source: ModelSource) -> tuple[str, str]:
    """The matrix table a source came from and the input name of one cell reading it."""
    for cell in cells:
        for name, s in cell_inputs(cell).items():
            if s.key == source.key:
                return _kind(name), name
    raise KeyError(source.key)


def _check_runtime(matrix: Matrix, executor: str, container: str, environ: Mapping[str, str],
                   report: Report) -> None:
    runtime = matrix.runtime
    for bind, written in zip(runtime.binds, matrix.spec.runtime.binds):
        source = bind.partition(":")[0]
        if not Path(source).exists():
            report.problems.append(f"runtime.binds: {source} does not exist, and apptainer "
                                   f"refuses to start with it (got {written!r})")
    if container == "apptainer":
        image = Path(runtime.image)
        if not image.is_file():
            report.problems.append(f"runtime.image: no such image file: {image} "
                                   f"(got {matrix.spec.runtime.image!r})")
        elif not os.access(image, os.R_OK):
            report.problems.append(f"runtime.image: the image is not readable by this user: "
                                   f"{image}")
        if shutil.which("apptainer", path=environ.get("PATH")) is None:
            if executor == "local":
                report.problems.append("runtime.container: 'apptainer' is not on PATH here, and "
                                       "the local executor runs the tasks here "
                                       f"(got {runtime.container!r})")
            else:
                report.notes.append("apptainer is not on this node's PATH; the compute nodes "
                                    "must have it")
    for name in runtime.require_env:
        if not environ.get(name):
            report.problems.append(f"runtime.require_env: {name} is not set in this environment, "
                                   f"and the tasks need it (got {list(runtime.require_env)!r})")


def _check_locks_across_nodes(matrix: Matrix, report: Report) -> None:
    """Tasks on several nodes keep apart through locks in the work folder: refuse one whose
    mount grants locks per node (Lustre `localflock`), where they would not."""
    mount = node_local_lock_mount(matrix.work_dir)
    if mount is not None:
        report.problems.append(
            f"paths.work: {matrix.work_dir} is on {mount.point}, a {mount.fstype} mount with "
            f"`{NODE_LOCAL_LOCKS}`, whose locks hold on one node only: tasks on two nodes could "
            "run one cell or fill one cache entry at once. Put the work folder on a mount with "
            "`flock` (or NFS), or submit with --executor local on one node "
            f"(got {matrix.spec.paths.work!r})")


def _check_eval_datasets(matrix: Matrix, evals: Sequence[EvalTarget], container: str,
                         report: Report) -> None:
    """Offline, an eval task reads its dataset from the datasets cache only, and one that is not
    there fails the task after its wait in the queue: each task's must have been prefetched into
    the cache the tasks read, unless its data are local files (no download needed)."""
    cache = datasets_cache_dir(matrix, container)
    # Every target reads the same include_path.
    include_path, include_identity = evals[0].include_path, evals[0].include_identity
    for task in dict.fromkeys(task for target in evals for task in target.tasks):
        if not (is_prefetched(cache, task, include_identity)
                or reads_local_files(task, include_path)):
            report.problems.append(f"eval.tasks: the dataset of eval task {task!r} is not in the "
                                   f"datasets cache {cache} and runtime.offline is true: run "
                                   f"`bakery-slurm prefetch {matrix.path}` first")


def _check_local_sources(matrix: Matrix, cells: Sequence[Cell], report: Report) -> None:
    seen = set()
    for cell in cells:
        for name, source in cell_inputs(cell).items():
            if source.path is None or source.key in seen:
                continue
            seen.add(source.key)
            kind = _kind(name)
            folder = Path(source.path) / (source.subfolder or "")
            if not (folder / MARKER[kind]).is_file():
                what = "no such folder" if not folder.is_dir() else f"no {MARKER[kind]} in it"
                report.problems.append(f"{kind}.path: {what}: {folder} (input {name!r} of "
                                       f"{cell.id})")


# Folders apptainer binds by default (a site may add more in apptainer.conf; name those in
# [runtime] binds too).
DEFAULT_BINDS = ("~", "/tmp", "/var/tmp")


def _check_visible_in_container(matrix: Matrix, cells: Sequence[Cell], report: Report) -> None:
    """A task sees only the bound folders: every folder it reads or writes outside the image
    (local inputs, the Hub and datasets caches of [runtime] env, eval tasks) must be under one."""
    # Every path is read at the path the matrix names (a local input's resolved), and a bind
    # SRC:DST shows SRC only at DST. The container finds a path from its mount points, at the
    # paths written, so the path itself must be under one; its symlinks are then followed there,
    # so where they lead must be bound too.
    roots = []
    for bind in [*matrix.runtime.binds, *DEFAULT_BINDS]:
        source, _, rest = bind.partition(":")
        if rest.partition(":")[0] in ("", source):
            roots.append(Path(source).expanduser())
    roots += [matrix.root, matrix.work_dir]
    written = [Path(os.path.normpath(root.absolute())) for root in roots]
    resolved = [root.resolve() for root in roots]
    needed = [(f"runtime.env.{name}", value) for name, value in matrix.task_env("apptainer").items()
              if name in CACHE_VARIABLES]
    if matrix.spec.eval is not None and matrix.spec.eval.include_path:
        needed.append(("eval.include_path", str(matrix.root / matrix.spec.eval.include_path)))
    needed += [(f"{_kind(name)}.path", str(Path(source.path) / (source.subfolder or "")))
               for cell in cells for name, source in cell_inputs(cell).items()
               if source.path is not None]
    for key, value in dict.fromkeys(needed):
        path = Path(value).expanduser()
        if not (_under(Path(os.path.normpath(path.absolute())), written)
                and _under(path.resolve(), resolved)):
            report.problems.append(
                f"{key}: {value} is under none of the folders a task's container sees (the matrix "
                f"and work folders, [runtime] binds, ~ and /tmp): add a folder above it to "
                f"runtime.binds")


def _under(path: Path, roots: Sequence[Path]) -> bool:
    return any(path.is_relative_to(root) for root in roots)


def _resolve_hub_sources(matrix: Matrix, cells: Sequence[Cell], api: Any,
                         known: Mapping[str, str], report: Report) -> None:
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    files: dict[tuple[str, str], set[str]] = {}
    readable: set[str] = set()
    for key, source in hub_sources(list(cells)).items():
        kind, name = _where(cells, source)
        try:
            if source.repo not in readable:
                # The Hub answers repo_info and the file listing of a gated repo to anyone;
                # only the downloads (and auth-check) refuse a token without access.
                api.auth_check(source.repo)
                readable.add(source.repo)
            commit = known.get(key) or api.repo_info(source.repo, revision=source.revision).sha
            if (source.repo, commit) not in files:
                files[(source.repo, commit)] = set(api.list_repo_files(source.repo, revision=commit))
        except RevisionNotFoundError:
            report.problems.append(f"{kind}.revision: {source.repo} has no revision "
                                   f"{known.get(key) or source.revision or 'main'!r} "
                                   f"(input {name!r})")
            continue
        except GatedRepoError:
            report.problems.append(f"{kind}.repo: {source.repo} is gated and this token has no "
                                   f"access (input {name!r}; accept its terms on the Hub)")
            continue
        except RepositoryNotFoundError:
            report.problems.append(f"{kind}.repo: no such repo on the Hub, or it is private and "
                                   f"this token cannot read it ({source.repo!r}, input {name!r})")
            continue
        except HfHubHTTPError as e:
            report.problems.append(f"{kind}.repo: the Hub refused {source.repo!r} ({e})")
            continue
        except Exception as e:  # connection refused, proxy, DNS, timeout: httpx's own errors
            report.problems.append(f"{kind}.repo: cannot reach the Hub for {source.repo!r} "
                                   f"({type(e).__name__}: {e}); on a login node without Hub "
                                   f"access use --no-preflight")
            continue
        marker = f"{source.subfolder}/{MARKER[kind]}" if source.subfolder else MARKER[kind]
        if marker not in files[(source.repo, commit)]:
            where = (f"{kind}.subfolder: no {MARKER[kind]} under {source.subfolder!r}"
                     if source.subfolder else f"{kind}.repo: no {MARKER[kind]} at the root")
            report.problems.append(f"{where} in {source.repo}@{commit[:12]} (input {name!r})")
            continue
        report.pins[key] = commit


def _pin_from_cache(matrix: Matrix, cells: Sequence[Cell], container: str,
                    known: Mapping[str, str], report: Report, required: bool = True) -> None:
    from .sources import missing_files

    cache = hub_cache_dir(matrix, container)
    for key, source in hub_sources(list(cells)).items():
        commit = known.get(key) or cached_commit(source, cache)
        missing = None if commit or not required else f"{source.key} is not in the Hub cache {cache}"
        if commit and required:
            # A ref (or a commit revision) is not the input: prefetch writes refs/<revision>
            # before any file, and may have fetched other subfolders of the repo only.
            folder = cached_repo(source, cache) / "snapshots" / commit / (source.subfolder or "")
            lacking = missing_files(folder) if folder.is_dir() else [str(folder)]
            if lacking:
                missing = (f"{source.key} at {commit[:12]} is not in the Hub cache {cache} "
                           f"(lacks {', '.join(lacking)})")
        if missing:
            kind, name = _where(cells, source)
            report.problems.append(f"{kind}.repo: {missing} and runtime.offline is true: run "
                                   f"`bakery-slurm prefetch {matrix.path}` first (input {name!r})")
        elif commit:
            report.pins[key] = commit
        else:
            report.notes.append(f"{source.key} is not pinned (no Hub access here, not in the "
                                f"cache): each task resolves it when it starts")


def _check_push(matrix: Matrix, api: Any, report: Report) -> None:
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    from .stages.push import public_repo_problem

    repo_id = matrix.push_target.location
    try:
        identity = api.whoami()
    except HfHubHTTPError as e:
        report.problems.append(f"push.target: the Hub token was refused ({e}); set HF_TOKEN or "
                               f"run `hf auth login` (got {matrix.spec.push.target!r})")
        return
    except Exception as e:
        report.problems.append(f"push.target: cannot reach the Hub to check the token "
                               f"({type(e).__name__}: {e}); --no-preflight skips this")
        return
    problem = token_write_problem(identity, repo_id)
    if problem:
        report.problems.append(f"push.target: {problem} (got {matrix.spec.push.target!r})")
    if matrix.spec.push.private:
        try:
            public = api.repo_info(repo_id).private is False
        except RepositoryNotFoundError:
            public = False  # created private by the first push
        except Exception as e:
            report.problems.append(f"push.private: cannot read {repo_id}'s visibility "
                                   f"({type(e).__name__}: {e}); --no-preflight skips this")
            return
        if public:
            report.problems.append(f"push.private: {public_repo_problem(repo_id)} "
                                   f"(got {matrix.spec.push.target!r})")


def token_write_problem(identity: Mapping[str, Any], repo_id: str) -> str | None:
    """Why the token `whoami` describes may not write (or create) `repo_id`, or None.

    Classic tokens are "read" or "write" for everything their user may touch: the user's own
    namespace and the organisations it belongs to. Fine-grained tokens list permissions per
    entity: `repo.write` on the repo itself, or on its owner (user or organisation).
    """
    namespace = repo_id.split("/")[0]
    user = identity.get("name")
    token = (identity.get("auth") or {}).get("accessToken") or {}
    role = token.get("role")
    orgs = {org.get("name") for org in identity.get("orgs") or []}
    if role == "read":
        return f"the Hub token of {user} is read-only; {repo_id} needs a write token"
    if role == "fineGrained":
        scoped = (token.get("fineGrained") or {}).get("scoped") or []
        for entry in scoped:
            entity = entry.get("entity") or {}
            if (entity.get("name") in (repo_id, namespace)
                    and "repo.write" in (entry.get("permissions") or [])):
                return None
        return (f"the fine-grained Hub token of {user} has no repo.write on {repo_id} or on "
                f"{namespace}")
    if namespace != user and namespace not in orgs:
        return (f"the Hub token belongs to {user}, who is not a member of {namespace!r}, so it "
                f"cannot write or create {repo_id}")
    return None
