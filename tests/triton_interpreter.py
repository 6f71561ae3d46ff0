"""Import the Triton kernels so they run on CPU tensors, whichever test package gets there first.

Triton decides interpreter or compiler when a ``@triton.jit`` function is defined (the kernel
module's import), and defines its own library functions (tl.sigmoid, ...) when triton itself is
first imported; both must see TRITON_INTERPRET=1. Calls then read TRITON_INTERPRET again, so
tests set it around themselves only, and every other test in the same run keeps the product's
CPU path (the torch reference).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

KERNELS = ("headfleet.kernels.lora", "headfleet.kernels.heads")


def _interpreted(module) -> bool:
    return any(type(v).__name__ == "InterpretedFunction" for v in vars(module).values())


def prepare() -> str | None:
    """Import the kernel modules interpreted; returns why that is impossible, or None when ready."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if all(name in sys.modules for name in KERNELS):
        if all(_interpreted(sys.modules[name]) for name in KERNELS):
            return None
        return "the kernels were imported compiled (no TRITON_INTERPRET) earlier in this process"
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        return ("triton was imported in this process before the kernel tests, without TRITON_INTERPRET=1, "
                "so its kernels cannot run on CPU: run with TRITON_INTERPRET=1 set, or run these tests on their own")
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        for name in KERNELS:
            importlib.import_module(name)
    finally:
        if before is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = before
    return None
