"""Benchmark: the merge stage (mergekit through bakery-slurm's options) on CPU and, where there is
one, on CUDA, for every method, on a synthetic Gemma 3 text checkpoint of a chosen size.

The base holds random bf16 weights with Gemma3ForCausalLM's names and shapes; the two "baked"
models are the base plus small random deltas, as merged-in LoRA adapters are. Prints the seconds
per method and device and the CPU/CUDA ratio. The default (0.31 B parameters, 0.6 GB per
checkpoint) keeps a run to a few minutes; a 12B checkpoint is ~40x larger.

Seen on an H100 machine (16 cores), default size: linear 0.9 s on CPU / 1.1 s on CUDA,
task_arithmetic 0.9 / 1.3 s (reading and writing dominate), ties 50 s / 1.3 s (39x: its
per-tensor sort runs on the device).

    python benchmarks/bench_merge.py [--hidden 2048] [--layers 4] [--repeat 1]
"""

from __future__ import annotations

import argparse
import signal
import tempfile
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from bakery_slurm import methods
from bakery_slurm.recipe import validate_recipe
from bakery_slurm.stages.merge import choose_device, run_mergekit

PARAMETERS = {"linear": {"weight": 0.5}, "task_arithmetic": {"weight": 0.5},
              "ties": {"density": 0.5, "weight": 0.5}}


def write_checkpoints(root: Path, hidden: int, layers: int) -> tuple[Path, list[Path], int]:
    """base/ and two variants a/, b/; returns their folders and the parameter count."""
    config = Gemma3TextConfig(vocab_size=32_000, hidden_size=hidden, intermediate_size=4 * hidden,
                              num_hidden_layers=layers, num_attention_heads=hidden // 256,
                              num_key_value_heads=max(1, hidden // 1024), head_dim=256,
                              dtype="bfloat16")
    config.architectures = ["Gemma3ForCausalLM"]
    with torch.device("meta"):
        shapes = {name: t.shape for name, t in Gemma3ForCausalLM(config).state_dict().items()
                  if name != "lm_head.weight"}  # tied to the embeddings
    generator = torch.Generator().manual_seed(0)
    base = {name: (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
            for name, shape in shapes.items()}
    folders = []
    for name, scale in (("base", 0.0), ("a", 0.002), ("b", 0.002)):
        folder = root / name
        folder.mkdir()
        config.save_pretrained(folder)
        tensors = {k: (v.float() + torch.randn(v.shape, generator=generator) * scale).to(torch.bfloat16)
                   if scale else v for k, v in base.items()}
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        folders.append(folder)
    return folders[0], folders[1:], sum(t.numel() for t in base.values())


def recipe(method: str, base: Path, models: list[Path]) -> str:
    spec = {"merge_method": method, "dtype": "bfloat16",
            "models": [{"model": str(m), "parameters": PARAMETERS[method]} for m in models]}
    if methods.get(method).needs_base:
        spec["base_model"] = str(base)
    return yaml.safe_dump(spec)


def main() -> None:
    # A kill (a CI timeout) then removes the temporary folder, as Ctrl-C does.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    cuda, why = choose_device("auto")
    devices = ["cpu"] + ([cuda] if cuda == "cuda" else [])
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        base, models, n = write_checkpoints(Path(tmp), args.hidden, args.layers)
        print(f"checkpoints: 3 x {n / 1e9:.2f} B parameters ({2 * n / 1e9:.1f} GB bf16 each), "
              f"written in {time.perf_counter() - start:.1f} s")
        if why:
            print(f"CUDA: not used ({why})")
        else:
            print(f"CUDA: {torch.cuda.get_device_name()}")
        for method in PARAMETERS:
            config = validate_recipe(method, recipe(method, base, models))
            seconds = {}
            for device in devices:
                runs = []
                for i in range(args.repeat):
                    out = Path(tmp) / f"out-{method}-{device}-{i}"
                    out.mkdir()
                    start = time.perf_counter()
                    record = run_mergekit(config, out, device, None)
                    runs.append(time.perf_counter() - start)
                    assert record["device"] == device, record
                seconds[device] = min(runs)
            line = "  ".join(f"{d} {s:7.2f} s" for d, s in seconds.items())
            ratio = f"  cpu/cuda {seconds['cpu'] / seconds['cuda']:5.1f}x" if "cuda" in seconds else ""
            print(f"{method:16s} {line}{ratio}")


if __name__ == "__main__":
    main()
