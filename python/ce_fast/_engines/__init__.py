"""The engines behind one :class:`ce_fast._types.Engine` protocol: :mod:`.cpu` (the Rust
kernels in ``_core``) for host arrays and :mod:`.cuda` (CUDA kernels through CuPy) for
device arrays. The CUDA engine is imported only when a CUDA array arrives."""

from __future__ import annotations

from .._arrays import Operand
from .._types import Engine


def engine_for(op: Operand) -> Engine:
    """The engine of an operand's device."""
    if op.is_cuda:
        from . import cuda

        return cuda
    from . import cpu

    return cpu
