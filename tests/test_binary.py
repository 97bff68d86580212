"""binary_cross_entropy_with_logits and sigmoid_focal_loss (and their _and_grad twins)
against the float64 references of tests/oracle_binary.py and PyTorch, on both kernel
sets: shapes, dtypes, broadcast weights, reductions, layouts, non-finite values,
in-place gradients and every bad-input case."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ce_fast

import oracle_binary as ob
from conftest import ALL_DTYPES, BF16, DTYPE_IDS, LOW_DTYPES, cast, torch_of, with_layout

EPS = {np.dtype(np.float32): 2.0**-24, np.dtype(np.float64): 2.0**-53, np.dtype(np.float16): 2.0**-11, BF16: 2.0**-8}

SUBNORMAL = {
    np.dtype(np.float32): 2.0**-149,
    np.dtype(np.float64): 0.0,
    np.dtype(np.float16): 2.0**-24,
    BF16: 2.0**-133,
}


def f64(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach()
        return (a.double() if a.dtype == torch.bfloat16 else a).numpy().astype(np.float64)
    return np.asarray(a).astype(np.float64)


def compute_eps(dtype) -> float:
    return 2.0**-52 if np.dtype(dtype) == np.float64 else 2.0**-23


def assert_close(got, ref, scale, dtype, *, stored=None, what=""):
    """|got - ref| <= 8 eps_compute (|ref| + scale) + eps_stored |ref| elementwise, NaN where ref is NaN."""
    got, ref = f64(got), np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    e = compute_eps(dtype)
    tol = 8 * e * (np.abs(ref) + scale)
    if stored is not None:  # rounding once into the stored dtype, subnormals included
        tol = tol + EPS[np.dtype(stored)] * np.abs(ref) + SUBNORMAL[np.dtype(stored)]
    nan = np.isnan(ref)
    np.testing.assert_array_equal(np.isnan(got), nan, err_msg=f"{what}: NaN positions")
    inf = np.isinf(ref)
    np.testing.assert_array_equal(got[inf], ref[inf], err_msg=f"{what}: infinities")
    ok = ~(nan | inf)
    bad = np.abs(got[ok] - ref[ok]) > np.broadcast_to(tol, ref.shape)[ok]
    assert not bad.any(), (
        f"{what}: max err {np.max(np.abs(got[ok] - ref[ok]))}, {got[ok][bad][:5]} vs {ref[ok][bad][:5]}"
    )


def bce_scale(x, t, w=None, pw=None):
    """The magnitude of the terms behind each loss (what f32 rounding is relative to)."""
    x, t = f64(x), f64(t)
    lw = 1.0 if pw is None else np.abs(1 + (f64(pw) - 1) * t) + np.abs(f64(pw) * t)
    s = (np.abs(x) * np.abs(1 - t) + lw * (np.abs(x) + 1)) * (1.0 if w is None else np.abs(f64(w)))
    return s


def grad_scale(x, t, go_eff, w=None, pw=None, focal=False):
    """Magnitude of the terms behind each gradient element (cancellation is relative to it)."""
    x, t = f64(x), f64(t)
    s = 2.0 + np.abs(t)
    if pw is not None:
        s = s + (np.abs(f64(pw)) + 1) * (1 + np.abs(t))
    if w is not None:
        s = s * np.abs(f64(w))
    if focal:
        s = s * (2 + 4 * bce_scale(x, t))
    return s * np.abs(np.asarray(go_eff, dtype=np.float64))


def inputs(rng, shape, dtype, tdtype=None, scale=4.0, hard=False):
    x = cast(rng.standard_normal(shape) * scale, dtype)
    t = (rng.random(shape) > 0.6).astype(np.float64) if hard else rng.random(shape)
    return x, cast(t, tdtype or dtype)


def reduce_ref(loss, reduction):
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.mean() if loss.size else np.nan


def check_reduced(got, ref_el, reduction, scale, dtype):
    out = np.float64 if np.dtype(dtype) == np.float64 else np.float32
    assert np.asarray(got).dtype == out
    if reduction == "none":
        assert_close(got, ref_el, scale, dtype)
        return
    ref = reduce_ref(ref_el, reduction)
    s = reduce_ref(np.asarray(scale, dtype=np.float64) * np.ones_like(ref_el), "sum")
    if reduction == "mean":
        s = s / max(ref_el.size, 1)
    assert np.asarray(got).shape == ()
    assert_close(got, ref, s, dtype)


# ---------------------------------------------------------------- BCE values


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(
    "wshape,pwshape",
    [(None, None), ((37,), None), (None, (37,)), ((5, 1), (37,)), ((2, 5, 37), (1, 37)), ((), ())],
    ids=["plain", "w_last", "pw", "w_rows_pw", "w_full_pw", "scalars"],
)
def test_bce_matches_float64_reference(simd_path, dtype, reduction, wshape, pwshape):
    rng = np.random.default_rng(1)
    x, t = inputs(rng, (2, 5, 37), dtype)
    w = None if wshape is None else rng.random(wshape).astype(np.float32) * 2
    pw = None if pwshape is None else rng.random(pwshape).astype(np.float32) * 3
    got = ce_fast.binary_cross_entropy_with_logits(x, t, weight=w, pos_weight=pw, reduction=reduction)
    check_reduced(got, ob.bce(x, t, w, pw), reduction, bce_scale(x, t, w, pw), dtype)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kw", [{}, {"weight": True}, {"pos_weight": True}, {"weight": True, "pos_weight": True}])
def test_bce_matches_torch(simd_path, reduction, kw):
    rng = np.random.default_rng(2)
    x, t = inputs(rng, (6, 4, 129), np.float64)
    opts = {}
    if "weight" in kw:
        opts["weight"] = rng.random((4, 1)) * 2
    if "pos_weight" in kw:
        opts["pos_weight"] = rng.random(129) * 3
    ref = F.binary_cross_entropy_with_logits(
        torch.from_numpy(x),
        torch.from_numpy(t),
        **{k: torch.from_numpy(v) for k, v in opts.items()},
        reduction=reduction,
    ).numpy()
    # float32 logits against torch's float64 answer; float64 logits nearly exactly.
    for dt, rtol in ((np.float64, 1e-13), (np.float32, 2e-6)):
        got = ce_fast.binary_cross_entropy_with_logits(x.astype(dt), t.astype(dt), **opts, reduction=reduction)
        np.testing.assert_allclose(got, ref, rtol=rtol, atol=rtol * 10)


@pytest.mark.parametrize("n", [1, 7, 8, 9, 1023, 1024, 1025, 3000])
def test_bce_lane_and_chunk_tails(simd_path, n):
    rng = np.random.default_rng(n)
    x, t = inputs(rng, (3, n), np.float32, scale=10.0)
    pw = rng.random(n).astype(np.float32) * 2
    loss, g = ce_fast.binary_cross_entropy_with_logits_and_grad(x, t, pos_weight=pw, reduction="none")
    assert_close(loss, ob.bce(x, t, None, pw), bce_scale(x, t, None, pw), np.float32)
    assert_close(g, ob.bce_grad(x, t, None, pw), grad_scale(x, t, 1.0, None, pw), np.float32, stored=np.float32)


@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("tdtype", ALL_DTYPES, ids=DTYPE_IDS.get)
def test_bce_target_of_any_float_dtype(simd_path, dtype, tdtype):
    rng = np.random.default_rng(3)
    x, t = inputs(rng, (4, 50), dtype, tdtype=tdtype)
    got = ce_fast.binary_cross_entropy_with_logits(x, t, reduction="none")
    assert got.dtype == np.float32
    # The engine computes in float32: a float64 target is rounded to float32 first.
    t32 = f64(t).astype(np.float32)
    assert_close(got, ob.bce(x, t32), bce_scale(x, t), np.float32)


@pytest.mark.parametrize("shape", [(), (5,), (0,), (3, 0), (0, 4), (2, 3, 4, 5)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_bce_any_shape_and_empty(simd_path, shape, reduction):
    rng = np.random.default_rng(4)
    x, t = inputs(rng, shape, np.float32)
    got = ce_fast.binary_cross_entropy_with_logits(x, t, reduction=reduction)
    ref = F.binary_cross_entropy_with_logits(
        torch.from_numpy(x).double(), torch.from_numpy(t).double(), reduction=reduction
    ).numpy()
    assert np.asarray(got).shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=2e-6, atol=1e-6)
    loss, g = ce_fast.binary_cross_entropy_with_logits_and_grad(x, t, reduction=reduction)
    np.testing.assert_allclose(loss, ref, rtol=2e-6, atol=1e-6)
    assert g.shape == x.shape and g.dtype == x.dtype


@pytest.mark.parametrize("layout", ["transposed", "sliced", "negative", "classes_strided"])
def test_bce_strided_layouts(simd_path, layout):
    rng = np.random.default_rng(5)
    x, t = inputs(rng, (6, 70), np.float32)
    w = rng.random(70).astype(np.float32)
    xs, ts = with_layout(x, layout), with_layout(t, layout)
    loss, g = ce_fast.binary_cross_entropy_with_logits_and_grad(xs, ts, weight=w, reduction="none")
    assert_close(loss, ob.bce(x, t, w), bce_scale(x, t, w), np.float32)
    assert_close(g, ob.bce_grad(x, t, w), 1.0, np.float32, stored=np.float32)
    out = with_layout(np.zeros_like(x), layout)
    ce_fast.binary_cross_entropy_with_logits_and_grad(xs, ts, weight=w, out=out, reduction="sum")
    assert_close(out, ob.bce_grad(x, t, w), 1.0, np.float32, stored=np.float32)


def test_bce_non_finite_as_float64(simd_path):
    vals = np.array([np.inf, -np.inf, np.nan, 0.0, 100.0, -100.0, 1e30, -1e30], dtype=np.float64)
    x = np.repeat(vals, 3)
    t = np.tile([0.0, 1.0, 0.5], len(vals))
    for dt in (np.float32, np.float64):
        xd, td = x.astype(dt), t.astype(dt)
        ref = F.binary_cross_entropy_with_logits(torch.from_numpy(x), torch.from_numpy(t), reduction="none").numpy()
        got = ce_fast.binary_cross_entropy_with_logits(xd, td, reduction="none")
        np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-37)  # float32 subnormals
        xx = torch.from_numpy(x).requires_grad_()
        F.binary_cross_entropy_with_logits(xx, torch.from_numpy(t), reduction="sum").backward()
        _, g = ce_fast.binary_cross_entropy_with_logits_and_grad(xd, td, reduction="sum")
        np.testing.assert_allclose(g, xx.grad.numpy(), rtol=1e-6, atol=1e-30)
        assert np.isnan(ce_fast.binary_cross_entropy_with_logits(xd, td))


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_bce_grad_matches_reference_and_autograd(simd_path, dtype, reduction):
    rng = np.random.default_rng(6)
    x, t = inputs(rng, (3, 4, 33), dtype)
    w = rng.random((4, 1)).astype(np.float32) + 0.5
    pw = rng.random(33).astype(np.float32) * 2
    go = 0.7 if reduction != "none" else rng.standard_normal((3, 4, 33))
    loss, g = ce_fast.binary_cross_entropy_with_logits_and_grad(
        x, t, weight=w, pos_weight=pw, reduction=reduction, grad_output=go
    )
    check_reduced(loss, ob.bce(x, t, w, pw), reduction, bce_scale(x, t, w, pw), dtype)
    assert g.dtype == x.dtype and g.shape == x.shape
    xx = torch.from_numpy(f64(x)).requires_grad_()
    ref = F.binary_cross_entropy_with_logits(
        xx,
        torch.from_numpy(f64(t)),
        weight=torch.from_numpy(f64(w)),
        pos_weight=torch.from_numpy(f64(pw)),
        reduction=reduction,
    )
    ref.backward(torch.as_tensor(go, dtype=torch.float64).expand_as(ref))
    go_eff = np.asarray(go) / (x.size if reduction == "mean" else 1)
    closed = ob.bce_grad(x, t, w, pw) * go_eff
    np.testing.assert_allclose(closed, xx.grad.numpy(), rtol=1e-12, atol=1e-15)
    assert_close(g, closed, grad_scale(x, t, go_eff, w, pw), dtype, stored=dtype)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_IDS.get)
def test_grad_in_place(simd_path, dtype):
    rng = np.random.default_rng(7)
    x, t = inputs(rng, (5, 300), dtype)
    ref = ob.bce_grad(x, t)
    z = x.copy()
    loss, g = ce_fast.binary_cross_entropy_with_logits_and_grad(z, t, out=z, reduction="sum")
    assert g is z
    assert_close(z, ref, 1.0, dtype, stored=dtype)
    np.testing.assert_allclose(loss, ob.bce(x, t).sum(), rtol=1e-5)
    z = x.copy()
    _, g = ce_fast.sigmoid_focal_loss_and_grad(z, t, out=z, reduction="sum")
    assert_close(z, ob.focal_grad(x, t), grad_scale(x, t, 1.0, focal=True), dtype, stored=dtype)


def test_grad_in_place_torch_bf16(simd_path):
    rng = np.random.default_rng(8)
    x, t = inputs(rng, (4, 100), BF16)
    z = torch_of(x)
    _, g = ce_fast.binary_cross_entropy_with_logits_and_grad(z, torch_of(t), out=z, reduction="none")
    assert g is z and z.dtype == torch.bfloat16
    assert_close(z.float(), ob.bce_grad(x, t), 1.0, BF16, stored=BF16)


# ---------------------------------------------------------------- sigmoid focal loss


def torchvision_focal(x, t, alpha, gamma, reduction):
    """torchvision.ops.sigmoid_focal_loss, line by line."""
    p = torch.sigmoid(x)
    ce_loss = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    p_t = p * t + (1 - p) * (1 - t)
    loss = ce_loss * ((1 - p_t) ** gamma)
    if alpha >= 0:
        alpha_t = alpha * t + (1 - alpha) * (1 - t)
        loss = alpha_t * loss
    if reduction == "mean":
        loss = loss.mean()
    elif reduction == "sum":
        loss = loss.sum()
    return loss


def focal_scale(x, t, alpha):
    a = 1.0 if alpha < 0 else max(abs(alpha), abs(1 - alpha))
    return a * bce_scale(x, t)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (-1.0, 2.0), (0.5, 0.0), (0.75, 1.0), (0.25, 1.5), (1.0, 3.0)])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_focal_matches_reference(simd_path, dtype, alpha, gamma, reduction):
    rng = np.random.default_rng(9)
    x, t = inputs(rng, (4, 3, 41), dtype, hard=gamma != 1.5)
    go = 1.3 if reduction != "none" else rng.standard_normal(x.shape)
    got = ce_fast.sigmoid_focal_loss(x, t, alpha=alpha, gamma=gamma, reduction=reduction)
    check_reduced(got, ob.focal(x, t, alpha, gamma), reduction, focal_scale(x, t, alpha), dtype)
    loss, g = ce_fast.sigmoid_focal_loss_and_grad(x, t, alpha=alpha, gamma=gamma, reduction=reduction, grad_output=go)
    np.testing.assert_array_equal(f64(loss), f64(got))
    xx = torch.from_numpy(f64(x)).requires_grad_()
    ref = torchvision_focal(xx, torch.from_numpy(f64(t)), alpha, gamma, reduction)
    np.testing.assert_allclose(ref.detach().numpy(), reduce_ref(ob.focal(x, t, alpha, gamma), reduction), rtol=1e-9)
    ref.backward(torch.as_tensor(go, dtype=torch.float64).expand_as(ref))
    go_eff = np.asarray(go) / (x.size if reduction == "mean" else 1)
    closed = ob.focal_grad(x, t, alpha, gamma) * go_eff
    np.testing.assert_allclose(closed, xx.grad.numpy(), rtol=1e-10, atol=1e-14)
    assert_close(g, closed, grad_scale(x, t, go_eff, focal=True), dtype, stored=dtype)


def test_focal_defaults_are_torchvisions():
    rng = np.random.default_rng(10)
    x, t = inputs(rng, (8, 16), np.float64, hard=True)
    got = ce_fast.sigmoid_focal_loss(x, t)
    assert got.shape == x.shape  # reduction="none" by default
    ref = torchvision_focal(torch.from_numpy(x), torch.from_numpy(t), 0.25, 2.0, "none").numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-300)


def test_focal_gamma_zero_no_alpha_is_bce(simd_path):
    rng = np.random.default_rng(11)
    x, t = inputs(rng, (7, 77), np.float32)
    a = ce_fast.sigmoid_focal_loss(x, t, alpha=-1, gamma=0.0, reduction="none")
    b = ce_fast.binary_cross_entropy_with_logits(x, t, reduction="none")
    np.testing.assert_array_equal(a, b)


def test_focal_saturated_logits_keep_precision(simd_path):
    x = np.array([20.0, -20.0, 30.0, -30.0], dtype=np.float32)
    t = np.array([1.0, 0.0, 0.0, 1.0], dtype=np.float32)
    got = ce_fast.sigmoid_focal_loss(x, t, reduction="none")
    ref = ob.focal(x, t)
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    assert got[0] > 0 and got[1] > 0  # 1 - p_t ~ 2e-9, not rounded to 0


def test_focal_non_finite_as_float64(simd_path):
    vals = np.array([np.inf, -np.inf, np.nan, 50.0, -50.0], dtype=np.float64)
    x = np.repeat(vals, 3)
    t = np.tile([0.0, 1.0, 0.5], len(vals))
    ref = torchvision_focal(torch.from_numpy(x), torch.from_numpy(t), 0.25, 2.0, "none").numpy()
    for dt in (np.float32, np.float64):
        got = ce_fast.sigmoid_focal_loss(x.astype(dt), t.astype(dt))
        np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-30)


# ---------------------------------------------------------------- torch and library in/out


def test_torch_in_torch_out():
    rng = np.random.default_rng(12)
    x, t = inputs(rng, (3, 20), BF16)
    xt, tt = torch_of(x), torch_of(t)
    got = ce_fast.binary_cross_entropy_with_logits(xt, tt, pos_weight=torch.ones(20), reduction="none")
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float32 and got.shape == xt.shape
    assert_close(got, ob.bce(x, t), bce_scale(x, t), np.float32)
    loss, g = ce_fast.sigmoid_focal_loss_and_grad(xt, tt, reduction="mean")
    assert isinstance(loss, torch.Tensor) and loss.shape == () and g.dtype == torch.bfloat16
    assert not xt.requires_grad


def test_inputs_untouched():
    rng = np.random.default_rng(13)
    x, t = inputs(rng, (3, 20), np.float32)
    x0, t0 = x.copy(), t.copy()
    ce_fast.binary_cross_entropy_with_logits_and_grad(x, t, weight=t)
    ce_fast.sigmoid_focal_loss_and_grad(x, t)
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(t, t0)


# ---------------------------------------------------------------- threads and determinism


def test_parallel_sum_same_for_any_thread_count(simd_path):
    rng = np.random.default_rng(14)
    x, t = inputs(rng, (300, 1500), np.float32)
    pw = rng.random(1500).astype(np.float32)
    res = []
    for n in (1, 2, 3):
        ce_fast.set_threads(n)
        res.append(
            (
                float(ce_fast.binary_cross_entropy_with_logits(x, t, pos_weight=pw, reduction="sum")),
                ce_fast.sigmoid_focal_loss_and_grad(x, t, reduction="mean")[1],
            )
        )
    ce_fast.set_threads(0)
    assert res[0][0] == res[1][0] == res[2][0]
    np.testing.assert_array_equal(res[0][1], res[2][1])
    np.testing.assert_allclose(res[0][0], ob.bce(x, t, None, pw).sum(), rtol=1e-6)


def test_one_long_row_splits_over_threads(simd_path):
    rng = np.random.default_rng(15)
    x, t = inputs(rng, (1 << 18) + 5, np.float16)
    ce_fast.set_threads(2)
    loss, g = ce_fast.binary_cross_entropy_with_logits_and_grad(x, t, reduction="mean")
    ce_fast.set_threads(0)
    np.testing.assert_allclose(loss, ob.bce(x, t).mean(), rtol=1e-6)
    assert_close(g, ob.bce_grad(x, t) / x.size, 1e-12, np.float16, stored=np.float16)


# ---------------------------------------------------------------- hypothesis

SETTINGS = settings(
    max_examples=120,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@st.composite
def cases(draw):
    ndim = draw(st.integers(0, 3))
    shape = tuple(
        draw(st.sampled_from([0, 1, 2, 3, 7, 9, 17, 1030])) if i == ndim - 1 else draw(st.integers(1, 4))
        for i in range(ndim)
    )
    dtype = draw(st.sampled_from(ALL_DTYPES))
    tdtype = draw(st.sampled_from([dtype, np.dtype(np.float32)]))

    def bshape():
        k = draw(st.integers(0, ndim))
        return tuple(draw(st.sampled_from([1, n])) for n in shape[ndim - k :])

    kind = draw(st.sampled_from(["bce", "focal"]))
    opts = {"reduction": draw(st.sampled_from(["mean", "sum", "none"]))}
    if kind == "bce":
        if draw(st.booleans()):
            opts["weight"] = bshape()
        if draw(st.booleans()):
            opts["pos_weight"] = bshape()
    else:
        opts["alpha"] = draw(st.sampled_from([-1.0, 0.0, 0.25, 1.0]))
        opts["gamma"] = draw(st.sampled_from([0.0, 0.5, 1.0, 2.0, 2.5]))
    return kind, shape, dtype, tdtype, opts, draw(st.integers(0, 2**31)), draw(st.booleans())


@SETTINGS
@given(cases())
def test_hypothesis_against_reference(case):
    kind, shape, dtype, tdtype, opts, seed, scalar = case
    rng = np.random.default_rng(seed)
    x, t = inputs(rng, shape, dtype, tdtype=tdtype, hard=kind == "focal")
    t = cast(f64(t).astype(np.float32) if dtype != np.float64 else f64(t), tdtype)
    for k in ("weight", "pos_weight"):
        if k in opts:
            opts[k] = rng.random(opts[k]).astype(np.float32) * 2
    ce_fast._core.set_simd("scalar" if scalar else "auto")
    red = opts["reduction"]
    if kind == "bce":
        fn, gfn = ce_fast.binary_cross_entropy_with_logits, ce_fast.binary_cross_entropy_with_logits_and_grad
        ref_el = ob.bce(x, t, opts.get("weight"), opts.get("pos_weight"))
        ref_g = ob.bce_grad(x, t, opts.get("weight"), opts.get("pos_weight"))
        scale = bce_scale(x, t, opts.get("weight"), opts.get("pos_weight"))
    else:
        fn, gfn = ce_fast.sigmoid_focal_loss, ce_fast.sigmoid_focal_loss_and_grad
        ref_el = ob.focal(x, t, opts["alpha"], opts["gamma"])
        ref_g = ob.focal_grad(x, t, opts["alpha"], opts["gamma"])
        scale = focal_scale(x, t, opts["alpha"])
    got = fn(x, t, **opts)
    check_reduced(got, ref_el, red, scale, dtype)
    loss, g = gfn(x, t, **opts, grad_output=2.0)
    np.testing.assert_array_equal(f64(loss), f64(got))
    go_eff = 2.0 / (max(x.size, 1) if red == "mean" else 1)
    ref_g = ref_g * go_eff
    gs = grad_scale(x, t, go_eff, opts.get("weight"), opts.get("pos_weight"), focal=kind == "focal")
    assert_close(g, ref_g, gs, dtype, stored=dtype)


# ---------------------------------------------------------------- bad input

X = np.zeros((4, 5), dtype=np.float32)
T = np.zeros((4, 5), dtype=np.float32)
BCE_FNS = [ce_fast.binary_cross_entropy_with_logits, ce_fast.binary_cross_entropy_with_logits_and_grad]
ALL_FNS = BCE_FNS + [ce_fast.sigmoid_focal_loss, ce_fast.sigmoid_focal_loss_and_grad]
ids = lambda f: f.__name__  # noqa: E731


@pytest.mark.parametrize("fn", ALL_FNS, ids=ids)
def test_bad_logits_dtype(fn):
    for dt in (np.int64, np.complex64, np.bool_):
        with pytest.raises(TypeError, match=rf"logits dtype {np.dtype(dt).name} is not supported"):
            fn(X.astype(dt), T)


@pytest.mark.parametrize("fn", ALL_FNS, ids=ids)
def test_bad_target(fn):
    with pytest.raises(TypeError, match=r"target must be a floating array of the logits' shape .* got int64"):
        fn(X, T.astype(np.int64))
    with pytest.raises(TypeError, match=r"target must be a floating array .* got bool"):
        fn(X, T.astype(bool))
    with pytest.raises(ValueError, match=re.escape("target shape (4,) must be the same as logits shape (4, 5)")):
        fn(X, T[:, 0])
    with pytest.raises(ValueError, match=re.escape("target shape (5,) must be the same as logits shape (4, 5)")):
        fn(X, T[0])
    with pytest.raises(TypeError, match=r"target must be an array"):
        fn(X, [[1.0], [2.0, 3.0]])


@pytest.mark.parametrize("fn", ALL_FNS, ids=ids)
def test_bad_reduction(fn):
    with pytest.raises(ValueError, match=r"reduction must be one of \('mean', 'sum', 'none'\), got 'avg'"):
        fn(X, T, reduction="avg")
    with pytest.raises(TypeError, match=r"reduction must be a str, got NoneType"):
        fn(X, T, reduction=None)


@pytest.mark.parametrize("fn", BCE_FNS, ids=ids)
@pytest.mark.parametrize("name", ["weight", "pos_weight"])
def test_bad_weights(fn, name):
    with pytest.raises(
        ValueError, match=re.escape(f"{name} of shape (3,) does not broadcast to the logits' shape (4, 5)")
    ):
        fn(X, T, **{name: np.ones(3)})
    with pytest.raises(ValueError, match=re.escape(f"{name} of shape (2, 4, 5) does not broadcast")):
        fn(X, T, **{name: np.ones((2, 4, 5))})
    with pytest.raises(ValueError, match=re.escape(f"{name} must be non-negative; {name}[2] = -1.0")):
        fn(X, T, **{name: np.array([1.0, 1, -1, 1, 1])})
    with pytest.raises(ValueError, match=f"{name} must be finite"):
        fn(X, T, **{name: np.array([1.0, np.nan, 1, 1, 1])})
    with pytest.raises(ValueError, match=f"{name} must be finite"):
        fn(X, T, **{name: np.float32(np.inf)})
    with pytest.raises(TypeError, match=f"{name} must hold real numbers"):
        fn(X, T, **{name: np.ones(5, dtype=np.complex64)})
    # integer weights are fine
    fn(X, T, **{name: np.arange(5)})


@pytest.mark.parametrize("fn", [ce_fast.sigmoid_focal_loss, ce_fast.sigmoid_focal_loss_and_grad], ids=ids)
def test_bad_focal_options(fn):
    with pytest.raises(ValueError, match=r"gamma must be non-negative, got -1.0"):
        fn(X, T, gamma=-1.0)
    with pytest.raises(ValueError, match=r"alpha must be at most 1 .* got 1.5"):
        fn(X, T, alpha=1.5)
    with pytest.raises(ValueError, match=r"gamma must be finite, got nan"):
        fn(X, T, gamma=float("nan"))
    with pytest.raises(ValueError, match=r"alpha must be finite, got inf"):
        fn(X, T, alpha=float("inf"))
    with pytest.raises(TypeError, match=r"gamma must be a real number, got str"):
        fn(X, T, gamma="2")
    with pytest.raises(TypeError, match=r"alpha must be a real number, got NoneType"):
        fn(X, T, alpha=None)


def test_focal_takes_no_weights():
    with pytest.raises(TypeError):
        ce_fast.sigmoid_focal_loss(X, T, weight=np.ones(5))  # type: ignore[call-arg]


@pytest.mark.parametrize(
    "fn", [ce_fast.binary_cross_entropy_with_logits_and_grad, ce_fast.sigmoid_focal_loss_and_grad], ids=ids
)
def test_bad_grad_output_and_out(fn):
    z = X.copy()
    with pytest.raises(
        ValueError, match=re.escape("grad_output must be a scalar for reduction='mean', got shape (4, 5)")
    ):
        fn(z, T, reduction="mean", grad_output=np.ones((4, 5)))
    with pytest.raises(
        ValueError, match=re.escape("grad_output must be a scalar or have the loss's shape (4, 5), got (4,)")
    ):
        fn(z, T, reduction="none", grad_output=np.ones(4))
    with pytest.raises(TypeError, match=r"grad_output must be a real number"):
        fn(z, T, grad_output="1")
    with pytest.raises(ValueError, match=re.escape("out must have shape (4, 5) (the logits' shape), got (4, 4)")):
        fn(z, T, out=np.zeros((4, 4), np.float32))
    with pytest.raises(TypeError, match=r"out must be float32, got float64"):
        fn(z, T, out=np.zeros((4, 5)))
    with pytest.raises(ValueError, match=r"out overlaps logits without being the same array"):
        big = np.zeros((4, 6), np.float32)
        fn(big[:, :5], T, out=big[:, 1:])
    with pytest.raises(ValueError, match=r"out overlaps the target"):
        tt = np.zeros((4, 5), np.float32)
        fn(z, tt, out=tt)
    ro = np.zeros((4, 5), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match=r"out is read-only"):
        fn(z, T, out=ro)
    with pytest.raises(ValueError, match=r"out has strides"):
        fn(z, T, out=np.lib.stride_tricks.as_strided(np.zeros(5, np.float32), (4, 5), (0, 4)))


def test_out_overlapping_weight_is_refused():
    z = X.copy()
    w = np.ones((4, 5), np.float32)
    with pytest.raises(ValueError, match=r"out overlaps the weight"):
        ce_fast.binary_cross_entropy_with_logits_and_grad(z, T, weight=w, out=w)
    with pytest.raises(ValueError, match=r"out overlaps the pos_weight"):
        ce_fast.binary_cross_entropy_with_logits_and_grad(z, T, pos_weight=w, out=w)


@pytest.mark.parametrize("fn", ALL_FNS, ids=ids)
def test_out_without_grad_and_mixed_libraries(fn):
    if fn in (ce_fast.binary_cross_entropy_with_logits, ce_fast.sigmoid_focal_loss):
        with pytest.raises(TypeError):
            fn(X, T, out=X.copy())  # type: ignore[call-arg]
    # torch target with NumPy logits: both on the CPU, accepted
    got = fn(X, torch.from_numpy(T))
    assert not isinstance(got, torch.Tensor) and not isinstance(got, tuple) or isinstance(got[0], np.ndarray)
