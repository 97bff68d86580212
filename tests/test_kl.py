"""ce_fast.kl_divergence / kl_divergence_and_grad against the float64 oracle and torch's
F.kl_div on log_softmax, on both kernel sets."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import ce_fast

from conftest import (
    LAYOUTS,
    assert_grad_close,
    assert_loss_dtype,
    assert_reduced_close,
    assert_rows_close,
    use_simd,
    with_layout,
)
from oracle import f64
from oracle_kl_focal import kl_grad_ref, kl_rows_ref, reduce_ref

BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = [np.float32, np.float64, np.float16, BF16]


def _pair(rng, shape, dtype, scale=3.0):
    s = (rng.standard_normal(shape) * scale).astype(dtype)
    t = (rng.standard_normal(shape) * scale).astype(dtype)
    return s, t


def _valid(shape, target, ignore_index=-100):
    return np.ones(shape, bool) if target is None else np.asarray(target) != ignore_index


# The per-row value sums C terms: allow for their size (|p (t - s)| summed), not just |KL|.
def _scale(s, t, T):
    return 1.0 + np.abs(f64(s) / T).max() + np.abs(f64(t) / T).max()


def test_reference_matches_torch():
    rng = np.random.default_rng(0)
    s, t = _pair(rng, (6, 50), np.float64)
    for rev in (False, True):
        ls = F.log_softmax(torch.from_numpy(s) / 1.5, -1)
        lt = F.log_softmax(torch.from_numpy(t) / 1.5, -1)
        a, b = (lt, ls) if rev else (ls, lt)
        want = F.kl_div(a, b, log_target=True, reduction="none").sum(-1).numpy()
        np.testing.assert_allclose(kl_rows_ref(s, t, temperature=1.5, reverse=rev), want, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("shape", [(7, 33), (2, 3, 5000), (1, 1)])
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_loss_matches_reference(simd_path, dtype, reverse, shape, T):
    rng = np.random.default_rng(hash((shape, T)) % 2**32)
    s, t = _pair(rng, shape, dtype)
    ref = kl_rows_ref(s, t, temperature=T, reverse=reverse)
    sc = _scale(s, t, T)
    got = ce_fast.kl_divergence(s, t, temperature=T, reverse=reverse, reduction="none")
    assert_loss_dtype(got, dtype, "none", shape[:-1])
    assert_rows_close(got, ref, dtype, scale=sc)
    for red in ("mean", "sum"):
        res = ce_fast.kl_divergence(s, t, temperature=T, reverse=reverse, reduction=red)
        assert_loss_dtype(res, dtype, red, shape[:-1])
        assert_reduced_close(res, reduce_ref(ref, _valid(ref.shape, None), red), ref, ref.size, dtype, red, scale=sc)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_grad_matches_reference(simd_path, dtype, reverse, reduction):
    rng = np.random.default_rng(3)
    shape = (5, 2100)
    s, t = _pair(rng, shape, dtype)
    y = rng.integers(0, shape[-1], shape[:-1])
    y[1] = -100
    go = rng.standard_normal(shape[:-1]) if reduction == "none" else 0.7
    T = 1.5
    kw = dict(temperature=T, reverse=reverse, target=y, reduction=reduction)
    loss, g = ce_fast.kl_divergence_and_grad(s, t, grad_output=go, **kw)
    assert g.dtype == s.dtype and g.shape == s.shape
    ref = kl_grad_ref(s, t, grad_output=go, **kw)
    floor = np.abs(np.broadcast_to(go, shape[:-1])) * _scale(s, t, T)
    assert_grad_close(g, ref, dtype, floor=floor / T)
    assert np.all(g[1] == 0)
    np.testing.assert_array_equal(loss, ce_fast.kl_divergence(s, t, **kw))


def test_grad_matches_torch_autograd():
    rng = np.random.default_rng(4)
    s, t = _pair(rng, (4, 3, 40), np.float64)
    for rev in (False, True):
        st_ = torch.tensor(s, requires_grad=True)
        ls = F.log_softmax(st_ / 2.0, -1)
        lt = F.log_softmax(torch.from_numpy(t) / 2.0, -1)
        a, b = (lt, ls) if rev else (ls, lt)
        F.kl_div(a, b, log_target=True, reduction="sum").div(12).backward()
        _, g = ce_fast.kl_divergence_and_grad(s, t, temperature=2.0, reverse=rev)
        np.testing.assert_allclose(g, st_.grad.numpy(), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("dtype", [np.float32, BF16], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("reverse", [False, True])
def test_in_place(simd_path, dtype, reverse):
    rng = np.random.default_rng(5)
    s, t = _pair(rng, (3, 4100), dtype)
    loss, fresh = ce_fast.kl_divergence_and_grad(s, t, reverse=reverse, temperature=3.0)
    z = s.copy()
    loss2, res = ce_fast.kl_divergence_and_grad(z, t, reverse=reverse, temperature=3.0, out=z)
    assert res is z
    np.testing.assert_array_equal(z, fresh)
    np.testing.assert_array_equal(loss2, loss)


def test_identical_rows_are_zero(simd_path):
    rng = np.random.default_rng(6)
    s = (rng.standard_normal((4, 3000)) * 5).astype(np.float32)
    assert np.all(ce_fast.kl_divergence(s, s, reduction="none") == 0.0)
    assert np.all(ce_fast.kl_divergence(s, s, reverse=True, temperature=0.3, reduction="none") == 0.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("reverse", [False, True])
def test_maxima_move_across_chunks(simd_path, dtype, reverse):
    """Maxima that jump in a later chunk (beyond the one-pass range) and large offsets."""
    rng = np.random.default_rng(7)
    s, t = _pair(rng, (4, 9000), np.float64)
    s[0, 5000] = 200.0
    t[1, 7000] = 300.0
    s[2] += 1e4
    t[3, 2100:] += 50.0
    s, t = s.astype(dtype), t.astype(dtype)
    ref = kl_rows_ref(s, t, reverse=reverse)
    assert_rows_close(
        ce_fast.kl_divergence(s, t, reverse=reverse, reduction="none"), ref, dtype, scale=_scale(s, t, 1.0)
    )


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
def test_non_finite(simd_path, reverse, dtype):
    rng = np.random.default_rng(8)
    C = 2500
    s, t = _pair(rng, (9, C), np.float64)
    s[0, 3] = np.nan
    t[1, 2400] = np.nan
    s[2, 7] = np.inf
    t[3, 2] = np.inf
    s[4] = -np.inf
    t[5] = -np.inf
    t[6, :2200] = -np.inf  # teacher masks most classes: they contribute 0
    s[7, 10] = -np.inf  # student -inf where the teacher has mass: KL(p || q) is inf
    s[8, 2300] = -np.inf
    t[8, 2300] = -np.inf  # both -inf: 0
    s, t = s.astype(dtype), t.astype(dtype)
    ref = kl_rows_ref(s, t, reverse=reverse)
    assert np.isnan(ref[:6]).all() and np.isfinite(ref[8])
    got = ce_fast.kl_divergence(s, t, reverse=reverse, reduction="none")
    assert_rows_close(got, ref, dtype, scale=_scale(s[8:], t[8:], 1.0))
    _, g = ce_fast.kl_divergence_and_grad(s[8:], t[8:], reverse=reverse)
    assert np.isfinite(g).all()
    gref = kl_grad_ref(s[8:], t[8:], reverse=reverse)
    assert_grad_close(g, gref, dtype, floor=np.full(1, _scale(s[8:], t[8:], 1.0)))


def test_masking_by_target(simd_path):
    rng = np.random.default_rng(9)
    s, t = _pair(rng, (3, 4, 100), np.float32)
    y = rng.integers(0, 100, (3, 4))
    y[0, 1] = y[2, 3] = 7
    rows = kl_rows_ref(s, t, target=y, ignore_index=7)
    got = ce_fast.kl_divergence(s, t, target=y, ignore_index=7, reduction="none")
    assert got[0, 1] == 0 and got[2, 3] == 0
    assert_rows_close(got, rows, np.float32, scale=_scale(s, t, 1.0))
    mean = ce_fast.kl_divergence(s, t, target=y, ignore_index=7)
    assert_reduced_close(mean, rows.sum() / 10, rows, 10, np.float32, "mean", scale=_scale(s, t, 1.0))
    all_ignored = np.full((3, 4), -100)
    assert np.isnan(ce_fast.kl_divergence(s, t, target=all_ignored))
    assert ce_fast.kl_divergence(s, t, target=all_ignored, reduction="sum") == 0
    _, g = ce_fast.kl_divergence_and_grad(s, t, target=all_ignored)
    assert np.all(g == 0)


def test_zero_rows():
    s = np.zeros((0, 5), np.float32)
    assert np.isnan(ce_fast.kl_divergence(s, s))
    assert ce_fast.kl_divergence(s, s, reduction="sum") == 0
    assert ce_fast.kl_divergence(s, s, reduction="none").shape == (0,)
    loss, g = ce_fast.kl_divergence_and_grad(s, s)
    assert g.shape == (0, 5) and np.isnan(loss)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts(simd_path, layout):
    rng = np.random.default_rng(10)
    s, t = _pair(rng, (3, 5, 70), np.float32)
    want = ce_fast.kl_divergence(s, t, reduction="none", temperature=2.0)
    got = ce_fast.kl_divergence(with_layout(s, layout), with_layout(t, "transposed"), reduction="none", temperature=2.0)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    _, g = ce_fast.kl_divergence_and_grad(s, t)
    _, g2 = ce_fast.kl_divergence_and_grad(with_layout(s, layout), t)
    np.testing.assert_allclose(g2, g, rtol=1e-6, atol=1e-9)


def test_mixed_dtypes_and_torch():
    rng = np.random.default_rng(11)
    s, t = _pair(rng, (4, 300), np.float32)
    tb = t.astype(BF16)
    ref = kl_rows_ref(s, tb)
    assert_rows_close(ce_fast.kl_divergence(s, tb, reduction="none"), ref, np.float32, scale=_scale(s, t, 1.0))
    res = ce_fast.kl_divergence(torch.from_numpy(s), torch.from_numpy(t), temperature=2.0)
    assert isinstance(res, torch.Tensor) and res.dtype == torch.float32 and res.shape == ()
    np.testing.assert_allclose(float(res), float(ce_fast.kl_divergence(s, t, temperature=2.0)), rtol=1e-7)
    # float64 teacher: the pass runs in float64; the loss keeps the student's float32
    got = ce_fast.kl_divergence(s, t.astype(np.float64), reduction="none")
    assert got.dtype == np.float32
    assert_rows_close(got, kl_rows_ref(s, t), np.float32, scale=_scale(s, t, 1.0))


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(0, 4),
    inner=st.integers(1, 3),
    C=st.sampled_from([1, 2, 7, 64, 2049, 4500]),
    dtype=st.sampled_from(DTYPES),
    T=st.sampled_from([0.5, 1.0, 4.0]),
    reverse=st.booleans(),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    masked=st.booleans(),
    scalar=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_hypothesis(rows, inner, C, dtype, T, reverse, reduction, masked, scalar, seed):
    rng = np.random.default_rng(seed)
    shape = (rows, inner, C)
    s, t = _pair(rng, shape, dtype)
    y = rng.integers(-1, C, shape[:-1]) if masked else None
    if y is not None:
        y[y < 0] = -100
    kw = dict(temperature=T, reverse=reverse, target=y, reduction=reduction)
    with use_simd("scalar" if scalar else "auto"):
        loss, g = ce_fast.kl_divergence_and_grad(s, t, **kw)
    ref = kl_rows_ref(s, t, temperature=T, reverse=reverse, target=y)
    sc = _scale(s, t, T) if s.size else 1.0
    valid = _valid(shape[:-1], y)
    if reduction == "none":
        assert_rows_close(loss, ref, dtype, scale=sc)
    else:
        assert_reduced_close(loss, reduce_ref(ref, valid, reduction), ref, valid.sum(), dtype, reduction, scale=sc)
    gref = kl_grad_ref(s, t, temperature=T, reverse=reverse, target=y, reduction=reduction)
    assert_grad_close(g, gref, dtype, floor=np.full(shape[:-1], sc / T))


# ----------------------------------------------------------------------------- bad input


def _s():
    return np.zeros((2, 3), np.float32)


@pytest.mark.parametrize(
    "call, exc, msg",
    [
        (lambda: ce_fast.kl_divergence(_s(), np.zeros((2, 4), np.float32)), ValueError, "does not match logits shape"),
        (lambda: ce_fast.kl_divergence(_s(), np.zeros((2, 3), np.int32)), TypeError, "teacher_logits dtype int32"),
        (lambda: ce_fast.kl_divergence(np.zeros((2, 3), np.int64), _s()), TypeError, "logits dtype int64"),
        (
            lambda: ce_fast.kl_divergence(np.zeros((2, 0), np.float32), np.zeros((2, 0), np.float32)),
            ValueError,
            "zero classes",
        ),
        (lambda: ce_fast.kl_divergence(_s(), _s(), temperature=0.0), ValueError, "temperature must be finite and > 0"),
        (lambda: ce_fast.kl_divergence(_s(), _s(), temperature=-1), ValueError, "temperature must be finite and > 0"),
        (lambda: ce_fast.kl_divergence(_s(), _s(), temperature=float("nan")), ValueError, "temperature must be"),
        (lambda: ce_fast.kl_divergence(_s(), _s(), temperature="2"), TypeError, "temperature must be a real number"),
        (lambda: ce_fast.kl_divergence(_s(), _s(), temperature=1e-39), ValueError, "outside float32's range"),
        (lambda: ce_fast.kl_divergence(_s(), _s(), reverse=1), TypeError, "reverse must be a bool"),
        (lambda: ce_fast.kl_divergence(_s(), _s(), reduction="batchmean"), ValueError, "reduction must be one of"),
        (lambda: ce_fast.kl_divergence(_s(), _s(), ignore_index=1.5), TypeError, "ignore_index must be an int"),
        (lambda: ce_fast.kl_divergence(_s(), _s(), target=np.zeros(2, np.float32)), TypeError, "target dtype float32"),
        (lambda: ce_fast.kl_divergence(_s(), _s(), target=np.zeros(3, np.int64)), ValueError, "target shape (3,)"),
        (
            lambda: ce_fast.kl_divergence(_s(), _s(), target=np.array([0, 3])),
            IndexError,
            "target value 3 at position (1,)",
        ),
        (
            lambda: ce_fast.kl_divergence_and_grad(_s(), _s(), out=np.zeros((2, 4), np.float32)),
            ValueError,
            "out must have shape",
        ),
        (
            lambda: ce_fast.kl_divergence_and_grad(_s(), _s(), out=np.zeros((2, 3), np.float64)),
            TypeError,
            "out must be float32",
        ),
        (
            lambda: ce_fast.kl_divergence_and_grad(_s(), _s(), grad_output=np.ones(2)),
            ValueError,
            "grad_output must be a scalar",
        ),
        (
            lambda: ce_fast.kl_divergence_and_grad(_s(), _s(), grad_output="x"),
            TypeError,
            "grad_output must be a real number",
        ),
    ],
)
def test_bad_input(call, exc, msg):
    with pytest.raises(exc) as e:
        call()
    assert msg in str(e.value)


def test_out_may_not_overlap_the_teacher():
    s = np.zeros((2, 3), np.float32)
    t = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match="out overlaps teacher_logits"):
        ce_fast.kl_divergence_and_grad(s, t, out=t)
    with pytest.raises(ValueError, match="out overlaps logits without being the same array"):
        big = np.zeros((2, 4), np.float32)
        ce_fast.kl_divergence_and_grad(big[:, :3], t, out=big[:, 1:])
