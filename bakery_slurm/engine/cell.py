"""Plan one cell's merge from the base and the adapters' LoRA factors, then run it over all cores.

`plan_cell` reads only headers and configs: which base tensor each output comes from (names
brought to the hub layout, so the output needs no repair), which adapters change it and how.
`run_plan` computes every output tensor on its own:

1. the base tensor in the cell's dtype, and each adapter's baked tensor from it
   (`lora.baked_tensor`, bit for bit PEFT's merge_and_unload);
2. mergekit's own merge method on them (`mergekit.merge_methods.merge_tensors`), with the inputs in
   run_merge's order (the recipe's models, then the base) and the recipe's parameters, mergekit
   filling in its defaults (normalize, int8_mask, ...) exactly as run_merge does; TIES on the
   CPU sorts its magnitudes as integers, with the same result (`bitsort.py`);
3. the result written at its place in the output shards (`shards.ShardWriter`).

Tensors no adapter touches are all-equal inputs, which task_arithmetic, TIES and linear return
unchanged for the values `unchanged.py` proves they do (no -0.0, inf or NaN; for linear, positive
weights and magnitudes in fp32's safe range): such tensors are copied after that check instead of
being merged (TIES sorts every tensor; the 262k x 1152 embedding is 30% of a 1B model). linear and
task_arithmetic are elementwise, so a large untouched tensor is checked and merged in row chunks
to bound memory.

Tensors run in parallel on a thread pool (torch releases the GIL inside its kernels), each
kernel on one thread, one thread per core the task may use, with at most `memory_budget` bytes of
estimated working memory in flight: half of what the task may allocate (its SLURM memory, read from
its cgroup, or the machine's available memory), so a 12b cell with 220 GB merges ~50 of its
largest tensors at once, and a small allocation still merges one large tensor at a time.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from ..errors import RepairError
from ..repair import (checkpoint_tensors, detect_kind, read_config, read_header_and_offset,
                      to_hub_name)
from .bitsort import merge_method
from .heap import keep_freed_memory
from .lora import ADAPTER_WEIGHTS, Factors, Unsupported, baked_tensor, read_adapter
from .shards import ELEMENT_BYTES, ShardWriter, plan_shards
from .unchanged import Unchanged, rule_for

log = logging.getLogger(__name__)

# The base's entry in mergekit's input list; adapter names are safe segments and never start with "_".
BASE_ID = "__base__"
# Methods whose kernel is elementwise (an output element depends only on the inputs' element at
# the same place), so a tensor may be merged in row chunks with identical results.
ELEMENTWISE = frozenset({"linear", "task_arithmetic"})
# Row chunks of untouched tensors hold at most this many elements (16 Mi: 32 MB in bf16).
CHUNK_ELEMENTS = 1 << 24
# Estimated working memory per element and input of a merge (the inputs, fp32 temporaries; TIES
# also sorts each delta's magnitudes in fp32 with int64 indices). Measured peaks are below these.
BYTES_PER_ELEMENT = {"ties": 12}
DEFAULT_BYTES_PER_ELEMENT = 6
# Working memory in flight where the memory the task may use is unknown: 384 MiB per core.
MEMORY_PER_WORKER = 384 << 20
MIN_MEMORY_BUDGET = 1 << 30
# A cgroup memory limit at or above this is "no limit" (cgroup v1 writes 2^63 rounded to pages).
NO_LIMIT = 1 << 60
PROGRESS_INTERVAL_S = 5.0
SAFETENSORS_DTYPE = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
FLOAT_DTYPES = {"BF16", "F16", "F32", "F64"}


@dataclass(frozen=True)
class CellPlan:
    """Everything `run_plan` needs, decided from headers and configs alone."""

    method: str
    dtype: str
    adapters: tuple[str, ...]
    needs_base: bool
    parameters: dict[str, Any]
    # output (hub-layout) name -> (base file, name in that file), in output order
    sources: dict[str, tuple[Path, str]]
    specs: dict[str, tuple[str, tuple[int, ...]]]
    # adapter -> (its weights file, {output name: factors})
    factors: dict[str, tuple[Path, dict[str, Factors]]]
    config: Path

    @property
    def adapted(self) -> set[str]:
        return {name for _, plan in self.factors.values() for name in plan}


def plan_cell(base: Path, adapters: list[tuple[str, Path]], method: str, needs_base: bool,
              parameters: Mapping[str, Any], dtype: str) -> CellPlan:
    """Plan the merge of `adapters` into `base` with mergekit's `method`.

    Parameters
    ----------
    parameters:
        The cell's parameters: per-adapter ones as {adapter: value}, merge-wide ones as values.

    Raises
    ------
    Unsupported
        An adapter needs something the engine does not compute exactly, or the base holds a
        tensor that is not floating point.
    RepairError
        The base's names cannot be brought to the hub layout.
    """
    located = checkpoint_tensors(base)
    kind = detect_kind(located, read_config(base))
    to_output = to_hub_name if kind == "multimodal" else (lambda name: name)
    sources: dict[str, tuple[Path, str]] = {}
    specs: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name in sorted(located):
        where = located[name]
        if where.dtype not in FLOAT_DTYPES:
            raise Unsupported(f"base tensor {name} is {where.dtype}, not floating point")
        out = to_output(name)
        if out in sources:
            raise RepairError(f"{base}: {sources[out][1]} and {name} both map to {out}")
        sources[out] = (Path(base) / where.file, name)
        specs[out] = (SAFETENSORS_DTYPE[dtype], tuple(where.shape))
    shapes = {name: shape for name, (_, shape) in specs.items()}
    to_module = peft_module_name if kind == "multimodal" else (lambda module: module)
    modules = model_modules(specs, kind == "multimodal")
    factors = {adapter: (Path(folder) / ADAPTER_WEIGHTS,
                         read_adapter(folder, shapes, to_output, to_module, modules))
               for adapter, folder in adapters}
    names = tuple(adapter for adapter, _ in adapters)
    merge_parameters = {key: (dict(value) if isinstance(value, dict) else value)
                        for key, value in parameters.items()}
    return CellPlan(method, dtype, names, needs_base, merge_parameters, sources, specs, factors,
                    Path(base) / "config.json")


# Multimodal adapter module prefixes that PEFT's key mapping (transformers 5's conversion for
# gemma3) brings to the model's modules, and what they become; PEFT loads no other layout.
PEFT_MODULE_PREFIXES = (
    ("model.language_model.model.", "model.language_model."),
    ("model.language_model.", "model.language_model."),
    ("language_model.model.", "model.language_model."),
    ("model.vision_tower.vision_model.", "model.vision_tower."),
    ("model.vision_tower.", "model.vision_tower."),
    ("vision_tower.vision_model.", "model.vision_tower."),
)


def peft_module_name(module: str) -> str:
    """A multimodal adapter's module (its key without `base_model.model.` and the factor suffix)
    as the module of the model PEFT loads it into; Unsupported where PEFT would load nothing."""
    if module == "lm_head":  # not `language_model.lm_head`: PEFT loads that nowhere
        return "lm_head"
    for prefix, model_prefix in PEFT_MODULE_PREFIXES:
        if module.startswith(prefix):
            return model_prefix + module[len(prefix):]
    raise Unsupported(f"adapter module {module}: a key layout PEFT does not load into this model")


# Hub-layout name prefixes of a multimodal base and the module prefixes of the model PEFT loads.
HUB_MODULE_PREFIXES = (
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head", "lm_head"),
    ("vision_tower.vision_model.", "model.vision_tower."),
)


def model_modules(names: Iterable[str], multimodal: bool) -> dict[str, str]:
    """{module of the model PEFT loads: its weight's output name} for every output name that is a
    module's `.weight`: the name itself for a text model; for a multimodal one, the inverse of
    `peft_module_name` and `to_hub_name` (each result checked through them), leaving out names
    PEFT loads no adapter into."""
    modules = {}
    for name in names:
        if not name.endswith(".weight"):
            continue
        module = name[:-len(".weight")]
        if multimodal:
            module = next((model + module[len(hub):] for hub, model in HUB_MODULE_PREFIXES
                           if name.startswith(hub)), "")
            try:
                if not module or to_hub_name(peft_module_name(module) + ".weight") != name:
                    continue
            except Unsupported:
                continue
        modules[module] = name
    return modules


@dataclass
class Progress:
    """Tensors and bytes done so far; `snapshot` is what goes to the log and the result record."""

    tensors_total: int
    bytes_total: int
    tensors_done: int = 0
    bytes_done: int = 0
    passed_through: int = 0
    started: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {"tensors_done": self.tensors_done, "tensors_total": self.tensors_total,
                    "bytes_done": self.bytes_done, "bytes_total": self.bytes_total,
                    "passed_through": self.passed_through,
                    "seconds": round(time.monotonic() - self.started, 1)}


@dataclass(frozen=True)
class _Unit:
    """One piece of work: a whole tensor, or rows [start, stop) of an untouched one."""

    name: str
    start: int
    stop: int
    whole: bool
    cost: int


def run_plan(plan: CellPlan, out: Path, device: str = "cpu", workers: int | None = None,
             memory_budget: int | None = None, max_shard_bytes: int = 5_000_000_000,
             report: Callable[[dict[str, Any]], None] | None = None
             ) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Write the merged checkpoint's shards into the empty folder `out`; return the final progress
    and the shards' `manifest.scan` entries (each hashed while it was written).

    `report` is called with a progress snapshot every few seconds and at the end.
    """
    import torch

    keep_freed_memory()
    workers = workers or available_cores()
    available = available_memory()
    if torch.device(device).type == "cuda":
        # The merge's inputs and temporaries are on the GPU too: what it has free bounds them.
        free = _gpu_free_memory(torch.device(device))
        available = free if available is None or free is None else min(available, free)
    memory_budget = memory_budget or default_memory_budget(workers, available)
    unchanged = unchanged_rule(plan)
    units = _units(plan, unchanged is not None)
    # Laid out in the order the units run, so each file is hashed behind the merge (shards.py).
    shard_plan = plan_shards({unit.name: plan.specs[unit.name] for unit in units}, max_shard_bytes)
    progress = Progress(len(plan.specs), sum(p.nbytes for p in shard_plan.placements.values()))
    pending_chunks = {}
    for unit in units:
        pending_chunks[unit.name] = pending_chunks.get(unit.name, 0) + 1
    writer = ShardWriter(shard_plan, out)
    context = _Context(plan, writer, torch.device(device), progress, pending_chunks, unchanged)
    in_flight = _Budget(memory_budget)
    errors: list[BaseException] = []

    def run(unit: _Unit) -> None:
        if not errors:  # units queued behind a failure are not started
            context.run(unit)

    def finished(future: Future, cost: int) -> None:
        if future.exception() is not None:
            errors.append(future.exception())
        in_flight.release(cost)

    stop_reporting = threading.Event()
    reporter = threading.Thread(target=_report_every, args=(progress, report, stop_reporting),
                                daemon=True)
    threads = torch.get_num_threads()
    # One thread per kernel, one kernel per core: parallel over tensors, not inside them.
    torch.set_num_threads(1)
    reporter.start()
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bakery-merge") as pool:
            for unit in units:
                in_flight.acquire(unit.cost)
                if errors:  # stop submitting; the pool finishes what it runs
                    in_flight.release(unit.cost)
                    break
                pool.submit(run, unit).add_done_callback(
                    lambda future, cost=unit.cost: finished(future, cost))
        if errors:
            raise errors[0]
        files = writer.close()
    finally:
        writer.abort()
        context.files.close()
        torch.set_num_threads(threads)
        stop_reporting.set()
        reporter.join()
    final = progress.snapshot()
    if report:
        report(final)
    return final, files


def available_cores() -> int:
    """The cores this task may use (its CPU affinity, which SLURM sets to the allocation)."""
    return len(os.sched_getaffinity(0))


def default_memory_budget(workers: int, available: int | None) -> int:
    """Estimated working memory the tensors in flight may take: half of `available` (the other
    half is the process, torch and the page cache of the files it reads), at least
    MIN_MEMORY_BUDGET (one large tensor at a time); MEMORY_PER_WORKER per worker when unknown."""
    if available is None:
        return max(MIN_MEMORY_BUDGET, MEMORY_PER_WORKER * workers)
    return max(MIN_MEMORY_BUDGET, available // 2)


def available_memory(proc: Path = Path("/proc"), cgroups: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes this process may allocate: the least of the machine's MemAvailable and every memory
    limit of the cgroups it is in (SLURM confines a job's memory with one; cgroup v1 or v2), or
    None where neither can be read (not Linux)."""
    found = [limit for folder in _memory_cgroups(proc / "self" / "cgroup", cgroups)
             for limit in (_read_int(folder / "memory.max"), _read_int(folder / "memory.limit_in_bytes"))
             if limit is not None and limit < NO_LIMIT]
    try:
        meminfo = (proc / "meminfo").read_text()
    except OSError:
        meminfo = ""
    for line in meminfo.splitlines():
        if line.startswith("MemAvailable:"):
            found.append(int(line.split()[1]) * 1024)
    return min(found) if found else None


def _gpu_free_memory(device: Any) -> int | None:
    """Bytes free on the GPU, or None when it cannot be asked: then the merge's own first use
    of the GPU fails the same way, and the caller falls back to the CPU on that error."""
    import torch

    try:
        return torch.cuda.mem_get_info(device)[0]
    except (RuntimeError, AssertionError):  # torch asserts when it was built without CUDA
        return None


def _memory_cgroups(membership: Path, cgroups: Path) -> list[Path]:
    """The folders of the memory cgroup this process is in and of each cgroup above it.

    `membership` is /proc/self/cgroup: `0::<path>` (v2, under `cgroups`) and, on v1 or hybrid
    hosts, `<id>:memory:<path>` (under `cgroups`/memory). Inside a container whose cgroup
    namespace makes the path unknown under the mount, the mount's root is the process's cgroup.
    """
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        return []
    folders = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            mount = cgroups
        elif "memory" in controllers.split(","):
            mount = cgroups / "memory"
        else:
            continue
        folder = mount / path.lstrip("/")
        if not folder.is_dir():
            folder = mount
        while True:
            folders.append(folder)
            if folder == mount:
                break
            folder = folder.parent
    return folders


def _read_int(path: Path) -> int | None:
    """A cgroup file's number; None when absent or not a number ("max": no limit)."""
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


class _Budget:
    """A counting semaphore over bytes: acquire waits until the cost fits (or nothing is in flight)."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0
        self.cond = threading.Condition()

    def acquire(self, cost: int) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.used == 0 or self.used + cost <= self.limit)
            self.used += cost

    def release(self, cost: int) -> None:
        with self.cond:
            self.used -= cost
            self.cond.notify_all()


def _units(plan: CellPlan, copies: bool) -> list[_Unit]:
    """The work in the order it runs, which is also the order of the output's layout: tensors
    largest first, so the last to finish are small ones and every core stays busy, and each
    tensor's row chunks in row order, so a file's written prefix grows steadily."""
    adapted = plan.adapted
    per_element = BYTES_PER_ELEMENT.get(plan.method, DEFAULT_BYTES_PER_ELEMENT) * (len(plan.adapters) + 1)
    tensors = []
    for name, (_, shape) in plan.specs.items():
        numel = math.prod(shape)
        rows = shape[0] if shape else 1
        if name in adapted or plan.method not in ELEMENTWISE or numel <= CHUNK_ELEMENTS or not shape:
            # A copy (an untouched tensor the method leaves unchanged) needs no working memory
            # beyond it.
            cost = numel * (4 if name not in adapted and copies else per_element)
            tensors.append([_Unit(name, 0, rows, True, cost)])
            continue
        step = max(1, CHUNK_ELEMENTS // max(1, numel // rows))
        chunks = []
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            chunks.append(_Unit(name, start, stop, False, (stop - start) * (numel // rows) * per_element))
        tensors.append(chunks)
    tensors.sort(key=lambda units: (-units[0].cost, units[0].name))
    return [unit for units in tensors for unit in units]


def unchanged_rule(plan: CellPlan) -> Unchanged | None:
    """Which untouched tensors the cell's method returns as they are (see `unchanged.py`)."""
    from mergekit import merge_methods

    return rule_for(merge_methods.get(plan.method), plan.method, plan.parameters, plan.adapters,
                    plan.needs_base, plan.dtype)


class _Files:
    """Reads tensors, or row ranges of them, straight from safetensors files with `os.pread`:
    no memory map, so the process holds only the tensors in flight, and no shared file position,
    so any thread may read."""

    DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.open: dict[Path, tuple[int, dict[str, Any], int]] = {}

    def _file(self, path: Path) -> tuple[int, dict[str, Any], int]:
        with self.lock:
            if path not in self.open:
                header, data_start = read_header_and_offset(path)
                self.open[path] = (os.open(path, os.O_RDONLY), header, data_start)
            return self.open[path]

    def read(self, path: Path, name: str, start: int = 0, stop: int | None = None) -> Any:
        """Tensor `name` of the file at `path`, rows [start, stop) (all rows by default)."""
        import torch

        fd, header, data_start = self._file(path)
        entry = header[name]
        shape = list(entry["shape"])
        dtype = getattr(torch, self.DTYPES[entry["dtype"]])
        begin, end = entry["data_offsets"]
        if shape:
            row_bytes = (end - begin) // shape[0] if shape[0] else 0
            stop = shape[0] if stop is None else stop
            begin, end = begin + start * row_bytes, begin + stop * row_bytes
            shape[0] = stop - start
        out = torch.empty(shape, dtype=dtype)
        view = memoryview(out.view(torch.uint8).reshape(-1).numpy())
        position, filled = data_start + begin, 0
        while filled < end - begin:
            got = os.preadv(fd, [view[filled:]], position + filled)
            if got == 0:
                raise RepairError(f"{path}: ends inside tensor {name}")
            filled += got
        return out

    def close(self) -> None:
        with self.lock:
            for fd, _, _ in self.open.values():
                os.close(fd)
            self.open = {}


class _Context:
    def __init__(self, plan: CellPlan, writer: ShardWriter, device: Any, progress: Progress,
                 pending_chunks: dict[str, int], unchanged: Unchanged | None):
        self.plan, self.writer, self.device, self.progress = plan, writer, device, progress
        self.pending_chunks = pending_chunks
        self.unchanged = unchanged
        self.computed: set[str] = set()  # tensors with a chunk that was merged, not copied
        self.files = _Files()
        self.method = merge_method(plan.method, device)

    def run(self, unit: _Unit) -> None:
        import torch

        plan = self.plan
        dtype = getattr(torch, plan.dtype)
        file, source_name = plan.sources[unit.name]
        base = self.files.read(file, source_name, unit.start, None if unit.whole else unit.stop)
        base = base.to(dtype)
        passed = False
        if unit.name not in plan.adapted and self.unchanged and self.unchanged.holds_for(base):
            result, passed = base, True
        else:
            baked = []
            for adapter in plan.adapters:
                weights, factors = plan.factors[adapter]
                if unit.name in factors:
                    f = factors[unit.name]
                    baked.append(baked_tensor(base, self.files.read(weights, f.a_key),
                                              self.files.read(weights, f.b_key), f.scaling))
                else:
                    baked.append(base)
            result = self._merge(unit.name, baked, base)
            del baked
        if result.dtype != dtype or tuple(result.shape) != tuple(base.shape):
            raise RuntimeError(f"{unit.name}: the merge returned {result.dtype} {tuple(result.shape)}, "
                               f"expected {dtype} {tuple(base.shape)}")
        data = result.contiguous().view(torch.uint8).reshape(-1).numpy()
        row_bytes = ELEMENT_BYTES[plan.specs[unit.name][0]] * (
            result.numel() // max(1, result.shape[0]) if result.dim() else 1)
        self.writer.write(unit.name, memoryview(data), unit.start * row_bytes)
        with self.progress.lock:
            self.pending_chunks[unit.name] -= 1
            self.progress.bytes_done += data.nbytes
            if not passed:
                self.computed.add(unit.name)
            if self.pending_chunks[unit.name] == 0:
                self.progress.tensors_done += 1
                self.progress.passed_through += unit.name not in self.computed

    def _merge(self, name: str, baked: list[Any], base: Any) -> Any:
        from mergekit.merge_methods import merge_tensors

        plan = self.plan
        tensors, ids = list(baked), list(plan.adapters)
        if plan.needs_base:
            # run_merge appends the base after the recipe's models when they do not include it.
            tensors.append(base)
            ids.append(BASE_ID)
        tensors = to_device(tensors, self.device)
        result = merge_tensors(tensors, self.method, parameters=plan.parameters, ids=ids,
                               base_index=len(baked) if plan.needs_base else None, name=name)
        return result.to("cpu")


def to_device(tensors: list[Any], device: Any) -> list[Any]:
    """The merge's inputs on `device` (baking stays on the CPU, as PEFT's merge_and_unload does)."""
    return tensors if device.type == "cpu" else [t.to(device) for t in tensors]


def _report_every(progress: Progress, report: Callable[[dict[str, Any]], None] | None,
                  stop: threading.Event) -> None:
    while not stop.wait(PROGRESS_INTERVAL_S):
        snapshot = progress.snapshot()
        log.info("merge: %d/%d tensors, %.2f/%.2f GB written, %.0f s",
                 snapshot["tensors_done"], snapshot["tensors_total"], snapshot["bytes_done"] / 1e9,
                 snapshot["bytes_total"] / 1e9, snapshot["seconds"])
        if report:
            report(snapshot)
