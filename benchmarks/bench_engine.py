"""Benchmark: one (size, variant) row (linear + task_arithmetic + TIES) with both merge engines.

Builds offline a Gemma-3-1B-shaped base (Gemma3ForCausalLM names and shapes, random bf16 weights,
2.0 GB) and two all-linear LoRA adapters (eng, nob; r=64, random non-zero factors), then runs the
row's three cells with `[merge] engine = "mergekit"` (PEFT bakes shared by the row, mergekit's
run_merge, strip, verify, `dir:` push) and with `engine = "bakery"`, each cell as its own
`bakery-slurm run-cell` process on CPU. Prints each cell's wall time and peak RSS, the row totals,
the new/old ratio, and each cell against the copy floor (copying the base file once, with fsync;
the median of a copy before, between and after the engines), then each target set for the
bakery engine with what this run measured and whether it is met (the TIES one needs 16 cores).
Checks that both engines published the same bytes. Everything is built in a temporary folder
under --dir and removed at the end, also on failure (~10 GB at full size).

    python benchmarks/bench_engine.py [--layers 26] [--vocab 262144] [--dir /tmp] [--engines E,E]

Smaller shapes for a quick look: --layers 4 --vocab 32000 (~0.2 B parameters).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from bakery_slurm.pipeline import STAGES
from bakery_slurm.tiny import build_tokenizer

METHODS = {"linear": "weight = 0.5", "task_arithmetic": "weight = 0.5",
           "ties": "density = 0.5\nweight = 0.5"}
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK, ALPHA = 64, 128


def gemma3_1b_config(layers: int, vocab: int):
    from transformers import Gemma3TextConfig

    config = Gemma3TextConfig(vocab_size=vocab, hidden_size=1152, intermediate_size=6912,
                              num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=1,
                              head_dim=256, dtype="bfloat16")
    config.architectures = ["Gemma3ForCausalLM"]
    return config


def build_fixture(root: Path, layers: int, vocab: int) -> int:
    """root/base (config, tokenizer, model.safetensors) and root/{eng,nob}; returns parameters."""
    from peft import LoraConfig
    from transformers import Gemma3ForCausalLM

    config = gemma3_1b_config(layers, vocab)
    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in Gemma3ForCausalLM(config).state_dict().items()
                  if name != "lm_head.weight"}  # tied to the embeddings
    generator = torch.Generator().manual_seed(0)
    base = root / "base"
    base.mkdir()
    config.save_pretrained(base)
    build_tokenizer(base)
    tensors = {name: (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
               for name, shape in shapes.items()}
    save_file(tensors, str(base / "model.safetensors"), metadata={"format": "pt"})
    del tensors
    for adapter in ("eng", "nob"):
        folder = root / adapter
        LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(LINEAR),
                   task_type="CAUSAL_LM").save_pretrained(folder)
        factors = {}
        for name, shape in shapes.items():
            module = name.removesuffix(".weight")
            if module.rsplit(".", 1)[-1] in LINEAR:
                rows, cols = shape
                key = f"base_model.model.{module}"
                factors[f"{key}.lora_A.weight"] = torch.randn(RANK, cols, generator=generator) * 0.01
                factors[f"{key}.lora_B.weight"] = torch.randn(rows, RANK, generator=generator) * 0.01
        save_file(factors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return sum(math.prod(s) for s in shapes.values())


def matrix_text(root: Path, engine: str) -> str:
    methods = "\n".join(f"[methods.{m}]\n{p}" for m, p in METHODS.items())
    return (f'name = "bench"\nadapters = ["eng", "nob"]\n[base]\npath = "{root}/base"\n'
            f'[adapter]\npath = "{root}/{{adapter}}"\n[push]\ntarget = "dir:published"\n'
            f'[variants.std]\n[sizes.1b]\n{methods}\n[runtime]\ncontainer = "none"\n'
            f'[merge]\nengine = "{engine}"\n')


# Starts a command from a small process and writes its peak RSS (KiB) to a file. Linux carries a
# process's peak RSS over fork and exec, so a cell started straight from this benchmark (torch
# imported, fixture built) would report at least this process's size.
LAUNCHER = ("import os, sys\npid = os.fork()\nif pid == 0:\n    os.execv(sys.argv[2], sys.argv[2:])\n"
            "_, status, usage = os.wait4(pid, 0)\nopen(sys.argv[1], 'w').write(str(usage.ru_maxrss))\n"
            "sys.exit(os.waitstatus_to_exitcode(status))\n")


def run_cell(matrix: Path, cell: str) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one `bakery-slurm run-cell` process."""
    rss = matrix.parent / "peak-rss"
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", LAUNCHER, str(rss),
                           str(Path(sys.executable).parent / "bakery-slurm"), "-q", "run-cell",
                           str(matrix), cell, "--device", "cpu"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{cell} failed:\n{done.stderr.decode()[-4000:]}")
    return seconds, int(rss.read_text()) * 1024


def copy_floor(base: Path, out: Path) -> float:
    start = time.perf_counter()
    shutil.copyfile(base / "model.safetensors", out)
    with open(out, "rb+") as f:
        os.fsync(f.fileno())
    seconds = time.perf_counter() - start
    out.unlink()
    return seconds


def targets(rows: dict[str, dict[str, tuple[float, int]]], floor: float,
            cores: int) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) for the targets set for the bakery engine (one run)."""
    new, old = rows["bakery"], rows["mergekit"]
    row = sum(s for s, _ in new.values()) / sum(s for s, _ in old.values())
    rss = max(r for _, r in new.values()) / 1e9
    copies = max(new[m][0] for m in ("linear", "task_arithmetic")) / floor
    ties = old["ties"][0] / new["ties"][0]

    def verdict(met: bool) -> str:
        return "met" if met else "not met"

    return [("row <= 0.35x the mergekit engine", f"{row:.2f}x", verdict(row <= 0.35)),
            ("peak RSS of any cell <= 3 GB", f"{rss:.2f} GB", verdict(rss <= 3)),
            ("linear and task_arithmetic <= 3x the copy floor", f"{copies:.1f}x", verdict(copies <= 3)),
            ("TIES >= 8x faster than the mergekit engine on 16 cores", f"{ties:.1f}x on {cores}",
             verdict(ties >= 8) if cores >= 16 else "needs 16 cores")]


def main() -> None:
    # A kill (a CI timeout) then removes the temporary folder, as Ctrl-C does: both raise
    # KeyboardInterrupt, whose unwinding stops the children and leaves the `with` blocks.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=26)
    parser.add_argument("--vocab", type=int, default=262_144)
    parser.add_argument("--dir", default=None, help="where to build (default: the system temp)")
    parser.add_argument("--engines", default="mergekit,bakery",
                        help="comma-separated; both (the default) for the ratios and the byte check")
    args = parser.parse_args()
    engines = args.engines.split(",")
    with tempfile.TemporaryDirectory(prefix="bench-engine-", dir=args.dir) as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        n = build_fixture(root, args.layers, args.vocab)
        print(f"fixture: {n / 1e9:.2f} B parameters ({2 * n / 1e9:.2f} GB bf16), r={RANK} "
              f"all-linear eng/nob, built in {time.perf_counter() - start:.0f} s; "
              f"{len(os.sched_getaffinity(0))} cores")
        # The floor swings with the page cache and the disk (1-6.5 s on one machine): measured
        # before, between and after the engines, the median is what the cells are held against.
        floors = [copy_floor(root / "base", root / "copy.safetensors")]
        rows, published = {}, {}
        for engine in engines:
            folder = root / engine
            folder.mkdir()
            (folder / "matrix.toml").write_text(matrix_text(root, engine))
            rows[engine] = {m: run_cell(folder / "matrix.toml", f"1b-std/eng-nob__{m}")
                            for m in METHODS}
            published[engine] = folder / "published"
            floors.append(copy_floor(root / "base", root / "copy.safetensors"))
        floor = sorted(floors)[len(floors) // 2]
        print(f"copy floor (base file once, with fsync): {floor:.1f} s, the median of "
              + ", ".join(f"{f:.1f}" for f in floors) + " s (before, between and after the engines)")
        both = set(rows) == {"mergekit", "bakery"}
        same = both and all(
            all(torch.equal(a[k], b[k]) for k in a)
            for m in METHODS
            for a, b in [(load_file(str(published[e] / f"1b-std/eng-nob__{m}" / "model.safetensors"))
                          for e in ("mergekit", "bakery"))])
        results = {(e, m): json.loads((root / e / "bakery-work" / "cells" / "1b-std" /
                                       f"eng-nob__{m}" / "result.json").read_text())
                   for e in rows for m in METHODS}
    print(f"{'engine':9s} {'cell':32s} {'wall':>8s} {'peak RSS':>9s} {'/ floor':>8s}")
    for engine, cells in rows.items():
        for method, (seconds, rss) in cells.items():
            print(f"{engine:9s} {'1b-std/eng-nob__' + method:32s} {seconds:6.1f} s {rss / 1e9:6.2f} GB "
                  f"{seconds / floor:7.1f}x")
        print(f"{engine:9s} {'row (3 cells)':32s} {sum(s for s, _ in cells.values()):6.1f} s "
              f"{max(r for _, r in cells.values()) / 1e9:6.2f} GB")
    if both:
        for method in METHODS:
            print(f"bakery / mergekit, {method}: "
                  f"{rows['bakery'][method][0] / rows['mergekit'][method][0]:.2f}x")
        print(f"bakery / mergekit, row: {sum(s for s, _ in rows['bakery'].values()) / sum(s for s, _ in rows['mergekit'].values()):.2f}x")
        for target, value, met in targets(rows, floor, len(os.sched_getaffinity(0))):
            print(f"target {target}: {value}, {met}")
    print("stage seconds: " + ", ".join(STAGES))
    for (engine, method), result in results.items():
        print(f"  {engine:9s} {method:16s} " + " ".join(
            f"{result['stages'][stage]['seconds']:6.1f}" for stage in STAGES))
    if "bakery" in rows:
        merge = results["bakery", "ties"]["stages"]["merge"]
        print(f"bakery ties merge stage: {merge['seconds']:.1f} s, {merge['passed_through']} of "
              f"{merge['tensors']} tensors copied through unchanged")
    if both:
        print(f"both engines published the same bytes: {same}")
        if not same:
            raise SystemExit(1)


if __name__ == "__main__":
    main()
