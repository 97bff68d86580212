"""An independent float64 NumPy oracle of PyTorch's cross-entropy semantics,
with the class axis LAST (ce_fast's convention).

Nothing here uses ce_fast or torch: it is the reference the package is tested
against, and is itself checked against torch in float64 by ``test_oracle.py``.

- ``logsumexp_ref(z)``: ``torch.logsumexp(z, -1)`` semantics (all -inf row ->
  -inf; a +inf and no NaN -> +inf; NaN -> NaN).
- ``log_softmax_ref(z)``: naive float64 ``z - max - log(sum(exp(z - max)))``, so a
  row holding +inf, or a row of only -inf, is NaN everywhere (as float64 torch).
- ``cross_entropy_ref(...)``: ``torch.nn.functional.cross_entropy`` (class axis
  last) plus ce_fast's extras ``logit_scale``, ``softcap`` and ``z_loss``.
- ``grad_ref(...)``: d(grad_output * loss) / d(logits), float64.
"""

from __future__ import annotations

import numpy as np

REDUCTIONS = ("mean", "sum", "none")


def f64(a) -> np.ndarray:
    """float64 copy of any array-like (NumPy incl. ml_dtypes bfloat16, torch tensors)."""
    mod = type(a).__module__
    if mod.startswith("torch"):
        import torch

        return a.detach().to(torch.float64).cpu().numpy()
    return np.asarray(a).astype(np.float64)


def as_int(a) -> np.ndarray:
    mod = type(a).__module__
    if mod.startswith("torch"):
        return a.detach().cpu().numpy().astype(np.int64)
    return np.asarray(a).astype(np.int64)


def transform_ref(z, logit_scale=1.0, softcap=None) -> np.ndarray:
    """z -> z * logit_scale, then softcap c: c * tanh(z / c); float64."""
    z = f64(z)
    with np.errstate(invalid="ignore", over="ignore"):
        if logit_scale != 1.0:
            z = z * float(logit_scale)
        if softcap is not None:
            c = float(softcap)
            z = c * np.tanh(z / c)
    return z


def logsumexp_ref(z) -> np.ndarray:
    """torch.logsumexp over the last axis, float64."""
    z = f64(z)
    if z.shape[-1] == 0:
        return np.full(z.shape[:-1], -np.inf)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        m = np.max(z, axis=-1, keepdims=True)  # NaN propagates
        m0 = np.where(np.isinf(m), 0.0, m)  # torch masks infinite maxima to 0
        s = np.sum(np.exp(z - m0), axis=-1, keepdims=True)
        out = np.log(s) + m0
    return out[..., 0]


def log_softmax_ref(z) -> np.ndarray:
    """Naive float64 log_softmax over the last axis (NaN for +inf rows and all -inf rows)."""
    z = f64(z)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        m = np.max(z, axis=-1, keepdims=True)
        d = z - m
        return d - np.log(np.sum(np.exp(d), axis=-1, keepdims=True))


def _is_soft(z, target) -> bool:
    if type(target).__module__.startswith("torch"):
        return bool(target.is_floating_point())
    # ml_dtypes bfloat16 has NumPy kind "V"
    return np.asarray(target).dtype.kind in "fV"


def _rows(z, target, *, weight, ignore_index, label_smoothing, z_loss, softcap, logit_scale):
    """Per-row float64 losses (flat), the counted-row mask and the mean's denominator."""
    zt = transform_ref(z, logit_scale, softcap)
    C = zt.shape[-1]
    batch = zt.shape[:-1]
    n = int(np.prod(batch, dtype=np.int64))
    zt2 = zt.reshape(n, C)
    logp = log_softmax_ref(zt2)
    lse = logsumexp_ref(zt2)
    w = None if weight is None else f64(weight).reshape(C)
    eps = float(label_smoothing)
    with np.errstate(invalid="ignore", over="ignore"):
        if _is_soft(z, target):
            t = f64(target).reshape(n, C)
            if eps > 0.0:
                t = t * (1.0 - eps) + eps / C
            wt = t if w is None else t * w
            loss = -np.sum(wt * logp, axis=-1)
            valid = np.ones(n, dtype=bool)
            den = float(n)
        else:
            y = as_int(target).reshape(n)
            valid = y != ignore_index
            yy = np.where(valid, y, 0)
            wy = np.ones(n) if w is None else w[yy]
            nll = -logp[np.arange(n), yy] * wy
            nll = np.where(valid, nll, 0.0)
            loss = nll
            if eps > 0.0:
                smooth = -np.sum(logp if w is None else logp * w, axis=-1)
                smooth = np.where(valid, smooth, 0.0)
                loss = (1.0 - eps) * nll + (eps / C) * smooth
            den = float(np.sum(np.where(valid, wy, 0.0)))
        if z_loss > 0.0:
            loss = loss + np.where(valid, float(z_loss) * lse * lse, 0.0)
        loss = np.where(valid, loss, 0.0)
    return loss, valid, den, batch


def cross_entropy_ref(
    z,
    target,
    weight=None,
    ignore_index=-100,
    reduction="mean",
    label_smoothing=0.0,
    z_loss=0.0,
    softcap=None,
    logit_scale=1.0,
):
    """float64 torch.nn.functional.cross_entropy with the class axis last.

    Returns a float64 array of shape ``batch`` for ``reduction="none"``, a Python
    float otherwise.
    """
    assert reduction in REDUCTIONS
    loss, valid, den, batch = _rows(
        z,
        target,
        weight=weight,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
        logit_scale=logit_scale,
    )
    if reduction == "none":
        return loss.reshape(batch)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        total = float(np.sum(loss))
        if reduction == "sum":
            return total
        return total / den if den != 0.0 else float("nan")


def mean_denominator(z, target, weight=None, ignore_index=-100):
    """What the mean divides by: sum of target weights of counted rows, or the row count."""
    zz = f64(z)
    n = int(np.prod(zz.shape[:-1], dtype=np.int64))
    if _is_soft(z, target):
        return float(n)
    y = as_int(target).reshape(n)
    valid = y != ignore_index
    if weight is None:
        return float(valid.sum())
    w = f64(weight)
    return float(np.sum(w[np.where(valid, y, 0)] * valid))


def grad_ref(
    z,
    target,
    weight=None,
    ignore_index=-100,
    reduction="mean",
    label_smoothing=0.0,
    z_loss=0.0,
    softcap=None,
    logit_scale=1.0,
    grad_output=1.0,
):
    """float64 d(sum(grad_output * loss)) / d(logits), the logits' shape."""
    z64 = f64(z)
    C = z64.shape[-1]
    batch = z64.shape[:-1]
    n = int(np.prod(batch, dtype=np.int64))
    zt = transform_ref(z64, logit_scale, softcap).reshape(n, C)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        p = np.exp(log_softmax_ref(zt))
        lse = logsumexp_ref(zt)
        w = np.ones(C) if weight is None else f64(weight).reshape(C)
        eps = float(label_smoothing)
        if _is_soft(z, target):
            t = f64(target).reshape(n, C)
            if eps > 0.0:
                t = t * (1.0 - eps) + eps / C
            wt = t * w
            g_z = np.sum(wt, axis=-1, keepdims=True) * p - wt
            valid = np.ones(n, dtype=bool)
        else:
            y = as_int(target).reshape(n)
            valid = y != ignore_index
            yy = np.where(valid, y, 0)
            wy = w[yy]
            onehot = np.zeros((n, C))
            onehot[np.arange(n), yy] = 1.0
            g_z = (1.0 - eps) * wy[:, None] * (p - onehot)
            if eps > 0.0:
                g_z = g_z + (eps / C) * (w.sum() * p - w[None, :])
        if z_loss > 0.0:
            g_z = g_z + 2.0 * float(z_loss) * lse[:, None] * p
        if reduction == "none":
            go = np.broadcast_to(np.asarray(grad_output, dtype=np.float64), batch).reshape(n)
        else:
            go = np.full(n, float(grad_output))
            if reduction == "mean":
                den = mean_denominator(z, target, weight, ignore_index)
                go = go / den if den != 0.0 else go * 0.0
        g_z = g_z * go[:, None]
        # chain rule through the transform
        zs = f64(z).reshape(n, C) * float(logit_scale)
        chain = np.full_like(zs, float(logit_scale))
        if softcap is not None:
            chain = chain * (1.0 - np.tanh(zs / float(softcap)) ** 2)
        # ignored rows: exactly 0, also where their logits (hence the chain) are NaN
        return np.where(valid[:, None], g_z * chain, 0.0).reshape(z64.shape)
