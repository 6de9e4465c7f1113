"""A LoRA adapter as factors per base tensor, and the baked tensor exactly as PEFT computes it.

PEFT's `merge_and_unload` (peft 0.18-0.21, `lora.Linear.merge` / `get_delta_weight`) does, for each
adapted linear layer on CPU: the adapter's A and B are fp32 (PEFT upcasts bf16/fp16 adapter weights
when it loads them, and an fp32 file stays fp32), `delta = (B @ A) * scaling` in fp32 with
`scaling = lora_alpha / r` (`lora_alpha / sqrt(r)` with rsLoRA), and `weight += delta` in place on
the base weight in the model's dtype: one rounding. `baked_tensor` does exactly these operations.
Each module's r and lora_alpha are the config's, or those of its `rank_pattern` / `alpha_pattern`
entry (`module_scaling`); a setting the file lacks is LoraConfig's default, as PEFT reads it.

Anything else an adapter may carry changes what PEFT does (DoRA's magnitude vectors, lora_bias,
modules_to_save, embedding or convolution LoRA, an init that PEFT runs again on load and that
replaces the base weight by a residual: PiSSA, OLoRA, ...). PEFT also loads only the factors of
the modules adapter_config.json selects (`selects`), and ignores the rest of the file; a selected
module without saved factors keeps its init, which is random with init_lora_weights = False.
`read_adapter` refuses such an adapter with the reason, and the cell falls back to PEFT and
mergekit (recorded in its result), never to a silently different result; so it does an adapter
PEFT refuses to load, and the cell then fails with PEFT's error.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
A_SUFFIX, B_SUFFIX = ".lora_A.weight", ".lora_B.weight"

# adapter_config.json keys that do not change the merged weights: metadata and training-time
# settings (dropout).
NEUTRAL_KEYS = frozenset({
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path",
    "revision", "inference_mode", "lora_dropout", "megatron_core",
    "loftq_config", "eva_config", "corda_config", "lora_ga_config", "runtime_config",
    "qalora_group_size", "ensure_weight_tying",
})
# Keys the engine reads itself: the scaling, and the module selection (PEFT creates LoRA layers
# only for the modules it selects and ignores saved factors of any other; see `selects`).
HANDLED_KEYS = frozenset({"r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern",
                          "target_modules", "exclude_modules", "layers_to_transform",
                          "layers_pattern", "init_lora_weights"})
# init_lora_weights values whose init PEFT's from_pretrained runs again without touching the base
# weight (pissa, olora, corda, loftq, orthogonal, ... replace it by a residual).
PLAIN_INITS = (True, False, "gaussian", "eva")
# `installed_lora_defaults()` of the pinned PEFT, and that version (see `lora_defaults`).
LORA_DEFAULTS = Path(__file__).with_name("peft_lora_defaults.json")
# `baked_tensor` scales, adds and rounds this many elements at a time (1 MB of fp32).
BAKE_BLOCK_ELEMENTS = 1 << 18


class Unsupported(Exception):
    """The adapter uses something the engine does not compute exactly; the message says what."""


@dataclass(frozen=True)
class Factors:
    """One adapted base tensor: where its A and B are in the adapter file, and the scaling."""

    a_key: str
    b_key: str
    scaling: float


def unsupported_setting(config: Mapping[str, Any], defaults: Mapping[str, Any]) -> str | None:
    """The first adapter_config.json setting that would make PEFT do more than plain LoRA (or
    fail), or None.

    Parameters
    ----------
    config:
        The adapter's adapter_config.json, with PEFT's defaults for the settings it lacks (r and
        lora_alpha must be positive integer and number, the rank and alpha patterns usable).
    defaults:
        PEFT's `LoraConfig()` defaults, as JSON values: any other key must hold its default (or be
        absent), so a setting a newer PEFT adds is refused until someone checks what it does.
    """
    if config.get("peft_type", "LORA") != "LORA":
        return f"peft_type {config.get('peft_type')!r} is not LORA"
    init = config.get("init_lora_weights", True)
    if not any(init is plain or (isinstance(init, str) and init.lower() == plain)
               for plain in PLAIN_INITS):
        return f"init_lora_weights = {init!r} (PEFT re-initialises the base weight on load)"
    if not isinstance(config.get("target_modules"), (str, list)):
        return f"target_modules = {config.get('target_modules')!r} (PEFT picks the model type's defaults)"
    reason = _refused_selection(config) or _unusable_rank_or_alpha(config)
    if reason:
        return reason
    for key in sorted(config):
        if key in NEUTRAL_KEYS or key in HANDLED_KEYS:
            continue
        value = config[key]
        if key not in defaults:
            if value in (None, False, {}, [], ""):
                continue
            return f"{key} = {value!r} (a setting this engine does not know)"
        if value != defaults[key] and not (value in (None, {}, []) and defaults[key] in (None, {}, [])):
            return f"{key} = {value!r} (PEFT default {defaults[key]!r})"
    return None


def _refused_selection(config: Mapping[str, Any]) -> str | None:
    """The first module selection setting LoraConfig refuses (peft 0.21.2's `__post_init__`), or
    None: `selects` would compute a selection for an adapter PEFT does not load at all."""
    if isinstance(config.get("target_modules"), str):
        for key in ("layers_to_transform", "layers_pattern"):
            if config.get(key) is not None:
                return f"{key} = {config[key]!r} with a regex target_modules (PEFT refuses it)"
    if config.get("layers_pattern") and config.get("layers_to_transform") is None:
        return (f"layers_pattern = {config['layers_pattern']!r} without layers_to_transform "
                f"(PEFT refuses it)")
    return None


def _unusable_rank_or_alpha(config: Mapping[str, Any]) -> str | None:
    """The first r, lora_alpha, rank_pattern or alpha_pattern setting PEFT may fail on, or None.

    PEFT calls `.keys()` on each pattern (a JSON null included), matches every key as a regex,
    and builds a layer of a rank that must be a positive integer. A value in a pattern entry no
    module matches is never used by PEFT: refusing it too only costs the fallback's time.
    """
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(key, {}), dict):
            return f"{key} = {config[key]!r} is not a mapping (PEFT fails on it)"
        for pattern in config.get(key, {}):
            try:
                re.compile(pattern)
            except re.error as e:
                return f"{key} key {pattern!r} is not a regular expression ({e}; PEFT fails on it)"
    ranks = {"r": config.get("r"),
             **{f"rank_pattern[{k!r}]": v for k, v in config.get("rank_pattern", {}).items()}}
    alphas = {"lora_alpha": config.get("lora_alpha"),
              **{f"alpha_pattern[{k!r}]": v for k, v in config.get("alpha_pattern", {}).items()}}
    for name, r in ranks.items():
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            return f"{name} = {r!r} is not a positive integer (a LoRA rank)"
    for name, alpha in alphas.items():
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            return f"{name} = {alpha!r} is not a number"
    return None


def pattern_key(patterns: Mapping[str, Any], module: str) -> str:
    """The key of a rank_pattern or alpha_pattern whose value PEFT gives `module`, or `module`.

    The first key (in the file's order) that, as a regex, matches the end of the module's name
    from its start or from just after a dot: `q_proj`, `layers.0.self_attn.q_proj`,
    `model.layers.0.self_attn.q_proj`, `layers\\.[01]\\..*` all match
    `model.layers.0.self_attn.q_proj`; `proj` does not. This mirrors peft 0.21.2's
    `peft.utils.other.get_pattern_key` (a unit test holds it to that function), which importing
    would cost seconds per cell (peft imports transformers).
    """
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return module


def module_scaling(config: Mapping[str, Any], module: str) -> tuple[int, float]:
    """The rank PEFT gives `module`'s LoRA layer, and the scaling merge_and_unload applies.

    As peft 0.21.2's `LoraModel._create_and_replace` and `LoraLayer.update_layer`: r and
    lora_alpha of the module's `pattern_key` entry in rank_pattern / alpha_pattern (each looked
    up alone), else the config's; `lora_alpha / r`, or `lora_alpha / sqrt(r)` with rsLoRA.

    Parameters
    ----------
    config:
        adapter_config.json (already checked by `unsupported_setting`), with PEFT's defaults for
        the settings it lacks.
    module:
        The module's name in the model, as PEFT sees it (`model.layers.0.self_attn.q_proj`).
    """
    ranks, alphas = config.get("rank_pattern", {}), config.get("alpha_pattern", {})
    r = ranks.get(pattern_key(ranks, module), config["r"])
    alpha = alphas.get(pattern_key(alphas, module), config["lora_alpha"])
    return r, alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def selects(config: Mapping[str, Any], module: str) -> bool:
    """Whether PEFT (`check_target_module_exists`, and "all-linear" without the output layer)
    creates a LoRA layer for `module` (a name of the model's module, as PEFT sees it)."""
    exclude = config.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, module):
                return False
        elif module in exclude or any(module.endswith(f".{key}") for key in exclude):
            return False
    targets = config.get("target_modules")
    if isinstance(targets, str):
        if targets.lower() == "all-linear":
            return module.rpartition(".")[2] != "lm_head"
        return re.fullmatch(targets, module) is not None
    if module in targets:
        return True
    if not any(module.endswith(f".{key}") for key in targets):
        return False
    layers = config.get("layers_to_transform")
    if layers is None or (isinstance(layers, list) and not layers):
        return True
    patterns = config.get("layers_pattern")
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
    else:
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", module)
            if match is not None:
                break
    if not match:
        return False
    index = int(match.group("idx"))
    return index == layers if isinstance(layers, int) else index in layers


def plan_factors(config: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]],
                 base: Mapping[str, tuple[int, ...]], to_base_name: Callable[[str], str],
                 to_model_module: Callable[[str], str] = lambda module: module,
                 model_modules: Mapping[str, str] | None = None) -> dict[str, Factors]:
    """Map every LoRA pair of an adapter to the base tensor it changes.

    Parameters
    ----------
    config:
        adapter_config.json (already checked by `unsupported_setting`), with PEFT's defaults for
        the settings it lacks.
    shapes:
        The adapter file's {key: shape}.
    base:
        The base's {name: shape}, names in the layout `to_base_name` produces.
    to_base_name:
        Maps a module's weight name as PEFT saw it (`model.layers.0.mlp.up_proj.weight`) to the base's.
    model_modules:
        {module of the model, as PEFT names it: the base tensor that is its weight}: a factor
        pair is baked only into a module of the model (a key whose module maps to a base tensor
        of another module's name is loaded nowhere by PEFT), and, with init_lora_weights = False,
        see below; None skips both checks.

    Raises
    ------
    Unsupported
        A key that is not a plain linear LoRA factor, an A without its B, a rank other than the
        one the config gives the module (PEFT refuses such factors: a size mismatch), or a target
        that is not a 2-D base tensor of the product's shape; with
        init_lora_weights = False, a module the config selects (a 2-D weight) without saved
        factors: PEFT initialises A and B at random and bakes that noise in (with the other
        inits B starts at zero, and such a module is baked unchanged).
    """
    modules: dict[str, dict[str, str]] = {}
    for key in shapes:
        for suffix, part in ((A_SUFFIX, "A"), (B_SUFFIX, "B")):
            if key.startswith(KEY_PREFIX) and key.endswith(suffix):
                modules.setdefault(key[len(KEY_PREFIX):-len(suffix)], {})[part] = key
                break
        else:
            raise Unsupported(f"adapter tensor {key} is not a linear LoRA factor")
    plan: dict[str, Factors] = {}
    for module, parts in sorted(modules.items()):
        if set(parts) != {"A", "B"}:
            raise Unsupported(f"{module}: lora_A and lora_B must both be present")
        model_module = to_model_module(module)
        if not selects(config, model_module):
            raise Unsupported(f"{module}: saved, but adapter_config.json does not select "
                              f"{model_module} (PEFT would not load it)")
        r, scaling = module_scaling(config, model_module)
        a_shape, b_shape = tuple(shapes[parts["A"]]), tuple(shapes[parts["B"]])
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != r or b_shape[1] != r:
            raise Unsupported(f"{module}: factor shapes {a_shape} and {b_shape} are not rank-{r} linear")
        target = to_base_name(model_module + ".weight")
        if tuple(base.get(target, ())) != (b_shape[0], a_shape[1]):
            raise Unsupported(f"{module}: no base tensor {target} of shape {(b_shape[0], a_shape[1])}")
        if model_modules is not None and model_modules.get(model_module) != target:
            raise Unsupported(f"adapter module {module}: a key layout PEFT does not load into this "
                              f"model (it has no module {model_module})")
        if target in plan:
            raise Unsupported(f"{module}: a second LoRA pair for {target}")
        plan[target] = Factors(parts["A"], parts["B"], scaling)
    if config.get("init_lora_weights", True) is False:
        for module, target in sorted((model_modules or {}).items()):
            if target not in plan and len(base.get(target, ())) == 2 and selects(config, module):
                raise Unsupported(f"{module}: selected, but no saved factors (with init_lora_weights"
                                  f" = False PEFT bakes in its random initialisation)")
    return plan


def read_adapter(folder: Path, base: Mapping[str, tuple[int, ...]],
                 to_base_name: Callable[[str], str],
                 to_model_module: Callable[[str], str] = lambda module: module,
                 model_modules: Mapping[str, str] | None = None) -> dict[str, Factors]:
    """Read an adapter folder's config and file header; return its factors per base tensor.

    Raises
    ------
    Unsupported
        See `unsupported_setting` and `plan_factors`; also a folder without the two PEFT files.
    """
    from ..repair import read_header

    try:
        config = json.loads((Path(folder) / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise Unsupported(f"{folder}: no readable {ADAPTER_CONFIG} ({e})") from None
    weights = Path(folder) / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise Unsupported(f"{folder}: no {ADAPTER_WEIGHTS}")
    # PEFT's from_pretrained builds a LoraConfig from the file: a setting it lacks is the default.
    defaults = lora_defaults()
    config = {**defaults, **config}
    reason = unsupported_setting(config, defaults)
    if reason:
        raise Unsupported(f"{folder}: {reason}")
    shapes = {k: tuple(v["shape"]) for k, v in read_header(weights).items() if k != "__metadata__"}
    return plan_factors(config, shapes, base, to_base_name, to_model_module, model_modules)


def lora_defaults() -> dict[str, Any]:
    """PEFT's `LoraConfig()` defaults, as JSON values, for the installed PEFT.

    Importing peft takes ~4 s (it imports transformers and torch.distributed), most of a small
    cell's planning: the defaults of the PEFT version constraints.txt pins are kept in
    `LORA_DEFAULTS` (a test holds them against that PEFT), and any other version is asked.
    """
    from importlib.metadata import version

    recorded = json.loads(LORA_DEFAULTS.read_text())
    if recorded["peft_version"] == version("peft"):
        return recorded["defaults"]
    return installed_lora_defaults()


def installed_lora_defaults() -> dict[str, Any]:
    """`LoraConfig()`'s fields and defaults, read from the installed peft."""
    import dataclasses

    from peft import LoraConfig

    defaults = LoraConfig()
    return {f.name: _json_value(getattr(defaults, f.name)) for f in dataclasses.fields(defaults)}


def _json_value(value: Any) -> Any:
    """A LoraConfig default as it reads back from adapter_config.json (enums as their values)."""
    value = getattr(value, "value", value)
    return json.loads(json.dumps(value, default=lambda v: None))


def baked_tensor(base: Any, a: Any, b: Any, scaling: float) -> Any:
    """`base` (already in the cell's dtype) with one adapter merged, bit for bit as PEFT does it.

    PEFT's `weight += delta` on a bf16/fp16 weight computes `float(weight) + delta` in fp32 and
    rounds the sum to the weight's dtype. Here the same fp32 operations run in place on the
    product, `(B @ A) * scaling + float(base)`, and one conversion rounds the sum: the same bits,
    ~3x faster on CPU than torch's mixed-dtype in-place add. The product is computed whole, as
    PEFT computes it; the elementwise steps after it run a block of rows at a time, each block
    within a core's L2 cache, which gives the same bits and is 20-40% faster than whole passes.
    """
    delta = b.float() @ a.float()
    baked = base.new_empty(base.shape)
    rows = max(1, BAKE_BLOCK_ELEMENTS // max(1, delta.shape[1]))
    for start in range(0, delta.shape[0], rows):
        block = delta[start:start + rows]
        block.mul_(scaling)
        block.add_(base[start:start + rows])
        baked[start:start + rows] = block
    return baked
