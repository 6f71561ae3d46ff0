"""The fused multi-LoRA kernel against the plain-torch reference, Liger-style: stacked parametrize
over ranks, adapter counts, awkward widths and dtypes; every output element compared."""

from __future__ import annotations

import pytest
import torch

from kernel_helpers import ADAPTER_COUNTS, DEVICE, DTYPES, HIDDEN_PAIRS, RANKS, clone, lora_case, spread_slots

from headfleet.kernels import reference
from headfleet.kernels.layout import group_rows_by_slot
from headfleet.kernels.lora import lora_shrink_expand


def _run_both(case: dict, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    ours = lora_shrink_expand(**clone(case), **kw)
    ref = reference.lora_shrink_expand(**clone(case))
    return ours, ref


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("hidden_in, hidden_out", HIDDEN_PAIRS)
@pytest.mark.parametrize("rows", [1, 37])
def test_matches_reference(rows, hidden_in, hidden_out, rank, dtype, atol, rtol):
    case = lora_case(rows=rows, hidden_in=hidden_in, hidden_out=hidden_out, ranks=[rank] * 8, dtype=dtype)
    ours, ref = _run_both(case)
    torch.testing.assert_close(ours, ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("n_slots", ADAPTER_COUNTS)
@pytest.mark.parametrize("hidden_in, hidden_out", [(255, 127), (384, 384)])
def test_adapter_counts_with_mixed_ranks(hidden_in, hidden_out, n_slots, dtype, atol, rtol):
    """Every rank in one batch (and empty rank-0 slots), max_rank 64 padding; one slot holds more
    rows than a block so several programs share it."""
    ranks = [([0] + RANKS)[s % 6] for s in range(n_slots)] if n_slots > 1 else [16]
    rows = n_slots + 40
    slots = spread_slots(rows, n_slots)
    slots[torch.randperm(rows)[:36]] = n_slots - 1  # > 2 blocks of 16 rows for one slot
    case = lora_case(rows, hidden_in, hidden_out, ranks, dtype, slots=slots, max_rank=64)
    ours, ref = _run_both(case)
    torch.testing.assert_close(ours, ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_no_adapter_rows_are_bit_identical(dtype, atol, rtol):
    case = lora_case(rows=64, hidden_in=127, hidden_out=255, ranks=[8, 16, 4], dtype=dtype)
    y0 = case["y"].clone()
    out = lora_shrink_expand(**case)
    assert out is case["y"]  # in place
    none = case["slots"] == -1
    assert none.any() and (~none).any()
    assert torch.equal(out[none], y0[none])
    assert not torch.equal(out[~none], y0[~none])


def test_batch_without_adapters_is_untouched():
    case = lora_case(rows=20, hidden_in=37, hidden_out=37, ranks=[4, 4], dtype=torch.float32,
                     slots=torch.full((20,), -1, dtype=torch.int32))
    y0 = case["y"].clone()
    assert torch.equal(lora_shrink_expand(**case), y0)


def test_empty_batch():
    case = lora_case(rows=0, hidden_in=37, hidden_out=37, ranks=[4], dtype=torch.float32,
                     slots=torch.empty(0, dtype=torch.int32))
    assert lora_shrink_expand(**case).shape == (0, 37)


def test_padding_past_rank_is_never_read():
    """NaN past each slot's rank: any read of it would poison the row."""
    case = lora_case(rows=40, hidden_in=127, hidden_out=127, ranks=[1, 4, 8, 0], dtype=torch.float32,
                     max_rank=16, pad=float("nan"))
    ours, ref = _run_both(case)
    assert not ours.isnan().any()
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n_per_prog", [16, 128])
def test_output_split_across_programs(n_per_prog):
    case = lora_case(rows=30, hidden_in=37, hidden_out=255, ranks=[8, 64, 1], dtype=torch.float32)
    ours, ref = _run_both(case, n_per_prog=n_per_prog)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_groups_built_once_serve_every_layer():
    """One grouping per batch, reused by each target linear (different adapters, same slots)."""
    first = lora_case(rows=33, hidden_in=37, hidden_out=127, ranks=[4, 8, 16], dtype=torch.float32)
    second = lora_case(rows=33, hidden_in=37, hidden_out=127, ranks=[4, 8, 16], dtype=torch.float32,
                       slots=first["slots"])
    groups = group_rows_by_slot(first["slots"], 3)
    for case in (first, second):
        ours, ref = _run_both(case, groups=groups)
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_int64_slots_and_ranks():
    case = lora_case(rows=25, hidden_in=37, hidden_out=37, ranks=[4, 16], dtype=torch.float32)
    case["slots"], case["ranks"] = case["slots"].long(), case["ranks"].long()
    ours, ref = _run_both(case)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def _bad(**changes):
    def make(case):
        for key, value in changes.items():
            case[key] = value(case) if callable(value) else value
        return case
    return make


BAD = [
    pytest.param(_bad(x=lambda c: c["x"].double()), TypeError, "x must be one of", id="x-float64"),
    pytest.param(_bad(A=lambda c: c["A"].half()), TypeError, "A must have x's dtype", id="A-dtype"),
    pytest.param(_bad(scales=lambda c: c["scales"].double()), TypeError, "scales must be", id="scales-dtype"),
    pytest.param(_bad(slots=lambda c: c["slots"].float()), TypeError, "slots must be", id="slots-float"),
    pytest.param(_bad(x=lambda c: c["x"].t().contiguous().t()), ValueError, "x must be contiguous", id="x-strided"),
    pytest.param(_bad(x=lambda c: c["x"][:, :5]), ValueError, "A must have shape", id="x-width"),
    pytest.param(_bad(B=lambda c: c["B"][:, :4]), ValueError, "B must have shape", id="B-rank"),
    pytest.param(_bad(y=lambda c: c["y"][:5]), ValueError, "y must have shape", id="y-rows"),
    pytest.param(_bad(slots=lambda c: c["slots"][:5]), ValueError, "slots must have shape", id="slots-len"),
    pytest.param(_bad(ranks=lambda c: c["ranks"][:1]), ValueError, "ranks must have shape", id="ranks-len"),
    pytest.param(_bad(x=lambda c: c["x"][None]), ValueError, "x must be 2-D", id="x-3d"),
    pytest.param(_bad(slots=lambda c: torch.where(c["slots"] == 0, 3, c["slots"])), ValueError,
                 r"slots must lie in \[-1, 3\)", id="slot-too-big"),
    pytest.param(_bad(slots=lambda c: torch.where(c["slots"] == 0, -2, c["slots"])), ValueError,
                 "slots must lie", id="slot-below-minus-one"),
    pytest.param(_bad(ranks=lambda c: torch.tensor([4, 17, 1], dtype=torch.int32, device=DEVICE)), ValueError,
                 r"ranks must lie in \[0, 16\]", id="rank-past-max"),
    pytest.param(_bad(groups=lambda c: group_rows_by_slot(c["slots"], 5)), ValueError,
                 "groups were built for 5 slots", id="groups-slots"),
]


@pytest.mark.parametrize("op", [lora_shrink_expand, reference.lora_shrink_expand], ids=["triton", "reference"])
@pytest.mark.parametrize("mutate, exc, message", BAD)
def test_rejects_bad_arguments(mutate, exc, message, op):
    case = mutate(lora_case(rows=12, hidden_in=37, hidden_out=20, ranks=[4, 16, 1], dtype=torch.float32,
                            slots=torch.tensor([0, 1, 2, -1] * 3, dtype=torch.int32)))
    with pytest.raises(exc, match=message):
        op(**case)
