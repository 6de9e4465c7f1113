"""The engine's process keeps the memory it frees: a block freed and allocated again is not
faulted in afresh (each in its own process: malloc's settings are the whole process's)."""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import sys

import pytest

BLOCKS, BLOCK_BYTES = 20, 64 << 20
# A worker thread allocates and frees a block larger than a thread arena's heaps, as the
# engine's workers do, and touches every page of it (bytearray zero-fills).
SCRIPT = f"""
import resource, sys, threading
from bakery_slurm.engine.heap import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def work():
    for _ in range({BLOCKS}):
        block = bytearray({BLOCK_BYTES})
        del block
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
worker = threading.Thread(target=work)
worker.start()
worker.join()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode: str) -> int:
    return int(subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True,
                              text=True, check=True).stdout)


# Under CI=true nothing is skipped: CI runs on glibc, and a CI that does not must fail here.
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc" and os.environ.get("CI") != "true",
                    reason="malloc settings are glibc's")
def test_freed_blocks_are_reused_not_faulted_in_again():
    pages = BLOCKS * BLOCK_BYTES // resource.getpagesize()
    assert page_faults("default") > pages // 2  # every block mapped and faulted in afresh
    assert page_faults("keep") < pages // 4     # faulted in once, then reused
