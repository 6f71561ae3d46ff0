"""Fused multi-LoRA shrink + expand: ``y[i] += scale[s] * (x[i] @ A[s]) @ B[s]``, s = slots[i].

One program owns BLOCK_M rows of one slot and a range of output columns: it computes the shrink
``t = x[rows] @ A[s, :, :r]`` ([BLOCK_M, r], kept in registers, fp32) and goes straight on to the
expand, so the rank-r intermediate never touches memory (Punica's SGMV and vLLM's lora/ops split
this into two launches; with r <= 64 one tile of t is small enough to keep).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .checks import check_lora_args
from .layout import RowGroups, group_rows_by_slot


@triton.jit
def _lora_shrink_expand_kernel(
    x_ptr,  # x: [rows, K]
    y_ptr,  # y: [rows, N], updated in place
    a_ptr,  # A: [S, K, R]
    b_ptr,  # B: [S, R, N]
    order_ptr,  # order: [rows] int32, rows sorted by slot
    counts_ptr,  # counts: [S] int32, rows per slot
    starts_ptr,  # starts: [S] int32, first position of each slot in order
    ranks_ptr,  # ranks: [S] int
    scales_ptr,  # scales: [S] float32
    K, N, R,
    N_PER_PROG,  # output columns per program (a multiple of BLOCK_N)
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    FP32_EXACT: tl.constexpr,  # fp32 inputs: IEEE dot, and t stays fp32 for the expand
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    s = tl.program_id(2)
    count = tl.load(counts_ptr + s)
    rank = tl.minimum(tl.load(ranks_ptr + s), R)
    if pid_m * BLOCK_M >= count:
        return
    if rank == 0:
        return
    start = tl.load(starts_ptr + s)
    scale = tl.load(scales_ptr + s)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < count
    rows = tl.load(order_ptr + start + offs_m, mask=m_mask, other=0).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    a_base = a_ptr + s.to(tl.int64) * K * R
    b_base = b_ptr + s.to(tl.int64) * R * N

    # shrink: t[BLOCK_M, BLOCK_R] = x[rows, :] @ A[s, :, :rank]
    t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        xb = tl.load(x_ptr + rows[:, None] * K + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        ab = tl.load(a_base + offs_k[:, None] * R + offs_r[None, :], mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        if FP32_EXACT:
            t = tl.dot(xb, ab, t, input_precision="ieee")
        else:
            t = tl.dot(xb, ab, t)
    t = t * scale
    if not FP32_EXACT:
        t = t.to(x_ptr.dtype.element_ty)  # tensor cores take fp16/bf16 operands; accumulation stays fp32

    # expand: y[rows, n-range] += t @ B[s, :rank, n-range]
    n_begin = pid_n * N_PER_PROG
    n_end = tl.minimum(n_begin + N_PER_PROG, N)
    for n0 in range(n_begin, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < n_end
        bb = tl.load(b_base + offs_r[:, None] * N + offs_n[None, :], mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        if FP32_EXACT:
            d = tl.dot(t, bb, input_precision="ieee")
        else:
            d = tl.dot(t, bb)
        y_ptrs = y_ptr + rows[:, None] * N + offs_n[None, :]
        yx_mask = m_mask[:, None] & n_mask[None, :]
        yv = tl.load(y_ptrs, mask=yx_mask, other=0.0)
        tl.store(y_ptrs, (yv.to(tl.float32) + d).to(y_ptr.dtype.element_ty), mask=yx_mask)


def lora_shrink_expand(
    y: torch.Tensor,  # y: [rows, hidden_out], updated in place
    x: torch.Tensor,  # x: [rows, hidden_in]
    A: torch.Tensor,  # A: [max_slots, hidden_in, max_rank]
    B: torch.Tensor,  # B: [max_slots, max_rank, hidden_out]
    slots: torch.Tensor,  # slots: [rows] int, -1 = no adapter
    ranks: torch.Tensor,  # ranks: [max_slots] int, 0 <= ranks[s] <= max_rank
    scales: torch.Tensor,  # scales: [max_slots] float32
    *,
    groups: RowGroups | None = None,  # group_rows_by_slot(slots, max_slots), reused across layers
    validate: bool | None = None,  # value checks; None = on CPU only (a host sync on CUDA)
    block_m: int = 16,
    n_per_prog: int | None = None,  # output columns per program; None = a heuristic
) -> torch.Tensor:
    """Multi-LoRA delta, added to ``y`` in place; returns ``y``. Same math as the reference:

        for i in range(rows):
            s = slots[i]
            if s == -1: continue                       # row untouched, bit for bit
            r = ranks[s]
            y[i] = cast(y[i] + scales[s] * ((x[i] @ A[s, :, :r]) @ B[s, :r, :]))   # fp32 inside

    Grid: (cdiv(rows, block_m), cdiv(hidden_out, n_per_prog), max_slots); program (m, n, s) takes
    the m-th block of slot s's rows (exits at once when slot s has fewer rows), so the grid needs
    no host sync. fp16/bf16: both dots take fp16/bf16 operands (t is rounded once, after scaling)
    and accumulate in fp32; fp32: IEEE dots, nothing rounded before the final add.
    """
    check_lora_args(y, x, A, B, slots, ranks, scales, groups, validate)
    rows, k = x.shape
    max_slots, _, r = A.shape
    n = B.shape[2]
    if rows == 0 or max_slots == 0 or n == 0:
        return y
    if max_slots > 65535:  # CUDA's limit on grid axis 2
        raise ValueError(f"at most 65535 slots per launch, A has {max_slots}")
    if groups is None:
        groups = group_rows_by_slot(slots, max_slots)
    block_n = 64 if x.is_cuda else 128  # the interpreter prefers few, large tiles
    block_k = 64 if x.is_cuda else 128
    if n_per_prog is None:
        n_per_prog = n if not x.is_cuda or rows > 4 * max_slots else 2 * block_n
    n_per_prog = triton.cdiv(max(n_per_prog, 1), block_n) * block_n
    grid = (triton.cdiv(rows, block_m), triton.cdiv(n, n_per_prog), max_slots)
    _lora_shrink_expand_kernel[grid](
        x, y, A, B, groups.order, groups.counts, groups.starts, ranks, scales,
        k, n, r, n_per_prog,
        BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_N=block_n, BLOCK_R=max(16, triton.next_power_of_2(r)),
        FP32_EXACT=x.dtype == torch.float32,
    )
    return y
