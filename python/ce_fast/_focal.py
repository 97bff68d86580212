"""Focal loss over the class axis (last): the cross-entropy engine's per-row statistics
(max, log-sum, target logit) and the shared focal rules in :mod:`ce_fast._rules`."""

from __future__ import annotations

import math
import numbers
from typing import Any

from . import _arrays, _batch, _rules
from ._spec import LossSpec
from ._types import Batch, Stats

ArrayLike = Any


def _gamma(gamma) -> float:
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real):
        raise TypeError(f"gamma must be a real number, got {type(gamma).__name__}")
    g = float(gamma)
    if not math.isfinite(g) or g < 0.0:
        raise ValueError(f"gamma must be finite and >= 0, got {gamma!r}")
    return g


def _batch_for(logits, target, spec: LossSpec, alpha, **grad) -> Batch:
    """The cross-entropy batch (integer targets only) with the class factors alpha (the
    rules' alpha_y), whose values are checked with the target check (one read back)."""
    if target is not None and _batch.real_kind(target) == "f":
        raise TypeError("focal_loss takes integer class-index targets, got a floating target")
    if alpha is None:
        return _batch.make_batch(logits, target, spec, None, **grad)
    x = _batch.logits_operand(logits)
    engine = _batch.engine_for(x)  # the batch layer's choice of engine
    C = x.shape[-1]
    a = _arrays.operand(alpha, "alpha")
    _batch.same_device(x, a, "alpha")
    if _batch.real_kind(alpha) not in "fiu" or (a.code is None and _batch._kind(a) not in "iu"):
        raise TypeError(f"alpha must hold real numbers (an integer or floating dtype), got {a.dtype_name}")
    if len(a.shape) != 1 or a.shape[0] != C:
        raise ValueError(f"alpha must have shape ({C},) (one per class), got {a.shape}")
    av = engine.to_float64(a)
    probe = Batch(x=x, engine=engine, xp=engine.xp(), classes=C)
    b = _batch.make_batch(logits, target, spec, None, checks=[_batch.value_check(probe, av, "alpha", spec)], **grad)
    b.alpha = av
    return b


def _stats(b: Batch, *, grad=None, given: Stats | None = None) -> Stats:
    s = b.engine.run(
        b, scale=1.0, softcap=0.0, want_wz=False, grad=grad, out=b.out if grad is not None else None, given=given
    )
    if grad is not None:
        _arrays.mark_written(b.out)
    return s


def _loss(b: Batch, spec: LossSpec, s: Stats, gamma: float):
    return b.engine.wrap(b.engine.apply(_rules.focal_loss, b, spec, s, gamma=gamma), b.x)


def focal_loss(
    logits: ArrayLike,
    target: ArrayLike,
    *,
    gamma: float = 2.0,
    alpha: ArrayLike | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> ArrayLike:
    """Focal loss (Lin et al.) over the last axis: per row ``-alpha_y (1 - p_y)**gamma log p_y``
    with ``p = softmax(logits)``.

    Computed from the same one-pass per-row statistics as :func:`cross_entropy` (same
    speed); ``gamma=0, alpha=None`` equals ``cross_entropy`` exactly.

    Parameters
    ----------
    logits : array ``(*batch, C)``, float32 / float64 / float16 / bfloat16.
    target : integer array ``batch`` of class indices.
    gamma : focusing exponent >= 0 (default 2).
    alpha : None (default: 1 for every class) or ``(C,)`` non-negative class weights.
    ignore_index : rows whose target equals it (default -100) contribute 0, get a zero
        gradient and leave the mean.
    reduction : ``"mean"`` (default; the sum over counted rows divided by their number,
        with or without alpha), ``"sum"`` or ``"none"`` (per-row losses, 0 for ignored rows).

    Returns
    -------
    0-d float32 array (float64 for float64 logits) for ``mean`` / ``sum``, or per-row losses
    of shape ``batch``; the logits' library and device. Non-finite logits give what the
    float64 formula gives (a row holding NaN or +inf, or only -inf, is NaN).

    Raises
    ------
    ValueError for wrong shapes, bad option values or mixed devices; TypeError for
    unsupported dtypes; IndexError for a target outside ``[0, C)`` that is not ``ignore_index``.
    """
    return _focal_loss_and_stats(
        logits, target, gamma=gamma, alpha=alpha, ignore_index=ignore_index, reduction=reduction
    )[0]


def _focal_loss_and_stats(logits, target, *, gamma, alpha, ignore_index, reduction):
    g = _gamma(gamma)
    spec = LossSpec.make(ignore_index=ignore_index, reduction=reduction)
    with _batch.device_scope(logits):
        b = _batch_for(logits, target, spec, alpha)
        s = _stats(b)
        return _loss(b, spec, s, g), s


def focal_loss_and_grad(
    logits: ArrayLike,
    target: ArrayLike,
    *,
    gamma: float = 2.0,
    alpha: ArrayLike | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    grad_output: Any = 1.0,
    out: ArrayLike | None = None,
) -> tuple[ArrayLike, ArrayLike]:
    """The loss of :func:`focal_loss` and ``grad = d(grad_output * loss) / d(logits)``.

    The gradient has the cross-entropy form ``k_y (p_c - [c == y])`` with a per-row
    coefficient ``k_y`` from the rules, so the statistics pass is followed by one gradient
    pass (the logits are read twice and written once). Takes every option of
    :func:`focal_loss`, and:

    grad_output : a scalar, or for ``reduction="none"`` an array of the loss's shape.
    out : array to write the gradient into; ``out=logits`` overwrites the logits with
        their gradient (no rows x classes allocation).
    """
    g = _gamma(gamma)
    spec = LossSpec.make(ignore_index=ignore_index, reduction=reduction)
    with _batch.device_scope(logits):
        b = _batch_for(logits, target, spec, alpha, grad_output=grad_output, out=out)
        s = _stats(b)
        loss = _loss(b, spec, s, g)
        _stats(b, grad=b.engine.apply(_rules.focal_grad_coef, b, spec, s, gamma=g), given=s)
        return loss, b.result


def _focal_grad_with_saved(
    logits, target, saved: Stats, *, gamma, alpha, ignore_index, reduction, grad_output=1.0, out=None
):
    """The gradient only, from statistics saved by a forward call (for ce_fast.torch)."""
    g = _gamma(gamma)
    spec = LossSpec.make(ignore_index=ignore_index, reduction=reduction)
    with _batch.device_scope(logits):
        b = _batch_for(logits, target, spec, alpha, grad_output=grad_output, out=out)
        _stats(b, grad=b.engine.apply(_rules.focal_grad_coef, b, spec, saved, gamma=g), given=saved)
        return b.result
