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
from ._types import Batch, GradCoef, Stats

__all__ = ["GradCoef", "Stats", "denominator", "grad_coef", "per_row", "reduce", "wants_wz"]


def wants_wz(spec: LossSpec) -> bool:
    return spec.label_smoothing > 0.0


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
            loss = b.wy * ((s.mx - s.zy) + s.ls)
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
    return b.wy.sum()


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
        return GradCoef(
            a0=xp.full(rows, smooth * b.weight_total),
            b=xp.zeros(rows),
            g=g,
            a_lse=2.0 * spec.z_loss,
            a_swt=1.0 - eps,
            d=smooth,
            e=1.0 - eps,
        )
    return GradCoef(
        a0=(1.0 - eps) * b.wy + smooth * b.weight_total,
        b=(1.0 - eps) * b.wy,
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
