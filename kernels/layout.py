"""Row bookkeeping shared by the kernels and their references: no Triton here, so the CPU path
imports it without Triton installed.

- ``group_rows_by_slot``: rows sorted by LoRA slot, as segments, computed on the device without a
  host sync; build it once per batch and pass it to every target linear of the forward.
- ``pack_head_requests``: "row i asked for heads H_i" as CSR on the host (where the request is
  built anyway), plus the same (row, head) pairs sorted by head for the kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch


@dataclass(frozen=True)
class RowGroups:
    """Rows grouped by adapter slot. Segment of slot s: ``order[starts[s] : starts[s] + counts[s]]``.

    Rows with slot -1 sort first and belong to no segment.
    """

    order: torch.Tensor  # [rows] int32: row indices sorted by slot (stable)
    counts: torch.Tensor  # [max_slots] int32: rows per slot
    starts: torch.Tensor  # [max_slots] int32: first position of slot s in ``order``
    max_slots: int


def group_rows_by_slot(slots: torch.Tensor, max_slots: int) -> RowGroups:
    """Sort rows by slot on ``slots.device``; no host sync (the kernel grid only needs ``max_slots``).

    Slot values must lie in [-1, max_slots); the LoRA launcher checks that (see its ``validate``).
    """
    # slots: [rows] int32 or int64
    if slots.dim() != 1:
        raise ValueError(f"slots must be 1-D [rows], got shape {tuple(slots.shape)}")
    key = slots.to(torch.int64) + 1  # 0 = no adapter, s + 1 = slot s
    per_key = torch.zeros(max_slots + 1, dtype=torch.int64, device=slots.device)
    per_key.index_add_(0, key, torch.ones_like(key))  # an out-of-range slot fails here, never silently
    first = torch.cumsum(per_key, 0) - per_key
    order = torch.argsort(key, stable=True)
    return RowGroups(order=order.to(torch.int32), counts=per_key[1:].to(torch.int32),
                     starts=first[1:].to(torch.int32), max_slots=max_slots)


@dataclass(frozen=True)
class HeadRequests:
    """Which heads each row asked for, and where each answer goes in the packed output.

    Request order (host, CSR): row i asked heads ``asked[head_ptr[i] : head_ptr[i + 1]]``; the
    q-th (row, head) pair of the request has its probabilities at ``out[out_ptr[q] : out_ptr[q + 1]]``,
    so the packed output is row 0's heads in the order asked, then row 1's, ...

    Kernel order (device): the same P pairs sorted by head, ``rows[p]``, ``heads[p]``,
    ``out_offsets[p]``; head ``seg_heads[j]`` owns pairs ``seg_starts[j] : seg_starts[j] + seg_counts[j]``.
    Build with ``pack_head_requests``; the fields must agree with each other.
    """

    n_rows: int
    head_ptr: np.ndarray  # [n_rows + 1] int64
    asked: np.ndarray  # [P] int64, head ids in request order
    out_ptr: np.ndarray  # [P + 1] int64
    rows: torch.Tensor  # [P] int32, sorted by head
    heads: torch.Tensor  # [P] int32, sorted by head
    out_offsets: torch.Tensor  # [P] int32, sorted by head
    seg_heads: np.ndarray  # [J] int64, the distinct heads asked
    seg_starts: np.ndarray  # [J] int64
    seg_counts: np.ndarray  # [J] int64
    total: int  # length of the packed output
    max_labels: int  # widest head asked (0 when nothing was asked)

    @property
    def n_pairs(self) -> int:
        return len(self.asked)

    def tiles(self, block_m: int) -> np.ndarray:
        """[T, 3] int32 (head, first pair, n pairs <= block_m): each head's pairs cut in blocks."""
        per_seg = -(-self.seg_counts // block_m)
        seg = np.repeat(np.arange(len(self.seg_counts)), per_seg)
        j = np.arange(len(seg)) - np.repeat(np.cumsum(per_seg) - per_seg, per_seg)
        first = self.seg_starts[seg] + j * block_m
        n = np.minimum(block_m, self.seg_starts[seg] + self.seg_counts[seg] - first)
        return np.stack([self.seg_heads[seg], first, n], axis=1).astype(np.int32)

    def unpack(self, out: torch.Tensor) -> list[list[torch.Tensor]]:
        """Per row, per head asked (request order): that head's probabilities, views of ``out``."""
        return [[out[self.out_ptr[q]: self.out_ptr[q + 1]] for q in range(self.head_ptr[i], self.head_ptr[i + 1])]
                for i in range(self.n_rows)]


def pack_head_requests(row_heads: Sequence[Sequence[int]], n_labels: Sequence[int] | np.ndarray,
                       device: torch.device | str | None = None) -> HeadRequests:
    """Build ``HeadRequests`` from, per row, the head ids it asked for (a row may ask for none).

    ``n_labels``: [n_heads] labels per head, on the host (the fleet knows it without a device sync).
    Raises ValueError for a head id outside [0, n_heads).
    """
    n_labels = np.asarray(n_labels, dtype=np.int64)
    counts = np.fromiter((len(h) for h in row_heads), dtype=np.int64, count=len(row_heads))
    head_ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    asked = np.fromiter((h for hs in row_heads for h in hs), dtype=np.int64, count=int(head_ptr[-1]))
    bad = (asked < 0) | (asked >= len(n_labels))
    if bad.any():
        raise ValueError(f"head id {int(asked[bad][0])} outside [0, {len(n_labels)})")
    widths = n_labels[asked]
    out_ptr = np.concatenate([[0], np.cumsum(widths)]).astype(np.int64)
    pair_rows = np.repeat(np.arange(len(row_heads), dtype=np.int64), counts)
    by_head = np.argsort(asked, kind="stable")
    seg_heads, seg_starts, seg_counts = np.unique(asked[by_head], return_index=True, return_counts=True)

    def dev(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int32)).to(device)

    return HeadRequests(
        n_rows=len(row_heads), head_ptr=head_ptr, asked=asked, out_ptr=out_ptr,
        rows=dev(pair_rows[by_head]), heads=dev(asked[by_head]), out_offsets=dev(out_ptr[:-1][by_head]),
        seg_heads=seg_heads.astype(np.int64), seg_starts=seg_starts.astype(np.int64),
        seg_counts=seg_counts.astype(np.int64), total=int(out_ptr[-1]),
        max_labels=int(widths.max()) if len(widths) else 0,
    )
