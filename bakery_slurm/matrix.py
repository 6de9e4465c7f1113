"""matrix.toml -> validated `Matrix` -> frozen `Cell`s.

`load_matrix(path)` reads and validates the file; `expand(matrix)` is a pure function from the
validated matrix to the list of cells, each with its stable id `<size>-<variant>/<a1>-<a2>__<method>`
(the Hub subfolder), plus `-<param><value>` for every swept recipe parameter. Every error names the
file, the key and the offending value, and nothing here writes anything.

This module must stay importable without torch: `plan` and `status` use it.
"""

from __future__ import annotations

import fnmatch
import hashlib
import itertools
import json
import math
import re
import string
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from . import methods
from .errors import ConfigError

# A path segment we are willing to put in a Hub subfolder, a directory name and a job name:
# no separators, no shell metacharacters, no leading dot (so no `..` or hidden names).
SAFE_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
# The Hub's rule: owner/name of letters, digits, '_', '.', '-', without '--' or '..'.
REPO_ID = re.compile(r"^(?!.*(--|\.\.))[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
TIME_LIMIT = re.compile(r"^(?:(\d+)-)?(\d{1,2}):(\d{2}):(\d{2})$")
MEMORY = re.compile(r"^\d+[KMGT]?$")
EXCLUDE_KEYS = ("size", "variant", "method", "id")
# Environment variables that carry credentials never belong in a matrix file.
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
SECRET_ENV = re.compile(r"(TOKEN|SECRET|PASSWORD|KEY)", re.IGNORECASE)


def is_safe_segment(value: str) -> bool:
    return bool(SAFE_SEGMENT.match(value)) and ".." not in value


def is_safe_subpath(value: str) -> bool:
    """A relative path made only of safe segments (used for subfolders)."""
    return all(is_safe_segment(part) for part in value.split("/"))


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class SourceSpec(_Model):
    """Where a model comes from: a Hub repo id (optional subfolder, pinned revision) or a local path.

    Every string may use `{size}`, `{variant}`, `{adapter}` and the `vars` of the size and variant.
    """

    repo: str | None = None
    path: str | None = None
    subfolder: str | None = None
    revision: str | None = None

    @model_validator(mode="after")
    def _one_location(self) -> "SourceSpec":
        if (self.repo is None) == (self.path is None):
            raise ValueError("give exactly one of 'repo' (a Hub repo id) or 'path' (a local folder)")
        return self


@dataclass(frozen=True)
class ModelSource:
    """A resolved model location. `repo` and `path` are exclusive; `path` is absolute.

    `commit` is the Hub commit a submission pinned `revision` to (`pins.apply_pins`); it is not
    part of the recipe, which names sources, not their content.
    """

    repo: str | None
    path: str | None
    subfolder: str | None
    revision: str | None
    commit: str | None = None

    @property
    def key(self) -> str:
        """The source as the matrix names it (without its pin): what pins are keyed by."""
        where = f"hub:{self.repo}" if self.repo else self.path
        if self.subfolder:
            where += f"/{self.subfolder}"
        if self.revision:
            where += f"@{self.revision}"
        return where

    def describe(self) -> str:
        return self.key + (f" (commit {self.commit[:12]})" if self.commit else "")

    def as_dict(self) -> dict[str, str | None]:
        return {"repo": self.repo, "path": self.path, "subfolder": self.subfolder,
                "revision": self.revision}


class Resources(_Model):
    """What one array task asks SLURM for. Unset fields are left to the cluster's defaults."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    gpus_per_node: int | None = Field(default=None, ge=0)
    cpus_per_task: int | None = Field(default=None, ge=1)
    mem: str | None = None
    time: str = "01:00:00"

    @field_validator("partition", "account", "qos", "constraint")
    @classmethod
    def _one_word(cls, v: str | None) -> str | None:
        if v is not None and (not v or any(c.isspace() or not c.isprintable() for c in v)):
            raise ValueError("must be a non-empty SLURM name without spaces or control characters")
        return v

    @field_validator("mem")
    @classmethod
    def _mem(cls, v: str | None) -> str | None:
        if v is not None and not MEMORY.match(v):
            raise ValueError("memory must look like 110G or 4000M")
        return v

    @field_validator("time")
    @classmethod
    def _time(cls, v: str) -> str:
        if not TIME_LIMIT.match(v):
            raise ValueError("time must be HH:MM:SS or D-HH:MM:SS")
        if not any(int(x or 0) for x in TIME_LIMIT.match(v).groups()):
            raise ValueError("time must be longer than 0 (SLURM reads 0 as no limit at all)")
        return v

    @property
    def time_min(self) -> int:
        days, hours, minutes, seconds = (int(x or 0) for x in TIME_LIMIT.match(self.time).groups())
        return max(1, days * 1440 + hours * 60 + minutes + math.ceil(seconds / 60))


class Runtime(_Model):
    """How an array task starts the pipeline: inside an apptainer image, or directly (`none`)."""

    # auto: apptainer when the task runs under SLURM, none with the local executor.
    container: Literal["auto", "apptainer", "none"] = "auto"
    image: str | None = None
    binds: list[str] = []
    # Fixed environment for every task (HF_HOME on shared storage, ...). Never a token.
    env: dict[str, str] = {}
    # Variables copied from the submitting environment when set (Olivia's proxies).
    pass_env: list[str] = ["http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY",
                           "NO_PROXY"]
    # Names from pass_env that must be set when submitting (e.g. the proxy of a site whose
    # compute nodes reach the Hub only through it): checked before any sbatch.
    require_env: list[str] = []
    # The image's Python: it runs submitit's task runner and `-m bakery_slurm run-cell`.
    python: str = "python3"
    # Tasks read their inputs with the Hub offline (HF_HUB_OFFLINE=1), from what
    # `bakery-slurm prefetch` put in HF_HOME; an input not there fails the task at once.
    offline: bool = False

    @field_validator("env")
    @classmethod
    def _no_secrets(cls, v: dict[str, str]) -> dict[str, str]:
        for name in v:
            if not ENV_NAME.match(name):
                raise ValueError(f"{name!r} is not an environment variable name")
            if SECRET_ENV.search(name):
                raise ValueError(f"{name!r} looks like a credential; tokens come from the "
                                 "environment or the Hub token file, never from the matrix")
        return v

    @field_validator("binds")
    @classmethod
    def _binds(cls, v: list[str]) -> list[str]:
        for bind in v:
            if "," in bind or not bind.partition(":")[0]:
                raise ValueError(f"{bind!r} is not one bind SRC[:DST[:OPTS]]: apptainer reads a "
                                 "',' as the start of another bind (one list item per folder)")
        return v

    @field_validator("python")
    @classmethod
    def _python(cls, v: str) -> str:
        # An empty command would surface only in the task, as an obscure failure to start.
        if not v.strip():
            raise ValueError("must name the image's Python: a command on its PATH or a path")
        return v

    @field_validator("pass_env", "require_env")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        bad = [name for name in v if not ENV_NAME.match(name)]
        if bad:
            raise ValueError(f"not environment variable names: {bad}")
        return v

    @model_validator(mode="after")
    def _required_are_passed(self) -> "Runtime":
        missing = [name for name in self.require_env if name not in self.pass_env]
        if missing:
            raise ValueError(f"require_env names {missing} that pass_env does not forward")
        return self

    def resolve(self, executor: str) -> Literal["apptainer", "none"]:
        """The container runtime for tasks run by `executor` ("slurm" or "local")."""
        if self.container != "auto":
            return self.container
        return "apptainer" if executor == "slurm" else "none"


class SizeSpec(_Model):
    methods: list[str] | None = None
    variants: list[str] | None = None
    resources: dict[str, Any] = {}
    vars: dict[str, str] = {}


class VariantSpec(_Model):
    vars: dict[str, str] = {}


class PushSpec(_Model):
    target: str
    private: bool = False
    defer: bool = False  # tasks stop after verify; `bakery-slurm push` publishes (login node)


class PathsSpec(_Model):
    work: str = "bakery-work"


class MergeSpec(_Model):
    """How a cell is merged. Both engines give the same bytes; neither is part of the recipe hash.

    `bakery` (the default) computes each baked tensor from the base and the LoRA factors and feeds
    it to mergekit's merge method, one pass, in parallel over tensors; adapters it cannot compute
    exactly fall back to `mergekit`: PEFT bakes each adapter into a full checkpoint, then mergekit's
    run_merge merges those. `keep_bakes` also writes the baked checkpoints under the bakery engine.
    """

    engine: Literal["bakery", "mergekit"] = "bakery"
    keep_bakes: bool = False
# lm-eval's batch size: a number, "auto", or "auto:N" (re-detect N times).
BATCH_SIZE = re.compile(r"^auto(:\d+)?$")


class EvalBaseline(_Model):
    """An eval-only cell: the base alone, or the base with an adapter attached unmerged (PEFT).

    It is evaluated at every (size, variant) of the matrix, or at those `sizes`/`variants` name;
    its id is `<size>-<variant>/<name>`.
    """

    name: str
    # lm-eval attaches one PEFT adapter (`peft=`): at most one name, from `adapters`.
    adapters: list[str] = Field(default=[], max_length=1)
    sizes: list[str] | None = None
    variants: list[str] | None = None


class EvalSpec(_Model):
    """[eval]: what lm-evaluation-harness scores on every cell and baseline."""

    tasks: list[str] = Field(min_length=1)
    # A folder of task YAMLs (relative to the matrix); relative data files in them are read
    # from that folder.
    include_path: str | None = None
    num_fewshot: int | dict[str, int] | None = None
    # lm-eval's limit: a number of documents per task, or a fraction of each below 1.
    limit: int | float | None = None
    batch_size: int | str = 1
    # {task: [cell or baseline id globs]}: a task runs only on the targets it names.
    only: dict[str, list[str]] = {}
    baselines: list[EvalBaseline] = []
    # Overrides of [resources] (and the size's) for eval tasks: a GPU, their own time limit.
    resources: dict[str, Any] = {}

    @field_validator("num_fewshot")
    @classmethod
    def _fewshot(cls, v: int | dict[str, int] | None) -> int | dict[str, int] | None:
        values = v.values() if isinstance(v, dict) else [] if v is None else [v]
        if any(n < 0 for n in values):
            raise ValueError("num_fewshot must be 0 or more")
        return v

    @field_validator("limit")
    @classmethod
    def _limit(cls, v: int | float | None) -> int | float | None:
        if v is not None and not (isinstance(v, int) and v >= 1 or isinstance(v, float) and 0 < v < 1):
            raise ValueError("limit must be a number of documents (1 or more) or a fraction "
                             "between 0 and 1")
        return v

    @field_validator("batch_size")
    @classmethod
    def _batch_size(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1 or isinstance(v, str) and not BATCH_SIZE.match(v):
            raise ValueError("batch_size must be a number (1 or more), 'auto' or 'auto:N'")
        return v


# A number, a list of numbers (a sweep axis), a per-adapter table, or a bool; `_check_param`
# checks the shape against the method's registry entry, so a quoted "0.5" is reported, not coerced.
ParamValue = Any


class MatrixSpec(_Model):
    """The file's schema. Cross-key rules live in `_check`, which names the offending key."""

    name: str
    adapters: list[str] = Field(min_length=1)
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    max_attempts: int = Field(default=3, ge=1)
    array_parallelism: int = Field(default=16, ge=1)
    exclude: list[dict[str, str]] = []
    base: SourceSpec
    adapter: SourceSpec
    push: PushSpec
    variants: dict[str, VariantSpec] = Field(min_length=1)
    sizes: dict[str, SizeSpec] = Field(min_length=1)
    methods: dict[str, dict[str, ParamValue]] = Field(min_length=1)
    resources: Resources = Resources()
    runtime: Runtime = Runtime()
    paths: PathsSpec = PathsSpec()
    merge: MergeSpec = MergeSpec()
    eval: EvalSpec | None = None


@dataclass(frozen=True)
class PushTarget:
    """`hub:<repo id>` or `dir:<absolute folder>`."""

    kind: Literal["hub", "dir"]
    location: str
    private: bool = False
    defer: bool = False

    def __str__(self) -> str:
        return f"{self.kind}:{self.location}"


@dataclass(frozen=True)
class Cell:
    """One (size, variant, method[, sweep point]) of the matrix: everything a task needs."""

    id: str
    size: str
    variant: str
    method: str
    parameters: dict[str, Any]
    base: ModelSource
    adapters: tuple[tuple[str, ModelSource], ...]
    push: PushTarget
    resources: Resources
    dtype: str
    merge: MergeSpec = MergeSpec()

    @property
    def recipe_hash(self) -> str:
        """sha256 of everything that determines the merged weights (not where they go)."""
        blob = json.dumps(
            {"method": self.method, "parameters": self.parameters, "dtype": self.dtype,
             "base": self.base.as_dict(),
             "adapters": [[name, src.as_dict()] for name, src in self.adapters]},
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "size": self.size, "variant": self.variant, "method": self.method,
            "parameters": self.parameters, "dtype": self.dtype,
            "base": self.base.describe(),
            "adapters": {name: src.describe() for name, src in self.adapters},
            "push": f"{self.push}/{self.id}", "recipe_hash": self.recipe_hash,
            "resources": self.resources.model_dump(exclude_none=True),
        }


@dataclass(frozen=True)
class Matrix:
    """A validated matrix file: its spec, where it lives and its content hash."""

    spec: MatrixSpec
    path: Path
    sha256: str

    @property
    def root(self) -> Path:
        return self.path.parent

    @property
    def push_target(self) -> PushTarget:
        return _push_target(self)

    @property
    def work_dir(self) -> Path:
        return (self.root / Path(self.spec.paths.work).expanduser()).resolve()

    @property
    def runtime(self) -> Runtime:
        """[runtime] with its paths as a task needs them: ~ expanded (apptainer does not expand
        it) and a relative image or bind source read from the matrix's folder, as every other
        path in the file. A bind source is kept as written otherwise: its symlinks are not
        resolved, as the container sees it at that path."""
        runtime = self.spec.runtime
        binds = [str(self.root / Path(source).expanduser()) + sep + rest
                 for source, sep, rest in (bind.partition(":") for bind in runtime.binds)]
        image = runtime.image and str(self.root / Path(runtime.image).expanduser())
        return runtime.model_copy(update={"image": image, "binds": binds})

    def task_env(self, container: str) -> dict[str, str]:
        """The fixed environment of every task: [runtime] env, and in a container a Hub cache
        under the work folder unless env names one (the image's default would be under $HOME,
        which clusters keep small; without a container the task inherits this environment's)."""
        env = dict(self.spec.runtime.env)
        if container == "apptainer" and not {"HF_HOME", "HF_HUB_CACHE"} & set(env):
            env["HF_HOME"] = str(self.work_dir / "hf-home")
        return env


# ---------------------------------------------------------------------------------------------
# Loading


def load_matrix(path: Path | str, check_cells: bool = True) -> Matrix:
    """Read, parse and validate a matrix file; raise ConfigError naming file, key and value.

    With check_cells=False the cells are not expanded (ids, templates and sweeps go unchecked):
    for readers such as `status` that only need the matrix's settings.
    """
    try:
        path = Path(path).resolve()
        raw = path.read_bytes()
    except RuntimeError as e:  # Python < 3.13: a symlink loop in resolve()
        raise ConfigError(f"{path}: cannot read matrix: {e}") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read matrix: {e.strerror or e}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8-sig"))  # an editor's BOM is not TOML
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    try:
        spec = MatrixSpec.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_describe_validation_error(path, e)) from None
    matrix = Matrix(spec=spec, path=path, sha256=hashlib.sha256(raw).hexdigest())
    _check(matrix)
    if check_cells:
        from .evaluation import baseline_places, check_only, expand_eval

        cells = expand(matrix)  # ids, templates and sweeps are validated by expanding once
        check_exclude(matrix, [(p.size, p.variant, p.id) for p in baseline_places(matrix)])
        expand_eval(matrix, cells)
        check_only(matrix, cells)
    return matrix


def _describe_validation_error(path: Path, error: ValidationError) -> str:
    lines = []
    for err in error.errors():
        key = ".".join(str(part) for part in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        got = "" if err["type"] == "missing" else f" (got {err['input']!r})"
        if tuple(err["loc"][:2]) == ("runtime", "env"):
            # The values may be credentials: name the variables, never echo what they hold.
            names = sorted(err["input"]) if isinstance(err["input"], dict) else []
            got = f" (got variables {names!r})" if names else ""
        lines.append(f"{path}: {key}: {msg}{got}")
    return "\n".join(lines)


def _fail(matrix: Matrix, key: str, value: Any, message: str) -> ConfigError:
    return ConfigError(f"{matrix.path}: {key}: {message} (got {value!r})")


def _check(matrix: Matrix) -> None:
    """Rules that span keys. Raise on the first problem, naming its key."""
    spec = matrix.spec
    for key, names in (("adapters", spec.adapters), ("variants", list(spec.variants)),
                       ("sizes", list(spec.sizes)), ("methods", list(spec.methods))):
        for name in names:
            if not is_safe_segment(name):
                raise _fail(matrix, key, name, "names must be safe path segments "
                            "(letters, digits, '_', '.', '+', '-'; no leading dot, no '..')")
        if len(set(names)) != len(names):
            raise _fail(matrix, key, names, "duplicate names")
    if "base" in spec.adapters:
        raise _fail(matrix, "adapters", "base", "'base' is reserved for the base model's input "
                    "(--pin base=COMMIT); rename the adapter")
    for method, params in spec.methods.items():
        try:
            method_spec = methods.get(method)
        except KeyError as e:
            raise _fail(matrix, f"methods.{method}", method, e.args[0]) from None
        for name, value in params.items():
            _check_param(matrix, f"methods.{method}.{name}", method_spec, name, value)
        for name, param in method_spec.params.items():
            if param.required and name not in params:
                raise _fail(matrix, f"methods.{method}", params,
                            f"missing required parameter {name!r}")
    for size, size_spec in spec.sizes.items():
        for key, wanted, known in (("methods", size_spec.methods, spec.methods),
                                   ("variants", size_spec.variants, spec.variants)):
            if wanted is not None and not wanted:
                raise _fail(matrix, f"sizes.{size}.{key}", wanted,
                            f"an empty list selects nothing; leave the key out to use every "
                            f"entry of [{key}]")
            for name in wanted or ():
                if name not in known:
                    raise _fail(matrix, f"sizes.{size}.{key}", name,
                                f"not declared in [{key}] (declared: {', '.join(known)})")
        size_resources(matrix, size)
        if spec.eval is not None:
            size_resources(matrix, size, eval_=True)
    for i, rule in enumerate(spec.exclude):
        for key in rule:
            if key not in EXCLUDE_KEYS:
                raise _fail(matrix, f"exclude.{i}", key,
                            f"unknown key (valid: {', '.join(EXCLUDE_KEYS)})")
    if spec.eval is not None:
        _check_eval(matrix, spec.eval)
    kind, _, location = spec.push.target.partition(":")
    if kind not in ("hub", "dir") or not location:
        raise _fail(matrix, "push.target", spec.push.target,
                    "must be 'hub:<owner>/<name>' or 'dir:<folder>'")
    if kind == "hub" and not REPO_ID.match(location):
        raise _fail(matrix, "push.target", spec.push.target, "not a Hub repo id (owner/name)")


def size_resources(matrix: Matrix, size: str, eval_: bool = False) -> Resources:
    """What a task of this size asks for: [resources], then the size's overrides, then (for an
    eval task) [eval] resources. Raise ConfigError naming the key that made it invalid."""
    spec = matrix.spec
    layers = [("resources", spec.resources.model_dump(exclude_unset=True)),
              (f"sizes.{size}.resources", spec.sizes[size].resources)]
    if eval_ and spec.eval is not None:
        layers.append(("eval.resources", spec.eval.resources))
    merged: dict[str, Any] = {}
    for key, layer in layers:
        merged.update(layer)
        try:
            resources = Resources.model_validate(merged)
        except ValidationError as e:
            raise ConfigError(_describe_validation_error(matrix.path, e).replace(
                f"{matrix.path}: ", f"{matrix.path}: {key}.")) from None
    return resources


def _check_eval(matrix: Matrix, spec: EvalSpec) -> None:
    """[eval] rules that span keys; baseline ids against cell ids are checked by expand_eval."""
    tasks = set(spec.tasks)
    if len(tasks) != len(spec.tasks):
        raise _fail(matrix, "eval.tasks", spec.tasks, "duplicate task names")
    for key, table in (("eval.num_fewshot", spec.num_fewshot if isinstance(spec.num_fewshot, dict)
                        else {}), ("eval.only", spec.only)):
        for task in table:
            if task not in tasks:
                raise _fail(matrix, f"{key}.{task}", task,
                            f"not in eval.tasks ({', '.join(spec.tasks)})")
    for task, globs in spec.only.items():
        if not globs:
            raise _fail(matrix, f"eval.only.{task}", globs,
                        "an empty list runs the task nowhere; leave it out of eval.tasks instead")
    if spec.include_path is not None and not (matrix.root / spec.include_path).is_dir():
        raise _fail(matrix, "eval.include_path", spec.include_path,
                    f"not a folder ({(matrix.root / spec.include_path).resolve()})")
    names = [b.name for b in spec.baselines]
    for i, baseline in enumerate(spec.baselines):
        key = f"eval.baselines.{i}"
        if not is_safe_segment(baseline.name):
            raise _fail(matrix, f"{key}.name", baseline.name,
                        "names must be safe path segments (letters, digits, '_', '.', '+', '-')")
        if baseline.name in names[:i]:
            raise _fail(matrix, f"{key}.name", baseline.name, "duplicate baseline name")
        for field, wanted, known in (("adapters", baseline.adapters, list(matrix.spec.adapters)),
                                     ("sizes", baseline.sizes, list(matrix.spec.sizes)),
                                     ("variants", baseline.variants, list(matrix.spec.variants))):
            if field != "adapters" and wanted is not None and not wanted:
                raise _fail(matrix, f"{key}.{field}", wanted, "an empty list evaluates the "
                            f"baseline nowhere; leave the key out to use every one of [{field}]")
            for name in wanted or ():
                if name not in known:
                    raise _fail(matrix, f"{key}.{field}", name,
                                f"not one of the matrix's {field} ({', '.join(known)})")


def _check_param(matrix: Matrix, key: str, method: methods.MethodSpec, name: str,
                 value: Any) -> None:
    param = method.params.get(name)
    if param is None:
        raise _fail(matrix, key, value, f"unknown parameter {name!r} for {method.name} "
                    f"(valid: {', '.join(method.params)})")
    if param.kind is bool:
        if not isinstance(value, bool):
            raise _fail(matrix, key, value, "must be true or false")
        return
    if isinstance(value, dict):
        if not param.per_model:
            raise _fail(matrix, key, value, "is merge-wide; give one number, not a table")
        unknown = set(value) - set(matrix.spec.adapters)
        missing = set(matrix.spec.adapters) - set(value)
        if unknown or missing:
            raise _fail(matrix, key, value, f"per-adapter table must have exactly the keys "
                        f"{', '.join(matrix.spec.adapters)}")
        values = list(value.values())
    elif isinstance(value, list):
        if not value:
            raise _fail(matrix, key, value, "a sweep needs at least one value")
        values = value
    else:
        values = [value]
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise _fail(matrix, key, v, "must be a number")
        problem = param.check(float(v))
        if problem:
            raise _fail(matrix, key, v, problem)
    # A table is one cell's values; a number or each sweep value applies to every adapter.
    if param.not_all_zero and (not any(values) if isinstance(value, dict) else 0 in values):
        raise _fail(matrix, key, value, "the adapters' values may not all be zero")


# ---------------------------------------------------------------------------------------------
# Expansion (pure)


def expand(matrix: Matrix) -> list[Cell]:
    """Every cell of the matrix, in file order (size, variant, method, sweep point)."""
    spec = matrix.spec
    cells = [cell for cell in _every_cell(matrix)
             if not _excluded(spec.exclude, cell.size, cell.variant, cell.method, cell.id)]
    if not cells:
        raise _fail(matrix, "exclude", spec.exclude, "the rules remove every cell")
    return cells


def _every_cell(matrix: Matrix) -> list[Cell]:
    """The cells of the matrix before `exclude` removes any."""
    spec = matrix.spec
    cells: list[Cell] = []
    seen: dict[str, str] = {}
    for size, size_spec in spec.sizes.items():
        resources = size_resources(matrix, size)
        for variant in size_spec.variants or list(spec.variants):
            base, adapters = sources(matrix, size, variant)
            for method in size_spec.methods or list(spec.methods):
                for parameters, suffix in _sweep(spec, method):
                    cell_id = f"{size}-{variant}/{'-'.join(spec.adapters)}__{method}{suffix}"
                    where = f"sizes.{size} x variants.{variant} x methods.{method}"
                    if cell_id in seen:
                        raise _fail(matrix, where, cell_id,
                                    f"duplicate cell id (also from {seen[cell_id]})")
                    seen[cell_id] = where
                    cells.append(Cell(
                        id=cell_id, size=size, variant=variant, method=method,
                        parameters=parameters, base=base, adapters=adapters,
                        push=matrix.push_target, resources=resources, dtype=spec.dtype,
                        merge=spec.merge))
    return cells


def check_exclude(matrix: Matrix, baselines: list[tuple[str, str, str]]) -> None:
    """Refuse an `exclude` rule that removes nothing, and a size the rules leave with nothing to
    run: likely typos (a misspelt size, a glob that matches no id), refused as an empty list
    is. `baselines` are the (size, variant, id) of the [eval] baselines before exclusion: a rule
    may remove a baseline only, and a size may keep its baselines without any cell."""
    rules = matrix.spec.exclude
    places = [(c.size, c.variant, c.method, c.id) for c in _every_cell(matrix)]
    places += [(size, variant, "", target_id) for size, variant, target_id in baselines]
    for i, rule in enumerate(rules):
        if not any(_excluded([rule], *place) for place in places):
            raise _fail(matrix, f"exclude.{i}", rule, "matches no cell or [eval] baseline of the "
                        "matrix")
    for size in matrix.spec.sizes:
        if all(_excluded(rules, *place) for place in places if place[0] == size):
            raise _fail(matrix, "exclude", rules, f"the rules remove every cell of size {size}; "
                        f"leave [sizes.{size}] out of the matrix instead")


def size_variants(matrix: Matrix) -> list[tuple[str, str]]:
    """Every (size, variant) pair of the matrix, in file order."""
    return [(size, variant) for size, size_spec in matrix.spec.sizes.items()
            for variant in size_spec.variants or list(matrix.spec.variants)]


def sources(matrix: Matrix, size: str,
            variant: str) -> tuple[ModelSource, tuple[tuple[str, ModelSource], ...]]:
    """The base and the adapters (by name, in order) of one (size, variant)."""
    spec = matrix.spec
    context = {"size": size, "variant": variant, **spec.variants[variant].vars,
               **spec.sizes[size].vars}
    base = _resolve_source(matrix, "base", spec.base, context)
    adapters = tuple(
        (name, _resolve_source(matrix, "adapter", spec.adapter, {**context, "adapter": name}))
        for name in spec.adapters)
    return base, adapters


def _sweep(spec: MatrixSpec, method: str) -> list[tuple[dict[str, Any], str]]:
    """(parameters, id suffix) for each sweep point; a list-valued parameter is a sweep axis."""
    params = spec.methods[method]
    axes = [(name, value) for name, value in params.items() if isinstance(value, list)]
    fixed = {name: value for name, value in params.items() if not isinstance(value, list)}
    points = []
    for combo in itertools.product(*(values for _, values in axes)):
        chosen = {**fixed, **{name: v for (name, _), v in zip(axes, combo)}}
        suffix = "".join(f"-{name}{_number(v)}" for (name, _), v in zip(axes, combo))
        points.append((_per_model(spec, method, chosen), suffix))
    return points


def _per_model(spec: MatrixSpec, method: str, params: dict[str, Any]) -> dict[str, Any]:
    """Spell per-model parameters out per adapter, so the recipe and its hash are explicit."""
    out: dict[str, Any] = {}
    for name, value in params.items():
        # `+ 0.0` turns -0.0 into 0.0: the same recipe must have the same hash.
        if methods.get(method).params[name].per_model and not isinstance(value, dict):
            value = {adapter: float(value) + 0.0 for adapter in spec.adapters}
        elif isinstance(value, dict):
            value = {adapter: float(value[adapter]) + 0.0 for adapter in spec.adapters}
        elif not isinstance(value, bool):
            value = float(value) + 0.0
        out[name] = value
    return out


def _number(value: float) -> str:
    # `:g` keeps 6 significant digits: 0.1234561 and 0.1234564 would both read 0.123456. Keep
    # its (existing) spelling where it is exact, else the shortest exact one.
    text = f"{value:g}"
    if float(text) == value:
        return text
    return str(value) if isinstance(value, int) else repr(float(value))


def _excluded(rules: list[dict[str, str]], size: str, variant: str, method: str,
              cell_id: str) -> bool:
    fields = {"size": size, "variant": variant, "method": method, "id": cell_id}
    return any(all(fnmatch.fnmatchcase(fields[k], pattern) for k, pattern in rule.items())
               for rule in rules)


def _fill(matrix: Matrix, key: str, template: str | None, context: dict[str, str]) -> str | None:
    if template is None:
        return None
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
        for f in fields:
            if f not in context:
                raise KeyError(f)
        return template.format(**context)
    except KeyError as e:
        raise _fail(matrix, key, template, f"unknown placeholder {{{e.args[0]}}} "
                    f"(known: {', '.join('{' + k + '}' for k in context)})") from None
    except (ValueError, IndexError) as e:
        raise _fail(matrix, key, template, f"bad template: {e}") from None


def _resolve_source(matrix: Matrix, key: str, spec: SourceSpec,
                    context: dict[str, str]) -> ModelSource:
    repo = _fill(matrix, f"{key}.repo", spec.repo, context)
    path = _fill(matrix, f"{key}.path", spec.path, context)
    subfolder = _fill(matrix, f"{key}.subfolder", spec.subfolder, context)
    revision = _fill(matrix, f"{key}.revision", spec.revision, context)
    if repo is not None and not REPO_ID.match(repo):
        raise _fail(matrix, f"{key}.repo", repo, "not a Hub repo id (owner/name)")
    if subfolder is not None and not is_safe_subpath(subfolder):
        raise _fail(matrix, f"{key}.subfolder", subfolder,
                    "must be a relative path of safe segments (no '..', no leading '/')")
    if revision is not None and not re.match(r"^[A-Za-z0-9][A-Za-z0-9_./-]*$", revision):
        raise _fail(matrix, f"{key}.revision", revision, "not a branch, tag or commit")
    if path is not None:
        path = str((matrix.root / Path(path).expanduser()).resolve())
    return ModelSource(repo=repo, path=path, subfolder=subfolder, revision=revision)


def _push_target(matrix: Matrix) -> PushTarget:
    kind, _, location = matrix.spec.push.target.partition(":")
    if kind == "dir":
        location = str((matrix.root / Path(location).expanduser()).resolve())
    return PushTarget(kind=kind, location=location, private=matrix.spec.push.private,
                      defer=matrix.spec.push.defer)


T = TypeVar("T")


def select(cells: list[T], only: str | None) -> list[T]:
    """Cells (or eval targets: anything with an `id`) whose id matches the glob `only` (all when
    None)."""
    if only is None:
        return cells
    return [c for c in cells if fnmatch.fnmatchcase(c.id, only)]
