"""Multi-LoRA for whole sequences on CPU: each sequence's adapter gathered once, two batched matmuls.

    for b in rows_with_adapter:                       # one adapter per sequence (a text's tenant)
        s = slots[b]
        y[b] += scales[s] * (x[b] @ A[s, :, :R]) @ B[s, :R, :]     # x[b]: [seq, in], y[b]: [seq, out]

Punica's BGMV at sequence granularity: the gather copies one [in, R] and one [R, out] matrix per
sequence (not per token), and the work is two ``bmm`` launches per target linear whatever the
number of adapters in the batch — where the token-level reference runs a pair of matmuls per
adapter present. R is the widest rank in the batch; a narrower adapter's columns of A and rows of
B past its rank are zero in the stacked tensors (the SlotBank writes them so), so they add nothing.
Rows without an adapter are not touched. The Triton kernel (``lora.py``) serves GPUs; this is the
product's CPU path, checked against ``reference.lora_shrink_expand`` in the kernel tests.
"""

from __future__ import annotations

import torch


def lora_bmm(
    y: torch.Tensor,  # y: [batch, seq, out], updated in place
    x: torch.Tensor,  # x: [batch, seq, in]
    A: torch.Tensor,  # A: [max_slots, in, max_rank], zero past each slot's rank
    B: torch.Tensor,  # B: [max_slots, max_rank, out], zero past each slot's rank
    rows: torch.Tensor | None,  # rows: [k] int64, the sequences with an adapter; None = every sequence
    slots: torch.Tensor,  # slots: [k] int64, the adapter slot of each of those sequences
    scales: torch.Tensor,  # scales: [k] float, scales[slot] of each of those sequences
    rank: int,  # R: the widest rank among ``slots``
) -> torch.Tensor:
    if rank == 0 or slots.numel() == 0:
        return y
    xs = x if rows is None else x.index_select(0, rows)  # [k, seq, in]
    t = torch.bmm(xs, A[slots, :, :rank])  # shrink: [k, seq, R]
    delta = torch.bmm(t, B[slots, :rank, :]) * scales.to(t.dtype)[:, None, None]  # expand: [k, seq, out]
    if rows is None:
        y += delta.to(y.dtype)
    else:
        y.index_add_(0, rows, delta.to(y.dtype))
    return y
