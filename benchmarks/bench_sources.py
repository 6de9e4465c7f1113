"""Benchmark: identifying a local source folder, first run and again with its kept file hashes.

Every cell hashes its local base and adapters to give them a content identity; `cache/hashes/`
lets later cells skip files whose size, mtime, ctime and inode are unchanged. Prints both times
and their ratio for a folder of `--gib` GiB in 4 shards, like a sharded checkpoint.

    python benchmarks/bench_sources.py [--gib 2] [--repeat 3]
"""

from __future__ import annotations

import argparse
import signal
import statistics
import tempfile
import time
from pathlib import Path

from bakery_slurm.matrix import ModelSource
from bakery_slurm.sources import fetch

SHARDS = 4


def timed(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def main() -> None:
    # A kill (a CI timeout) then removes the temporary folder, as Ctrl-C does.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=2.0)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "base"
        model.mkdir()
        shard = int(args.gib * 2**30 / SHARDS)
        block = bytes(range(256)) * (2**20 // 256)
        for i in range(SHARDS):
            with open(model / f"model-{i + 1:05d}-of-{SHARDS:05d}.safetensors", "wb") as f:
                for _ in range(shard // len(block)):
                    f.write(block)
        source = ModelSource(repo=None, path=str(model), subfolder=None, revision=None)
        first = [timed(lambda: fetch(source, hash_cache=Path(tmp) / f"hashes-{n}"))
                 for n in range(args.repeat)]
        cache = Path(tmp) / "hashes-0"
        again = [timed(lambda: fetch(source, hash_cache=cache)) for _ in range(args.repeat)]
    cold, warm = statistics.median(first), statistics.median(again)
    print(f"local source, {args.gib:g} GiB in {SHARDS} files (median of {args.repeat}):")
    print(f"  first identification   {cold:8.3f} s  ({args.gib / cold:.2f} GiB/s, files in page cache)")
    print(f"  with kept hashes       {warm:8.4f} s")
    print(f"  ratio                  {cold / warm:8.0f}x")


if __name__ == "__main__":
    main()
