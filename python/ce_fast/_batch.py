"""From user arguments to one engine-ready batch: operands, target indices,
weights and the per-row masks the loss rules need. Shapes, dtypes, devices and
target ranges are checked here, once, for every engine."""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from typing import Any

import numpy as np

from . import _arrays, _errors, _rules
from ._arrays import Operand
from ._engines import engine_for
from ._spec import LossSpec
from ._types import Batch


def device_scope(logits: Any) -> contextlib.AbstractContextManager[Any]:
    """Context for one public call on `logits`: for CUDA arrays the engine makes their
    device current and, for torch tensors, torch's current stream CuPy's current stream,
    so every kernel and CuPy operation of the call (rules included) is ordered with
    the caller's torch work. A no-op on the CPU."""
    if isinstance(logits, np.ndarray) or not _arrays.device_of(logits).startswith("cuda"):
        return contextlib.nullcontext()
    x = _arrays.operand(logits, "logits")
    return _LogitsScope(engine_for(x).scope(x), logits, x)


_scoped = threading.local()  # .pair: (logits, their operand) of this thread's innermost device scope


class _LogitsScope:
    """An engine's scope for one call that lends its logits' operand to the call's batch
    (:func:`logits_operand`), so the operand is not built twice."""

    __slots__ = ("_inner", "_pair", "_saved")

    def __init__(self, inner: contextlib.AbstractContextManager[Any], logits: Any, x: Operand) -> None:
        self._inner, self._pair, self._saved = inner, (logits, x), None

    def __enter__(self) -> Any:
        value = self._inner.__enter__()
        self._saved = getattr(_scoped, "pair", None)
        _scoped.pair = self._pair
        return value

    def __exit__(self, *exc: Any) -> Any:
        _scoped.pair = self._saved
        return self._inner.__exit__(*exc)


def logits_operand(logits: Any) -> Operand:
    pair = getattr(_scoped, "pair", None)
    x = pair[1] if pair is not None and pair[0] is logits else _arrays.operand(logits, "logits")
    if x.code is None:
        raise TypeError(f"logits dtype {x.dtype_name} is not supported; expected {_arrays.SUPPORTED}")
    if len(x.shape) == 0:
        raise ValueError("logits must have at least one dimension (the class axis, last); got a 0-d array")
    if x.shape[-1] == 0:
        raise ValueError(f"logits have zero classes: shape {x.shape} (the class axis is the last)")
    if x.is_cuda and x.code == _arrays.F64:
        raise TypeError("float64 logits are supported on the CPU only; use float32, float16 or bfloat16 on the GPU")
    return x


def same_device(x: Operand, other: Operand, name: str) -> None:
    if other.device != x.device:
        raise _errors.device_mismatch(x.device, name, other.device)


_kinds: dict[str, str] = {}  # dtype name -> kind letter (np.dtype(name) costs microseconds)


def _kind(op: Operand) -> str:
    """NumPy's dtype kind letter ('f', 'i', 'u', ...) of any operand, torch dtypes included."""
    if op.code is not None:
        return "f"
    kind = _kinds.get(op.dtype_name)
    if kind is None:
        try:
            kind = np.dtype(op.dtype_name).kind
        except TypeError:
            kind = "?"
        if len(_kinds) < 256:
            _kinds[op.dtype_name] = kind
    return kind


_F32 = np.finfo(np.float32)


def check_options_for(x: Operand, spec: LossSpec) -> None:
    """Options the engines apply in float32 lanes (all logits but float64) must be
    float32 numbers: refused, never silently rounded to inf or to 0 (softcap 0 = off)."""
    if x.code == _arrays.F64:
        return
    for name, v in (("softcap", spec.softcap), ("logit_scale", spec.logit_scale)):
        if v is not None and v != 0.0 and not float(_F32.tiny) <= abs(v) <= float(_F32.max):
            raise ValueError(
                f"{name}={v!r} is outside float32's range [{float(_F32.tiny):.3g}, {float(_F32.max):.4g}]; "
                f"{x.dtype_name} logits are transformed in float32 (use float64 logits for such values)"
            )


def real_kind(value: Any) -> str:
    """NumPy's dtype kind letter of a scalar or array of any supported library."""
    if _arrays.is_torch(value):
        if value.dtype.is_complex:
            return "c"
        return "b" if value.dtype == _arrays._torch().bool else "f" if value.dtype.is_floating_point else "i"
    dtype = getattr(value, "dtype", None)
    if dtype is not None:
        try:
            return np.dtype(dtype).kind
        except TypeError:
            return "?"
    try:
        return np.asarray(value).dtype.kind
    except Exception:
        return "?"


def _grad_output(b: Batch, value: Any, reduction: str) -> Any:
    """grad_output as float64: a 0-d host array, or an array of the loss's shape (reduction
    "none" only) on the logits' device. Host scalars go with logits on any device."""
    return grad_output_value(b.x, b.engine, value, reduction, tuple(b.x.batch_shape))


def grad_output_value(x: Operand, engine: Any, value: Any, reduction: str, loss_shape: tuple) -> Any:
    """A checked grad_output for a loss of shape `loss_shape` over the logits `x`, as the
    `engine`'s float64 (a 0-d host array, or an array of `loss_shape` on x's device; an
    array only with reduction "none")."""
    if value is None or real_kind(value) not in "fiu":
        raise TypeError(f"grad_output must be a real number or an array of real numbers, got {value!r:.80}")
    dev = _arrays.device_of(value)
    if dev != x.device and not (dev == "cpu" and np.ndim(value) == 0):
        if dev == "cpu":
            raise ValueError(
                f"logits are on {x.device} but grad_output is a host array of shape {np.shape(value)}; "
                "ce_fast never copies between devices, pass a scalar or an array on the logits' device"
            )
        raise _errors.device_mismatch(x.device, "grad_output", dev)
    g = engine.grad_output(value, x)
    if g.ndim == 0:
        return g
    if reduction != "none":
        raise ValueError(f"grad_output must be a scalar for reduction={reduction!r}, got shape {tuple(g.shape)}")
    if tuple(g.shape) != loss_shape:
        raise ValueError(f"grad_output must be a scalar or have the loss's shape {loss_shape}, got {tuple(g.shape)}")
    return g


def logits_batch(logits: Any, out: Any = None) -> Batch:
    """The batch of a call that reads only the logits (logsumexp), with its optional
    float32 / float64 destination of the batch shape."""
    x = logits_operand(logits)
    engine = engine_for(x)
    b = Batch(x=x, engine=engine, xp=engine.xp(), classes=x.shape[-1])
    if out is not None:
        what = f"logits shape {x.shape} without its last axis"
        b.out = out_operand(out, x, x.batch_shape, (_arrays.F32, _arrays.F64), what)
        b.result = out
    return b


_NO_GRAD = object()


def make_batch(
    logits: Any,
    target: Any,
    spec: LossSpec,
    weight: Any = None,
    *,
    grad_output: Any = _NO_GRAD,
    out: Any = None,
    checked: bool = False,
    checks: list | None = None,
) -> Batch:
    """Every argument of a loss call checked once: logits, target, weight, and for a
    gradient call (`grad_output` given) grad_output and the destination `out` (a fresh
    array of the logits' kind when None). `checked`: the values of target and weight
    were checked by an earlier call (a backward reusing its forward's check): their
    shapes and dtypes are checked, their values not again (no host sync for them).
    `checks`: the caller's pending value checks (see :func:`value_check`), read back
    with the target check."""
    b = _loss_batch(logits, target, spec, weight, checked, list(checks or ()))
    if grad_output is not _NO_GRAD:
        b.grad_output = _grad_output(b, grad_output, spec.reduction)
        if out is None:
            b.result = b.engine.empty_like(b.x)
            b.out = _arrays.operand(b.result, "out")
        else:
            b.out, b.result = grad_out_operand(b, out), out
    elif out is not None:
        raise TypeError("out is only taken together with grad_output")
    return b


def _loss_batch(
    logits: Any, target: Any, spec: LossSpec, weight: Any, checked: bool = False, checks: list | None = None
) -> Batch:
    x = logits_operand(logits)
    check_options_for(x, spec)
    engine = engine_for(x)
    xp = engine.xp()
    C = x.shape[-1]
    t = _arrays.operand(target, "target")
    same_device(x, t, "target")
    b = Batch(x=x, engine=engine, xp=xp, classes=C)
    checks = checks if checks is not None else []  # (values, raising function): read back once

    if weight is not None:
        w = _arrays.operand(weight, "weight")
        same_device(x, w, "weight")
        if _kind(w) not in "fiu":
            raise TypeError(f"weight must hold real numbers (an integer or floating dtype), got {w.dtype_name}")
        if len(w.shape) != 1 or w.shape[0] != C:
            raise ValueError(f"weight must have shape ({C},) (one per class), got {w.shape}")
        b.weight = wa = engine.to_float64(w)
        check = value_check(b, wa, "weight", spec)
        # On a device the sum stays there (a 0-d array the rules use as is): no sync.
        b.weight_total = float(check[0][2]) if xp is np else check[0][2]
        if not checked:  # read back with the target check (one sync for both on a device)
            checks.append(check)
    else:
        b.weight_total = float(C)

    if _kind(t) == "f":
        if t.shape != x.shape:
            raise ValueError(
                f"soft (probability) target must have the logits' shape {x.shape}, got {t.shape}; "
                f"class-index targets have shape {x.shape[:-1]} and an integer dtype"
            )
        if t.code is None:
            raise TypeError(f"soft target dtype {t.dtype_name} is not supported; expected {_arrays.SUPPORTED}")
        if spec.ignore_index != -100:
            raise ValueError("ignore_index is not supported with soft (probability) targets")
        b.soft = t
        b.valid = xp.ones(x.rows, dtype=bool)
        engine.settle(checks)
        return b

    if _kind(t) not in "iu":
        raise TypeError(
            f"target dtype {t.dtype_name} is not supported; expected an integer dtype "
            "(class indices) or a floating dtype of the logits' shape (probabilities)"
        )
    if t.shape != x.shape[:-1]:
        raise ValueError(
            f"target shape {t.shape} does not match logits shape {x.shape}: expected {x.shape[:-1]} "
            "(the class axis is the last axis of logits)"
        )
    b.target, b.valid = engine.index_targets(t, C, spec.ignore_index, checked=checked, checks=checks)
    return b  # b.wy, the target weights, follow when a rule asks (_rules.target_weight)


def value_check(b: Batch, wa: Any, what: str, spec: LossSpec) -> tuple:
    """The pending check of class factors `wa` (float64, one per class; `what`: their name
    in the messages): (the engine's :func:`ce_fast._rules.weight_summary` of them, the
    function raising for its host values). On a device one generated kernel computes
    the summary; make_batch reads it back together with the target check."""
    tmp = Batch(x=b.x, engine=b.engine, xp=b.xp, classes=b.classes, weight=wa)
    summary = b.engine.apply(_rules.weight_summary, tmp, spec)  # (non-finite, first negative, sum)
    return summary, functools.partial(_weight_errors, wa=wa, what=what)


def _weight_errors(summary: Any, wa: Any, what: str) -> None:
    """Raises for the host values of :func:`ce_fast._rules.summarize_weights`; a non-finite
    weight is reported first."""
    nonfinite, first_negative = summary[0], summary[1]
    if nonfinite:
        raise ValueError(f"{what} must be finite")
    if first_negative < math.inf:
        bad = int(first_negative)
        raise ValueError(f"{what} must be non-negative; {what}[{bad}] = {float(wa[bad])}")


# ---------------------------------------------------------------- destinations (`out=`)

_ITEMSIZE = {_arrays.F32: 4, _arrays.F64: 8, _arrays.F16: 2, _arrays.BF16: 2}


def _address_view(op: Operand) -> np.ndarray:
    """A NumPy array with `op`'s addresses and layout, for address arithmetic only: it is
    never read (the memory may be on a GPU)."""
    assert op.code is not None  # floating operands only
    item = _ITEMSIZE[op.code]

    class _Layout:
        __array_interface__ = {
            "data": (op.ptr, True),
            "shape": tuple(op.shape),
            "strides": tuple(s * item for s in op.strides),
            "typestr": f"|V{item}",
            "version": 3,
        }

    return np.asarray(_Layout())


def _empty(op: Operand) -> bool:
    return any(n == 0 for n in op.shape)


def shares_memory(a: Operand, b: Operand) -> bool:
    """Whether two operands on one device have an element in common (exact, so disjoint
    interleaved views such as ``z[:, ::2]`` and ``z[:, 1::2]`` do not count)."""
    if _empty(a) or _empty(b):
        return False
    too_hard = getattr(np, "exceptions", np).TooHardError
    try:
        # NumPy's stub allows only its two named settings; a work bound is documented API.
        return bool(np.shares_memory(_address_view(a), _address_view(b), max_work=100_000))  # type: ignore[arg-type]
    except too_hard:
        return True  # cannot be decided cheaply: refuse rather than risk a race


def internal_overlap(op: Operand) -> bool:
    """Whether two positions of `op` may address the same element (``expand``-ed or
    ``as_strided`` views): conservative, as PyTorch's check for written tensors."""
    if _empty(op):
        return False
    span = 1  # elements reachable by the smaller strides, plus one
    for stride, n in sorted((abs(s), n) for n, s in zip(op.shape, op.strides) if n > 1):
        if stride < span:
            return True
        span += stride * (n - 1)
    return False


def out_operand(out: Any, x: Operand, shape: tuple, codes: tuple, what: str) -> Operand:
    """Checks a destination array: the logits' library and device, `shape`, a dtype
    code in `codes`, writable, and no two positions on one element."""
    o = _arrays.operand(out, "out", out=True)
    same_device(x, o, "out")
    if o.shape != shape:
        raise ValueError(f"out must have shape {shape} ({what}), got {o.shape}")
    if o.code not in codes:
        names = " or ".join(_arrays.CODE_NAMES[c] for c in codes)
        raise TypeError(f"out must be {names}, got {o.dtype_name}")
    if not engine_for(x).writable(o):
        raise ValueError("out is read-only")
    if internal_overlap(o):
        raise ValueError(
            f"out has strides {o.strides} (in elements) for shape {o.shape}: several of its positions "
            "share one memory location (an expanded or as_strided view); pass an array with its own memory"
        )
    return o


def grad_out_operand(b: Batch, out: Any) -> Operand:
    """The destination of a gradient: the logits' shape and dtype, and either exactly the
    logits (in place) or memory shared with neither the logits nor the soft target."""
    x = b.x
    o = out_operand(out, x, x.shape, (x.code,), "the logits' shape")
    if not (o.ptr == x.ptr and o.strides == x.strides) and shares_memory(o, x):
        raise ValueError("out overlaps logits without being the same array; pass out=logits for in place")
    if b.soft is not None and shares_memory(o, b.soft):
        raise ValueError("out overlaps the soft target")
    return o
