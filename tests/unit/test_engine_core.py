"""The bakery engine's pure parts: which adapters it refuses, how LoRA pairs map to base tensors,
and the shard layout (`test_engine_unchanged.py`: which untouched tensors may be copied)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from bakery_slurm import manifest
from bakery_slurm.engine import lora
from bakery_slurm.engine.cell import (MEMORY_PER_WORKER, MIN_MEMORY_BUDGET, _gpu_free_memory,
                                      available_memory, default_memory_budget, model_modules)
from bakery_slurm.engine.lora import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, LORA_DEFAULTS, Unsupported,
                                      baked_tensor, installed_lora_defaults, lora_defaults,
                                      pattern_key, plan_factors, read_adapter, unsupported_setting)
from bakery_slurm.engine.shards import ShardWriter, plan_shards, shard_name
from bakery_slurm.fsutil import staging_dir
from bakery_slurm.manifest import scan, write_marker
from bakery_slurm.repair import to_hub_name
from support import assert_matches_golden


@pytest.fixture(scope="module")
def defaults() -> dict:
    return installed_lora_defaults()


def test_the_recorded_lora_defaults_are_the_pinned_peft_ones():
    """`lora_defaults` answers from the record without importing peft when the installed version
    is the recorded one; the record must then be exactly what that peft says."""
    from importlib.metadata import version

    record = json.dumps({"peft_version": version("peft"), "defaults": installed_lora_defaults()},
                        indent=1, sort_keys=True) + "\n"
    assert_matches_golden(record, LORA_DEFAULTS, "PEFT LoraConfig defaults")
    assert lora_defaults() == installed_lora_defaults()


def test_planning_a_cell_does_not_import_peft(tmp_path):
    """Importing peft costs seconds per cell; the engine's planning needs only its defaults."""
    script = ("import sys, json\n"
              "from bakery_slurm.engine.lora import lora_defaults, unsupported_setting\n"
              f"unsupported_setting({PLAIN!r}, lora_defaults())\n"
              "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'peft')))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


PLAIN = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "up_proj"],
         "use_rslora": False, "use_dora": False, "lora_bias": False, "bias": "none",
         "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}, "fan_in_fan_out": False,
         "lora_dropout": 0.05, "task_type": "CAUSAL_LM", "runtime_config": {"ephemeral_gpu_offload": False}}


def test_a_plain_lora_config_is_supported(defaults):
    assert unsupported_setting(PLAIN, defaults) is None
    assert unsupported_setting({**PLAIN, "use_rslora": True}, defaults) is None
    # Inits PEFT runs again on load without touching the base weight (the saved factors win).
    for init in (True, False, "gaussian", "eva"):
        assert unsupported_setting({**PLAIN, "init_lora_weights": init}, defaults) is None


@pytest.mark.parametrize("change, named", [
    ({"use_dora": True}, "use_dora"),
    ({"lora_bias": True}, "lora_bias"),
    ({"bias": "all"}, "bias"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    # PEFT fails on these (`None.keys()`, `re.error`): the fallback then fails as PEFT does.
    ({"rank_pattern": None}, "rank_pattern"),
    ({"alpha_pattern": [16]}, "alpha_pattern"),
    ({"alpha_pattern": {"q_proj(": 16}}, "q_proj("),
    # Ranks PEFT cannot build a layer of, alphas that are no number.
    ({"rank_pattern": {"q_proj": "2"}}, "rank_pattern['q_proj'] = '2'"),
    ({"rank_pattern": {"q_proj": 0}}, "rank_pattern['q_proj'] = 0"),
    ({"rank_pattern": {"q_proj": True}}, "rank_pattern['q_proj'] = True"),
    ({"alpha_pattern": {"q_proj": None}}, "alpha_pattern['q_proj'] = None"),
    ({"r": 2.0}, "r = 2.0"),
    ({"r": None}, "r = None"),
    ({"lora_alpha": "8"}, "lora_alpha = '8'"),
    ({"fan_in_fan_out": True}, "fan_in_fan_out"),
    ({"trainable_token_indices": [3]}, "trainable_token_indices"),
    ({"peft_type": "LOHA"}, "LOHA"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights"),
    ({"init_lora_weights": "orthogonal"}, "init_lora_weights"),
    ({"target_modules": None}, "target_modules"),
    ({"some_future_setting": 1}, "some_future_setting"),
])
def test_settings_that_change_the_merge_are_refused_by_name(defaults, change, named):
    reason = unsupported_setting({**PLAIN, **change}, defaults)
    assert reason is not None and named in reason


@pytest.mark.parametrize("change, named", [
    ({"target_modules": ".*q_proj", "layers_to_transform": [0]}, "layers_to_transform = [0]"),
    ({"target_modules": ".*q_proj", "layers_to_transform": []}, "layers_to_transform = []"),
    ({"target_modules": ".*q_proj", "layers_pattern": "layers"}, "layers_pattern = 'layers'"),
    ({"layers_pattern": ["layers"]}, "layers_pattern = ['layers']"),
])
def test_module_selections_peft_refuses_are_refused(defaults, change, named):
    """LoraConfig refuses these selections, so PEFT loads no such adapter: the engine must not
    merge one either (the fallback then fails as PEFT does)."""
    from peft import LoraConfig

    with pytest.raises(ValueError):
        LoraConfig(**{key: value for key, value in {**PLAIN, **change}.items()
                      if key not in ("peft_type", "runtime_config")})
    reason = unsupported_setting({**PLAIN, **change}, defaults)
    assert reason is not None and named in reason


def test_an_unknown_setting_left_at_nothing_is_fine(defaults):
    assert unsupported_setting({**PLAIN, "some_future_setting": None}, defaults) is None


BASE = {"model.layers.0.self_attn.q_proj.weight": (8, 6), "model.embed_tokens.weight": (32, 6)}
A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def test_factors_map_to_base_tensors_with_the_scaling():
    plan = plan_factors(PLAIN, {A: (4, 6), B: (8, 4)}, BASE, lambda n: n)
    assert list(plan) == ["model.layers.0.self_attn.q_proj.weight"]
    assert (plan["model.layers.0.self_attn.q_proj.weight"].a_key, plan[
        "model.layers.0.self_attn.q_proj.weight"].scaling) == (A, 2.0)
    rs = plan_factors({**PLAIN, "use_rslora": True}, {A: (4, 6), B: (8, 4)}, BASE, lambda n: n)
    assert rs["model.layers.0.self_attn.q_proj.weight"].scaling == 8 / 2


def test_multimodal_adapter_keys_map_to_the_hub_layout():
    base = {"language_model.model.layers.0.mlp.up_proj.weight": (8, 6)}
    prefix = "base_model.model.model.language_model.layers.0.mlp.up_proj"
    plan = plan_factors(PLAIN, {f"{prefix}.lora_A.weight": (4, 6), f"{prefix}.lora_B.weight": (8, 4)},
                        base, to_hub_name)
    assert list(plan) == ["language_model.model.layers.0.mlp.up_proj.weight"]


def test_a_random_init_needs_the_factors_of_every_selected_module():
    """init_lora_weights = False: PEFT initialises A and B at random, so a selected module without
    saved factors is not left unchanged; with the zero-B inits it is."""
    base = {**BASE, "model.layers.0.self_attn.k_proj.weight": (8, 6), "model.norm.weight": (6,)}
    modules = model_modules(base, multimodal=False)
    config = {**PLAIN, "target_modules": ["q_proj", "k_proj", "norm"]}
    for init in (True, "gaussian"):
        plan_factors({**config, "init_lora_weights": init}, {A: (4, 6), B: (8, 4)}, base,
                     lambda n: n, model_modules=modules)
    with pytest.raises(Unsupported, match="model.layers.0.self_attn.k_proj: selected, but no saved"):
        plan_factors({**config, "init_lora_weights": False}, {A: (4, 6), B: (8, 4)}, base,
                     lambda n: n, model_modules=modules)
    plan_factors({**config, "target_modules": ["q_proj"], "init_lora_weights": False},
                 {A: (4, 6), B: (8, 4)}, base, lambda n: n, model_modules=modules)


def test_model_modules_invert_the_multimodal_mapping():
    names = ["language_model.model.layers.0.self_attn.q_proj.weight", "language_model.lm_head.weight",
             "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight",
             "vision_tower.vision_model.encoder.layers.0.mlp.fc1.bias",
             "multi_modal_projector.mm_input_projection_weight"]
    assert model_modules(names, multimodal=True) == {
        "model.language_model.layers.0.self_attn.q_proj": names[0], "lm_head": names[1],
        "model.vision_tower.encoder.layers.0.mlp.fc1": names[2]}


@pytest.mark.parametrize("shapes, named", [
    ({A: (4, 6)}, "lora_A and lora_B"),
    ({A: (4, 6), B: (8, 4), "base_model.model.model.embed_tokens.lora_embedding_A": (4, 32)},
     "not a linear LoRA factor"),
    ({A: (4, 6), B: (8, 4), "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector":
      (8,)}, "not a linear LoRA factor"),
    ({A: (4, 6), B: (8, 4), "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias": (8,)},
     "not a linear LoRA factor"),
    ({A: (2, 6), B: (8, 2)}, "rank-4"),
    ({A: (4, 5), B: (8, 4)}, "no base tensor"),
    ({A.replace("q_proj", "k_proj"): (4, 6), B.replace("q_proj", "k_proj"): (8, 4)}, "no base tensor"),
    ({A: (4, 6, 1, 1), B: (8, 4, 1, 1)}, "rank-4 linear"),
])
def test_adapters_the_engine_cannot_compute_exactly_are_refused(shapes, named):
    with pytest.raises(Unsupported, match=named):
        plan_factors(PLAIN, shapes, BASE, lambda n: n)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("alpha", [16, 11])  # scaling 2.0, and 1.375 (rounds in fp32)
@pytest.mark.parametrize("block_rows", [None, 7])  # the layer in one block; in 58, the last short
def test_baked_tensor_is_peft_merge_and_unload(monkeypatch, dtype, alpha, block_rows):
    """The same operations PEFT's lora.Linear.merge runs on a layer with fp32 factors."""
    from peft import LoraConfig, get_peft_model

    if block_rows:
        monkeypatch.setattr(lora, "BAKE_BLOCK_ELEMENTS", block_rows * 480)

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(480, 400, bias=False)).to(dtype)
    base = model[0].weight.detach().clone()
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=alpha, target_modules=["0"]))
    layer = peft.base_model.model[0]
    with torch.no_grad():
        layer.lora_A["default"].weight.normal_()
        layer.lora_B["default"].weight.normal_()
    a, b = (layer.lora_A["default"].weight.detach().clone(),
            layer.lora_B["default"].weight.detach().clone())
    merged = peft.merge_and_unload()[0].weight.detach()
    ours = baked_tensor(base, a, b, alpha / 8)
    assert ours.dtype == dtype and torch.equal(ours.view(torch.uint8), merged.view(torch.uint8))
    assert not torch.equal(ours, base)


def test_shards_are_closed_before_they_overflow():
    tensors = {"a": ("BF16", (4, 4)), "b": ("BF16", (4, 4)), "c": ("F32", (8,)), "d": ("BF16", (64,))}
    plan = plan_shards(tensors, max_shard_bytes=64)
    assert list(plan.headers) == [shard_name(i, 3) for i in (1, 2, 3)]
    assert shard_name(1, 3) == "model-00001-of-00003.safetensors"
    assert {n: p.file for n, p in plan.placements.items()} == {
        "a": shard_name(1, 3), "b": shard_name(1, 3), "c": shard_name(2, 3), "d": shard_name(3, 3)}
    assert plan.index["weight_map"]["d"] == shard_name(3, 3)
    assert plan.index["metadata"]["total_size"] == 32 + 32 + 32 + 128
    assert list(plan_shards(tensors, 10**9).headers) == ["model.safetensors"]
    assert plan_shards(tensors, 10**9).index is None


def test_writer_fills_shards_in_any_order_and_safetensors_reads_them(tmp_path):
    tensors = {"x": torch.randn(6, 5).to(torch.bfloat16), "y": torch.randn(3, 2).to(torch.bfloat16),
               "z": torch.randn(7).to(torch.bfloat16)}
    plan = plan_shards({n: ("BF16", tuple(t.shape)) for n, t in tensors.items()}, max_shard_bytes=64)
    writer = ShardWriter(plan, tmp_path)
    for name in ("z", "y"):
        writer.write(name, memoryview(tensors[name].view(torch.uint8).reshape(-1).numpy()))
    rows = tensors["x"].view(torch.uint8)  # two row chunks, the second first
    writer.write("x", memoryview(rows[3:].reshape(-1).numpy()), byte_offset=3 * 5 * 2)
    writer.write("x", memoryview(rows[:3].reshape(-1).numpy()))
    with pytest.raises(ValueError, match="do not fit"):
        writer.write("y", memoryview(bytes(13)))
    hashed = writer.close()
    read = {}
    for file in plan.headers:
        read.update(load_file(str(tmp_path / file)))
    assert read.keys() == tensors.keys()
    assert all(torch.equal(read[n], tensors[n]) for n in tensors)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {n: p.file for n, p in plan.placements.items()}
    # Each file was hashed while it was written: the entries a scan of the folder makes.
    assert hashed == {f: e for f, e in scan(tmp_path).items() if f in plan.headers}


def test_a_marker_takes_the_writers_hashes_without_reading_the_files(tmp_path, monkeypatch):
    plan = plan_shards({"x": ("BF16", (4, 3))}, max_shard_bytes=10**9)
    out = tmp_path / "out"
    with staging_dir(out) as staged:
        writer = ShardWriter(plan, staged)
        writer.write("x", memoryview(torch.ones(4, 3, dtype=torch.bfloat16).view(torch.uint8)
                                     .reshape(-1).numpy()))
        hashed = writer.close()
    monkeypatch.setattr(manifest, "sha256_file", lambda path: pytest.fail(f"{path} read again"))
    marker = write_marker(out, {}, known=hashed)
    assert marker["files"]["model.safetensors"]["sha256"] == hashlib.sha256(
        (out / "model.safetensors").read_bytes()).hexdigest()
    # A file changed after it was hashed is read again.
    (out / "model.safetensors").write_bytes(b"changed")
    monkeypatch.undo()
    assert write_marker(out, {}, known=hashed)["files"]["model.safetensors"]["sha256"] == (
        hashlib.sha256(b"changed").hexdigest())


def test_a_failed_merge_stops_the_hashing_and_leaves_no_file_open(tmp_path):
    plan = plan_shards({"x": ("BF16", (4, 3)), "y": ("BF16", (2,))}, max_shard_bytes=10**9)
    writer = ShardWriter(plan, tmp_path)
    writer.write("y", memoryview(bytes(4)))
    hasher = writer.hashers["model.safetensors"]
    with pytest.raises(RuntimeError, match="hashed"):  # x was never written: no wait for it
        writer.close()
    writer.abort()
    assert not hasher.thread.is_alive() and writer.fds == {}
    with pytest.raises(RuntimeError, match="hashed"):
        hasher.result()


def test_the_prefix_hasher_follows_ranges_written_in_any_order(tmp_path, monkeypatch):
    monkeypatch.setattr(manifest, "HASH_CHUNK", 7)
    data = os.urandom(100)
    path = tmp_path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    os.ftruncate(fd, len(data))
    hasher = manifest.PrefixHasher(path, fd, len(data))
    for start, stop in [(40, 100), (10, 25), (25, 25), (0, 10)]:
        os.pwrite(fd, data[start:stop], start)
        hasher.written(start, stop)
    assert hasher.done_to == 25 and hasher.pending == {40: 100}
    os.pwrite(fd, data[25:40], 25)
    hasher.written(25, 40)
    assert hasher.done_to == 100 and hasher.pending == {}
    entry = hasher.result()
    os.close(fd)
    assert entry == {"size": 100, "sha256": hashlib.sha256(data).hexdigest(),
                     "signature": manifest.stat_signature(path.stat())}


def fake_host(root, membership: str, limits: dict[str, str]):
    """A /proc (MemAvailable 24,000,000 kB) and a /sys/fs/cgroup with `membership` as
    /proc/self/cgroup and the given {cgroup file relative to the mount: content}."""
    proc, cgroups = root / "proc", root / "cgroup"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "cgroup").write_text(membership)
    (proc / "meminfo").write_text("MemTotal: 25000000 kB\nMemAvailable: 24000000 kB\n")
    for name, content in limits.items():
        (cgroups / name).parent.mkdir(parents=True, exist_ok=True)
        (cgroups / name).write_text(content + "\n")
    return proc, cgroups


GIB = 1 << 30


@pytest.mark.parametrize("membership, limits, expected", [
    # cgroup v2, SLURM's job cgroup limits; its step and task below have none
    ("0::/slurm/job_7/step_0/task_0\n",
     {"slurm/job_7/memory.max": str(8 * GIB), "slurm/job_7/step_0/memory.max": "max",
      "slurm/job_7/step_0/task_0/memory.max": "max"}, 8 * GIB),
    # cgroup v1 (hybrid host): the memory controller's own hierarchy; the tightest ancestor wins
    ("4:memory:/slurm/uid_0/job_7\n0::/\n",
     {"memory/slurm/uid_0/job_7/memory.limit_in_bytes": str(6 * GIB),
      "memory/slurm/uid_0/memory.limit_in_bytes": str(4 * GIB),
      "memory/memory.limit_in_bytes": "9223372036854771712"}, 4 * GIB),
    # a container's cgroup namespace: the path is not under the mount, whose root is ours
    ("4:memory:/process_api/abc\n", {"memory/memory.limit_in_bytes": str(3 * GIB)}, 3 * GIB),
    # no limit anywhere: the machine's available memory
    ("0::/user.slice\n", {"user.slice/memory.max": "max"}, 24_000_000 * 1024),
])
def test_available_memory_is_the_tightest_cgroup_limit_or_the_machine(tmp_path, membership, limits,
                                                                      expected):
    assert available_memory(*fake_host(tmp_path, membership, limits)) == expected


def test_available_memory_unknown_without_proc(tmp_path):
    assert available_memory(tmp_path / "proc", tmp_path / "cgroup") is None


def test_available_memory_here_is_within_the_machine():
    total = next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo")
                 if line.startswith("MemTotal:"))
    assert 0 < available_memory() <= total


def test_the_memory_budget_is_half_of_what_the_task_may_use():
    assert default_memory_budget(70, 220 * GIB) == 110 * GIB
    assert default_memory_budget(70, GIB) == MIN_MEMORY_BUDGET  # still one large tensor
    assert default_memory_budget(16, None) == 16 * MEMORY_PER_WORKER


def test_the_gpu_free_memory_is_unknown_where_there_is_no_gpu():
    """None, not an error, so the merge itself meets the missing or broken GPU and falls back."""
    free = _gpu_free_memory(torch.device("cuda"))
    assert (free is None) == (not torch.cuda.is_available())


def test_a_filesystem_that_refuses_the_writeback_hint_still_gets_its_hash(tmp_path, monkeypatch):
    def refuse(*args):
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(os, "sync_file_range", refuse, raising=False)
    plan = plan_shards({"x": ("BF16", (4, 3))}, max_shard_bytes=10**9)
    writer = ShardWriter(plan, tmp_path)
    writer.write("x", memoryview(bytes(24)))
    hashed = writer.close()
    assert hashed["model.safetensors"]["sha256"] == hashlib.sha256(
        (tmp_path / "model.safetensors").read_bytes()).hexdigest()


MODULES = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj",
           "model.layers.1.mlp.down_proj", "model.language_model.layers.2.mlp.up_proj",
           "model.vision_tower.encoder.layers.0.mlp.fc1", "model.vision_tower.encoder.layers.1.mlp.fc2",
           "lm_head"]


@pytest.mark.parametrize("selection", [
    {"target_modules": ["q_proj", "up_proj"]},
    {"target_modules": ["q_proj", "model.layers.1.mlp.down_proj"], "layers_to_transform": [0]},
    {"target_modules": ["q_proj", "fc1", "fc2"], "layers_to_transform": 1},
    {"target_modules": ["q_proj", "fc1"], "layers_to_transform": [0], "layers_pattern": "layers"},
    {"target_modules": ["q_proj", "fc1"], "layers_to_transform": [0], "layers_pattern": ["encoder.layers"]},
    {"target_modules": ["q_proj", "down_proj", "fc1"], "exclude_modules": ["fc1", "model.layers.1.mlp.down_proj"]},
    {"target_modules": r".*language_model.*\.(up_proj|q_proj)"},
    {"target_modules": ["q_proj", "fc2"], "exclude_modules": r".*vision_tower.*"},
])
def test_module_selection_is_pefts(selection):
    """`lora.selects` against PEFT's own `check_target_module_exists` (the oracle)."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import _ExcludedModule, check_target_module_exists

    config = LoraConfig(**selection)
    for module in MODULES:
        found = check_target_module_exists(config, module)
        assert lora.selects(selection, module) == bool(found and not isinstance(found, _ExcludedModule)), module


@pytest.mark.parametrize("patterns", [
    {"q_proj": 2},
    {"model.layers.1.self_attn.q_proj": 2},
    {"layers.1.self_attn.q_proj": 2, "mlp.up_proj": 3},
    {r"layers\.[01]\.mlp\..*_proj": 2},
    {"^model.layers.0.self_attn.q_proj": 2, "^lm_head": 3},
    {"language_model.*up_proj": 2, "fc.": 3},
    {"proj": 2, "_proj": 3, "layers.0": 4},
    {"q_proj": 2, "layers.0.self_attn.q_proj": 3, "layers.0.self_attn.q_proj$": 4},
    {"no_such_module": 2},
], ids=["suffix", "full-path", "layer-indexed", "regex", "anchored", "regex-and-dot",
        "partial-names", "first-wins", "unmatched"])
def test_pattern_keys_match_as_pefts(patterns):
    """`lora.pattern_key` against PEFT's own `get_pattern_key` (the oracle), for every module."""
    from peft.utils.other import get_pattern_key

    for module in MODULES:
        assert pattern_key(patterns, module) == get_pattern_key(patterns.keys(), module), module


PATTERNED = {**PLAIN, "target_modules": ["q_proj", "k_proj"],
             "rank_pattern": {"layers.0.self_attn.q_proj": 2, "nothing_matches_this": 16},
             "alpha_pattern": {r"model\.layers\.\d+\.self_attn\.k_proj": 3}}
K_BASE = {**BASE, "model.layers.0.self_attn.k_proj.weight": (8, 6)}
K_A, K_B = A.replace("q_proj", "k_proj"), B.replace("q_proj", "k_proj")


@pytest.mark.parametrize("rslora", [False, True])
def test_each_module_gets_the_rank_and_alpha_its_patterns_give(rslora):
    """PEFT's `_create_and_replace`: a module's r and lora_alpha come from the first
    rank_pattern / alpha_pattern key matching its name, else from r and lora_alpha; the scaling is
    alpha / r (alpha / sqrt(r) with rsLoRA). A key matching no module changes nothing."""
    config = {**PATTERNED, "use_rslora": rslora}
    plan = plan_factors(config, {A: (2, 6), B: (8, 2), K_A: (4, 6), K_B: (8, 4)}, K_BASE, lambda n: n)
    scale = (lambda alpha, r: alpha / r ** 0.5) if rslora else (lambda alpha, r: alpha / r)
    assert {name: f.scaling for name, f in plan.items()} == {
        "model.layers.0.self_attn.q_proj.weight": scale(8, 2),
        "model.layers.0.self_attn.k_proj.weight": scale(3, 4)}


def test_factors_of_another_rank_than_the_pattern_gives_are_refused():
    """PEFT creates the layer with the pattern's rank and refuses the saved factors (a size
    mismatch): the fallback fails as PEFT does."""
    with pytest.raises(Unsupported, match="q_proj: factor shapes .* are not rank-2"):
        plan_factors(PATTERNED, {A: (4, 6), B: (8, 4), K_A: (4, 6), K_B: (8, 4)}, K_BASE, lambda n: n)


def write_adapter(folder, config: dict, factors: dict[str, tuple[int, ...]]):
    folder.mkdir()
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config))
    save_file({key: torch.zeros(shape) for key, shape in factors.items()}, str(folder / ADAPTER_WEIGHTS))
    return folder


@pytest.mark.parametrize("missing, rank, scaling", [
    (("r",), 8, 8 / 8),
    (("lora_alpha",), 4, 8 / 4),
    (("r", "lora_alpha"), 8, 8 / 8),
])
def test_a_config_without_r_or_lora_alpha_gets_pefts_defaults(tmp_path, missing, rank, scaling):
    """PEFT's from_pretrained builds a LoraConfig from the file: a missing key is its default."""
    config = {key: value for key, value in {**PLAIN, "lora_alpha": 8}.items() if key not in missing}
    folder = write_adapter(tmp_path / "adapter", config, {A: (rank, 6), B: (8, rank)})
    plan = read_adapter(folder, BASE, lambda n: n)
    assert plan["model.layers.0.self_attn.q_proj.weight"].scaling == scaling
