"""Benchmark: `status` over a 10,000-cell ledger and `submit --dry-run` of a 10,000-cell matrix.

Prints wall times, our own share, and how many sacct / squeue / sbatch calls each made. sacct and
squeue are answered by recorded outputs (stand-ins first on PATH that print them and count their
calls), so the figure is our own time, not the controller's. Targets (issue 3): status under 1 s
of our own time with exactly one sacct call (and one squeue call, for the tasks still live);
one sbatch per array whatever the matrix size.

    python benchmarks/bench_ledger.py [--cells 10000] [--arrays 100] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from bakery_slurm.ledger import Ledger, PlannedArray, confirm_array, record_intent, save_ledger


def synthetic_ledger(path: Path, n_cells: int, n_arrays: int) -> tuple[str, str]:
    """Write a ledger of n_cells over n_arrays confirmed SLURM arrays; return sacct's and
    squeue's answers."""
    per_array = n_cells // n_arrays
    ledger = Ledger()
    planned = [PlannedArray(executor="slurm", resources={"partition": "accel", "time": "01:00:00"},
                            folder=f"/work/arrays/a{a}",
                            cells=[f"s{a}-std/eng-nob__ties-density{i}" for i in range(per_array)])
               for a in range(n_arrays)]
    submission = record_intent(
        ledger, matrix_path=str(path.with_name("matrix.toml")), matrix_sha256="0" * 64,
        arrays=planned, now=datetime.now(timezone.utc),
        recipe_hashes={c: "r" for p in planned for c in p.cells})
    rows, queue = [], []
    for a, array in enumerate(submission.arrays):
        job = str(700000 + a)
        confirm_array(ledger, array.name, job)
        done = per_array // 2
        rows += [f"{job}_{i}|{'FAILED' if i % 17 == 0 else 'COMPLETED'}|{1 if i % 17 == 0 else 0}:0"
                 f"|00:12:{i % 60:02d}|gpu-{i % 8}|{array.name}" for i in range(done - 2)]
        rows += [f"{job}_{i}|RUNNING|0:0|00:03:00|gpu-1|{array.name}" for i in (done - 2, done - 1)]
        rows.append(f"{job}_[{done}-{per_array - 1}%4]|PENDING|0:0|00:00:00|None assigned|{array.name}")
        queue += [f"{job}_{i}|RUNNING|3:00|gpu-1|{array.name}" for i in (done - 2, done - 1)]
        queue += [f"{job}_{i}|PENDING|0:00||{array.name}" for i in range(done, per_array)]
    save_ledger(path, ledger)
    return "\n".join(rows) + "\n", "\n".join(queue) + "\n"


def fake_scheduler(bin_dir: Path, outputs: dict[str, Path], calls: Path) -> None:
    """`sacct` and `squeue` that print their recordings and append one line per call (the
    command's name) to `calls`."""
    for command, output in outputs.items():
        script = bin_dir / command
        script.write_text(f"#!/bin/sh\necho {command} >> {calls}\ncat {output}\n")
        script.chmod(0o755)


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    return time.perf_counter() - start, done


def bench_status(tmp: Path, n_cells: int, n_arrays: int, repeat: int) -> None:
    ledger = tmp / "bakery-ledger.json"
    recordings = {"sacct": tmp / "sacct.txt", "squeue": tmp / "squeue.txt"}
    for command, text in zip(recordings, synthetic_ledger(ledger, n_cells, n_arrays)):
        recordings[command].write_text(text)
    bin_dir, calls = tmp / "bin", tmp / "scheduler-calls"
    bin_dir.mkdir()
    fake_scheduler(bin_dir, recordings, calls)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    cli = [sys.executable, "-m", "bakery_slurm", "status", "--json", "--ledger", str(ledger)]
    python_start = timed([sys.executable, "-c", "pass"], env)[0]
    times = []
    for _ in range(repeat):
        calls.unlink(missing_ok=True)
        seconds, done = timed(cli, env)
        if done.returncode not in (0, 1):
            sys.exit(f"status failed: {done.stderr}")
        times.append(seconds)
        n_calls = calls.read_text().splitlines()
        rows = json.loads(done.stdout)
    # In-process: the status pipeline alone, without interpreter start-up and imports.
    from click.testing import CliRunner

    from bakery_slurm.cli import cli as group

    os.environ["PATH"] = env["PATH"]
    runner = CliRunner()
    inproc = []
    for _ in range(repeat):
        start = time.perf_counter()
        runner.invoke(group, ["status", "--json", "--ledger", str(ledger)])
        inproc.append(time.perf_counter() - start)
    median = statistics.median(times)
    print(f"status, {n_cells} cells in {n_arrays} arrays ({len(rows)} rows):")
    print(f"  whole command       {median:6.3f} s (median of {repeat}; python start-up {python_start:.3f} s)")
    print(f"  in-process          {statistics.median(inproc):6.3f} s  (target < 1 s)")
    print(f"  per cell            {statistics.median(inproc) / n_cells * 1e6:6.1f} us")
    print(f"  sacct calls         {n_calls.count('sacct')}  (target 1)")
    print(f"  squeue calls        {n_calls.count('squeue')}  (target 1)")


def bench_submit_dry_run(tmp: Path, n_cells: int) -> None:
    side = int(n_cells ** 0.5)
    densities = ", ".join(f"{(i + 1) / side:.4f}" for i in range(side))
    weights = ", ".join(f"{(i + 1) / side:.4f}" for i in range(side))
    matrix = tmp / "sweep.toml"
    matrix.write_text(f"""
name = "bench"
adapters = ["eng", "nob"]
[base]
path = "models/base"
[adapter]
path = "models/{{adapter}}"
[push]
target = "dir:out"
[variants.std]
[sizes.1b]
[methods.ties]
density = [{densities}]
weight = [{weights}]
[runtime]
container = "none"
""")
    # The folders preflight checks (local inputs): present, so submit gets past it as for real.
    for folder, marker in (("base", "config.json"), ("eng", "adapter_config.json"),
                           ("nob", "adapter_config.json")):
        (tmp / "models" / folder).mkdir(parents=True, exist_ok=True)
        (tmp / "models" / folder / marker).write_text("{}")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "bakery_slurm", "submit", str(matrix),
                           "--dry-run", "--executor", "slurm"], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"submit --dry-run failed: {done.stderr}")
    arrays = sum(1 for line in done.stdout.splitlines() if line.startswith("== array "))
    tasks = sum(1 for line in done.stdout.splitlines() if line.startswith("-- task "))
    print(f"submit --dry-run, {side * side} cells:")
    print(f"  whole command       {seconds:6.3f} s ({seconds / tasks * 1e3:.2f} ms per cell, "
          "recipes validated by mergekit and preflight included)")
    print(f"  arrays = sbatch     {arrays} for {tasks} tasks "
          f"({tasks / max(arrays, 1):.0f} tasks per sbatch; MaxArraySize caps an array)")
    print(f"  written             {'nothing' if not (tmp / 'bakery-ledger.json').exists() else 'LEDGER WRITTEN'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=10_000)
    parser.add_argument("--arrays", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bench_status(Path(tmp), args.cells, args.arrays, args.repeat)
    with tempfile.TemporaryDirectory() as tmp:
        bench_submit_dry_run(Path(tmp), args.cells)


if __name__ == "__main__":
    main()
