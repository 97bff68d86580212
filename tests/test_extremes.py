"""Rows at the edges of the float range against the float64 oracle, on every kernel set.

- Row maxima of huge magnitude (1e8 .. 3e38): the exponent shift by the row max must
  not lose the terms next to the max (the AVX2 sum rounds max * log2(e) to float32).
"""

from __future__ import annotations

import numpy as np
import pytest

import ce_fast
from conftest import BF16, DTYPE_IDS, assert_grad_close, assert_rows_close, cast, to_f64
from oracle import cross_entropy_ref, grad_ref, logsumexp_ref

F32 = np.dtype(np.float32)
F64 = np.dtype(np.float64)
F16 = np.dtype(np.float16)
WIDE = (F32, BF16)  # float32 range: 3e38 fits
CHUNK = 2048


def _loss_and_grad(x, t, dtype, what="", **kw):
    """cross_entropy (none) and cross_entropy_and_grad (sum) against the oracle."""
    x64 = to_f64(x)
    t_ref = to_f64(t) if np.asarray(t).dtype.kind in "fV" else np.asarray(t)
    ref = cross_entropy_ref(x64, t_ref, reduction="none", **kw)
    got = ce_fast.cross_entropy(x, t, reduction="none", **kw)
    assert_rows_close(got, ref, dtype, what=f"{what}loss: ")
    loss, grad = ce_fast.cross_entropy_and_grad(x, t, reduction="none", **kw)
    assert_rows_close(loss, ref, dtype, what=f"{what}fused loss: ")
    gref = grad_ref(x64, t_ref, reduction="none", **kw)
    w = kw.get("weight")
    floor = 1.0 if w is None else max(1.0, float(np.max(w)))
    if np.asarray(t).dtype.kind in "fV":
        floor *= max(1.0, float(np.abs(t_ref).sum(-1).max()))
    assert_grad_close(grad, gref, dtype, floor=np.full(x.shape[:-1], floor), what=f"{what}grad: ")
    return got


# ---------------------------------------------------------------- huge row maxima


def _tied_rows(rng, magnitudes, C, dtype):
    """Rows whose maximum v = +-magnitude (rounded to dtype) is tied k times, next to its
    dtype neighbours below and to values far below; the ties sit anywhere in the row,
    also past the first chunk."""
    rows, ties = [], []
    for v in magnitudes:
        v = float(cast(np.array([v]), dtype)[0])
        row = np.asarray(cast(np.full(C, v), dtype))
        below = row.copy()
        for _ in range(3):  # the next three values of the dtype below v
            below = np.nextafter(below.astype(np.float32), np.float32(-np.inf)).astype(dtype)
        lo = np.asarray(cast(np.full(C, v - abs(v) * 1e-3 - 100.0), dtype))
        r = rng.random(C)
        row = np.where(r < 0.3, below, np.where(r < 0.6, lo, row))
        k = int(rng.integers(1, min(C, 20) + 1))
        pos = rng.choice(C, k, replace=False)
        row = np.where(row.astype(np.float64) >= v, lo, row)  # no stray ties
        row[pos] = cast(np.array([v]), dtype)[0]
        rows.append(row)
        ties.append(pos[0])
    return np.stack(rows).astype(dtype), np.array(ties)


HUGE_MAGNITUDES = [1e8, 3e8, 1.5e9, 2e9, 1e10, 3.7e11, 1e12, 1e15, 1e20, 1e25, 1e30, 1e35, 3e38]


@pytest.mark.parametrize("dtype", WIDE, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("C", [5, 37, 3000, 4500])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_huge_row_maximum(simd_path, dtype, C, sign):
    """The loss at a tied maximum is log(#ties) exactly (z - max = 0 there), however
    large the maximum; the fused one-pass chunks (C > 2048) and the first chunk agree."""
    rng = np.random.default_rng(C)
    mags = [sign * m for m in HUGE_MAGNITUDES]
    x, ties = _tied_rows(rng, mags, C, dtype)
    assert_rows_close(ce_fast.logsumexp(x), logsumexp_ref(to_f64(x)), dtype, what="lse: ")
    _loss_and_grad(x, ties, dtype, what="target at the max: ")
    y = rng.integers(0, C, len(mags))
    _loss_and_grad(x, y, dtype, what="random target: ")
    _loss_and_grad(x, y, dtype, what="smoothing: ", label_smoothing=0.3)


@pytest.mark.parametrize("dtype", WIDE, ids=DTYPE_IDS.get)
def test_huge_row_maximum_small_rows(simd_path, dtype):
    """The cases in words: two logits of opposite huge sign, and a huge one next to 0."""
    x = cast(np.array([[1e20, -1e20], [1e30, 0.0], [-1e12, -1e12], [1e12, 1e12]]), dtype)
    got = ce_fast.logsumexp(x)
    ref = logsumexp_ref(to_f64(x))
    assert_rows_close(got, ref, dtype)
    assert np.isfinite(to_f64(got)).all()
    loss = ce_fast.cross_entropy(x, np.array([0, 0, 1, 0]), reduction="none")
    assert_rows_close(loss, [0.0, 0.0, np.log(2.0), np.log(2.0)], dtype)


@pytest.mark.parametrize("dtype", WIDE, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("C", [40, 3000])
def test_huge_logit_scale(simd_path, dtype, C):
    """N(0, 1) logits (on a 1/64 grid) times logit_scale 2^40 ~ 1.1e12: the scaled logits
    are exact in float32 as in float64, the maximum is 1e12-sized, ties give log(#ties)."""
    rng = np.random.default_rng(3)
    x = cast(np.round(rng.standard_normal((6, C)) * 64) / 64, dtype)
    x[0, 7] = x[0].max()  # a tie at the maximum
    x[1, C - 1] = x[1].max() + 1  # the maximum in the last chunk
    x[2, : C // 2] = x[2].max()  # many ties
    y = np.argmax(to_f64(x), -1)
    y[3:] = rng.integers(0, C, 3)
    _loss_and_grad(x, y, dtype, logit_scale=2.0**40)
    _loss_and_grad(x, y, dtype, logit_scale=-(2.0**40), label_smoothing=0.2)


@pytest.mark.parametrize("magnitude", [1e15, 3e9, 1e30])
def test_huge_row_gradient(simd_path, magnitude):
    """The gradient at a maximum tied at 1e15: p = 1/#ties at the ties, 0 elsewhere."""
    x = np.full((3, 50), magnitude, np.float32)
    x[0, 10:] = -magnitude
    x[1, ::2] = np.nextafter(np.float32(magnitude), np.float32(0))
    x[2, 3] = np.nextafter(np.float32(magnitude), np.float32(np.inf))
    y = np.array([0, 1, 3])
    _, g = ce_fast.cross_entropy_and_grad(x, y, reduction="sum")
    ref = grad_ref(to_f64(x), y, reduction="sum")
    assert_grad_close(g, ref, F32, floor=np.ones(3))
    assert to_f64(g)[0, 0] == pytest.approx(0.1 - 1.0)
