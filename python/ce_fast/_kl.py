"""Distillation KL divergence between student and teacher logits (class axis last):
options validated once, one batch, the engine's one streaming pass over both rows,
and the shared rules (:func:`ce_fast._rules.kl_per_row`)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _arrays, _batch, _rules
from ._spec import LossSpec
from ._types import Batch, KlStats

ArrayLike = Any

_F32 = np.finfo(np.float32)


@dataclass(frozen=True)
class KlSpec:
    """The options of a kl_divergence call, after validation."""

    temperature: float = 1.0
    reverse: bool = False
    ignore_index: int = -100
    reduction: str = "mean"

    @classmethod
    def make(cls, *, temperature=1.0, reverse=False, ignore_index=-100, reduction="mean") -> KlSpec:
        if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
            raise TypeError(f"temperature must be a real number, got {type(temperature).__name__}")
        t = float(temperature)
        if not math.isfinite(t) or t <= 0.0:
            raise ValueError(f"temperature must be finite and > 0, got {temperature!r}")
        if not isinstance(reverse, (bool, np.bool_)):
            raise TypeError(f"reverse must be a bool, got {type(reverse).__name__}")
        base = LossSpec.make(ignore_index=ignore_index, reduction=reduction)
        return cls(t, bool(reverse), base.ignore_index, base.reduction)

    @property
    def loss_spec(self) -> LossSpec:
        return LossSpec(ignore_index=self.ignore_index, reduction=self.reduction)


def _kl_engine(b: Batch):
    """The KL pass of the batch's engine: kl_cuda beside the CUDA engine, kl_cpu beside the CPU one."""
    if getattr(b.engine, "__name__", "").endswith(".cuda"):
        from ._engines import kl_cuda

        return kl_cuda
    from ._engines import kl_cpu

    return kl_cpu


def _engine_pass(b: Batch, teacher, spec: KlSpec, *, g=None, given: KlStats | None = None) -> KlStats:
    kw = dict(inv_temp=1.0 / spec.temperature, reverse=spec.reverse, g=g, out=b.out if g is not None else None)
    s = _kl_engine(b).kl_pass(b.x, teacher, given=given, **kw)
    if g is not None:
        _arrays.mark_written(b.out)
    return s


_NO_GRAD = object()


def make_kl_batch(logits, teacher_logits, target, spec: KlSpec, *, grad_output: Any = _NO_GRAD, out=None):
    """Every argument of a KL call checked once: (batch, teacher operand)."""
    x = _batch.logits_operand(logits)
    t = _arrays.operand(teacher_logits, "teacher_logits")
    _batch.same_device(x, t, "teacher_logits")
    if t.code is None:
        raise TypeError(f"teacher_logits dtype {t.dtype_name} is not supported; expected {_arrays.SUPPORTED}")
    if t.shape != x.shape:
        raise ValueError(f"teacher_logits shape {t.shape} does not match logits shape {x.shape}")
    if t.is_cuda and t.code == _arrays.F64:
        raise TypeError("float64 logits are supported on the CPU only; use float32, float16 or bfloat16 on the GPU")
    f64 = _arrays.F64 in (x.code, t.code)
    if not f64 and not float(_F32.tiny) <= 1.0 / spec.temperature <= float(_F32.max):
        raise ValueError(
            f"temperature={spec.temperature!r} puts 1/temperature outside float32's range; "
            "logits are divided by it in float32 (use float64 logits for such values)"
        )
    engine = _batch.engine_for(x)
    xp = engine.xp()
    b = Batch(x=x, engine=engine, xp=xp, classes=x.shape[-1])
    if target is None:
        b.valid = xp.ones(x.rows, dtype=bool)
    else:
        y = _arrays.operand(target, "target")
        _batch.same_device(x, y, "target")
        if _batch.real_kind(target) not in "iu" or y.code is not None:
            raise TypeError(f"target dtype {y.dtype_name} is not supported; expected an integer dtype (class indices)")
        if y.shape != x.shape[:-1]:
            raise ValueError(
                f"target shape {y.shape} does not match logits shape {x.shape}: expected {x.shape[:-1]} "
                "(the class axis is the last axis of logits)"
            )
        b.target, b.valid = engine.index_targets(y, x.shape[-1], spec.ignore_index)
    if grad_output is not _NO_GRAD:
        b.grad_output = _batch._grad_output(b, grad_output, spec.reduction)
        if out is None:
            b.result = engine.empty_like(x)
            b.out = _arrays.operand(b.result, "out")
        else:
            b.out, b.result = _batch.grad_out_operand(b, out), out
            if _batch.shares_memory(b.out, t):
                raise ValueError("out overlaps teacher_logits; pass out=logits for in place")
    elif out is not None:
        raise TypeError("out is only taken together with grad_output")
    b.weight_total = float(x.shape[-1])
    return b, t


def _result(b: Batch, teacher, spec: KlSpec, s: KlStats):
    return b.engine.wrap(b.engine.apply(_rules.kl_loss, b, spec.loss_spec, s, reverse=spec.reverse), b.x)


_DOC_OPTIONS = """temperature : T > 0 (default 1); both logits are divided by it. The loss is *not*
        multiplied by ``T**2``: Hinton-style distillation multiplies by it itself, so that
        the gradient's size does not shrink as ``1/T**2``.
    reverse : False (default) for ``KL(p || q)`` (p the teacher's distribution, q the
        student's: distillation's usual choice), True for ``KL(q || p)``.
    target : optional integer array of shape ``batch`` (the CE labels): rows whose target
        equals ``ignore_index`` are left out (0 for ``none``, excluded from the mean, zero
        gradient). None (default) counts every row. Other values are not used, but must lie
        in ``[0, C)`` (else IndexError).
    ignore_index : default -100.
    reduction : ``"mean"`` (default; mean over counted rows: torch's ``batchmean`` per
        token), ``"sum"`` or ``"none"`` (per-row values of shape ``batch``)."""


def kl_divergence(
    logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    temperature: float = 1.0,
    reverse: bool = False,
    target: ArrayLike | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> ArrayLike:
    """KL divergence between the teacher's and the student's distributions, per row.

    With ``p = softmax(teacher_logits / T)`` and ``q = softmax(logits / T)`` (class axis
    last), each row's loss is ``KL(p || q) = sum_c p_c (log p_c - log q_c)``, or
    ``KL(q || p)`` with ``reverse=True``. Both arrays are read once, together, in one
    streaming pass per row (no softmax is materialised). It equals
    ``F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True,
    reduction="none").sum(-1)`` per row, where classes of zero probability in the
    reference distribution contribute 0 (``0 log 0 = 0``; torch's log_target form
    gives NaN for a -inf teacher logit).

    Parameters
    ----------
    logits : student logits ``(*batch, C)``; float32 / float64 / float16 / bfloat16.
    teacher_logits : the teacher's, of the same shape, any of those dtypes, same device.
    {options}

    Returns
    -------
    float32 (float64 for float64 ``logits``) 0-d array for ``mean`` / ``sum``, or per-row
    values of shape ``batch``; the logits' library and device. The pass runs in float32
    lanes, in float64 when either array is float64. A row holding NaN
    or +inf, or only -inf, in either array gives NaN (as float64 ``log_softmax`` does).

    Raises
    ------
    ValueError for mismatched shapes, bad option values or mixed devices; TypeError for
    unsupported dtypes; IndexError for a target outside ``[0, C)`` that is not ``ignore_index``.
    """
    spec = KlSpec.make(temperature=temperature, reverse=reverse, ignore_index=ignore_index, reduction=reduction)
    return _kl_loss_and_stats(logits, teacher_logits, target, spec)[0]


def _kl_loss_and_stats(logits, teacher_logits, target, spec: KlSpec):
    """The loss and the statistics behind it (for ce_fast.torch's backward)."""
    with _batch.device_scope(logits):
        b, t = make_kl_batch(logits, teacher_logits, target, spec)
        s = _engine_pass(b, t, spec)
        return _result(b, t, spec, s), s


def kl_divergence_and_grad(
    logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    temperature: float = 1.0,
    reverse: bool = False,
    target: ArrayLike | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    grad_output: Any = 1.0,
    out: ArrayLike | None = None,
) -> tuple[ArrayLike, ArrayLike]:
    """The loss of :func:`kl_divergence` and its gradient with respect to ``logits``.

    ``grad = d(grad_output * loss) / d(logits)``: ``(q - p) / T`` per counted row (times
    the reduction's factor), or ``q (log q - log p - KL) / T`` with ``reverse=True``,
    written chunk by chunk right after the row's statistics (the row is read twice,
    while it is in cache). No ``T**2`` factor (see :func:`kl_divergence`).

    {options}
    grad_output : a scalar, or for ``reduction="none"`` an array of the loss's shape.
    out : array of the logits' shape and dtype to write the gradient into; ``out=logits``
        overwrites the student logits with their gradient (no rows x classes allocation).
    """
    spec = KlSpec.make(temperature=temperature, reverse=reverse, ignore_index=ignore_index, reduction=reduction)
    with _batch.device_scope(logits):
        b, t = make_kl_batch(logits, teacher_logits, target, spec, grad_output=grad_output, out=out)
        g = b.engine.apply(_rules.row_grad_scale, b, spec.loss_spec)
        s = _engine_pass(b, t, spec, g=g)
        return _result(b, t, spec, s), b.result


def _kl_grad_with_saved(logits, teacher_logits, target, saved: KlStats, spec: KlSpec, *, grad_output=1.0, out=None):
    """The gradient only, from statistics saved by a forward call (for ce_fast.torch)."""
    with _batch.device_scope(logits):
        b, t = make_kl_batch(logits, teacher_logits, target, spec, grad_output=grad_output, out=out)
        g = b.engine.apply(_rules.row_grad_scale, b, spec.loss_spec)
        _engine_pass(b, t, spec, g=g, given=saved)
        return b.result


for _f in (kl_divergence, kl_divergence_and_grad):
    _f.__doc__ = (_f.__doc__ or "").replace("{options}", _DOC_OPTIONS)
