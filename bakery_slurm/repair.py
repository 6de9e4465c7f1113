"""Bring Gemma 3 checkpoints to the hub tensor-name layout (the seed's "strip the leading model.").

Gemma3ForConditionalGeneration checkpoints name their tensors differently depending on the
transformers version that saved them; mergekit's gemma3vl definition and vLLM expect the hub layout
(`language_model.model.*`, `vision_tower.vision_model.*`, `multi_modal_projector.*`).
Gemma3ForCausalLM (1B) always saves `model.*`, and that `model.` is legitimate.

The pure core (`to_hub_name`, `detect_kind`, `plan_renames`) decides every rename and refuses any
result that is not a bijection with the base's tensors (same dtype and shape), so a rename can never
drop, duplicate or misplace a tensor. The shell rewrites safetensors headers only: offsets are kept
and the data section is streamed verbatim, so a 24 GB checkpoint costs one sequential copy and no
tensor is ever decoded.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, NamedTuple

from bakery_slurm import fsutil
from bakery_slurm.errors import RepairError

log = logging.getLogger(__name__)

Kind = Literal["text", "multimodal"]
#: (safetensors dtype such as "BF16", shape)
TensorSpec = tuple[str, tuple[int, ...]]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
METADATA_KEY = "__metadata__"
# safetensors refuses headers above 100 MB; a larger length means we are not reading a header.
MAX_HEADER_BYTES = 100_000_000
COPY_CHUNK_BYTES = 16 * 1024 * 1024
# Enough names to see the pattern of a failure without flooding a log.
MAX_LISTED = 10

_TEXT_ARCHITECTURES = {"Gemma3ForCausalLM"}
_MULTIMODAL_ARCHITECTURES = {"Gemma3ForConditionalGeneration"}
_TEXT_MODEL_TYPES = {"gemma3_text"}
_MULTIMODAL_MODEL_TYPES = {"gemma3"}
_MULTIMODAL_ROOTS = ("language_model", "vision_tower", "multi_modal_projector")


class TensorLocation(NamedTuple):
    """Where a tensor lives in a checkpoint folder."""

    dtype: str
    shape: tuple[int, ...]
    file: str


@dataclass(frozen=True)
class RepairReport:
    """What `repair_checkpoint` did.

    Attributes
    ----------
    kind : {"text", "multimodal"}
        The detected model kind.
    renamed : int
        Number of tensors whose name changed.
    identity : bool
        True when no name changed and every model file was hardlinked (or copied) as is.
    bytes_read, bytes_written : int
        Bytes streamed through copies and rewrites; hardlinked files count zero.
    files_linked : int
        Files hardlinked from the source instead of copied.
    """

    kind: Kind
    renamed: int
    identity: bool
    bytes_read: int
    bytes_written: int
    files_linked: int


# --------------------------------------------------------------------------------------------------
# Pure core
# --------------------------------------------------------------------------------------------------


def to_hub_name(name: str) -> str:
    """Map one Gemma3ForConditionalGeneration tensor name to the hub layout.

    Recognised layouts: the hub layout itself (returned unchanged); transformers 4.52.0-4.52.3
    (`model.language_model.*`, `model.vision_tower.vision_model.*`, `model.multi_modal_projector.*`,
    top-level `lm_head.*`); 5.4.0-5.5.4 (`model.language_model.model.*`); and models built from a
    config in 5.x (`vision_tower.*` without `vision_model.`).

    Parameters
    ----------
    name : str
        A tensor name of a multimodal checkpoint. Never call this for Gemma3ForCausalLM names:
        their leading `model.` is legitimate.

    Returns
    -------
    str
        The hub-layout name, or `name` unchanged when it fits no known layout (so that
        `plan_renames` reports it as unexpected instead of guessing).
    """
    wrapped = name.startswith("model.")
    rest = name[len("model.") :] if wrapped else name
    root, _, tail = rest.partition(".")
    if not tail:
        return name
    if root == "lm_head" and not wrapped:
        return f"language_model.{rest}"
    if root == "language_model":
        # Gemma3TextModel has no child named `model` or `lm_head`, so these prefixes tell a
        # ForCausalLM-shaped subtree (hub, 5.4) from a bare text model (4.52.0-4.52.3).
        if tail.startswith(("model.", "lm_head.")):
            return rest
        return f"language_model.model.{tail}"
    if root == "vision_tower":
        # SiglipVisionTransformer has no child named `vision_model`, so the test is unambiguous.
        if tail.startswith("vision_model."):
            return rest
        return f"vision_tower.vision_model.{tail}"
    if root == "multi_modal_projector":
        return rest
    return name


def detect_kind(names: Iterable[str], config: Mapping[str, Any] | None = None) -> Kind:
    """Tell a Gemma3ForCausalLM checkpoint from a Gemma3ForConditionalGeneration one.

    Parameters
    ----------
    names : iterable of str
        The checkpoint's tensor names; used only when `config` does not decide.
    config : mapping, optional
        The checkpoint's config.json. `architectures` is consulted first, then `model_type`.

    Returns
    -------
    {"text", "multimodal"}

    Raises
    ------
    RepairError
        The config names an architecture or model type that is not Gemma 3.
    """
    if config:
        architectures = set(config.get("architectures") or ())
        if architectures & _MULTIMODAL_ARCHITECTURES:
            return "multimodal"
        if architectures & _TEXT_ARCHITECTURES:
            return "text"
        model_type = config.get("model_type")
        if model_type in _MULTIMODAL_MODEL_TYPES:
            return "multimodal"
        if model_type in _TEXT_MODEL_TYPES:
            return "text"
        if architectures or model_type:
            raise RepairError(
                f"not a Gemma 3 config: architectures={sorted(architectures)}, model_type={model_type!r}"
            )
    for name in names:
        rest = name[len("model.") :] if name.startswith("model.") else name
        if rest.partition(".")[0] in _MULTIMODAL_ROOTS:
            return "multimodal"
    return "text"


def plan_renames(
    tensors: Mapping[str, TensorSpec], base: Mapping[str, TensorSpec], kind: Kind
) -> dict[str, str]:
    """Decide the new name of every tensor, and prove the result matches the base.

    Parameters
    ----------
    tensors : mapping of str to (dtype, shape)
        The checkpoint to repair.
    base : mapping of str to (dtype, shape)
        The base model's tensors, already in the hub layout.
    kind : {"text", "multimodal"}
        From `detect_kind`. Text names are never renamed.

    Returns
    -------
    dict of str to str
        Old name to new name for every tensor in `tensors` (identity entries included).

    Raises
    ------
    RepairError
        The base is not in the hub layout, or the renamed names are not a bijection with the
        base's names with equal dtypes and shapes. The message lists up to ten missing, unexpected,
        colliding and mismatched tensors.
    """
    if kind not in ("text", "multimodal"):
        raise ValueError(f"kind must be 'text' or 'multimodal', not {kind!r}")
    if kind == "multimodal":
        off_layout = sorted(n for n in base if to_hub_name(n) != n)
        if off_layout:
            raise RepairError(f"the base is not in the hub layout: {_listing(off_layout)}")
        plan = {old: to_hub_name(old) for old in tensors}
    else:
        plan = {old: old for old in tensors}

    sources: dict[str, list[str]] = {}
    for old, new in plan.items():
        sources.setdefault(new, []).append(old)

    def shown(old: str) -> str:
        return old if plan[old] == old else f"{old} (as {plan[old]})"

    missing = sorted(set(base) - set(sources))
    unexpected = sorted(shown(old) for old, new in plan.items() if new not in base)
    colliding = [
        f"{' and '.join(sorted(olds))} -> {new}" for new, olds in sorted(sources.items()) if len(olds) > 1
    ]
    mismatched = []
    for new, olds in sorted(sources.items()):
        if new in base and len(olds) == 1:
            got, want = _spec(tensors[olds[0]]), _spec(base[new])
            if got != want:
                mismatched.append(f"{shown(olds[0])}: {_format_spec(got)}, base has {_format_spec(want)}")

    problems = [
        f"{label} {_listing(items)}"
        for label, items in (
            ("missing from the checkpoint:", missing),
            ("not in the base:", unexpected),
            ("colliding:", colliding),
            ("dtype or shape differs:", mismatched),
        )
        if items
    ]
    if problems:
        raise RepairError(
            f"{kind} checkpoint ({len(tensors)} tensors) does not match the base ({len(base)} tensors) "
            f"after renaming to the hub layout; " + "; ".join(problems)
        )
    return plan


def _spec(spec: TensorSpec) -> TensorSpec:
    # Shapes arrive as JSON lists from headers and as tuples from callers; compare them as tuples.
    dtype, shape = spec[0], spec[1]
    return dtype, tuple(shape)


def _format_spec(spec: TensorSpec) -> str:
    return f"{spec[0]} {list(spec[1])}"


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:MAX_LISTED])
    more = len(items) - MAX_LISTED
    return f"{shown} (and {more} more)" if more > 0 else shown


# --------------------------------------------------------------------------------------------------
# Shell: safetensors headers, checkpoint folders, the repair itself
# --------------------------------------------------------------------------------------------------


def read_header(path: Path) -> dict[str, Any]:
    """Read and validate the JSON header of one safetensors file.

    Parameters
    ----------
    path : Path
        A `.safetensors` file: an 8-byte little-endian header length, the JSON header (tensor
        name to dtype, shape, data_offsets; optional `__metadata__`), then the data section.

    Returns
    -------
    dict
        The parsed header.

    Raises
    ------
    RepairError
        The file is too short, the header is not a JSON object of well-formed entries, a key is
        repeated, or the data section does not have exactly the length the header describes (a
        truncated or half-written file).
    """
    return read_header_and_offset(path)[0]


def read_header_and_offset(path: Path) -> tuple[dict[str, Any], int]:
    """`read_header`, plus the byte offset in the file where the data section starts (tensor
    `data_offsets` count from there)."""
    with open(path, "rb") as f:
        return _read_header(f, Path(path))


def _read_header(f: Any, path: Path) -> tuple[dict[str, Any], int]:
    """Parse the header from an open file; return it and the offset where the data section starts."""
    size = os.fstat(f.fileno()).st_size
    prefix = f.read(8)
    if len(prefix) < 8:
        raise RepairError(f"{path}: not a safetensors file (only {size} bytes)")
    (length,) = struct.unpack("<Q", prefix)
    if length > MAX_HEADER_BYTES or 8 + length > size:
        raise RepairError(f"{path}: header length {length} does not fit a {size}-byte file")
    try:
        header = json.loads(f.read(length), object_pairs_hook=_refuse_duplicate_keys)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise RepairError(f"{path}: unreadable safetensors header: {e}") from e
    if not isinstance(header, dict):
        raise RepairError(f"{path}: safetensors header is not a JSON object")
    data_end = 0
    for name, entry in header.items():
        if name == METADATA_KEY:
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            well_formed = isinstance(dtype, str) and isinstance(shape, list) and 0 <= begin <= end
        except (TypeError, KeyError, ValueError):
            well_formed = False
        if not well_formed:
            raise RepairError(f"{path}: malformed header entry for {name}: {entry!r}")
        data_end = max(data_end, end)
    data_length = size - 8 - length
    if data_length != data_end:
        raise RepairError(
            f"{path}: data section is {data_length} bytes but the header describes {data_end} "
            f"(truncated or corrupt file)"
        )
    return header, 8 + length


def encode_header(header: Mapping[str, Any]) -> bytes:
    """A safetensors header as written to the file: its 8-byte little-endian length, then the JSON,
    padded with spaces (as the spec allows) so the data section starts 8-byte aligned."""
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads keeps the last of two equal keys; a repeated tensor name means a corrupt file.
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"key {key!r} appears twice")
        result[key] = value
    return result


def _model_files(folder: Path) -> tuple[list[str], dict[str, Any] | None]:
    """Return the shard file names of a checkpoint folder and its parsed index (None if single-file).

    Any other `.safetensors` file is refused: a leftover shard from an earlier run would otherwise be
    copied and published beside the real ones.
    """
    present = sorted(p.name for p in folder.glob("*.safetensors") if p.is_file())
    index_path = folder / INDEX_FILE
    if not index_path.exists():
        if present == [SINGLE_FILE]:
            return present, None
        if not present:
            raise RepairError(f"{folder}: neither {SINGLE_FILE} nor {INDEX_FILE}")
        raise RepairError(f"{folder}: safetensors files without {INDEX_FILE}: {_listing(present)}")
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise RepairError(f"{index_path}: unreadable index: {e}") from e
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise RepairError(f"{index_path}: no weight_map of tensor name to file name")
    shards = sorted(set(weight_map.values()))
    # A weight_map entry such as "../x.safetensors" must not make us read outside the folder.
    bad = [s for s in shards if Path(s).name != s or not (folder / s).is_file()]
    if bad:
        raise RepairError(f"{index_path}: shards missing or outside the folder: {_listing(bad)}")
    stray = sorted(set(present) - set(shards))
    if stray:
        raise RepairError(f"{folder}: safetensors files not in {INDEX_FILE}: {_listing(stray)}")
    return shards, index


def checkpoint_tensors(folder: Path) -> dict[str, TensorLocation]:
    """List every tensor of a checkpoint folder from its safetensors headers.

    Parameters
    ----------
    folder : Path
        Holds either a single `model.safetensors`, or shards listed in `model.safetensors.index.json`.

    Returns
    -------
    dict of str to TensorLocation

    Raises
    ------
    RepairError
        A header is unreadable, a tensor appears in two shards, or the index's weight_map disagrees
        with the shards' headers.
    """
    return _scan(Path(folder))[2]


def _scan(folder: Path) -> tuple[list[str], dict[str, Any] | None, dict[str, TensorLocation]]:
    """Return the shard names, the parsed index (None if single-file) and the tensors of a folder."""
    shards, index = _model_files(folder)
    tensors: dict[str, TensorLocation] = {}
    for shard in shards:
        for name, entry in read_header(folder / shard).items():
            if name == METADATA_KEY:
                continue
            if name in tensors:
                raise RepairError(f"{folder}: tensor {name} is in both {tensors[name].file} and {shard}")
            tensors[name] = TensorLocation(entry["dtype"], tuple(entry["shape"]), shard)
    if index is not None:
        weight_map = index["weight_map"]
        wrong = []
        for name in sorted(set(weight_map) | set(tensors)):
            actual = tensors[name].file if name in tensors else None
            if weight_map.get(name) != actual:
                wrong.append(f"{name} (index: {weight_map.get(name)}, shards: {actual})")
        if wrong:
            raise RepairError(f"{folder / INDEX_FILE} disagrees with the shards: {_listing(wrong)}")
    return shards, index, tensors


def tensor_set(folder: Path) -> dict[str, TensorSpec]:
    """Return {name: (dtype, shape)} of a checkpoint folder, for comparison with a base."""
    return {name: (loc.dtype, loc.shape) for name, loc in checkpoint_tensors(folder).items()}


def repair_checkpoint(src: Path, dst: Path, base_tensors: Mapping[str, TensorSpec]) -> RepairReport:
    """Write a copy of `src` at `dst` with tensor names in the hub layout.

    Every file other than the model's safetensors and index (config.json, tokenizer files, ...) is
    hardlinked, or copied where linking fails. Safetensors files get a new header (keys renamed,
    offsets unchanged, padded with spaces to a multiple of 8) followed by the old data section
    streamed verbatim; the index's weight_map keys are renamed. When no name changes, model files
    are hardlinked as well. `dst` is built in a staging directory and renamed into place, so it is
    either absent or complete; an existing `dst` is replaced.

    Parameters
    ----------
    src : Path
        The checkpoint folder to repair; never modified.
    dst : Path
        The folder to write; must not be `src`, nor inside it, nor contain it.
    base_tensors : mapping of str to (dtype, shape)
        The base model's tensors in the hub layout, e.g. `tensor_set(base_folder)`.

    Returns
    -------
    RepairReport

    Raises
    ------
    RepairError
        `src` is unreadable, or its names cannot be brought to a bijection with `base_tensors`
        (see `plan_renames`). `dst` is then left untouched.

    Note
    ----
    Hardlinked files share their inode with `src`: replace them by renaming, never edit in place.
    """
    src, dst = Path(src), Path(dst)
    src_real, dst_real = src.resolve(), dst.resolve()
    if dst_real == src_real or src_real in dst_real.parents or dst_real in src_real.parents:
        raise RepairError(f"repair destination {dst} overlaps its source {src}")

    shards, index, tensors = _scan(src)
    kind = detect_kind(tensors, read_config(src))
    plan = plan_renames({n: (t.dtype, t.shape) for n, t in tensors.items()}, base_tensors, kind)
    renamed = sum(old != new for old, new in plan.items())
    identity = renamed == 0
    model_files = set(shards) | ({INDEX_FILE} if index is not None else set())
    tally = _Tally()

    with fsutil.staging_dir(dst) as tmp:
        for entry in sorted(src.iterdir()):
            if entry.name not in model_files or identity:
                _link_or_copy(entry, tmp / entry.name, tally)
        if not identity:
            for shard in shards:
                _rewrite_shard(src / shard, tmp / shard, plan, tally)
            if index is not None:
                renamed_index = dict(index, weight_map={plan[k]: v for k, v in index["weight_map"].items()})
                fsutil.atomic_write_json(tmp / INDEX_FILE, renamed_index)
                tally.written += (tmp / INDEX_FILE).stat().st_size

    report = RepairReport(kind, renamed, identity, tally.read, tally.written, tally.linked)
    log.info(
        "repaired %s -> %s: %s, %d of %d tensors renamed, %d bytes written",
        src, dst, kind, renamed, len(plan), tally.written,
    )
    return report


@dataclass
class _Tally:
    read: int = 0
    written: int = 0
    linked: int = 0


def read_config(folder: Path) -> dict[str, Any] | None:
    """A checkpoint folder's config.json, or None when it has none."""
    path = folder / "config.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise RepairError(f"{path}: unreadable config: {e}") from e


def _link_or_copy(src: Path, dst: Path, tally: _Tally) -> None:
    """Hardlink `src` (a file, or a directory recursively) to `dst`; copy where linking fails."""
    if src.is_dir():
        dst.mkdir()
        for entry in sorted(src.iterdir()):
            _link_or_copy(entry, dst / entry.name, tally)
        return
    if fsutil.link_or_copy(src, dst):
        tally.linked += 1
    else:
        size = dst.stat().st_size
        tally.read += size
        tally.written += size


def _rewrite_shard(src: Path, dst: Path, plan: Mapping[str, str], tally: _Tally) -> None:
    """Copy one safetensors file with its tensors renamed by `plan`, streaming the data section."""
    with open(src, "rb") as fin:
        header, data_start = _read_header(fin, src)
        renamed = {(k if k == METADATA_KEY else plan[k]): v for k, v in header.items()}
        raw = encode_header(renamed)
        data_length = os.fstat(fin.fileno()).st_size - data_start
        with open(dst, "xb") as fout:
            fout.write(raw)
            fin.seek(data_start)
            shutil.copyfileobj(fin, fout, COPY_CHUNK_BYTES)
            if fout.tell() != len(raw) + data_length:
                raise RepairError(f"{src}: changed while it was being copied")
            fout.flush()
            os.fsync(fout.fileno())
    tally.read += data_start + data_length
    tally.written += len(raw) + data_length
