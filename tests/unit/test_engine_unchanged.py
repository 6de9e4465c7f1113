"""Which untouched tensors the bakery engine copies instead of merging: each rule held against
mergekit's own kernel on every 16-bit pattern (an untouched tensor's inputs are all the base)."""

from __future__ import annotations

import pytest
import torch
from mergekit import merge_methods
from mergekit.merge_methods import merge_tensors

from bakery_slurm.engine import unchanged
from bakery_slurm.engine.unchanged import Unchanged, linear, rule_for, zero_delta

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def every_pattern(dtype: torch.dtype) -> torch.Tensor:
    return torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.eq(a.view(torch.int16), b.view(torch.int16))


def admitted(rule: Unchanged, values: torch.Tensor) -> torch.Tensor:
    """The elements `rule` says come back unchanged, by its definition (on the numbers)."""
    magnitude = values.double().abs()
    positive_zero = (magnitude == 0) & ~torch.signbit(values)
    return positive_zero | ((magnitude > 0) & (magnitude >= rule.smallest)
                            & (magnitude <= rule.largest))


def test_only_tensors_that_survive_base_plus_zero_are_copied():
    assert zero_delta().holds_for(torch.tensor([1.0, 0.0, -2.5]).to(torch.bfloat16))
    assert not zero_delta().holds_for(torch.tensor([1.0, -0.0]).to(torch.bfloat16))
    assert not zero_delta().holds_for(torch.tensor([1.0, float("inf")]))
    assert not zero_delta().holds_for(torch.tensor([float("nan")]))
    assert zero_delta().holds_for(torch.empty(0, 4, dtype=torch.bfloat16))
    # ...and the reason: base + 0.0 is +0.0 where the base is -0.0.
    negative = torch.tensor([-0.0]).to(torch.bfloat16)
    assert not torch.signbit(negative + torch.zeros_like(negative)).any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_copy_check_is_base_plus_zero_on_every_bit_pattern(dtype):
    """Read on the bits, the check copies exactly the finite values that survive base + (x - x)
    (a task vector of equal inputs) unchanged, and never inf or NaN (inf - inf is NaN)."""
    every = every_pattern(dtype)
    survives = same_bits(every + (every - every), every)
    checked = torch.tensor([zero_delta().holds_for(value.reshape(1)) for value in every])
    finite = torch.isfinite(every)
    assert torch.equal(checked[finite], survives[finite])
    assert not bool(checked[~finite].any())
    assert int((~survives).sum()) > 1  # -0.0 and the infinities at least


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method, parameters", [("task_arithmetic", {"weight": 0.5}),
                                                ("ties", {"density": 0.5, "weight": 0.5})])
def test_task_vector_methods_return_every_value_the_rule_admits_unchanged(dtype, method, parameters):
    """mergekit's own kernel on every 16-bit pattern, both adapters and the base all equal."""
    every = every_pattern(DTYPES[dtype])
    merged = merge_tensors([every, every, every], method, parameters=parameters,
                           ids=["eng", "nob", "__base__"], base_index=2, name="t")
    assert rule_for(merge_methods.get(method), method, parameters, ("eng", "nob"), True,
                    dtype) == zero_delta()
    admits = admitted(zero_delta(), every)
    assert bool(same_bits(merged, every)[admits].all())
    assert not bool(admits[~torch.isfinite(every)].any())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_copy_check_on_wide_dtypes(dtype):
    info = torch.finfo(dtype)
    assert zero_delta().holds_for(torch.tensor([info.max, -info.max, info.tiny, -info.tiny / 4, 0.0],
                                               dtype=dtype))
    for bad in (-0.0, float("inf"), float("-inf"), float("nan"), -float("nan")):
        assert not zero_delta().holds_for(torch.tensor([1.0, bad], dtype=dtype)), bad


# (weights, normalize): the recipe's own, unequal ones, a sum a little off 1 without normalize
# (x * 1.0004 rounds back to x in bf16), three and five adapters, weights that push the lower
# bound up (a tiny one) and the upper bound down (huge ones).
LINEAR_CASES = [((0.5, 0.5), True), ((0.3, 0.7), False), ((0.5, 0.5004), False), ((1.0, 1.0), True),
                ((0.1, 2.0, 0.7), True), ((0.2,) * 5, False), ((1e-30, 1.0), True),
                ((2.0 ** 100, 2.0 ** 100), True)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weights, normalize", LINEAR_CASES)
def test_linear_returns_every_value_its_rule_admits_unchanged(dtype, weights, normalize):
    """Sound on every 16-bit pattern: mergekit's linear merge of equal inputs gives back each
    value the rule admits, bit for bit; and the rule admits every ordinary weight magnitude."""
    rule = linear(weights, normalize, dtype)
    every = every_pattern(DTYPES[dtype])
    ids = [f"a{i}" for i in range(len(weights))]
    merged = merge_tensors([every] * len(weights), "linear", ids=ids, name="t",
                           parameters={"weight": dict(zip(ids, weights)), "normalize": normalize})
    unchanged = same_bits(merged, every)
    if rule is None:  # only where fp16's finer gaps do not absorb a sum of 1.0004
        assert (weights, normalize, dtype) == ((0.5, 0.5004), False, "float16")
        assert not bool(unchanged[torch.isfinite(every) & (every != 0)].all())
        return
    admits = admitted(rule, every)
    assert not bool((admits & ~unchanged).any()), every[admits & ~unchanged][:5]
    ordinary = every.double().abs()
    ordinary = (ordinary >= 2.0 ** -14) & (ordinary <= 2.0 ** 15)  # fp16's normal range, nearly
    if min(weights) >= 0.1 and max(weights) <= 2.0:
        assert bool(admits[ordinary].all())
    assert not bool(unchanged[torch.signbit(every) & (every == 0)].any())  # -0.0 -> +0.0


@pytest.mark.parametrize("weights, normalize, dtype", [
    ((0.5, -0.5), True, "bfloat16"),       # cancellation
    ((0.0, 1.0), True, "bfloat16"),        # not all positive
    ((0.5, 0.5), True, "float32"),         # no coarser final rounding to absorb fp32's error
    ((3.0,), False, "bfloat16"),           # scales every value
    ((0.5, 0.502), False, "bfloat16"),     # scales by 1.002: more than half a bf16 gap
    ((1e-50, 1.0), True, "bfloat16"),      # a weight below fp32's range
    ((True, 1.0), True, "bfloat16"),       # not a number
    ((None, 1.0), True, "bfloat16"),       # no weight for an adapter
])
def test_linear_computes_where_it_may_change_a_value(weights, normalize, dtype):
    assert linear(weights, normalize, dtype) is None


def test_linear_holds_for_reads_both_bounds_on_the_bits():
    """The bit-level check agrees with the rule's definition on every pattern, for a rule with
    a raised lower bound and one with a lowered upper bound."""
    for rule in (linear((1e-30, 1.0), True, "bfloat16"), linear((2.0 ** 100,) * 2, True, "float16")):
        for dtype in DTYPES.values():
            every = every_pattern(dtype)
            checked = torch.tensor([rule.holds_for(value.reshape(1)) for value in every])
            assert torch.equal(checked, admitted(rule, every)), rule
            assert 0 < int(checked.sum()) < len(every)


@pytest.mark.parametrize("dtype", DTYPES.values())
@pytest.mark.parametrize("rule", [zero_delta(), linear((1e-30, 1.0), True, "bfloat16"),
                                  linear((2.0 ** 100,) * 2, True, "float16")])
def test_the_check_finds_a_value_it_does_not_admit_in_any_chunk(monkeypatch, rule, dtype):
    """A chunk without zeros and a chunk with them are checked differently: a value the rule
    does not admit (-0.0, inf, NaN, those just past either bound) is found in either, anywhere."""
    monkeypatch.setattr(unchanged, "CHECK_CHUNK_ELEMENTS", 8)
    every = every_pattern(dtype)
    admits = admitted(rule, every)
    nonzero = every[admits & (every != 0)]
    tensor = nonzero[torch.linspace(0, len(nonzero) - 1, 40).long()]  # 5 chunks
    tensor[[9, 27]] = 0.0  # zeros in the second and fourth
    assert rule.holds_for(tensor)
    next_to_admitted = admits.roll(1) | admits.roll(-1)
    rejected = every[~admits]
    picks = torch.cat([every[~admits & next_to_admitted],
                       rejected[torch.linspace(0, len(rejected) - 1, 32).long()]])
    assert bool((picks.view(torch.int16) == torch.iinfo(torch.int16).min).any())  # -0.0 is among them
    for value in picks:
        for place in (3, 12, 27, 39):  # no zero in its chunk, a zero, the zero itself, the last
            spoiled = tensor.clone()
            spoiled[place] = value
            assert not rule.holds_for(spoiled), (value, place)


def test_the_rule_follows_the_method_and_its_parameters():
    def rule(method, parameters, needs_base=True, dtype="bfloat16"):
        return rule_for(merge_methods.get(method), method, parameters, ("eng", "nob"), needs_base,
                        dtype)

    assert rule("ties", {"density": 0.5, "weight": 0.5}) == zero_delta()
    assert rule("task_arithmetic", {"weight": {"eng": 0.5, "nob": 0.5}}) == zero_delta()
    assert rule("task_arithmetic", {"weight": 0.5}, needs_base=False) is None
    assert rule("linear", {"weight": 0.5}) == linear((0.5, 0.5), True, "bfloat16")
    assert rule("linear", {"weight": {"eng": 0.3, "nob": 0.7}, "normalize": False}) == linear(
        (0.3, 0.7), False, "bfloat16")
    assert rule("linear", {"weight": {"eng": 0.5}}) is None  # nob has no weight
    assert rule("linear", {"weight": 0.5}, dtype="float32") is None
