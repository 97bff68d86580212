"""ce_fast.focal_loss / focal_loss_and_grad against the float64 formula and torch autograd,
and exactly cross_entropy at gamma=0, alpha=None; both kernel sets."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import ce_fast

from conftest import assert_grad_close, assert_loss_dtype, assert_reduced_close, assert_rows_close, use_simd
from oracle import f64
from oracle_kl_focal import focal_rows_ref, reduce_ref

BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = [np.float32, np.float64, np.float16, BF16]


def _inputs(rng, shape, dtype, scale=3.0):
    z = (rng.standard_normal(shape) * scale).astype(dtype)
    y = rng.integers(0, shape[-1], shape[:-1])
    return z, y


def torch_focal_grad(z, y, *, gamma, alpha, ignore_index=-100, reduction="mean", grad_output=1.0):
    """torch autograd of the focal formula in float64 torch ops."""
    zt = torch.tensor(f64(z), requires_grad=True)
    yt = torch.as_tensor(np.asarray(y).astype(np.int64))
    valid = yt != ignore_index
    lp = F.log_softmax(zt, -1).gather(-1, torch.where(valid, yt, 0).unsqueeze(-1)).squeeze(-1)
    a = torch.ones(z.shape[-1], dtype=torch.float64) if alpha is None else torch.as_tensor(f64(alpha))
    om = -torch.expm1(lp)
    # (1 - p)**gamma through a safe branch where p_y = 1: its limit (0, or 1 for gamma = 0)
    # with no gradient, where torch's pow backward would give inf * 0 = NaN for gamma < 1.
    safe = torch.where(om > 0, om, 1.0) ** gamma
    factor = torch.where(om > 0, safe, 0.0 if gamma > 0 else 1.0)
    rows = -a[torch.where(valid, yt, 0)] * factor * lp
    rows = torch.where(valid, rows, 0.0)
    if reduction == "none":
        (rows * torch.as_tensor(np.array(np.broadcast_to(grad_output, rows.shape)))).sum().backward()
    else:
        total = rows.sum() / (valid.sum() if reduction == "mean" else 1)
        (total * grad_output).backward()
    return zt.grad.numpy()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gamma0_equals_cross_entropy_exactly(simd_path, dtype, reduction):
    rng = np.random.default_rng(0)
    z, y = _inputs(rng, (3, 4, 2500), dtype)
    y[0, 2] = -100
    got = ce_fast.focal_loss(z, y, gamma=0.0, reduction=reduction)
    want = ce_fast.cross_entropy(z, y, reduction=reduction)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert np.array_equal(got, want)
    loss, g = ce_fast.focal_loss_and_grad(z, y, gamma=0, reduction=reduction, grad_output=0.5)
    loss_ce, g_ce = ce_fast.cross_entropy_and_grad(z, y, reduction=reduction, grad_output=0.5)
    assert np.array_equal(loss, loss_ce)
    assert np.array_equal(g, g_ce)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("gamma", [0.5, 2.0, 3.0])
@pytest.mark.parametrize("with_alpha", [False, True])
def test_loss_matches_formula(simd_path, dtype, gamma, with_alpha):
    rng = np.random.default_rng(1)
    shape = (6, 2300)
    z, y = _inputs(rng, shape, dtype)
    y[2] = -100
    alpha = rng.uniform(0.1, 2.0, shape[-1]) if with_alpha else None
    ref = focal_rows_ref(z, y, gamma=gamma, alpha=alpha)
    sc = 1.0 + np.abs(f64(z)).max()
    got = ce_fast.focal_loss(z, y, gamma=gamma, alpha=alpha, reduction="none")
    assert_loss_dtype(got, dtype, "none", shape[:-1])
    assert_rows_close(got, ref, dtype, scale=sc * 2.0)
    valid = y != -100
    for red in ("mean", "sum"):
        res = ce_fast.focal_loss(z, y, gamma=gamma, alpha=alpha, reduction=red)
        assert_reduced_close(res, reduce_ref(ref, valid, red), ref, valid.sum(), dtype, red, scale=sc * 2.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("gamma", [0.7, 2.0])
def test_grad_matches_torch_autograd(simd_path, dtype, reduction, gamma):
    rng = np.random.default_rng(2)
    shape = (5, 2100)
    z, y = _inputs(rng, shape, dtype)
    y[1] = -100
    alpha = rng.uniform(0.1, 2.0, shape[-1])
    go = rng.standard_normal(shape[:-1]) if reduction == "none" else 1.3
    kw = dict(gamma=gamma, alpha=alpha, reduction=reduction)
    loss, g = ce_fast.focal_loss_and_grad(z, y, grad_output=go, **kw)
    assert g.dtype == z.dtype
    ref = torch_focal_grad(z, y, grad_output=go, **kw)
    floor = np.abs(np.broadcast_to(go, shape[:-1])) * 4.0 * (1.0 + gamma * (1.0 + np.abs(f64(z)).max()))
    assert_grad_close(g, ref, dtype, floor=floor)
    assert np.all(g[1] == 0)
    np.testing.assert_array_equal(loss, ce_fast.focal_loss(z, y, **kw))


def test_confident_rows_are_exact():
    """p_y near 1: (1 - p_y) from expm1, no cancellation; the gradient goes to 0 smoothly."""
    z = np.zeros((2, 4))
    z[0, 1] = 30.0
    z[1, 1] = 1e3
    loss = ce_fast.focal_loss(z, np.array([1, 1]), gamma=2.0, reduction="none")
    want = focal_rows_ref(z, [1, 1], gamma=2.0)
    # (1 - p_y)**2 * u with u = log(1 + 3e^-30) ~ 2.8e-13: the cube of u, not 0 (1 - p_y would
    # cancel to a few ulps); log(1 + x) itself is only as good as the rounding of 1 + x.
    np.testing.assert_allclose(loss, want, rtol=1e-2, atol=0)
    assert loss[0] > 0 and loss[1] == 0
    _, g = ce_fast.focal_loss_and_grad(z, np.array([1, 1]), gamma=0.5)
    assert np.isfinite(g).all() and np.all(g[1] == 0)


@pytest.mark.parametrize("reverse_dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
def test_non_finite(simd_path, reverse_dtype):
    z = np.random.default_rng(3).standard_normal((5, 40)).astype(reverse_dtype)
    y = np.array([0, 1, 2, 3, 4])
    z[0, 5] = np.nan
    z[1, 7] = np.inf
    z[2] = -np.inf
    z[3, 3] = -np.inf  # the target's own logit: -log p_y = inf
    ref = focal_rows_ref(z, y, gamma=2.0)
    got = ce_fast.focal_loss(z, y, gamma=2.0, reduction="none")
    assert np.isnan(got[:3]).all() and got[3] == np.inf
    assert_rows_close(got, ref, reverse_dtype, scale=10.0)


def test_torch_in_torch_out_and_in_place(simd_path):
    rng = np.random.default_rng(4)
    z, y = _inputs(rng, (4, 3000), np.float32)
    res = ce_fast.focal_loss(torch.from_numpy(z), torch.from_numpy(y))
    assert isinstance(res, torch.Tensor) and res.dtype == torch.float32
    np.testing.assert_array_equal(res.numpy(), ce_fast.focal_loss(z, y))
    loss, fresh = ce_fast.focal_loss_and_grad(z, y, gamma=1.5)
    w = z.copy()
    loss2, out = ce_fast.focal_loss_and_grad(w, y, gamma=1.5, out=w)
    assert out is w
    np.testing.assert_array_equal(w, fresh)
    np.testing.assert_array_equal(loss2, loss)


def test_zero_rows():
    z = np.zeros((0, 5), np.float32)
    y = np.zeros(0, np.int64)
    assert np.isnan(ce_fast.focal_loss(z, y))
    assert ce_fast.focal_loss(z, y, reduction="sum") == 0
    assert ce_fast.focal_loss(z, y, reduction="none").shape == (0,)


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(0, 5),
    C=st.sampled_from([1, 3, 64, 2049, 4200]),
    dtype=st.sampled_from(DTYPES),
    gamma=st.sampled_from([0.0, 0.25, 1.0, 2.0, 5.0]),
    with_alpha=st.booleans(),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    scalar=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_hypothesis(rows, C, dtype, gamma, with_alpha, reduction, scalar, seed):
    rng = np.random.default_rng(seed)
    z, y = _inputs(rng, (rows, C), dtype)
    y[rng.random(rows) < 0.3] = -100
    alpha = rng.uniform(0.0, 2.0, C) if with_alpha else None
    with use_simd("scalar" if scalar else "auto"):
        loss, g = ce_fast.focal_loss_and_grad(z, y, gamma=gamma, alpha=alpha, reduction=reduction)
    ref = focal_rows_ref(z, y, gamma=gamma, alpha=alpha)
    sc = 2.0 * (1.0 + (np.abs(f64(z)).max() if z.size else 0.0))
    valid = y != -100
    if reduction == "none":
        assert_rows_close(loss, ref, dtype, scale=sc)
    else:
        assert_reduced_close(loss, reduce_ref(ref, valid, reduction), ref, valid.sum(), dtype, reduction, scale=sc)
    gref = torch_focal_grad(z, y, gamma=gamma, alpha=alpha, reduction=reduction)
    assert_grad_close(g, gref, dtype, floor=np.full(rows, 4.0 * (1.0 + gamma * sc)))


def _z():
    return np.zeros((2, 3), np.float32)


_Y = np.array([0, 1])


@pytest.mark.parametrize(
    "call, exc, msg",
    [
        (lambda: ce_fast.focal_loss(_z(), _Y, gamma=-1.0), ValueError, "gamma must be finite and >= 0"),
        (lambda: ce_fast.focal_loss(_z(), _Y, gamma=float("inf")), ValueError, "gamma must be finite and >= 0"),
        (lambda: ce_fast.focal_loss(_z(), _Y, gamma="2"), TypeError, "gamma must be a real number"),
        (lambda: ce_fast.focal_loss(_z(), _Y, alpha=np.ones(4)), ValueError, "alpha must have shape (3,)"),
        (lambda: ce_fast.focal_loss(_z(), _Y, alpha=np.array([1.0, -1.0, 1.0])), ValueError, "alpha[1] = -1.0"),
        (lambda: ce_fast.focal_loss(_z(), _Y, alpha=np.array([1.0, np.nan, 1.0])), ValueError, "alpha must be finite"),
        (
            lambda: ce_fast.focal_loss(_z(), _Y, alpha=np.array(["a", "b", "c"])),
            TypeError,
            "alpha must hold real numbers",
        ),
        (lambda: ce_fast.focal_loss(_z(), np.zeros((2, 3), np.float32)), TypeError, "integer class-index targets"),
        (lambda: ce_fast.focal_loss(_z(), np.array([0, 3])), IndexError, "target value 3 at position (1,)"),
        (lambda: ce_fast.focal_loss(_z(), np.array([0, 1, 2])), ValueError, "target shape (3,)"),
        (lambda: ce_fast.focal_loss(_z(), _Y, reduction="avg"), ValueError, "reduction must be one of"),
        (lambda: ce_fast.focal_loss(np.zeros((2, 3), np.int32), _Y), TypeError, "logits dtype int32"),
        (
            lambda: ce_fast.focal_loss_and_grad(_z(), _Y, out=np.zeros((2, 2), np.float32)),
            ValueError,
            "out must have shape",
        ),
    ],
)
def test_bad_input(call, exc, msg):
    with pytest.raises(exc) as e:
        call()
    assert msg in str(e.value)
