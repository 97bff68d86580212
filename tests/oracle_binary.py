"""Float64 references of the elementwise losses, written from their definitions
(PyTorch's binary_cross_entropy_with_logits, torchvision's sigmoid_focal_loss) in
NumPy, independent of ce_fast; the gradients are the closed forms, checked against
torch's autograd in tests/test_binary.py."""

from __future__ import annotations

import numpy as np


def _f64(a):
    return None if a is None else np.asarray(a).astype(np.float64)


def _parts(x):
    with np.errstate(over="ignore", invalid="ignore"):
        sp = np.log1p(np.exp(-np.abs(x)))
        p = 1.0 / (1.0 + np.exp(-x))
    return sp, p


def bce(x, t, weight=None, pos_weight=None):
    """Per-element loss: w * ((1 - t) x - lw log sigmoid(x)), lw = 1 + (pw - 1) t, with
    log sigmoid(x) = min(x, 0) - log1p(exp(-|x|)); the x terms are added first so that
    losses far below |x| keep their digits (the same NaN and infinities as PyTorch)."""
    x, t, w, pw = _f64(x), _f64(t), _f64(weight), _f64(pos_weight)
    sp, _ = _parts(x)
    with np.errstate(invalid="ignore", over="ignore"):
        lw = 1.0 if pw is None else 1.0 + (pw - 1.0) * t
        loss = ((1.0 - t) * x - lw * np.minimum(x, 0.0)) + lw * sp
        return loss if w is None else loss * w


def bce_grad(x, t, weight=None, pos_weight=None):
    """d loss / dx per element: w * (lw sigmoid(x) - pw t), or w * (sigmoid(x) - t)."""
    x, t, w, pw = _f64(x), _f64(t), _f64(weight), _f64(pos_weight)
    _, p = _parts(x)
    with np.errstate(invalid="ignore", over="ignore"):
        g = p - t if pw is None else (1.0 + (pw - 1.0) * t) * p - pw * t
        g = g if w is None else g * w
        return np.where(np.isnan(x), np.nan, g)


def focal(x, t, alpha=0.25, gamma=2.0):
    """torchvision's formula: alpha_t * ce * (1 - p_t) ** gamma."""
    x, t = _f64(x), _f64(t)
    _, p = _parts(x)
    ce = bce(x, t)
    with np.errstate(invalid="ignore", over="ignore"):
        p_t = p * t + (1 - p) * (1 - t)
        loss = ce * (1 - p_t) ** gamma
        if alpha >= 0:
            loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
    return loss


def focal_grad(x, t, alpha=0.25, gamma=2.0):
    """alpha_t ((p - t) m^g + ce g m^(g-1) (1 - 2t) p (1 - p)), m = 1 - p_t (0 term at m = 0)."""
    x, t = _f64(x), _f64(t)
    _, p = _parts(x)
    ce = bce(x, t)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        m = t * (1 - p) + (1 - t) * p
        mg = m**gamma
        dmg = np.where(m > 0, gamma * m ** (gamma - 1), 0.0) if gamma != 0 else np.zeros_like(m)
        g = (p - t) * mg + ce * dmg * (1 - 2 * t) * p * (1 - p)
        if alpha >= 0:
            g = (alpha * t + (1 - alpha) * (1 - t)) * g
    return np.where(np.isnan(x), np.nan, g)
