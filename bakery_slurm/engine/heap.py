"""Keep the memory the merge frees for the tensors after it (glibc's malloc).

The engine allocates and frees blocks of tens to hundreds of MB thousands of times: each tensor's
inputs, its bakes, TIES's sort keys, permutations and masks. By default glibc hands each such
block back to the kernel when it is freed (blocks above its mmap threshold are unmapped, the top
of a heap is trimmed) and the next one is faulted in page by page, zeroed: here that was half
the system time of a 1B TIES cell, and it grows with the cores that allocate at once.
`keep_freed_memory` has the process keep them: one arena (a worker thread's own arena is made of
64 MB heaps, so it maps anything larger afresh whatever the threshold), blocks of up to 2 GB from
the heap, and no trimming. The process then holds the most it held at once until it exits: one
cell's task, whose working memory the engine bounds (`cell.default_memory_budget`).
Elsewhere than glibc (macOS, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import functools
import platform

# mallopt's parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
# The largest value mallopt takes (an int): blocks above it are still mapped on their own.
LARGEST = (1 << 31) - 1


@functools.cache
def keep_freed_memory() -> bool:
    """Set this process's malloc to reuse freed blocks; True where it did (glibc)."""
    if platform.libc_ver()[0] != "glibc":
        return False
    # The process's own symbols, which hold the C library's (no search for libc.so.6: a minimal
    # image may have neither ldconfig nor a compiler for ctypes.util.find_library to ask).
    mallopt = ctypes.CDLL(None).mallopt
    return all(mallopt(option, value) == 1 for option, value in (
        (M_ARENA_MAX, 1), (M_MMAP_THRESHOLD, LARGEST), (M_TRIM_THRESHOLD, LARGEST)))
