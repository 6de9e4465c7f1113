"""merge: the bakery engine on the base and LoRA factors, or mergekit on the baked checkpoints.

Device "auto" means CUDA when a probe allocation on it succeeds, else CPU. The seed's image failed
with "device busy" at the first `.to(cuda)`: a CUDA failure at start falls back to CPU and the reason
goes into the cell's result. mergekit's own tokenizer copy is off (mergekit 0.1.5 writes a tokenizer of
special tokens only when the donor folder has no tokenizer files): we copy the base's tokenizer
files and check they are identical.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

from ..errors import BakeryError
from ..manifest import sha256_file

log = logging.getLogger(__name__)
T = TypeVar("T")

# mergekit shards its output at 5 GB, like the Hub's own checkpoints.
OUT_SHARD_BYTES = 5_000_000_000
# Files that are the model's weights or config, produced by the merge; everything else in the base
# folder (tokenizer, chat template, processor and generation configs) is copied from the base.
MODEL_FILES = {"config.json", "model.safetensors.index.json", "README.md", ".gitattributes",
               "mergekit_config.yml"}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


# What SLURM sets in a job it gave GPUs: SLURM_JOB_GPUS in every batch job with GPUs, whatever
# gres.conf says about CUDA_VISIBLE_DEVICES.
SLURM_GPU_VARIABLES = ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS")


def slurm_gave_no_gpu(environ: Mapping[str, str]) -> bool:
    """Is this a SLURM task that was given no GPU? Without a container, or on a node whose GPUs
    are not fenced off per job, CUDA would still show it a GPU another job is using."""
    return "SLURM_JOB_ID" in environ and not any(environ.get(n) for n in SLURM_GPU_VARIABLES)


def choose_device(requested: str, environ: Mapping[str, str] = os.environ) -> tuple[str, str | None]:
    """Return (device, reason it is not what was asked for, or None). `auto` takes CUDA only
    where a probe allocation works, and never in a SLURM task that asked for no GPU."""
    if requested == "cpu":
        return "cpu", None
    if requested == "auto" and slurm_gave_no_gpu(environ):
        return "cpu", "SLURM gave this task no GPU"
    import torch

    if not torch.cuda.is_available():
        return "cpu", "CUDA is not available" if requested == "auto" else "CUDA requested but not available"
    try:
        torch.zeros(1, device="cuda").add_(1)
        torch.cuda.synchronize()
    except RuntimeError as e:  # "device busy", cgroup or driver trouble
        return "cpu", f"CUDA probe failed: {e}"
    return "cuda", None


def run_mergekit(config: Any, out: Path, device: str, reason: str | None) -> dict[str, Any]:
    """Merge into `out` (an empty folder); retry on CPU if CUDA fails. Returns the device record."""
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    check_architectures(config)

    def attempt(dev: str) -> None:
        options = MergeOptions(device=dev, cuda=dev == "cuda", copy_tokenizer=False,
                               write_model_card=False, quiet=True, lazy_unpickle=True,
                               out_shard_size=OUT_SHARD_BYTES, safe_serialization=True)
        run_merge(config, str(out), options=options)

    return _on_device(attempt, out, device, reason, "mergekit")[1]


def check_architectures(config: Any) -> None:
    """mergekit finds a model's tensors from its config's `architectures` and fails with a bare
    TypeError on a local model whose config.json names none (transformers loads those by
    model_type): say so. The bakes always name one; a base that needs it may not."""
    for model in config.referenced_models():
        path = Path(model.model.path) / "config.json"
        try:
            architectures = json.loads(path.read_text()).get("architectures")
        except (OSError, ValueError, AttributeError):
            continue  # not a local folder's readable config: mergekit names the problem
        if not architectures:
            raise BakeryError(f"{path} names no architectures: mergekit needs the model's "
                              f"architecture to merge it")


def run_engine(plan: Any, out: Path, device: str, reason: str | None,
               report: Callable[[dict[str, Any]], None] | None = None
               ) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Merge `plan` (bakery_slurm.engine) into `out` with the base's config; retry on CPU if
    CUDA fails. Returns the device record plus the engine's final progress, and the weight
    files' hashes (`manifest.scan` entries, taken while they were written)."""
    from ..engine import run_plan

    (progress, files), record = _on_device(
        lambda dev: run_plan(plan, out, dev, max_shard_bytes=OUT_SHARD_BYTES, report=report),
        out, device, reason, "the bakery engine")
    write_config(plan.config, out, plan.dtype)
    return {**record, "tensors": progress["tensors_total"],
            "passed_through": progress["passed_through"]}, files


def write_config(base_config: Path, out: Path, dtype: str) -> None:
    """The base's config.json with the cell's dtype, as mergekit writes it for its output."""
    config = json.loads(Path(base_config).read_text())
    config["dtype"] = dtype
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# What a failure of the GPU says (torch's CUDA errors, out of memory on the device, cuBLAS,
# cuDNN, NCCL, a device-side assert). Any other error (a CPU allocation, a shape) would fail the
# same way on the CPU: it is raised, not retried.
CUDA_FAILURE = re.compile(r"cuda|cublas|cudnn|nccl|device-side|gpu", re.IGNORECASE)


def _on_device(attempt: Callable[[str], T], out: Path, device: str, reason: str | None,
               what: str) -> tuple[T, dict[str, Any]]:
    """Run `attempt(device)`; when the GPU fails it, empty `out` and run it again on CPU."""
    try:
        return attempt(device), {"device": device, "fallback_reason": reason}
    except RuntimeError as e:
        if device != "cuda" or not CUDA_FAILURE.search(f"{type(e).__name__}: {e}"):
            raise
        failure = f"{what} on CUDA failed: {' '.join(str(e).split())}"
    # Retried out of the `except`: the failed attempt's tensors (held by its traceback) are freed.
    log.warning("%s; retrying on CPU", failure)
    for child in out.iterdir():
        shutil.rmtree(child) if child.is_dir() else child.unlink()
    _release_gpu_memory()
    try:
        return attempt("cpu"), {"device": "cpu", "fallback_reason": failure}
    except Exception as e:
        e.add_note(failure)
        raise


def _release_gpu_memory() -> None:
    import torch

    try:
        torch.cuda.empty_cache()
    except RuntimeError:  # the GPU that failed may refuse this too
        pass


def tokenizer_files(folder: Path) -> list[str]:
    """The non-weight, non-config files of a model folder: tokenizer, templates, processor."""
    return sorted(p.name for p in Path(folder).iterdir()
                  if p.is_file() and p.name not in MODEL_FILES
                  and not p.name.endswith(WEIGHT_SUFFIXES) and not p.name.startswith("."))


def copy_tokenizer(base: Path, out: Path) -> dict[str, str]:
    """Copy the base's tokenizer files into `out` and check they arrived identical."""
    names = tokenizer_files(base)
    if "tokenizer.json" not in names and "tokenizer.model" not in names:
        raise BakeryError(f"the base {base} has no tokenizer.json or tokenizer.model")
    hashes = {}
    for name in names:
        shutil.copyfile(base / name, out / name)
        hashes[name] = sha256_file(out / name)
        if hashes[name] != sha256_file(base / name):
            raise BakeryError(f"tokenizer file {name} differs from the base's after copying")
    return hashes
