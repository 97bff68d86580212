"""ce_fast.logsumexp against the float64 oracle (torch.logsumexp semantics)."""

from __future__ import annotations

import os

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ce_fast

from conftest import (
    ALL_DTYPES,
    BF16,
    DTYPE_IDS,
    LAYOUTS,
    ArrayInterfaceOnly,
    assert_rows_close,
    cast,
    out_dtype,
    random_logits,
    simd_sets,
    to_f64,
    torch_of,
    torch_with_layout,
    use_simd,
    with_layout,
)
from oracle import logsumexp_ref

SETTINGS = settings(
    max_examples=int(os.environ.get("CE_FAST_EXAMPLES", 150)),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def check_lse(z, dtype, what=""):
    res = ce_fast.logsumexp(z)
    ref = logsumexp_ref(to_f64(z))
    if isinstance(z, torch.Tensor):
        assert isinstance(res, torch.Tensor)
        assert res.dtype == (torch.float64 if z.dtype == torch.float64 else torch.float32)
    else:
        assert isinstance(res, np.ndarray)
        assert res.dtype == out_dtype(dtype)
    assert tuple(res.shape) == tuple(z.shape[:-1])
    assert_rows_close(res, ref, dtype, what=what)
    return res


@st.composite
def lse_cases(draw):
    dtype = draw(st.sampled_from(ALL_DTYPES))
    C = draw(st.one_of(st.integers(1, 40), st.integers(41, 5000), st.sampled_from([2048, 2049, 65537, 262144])))
    max_rows = max(1, min(50, 250_000 // C))
    ndim = draw(st.sampled_from([1, 2, 3]))
    if ndim == 1:
        batch = ()
    elif ndim == 2:
        batch = (draw(st.integers(0, max_rows)),)
    else:
        b = draw(st.integers(0, 5))
        batch = (b, draw(st.integers(0, max(1, max_rows // max(b, 1)))))
    return dict(
        dtype=dtype,
        shape=batch + (C,),
        layout=draw(st.sampled_from(LAYOUTS)),
        seed=draw(st.integers(0, 2**32 - 1)),
        scale=draw(st.sampled_from([0.01, 1.0, 10.0, 300.0])),
        offset=draw(st.sampled_from([0.0, 50.0, -1000.0])),
        specials=draw(st.sampled_from([0.0, 0.0, 0.01, 0.3])),
        lib=draw(st.sampled_from(["numpy", "numpy", "torch"])),
    )


@SETTINGS
@given(case=lse_cases())
def test_logsumexp_property(simd_path, case):
    dtype = case["dtype"]
    rng = np.random.default_rng(case["seed"])
    z64 = rng.standard_normal(case["shape"]) * case["scale"] + case["offset"]
    if case["specials"]:
        r = rng.random(case["shape"])
        z64[r < case["specials"] / 3] = -np.inf
        z64[(r > 0.5) & (r < 0.5 + case["specials"] / 100)] = np.inf
        z64[(r > 0.9) & (r < 0.9 + case["specials"] / 100)] = np.nan
    z = cast(z64, dtype)
    if case["lib"] == "torch":
        zz = torch_with_layout(torch_of(z), case["layout"])
    else:
        zz = with_layout(z, case["layout"])
    before = to_f64(zz).copy()
    check_lse(zz, dtype, what=f"{case} ")
    np.testing.assert_array_equal(to_f64(zz), before)


EDGE = [
    ([0.0, 1.0, 2.0], None),
    ([-np.inf, -np.inf, -np.inf], -np.inf),
    ([-np.inf, 0.0, -np.inf], 0.0),
    ([np.inf, 0.0, 1.0], np.inf),
    ([np.inf, -np.inf, 1.0], np.inf),
    ([np.inf, np.inf, np.inf], np.inf),
    ([np.nan, 0.0, 1.0], np.nan),
    ([np.nan, np.inf, 1.0], np.nan),
    ([np.nan, -np.inf, -np.inf], np.nan),
    ([-np.inf, np.nan, np.inf], np.nan),
    ([5.0, 5.0, 5.0], 5.0 + np.log(3.0)),
]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("C", [3, 19, 4100])
def test_logsumexp_non_finite_conventions(simd_path, dtype, C):
    """All -inf -> -inf; +inf and no NaN -> +inf; NaN -> NaN; at any position in a long row."""
    rows, want = [], []
    for vals, w in EDGE:
        for pos in (0, C // 2, C - 1):
            row = np.full(C, -np.inf) if np.isneginf(vals).all() else np.full(C, -np.inf)
            # spread the three values over the row, the rest -inf (neutral)
            idx = [pos, (pos + 1) % C, (pos + 7) % C] if C > 8 else [0, 1, 2]
            for i, v in zip(idx, vals):
                row[i] = v
            rows.append(row)
            want.append(w)
    z = cast(np.stack(rows), dtype)
    res = check_lse(z, dtype)
    for got, w in zip(to_f64(res), want):
        if w is None:
            continue
        if np.isnan(w):
            assert np.isnan(got)
        elif np.isinf(w):
            assert got == w
        else:
            assert abs(got - w) <= 1e-5 * (1 + abs(w))


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_IDS.get)
def test_logsumexp_extreme_magnitudes(simd_path, dtype):
    big = {np.dtype(np.float16): 6.0e4, np.dtype(np.float64): 1e300}.get(np.dtype(dtype), 3.0e38)
    rng = np.random.default_rng(1)
    z = np.stack(
        [
            rng.uniform(-1, 1, 3000) * big,
            np.full(3000, big),
            np.full(3000, -big),
            np.r_[big, np.full(2999, -big)],
            np.r_[np.full(2999, -big), -big / 2],
            np.full(3000, 1e-30),
        ]
    )
    z = cast(z, dtype)
    check_lse(z, dtype)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("C", [1, 2, 1000, 2048, 262144])
@pytest.mark.parametrize("value", [0.0, -3.25, 77.0])
def test_logsumexp_constant_rows(simd_path, dtype, C, value):
    z = np.full((3, C), value, dtype=dtype)
    res = ce_fast.logsumexp(z)
    assert_rows_close(res, np.full(3, value + np.log(C)), dtype)


def test_logsumexp_zero_rows_and_1d():
    for dtype in ALL_DTYPES:
        res = ce_fast.logsumexp(np.zeros((0, 4), dtype=dtype))
        assert res.shape == (0,) and res.dtype == out_dtype(dtype)
        res = ce_fast.logsumexp(np.zeros((2, 0, 4), dtype=dtype))
        assert res.shape == (2, 0)
        res = ce_fast.logsumexp(np.array([1.0, 2.0, 3.0], dtype=dtype))
        assert res.shape == () and isinstance(res, np.ndarray)
        assert_rows_close(res, logsumexp_ref(np.array([1.0, 2.0, 3.0])), dtype)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_IDS.get)
def test_logsumexp_torch_in_torch_out(dtype):
    rng = np.random.default_rng(2)
    z = random_logits(rng, (3, 4, 500), dtype, scale=5)
    t = torch_of(z)
    res = check_lse(t, dtype)
    np.testing.assert_array_equal(res.numpy(), ce_fast.logsumexp(z))
    # a non-contiguous torch view: transposed batch axes, strided classes
    tv = t.transpose(0, 1)[:, :, ::3]
    res = check_lse(tv, dtype)
    np.testing.assert_array_equal(res.numpy(), ce_fast.logsumexp(np.ascontiguousarray(z.transpose(1, 0, 2)[:, :, ::3])))


def test_logsumexp_torch_bfloat16_and_requires_grad():
    t = (torch.randn(7, 300) * 4).to(torch.bfloat16).requires_grad_(True)
    res = ce_fast.logsumexp(t)
    assert isinstance(res, torch.Tensor) and res.dtype == torch.float32
    ref = torch.logsumexp(t.detach().double(), -1).numpy()
    assert_rows_close(res, ref, BF16)


def test_logsumexp_array_interface_and_lists():
    rng = np.random.default_rng(3)
    z = random_logits(rng, (5, 33), np.float32)
    got = ce_fast.logsumexp(ArrayInterfaceOnly(z))
    assert isinstance(got, np.ndarray) and got.dtype == np.float32
    np.testing.assert_array_equal(got, ce_fast.logsumexp(z))
    lst = [[0.0, 1.0], [2.0, -np.inf]]
    got = ce_fast.logsumexp(lst)
    assert got.dtype == np.float64
    assert_rows_close(got, logsumexp_ref(np.array(lst)), np.float64)
    z16 = z.astype(np.float16)
    np.testing.assert_array_equal(ce_fast.logsumexp(ArrayInterfaceOnly(z16)), ce_fast.logsumexp(z16))


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("out_dt", [np.float32, np.float64], ids=["out32", "out64"])
def test_logsumexp_out(dtype, out_dt):
    rng = np.random.default_rng(4)
    z = random_logits(rng, (4, 6, 70), dtype)
    out = np.full((4, 6), np.nan, dtype=out_dt)
    res = ce_fast.logsumexp(z, out=out)
    assert res is out
    assert_rows_close(out, logsumexp_ref(z.astype(np.float64)), dtype if out_dt == np.float64 else np.float32)
    np.testing.assert_array_equal(out, ce_fast.logsumexp(z).astype(out_dt))
    # a strided out view
    big = np.zeros((4, 12), dtype=out_dt)
    ce_fast.logsumexp(z, out=big[:, ::2])
    np.testing.assert_array_equal(big[:, ::2], out)
    assert np.all(big[:, 1::2] == 0)


def test_logsumexp_out_torch():
    z = torch.randn(3, 50)
    out = torch.empty(3, dtype=torch.float32)
    res = ce_fast.logsumexp(z, out=out)
    assert res is out
    np.testing.assert_allclose(out.numpy(), torch.logsumexp(z.double(), -1).numpy(), rtol=1e-6)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_IDS.get)
def test_logsumexp_scalar_and_simd_agree(dtype):
    rng = np.random.default_rng(5)
    z = random_logits(rng, (12, 5003), dtype, scale=8)
    z[2, 9] = np.nan
    z[3] = -np.inf
    z[4, 4000] = np.inf
    res = {}
    for name in simd_sets():
        with use_simd(name) as level:
            res[level] = to_f64(check_lse(z, dtype))
    assert list(res) == simd_sets()
    for level, b in res.items():
        np.testing.assert_allclose(res["scalar"], b, rtol=2e-6, atol=0, equal_nan=True, err_msg=level)


def test_logsumexp_input_not_modified_and_bfloat16_numpy():
    rng = np.random.default_rng(6)
    z = random_logits(rng, (30, 257), ml_dtypes.bfloat16, scale=3)
    c = z.copy()
    check_lse(z, BF16)
    check_lse(z[::-2, 3:], BF16)
    assert z.tobytes() == c.tobytes()


def test_out_torch_zero_d():
    """A 1-D torch row writes its 0-d log-sum-exp into a 0-d torch `out`."""
    import torch

    z = torch.tensor([0.5, -1.0, 2.0, 0.0, 1.0])
    out = torch.empty(())
    res = ce_fast.logsumexp(z, out=out)
    assert res is out
    assert float(out) == pytest.approx(float(torch.logsumexp(z.double(), 0)), rel=1e-6)
