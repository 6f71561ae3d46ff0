"""The batched-heads kernel against the plain-torch reference: awkward widths, head counts,
label counts from 1 to past one tile, softmax and sigmoid heads in one request."""

from __future__ import annotations

import pytest
import torch

from kernel_helpers import ADAPTER_COUNTS, DEVICE, DTYPES, HIDDEN_SIZES, clone, heads_case

from headfleet.kernels import reference
from headfleet.kernels.heads import MAX_LABELS, batched_heads
from headfleet.kernels.layout import pack_head_requests

LABEL_CYCLE = [2, 1, 5, 3, 17, 2, 40, 7]  # 1 label, a tile's worth and more, the usual 2-5


def _labels(n_heads: int) -> tuple[list[int], list[bool]]:
    n = [LABEL_CYCLE[h % len(LABEL_CYCLE)] for h in range(n_heads)]
    return n, [h % 3 == 2 for h in range(n_heads)]


def _run_both(case: dict, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    return batched_heads(**clone(case), **kw), reference.batched_heads(**clone(case))


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("n_heads", ADAPTER_COUNTS)
@pytest.mark.parametrize("hidden", HIDDEN_SIZES)
def test_matches_reference(hidden, n_heads, dtype, atol, rtol):
    n, multi = _labels(n_heads)
    case = heads_case(rows=37, hidden=hidden, n_labels=n, multi=multi, dtype=dtype, heads_per_row=4)
    ours, ref = _run_both(case)
    assert ours.shape == (case["requests"].total,) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_one_head_asked_by_many_rows(dtype, atol, rtol):
    """100 rows on one head: several programs (tiles of 16 pairs) share it; a row asks twice."""
    n, multi = _labels(3)
    rows = [[1] for _ in range(100)]
    rows[7] = [1, 0, 1]
    case = heads_case(rows=100, hidden=127, n_labels=n, multi=multi, dtype=dtype, row_heads=rows)
    ours, ref = _run_both(case)
    torch.testing.assert_close(ours, ref, atol=atol, rtol=rtol)
    per_row = case["requests"].unpack(ours)
    torch.testing.assert_close(per_row[7][0], per_row[7][2], atol=0, rtol=0)


def test_probabilities_are_probabilities():
    n, multi = [4, 3, 1, 6], [False, True, False, True]
    case = heads_case(rows=30, hidden=37, n_labels=n, multi=multi, dtype=torch.float32,
                      row_heads=[[0, 1, 2, 3]] * 30)
    per_row = case["requests"].unpack(batched_heads(**case))
    for heads in per_row:
        assert [len(p) for p in heads] == n
        for p, is_multi in zip(heads, multi):
            assert ((p > 0) & (p <= 1)).all()
            if not is_multi:
                torch.testing.assert_close(p.sum(), torch.tensor(1.0, device=DEVICE))
        assert torch.equal(heads[2], torch.ones(1, device=DEVICE))  # a 1-label softmax head


def test_rows_asking_for_nothing():
    n, multi = _labels(5)
    case = heads_case(rows=6, hidden=37, n_labels=n, multi=multi, dtype=torch.float32,
                      row_heads=[[], [3], [], [], [0, 4], []])
    ours, ref = _run_both(case)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    assert [len(h) for h in case["requests"].unpack(ours)] == [0, 1, 0, 0, 2, 0]
    nothing = heads_case(rows=3, hidden=37, n_labels=n, multi=multi, dtype=torch.float32, row_heads=[[], [], []])
    assert batched_heads(**nothing).shape == (0,)


def test_writes_into_given_output():
    n, multi = _labels(8)
    case = heads_case(rows=10, hidden=37, n_labels=n, multi=multi, dtype=torch.float32)
    out = torch.full((case["requests"].total,), float("nan"), device=DEVICE)
    assert batched_heads(**case, out=out) is out
    torch.testing.assert_close(out, reference.batched_heads(**case), atol=1e-5, rtol=1e-5)


def test_reference_is_the_documented_math():
    """The reference itself, pair by pair, against its docstring's pseudo-code."""
    n, multi = [3, 1, 4], [False, True, True]
    case = heads_case(rows=4, hidden=5, n_labels=n, multi=multi, dtype=torch.float32,
                      row_heads=[[2, 0], [], [1], [0, 0, 2]])
    out = reference.batched_heads(**case)
    req = case["requests"]
    for q, h in enumerate(req.asked.tolist()):
        i = int(torch.searchsorted(torch.from_numpy(req.head_ptr), q, right=True)) - 1
        o = int(case["head_offsets"][h])
        z = case["x"][i] @ case["W"][:, o: o + n[h]] + case["b"][o: o + n[h]]
        want = torch.sigmoid(z) if multi[h] else torch.softmax(z, 0)
        torch.testing.assert_close(out[req.out_ptr[q]: req.out_ptr[q + 1]], want)


def test_head_wider_than_a_tile_is_refused():
    case = heads_case(rows=2, hidden=8, n_labels=[MAX_LABELS + 1], multi=[False], dtype=torch.float32,
                      row_heads=[[0], []])
    with pytest.raises(ValueError, match="at most"):
        batched_heads(**case)


def test_unknown_head_id_is_refused():
    with pytest.raises(ValueError, match=r"head id 3 outside \[0, 3\)"):
        pack_head_requests([[0], [3]], [2, 2, 2])


def _bad(**changes):
    def make(case):
        for key, value in changes.items():
            case[key] = value(case) if callable(value) else value
        return case
    return make


BAD = [
    pytest.param(_bad(x=lambda c: c["x"].double()), TypeError, "x must be one of", id="x-float64"),
    pytest.param(_bad(W=lambda c: c["W"].half()), TypeError, "W must have x's dtype", id="W-dtype"),
    pytest.param(_bad(multi_label=lambda c: c["multi_label"].int()), TypeError, "multi_label must be", id="multi-int"),
    pytest.param(_bad(n_labels=lambda c: c["n_labels"].float()), TypeError, "n_labels must be", id="labels-float"),
    pytest.param(_bad(W=lambda c: c["W"].t().contiguous().t()), ValueError, "W must be contiguous", id="W-strided"),
    pytest.param(_bad(x=lambda c: c["x"][:, :3]), ValueError, "W must have shape", id="x-width"),
    pytest.param(_bad(x=lambda c: c["x"][:3]), ValueError, "requests were packed for 5 rows", id="x-rows"),
    pytest.param(_bad(b=lambda c: c["b"][:-1]), ValueError, "b must have shape", id="b-len"),
    pytest.param(_bad(n_labels=lambda c: c["n_labels"][:2]), ValueError, "n_labels must have shape", id="labels-len"),
    pytest.param(_bad(out=lambda c: torch.empty(3, device=DEVICE)), ValueError, "out must have shape", id="out-len"),
    pytest.param(_bad(head_offsets=lambda c: c["head_offsets"] + 2), ValueError, "outside W's", id="offset-past-W"),
    pytest.param(_bad(n_labels=lambda c: torch.tensor([2, 3, 4], dtype=torch.int32, device=DEVICE)), ValueError,
                 "packed with other n_labels", id="labels-changed"),
]


@pytest.mark.parametrize("op", [batched_heads, reference.batched_heads], ids=["triton", "reference"])
@pytest.mark.parametrize("mutate, exc, message", BAD)
def test_rejects_bad_arguments(mutate, exc, message, op):
    case = heads_case(rows=5, hidden=6, n_labels=[2, 3, 3], multi=[False, True, False], dtype=torch.float32,
                      row_heads=[[0, 1], [2], [], [0, 1, 2], [1]])
    with pytest.raises(exc, match=message):
        op(**mutate(case))
