"""bake: PEFT merge_and_unload of one adapter into the base, saved as safetensors in the hub layout.

Baked checkpoints are content-addressed: the key hashes the base's and the adapter's identities
(commit or file hashes), the dtype and the library versions, so one (base, adapter) is baked once and
shared by every method and sweep point, and a retrained adapter is never served from a stale bake.
A lock per key makes concurrent tasks wait for one bake instead of racing; the folder appears by
rename only when complete, and its done-marker is written last.

The base itself is brought to the hub layout the same way (`prepare_base`), because mergekit reads
it for task vectors and the repair step needs the base's names in that layout.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .. import fsutil
from ..manifest import intact_marker, total_size, write_marker
from ..errors import BakeryError
from ..repair import TensorSpec, detect_kind, read_header, repair_checkpoint, tensor_set, to_hub_name
from ..sources import LocalModel
from ..versions import library_versions

log = logging.getLogger(__name__)


def _key(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def hub_layout_tensors(base: Path) -> dict[str, TensorSpec]:
    """The base's {name: (dtype, shape)} with names in the hub layout (text names unchanged)."""
    tensors = tensor_set(base)
    if detect_kind(tensors, _config(base)) == "text":
        return tensors
    return {to_hub_name(name): spec for name, spec in tensors.items()}


def prepare_base(base: LocalModel, cache: Path) -> tuple[Path, dict[str, TensorSpec], dict]:
    """The base in the hub layout: the folder itself when already so, else a cached repaired copy.

    Returns the folder, its tensors, and a record {"cached", "bytes_read", "bytes_written"}.
    """
    with naming_input(f"base {base.path}"):
        tensors = hub_layout_tensors(base.path)
    if tensors == tensor_set(base.path):
        return base.path, tensors, {"cached": True, "bytes_read": 0, "bytes_written": 0}
    out = cache / "bases" / _key({"base": base.identity})
    with fsutil.locked(out.with_name(out.name + ".lock")):
        if intact_marker(out) is not None:
            return out, tensors, {"cached": True, "bytes_read": 0, "bytes_written": 0}
        remove_leftovers(out)
        report = repair_checkpoint(base.path, out, tensors)
        write_marker(out, {"base": base.identity})
    return out, tensors, {"cached": False, "bytes_read": report.bytes_read,
                          "bytes_written": report.bytes_written}


@contextlib.contextmanager
def naming_input(what: str) -> Iterator[None]:
    """Add "`what`" as a note to any exception of the block, so the stage's error names the input
    (`pipeline` puts the notes in front of the message)."""
    try:
        yield
    except Exception as e:
        e.add_note(what)
        raise


def remove_leftovers(out: Path) -> None:
    """Remove what a task killed while writing `out` left beside it (``.<key>.*.partial`` and
    ``.raw`` folders, as big as a checkpoint). Call it holding `out`'s lock: no one else is
    writing them then."""
    for stale in out.parent.glob(f".{out.name}.*"):
        shutil.rmtree(stale, ignore_errors=True)


def check_adapter(folder: Path) -> None:
    """Read the adapter's config and every safetensors header, as PEFT is about to: a truncated or
    corrupt file is named here, rather than deep inside PEFT with no path."""
    config = folder / "adapter_config.json"
    try:
        json.loads(config.read_text())
    except (OSError, ValueError) as e:
        raise BakeryError(f"{config}: unreadable adapter config: {e}") from e
    for path in sorted(folder.glob("*.safetensors")):
        read_header(path)


def bake(base: LocalModel, adapter: LocalModel, dtype: str, base_tensors: dict[str, TensorSpec],
         cache: Path, name: str = "adapter") -> tuple[Path, dict[str, Any]]:
    """Bake `adapter` (called `name` in the matrix) into `base`, or reuse the cached bake; return
    the folder and a record. Any error carries a note naming the adapter and its folder."""
    with naming_input(f"adapter {name} ({adapter.path})"):
        return _bake(base, adapter, dtype, base_tensors, cache)


def _bake(base: LocalModel, adapter: LocalModel, dtype: str, base_tensors: dict[str, TensorSpec],
          cache: Path) -> tuple[Path, dict[str, Any]]:
    versions = {k: v for k, v in library_versions().items() if k != "mergekit"}
    key = _key({"base": base.identity, "adapter": adapter.identity, "dtype": dtype,
                "versions": versions})
    out = cache / "bakes" / key
    with fsutil.locked(out.with_name(out.name + ".lock")):
        marker = intact_marker(out)
        if marker is not None:
            log.info("bake %s: cached at %s", adapter.path, out)
            return out, {"cached": True, "key": key, "bytes_read": 0, "bytes_written": 0,
                         "content_sha256": marker["content_sha256"]}
        remove_leftovers(out)
        check_adapter(adapter.path)
        with tempfile.TemporaryDirectory(prefix=f".{key}.", suffix=".raw", dir=out.parent) as raw:
            # The modes of what is created in the bake cache (a group's, when setgid).
            mask = fsutil.creating_umask(out.parent)
            fsutil.usual_dir_mode(Path(raw), mask)  # removable by a teammate after a kill
            _merge_and_unload(base.path, adapter.path, dtype, Path(raw))
            # safetensors writes 0600; an unrenamed bake is linked into place below, and
            # staging_dir leaves the mode of a linked file alone: give it the usual one here.
            fsutil.usual_modes(Path(raw), mask)
            # save_pretrained writes whatever layout this transformers version uses: repair it.
            report = repair_checkpoint(Path(raw), out, base_tensors)
        marker = write_marker(out, {"base": base.identity, "adapter": adapter.identity,
                                    "dtype": dtype, "versions": versions})
    return out, {"cached": False, "key": key, "bytes_read": _input_bytes(base.path, adapter.path),
                 "bytes_written": total_size(marker["files"]),
                 "renamed": report.renamed, "content_sha256": marker["content_sha256"]}


def _merge_and_unload(base: Path, adapter: Path, dtype: str, out: Path) -> None:
    import torch
    from peft import PeftModel

    model = load_model(base, getattr(torch, dtype))
    # PEFT loads adapter weights onto CUDA whenever it is available (peft.utils.infer_device): on a
    # node whose GPU is busy or broken, that alone failed the bake. Baking is CPU work.
    model = PeftModel.from_pretrained(model, str(adapter), torch_device="cpu").merge_and_unload()
    model.save_pretrained(out, safe_serialization=True, max_shard_size="5GB")


def load_model(folder: Path, torch_dtype: Any, **kwargs: Any) -> Any:
    """Load a checkpoint with the class its config names, on CPU."""
    return model_class(folder).from_pretrained(folder, dtype=torch_dtype, **kwargs)


def model_class(folder: Path) -> Any:
    """The transformers class `folder`'s config names (Gemma3ForCausalLM or
    Gemma3ForConditionalGeneration; AutoModelForCausalLM when it names none), its code imported."""
    import transformers

    architecture = (_config(folder) or {}).get("architectures", ["AutoModelForCausalLM"])[0]
    return getattr(transformers, architecture, transformers.AutoModelForCausalLM)


def _config(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return None


def _input_bytes(*folders: Path) -> int:
    """Bytes of the weights read by a bake (the base's and the adapter's safetensors)."""
    return sum(p.stat().st_size for folder in folders for p in Path(folder).iterdir()
               if p.is_file() and p.suffix == ".safetensors")
