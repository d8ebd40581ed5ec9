"""Lazy Triton JIT and dispatch shared by the ops.

Triton decides at import time whether `triton.language` (e.g. `tl.sum`) is compiled or interpreted, so
TRITON_INTERPRET=1 must be set before anything imports triton (tests/conftest.py does it on machines without
a GPU). Kernels are decorated on first use, once per mode, so importing this package imports no triton state.
"""

from __future__ import annotations

import os
from typing import Callable

import torch

_JIT_CACHE: dict[tuple[Callable, bool], Callable] = {}


def interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def jit(fn: Callable) -> Callable:
    """The `triton.jit` of `fn` for the current mode (compiled or interpreted), built once per mode."""
    key = (fn, interpret_mode())
    if key not in _JIT_CACHE:
        import triton

        _JIT_CACHE[key] = triton.jit(fn)
    return _JIT_CACHE[key]


def use_triton(x: torch.Tensor, impl: str) -> bool:
    """`impl`: "auto" (Triton on CUDA, or on CPU under TRITON_INTERPRET=1; float64 tensors take the reference,
    since the kernels accumulate in float32), "triton" or "reference"."""
    if impl == "reference":
        return False
    if impl == "triton":
        if not (x.is_cuda or interpret_mode()):
            raise RuntimeError("impl='triton' needs a CUDA tensor or TRITON_INTERPRET=1 for CPU tensors")
        return True
    if impl != "auto":
        raise ValueError(f"impl must be 'auto', 'triton' or 'reference', got {impl!r}")
    if x.dtype == torch.float64:
        return False
    return x.is_cuda or (interpret_mode() and x.device.type == "cpu")


def block_size(n: int, gpu_block: int = 2048) -> int:
    """Elements per program: moderate on GPU; large under the interpreter, whose cost is per program."""
    import triton

    cap = 1 << 16 if interpret_mode() else gpu_block
    return max(16, min(cap, triton.next_power_of_2(max(n, 1))))
