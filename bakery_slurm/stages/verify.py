"""verify: nothing unverified is pushed.

The output must have exactly the base's tensor set (names and shapes, every tensor in the cell's
dtype), load with transformers with no missing, unexpected or mismatched keys, and carry the base's
tokenizer byte for byte.

The load runs in a child process (`ModelLoader`), started with the cell: importing transformers'
model code is 3-4 s of Python, which the child does on a core of its own while the cell fetches,
plans and merges, instead of after the merge (on a thread of the merging process it would hold
the GIL that the merge's workers take between their kernels, and slow them more than it saves).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from ..errors import BakeryError
from ..manifest import sha256_file
from ..repair import TensorSpec, tensor_set
from .bake import load_model
from .merge import tokenizer_files

log = logging.getLogger(__name__)
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


class ModelLoader:
    """Loads one checkpoint with transformers: in a child process that imports transformers'
    model code as soon as it starts, then waits to be told what to load; or here, where that code
    is imported already (a process that baked with PEFT or ran cells before), so that the child
    would only import it again.

    `load` may be called once; `close` ends the child whether or not it loaded anything (it also
    ends by itself when this process's end closes its input). `child` forces either way.
    """

    def __init__(self, child: bool | None = None):
        if child is None:
            child = "transformers.modeling_utils" not in sys.modules
        self.process = None
        if child:
            try:
                self.process = subprocess.Popen([sys.executable, "-m", __name__],
                                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                                text=True)
            except OSError as e:  # no memory or process slot left for it: load here instead
                log.warning("verify will load the model in this process: no child (%s)", e)

    def load(self, folder: Path, dtype: str) -> dict[str, Any]:
        """{"model_class": name, "problems": transformers' loading info, the empty parts left
        out}; raises BakeryError when transformers cannot load `folder` at all."""
        if self.process is None:
            loaded = load_report(folder, dtype)
        else:
            request = json.dumps({"folder": str(folder), "dtype": dtype}) + "\n"
            reply, _ = self.process.communicate(request)
            try:
                loaded = json.loads(reply.splitlines()[-1])
            except (IndexError, ValueError):
                raise BakeryError(f"{folder}: the process loading it with transformers exited "
                                  f"with status {self.process.returncode} and no answer (its "
                                  "error is in the log above)") from None
        if "error" in loaded:
            raise BakeryError(f"{folder}: transformers cannot load it: {loaded['error']}")
        return loaded

    def close(self) -> None:
        if self.process is not None and self.process.returncode is None:  # not waited for yet
            self.process.kill()
            self.process.communicate()


def load_report(folder: Path, dtype: str) -> dict[str, Any]:
    """What `ModelLoader.load` returns, or {"error": why transformers cannot load `folder`}."""
    try:
        import torch

        model, info = load_model(folder, getattr(torch, dtype), output_loading_info=True)
    except Exception as e:  # noqa: BLE001 - reported by load, which names the folder
        return {"error": f"{type(e).__name__}: {' '.join(str(e).split())}"}
    problems = {kind: keys for kind, keys in info.items() if keys}
    # As JSON values (sets as sorted lists), the same whichever process loaded the model.
    return {"model_class": type(model).__name__,
            "problems": json.loads(json.dumps(problems, default=sorted))}


def _serve() -> None:
    """The child of `ModelLoader`: import, wait for the request, load, answer on stdout."""
    answer = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # what the libraries print goes to the task's log, not into the answer
    try:
        # What every model class needs, ~3 s; the class itself (0.1-0.2 s) comes with the load.
        import transformers.modeling_utils  # noqa: F401
    except Exception:  # noqa: BLE001 - the load imports it again and reports what failed
        pass
    line = sys.stdin.readline()
    if not line:  # the cell failed before verify, or its output was verified already
        return
    request = json.loads(line)
    answer.write(json.dumps(load_report(Path(request["folder"]), request["dtype"])) + "\n")
    answer.flush()
    sys.stderr.flush()
    # No interpreter teardown (~1 s with torch, transformers and a model): the parent waits for it.
    os._exit(0)


def verify(folder: Path, base_folder: Path, base_tensors: dict[str, TensorSpec], dtype: str,
           loader: ModelLoader) -> dict[str, Any]:
    """Raise BakeryError on the first failed check; return what was checked. `loader` loads the
    output with transformers (the last check)."""
    problems = compare_tensor_sets(tensor_set(folder), base_tensors, dtype)
    if problems:
        shown = "; ".join(problems[:MAX_LISTED])
        more = f" (and {len(problems) - MAX_LISTED} more)" if len(problems) > MAX_LISTED else ""
        raise BakeryError(f"{folder}: tensor set differs from the base: {shown}{more}")
    for name in tokenizer_files(base_folder):
        if not (folder / name).is_file() or sha256_file(folder / name) != sha256_file(base_folder / name):
            raise BakeryError(f"{folder}: tokenizer file {name} is missing or differs from the base's")
    loaded = loader.load(folder, dtype)
    if loaded["problems"]:
        raise BakeryError(f"{folder}: transformers reports {loaded['problems']}")
    return {"tensors": len(base_tensors), "model_class": loaded["model_class"]}


if __name__ == "__main__":
    _serve()
