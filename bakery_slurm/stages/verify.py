"""verify: nothing unverified is pushed.

The output must have exactly the base's tensor set (names and shapes, every tensor in the cell's
dtype), load with transformers with no missing, unexpected or mismatched keys, and carry the base's
tokenizer byte for byte.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from ..errors import BakeryError
from ..manifest import sha256_file
from ..repair import TensorSpec, tensor_set
from .bake import load_model, model_class
from .merge import tokenizer_files

# torch dtype name -> safetensors header dtype
SAFETENSORS_DTYPE = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
MAX_LISTED = 10


def compare_tensor_sets(out: dict[str, TensorSpec], base: dict[str, TensorSpec],
                        dtype: str) -> list[str]:
    """Problems (empty when fine): missing/unexpected names, shape or dtype differences."""
    want = SAFETENSORS_DTYPE[dtype]
    problems = [f"missing {n}" for n in sorted(set(base) - set(out))]
    problems += [f"unexpected {n}" for n in sorted(set(out) - set(base))]
    for name in sorted(set(out) & set(base)):
        (got_dtype, got_shape), (_, base_shape) = out[name], base[name]
        if got_shape != base_shape:
            problems.append(f"{name}: shape {list(got_shape)}, base has {list(base_shape)}")
        if got_dtype != want:
            problems.append(f"{name}: dtype {got_dtype}, expected {want}")
    return problems


def import_model_code(folder: Path) -> threading.Thread:
    """Start importing, on a thread, the transformers class `verify` will load `folder` with.

    Importing transformers' model code is ~2 s of Python that verify would otherwise start with.
    Started once the merge has computed its output, it runs while the output is fsynced and
    hashed (disk waits and C code that release the GIL, on one core), so on a machine with two
    cores both take the time of the longer. The thread only imports: an import that fails there
    fails again, and is reported, when verify loads the model.
    """
    thread = threading.Thread(target=_import_quietly, args=(folder,), daemon=True,
                              name="bakery-import-model-code")
    thread.start()
    return thread


def _import_quietly(folder: Path) -> None:
    try:
        model_class(folder)
    except Exception:  # noqa: BLE001 - verify imports it again and reports what failed
        pass


def verify(folder: Path, base_folder: Path, base_tensors: dict[str, TensorSpec],
           dtype: str) -> dict[str, Any]:
    """Raise BakeryError on the first failed check; return what was checked."""
    problems = compare_tensor_sets(tensor_set(folder), base_tensors, dtype)
    if problems:
        shown = "; ".join(problems[:MAX_LISTED])
        more = f" (and {len(problems) - MAX_LISTED} more)" if len(problems) > MAX_LISTED else ""
        raise BakeryError(f"{folder}: tensor set differs from the base: {shown}{more}")
    for name in tokenizer_files(base_folder):
        if not (folder / name).is_file() or sha256_file(folder / name) != sha256_file(base_folder / name):
            raise BakeryError(f"{folder}: tokenizer file {name} is missing or differs from the base's")
    import torch

    model, info = load_model(folder, getattr(torch, dtype), output_loading_info=True)
    bad = {k: v for k, v in info.items() if v and k != "error_msgs"} | (
        {"error_msgs": info["error_msgs"]} if info.get("error_msgs") else {})
    if bad:
        raise BakeryError(f"{folder}: transformers reports {bad}")
    return {"tensors": len(base_tensors), "model_class": type(model).__name__}
