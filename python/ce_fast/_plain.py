"""The lean path of the plain cross-entropy on the CPU: integer class targets and
``ignore_index``, no weights, smoothing, z-loss, softcap or scale, as a training
loop calls it. Small calls are dominated by what surrounds the pass, so the checks
here are a few attribute reads, and the target scan, per-row losses and gradient
coefficients are formed in one Rust call (``_core.plain_forward``). Anything else
(other options, dtypes, devices, empty arrays) returns None and the caller takes the
general path, which checks and words every error; a bad target raises the general
path's IndexError. The numbers are those of the general path, bit for bit.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _arrays, _errors
from ._arrays import Layout
from ._core import plain_backward, plain_forward
from ._engines import cpu

_REDUCTIONS = ("mean", "sum", "none")
_NUM = (int, float)
_NP_CODES = _arrays._NP_CODES


def plain_options(weight, ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale) -> bool:
    """Whether the options are the plain ones this path computes (valid by construction)."""
    return (
        weight is None
        and softcap is None
        and type(ignore_index) is int
        and type(reduction) is str
        and reduction in _REDUCTIONS
        and type(label_smoothing) in _NUM
        and label_smoothing == 0
        and type(z_loss) in _NUM
        and z_loss == 0
        and type(logit_scale) in _NUM
        and logit_scale == 1
    )


# ------------------------------------------------------------------ torch tensors

_torch_codes: dict | None = None


def torch_layout(t: Any) -> Layout | None:
    """The engine's view of a dense CPU tensor of a supported dtype, else None."""
    global _torch_codes
    if _torch_codes is None:
        _torch_codes = _arrays._torch_codes()
    code = _torch_codes.get(t.dtype)
    if code is None or t.device.type != "cpu" or t.layout is not _arrays._torch().strided or t.is_neg():
        return None
    return Layout(t.data_ptr(), code, t.shape, t.stride())


def torch_target(target: Any, batch: tuple) -> Any:
    """A contiguous int64 CPU target of the batch shape, or None."""
    torch = _arrays._torch()
    if target.dtype is not torch.int64 or target.device.type != "cpu" or target.layout is not torch.strided:
        return None
    if target.is_nested or tuple(target.shape) != batch:
        return None
    return target if target.is_contiguous() else target.contiguous()


def torch_prepare(input: Any, target: Any, inplace: bool = False) -> tuple | None:
    """(logits' layout, contiguous int64 target) when this path takes the tensors, else
    None. In place needs contiguous logits (no two positions on one element)."""
    if input.dim() == 0 or input.is_nested:
        return None
    d = torch_layout(input)
    if d is None or d.shape[-1] == 0 or (inplace and not input.is_contiguous()):
        return None
    t = torch_target(target, tuple(input.shape[:-1]))
    if t is None or t.numel() == 0:
        return None
    return d, t


def torch_forward(
    input: Any, d: Layout, t: Any, ignore_index: int, reduction: str, inplace: bool = False, grad_out: Any = None
) -> tuple[Any, np.ndarray, int]:
    """(loss, lse, counted rows) for `torch_prepare`'s tensors, lse a float64 (2, rows)
    NumPy array. The gradient of the loss (incoming gradient 1) is written into `input`
    with `inplace`, or into `grad_out`, a fresh contiguous tensor like `input`."""
    torch = _arrays._torch()
    # NumPy buffers: a small call spends more on torch.empty and .numpy() than in the pass.
    lse = np.empty((2, t.numel()))
    per = np.empty(t.numel())
    tv = t.numpy().reshape(-1)
    if inplace:
        out = d
    elif grad_out is not None:
        out = _fresh_layout(grad_out, input, d)
    else:
        out = None
    if out is not None:
        n = plain_forward(d, tv, ignore_index, lse, per, cpu._threads, go=1.0, mean=reduction == "mean", out=out)
    else:
        n = plain_forward(d, tv, ignore_index, lse, per, cpu._threads)
    if n < 0:
        raise _target_error(t.numpy(), -1 - n, d.shape[-1], ignore_index)
    f64 = input.dtype is torch.float64
    if reduction == "none":
        rows = torch.from_numpy(per)
        loss = (rows if f64 else rows.to(torch.float32)).reshape(t.shape)
    else:
        # from_numpy: a third of torch.tensor's cost; the same round to nearest float32.
        loss = torch.from_numpy(np.array(_total(per, reduction, n), dtype=np.float64 if f64 else np.float32))
    return loss, lse, n


def _target_error(t: np.ndarray, r: int, C: int, ignore_index: int) -> IndexError:
    """The general path's error for the first bad target, at flat row `r` of `t`."""
    pos = tuple(int(i) for i in np.unravel_index(r, t.shape)) if t.ndim else ()
    return _errors.index_error(pos, int(t.reshape(-1)[r]), C, ignore_index)


def torch_backward(
    grad: Any, input: Any, d: Layout, target: Any, ignore_index: int, reduction: str, lse: np.ndarray
) -> Any:
    """d(grad * loss)/d input from `torch_forward`'s lse (`d`: the logits' layout there):
    a fresh contiguous tensor."""
    torch = _arrays._torch()
    out = torch.empty(input.shape, dtype=input.dtype)
    od = _fresh_layout(out, input, d)
    tv = target.numpy().reshape(-1)
    if reduction == "none":
        go = grad.to(torch.float64).contiguous().reshape(-1).numpy()
        plain_backward(d, tv, ignore_index, lse, od, cpu._threads, go_rows=go)
    else:
        mean = reduction == "mean"
        plain_backward(d, tv, ignore_index, lse, od, cpu._threads, go=float(grad), mean=mean)
    return out


def _fresh_layout(out: Any, input: Any, d: Layout) -> Layout:
    """The layout of `out`, a fresh contiguous tensor of `input`'s shape and dtype (`d`:
    the layout of `input`, whose strides it shares when `input` is contiguous)."""
    if input.is_contiguous():
        return Layout(out.data_ptr(), d.code, d.shape, d.strides)
    od = torch_layout(out)
    assert od is not None  # a fresh dense tensor of a supported dtype
    return od


def _total(per: np.ndarray, reduction: str, n: int) -> float:
    """The reduced loss in float64, summed as the general rules sum it."""
    total = float(per.sum())
    if reduction == "mean":
        return total / n if n else float("nan")
    return total


# ------------------------------------------------------------------ NumPy arrays


def numpy_loss(logits: Any, target: Any, ignore_index: int, reduction: str) -> Any:
    """ce_fast.cross_entropy's result for NumPy arrays, or None: not this path."""
    if type(logits) is not np.ndarray or type(target) is not np.ndarray or logits.ndim == 0:
        return None
    code = _NP_CODES.get(logits.dtype)
    kind, size = target.dtype.kind, target.dtype.itemsize
    shape = logits.shape
    if code is None or not (kind == "i" or (kind == "u" and size < 8)) or target.shape != shape[:-1]:
        return None
    item = logits.itemsize
    strides = logits.strides
    if shape[-1] == 0 or logits.size == 0 or any(s % item for s in strides):
        return None
    t = np.asarray(target, dtype=np.int64, order="C")  # keeps 0-d (ascontiguousarray does not)
    rows = t.size
    lse = np.empty((2, rows))
    per = np.empty(rows)
    d = Layout(logits.__array_interface__["data"][0], code, shape, tuple([s // item for s in strides]))
    n = plain_forward(d, t.reshape(-1), ignore_index, lse, per, cpu._threads)
    if n < 0:
        raise _target_error(t, -1 - n, shape[-1], ignore_index)
    dtype = np.float64 if code == _arrays.F64 else np.float32
    with np.errstate(over="ignore"):  # a float64 loss beyond float32's range becomes inf
        if reduction == "none":
            return per.astype(dtype).reshape(shape[:-1])
        return np.asarray(_total(per, reduction, n), dtype=dtype)
