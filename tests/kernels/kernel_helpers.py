"""Inputs for the kernel tests: stacked adapters and packed heads with known awkward shapes."""

from __future__ import annotations

import math

import pytest
import torch

from headfleet.kernels.layout import pack_head_requests

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# fp16 runs under the Triton interpreter too (numpy has float16). bf16 does not: numpy has no
# bfloat16, and the interpreter's tl.dot on bf16 tiles gives wrong products, so bf16 is only
# checked where a GPU compiles the kernel.
_bf16_needs_cuda = pytest.mark.skipif(
    not CUDA, reason="bf16 needs a GPU: under the Triton interpreter tl.dot gives wrong bf16 products")

# (dtype, atol, rtol): fp32 is exact up to summation order; fp16/bf16 round the rank-r
# intermediate and the output once each.
DTYPES = [
    pytest.param(torch.float32, 1e-5, 1e-5, id="fp32"),
    pytest.param(torch.float16, 1e-2, 1e-2, id="fp16"),
    pytest.param(torch.bfloat16, 6e-2, 2e-2, id="bf16", marks=_bf16_needs_cuda),
]
RANKS = [1, 4, 8, 16, 64]
ADAPTER_COUNTS = [1, 8, 32, 128]
# (hidden_in, hidden_out): 1, primes, 2^n - 1, a real width (MiniLM 384)
HIDDEN_PAIRS = [(1, 1), (1, 384), (37, 127), (127, 1), (255, 37), (384, 384), (384, 768)]
HIDDEN_SIZES = [1, 37, 127, 255, 384]


def spread_slots(rows: int, n_slots: int, no_adapter_every: int = 5) -> torch.Tensor:
    """Every slot in turn, every ``no_adapter_every``-th row -1, then shuffled: [rows] int32."""
    slots = torch.arange(rows) % n_slots
    slots[no_adapter_every - 1::no_adapter_every] = -1
    return slots[torch.randperm(rows)].to(torch.int32)


def lora_case(rows: int, hidden_in: int, hidden_out: int, ranks: list[int], dtype: torch.dtype,
              slots: torch.Tensor | None = None, max_rank: int | None = None, pad: float = 0.0) -> dict:
    """Stacked adapters, one per entry of ``ranks`` (rank 0 = empty slot), unit-scale outputs.

    ``pad`` fills A's columns and B's rows past each slot's rank (the kernel must ignore them).
    """
    n_slots = len(ranks)
    max_rank = max_rank or max(max(ranks), 1)
    A = torch.full((n_slots, hidden_in, max_rank), pad)
    B = torch.full((n_slots, max_rank, hidden_out), pad)
    for s, r in enumerate(ranks):
        A[s, :, :r] = torch.randn(hidden_in, r) / math.sqrt(hidden_in)
        B[s, :r, :] = torch.randn(r, hidden_out) / math.sqrt(max(r, 1))
    if slots is None:
        slots = spread_slots(rows, n_slots)
    return {
        "y": torch.randn(rows, hidden_out).to(DEVICE, dtype),
        "x": torch.randn(rows, hidden_in).to(DEVICE, dtype),
        "A": A.to(DEVICE, dtype),
        "B": B.to(DEVICE, dtype),
        "slots": slots.to(DEVICE),
        "ranks": torch.tensor(ranks, dtype=torch.int32, device=DEVICE),
        "scales": (0.5 + torch.rand(n_slots)).to(DEVICE),
    }


def heads_case(rows: int, hidden: int, n_labels: list[int], multi: list[bool], dtype: torch.dtype,
               row_heads: list[list[int]] | None = None, heads_per_row: int = 3) -> dict:
    """Heads packed along W's columns (in a shuffled order, so offsets are not monotone), and a
    request where row i asks for ``row_heads[i]`` (default: 0..heads_per_row random heads)."""
    n_heads = len(n_labels)
    n = torch.tensor(n_labels, dtype=torch.int32)
    packed_order = torch.randperm(n_heads)
    offsets = torch.empty(n_heads, dtype=torch.int32)
    offsets[packed_order] = (torch.cumsum(n[packed_order], 0) - n[packed_order]).to(torch.int32)
    total = int(n.sum())
    if row_heads is None:
        row_heads = [torch.randint(0, n_heads, (int(torch.randint(0, heads_per_row + 1, ())),)).tolist()
                     for _ in range(rows)]
    return {
        "x": torch.randn(rows, hidden).to(DEVICE, dtype),
        "W": (torch.randn(hidden, total) * 2 / math.sqrt(hidden)).to(DEVICE, dtype),
        "b": torch.randn(total).to(DEVICE, dtype),
        "head_offsets": offsets.to(DEVICE),
        "n_labels": n.to(DEVICE),
        "multi_label": torch.tensor(multi, dtype=torch.bool, device=DEVICE),
        "requests": pack_head_requests(row_heads, n_labels, device=DEVICE),
    }


def clone(case: dict) -> dict:
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in case.items()}
