"""Independent float64 NumPy references of the distillation KL and the focal loss
(class axis last). Nothing here uses ce_fast; test_kl.py checks them against torch."""

from __future__ import annotations

import numpy as np

from oracle import f64, log_softmax_ref


def _valid(shape, target, ignore_index):
    if target is None:
        return np.ones(shape, dtype=bool)
    return np.asarray(target).astype(np.int64) != ignore_index


def kl_rows_ref(s, t, *, temperature=1.0, reverse=False, target=None, ignore_index=-100):
    """Per-row KL(p || q) (or KL(q || p)), p = softmax(t / T), q = softmax(s / T); classes of
    zero reference probability contribute 0; rows left out are 0."""
    lq = log_softmax_ref(f64(s) / temperature)
    lp = log_softmax_ref(f64(t) / temperature)
    if reverse:
        lp, lq = lq, lp
    with np.errstate(invalid="ignore", over="ignore"):
        p = np.exp(lp)
        rows = np.where(p == 0.0, 0.0, p * (lp - lq)).sum(-1)
    return np.where(_valid(rows.shape, target, ignore_index), rows, 0.0)


def kl_grad_ref(
    s, t, *, temperature=1.0, reverse=False, target=None, ignore_index=-100, reduction="mean", grad_output=1.0
):
    """d(grad_output * loss) / d s in float64."""
    T = temperature
    lq = log_softmax_ref(f64(s) / T)
    lp = log_softmax_ref(f64(t) / T)
    valid = _valid(lq.shape[:-1], target, ignore_index)
    with np.errstate(invalid="ignore", over="ignore"):
        q, p = np.exp(lq), np.exp(lp)
        if reverse:
            kl = np.where(q == 0.0, 0.0, q * (lq - lp)).sum(-1, keepdims=True)
            d = np.where(q == 0.0, 0.0, q * (lq - lp - kl))
        else:
            d = q - p
        if reduction == "none":
            g = np.broadcast_to(np.asarray(grad_output, dtype=np.float64), valid.shape)
        else:
            g = np.full(valid.shape, float(grad_output))
            if reduction == "mean":
                n = valid.sum()
                g = g / n if n else g * 0.0
        g = np.where(valid, g, 0.0)[..., None]
        return np.where(g == 0.0, 0.0, d * g / T)


def focal_rows_ref(z, y, *, gamma=2.0, alpha=None, ignore_index=-100):
    """Per-row -alpha_y (1 - p_y)**gamma log p_y (0 for ignored rows), float64."""
    ls = log_softmax_ref(z)
    y = np.asarray(y).astype(np.int64)
    valid = y != ignore_index
    yi = np.where(valid, y, 0)
    lpy = np.take_along_axis(ls, yi[..., None], -1)[..., 0]
    a = np.ones(ls.shape[-1]) if alpha is None else f64(alpha)
    with np.errstate(invalid="ignore", over="ignore"):
        om = -np.expm1(lpy)
        rows = -a[yi] * om**gamma * lpy
    return np.where(valid, rows, 0.0)


def reduce_ref(rows, valid, reduction):
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    n = valid.sum()
    return total / n if n else np.nan
