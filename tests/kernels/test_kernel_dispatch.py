"""The product's entry points pick Triton or torch per call, and say which one ran."""

from __future__ import annotations

import pytest
import torch

from kernel_helpers import CUDA, clone, heads_case, lora_case

from headfleet import kernels
from headfleet.kernels import dispatch, reference
from headfleet.kernels.heads import MAX_LABELS


@pytest.fixture(autouse=True)
def _fresh_counts():
    dispatch.reset_counts()
    yield
    dispatch.reset_counts()


def test_triton_path_is_taken_and_counted():
    case = lora_case(rows=20, hidden_in=37, hidden_out=37, ranks=[4, 8], dtype=torch.float32)
    assert kernels.use_triton(case["x"])
    ours = kernels.lora_shrink_expand(**clone(case))
    assert kernels.last_path("lora") == "triton"
    torch.testing.assert_close(ours, reference.lora_shrink_expand(**clone(case)), atol=1e-5, rtol=1e-5)
    h = heads_case(rows=6, hidden=37, n_labels=[2, 3], multi=[False, True], dtype=torch.float32)
    kernels.batched_heads(**h)
    assert kernels.path_counts() == {"heads:triton": 1, "lora:triton": 1}


@pytest.mark.skipif(CUDA, reason="the CPU fallback is what a machine without a GPU runs")
def test_cpu_without_interpreter_falls_back_to_torch_and_says_so(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    case = lora_case(rows=20, hidden_in=37, hidden_out=37, ranks=[4, 8], dtype=torch.float32)
    assert not kernels.use_triton(case["x"])
    ours = kernels.lora_shrink_expand(**clone(case))
    assert kernels.last_path("lora") == "torch"
    assert torch.equal(ours, reference.lora_shrink_expand(**clone(case)))
    kernels.lora_shrink_expand(**clone(case))
    assert kernels.path_counts() == {"lora:torch": 2}


def test_head_too_wide_for_the_kernel_goes_to_torch_counted():
    h = heads_case(rows=2, hidden=8, n_labels=[MAX_LABELS + 1], multi=[False], dtype=torch.float32,
                   row_heads=[[0], [0]])
    out = kernels.batched_heads(**h)
    assert kernels.last_path("heads") == "torch"
    assert kernels.path_counts() == {"heads:torch": 1}  # the fallback is counted, not silent
    torch.testing.assert_close(out.view(2, -1).sum(1), torch.ones(2, device=out.device))
    torch.testing.assert_close(out, reference.batched_heads(**h))
