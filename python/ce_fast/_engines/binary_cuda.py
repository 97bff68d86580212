"""The GPU side of the elementwise losses (ce_fast._binary): kernels/binary.cu through
CuPy, on raw addresses and strides (bfloat16 torch tensors need no CuPy dtype).

Each operand is seen as rows x cols with one row stride: the batch dims are collapsed
on the host; an operand whose batch dims do not collapse (rare views) is copied once on
the device. Weights are converted to float32 on the device (a copy of their own size).
The kernel writes per-block f64 loss sums; their total stays on the device, so a call
never waits for the GPU (apart from checking the weights' values, when given)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import _arrays
from .._arrays import Operand, _torch
from . import cuda

if TYPE_CHECKING:
    from .._binary_call import BinaryCall

KERNEL_FILE = "binary.cu"
BLOCK = 256  # BX_BLOCK in binary.cu
TILE = 1024  # BX_TILE
X_TYPES = {_arrays.F32: "float", _arrays.F16: "bx_half", _arrays.BF16: "bx_bf16"}
T_TYPES = {_arrays.F32: "float", _arrays.F64: "double", _arrays.F16: "bx_half", _arrays.BF16: "bx_bf16"}

# (name, kind) of bx_binary's parameters, in order: p pointer, q int64, d double, i int32, f float32.
PARAMS = (
    ("x", "p"), ("x_rs", "q"), ("x_cs", "q"),
    ("t", "p"), ("t_rs", "q"), ("t_cs", "q"),
    ("w", "p"), ("w_rs", "q"), ("w_cs", "q"),
    ("pw", "p"), ("pw_rs", "q"), ("pw_cs", "q"),
    ("go", "p"), ("gptr", "p"), ("gmul", "d"),
    ("loss", "p"), ("grad", "p"), ("g_rs", "q"), ("g_cs", "q"),
    ("partial", "p"), ("rows", "q"), ("cols", "q"), ("kind", "i"), ("alpha", "f"), ("gamma", "f"),
)  # fmt: skip
grad_output = cuda.grad_output
empty_like = cuda.empty_like
wrap = cuda.wrap


def kernel_name(x_code: int, t_code: int) -> str:
    return f"bx_binary<{X_TYPES[x_code]}, {T_TYPES[t_code]}>"


def names() -> list[str]:
    """Every instantiation the engine may launch (one module holds them all)."""
    return [kernel_name(x, t) for x in X_TYPES for t in T_TYPES]


def kernel_args(**values: Any) -> tuple:
    return cuda.typed_args("bx_binary", PARAMS, values)


_kernel_file = cuda.KernelFile(KERNEL_FILE, lambda: {"binary": names()})


def _function(name: str):
    """The kernel `name`, compiled with the module on first use in the process."""
    return _kernel_file.function("binary", name)


# ---------------------------------------------------------------- operands


def _array(op: Operand) -> Any:
    a = op.array
    return a[0] if isinstance(a, tuple) else a


def _broadcast_strides(op: Operand, shape: tuple) -> tuple:
    """`op`'s strides (elements) for its values broadcast to `shape`."""
    lead = len(shape) - len(op.shape)
    st = [0] * lead
    for n, s in zip(op.shape, op.strides):
        st.append(0 if n == 1 else s)
    return tuple(st)


def _rows_cols(shape: tuple, strides: tuple) -> tuple[int, int, int, int] | None:
    """(rows, cols, row stride, col stride) when the batch dims collapse, else None."""
    if not shape:
        return 1, 1, 0, 0
    cols, cs = shape[-1], strides[-1]
    dims = [(n, s) for n, s in zip(shape[:-1], strides[:-1]) if n != 1]
    rows = math.prod(shape[:-1])
    if not dims:
        return rows, cols, 0, cs
    for (_, s0), (n1, s1) in zip(dims, dims[1:]):
        if s0 != s1 * n1:
            return None
    return rows, cols, dims[-1][1], cs


def _contiguous(op: Operand, shape: tuple, dtype: Any = None) -> tuple[Any, int]:
    """A C-contiguous device copy of `op` broadcast to `shape` (as `dtype`), and its address."""
    a = _array(op)
    if op.lib == "torch":
        torch = _torch()
        t = a.to(torch.float32) if dtype is not None else a
        c = t.broadcast_to(shape).contiguous()
        return c, c.data_ptr()
    xp = cuda.xp()
    c = xp.ascontiguousarray(xp.broadcast_to(a if dtype is None else a.astype(dtype), shape))
    return c, cuda._ptr(c)


def _float32(op: Operand) -> tuple[Any, Operand]:
    """A float32 device copy of a weight (its own shape), as an operand."""
    a = _array(op)
    if op.lib == "torch":
        c = a.to(_torch().float32).contiguous()
    else:
        c = cuda.xp().ascontiguousarray(a, dtype=np.float32)
    return c, _arrays.operand(c, "weight")


def _layout(op: Operand, shape: tuple, keep: list, float32: bool = False) -> tuple[int, int, int]:
    """(address, row stride, col stride) of `op` broadcast to `shape`, copied when needed."""
    if float32:
        c, op = _float32(op)
        keep.append(c)
    rc = _rows_cols(shape, _broadcast_strides(op, shape))
    if rc is None:
        c, ptr = _contiguous(op, shape)
        keep.append(c)
        return ptr, shape[-1] if shape else 0, 1
    return op.ptr, rc[2], rc[3]


def check_weight(w: Operand) -> tuple[bool, tuple[str, float] | None]:
    """(all finite, (position, value) of the first negative element or None); one sync."""
    xp = cuda.xp()
    a = cuda.to_float64(w)
    if not bool(xp.all(xp.isfinite(a))):
        return False, None
    neg = a < 0
    if not bool(xp.any(neg)):
        return True, None
    flat = int(xp.argmax(neg.reshape(-1)))
    pos = np.unravel_index(flat, a.shape) if a.ndim else ()
    return True, (f"[{', '.join(str(int(i)) for i in pos)}]", float(a.reshape(-1)[flat]))


def _grid(rows: int, cols: int, dev: int) -> int:
    sms, _ = cuda._device_info(dev)
    tiles = rows * -(-cols // TILE)
    return max(1, min(tiles, sms * 8))


def run(c: BinaryCall) -> tuple[Any, Any]:
    """(device sum of the losses as a 0-d float64 array, per-element losses for "none")."""
    xp = cuda.xp()
    shape = c.x.shape
    loss = xp.empty(shape, dtype=np.float32) if c.reduction == "none" else None
    if c.size == 0:
        return xp.zeros((), dtype=np.float64), loss
    keep: list = []
    rc = _rows_cols(shape, c.x.strides)
    x_ptr, x_rs, x_cs = (c.x.ptr, rc[2], rc[3]) if rc is not None else _layout(c.x, shape, keep)
    rows, cols = math.prod(shape[:-1]) if shape else 1, shape[-1] if shape else 1
    t = _layout(c.t, shape, keep)
    w = (0, 0, 0) if c.w is None else _layout(c.w, shape, keep, float32=True)
    pw = (0, 0, 0) if c.pw is None else _layout(c.pw, shape, keep, float32=True)
    g_ptr, g_rs, g_cs, g_tmp = 0, 0, 0, None
    if c.grad:
        assert c.out is not None
        grc = _rows_cols(shape, c.out.strides)
        if grc is None:  # a destination whose batch dims do not collapse: via a temporary
            g_tmp = empty_like(c.x)
            g_ptr, g_rs, g_cs = _arrays.operand(g_tmp, "out").ptr, cols, 1
        else:
            g_ptr, g_rs, g_cs = c.out.ptr, grc[2], grc[3]
    gptr, gmul = 0, 1.0
    if isinstance(c.gscale, (int, float)):
        gmul = float(c.gscale)
    else:  # a device scalar (grad_output on the GPU): read by the kernel
        g64 = xp.asarray(c.gscale, dtype=np.float64).reshape(())
        keep.append(g64)
        gptr = g64
    go = None
    if c.gout is not None:
        go = xp.ascontiguousarray(c.gout, dtype=np.float64)
        keep.append(go)
    grid = _grid(rows, cols, cuda._device_id(c.x))
    partial = xp.empty(grid, dtype=np.float64)
    args = kernel_args(
        x=x_ptr, x_rs=x_rs, x_cs=x_cs,
        t=t[0], t_rs=t[1], t_cs=t[2],
        w=w[0], w_rs=w[1], w_cs=w[2],
        pw=pw[0], pw_rs=pw[1], pw_cs=pw[2],
        go=go, gptr=gptr, gmul=gmul,
        loss=loss, grad=g_ptr, g_rs=g_rs, g_cs=g_cs,
        partial=partial, rows=rows, cols=cols, kind=c.kind, alpha=c.alpha, gamma=c.gamma,
    )  # fmt: skip
    assert c.x.code is not None and c.t.code is not None  # checked by ce_fast._binary
    _function(kernel_name(c.x.code, c.t.code))((grid,), (BLOCK,), args)
    if g_tmp is not None and c.out is not None:
        if c.out.lib == "torch":
            c.out.array.copy_(g_tmp)
        else:
            cuda.copy_into(c.out, g_tmp)
    return partial.sum(), loss


def scalar(total: Any, dtype: Any, x: Operand) -> Any:
    return cuda.xp().asarray(total).astype(dtype)
