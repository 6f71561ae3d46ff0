"""The kernel tests run the real Triton kernels: on a GPU when there is one, else on CPU tensors
under the Triton interpreter.

Triton picks the interpreter when a ``@triton.jit`` function is defined, i.e. when the kernel
module is imported, and reads TRITON_INTERPRET again while interpreting. So, without a GPU, this
file imports the kernel modules with TRITON_INTERPRET=1 and sets it around each test of this folder
only: tests of other packages in the same pytest run keep the product's CPU path (the torch
reference), however the run was started.
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
_KERNELS = ("headfleet.kernels.lora", "headfleet.kernels.heads")
# Triton's own library functions (tl.sigmoid, ...) are defined when triton is first imported, so
# the interpreter works only if that import already saw TRITON_INTERPRET=1.
_TOO_LATE = None if CUDA or os.environ.get("TRITON_INTERPRET") == "1" or "triton" not in sys.modules else (
    "triton was imported in this process before tests/kernels, without TRITON_INTERPRET=1, so its "
    "kernels cannot run on CPU: run with TRITON_INTERPRET=1 set, or run tests/kernels on its own")


def _import_interpreted() -> None:
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        for name in _KERNELS:
            importlib.import_module(name)
    finally:
        if before is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = before


if not CUDA and _TOO_LATE is None and importlib.util.find_spec("triton") is not None:
    _import_interpreted()


@pytest.fixture(autouse=True)
def _interpret_on_cpu(monkeypatch):
    if _TOO_LATE:
        pytest.fail(_TOO_LATE)
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def seed() -> int:
    """Every test starts from the same generator state, whatever ran before it."""
    torch.manual_seed(0)
    return 0


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The interpreter runs tile by tile on tiny matrices: worker threads only fight the other
    tenants of a small shared CPU. Module scope: restored after."""
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1, user_api="blas"):
        yield
    torch.set_num_threads(before)
