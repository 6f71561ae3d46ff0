"""Triton where it can run, the plain-torch reference elsewhere — and a count of which ran.

    use_triton(t)  True when Triton imports and t is on CUDA, or when TRITON_INTERPRET=1 is set
                   (the Triton interpreter runs kernels on CPU tensors; tests only, it is slow)

Every call through ``lora_shrink_expand`` / ``batched_heads`` here is counted per (op, path), so a
fallback is never silent: ``path_counts()`` for metrics, ``last_path(op)`` for a test or a log.
The kernel modules are imported on first use, so importing this costs nothing without Triton.
"""

from __future__ import annotations

import importlib
import os
import threading
from collections import Counter
from functools import lru_cache
from types import ModuleType

import torch

from . import reference
from .layout import HeadRequests, RowGroups

TRITON, TORCH = "triton", "torch"
_counts: Counter[tuple[str, str]] = Counter()
_last: dict[str, str] = {}
_lock = threading.Lock()


@lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether ``import triton`` works in this process (cached)."""
    try:
        importlib.import_module("triton")
    except Exception:  # ImportError, or a broken install raising something else at import
        return False
    return True


def interpret_forced() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(t: torch.Tensor) -> bool:
    """Whether a kernel on ``t``'s device takes the Triton path."""
    return triton_available() and (t.is_cuda or interpret_forced())


def _record(op: str, path: str) -> None:
    with _lock:
        _counts[(op, path)] += 1
        _last[op] = path


def record(op: str, path: str) -> None:
    """Count a call of ``op`` made on ``path`` outside this module (the CPU sequence path of LoRA)."""
    _record(op, path)


def path_counts() -> dict[str, int]:
    """Calls so far per ``"op:path"``, e.g. ``{"lora:triton": 12, "heads:torch": 3}``."""
    with _lock:
        return {f"{op}:{path}": n for (op, path), n in sorted(_counts.items())}


def last_path(op: str) -> str | None:
    """``"triton"`` or ``"torch"``: the path the latest call of ``op`` ("lora", "heads") took."""
    with _lock:
        return _last.get(op)


def reset_counts() -> None:
    with _lock:
        _counts.clear()
        _last.clear()


def _kernel(name: str) -> ModuleType:
    return importlib.import_module(f"{__package__}.{name}")


def lora_shrink_expand(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, slots: torch.Tensor,
                       ranks: torch.Tensor, scales: torch.Tensor, *, groups: RowGroups | None = None,
                       validate: bool | None = None) -> torch.Tensor:
    """``y[i] += scales[s] * (x[i] @ A[s, :, :r_s]) @ B[s, :r_s, :]`` in place, s = slots[i] != -1
    (see ``reference.lora_shrink_expand``), on whichever path ``use_triton(x)`` picks."""
    if use_triton(x):
        _record("lora", TRITON)
        return _kernel("lora").lora_shrink_expand(y, x, A, B, slots, ranks, scales, groups=groups, validate=validate)
    _record("lora", TORCH)
    return reference.lora_shrink_expand(y, x, A, B, slots, ranks, scales, groups=groups, validate=validate)


def batched_heads(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, head_offsets: torch.Tensor,
                  n_labels: torch.Tensor, multi_label: torch.Tensor, requests: HeadRequests, *,
                  out: torch.Tensor | None = None, validate: bool | None = None) -> torch.Tensor:
    """Packed probabilities of the heads each row asked for (see ``reference.batched_heads``), on
    whichever path ``use_triton(x)`` picks; a head wider than the kernel's tile goes to the
    reference and is counted as such."""
    if use_triton(x):
        heads = _kernel("heads")
        if requests.max_labels <= heads.MAX_LABELS:
            _record("heads", TRITON)
            return heads.batched_heads(x, W, b, head_offsets, n_labels, multi_label, requests, out=out,
                                       validate=validate)
    _record("heads", TORCH)
    return reference.batched_heads(x, W, b, head_offsets, n_labels, multi_label, requests, out=out,
                                   validate=validate)
