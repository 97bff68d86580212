"""The CPU engine: a thin adapter from batches to the Rust kernels in `_core`."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import numpy as np

from .._arrays import Operand, _torch, is_torch, numpy_of
from .._arrays import wrap as wrap_numpy
from .._core import MAX_THREADS, default_threads
from .._core import run as run_kernels
from .._errors import first_out_of_range, index_error
from .._types import Batch, GradCoef, Stats

_threads = 0  # 0 = the default: RAYON_NUM_THREADS, or the CPUs this process may use


def xp() -> Any:
    return np


def set_threads(n: int) -> None:
    """Threads the CPU engine uses; 0 restores the default.

    At most ``MAX_THREADS`` (1024): more than any current machine has CPUs, and
    each thread costs a stack. The engine keeps one pool, rebuilt when the count changes.
    """
    global _threads
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"threads must be an int >= 0, got {n!r}")
    if n > MAX_THREADS:
        raise ValueError(f"threads must be at most {MAX_THREADS} (0 = the default), got {n}")
    _threads = n


def get_threads() -> int:
    return _threads or default_threads()


def apply(rule: Any, *args: Any, **options: Any) -> Any:
    """Runs a rule of :mod:`ce_fast._rules` (e.g. ``_rules.loss``) with NumPy."""
    return rule(*args, **options)


def capturing() -> bool:
    """Host work is never part of a CUDA graph capture."""
    return False


def to_float64(op: Operand) -> np.ndarray:
    return np.ascontiguousarray(numpy_of(op), dtype=np.float64)


def settle(checks: Any) -> None:
    """Runs each pending value check (values, raising function) on its host values."""
    for values, raise_for in checks:
        raise_for(np.asarray(values).tolist())


def index_targets(
    t: Operand, C: int, ignore_index: int, checked: bool = False, checks: Any = ()
) -> tuple[np.ndarray, np.ndarray]:
    """int64 class indices with -1 for ignored rows, and the mask of counted rows;
    `checks` (pending value checks, see :func:`settle`) are settled first. `checked`
    (targets an earlier call checked) changes nothing here: the scan is cheap."""
    settle(checks)
    a = np.asarray(numpy_of(t))
    bad = first_out_of_range(a, C, ignore_index, np)
    if bad is not None:
        raise index_error(*bad, C, ignore_index)
    valid = (a != ignore_index).reshape(-1)
    # int64 before the -1 marker: unsigned targets cannot hold it.
    idx = np.where(valid, a.reshape(-1).astype(np.int64), -1)
    return idx, valid


def run(
    b: Batch,
    *,
    scale: float,
    softcap: float,
    want_wz: bool,
    grad: GradCoef | None = None,
    out: Operand | None = None,
    given: Stats | None = None,
    argmax: np.ndarray | None = None,
) -> Stats:
    """Per-row statistics of the batch; with `grad`, the gradient is written into `out`.

    With `given` (mx, ls, and swt for soft targets, from an earlier call) only the
    gradient pass runs and `given` is returned. `argmax`, a C-contiguous int64 array of
    one entry per row, receives each row's first maximum (-1 for a row holding NaN) from
    the same pass; it is ignored with `given`.
    """
    rows = b.rows
    if given is not None:
        saved = Stats(mx=_f64(given.mx), ls=_f64(given.ls), swt=None if given.swt is None else _f64(given.swt))
        _call(b, scale, softcap, False, grad, out, None, saved)
        return given
    s = Stats(mx=np.empty(rows), ls=np.empty(rows))
    s.zy = np.zeros(rows) if b.target is not None else None
    s.swz = np.zeros(rows) if want_wz else None
    if b.soft is not None:
        s.swtz, s.swt = np.zeros(rows), np.zeros(rows)
    if argmax is not None and (argmax.dtype != np.int64 or argmax.size != rows or not argmax.flags.c_contiguous):
        raise ValueError(f"argmax must be a C-contiguous int64 array of {rows} entries")
    _call(b, scale, softcap, want_wz, grad, out, s, None, argmax)
    return s


def _f64(a: Any) -> np.ndarray:
    """A contiguous float64 vector (the engine refuses anything else)."""
    return np.ascontiguousarray(a, dtype=np.float64).reshape(-1)


def _call(
    b, scale, softcap, want_wz, grad, out, s: Stats | None, given: Stats | None, argmax: np.ndarray | None = None
) -> None:
    coef = None
    if grad is not None:
        coef = dataclasses.replace(grad, a0=_f64(grad.a0), b=_f64(grad.b), g=_f64(grad.g))
    run_kernels(
        b.x,
        target=None if b.target is None else np.ascontiguousarray(b.target, dtype=np.int64),
        # Always a private copy: the caller's weights may be unaligned or share memory with `out`.
        weight=None if b.weight is None else np.array(b.weight, dtype=np.float64),
        soft=b.soft,
        scale=float(scale),
        softcap=float(softcap),
        want_wz=bool(want_wz),
        stats=s,
        grad=coef,
        out=out if grad is not None else None,
        given=given,
        threads=_threads,
        argmax=argmax,
    )


def wrap(value: np.ndarray, like: Operand) -> Any:
    return wrap_numpy(value, like)


def copy_into(o: Operand, value: np.ndarray) -> None:
    if o.lib == "torch":
        o.array.copy_(wrap_numpy(value, o))
    else:
        np.copyto(o.array, value, casting="same_kind")


def empty_like(x: Operand) -> Any:
    """A C-contiguous array of the logits' shape, dtype and library."""
    if x.lib == "torch":
        torch = _torch()
        return torch.empty(x.shape, dtype=x.array.dtype)
    return np.empty(x.shape, dtype=numpy_of(x).dtype)


def writable(o: Operand) -> bool:
    return o.lib == "torch" or bool(o.array.flags.writeable)


def grad_output(value: Any, x: Operand) -> np.ndarray:
    """A real grad_output on the host (checked by the batch builder) as float64."""
    if is_torch(value):
        value = value.detach().double().numpy()
    return np.asarray(value, dtype=np.float64)


def scope(x: Operand) -> contextlib.AbstractContextManager:
    """Host arrays need no device or stream."""
    return contextlib.nullcontext()
