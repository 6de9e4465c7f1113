"""The engine's TIES kernel, which sorts magnitudes as integers, held bit for bit against
mergekit's own: the sort keys on every bit pattern, the kernel on tie-heavy task vectors with
every parameter TIES takes, and where mergekit's own kernel is used instead."""

from __future__ import annotations

from importlib.metadata import version

import pytest
import torch
from mergekit import merge_methods
from mergekit.merge_methods import merge_tensors

from bakery_slurm.engine import bitsort
from bakery_slurm.engine.bitsort import merge_method, probe_values, sort_keys

CPU = torch.device("cpu")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def bits(tensor: torch.Tensor) -> torch.Tensor:
    integer = bitsort.INTEGER_OF[str(tensor.dtype).removeprefix("torch.")]
    return tensor.view(getattr(torch, integer))


def patterns(dtype: torch.dtype) -> torch.Tensor:
    """Every 16-bit pattern; for fp32 2^20 random ones and the special values."""
    if dtype != torch.float32:
        return torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)
    generator = torch.Generator().manual_seed(0)
    random = torch.randint(-(1 << 31), 1 << 31, (1 << 20,), generator=generator, dtype=torch.int64)
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-45, 3.4e38])
    return torch.cat([random.to(torch.int32).view(torch.float32), special])


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_keys_order_as_torchs_sort_compares_the_magnitudes(dtype):
    """Equal magnitudes get equal keys, greater ones greater keys (subnormals, zeros of either
    sign, inf), and every NaN, of any sign or payload, one key above all of them."""
    values = patterns(DTYPES[dtype])
    keys, magnitude = sort_keys(values).long(), values.abs().double()
    nan = torch.isnan(magnitude)
    order = torch.argsort(magnitude[~nan], stable=True)
    m, k = magnitude[~nan][order], keys[~nan][order]
    tied = m[1:] == m[:-1]
    assert torch.equal(k[1:][tied], k[:-1][tied])
    assert bool((k[1:][~tied] > k[:-1][~tied]).all())
    assert int(nan.sum()) > 1 and bool((keys[nan] == keys[nan][0]).all())
    assert int(keys[nan][0]) > int(k[-1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_probe_tells_the_sorts_apart(dtype):
    """The probe passes with this torch, and its values would show a sort that breaks ties
    otherwise (a stable one, say, keeps other tied elements first)."""
    values = probe_values(dtype).abs().float()
    assert bitsort.sorts_alike(dtype)
    assert not torch.equal(torch.argsort(values, descending=True),
                           torch.argsort(values, descending=True, stable=True))


def task_vectors(dtype: torch.dtype, shape: tuple[int, ...], adapters: int, special: bool,
                 seed: int) -> list[torch.Tensor]:
    """Adapters then the base, on a coarse grid: few distinct magnitudes, so ties at every cut."""
    generator = torch.Generator().manual_seed(seed)
    base = (torch.randint(-64, 65, shape, generator=generator) / 128).to(dtype)
    tensors = [(base.double() + torch.randint(-6, 7, shape, generator=generator) / 512).to(dtype)
               for _ in range(adapters)]
    if special:  # in the base and the adapters: -0.0, subnormals, inf and NaN
        values = torch.tensor([-0.0, torch.finfo(dtype).tiny / 8, float("inf"), float("nan")],
                              dtype=dtype)
        for tensor in [base, *tensors]:
            flat = tensor.view(-1)
            at = torch.randint(0, flat.numel(), (values.numel(),), generator=generator)
            flat[at] = values
    return [*tensors, base]


PARAMETERS = [
    {"density": 0.5, "weight": 0.5},                                    # the recipe's
    {"density": {"a0": 0.2, "a1": 0.9}, "weight": {"a0": 1.0, "a1": -0.3}},
    {"density": 0.5, "weight": 0.7, "normalize": False, "lambda": 0.8},
    {"density": 0.3, "weight": 0.5, "int8_mask": True, "rescale": True},
    {"density": {"a0": 1.0, "a1": 0.01}, "weight": 1.0},
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("parameters", PARAMETERS)
@pytest.mark.parametrize("shape", [(67, 45), (1,), (17,), (300,), (512, 1024)])
def test_the_kernel_is_mergekits_ties_bit_for_bit(dtype, parameters, shape):
    tensors = task_vectors(DTYPES[dtype], shape, 2, special=False, seed=len(shape))
    assert_same_merge(tensors, parameters)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("adapters", [1, 3])
def test_the_kernel_is_mergekits_with_special_values_and_other_adapter_counts(dtype, adapters):
    tensors = task_vectors(DTYPES[dtype], (129, 31), adapters, special=True, seed=adapters)
    assert_same_merge(tensors, {"density": 0.4, "weight": 0.6})


def assert_same_merge(tensors: list[torch.Tensor], parameters: dict) -> None:
    ids = [f"a{i}" for i in range(len(tensors) - 1)] + ["__base__"]
    merged = [merge_tensors(tensors, method, parameters=parameters, ids=ids,
                            base_index=len(tensors) - 1, name="t")
              for method in ("ties", merge_method("ties", CPU))]
    assert type(merge_method("ties", CPU)).__name__ == "BitSortedMerge"
    assert torch.equal(bits(merged[0]), bits(merged[1]))


def test_mergekits_own_kernel_where_the_bit_sort_is_not_checked(monkeypatch):
    """On CUDA (another sort), for methods without magnitude sparsification, and under another
    mergekit than the one the kernel follows; with a torch that sorts integers otherwise,
    mergekit's own magnitude."""
    for name in ("linear", "task_arithmetic", "dare_ties", "breadcrumbs_ties"):
        assert merge_method(name, CPU) is merge_methods.get(name)
    assert merge_method("ties", torch.device("cuda")) is merge_methods.get("ties")
    monkeypatch.setattr(bitsort, "version", lambda package: "0.2.0")
    assert merge_method("ties", CPU) is merge_methods.get("ties")
    monkeypatch.undo()

    sorted_by = []
    real = torch.argsort
    monkeypatch.setattr(torch, "argsort", lambda t, **kw: sorted_by.append(t.dtype) or real(t, **kw))
    monkeypatch.setattr(bitsort, "sorts_alike", lambda dtype: False)
    tensors = task_vectors(torch.bfloat16, (40, 8), 2, special=False, seed=0)
    assert_same_merge(tensors, {"density": 0.5, "weight": 0.5})
    assert sorted_by == [torch.float32] * 4  # mergekit's kernel and its magnitude, both on floats


def test_the_kernel_follows_the_pinned_mergekit():
    """Bumping mergekit's pin means reading its merge_group and magnitude again (and this)."""
    assert version("mergekit") == bitsort.MERGEKIT_VERSION
