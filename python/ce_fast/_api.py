"""The public functions. Each validates its options into a LossSpec, builds one
Batch, asks the batch's engine for per-row statistics (and the gradient), and
turns those into results with the shared rules."""

from __future__ import annotations

import functools
import math
from typing import Any

from . import _arrays, _batch, _plain, _rules
from ._spec import LossSpec, document_options
from ._types import Batch, Stats

#: NumPy, torch or CuPy arrays (anything with __array_interface__, __cuda_array_interface__
#: or DLPack); results come back in the input's library.
ArrayLike = Any


def _on_device(fn):
    """Runs `fn(logits, ...)` inside the logits' device scope (the CUDA device and
    torch's current stream; nothing on the CPU)."""

    @functools.wraps(fn)
    def call(logits, *args, **kwargs):
        with _batch.device_scope(logits):
            return fn(logits, *args, **kwargs)

    return call


def _stats(b: Batch, spec: LossSpec, *, grad: bool = False, given: Stats | None = None, argmax: Any = None) -> Stats:
    """The engine's per-row statistics; with `grad`, the gradient is written into b.out;
    `argmax` (int64, one per row, the engine's array module) receives each row's first
    maximum from the same pass."""
    coef = b.engine.apply(_rules.grad_coef, b, spec) if grad else None
    extra = {} if argmax is None else {"argmax": argmax}
    s = b.engine.run(
        b,
        scale=spec.logit_scale,
        softcap=spec.softcap_or_zero,
        want_wz=_rules.wants_wz(spec),
        grad=coef,
        out=b.out if grad else None,
        given=given,
        **extra,
    )
    if grad:
        _arrays.mark_written(b.out)
    return s


def _loss(b: Batch, spec: LossSpec, s: Stats) -> Any:
    """The loss the caller gets, from the statistics, in the logits' library."""
    return b.engine.wrap(b.engine.apply(_rules.loss, b, spec, s), b.x)


@_on_device
def logsumexp(logits: ArrayLike, *, out: ArrayLike | None = None) -> ArrayLike:
    """Log-sum-exp over the last axis, in one streaming pass.

    Parameters
    ----------
    logits : array of shape ``(*batch, C)``
        float32, float64, float16 or bfloat16; NumPy, torch (CPU/CUDA), CuPy or
        anything with ``__array_interface__``.
    out : array of shape ``batch``, optional
        float32 or float64 array (same library and device as ``logits``) to write into.

    Returns
    -------
    Array of shape ``batch``: float32 (float64 for float64 input), the same library
    as ``logits``. A row of only ``-inf`` gives ``-inf``, a row holding ``+inf`` (and
    no NaN) gives ``+inf``, a row holding NaN gives NaN, as ``torch.logsumexp``.
    """
    b = _batch.logits_batch(logits, out)
    s = b.engine.run(b, scale=1.0, softcap=0.0, want_wz=False)
    res = s.lse.astype(b.out_dtype).reshape(b.x.batch_shape)
    if b.out is None:
        return b.engine.wrap(res, b.x)
    b.engine.copy_into(b.out, res)
    return b.result


@document_options()
def cross_entropy(
    logits: ArrayLike,
    target: ArrayLike,
    *,
    weight: ArrayLike | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
) -> ArrayLike:
    """Cross-entropy of ``logits`` (class axis last) against ``target``.

    The semantics are ``torch.nn.functional.cross_entropy`` with the class axis
    moved last: ``cross_entropy(z, y)`` equals ``F.cross_entropy(z.movedim(-1, 1), y)``
    for ``(N, d1.., C)`` logits (a plain ``(N, C)`` needs no move).

    Parameters
    ----------
    logits : array ``(*batch, C)``, float32 / float64 / float16 / bfloat16.
    target : integer array ``batch`` of class indices, or a floating array of the
        logits' shape holding class probabilities (soft targets).
    {options}

    Returns
    -------
    0-d float32 array (float64 for float64 logits) for ``mean`` / ``sum``, or the per-row
    losses of shape ``batch`` for ``none``; the same library and device as ``logits``.

    Raises
    ------
    ValueError for wrong shapes, bad option values or mixed devices; TypeError for
    unsupported dtypes; IndexError for a target outside ``[0, C)`` that is not
    ``ignore_index``.
    """
    if _plain.plain_options(weight, ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale):
        loss = _plain_loss(logits, target, ignore_index, reduction)
        if loss is not None:
            return loss
    spec = LossSpec.make(
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
        logit_scale=logit_scale,
    )
    return _loss_and_stats(logits, target, spec, weight)[0]


def _plain_loss(logits, target, ignore_index: int, reduction: str) -> Any:
    """The lean path's result for host arrays with the plain options, or None."""
    if _arrays.is_torch(logits) and _arrays.is_torch(target):
        prep = _plain.torch_prepare(logits, target)
        if prep is None:
            return None
        d, t = prep
        return _plain.torch_forward(logits.detach(), d, t, ignore_index, reduction)[0]
    return _plain.numpy_loss(logits, target, ignore_index, reduction)


@_on_device
def _loss_and_stats(logits, target, spec: LossSpec, weight=None) -> tuple[Any, Stats]:
    """What :func:`cross_entropy` returns, and the per-row statistics behind it (mx, ls;
    swt for soft targets) that :func:`_grad_with_saved` needs. For ce_fast.torch's forward."""
    b = _batch.make_batch(logits, target, spec, weight)
    s = _stats(b, spec)
    return _loss(b, spec, s), s


@_on_device
@document_options()
def cross_entropy_and_grad(
    logits: ArrayLike,
    target: ArrayLike,
    *,
    weight: ArrayLike | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    grad_output: Any = 1.0,
    out: ArrayLike | None = None,
) -> tuple[ArrayLike, ArrayLike]:
    """Loss and its gradient in one fused pass per row.

    Takes every option of :func:`cross_entropy` and returns ``(loss, grad)`` where
    ``loss`` is exactly what ``cross_entropy`` returns and
    ``grad = d(grad_output * loss) / d(logits)`` has the logits' shape and dtype.

    {options}
    grad_output : a scalar, or for ``reduction="none"`` an array of the loss's shape.
    out : array to write the gradient into; ``out=logits`` overwrites the logits with
        their gradient (no rows x classes allocation). The true-class term is formed in
        float64 and rounded once into float16/bfloat16.
    """
    spec = LossSpec.make(
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
        logit_scale=logit_scale,
    )
    b = _batch.make_batch(logits, target, spec, weight, grad_output=grad_output, out=out)
    s = _stats(b, spec, grad=True)
    return _loss(b, spec, s), b.result


@_on_device
def _grad_with_saved(
    logits, target, saved: Stats, *, weight=None, grad_output=1.0, out=None, checked=False, **options
) -> ArrayLike:
    """The gradient only, from statistics saved by a forward call (mx and ls; swt for
    soft targets): one read and one write of the logits. For ce_fast.torch's backward.
    `checked`: target and weight are those the forward checked (not checked again)."""
    spec = LossSpec.make(**options)
    b = _batch.make_batch(logits, target, spec, weight, grad_output=grad_output, out=out, checked=checked)
    _stats(b, spec, grad=True, given=saved)
    return b.result


def _mean_ce(logits, target, ignore_index) -> float:
    return float(cross_entropy(logits, target, ignore_index=ignore_index, reduction="mean"))


def perplexity(logits: ArrayLike, target: ArrayLike, *, ignore_index: int = -100, base: str = "e") -> float:
    """``exp(mean cross-entropy)`` over the counted rows, as a Python float.

    ``base="2"`` computes ``2 ** (mean cross-entropy in bits)``: the same number.
    """
    if base not in ("e", "2"):
        raise ValueError(f"base must be 'e' or '2', got {base!r}")
    ce = _mean_ce(logits, target, ignore_index)
    try:
        return math.exp(ce) if base == "e" else 2.0 ** (ce / math.log(2.0))
    except OverflowError:
        return math.inf


def bits_per_token(logits: ArrayLike, target: ArrayLike, *, ignore_index: int = -100) -> float:
    """Mean cross-entropy in bits (``mean CE / ln 2``), as a Python float."""
    return _mean_ce(logits, target, ignore_index) / math.log(2.0)
