"""When a merge method provably returns an untouched tensor as it is, so the engine may copy it.

A tensor no adapter touches has every input of its merge equal to the base tensor x. Which
values then come back bit for bit depends on the method (mergekit 0.1.5's kernels):

- task_arithmetic, TIES and the other `GeneralizedTaskArithmeticMerge` methods with the base
  among the inputs and no rescaling compute `base + f(deltas)`, and every delta is x - x = 0:
  the result is x + 0.0, which is x except at -0.0 (it becomes +0.0), and not at inf or NaN
  (inf - inf is NaN). Any other value, of any dtype, comes back as it is.
- linear computes, for 16-bit inputs, in fp32: r = sum of x * c_i (the weights c_i, rounded to
  fp32 by mergekit), then r / sum(c_i) with normalize, and rounds to the input dtype. With
  positive weights there is no cancellation, so each fp32 step (n products, n - 1 additions, the
  weights' sum and the division) is off by at most one fp32 rounding, and the result is
  x * (1 + e) with |e| <= gamma(2n + 2) (gamma(k) = k u / (1 - k u), u = 2^-24), or, without
  normalize, |e| <= |S - 1| + S gamma(n + 1) for S the sum of the weights. Rounding x * (1 + e)
  to a format with p significant bits gives x back whenever |e| < 2^-(p + 1) (half the gap below
  a power of two), subnormals of fp16 included. That holds while no fp32 step underflows
  (|x| * min(c_i) >= 2^-126, |x| >= 2^-126) or overflows (|x| * S < 2^127): `Unchanged` bounds
  the magnitudes accordingly. -0.0 becomes +0.0 here too (0 + -0.0), and inf and NaN are
  never copied. Weights that are not all positive, fp32 cells (no coarser final rounding to
  absorb the fp32 error), or an error bound above 2^-(p + 2) mean: always compute.

`tests/unit/test_engine_unchanged.py` holds both rules against mergekit's own kernels on every
16-bit pattern.
"""

from __future__ import annotations

import functools
import math
import struct
import sys
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

FP32_UNIT_ROUNDOFF = 2.0 ** -24
FP32_MIN_NORMAL = 2.0 ** -126
FP32_SAFE_MAX = 2.0 ** 127
# Significant bits of the 16-bit formats (linear computes them in fp32 and rounds once).
SIGNIFICAND_BITS = {"bfloat16": 8, "float16": 11}
# ...and their largest finite values.
FINITE_MAX = {"bfloat16": 3.3895313892515355e38, "float16": 65504.0}
# The check reads this many elements at a time (256 Ki: 512 KB of bf16, within a core's L2).
CHECK_CHUNK_ELEMENTS = 1 << 18


@dataclass(frozen=True)
class Unchanged:
    """The method returns x itself for x = +0.0 and every x whose magnitude is in
    [smallest, largest] (finite); never for -0.0, inf or NaN."""

    smallest: float
    largest: float

    def holds_for(self, tensor: Any) -> bool:
        """Every element of `tensor` is one the method returns unchanged.

        Read on the bits, as integers of the same width: without the sign bit, a float's bits
        order as its magnitude does (inf and NaN above every finite value), and -0.0 is the sign
        bit alone, the integer minimum. One `aminmax` of the magnitudes settles a chunk with no
        zero in it; a chunk with zeros also needs its signed minimum (-0.0) and its least
        nonzero magnitude. The chunks fit in a core's L2 cache, so each pass after the first
        reads from it: ~30x faster than whole-tensor passes over a 262k x 1152 embedding.
        """
        import torch

        if tensor.numel() == 0:  # nothing to change (and torch's reductions refuse it)
            return True
        as_int = {2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()]
        lowest, magnitude = torch.iinfo(as_int).min, torch.iinfo(as_int).max
        low = _bits(self.smallest, tensor.dtype, as_int, up=True)
        high = _bits(self.largest, tensor.dtype, as_int, up=False)
        for part in tensor.reshape(-1).view(as_int).split(CHECK_CHUNK_ELEMENTS):
            magnitudes = part & magnitude
            least, most = torch.aminmax(magnitudes)
            if int(most) > high:
                return False
            if int(least) >= max(low, 1):  # no zero of either sign, nothing below the range
                continue
            if int(part.min()) == lowest:  # -0.0
                return False
            # (m - 1) & magnitude puts zeros at the top and every other m at m - 1, so its
            # minimum is the least nonzero magnitude, less one.
            if low > 1 and int(((magnitudes - 1) & magnitude).min()) < low - 1:
                return False
        return True


@functools.lru_cache(maxsize=64)
def _bits(value: float, dtype: Any, as_int: Any, up: bool) -> int:
    """The bits (as an integer) of the representable magnitude nearest `value` from inside the
    range: rounded up for the lower bound, down for the upper one."""
    import torch

    rounded = torch.tensor(value, dtype=torch.float64).to(dtype)
    bits = int(rounded.view(as_int))
    if up and float(rounded) < value:
        return bits + 1
    if not up and float(rounded) > value:
        return bits - 1
    return bits


def zero_delta() -> Unchanged:
    """base + 0.0: every finite value but -0.0 (any dtype: the bound is the widest's)."""
    return Unchanged(0.0, sys.float_info.max)


def linear(weights: Sequence[float], normalize: bool, dtype: str) -> Unchanged | None:
    """The values mergekit's linear merge of len(weights) equal `dtype` inputs returns as they
    are (see the module doc), or None where it may change any."""
    bits = SIGNIFICAND_BITS.get(dtype)
    if bits is None or not weights or not all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and 0 < w < FP32_SAFE_MAX
            for w in weights):
        return None
    coefficients = [_fp32(w) for w in weights]
    if min(coefficients) <= 0:  # a weight below fp32's range
        return None
    n, total = len(coefficients), math.fsum(coefficients)
    if normalize:
        error = _gamma(2 * n + 2)
    else:
        error = abs(total - 1) + total * _gamma(n + 1)
    if error > 2.0 ** -(bits + 2):
        return None
    smallest = max(FP32_MIN_NORMAL, FP32_MIN_NORMAL / min(coefficients))
    largest = min(FINITE_MAX[dtype], FP32_SAFE_MAX / total)
    return Unchanged(smallest, largest) if smallest <= largest else None


def rule_for(method: Any, name: str, parameters: Mapping[str, Any], adapters: Sequence[str],
             needs_base: bool, dtype: str) -> Unchanged | None:
    """What merging an untouched tensor with mergekit's method `method` (registered as `name`)
    and the cell's `parameters` leaves unchanged, or None: always compute."""
    from mergekit.merge_methods.generalized_task_arithmetic import GeneralizedTaskArithmeticMerge

    if isinstance(method, GeneralizedTaskArithmeticMerge):
        rescale = parameters.get("rescale", method.default_rescale)
        return zero_delta() if needs_base and not rescale else None
    if name == "linear":
        weight = parameters.get("weight")  # per adapter, or one for all
        weights = [weight.get(a) if isinstance(weight, dict) else weight for a in adapters]
        normalize = parameters.get("normalize", _default(method, "normalize"))
        return linear(weights, normalize, dtype) if isinstance(normalize, bool) else None
    return None


def _default(method: Any, parameter: str) -> Any:
    return next((p.default for p in method.spec.parameters if p.name == parameter), None)


def _fp32(value: float) -> float:
    """`value` rounded to fp32, as mergekit makes its coefficient tensor."""
    return struct.unpack("f", struct.pack("f", value))[0]


def _gamma(k: int) -> float:
    ku = k * FP32_UNIT_ROUNDOFF
    return ku / (1 - ku) if ku < 1 else math.inf
