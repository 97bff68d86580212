"""Elementwise losses over logits: ``binary_cross_entropy_with_logits`` (PyTorch's
semantics) and ``sigmoid_focal_loss`` (torchvision's), with their gradients.

Unlike the cross-entropy family there is no class axis: every element of ``logits``
is one binary prediction and ``target`` has the logits' shape. Arguments are checked
here once; the engines (``_engines.binary_cpu`` / ``_engines.binary_cuda``) compute the
per-element losses, their sum and the gradient in one pass over the inputs.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from . import _arrays, _batch
from ._arrays import Operand
from ._binary_call import BCE, FOCAL, BinaryCall
from ._spec import REDUCTIONS, _real

ArrayLike = Any


def _engine(x: Operand):
    if x.is_cuda:
        from ._engines import binary_cuda

        return binary_cuda
    from ._engines import binary_cpu

    return binary_cpu


def _reduction(reduction: Any) -> str:
    if not isinstance(reduction, str):
        raise TypeError(f"reduction must be a str, got {type(reduction).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def _logits(logits: Any) -> Operand:
    x = _arrays.operand(logits, "logits")
    if x.code is None:
        raise TypeError(f"logits dtype {x.dtype_name} is not supported; expected {_arrays.SUPPORTED}")
    if x.is_cuda and x.code == _arrays.F64:
        raise TypeError("float64 logits are supported on the CPU only; use float32, float16 or bfloat16 on the GPU")
    return x


def _target(x: Operand, target: Any) -> Operand:
    t = _arrays.operand(target, "target")
    _batch.same_device(x, t, "target")
    kind = _batch.real_kind(target) if t.code is None else "f"
    if kind != "f":
        raise TypeError(
            f"target must be a floating array of the logits' shape (probabilities in [0, 1]), got {t.dtype_name}"
        )
    if t.code is None:
        raise TypeError(f"target dtype {t.dtype_name} is not supported; expected {_arrays.SUPPORTED}")
    if t.shape != x.shape:
        raise ValueError(f"target shape {t.shape} must be the same as logits shape {x.shape}")
    return t


def _weight(x: Operand, value: Any, name: str) -> Operand | None:
    """A weight broadcastable to the logits: real, finite and non-negative."""
    if value is None:
        return None
    w = _arrays.operand(value, name)
    _batch.same_device(x, w, name)
    if _batch.real_kind(value) not in "fiu":
        raise TypeError(f"{name} must hold real numbers (an integer or floating dtype), got {w.dtype_name}")
    try:
        shape = np.broadcast_shapes(w.shape, x.shape)
    except ValueError:
        shape = None
    if shape != x.shape:
        raise ValueError(f"{name} of shape {w.shape} does not broadcast to the logits' shape {x.shape}")
    finite, negative = _engine(x).check_weight(w)
    if not finite:
        raise ValueError(f"{name} must be finite")
    if negative is not None:
        raise ValueError(f"{name} must be non-negative; {name}{negative[0]} = {negative[1]}")
    return w


def _alpha_gamma(alpha: Any, gamma: Any) -> tuple[float, float]:
    a = _real(alpha, "alpha")
    g = _real(gamma, "gamma")
    if a > 1.0:
        raise ValueError(f"alpha must be at most 1 (a negative alpha turns the weighting off), got {alpha!r}")
    if g < 0.0:
        raise ValueError(f"gamma must be non-negative, got {gamma!r}")
    return a, g


def _grad_output(c: BinaryCall, value: Any) -> None:
    x = c.x
    g = _batch.grad_output_value(x, _engine(x), value, c.reduction, tuple(x.shape))
    if g.ndim == 0:
        s = float(g) if not x.is_cuda or isinstance(g, np.ndarray) else g
        if c.reduction == "mean":
            s = s / c.size if c.size else s * math.nan
        c.gscale, c.gout = s, None
        return
    c.gscale, c.gout = 1.0, g


def _out(c: BinaryCall, out: Any) -> None:
    x = c.x
    if out is None:
        c.result = _engine(x).empty_like(x)
        c.out = _arrays.operand(c.result, "out")
        return
    o = _batch.out_operand(out, x, x.shape, (x.code,), "the logits' shape")
    if not (o.ptr == x.ptr and o.strides == x.strides) and _batch.shares_memory(o, x):
        raise ValueError("out overlaps logits without being the same array; pass out=logits for in place")
    for name, op in (("target", c.t), ("weight", c.w), ("pos_weight", c.pw)):
        if op is not None and op.code is not None and _batch.shares_memory(o, op):
            raise ValueError(f"out overlaps the {name}")
    c.out, c.result = o, out


def _prepare(
    kind: int,
    logits: Any,
    target: Any,
    *,
    weight: Any = None,
    pos_weight: Any = None,
    reduction: Any,
    alpha: Any = 0.25,
    gamma: Any = 2.0,
    grad: bool = False,
    grad_output: Any = 1.0,
    out: Any = None,
) -> BinaryCall:
    red = _reduction(reduction)
    a, g = _alpha_gamma(alpha, gamma) if kind == FOCAL else (0.25, 2.0)
    x = _logits(logits)
    t = _target(x, target)
    w = _weight(x, weight, "weight")
    pw = _weight(x, pos_weight, "pos_weight")
    c = BinaryCall(kind=kind, x=x, t=t, w=w, pw=pw, reduction=red, alpha=a, gamma=g, grad=grad)
    if grad:
        _grad_output(c, grad_output)
        _out(c, out)
    elif out is not None:
        raise TypeError("out is only taken together with grad_output")
    return c


def _run(c: BinaryCall) -> Any:
    """The loss the caller gets; with ``c.grad`` the gradient is written into ``c.out``."""
    eng = _engine(c.x)
    total, per_element = eng.run(c)
    if c.grad:
        _arrays.mark_written(c.out)
    if c.reduction == "none":
        return eng.wrap(per_element, c.x)
    if c.reduction == "mean":
        total = total / c.size if c.size else total * math.nan
    return eng.wrap(eng.scalar(total, c.out_dtype, c.x), c.x)


def _call(kind: int, logits: Any, target: Any, **options: Any) -> tuple[Any, Any]:
    """(loss, gradient or None) of one public call, inside the logits' device scope."""
    with _batch.device_scope(logits):
        c = _prepare(kind, logits, target, **options)
        return _run(c), c.result


_SHARED_DOC = """
    Returns
    -------
    float32 (float64 for float64 logits): a 0-d array for ``mean`` / ``sum``, or the
    per-element losses of the logits' shape for ``none``; the same library and device as
    ``logits``. Empty input: ``mean`` is NaN, ``sum`` 0, ``none`` an empty array.

    Raises
    ------
    ValueError for shapes that do not match or broadcast, bad option values or mixed
    devices; TypeError for unsupported dtypes (``target`` must be floating)."""

_GRAD_DOC = """
    grad_output : a scalar, or for ``reduction="none"`` an array of the logits' shape.
    out : array to write the gradient into (the logits' shape and dtype); ``out=logits``
        overwrites the logits with their gradient.

    Returns ``(loss, grad)``: ``loss`` exactly as the loss function returns it and
    ``grad = d(grad_output * loss) / d(logits)`` with the logits' shape and dtype."""


def binary_cross_entropy_with_logits(
    logits: ArrayLike,
    target: ArrayLike,
    *,
    weight: ArrayLike | None = None,
    pos_weight: ArrayLike | None = None,
    reduction: str = "mean",
) -> ArrayLike:
    """Binary cross-entropy of ``sigmoid(logits)`` against ``target``, elementwise.

    Exactly ``torch.nn.functional.binary_cross_entropy_with_logits``: per element
    ``w * ((1 - t) * x - lw * log(sigmoid(x)))`` with ``lw = 1 + (pos_weight - 1) * t``,
    computed stably (``log(sigmoid(x)) = min(x, 0) - log1p(exp(-|x|))``). Every element
    is one prediction: ``logits`` may have any shape (no class axis), and ``mean``
    divides by the number of elements (weights do not enter the denominator).

    Parameters
    ----------
    logits : array of any shape; float32 / float64 / float16 / bfloat16.
    target : floating array of the logits' shape (probabilities, usually 0 or 1).
    weight : non-negative rescaling weights broadcastable to the logits' shape.
    pos_weight : non-negative weights of the positive term, broadcastable to the logits'
        shape (usually ``(C,)``, one per label along the last axis).
    reduction : ``"mean"`` (default), ``"sum"`` or ``"none"``.
    """
    return _call(BCE, logits, target, weight=weight, pos_weight=pos_weight, reduction=reduction)[0]


def binary_cross_entropy_with_logits_and_grad(
    logits: ArrayLike,
    target: ArrayLike,
    *,
    weight: ArrayLike | None = None,
    pos_weight: ArrayLike | None = None,
    reduction: str = "mean",
    grad_output: Any = 1.0,
    out: ArrayLike | None = None,
) -> tuple[ArrayLike, ArrayLike]:
    """:func:`binary_cross_entropy_with_logits` and its gradient with respect to ``logits``
    in one pass: ``w * (lw * sigmoid(x) - pos_weight * t)`` (``w * (sigmoid(x) - t)``
    without ``pos_weight``) times ``grad_output`` (divided by the count for ``mean``)."""
    return _call(
        BCE,
        logits,
        target,
        weight=weight,
        pos_weight=pos_weight,
        reduction=reduction,
        grad=True,
        grad_output=grad_output,
        out=out,
    )


def sigmoid_focal_loss(
    logits: ArrayLike,
    target: ArrayLike,
    *,
    alpha: float = 0.25,
    gamma: float = 2.0,
    reduction: str = "none",
) -> ArrayLike:
    """Sigmoid focal loss (Lin et al., RetinaNet), elementwise.

    Exactly ``torchvision.ops.sigmoid_focal_loss``: with ``p = sigmoid(x)``,
    ``ce = binary_cross_entropy_with_logits(x, t, reduction="none")`` and
    ``p_t = p * t + (1 - p) * (1 - t)``, the loss is
    ``alpha_t * ce * (1 - p_t) ** gamma`` with ``alpha_t = alpha * t + (1 - alpha) * (1 - t)``;
    a negative ``alpha`` turns the alpha weighting off. ``1 - p_t`` is formed as
    ``t * sigmoid(-x) + (1 - t) * sigmoid(x)`` so it keeps its precision near 0.

    Parameters
    ----------
    logits : array of any shape; float32 / float64 / float16 / bfloat16.
    target : floating array of the logits' shape (usually 0 or 1).
    alpha : at most 1 (default 0.25); negative: no alpha weighting.
    gamma : focusing exponent, ``>= 0`` (default 2).
    reduction : ``"none"`` (default, as torchvision), ``"mean"`` or ``"sum"``.
    """
    return _call(FOCAL, logits, target, reduction=reduction, alpha=alpha, gamma=gamma)[0]


def sigmoid_focal_loss_and_grad(
    logits: ArrayLike,
    target: ArrayLike,
    *,
    alpha: float = 0.25,
    gamma: float = 2.0,
    reduction: str = "none",
    grad_output: Any = 1.0,
    out: ArrayLike | None = None,
) -> tuple[ArrayLike, ArrayLike]:
    """:func:`sigmoid_focal_loss` and its gradient with respect to ``logits`` in one pass:
    ``alpha_t * ((p - t) * m**gamma + ce * gamma * m**(gamma - 1) * (1 - 2t) * p * (1 - p))``
    with ``m = 1 - p_t`` (0 where ``m == 0``), times ``grad_output``."""
    return _call(
        FOCAL,
        logits,
        target,
        reduction=reduction,
        alpha=alpha,
        gamma=gamma,
        grad=True,
        grad_output=grad_output,
        out=out,
    )


for _f in (binary_cross_entropy_with_logits, sigmoid_focal_loss):
    _f.__doc__ = (_f.__doc__ or "") + _SHARED_DOC
for _f in (binary_cross_entropy_with_logits_and_grad, sigmoid_focal_loss_and_grad):
    _f.__doc__ = (_f.__doc__ or "") + "\n" + _GRAD_DOC
