"""Rows at the edges of the float range against the float64 oracle, on every kernel set.

- Row maxima of huge magnitude (1e8 .. 3e38): the exponent shift by the row max must
  not lose the terms next to the max (the AVX2 sum rounds max * log2(e) to float32).
- Rows spanning more than float32's range (3e38 and -3e38 in one row): the smoothing
  and soft-target sums take differences z - max that float32 cannot hold.
- Runs of -inf longer than a chunk (rows.rs CHUNK = 2048) before the first finite
  logit: a zero weight (or zero target mass) on a -inf logit is 0 * -inf = NaN in
  float64 torch, a positive one makes the loss +inf, wherever the run is.
- The target logit z_y, transformed (logit_scale, softcap) as the rest of its row, and
  gradient coefficients beyond float32's range.
- Soft targets with label smoothing on -inf logits (torch smooths the target first),
  and the oracle's own answers for these rows checked against float64 torch.
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


# ---------------------------------------------------------------- maxima jumping inside a long chunk

LONG_CHUNK = 8192  # rows.rs: contiguous rows after the first chunk, read in place


@pytest.mark.parametrize("dtype", (F32, BF16, F16), ids=DTYPE_IDS.get)
@pytest.mark.parametrize("at", [CHUNK, 5000, CHUNK + LONG_CHUNK - 1, CHUNK + LONG_CHUNK, 11999])
def test_maximum_jumping_inside_a_long_chunk(simd_path, dtype, at):
    """A maximum beyond the one-pass range (running max + 64) inside a long chunk: that
    chunk is redone in two passes (f32 in place, half precision through the buffer)."""
    rng = np.random.default_rng(at)
    x = rng.standard_normal((4, 12000))
    x[0, at] = 300.0  # one jump
    x[1, at:] += 150.0  # a jump that holds to the end of the row
    x[2, at] = -np.inf  # no jump, an -inf inside the chunk
    x[3, :at] = -np.inf  # the first finite logits inside the chunk
    x[3, at] += 200.0
    x = cast(x, dtype)
    y = np.array([at, min(at + 1, 11999), 0, at])
    _loss_and_grad(x, y, dtype, what=f"jump at {at}: ")


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


# ---------------------------------------------------------------- rows spanning more than float32's range


def _span_rows(dtype):
    big = {F16: 6.0e4, F64: 8e307}.get(np.dtype(dtype), 3.0e38)
    rows = [
        [big, -big, 0.0, 1.0],
        [-big, big, 1.0, 0.0],
        [0.0, 1.0, -big, big],
        [big, big, -big, -big],
    ]
    return cast(np.array(rows), dtype)


@pytest.mark.parametrize("dtype", [F32, BF16, F16, F64], ids=DTYPE_IDS.get)
def test_rows_spanning_float32_range(simd_path, dtype):
    """label_smoothing sums w (z - max) with z - max = -6e38 (beyond float32): 3e37 for
    the first row, 1.5e37 with a zero weight on the -3e38 class; a one-hot soft target
    at the maximum gives 0."""
    x = _span_rows(dtype)
    y = np.array([0, 1, 3, 1])
    res = _loss_and_grad(x, y, dtype, label_smoothing=0.1)
    if np.dtype(dtype) in (F32, BF16):
        assert to_f64(res)[0] == pytest.approx(0.1 * to_f64(x)[0, 0], rel=1e-6)  # 3e37
    w = np.array([1.0, 0.0, 1.0, 1.0])
    res = _loss_and_grad(x, y, dtype, label_smoothing=0.1, weight=w)
    if np.dtype(dtype) in (F32, BF16):
        assert to_f64(res)[0] == pytest.approx(0.05 * to_f64(x)[0, 0], rel=1e-6)  # 1.5e37
    for tdt in (F32, F64):
        onehot = np.zeros(x.shape, tdt)
        onehot[np.arange(4), y] = 1.0
        res = _loss_and_grad(x, onehot, dtype)
        np.testing.assert_array_equal(to_f64(res)[:3], 0.0)
        _loss_and_grad(x, onehot, dtype, weight=w)
        soft = np.full(x.shape, 0.25, tdt)
        _loss_and_grad(x, soft, dtype)  # mass on -3e38: 0.25 * 6e38 overflows float32 -> inf


@pytest.mark.parametrize("dtype", WIDE, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("C", [9, 3000])
def test_spanning_rows_many_classes(simd_path, dtype, C):
    """Many classes near -3e38 under a +3e38 maximum: the sums stay finite in float64
    (each term -6e38, the smoothing loss ~ 6e38 * 0.1 / C * #such classes)."""
    rng = np.random.default_rng(C)
    x = cast(rng.standard_normal((4, C)), dtype)
    x[:, rng.random(C) < 0.5] = cast(np.array([-3e38]), dtype)[0]
    x[0, C - 1] = x[1, 0] = x[2, C // 2] = cast(np.array([3e38]), dtype)[0]
    y = np.array([C - 1, 1, C // 2, 0])
    _loss_and_grad(x, y, dtype, label_smoothing=0.05)
    w = rng.uniform(0, 2, C)
    w[rng.random(C) < 0.2] = 0.0
    _loss_and_grad(x, y, dtype, label_smoothing=0.05, weight=w)
    t = np.zeros((4, C), np.float32)
    t[np.arange(4), y] = 0.75
    t[:, 2] += 0.25
    _loss_and_grad(x, t, dtype)


# ---------------------------------------------------------------- -inf runs longer than a chunk


def _minus_inf_rows(dtype, C, runs):
    """One row per run length: -inf for the first `run` classes, N(0, 1) after."""
    rng = np.random.default_rng(C)
    x = rng.standard_normal((len(runs), C))
    for i, n in enumerate(runs):
        x[i, :n] = -np.inf
    return cast(x, dtype)


RUNS = [0, 100, CHUNK - 1, CHUNK, CHUNK + 1, 3000, 2 * CHUNK + 5]


@pytest.mark.parametrize("dtype", [F32, F64, F16, BF16], ids=DTYPE_IDS.get)
def test_minus_inf_run_before_first_finite_logit(simd_path, dtype):
    """-inf runs ending before, at and after the chunk boundaries: label smoothing gives
    +inf (a positive weight on -inf), a zero weight inside the run NaN; without
    smoothing a zero weight there is not touched (the loss only reads z_y)."""
    C = 5000
    x = _minus_inf_rows(dtype, C, RUNS)
    y = np.full(len(RUNS), C - 1)
    res = _loss_and_grad(x, y, dtype, label_smoothing=0.1)
    assert np.isposinf(to_f64(res)[1:]).all()
    w = np.ones(C)
    w[10] = 0.0  # inside every run
    res = _loss_and_grad(x, y, dtype, label_smoothing=0.1, weight=w)
    assert np.isnan(to_f64(res)[1:]).all() and np.isfinite(to_f64(res)[0])
    w_run = np.where(np.arange(C) < 2 * CHUNK + 5, 0.0, 1.0)  # zero on the whole run
    res = _loss_and_grad(x, y, dtype, label_smoothing=0.1, weight=w_run)
    assert np.isnan(to_f64(res)[1:]).all()
    res = _loss_and_grad(x, y, dtype, weight=w_run)
    assert np.isfinite(to_f64(res)).all()


@pytest.mark.parametrize("dtype", [F32, F64, BF16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("tdtype", [F32, F64, BF16], ids=DTYPE_IDS.get)
def test_minus_inf_run_soft_targets(simd_path, dtype, tdtype):
    """Soft targets: zero target mass on a -inf logit is 0 * -inf = NaN (a one-hot target
    at a finite logit included), positive mass +inf; a zero weight times positive
    mass is NaN as well."""
    C = 5000
    x = _minus_inf_rows(dtype, C, RUNS)
    n = len(RUNS)
    onehot = np.zeros((n, C), tdtype)
    onehot[:, C - 1] = 1.0
    res = _loss_and_grad(x, onehot, dtype)
    assert np.isnan(to_f64(res)[1:]).all() and np.isfinite(to_f64(res)[0])
    full = cast(np.full((n, C), 1.0 / C), tdtype)
    res = _loss_and_grad(x, full, dtype)
    assert np.isposinf(to_f64(res)[1:]).all()
    w = np.ones(C)
    w[10] = 0.0
    res = _loss_and_grad(x, full, dtype, weight=w)
    assert np.isnan(to_f64(res)[1:]).all()
    _loss_and_grad(x, full, dtype, label_smoothing=0.2)


def test_minus_inf_run_with_nan_and_inf_later(simd_path):
    """A -inf prefix longer than a chunk followed by NaN, or by +inf: NaN rows."""
    C = 4200
    x = np.full((2, C), -np.inf, np.float32)
    x[0, 3000] = np.nan
    x[0, 3001:] = 1.0
    x[1, 4100] = np.inf
    x[1, 4101:] = 0.0
    y = np.array([4000, 4150])
    _loss_and_grad(x, y, F32, label_smoothing=0.1)
    t = np.zeros((2, C), np.float32)
    t[:, -1] = 1.0
    _loss_and_grad(x, t, F32)


# ---------------------------------------------------------------- the target logit, transformed as its row


@pytest.mark.parametrize("dtype", WIDE, ids=DTYPE_IDS.get)
@pytest.mark.parametrize(
    "opts",
    [
        dict(logit_scale=-1.3),
        dict(logit_scale=1.7, z_loss=1e-30),
        dict(softcap=1e20),
        dict(logit_scale=0.3, softcap=1e25),
    ],
    ids=["scale", "scale-zloss", "softcap", "scale-softcap"],
)
def test_target_logit_transformed_like_its_row(simd_path, dtype, opts):
    """z_y - max uses z_y as the row's float32 transform gives it: where that rounding
    exceeds the exponential's range (|z| ~ 1e9 and up) a float64 z_y made p_y 0 or inf,
    so a target tied with the max lost its loss log(#ties) and got a gradient of -1 or inf."""
    mags = np.array([1e9, 3e12, 1e15, 7e20, 1e30, 2e37])
    x = np.zeros((len(mags), 40))
    x[:, 3] = x[:, 17] = mags  # two ties at the max
    x[:, 20:] = -mags[:, None]
    x = cast(x, dtype)
    y = np.full(len(mags), 17)
    if opts.get("logit_scale", 1.0) < 0:
        y[:] = 21  # the max of the scaled row
    res = _loss_and_grad(x, y, dtype, **{k: v for k, v in opts.items() if k != "z_loss"})
    if opts.get("logit_scale", 1.0) > 0:
        assert_rows_close(res, np.full(len(mags), np.log(2.0)), dtype)
    _, g = ce_fast.cross_entropy_and_grad(x, y, reduction="none", **opts)
    assert np.isfinite(to_f64(g)).all()


@pytest.mark.parametrize("dtype", WIDE, ids=DTYPE_IDS.get)
def test_z_loss_gradient_beyond_float32(simd_path, dtype):
    """grad_output * logit_scale * 2 z_loss lse overflows float32 while each factor fits:
    the gradient is inf at the max (as float64 rounded to float32) and 0 where p = 0, not
    NaN (inf * 0) as the AVX2 kernel's folded coefficient gave."""
    x = cast(np.array([[1e37, 0.0, -1.0, 1e30], [3e36, 3e36, 5.0, -3e36]]), dtype)
    y = np.array([1, 0])
    for go, scale in ((1e5, 1.0), (1e4, 3.0)):
        kw = dict(z_loss=1e-3, logit_scale=scale)
        gref = grad_ref(to_f64(x), y, reduction="sum", grad_output=go, **kw)
        _, g = ce_fast.cross_entropy_and_grad(x, y, reduction="sum", grad_output=go, **kw)
        assert_grad_close(g, gref, dtype, floor=np.full(2, go * scale))
        assert not np.isnan(to_f64(g)).any()


# ---------------------------------------------------------------- soft targets with label smoothing and -inf


@pytest.mark.parametrize("dtype", [F32, F64, BF16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("C", [6, 3000])
def test_soft_target_smoothing_minus_inf(simd_path, dtype, C):
    """torch smooths the soft target first, t' = (1-eps) t + eps/C > 0: a -inf logit makes
    the loss +inf also where t = 0 there or eps = 1 (each weighted sum on its own would be
    0 * -inf = NaN); a zero class weight there is NaN, and so is an eps too small for
    eps/C to be a float64 number (t' = t)."""
    rng = np.random.default_rng(C)
    x = rng.standard_normal((3, C))
    x[0, 1] = -np.inf
    x[1, : C // 2] = -np.inf
    x[2, 2::3] = -np.inf
    x = cast(x, dtype)
    onehot = np.zeros((3, C), np.float32)
    onehot[:, C - 1] = 1.0
    dirichlet = rng.dirichlet(np.ones(C), 3).astype(np.float32)
    for t in (onehot, dirichlet):
        for eps in (0.1, 1.0):
            res = _loss_and_grad(x, t, dtype, label_smoothing=eps)
            assert np.isposinf(to_f64(res)).all()
        w = np.ones(C)
        w[1] = 0.0  # on a -inf logit of every row
        w[2] = 0.0
        res = _loss_and_grad(x, t, dtype, label_smoothing=0.1, weight=w)
        assert np.isnan(to_f64(res)).all()
    res = _loss_and_grad(x, onehot, dtype, label_smoothing=5e-324)
    assert np.isnan(to_f64(res)).all()
    res = _loss_and_grad(x, dirichlet, dtype, label_smoothing=5e-324)  # t' = t > 0 on -inf
    assert np.isposinf(to_f64(res)).all()


def test_ignored_rows_with_nan_under_softcap_have_zero_gradient(simd_path):
    """The convention (rows.rs, ignored rows get exact zeros also where they hold NaN/inf)
    holds through the softcap's chain rule, in the engine and the oracle alike."""
    x = np.array([[np.nan, 1.0, 2.0], [np.inf, 0.0, 1.0], [0.0, 1.0, 2.0]], np.float32)
    y = np.array([-100, -100, 1])
    for kw in (dict(softcap=3.0), dict(softcap=3.0, logit_scale=2.0, label_smoothing=0.1)):
        gref = grad_ref(to_f64(x), y, reduction="sum", **kw)
        assert (gref[:2] == 0.0).all()
        _, g = ce_fast.cross_entropy_and_grad(x, y, reduction="sum", **kw)
        assert_grad_close(g, gref, F32, floor=np.ones(3))


# ---------------------------------------------------------------- the oracle's answers are torch's


def _torch_rows(x64, target, **kw):
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.asarray(target))
    if "weight" in kw:
        kw = dict(kw, weight=torch.from_numpy(np.asarray(kw["weight"], np.float64)))
    if t.is_floating_point():
        t = t.to(torch.float64)
    return F.cross_entropy(torch.from_numpy(x64), t, reduction="none", **kw).numpy()


def test_oracle_agrees_with_torch_on_these_rows():
    """The answers the tests above hold the engine to (3e37, NaN for 0 * -inf, +inf for a
    smoothed target on -inf, ...) are float64 torch's."""
    C = 5000
    x = to_f64(_minus_inf_rows(F32, C, RUNS))
    y = np.full(len(RUNS), C - 1)
    w = np.ones(C)
    w[10] = 0.0
    onehot = np.zeros((len(RUNS), C))
    onehot[:, C - 1] = 1.0
    span = to_f64(_span_rows(F32))
    w4 = np.array([1.0, 0.0, 1.0, 1.0])
    cases = [
        (x, y, dict(label_smoothing=0.1)),
        (x, y, dict(label_smoothing=0.1, weight=w)),
        (x, y, dict(weight=w)),
        (x, onehot, dict()),
        (x, onehot, dict(label_smoothing=0.1)),
        (x, onehot, dict(label_smoothing=1.0)),
        (x, onehot, dict(label_smoothing=0.1, weight=w)),
        (span, np.array([0, 1, 3, 1]), dict(label_smoothing=0.1)),
        (span, np.array([0, 1, 3, 1]), dict(label_smoothing=0.1, weight=w4)),
        (span, np.eye(4)[[0, 1, 3, 1]], dict()),
    ]
    for z, t, kw in cases:
        want = _torch_rows(z, t, **kw)
        got = cross_entropy_ref(z, t, reduction="none", **kw)
        np.testing.assert_allclose(got, want, rtol=1e-12, equal_nan=True, err_msg=str(kw))
        assert np.array_equal(np.isposinf(got), np.isposinf(want))
