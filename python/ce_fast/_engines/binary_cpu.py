"""The CPU side of the elementwise losses (ce_fast._binary): NumPy views of every
operand, broadcast to the logits' shape without copying, handed to the Rust kernels."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .. import _arrays
from .._arrays import Layout, Operand, numpy_of
from .._core import run_binary
from . import cpu

if TYPE_CHECKING:
    from .._binary_call import BinaryCall

grad_output = cpu.grad_output
empty_like = cpu.empty_like
wrap = cpu.wrap


def _values(op: Operand) -> np.ndarray:
    return np.asarray(numpy_of(op))


def check_weight(w: Operand) -> tuple[bool, tuple[str, float] | None]:
    """(all finite, (position, value) of the first negative element or None)."""
    a = _values(w)
    if a.dtype.kind in "iu":
        return True, _first_negative(a) if a.dtype.kind == "i" else None
    a = a.astype(np.float32, copy=False) if w.code in (_arrays.F16, _arrays.BF16) else a
    if not bool(np.isfinite(a).all()):
        return False, None
    return True, _first_negative(a)


def _first_negative(a: np.ndarray) -> tuple[str, float] | None:
    neg = a < 0
    if not bool(neg.any()):
        return None
    pos = np.unravel_index(int(np.argmax(neg.reshape(-1))), a.shape) if a.ndim else ()
    return f"[{', '.join(str(int(i)) for i in pos)}]", float(a[pos])


_CODES = {
    np.dtype(np.float32): _arrays.F32,
    np.dtype(np.float64): _arrays.F64,
    np.dtype(np.float16): _arrays.F16,
}


def _layout(a: np.ndarray) -> Layout:
    """The engine's view of a NumPy array (at least 1-d) of a supported dtype."""
    code = _CODES.get(a.dtype, _arrays.BF16)
    item = a.dtype.itemsize
    ptr = a.__array_interface__["data"][0]
    return Layout(ptr, code, a.shape, tuple([s // item for s in a.strides]))


def _view(op: Operand, shape: tuple, float_dtype: Any) -> np.ndarray:
    """`op`'s values broadcast to `shape` (at least 1-d); integers become `float_dtype`."""
    a = _values(op)
    if op.code is None:
        a = a.astype(float_dtype)
    return np.broadcast_to(a, shape)


def run(c: BinaryCall) -> tuple[float, np.ndarray | None]:
    """(sum of the losses, per-element losses for reduction "none")."""
    shape = c.x.shape or (1,)
    loss = np.empty(c.x.shape, dtype=c.out_dtype) if c.reduction == "none" else None
    if c.size == 0:
        return 0.0, loss
    fdt = c.out_dtype
    x = _values(c.x).reshape(shape) if not c.x.shape else _values(c.x)
    t = _view(c.t, shape, fdt)
    w = None if c.w is None else _view(c.w, shape, fdt)
    pw = None if c.pw is None else _view(c.pw, shape, fdt)
    gout = None
    if c.grad and c.gout is not None:
        gout = np.ascontiguousarray(c.gout, dtype=np.float64).reshape(shape)
    grad = None
    if c.grad:
        assert c.out is not None
        grad = _values(c.out).reshape(shape) if not c.x.shape else _values(c.out)
    total = run_binary(
        c.kind,
        _layout(x),
        _layout(t),
        w=None if w is None else _layout(w),
        pw=None if pw is None else _layout(pw),
        loss=None if loss is None else _layout(loss.reshape(shape)),
        grad=None if grad is None else _layout(grad),
        gscale=float(c.gscale),
        gout=None if gout is None else _layout(gout),
        alpha=float(c.alpha),
        gamma=float(c.gamma),
        threads=cpu._threads,
    )
    return float(total), loss


def scalar(total: float, dtype: Any, x: Operand) -> np.ndarray:
    return np.asarray(total, dtype=dtype)
