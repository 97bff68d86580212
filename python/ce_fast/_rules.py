"""The loss and gradient rules, written once for every engine.

Engines return per-row statistics of the transformed logits z (after
logit_scale and softcap), all float64:

- ``mx``, ``ls``  the row maximum and log(sum(exp(z - mx))): lse = mx + ls, kept
  apart so that ``lse - z_y = (mx - z_y) + ls`` keeps ls when |mx| is huge
- ``zy``   the target logit (integer targets)
- ``swz``  sum_c w_c (z_c - mx) (w = 1 without weights; only with label smoothing)
- ``swt``, ``swtz``  sum_c w_c t_c and sum_c w_c t_c (z_c - mx) (soft targets t)

With eps = label_smoothing, W = sum_c w_c and C classes, per row:

- integer target y: ``(1-eps) w_y (lse - z_y) + eps/C sum_c w_c (lse - z_c) + z_loss lse^2``
  where ``sum_c w_c (lse - z_c) = W ls - swz``
- soft target t' = (1-eps) t + eps/C: ``sum_c w_c t'_c (lse - z_c) + z_loss lse^2``
  ``= ls sum(w t') - sum(w t' (z - mx))``

as torch.nn.functional.cross_entropy (class axis last). The mean divides by the
sum of the target weights of counted rows (integer targets) or the row count
(soft targets). Everything here uses the array module ``xp`` of the engine
(NumPy or CuPy), so the rules run where the statistics are.
"""

from __future__ import annotations

import numpy as np

from ._spec import LossSpec
from ._types import Batch, GradCoef, KlStats, Stats

__all__ = [
    "GradCoef",
    "Stats",
    "denominator",
    "grad_coef",
    "loss",
    "per_row",
    "reduce",
    "summarize_weights",
    "target_weight",
    "wants_wz",
    "weight_summary",
]


def wants_wz(spec: LossSpec) -> bool:
    return spec.label_smoothing > 0.0


def target_weight(b: Batch):
    """float64 weight of each row's target, 0 for ignored rows (1 for counted rows without
    class weights): ``b.wy``, computed on first use (a rule run on the device computes
    it inside its own kernel). The focal loss's alpha takes the place of the weights."""
    if b.wy is None:
        xp = b.xp
        w = b.weight if b.weight is not None else b.alpha
        if w is None:
            b.wy = b.valid.astype(xp.float64)
        else:
            b.wy = xp.where(b.valid, w[xp.maximum(b.target, 0)], 0.0)
    return b.wy


def summarize_weights(xp, w, classes: int):
    """float64 (3,): the number of non-finite weights, the index of the first negative one
    (inf when none; NaN is not negative) and their sum: what the weight checks and the
    rules need, in one pass (on the GPU one generated kernel, read back with the target
    check)."""
    nonfinite = xp.where(xp.isfinite(w), 0.0, 1.0).sum()
    first_negative = xp.where(w < 0.0, xp.arange(classes), xp.inf).min()
    return xp.stack([nonfinite, first_negative, w.sum()])


def weight_summary(b: Batch, spec: LossSpec):
    """:func:`summarize_weights` of the batch's class weights (a rule: engines apply it)."""
    return summarize_weights(b.xp, b.weight, b.classes)


def loss(b: Batch, spec: LossSpec, s: Stats):
    """What a cross-entropy call returns, from the per-row statistics: :func:`reduce` of
    :func:`per_row` (engines run it as one rule; the GPU engine as one kernel)."""
    return reduce(b, spec, per_row(b, spec, s))


def per_row(b: Batch, spec: LossSpec, s: Stats):
    """float64 loss of every row (0 for ignored rows)."""
    xp = b.xp
    eps = spec.label_smoothing
    C = b.classes
    with _quiet(xp):
        if b.soft is not None:
            swt = s.swt
            swtz = s.swtz
            if eps > 0.0:
                swt = (1.0 - eps) * swt + (eps / C) * b.weight_total
                # torch sums w t' (z - mx) with t' = (1-eps) t + eps/C: a -inf logit of positive
                # weight (swz = -inf) makes it -inf where w t' > 0 (t >= 0), also at t = 0 or
                # eps = 1, where the split sums give 0 * -inf = NaN. An eps / C that
                # underflows to 0 leaves t' = (1-eps) t, without the weights-only sum.
                if eps / C == 0.0:
                    swtz = (1.0 - eps) * swtz
                else:
                    swtz_split = (1.0 - eps) * swtz + (eps / C) * s.swz
                    swtz = xp.where((s.swz == -xp.inf) & _smoothing_reaches_all(b, eps / C), -xp.inf, swtz_split)
            loss = s.ls * swt - swtz
        else:
            loss = target_weight(b) * ((s.mx - s.zy) + s.ls)
            if eps > 0.0:
                loss = (1.0 - eps) * loss + (eps / C) * (b.weight_total * s.ls - s.swz)
        if spec.z_loss > 0.0:
            lse = s.lse
            loss = loss + spec.z_loss * lse * lse
        # float64 log_softmax of a row holding NaN or +inf, or of only -inf, is NaN.
        loss = xp.where(xp.isfinite(s.mx), loss, xp.nan)
        return xp.where(b.valid, loss, 0.0)


def _smoothing_reaches_all(b: Batch, smooth: float):
    """Whether every class of positive weight w gets a positive smoothing share w * eps / C
    (the smallest positive weight times eps / C does not underflow). An array of the
    engine (0-d), never read back on the host: no device sync."""
    xp = b.xp
    if b.weight is None:
        return xp.asarray(smooth > 0.0)
    w = b.weight
    smallest = xp.where(w > 0, w, xp.inf).min()  # inf: no positive weight
    return (smallest < xp.inf) & (smallest * smooth > 0.0)


def denominator(b: Batch):
    """What the mean divides by: sum of target weights of counted rows (a 0-d array of the
    engine, left on the device), or the row count."""
    if b.soft is not None:
        return float(b.rows)
    return target_weight(b).sum()


def reduce(b: Batch, spec: LossSpec, rows_loss):
    """The returned loss in the output dtype: 0-d for mean/sum, batch-shaped for none.
    Computed where the statistics are, never read back on the host (no device sync)."""
    xp = b.xp
    with _quiet(xp):  # a float64 loss beyond float32's range becomes inf, as it should
        if spec.reduction == "none":
            return rows_loss.astype(b.out_dtype).reshape(b.x.batch_shape)
        total = rows_loss.sum()
        if spec.reduction == "mean":
            den = denominator(b)
            total = xp.where(den != 0.0, total / xp.where(den != 0.0, den, 1.0), xp.nan)
        return xp.asarray(total, dtype=b.out_dtype)


def grad_coef(b: Batch, spec: LossSpec) -> GradCoef:
    """Per-row gradient coefficients of ``b.grad_output * loss``."""
    grad_output = b.grad_output
    xp = b.xp
    eps = spec.label_smoothing
    C = b.classes
    rows = b.rows
    if spec.reduction == "none":
        go = xp.broadcast_to(xp.asarray(grad_output, dtype=xp.float64), b.x.batch_shape).reshape(rows)
    else:
        # A host scalar stays a Python float; a device grad_output stays on the device.
        go = float(grad_output) if _on_host(grad_output) else xp.asarray(grad_output, dtype=xp.float64)
        if spec.reduction == "mean":
            den = denominator(b)
            go = xp.where(den != 0.0, go / xp.where(den != 0.0, den, 1.0), go * 0.0)
    g = xp.where(b.valid, go, 0.0)
    smooth = eps / C
    if b.soft is not None:
        a0 = smooth * b.weight_total  # a 0-d device array with weights on a device
        return GradCoef(
            a0=xp.full(rows, a0) if isinstance(a0, float) else xp.zeros(rows) + a0,
            b=xp.zeros(rows),
            g=g,
            a_lse=2.0 * spec.z_loss,
            a_swt=1.0 - eps,
            d=smooth,
            e=1.0 - eps,
        )
    wy = target_weight(b)
    return GradCoef(
        a0=(1.0 - eps) * wy + smooth * b.weight_total,
        b=(1.0 - eps) * wy,
        g=g,
        a_lse=2.0 * spec.z_loss,
        a_swt=0.0,
        d=smooth,
        e=0.0,
    )


def _on_host(value) -> bool:
    """A Python number or a NumPy value (reading it needs no device sync)."""
    return isinstance(value, (int, float, np.ndarray, np.generic))


class _quiet:
    """Silences NumPy's warnings for inf - inf and 0 * inf, which the rules mean."""

    def __init__(self, xp):
        self.ctx = xp.errstate(invalid="ignore", over="ignore", divide="ignore") if hasattr(xp, "errstate") else None

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


# ---------------------------------------------------------------- distillation KL


def count_reduce(b: Batch, spec: LossSpec, rows_loss):
    """As :func:`reduce`, the mean dividing by the number of counted rows (KL, focal).
    Left on the device (no sync), as :func:`reduce`."""
    xp = b.xp
    with _quiet(xp):
        if spec.reduction == "none":
            return rows_loss.astype(b.out_dtype).reshape(b.x.batch_shape)
        total = rows_loss.sum()
        if spec.reduction == "mean":
            den = b.valid.astype(xp.float64).sum()
            total = xp.where(den != 0.0, total / xp.where(den != 0.0, den, 1.0), xp.nan)
        return xp.asarray(total, dtype=b.out_dtype)


def row_grad_scale(b: Batch, spec: LossSpec):
    """float64 factor of each row's gradient: grad_output, over the number of counted rows
    for ``mean``, 0 for rows that do not count. Nothing is read back on the host."""
    xp = b.xp
    grad_output = b.grad_output
    with _quiet(xp):
        if spec.reduction == "none":
            go = xp.broadcast_to(xp.asarray(grad_output, dtype=xp.float64), b.x.batch_shape).reshape(b.rows)
        else:
            go = float(grad_output) if _on_host(grad_output) else xp.asarray(grad_output, dtype=xp.float64)
            if spec.reduction == "mean":
                den = b.valid.astype(xp.float64).sum()
                go = xp.where(den != 0.0, go / xp.where(den != 0.0, den, 1.0), go * 0.0)
        return xp.where(b.valid, go, 0.0)


def kl_per_row(b: Batch, s: KlStats, reverse: bool):
    """float64 KL of every row (0 for rows left out) from the engines' KL statistics.

    With r the reference distribution's logits over T (the teacher's for KL(p || q), the
    student's for KL(q || p)) and o the other's, ``cross = E_r[r - o]`` and
    ``KL = cross - lse_r + lse_o``, the maxima and log-sums kept apart so that large
    common offsets cancel exactly. A row holding NaN or +inf, or only -inf, in either
    array is NaN (its float64 log_softmax is).
    """
    xp = b.xp
    with _quiet(xp):
        if reverse:
            (mr, lr), (mo, lo) = (s.ms, s.ls), (s.mt, s.lt)
        else:
            (mr, lr), (mo, lo) = (s.mt, s.lt), (s.ms, s.ls)
        loss = s.cross - (mr - mo) - (lr - lo)
        return xp.where(b.valid, loss, 0.0)


def kl_loss(b: Batch, spec: LossSpec, s: KlStats, reverse: bool):
    """What a kl_divergence call returns, from the KL statistics."""
    return count_reduce(b, spec, kl_per_row(b, s, reverse))


# ---------------------------------------------------------------- focal loss


def _focal_parts(b: Batch, s: Stats, gamma: float):
    """Per-row float64 (u, om, p) of the focal rules: u = -log p_y = (mx - zy) + ls (the
    cross-entropy of the row, the very value cross_entropy uses), p = p_y = exp(-u) and
    om = 1 - p_y = -expm1(-u) (exact near p_y = 1)."""
    xp = b.xp
    u = (s.mx - s.zy) + s.ls
    p = xp.exp(-u)
    om = xp.maximum(-xp.expm1(-u), 0.0)  # u may round a hair below 0
    return u, om, p


def focal_per_row(b: Batch, s: Stats, gamma: float):
    """float64 focal loss ``-alpha_y (1 - p_y)**gamma log p_y`` of every row (0 for ignored
    rows); :func:`target_weight` gives alpha_y (1 without alpha). gamma = 0 gives
    ``wy * ((mx - zy) + ls)``, cross_entropy's own rule, exactly."""
    xp = b.xp
    with _quiet(xp):
        u, om, _ = _focal_parts(b, s, gamma)
        wy = target_weight(b)
        loss = wy * u if gamma == 0.0 else wy * (om**gamma) * u
        loss = xp.where(xp.isfinite(s.mx), loss, xp.nan)
        return xp.where(b.valid, loss, 0.0)


def focal_loss(b: Batch, spec: LossSpec, s: Stats, gamma: float):
    """What a focal_loss call returns, from the per-row statistics."""
    return count_reduce(b, spec, focal_per_row(b, s, gamma))


def focal_grad_coef(b: Batch, spec: LossSpec, s: Stats, gamma: float) -> GradCoef:
    """Gradient coefficients of ``grad_output * focal loss`` in the engines' form
    ``g (a p_c - b [c == y])`` with a = b = alpha_y om**gamma (1 + gamma p_y u / om):
    d/dz_c of -(1-p)**gamma log p is (p_c - [c == y]) (1-p)**gamma (1 + gamma p u / (1-p)),
    where u / (1-p) -> 1 as p -> 1 (and gamma p u / om is 0 where p_y = 0).
    gamma = 0 gives a = b = alpha_y: cross-entropy's coefficients."""
    xp = b.xp
    with _quiet(xp):
        u, om, p = _focal_parts(b, s, gamma)
        wy = target_weight(b)
        if gamma == 0.0:
            k = wy
        else:
            ratio = xp.where(u == 0.0, 1.0, u / xp.where(om == 0.0, 1.0, om))
            extra = xp.where(p == 0.0, 0.0, gamma * p * ratio)
            k = wy * (om**gamma) * (1.0 + extra)
        k = xp.where(b.valid, k, 0.0)
    return GradCoef(a0=k, b=k, g=row_grad_scale(b, spec), a_lse=0.0, a_swt=0.0, d=0.0, e=0.0)
