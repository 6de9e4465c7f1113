"""TIES on the CPU with mergekit's arithmetic, its magnitudes sorted as integers.

mergekit's magnitude sparsification (TIES) keeps each task vector's k largest magnitudes:
`torch.argsort(|delta|.float(), descending=True)[:k]`, ~75% of a TIES merge on the CPU. A
faster selection of the k largest (a threshold by `kthvalue`, a stable sort) keeps other
elements among those tied at the cut, and bf16 task vectors have many ties: torch's CPU sort is
libstdc++'s `std::sort` (introsort, not stable), so which tied elements it keeps depends on every
comparison it made. What it does depends on the outcomes of its comparisons only, though. The
bits of a non-negative float, read as an integer of the same width, order exactly as the floats
do, so sorting those integers makes the same comparisons and the same moves and returns the same
permutation: ~25% faster for bf16 and fp16 (two-byte keys instead of four; 330 instead of
440 ms for a 6912 x 1152 task vector here). The sort keys clear the sign bit (the magnitude) and
give every NaN one bit pattern above inf's, as torch's comparator ranks NaN above any number and
level with any NaN.

`merge_method` hands the engine mergekit's method, or for a magnitude-sparsified generalized task
arithmetic method with sign consensus (TIES) on the CPU a `BitSortedMerge`: the same method whose
`merge_group` makes the torch calls mergekit 0.1.5's does, in the same order and dtypes, with
that one sort changed.
Another mergekit version may compute otherwise, so it gets its own kernel. A torch whose sort does
not give the same permutation for the integers as for the floats (one that picks its algorithm by
dtype, such as a SIMD sort for floats only) gets mergekit's `magnitude`: a probe checks once per
process and dtype.
`tests/unit/test_engine_bitsort.py` holds the kernel bit-identical to mergekit's.
"""

from __future__ import annotations

import dataclasses
import functools
from importlib.metadata import version
from typing import Any

# The mergekit whose merge_group and magnitude `BitSortedMerge` computes as (held by a test).
MERGEKIT_VERSION = "0.1.5"
# The probe sorts this many tie-heavy magnitudes (with zeros, subnormals, inf and NaN).
PROBE_ELEMENTS = 1 << 20
# The cell dtypes whose magnitudes are sorted as integers, and the integers of their width.
INTEGER_OF = {"bfloat16": "int16", "float16": "int16", "float32": "int32"}


def merge_method(name: str, device: Any) -> Any:
    """The mergekit method `name` as the engine runs it on `device`."""
    from mergekit import merge_methods
    from mergekit.merge_methods.generalized_task_arithmetic import GeneralizedTaskArithmeticMerge
    from mergekit.sparsify import SparsificationMethod

    method = merge_methods.get(name)
    if (type(method) is GeneralizedTaskArithmeticMerge
            and method.sparsification_method == SparsificationMethod.magnitude
            and method.consensus_method is not None
            and device.type == "cpu" and version("mergekit") == MERGEKIT_VERSION):
        return bit_sorted_merge()(**{f.name: getattr(method, f.name)
                                     for f in dataclasses.fields(method)})
    return method


@functools.cache
def sorts_alike(dtype: str) -> bool:
    """torch's CPU argsort gives the same permutation for `sort_keys` as for the float magnitudes
    (on tie-heavy magnitudes, so a different algorithm would show)."""
    import torch

    values = probe_values(dtype)
    return torch.equal(torch.argsort(values.abs().float(), descending=True),
                       torch.argsort(sort_keys(values), descending=True))


def probe_values(dtype: str) -> Any:
    """PROBE_ELEMENTS values of `dtype`: 81 magnitudes, so ties everywhere, and the special ones."""
    import torch

    generator = torch.Generator().manual_seed(0)
    float_dtype = getattr(torch, dtype)
    values = torch.randint(-40, 41, (PROBE_ELEMENTS,), generator=generator).to(float_dtype) / 64
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), -float("nan"),
                            torch.finfo(float_dtype).tiny / 4, torch.finfo(float_dtype).max],
                           dtype=float_dtype)
    at = torch.randint(0, PROBE_ELEMENTS, (len(special) * 64,), generator=generator)
    values[at] = special.repeat(64)
    return values


def sort_keys(tensor: Any) -> Any:
    """`tensor`'s magnitudes as integers of its width that order as the magnitudes do (NaN above
    inf, all NaN equal), flattened."""
    import torch

    integer = getattr(torch, INTEGER_OF[str(tensor.dtype).removeprefix("torch.")])
    bits = torch.iinfo(integer).bits
    infinity = int(torch.tensor(float("inf"), dtype=tensor.dtype).view(integer))
    keys = tensor.reshape(-1).view(integer) & ((1 << (bits - 1)) - 1)
    return keys.clamp_(max=infinity + 1)


def magnitude(delta: Any, density: float, rescale_norm: Any) -> Any:
    """mergekit's `sparsify.magnitude`, the k largest magnitudes sorted by `sort_keys` (mergekit's
    own where they are not integers of a width torch sorts as it sorts the floats)."""
    import torch
    from mergekit.sparsify import magnitude as mergekit_magnitude
    from mergekit.sparsify import rescaled_masked_tensor

    dtype = str(delta.dtype).removeprefix("torch.")
    if (density >= 1 or density <= 0 or delta.numel() == 0 or dtype not in INTEGER_OF
            or not sorts_alike(dtype)):
        return mergekit_magnitude(delta, density=density, rescale_norm=rescale_norm)
    k = max(1, int(density * delta.numel()))
    mask = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device)
    mask[torch.argsort(sort_keys(delta), descending=True)[:k]] = 1
    return rescaled_masked_tensor(delta, mask.reshape_as(delta), rescale_norm)


@functools.cache
def bit_sorted_merge() -> type:
    """The class `BitSortedMerge` (defined on first use: it subclasses mergekit's, which imports
    torch, and planning and `status` import the engine without either)."""
    from mergekit.merge_methods.generalized_task_arithmetic import (
        GeneralizedTaskArithmeticMerge, get_mask)
    from mergekit.sparsify import RescaleNorm

    @dataclasses.dataclass(frozen=True)
    class BitSortedMerge(GeneralizedTaskArithmeticMerge):
        """A magnitude-sparsified GeneralizedTaskArithmeticMerge with sign consensus (TIES) that
        sorts by bits."""

        def merge_group(self, group: Any, /, **parameters: Any) -> Any:
            import torch

            base = group.base.tensor
            entries = group.non_base
            if not entries:
                return base
            deltas = base.new_empty((len(entries), *base.shape))
            for index, entry in enumerate(entries):
                deltas[index] = magnitude(entry.tensor - base, parameters["density"][entry.id],
                                          RescaleNorm.l1 if parameters["rescale"] else None)
            weights = torch.tensor([parameters["weight"][entry.id] for entry in entries],
                                   dtype=deltas.dtype, device=deltas.device)
            while deltas.dim() > weights.dim():
                weights.unsqueeze_(-1)
            deltas.mul_(weights)
            mask = get_mask(deltas, method=self.consensus_method,
                            mask_dtype=torch.int8 if parameters["int8_mask"] else base.dtype)
            mixed_delta = (deltas * mask).sum(dim=0)
            divisor = (weights * mask).sum(dim=0)
            divisor[divisor == 0] = 1
            if parameters["normalize"]:
                mixed_delta /= divisor
            if parameters["lambda"] != 1:
                mixed_delta *= parameters["lambda"]
            return (base + mixed_delta).to(base.dtype)

    return BitSortedMerge

