"""The kernel tests run the real Triton kernels: on a GPU when there is one, else on CPU tensors
under the Triton interpreter.

Without a GPU this file imports the kernel modules interpreted (``tests/triton_interpreter.py``)
and sets TRITON_INTERPRET=1 around each test of this folder only: tests of other packages in the
same pytest run keep the product's CPU path (the torch reference).
"""

from __future__ import annotations

import pytest
import torch

from triton_interpreter import prepare

CUDA = torch.cuda.is_available()
_TOO_LATE = None if CUDA else prepare()


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
