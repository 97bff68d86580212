"""Differential fuzz test of the CPU engine against the float64 oracle (tests/oracle.py).

Hypothesis draws the structure of a case: the logits dtype (f32, f64, f16, bf16), the
row length (1 .. a few thousand, crossing the 8/32-lane tails and the 2048-element
chunks of rows.rs), a value class per row (normal, huge magnitudes up to the dtype's
maximum, tied huge maxima, rows spanning -max .. max, subnormals, constant rows), runs
of -inf (also longer than a chunk, anywhere in the row), NaN and +inf, and the options
(label_smoothing, class weights with zeros, soft targets, logit_scale, softcap, z_loss,
ignored rows); NumPy draws the values from a seed. Every case runs through every kernel
set (scalar and auto, i.e. AVX2 where the CPU has it) and checks, per row:

- ``logsumexp`` and ``cross_entropy(reduction="none")`` against the oracle,
- ``cross_entropy_and_grad(reduction="none")``: its loss equal to ``cross_entropy``'s,
  its gradient against the oracle's ``grad_ref``,
- the two kernel sets against each other (same NaN / inf, values within tolerance).

Tolerances are the suite's (conftest.row_tol, assert_rows_close, assert_grad_close),
widened only for what the API allows: the transform (logit_scale, softcap) runs in the
compute type (float32 for f32/f16/bf16), so a transformed logit z carries an error of
about eps * |z|, and the tolerance grows with the largest finite |z| of the case.

Short mode (the default, part of the suite): a fixed set of examples
(``derandomize=True``), a few seconds. Long mode, for a fuzzing session::

    CE_FAST_FUZZ_EXAMPLES=200000 PYTHONPATH=python python -m pytest -q -s tests/test_fuzz.py

(random examples, no deadline; ``CE_FAST_FUZZ_SEED=<int>`` makes a long run
repeatable). Every 1000 examples it prints how many ran. A failure prints the shrunk
case and the ``@reproduce_failure`` blob.
"""

from __future__ import annotations

import os
import sys

import numpy as np
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

import ce_fast

from conftest import (
    ALL_DTYPES,
    BF16,
    assert_grad_close,
    assert_rows_close,
    cast,
    to_f64,
    use_simd,
    with_layout,
)
from oracle import cross_entropy_ref, grad_ref, logsumexp_ref, transform_ref

F32, F64, F16 = np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16)

LONG = int(os.environ.get("CE_FAST_FUZZ_EXAMPLES", "0"))
SETTINGS = settings(
    max_examples=LONG or 150,
    derandomize=not LONG,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
SEED = os.environ.get("CE_FAST_FUZZ_SEED")

CHUNK = 2048
# Lengths at the lane tails (8 f32 lanes, 32 per unrolled step) and the chunk boundaries.
# 10245: the first chunk, one whole long chunk read in place (rows.rs LONG_CHUNK), a tail.
EDGE_C = [1, 2, 7, 8, 9, 31, 32, 33, 63, 65, 2047, 2048, 2049, 2055, 2080, 4095, 4096, 4097, 4103, 6150, 10245]
ROW_KINDS = ["normal", "normal", "huge", "huge_ties", "spanning", "subnormal", "constant", "peaked"]
COMPUTE_EPS = {F64: 2.0**-52, F32: 2.0**-23, F16: 2.0**-23, BF16: 2.0**-23}  # f16/bf16 compute in f32
RTOL = {F64: 1e-12, F32: 1e-5, F16: 1e-5, BF16: 1e-5}  # conftest.row_tol's factor


def _dmax(dtype) -> float:
    return float(np.finfo(np.float32).max) if dtype == BF16 else float(np.finfo(dtype).max)


def _dtiny(dtype) -> float:
    """The smallest normal number of the dtype (bf16: float32's)."""
    return float(np.finfo(np.float32).tiny) if dtype == BF16 else float(np.finfo(dtype).tiny)


@st.composite
def cases(draw):
    dtype = draw(st.sampled_from(ALL_DTYPES))
    C = draw(st.one_of(st.sampled_from(EDGE_C), st.integers(1, 300), st.integers(301, 6200)))
    rows = draw(st.integers(1, 4))
    row_specs = []
    for _ in range(rows):
        spec = dict(kind=draw(st.sampled_from(ROW_KINDS)))
        # -inf run: none, a prefix (also longer than a chunk), a suffix, a middle run, or sprinkled
        spec["minus_inf"] = draw(
            st.sampled_from([None, None, None, "prefix", "prefix", "suffix", "middle", "sprinkle", "all"])
        )
        if spec["minus_inf"] in ("prefix", "suffix", "middle"):
            spec["run"] = draw(
                st.one_of(st.integers(1, C), st.sampled_from([CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 3]))
            )
        spec["nan"] = draw(st.sampled_from([False] * 8 + [True]))
        spec["posinf"] = draw(st.sampled_from([False] * 8 + [True]))
        row_specs.append(spec)
    soft = draw(st.booleans())
    case = dict(
        dtype=dtype,
        C=C,
        rows=row_specs,
        seed=draw(st.integers(0, 2**32 - 1)),
        layout=draw(st.sampled_from(["contig", "contig", "classes_strided"])),
        soft=soft,
        label_smoothing=draw(st.sampled_from([0.0, 0.0, 0.1, 1.0]) | st.floats(0.0, 1.0)),
        weight=draw(st.sampled_from([None, None, "uniform", "zeros", "all_zero", "wide"])),
        logit_scale=draw(st.sampled_from([1.0, 1.0, 1.0, 0.5, -1.3, 1e-3, 2.0**20])),
        softcap=draw(st.sampled_from([None, None, None, 1.0, 30.0])),
        z_loss=draw(st.sampled_from([0.0, 0.0, 1e-4, 0.05])),
        grad_output=draw(st.sampled_from(["ones", "random"])),
    )
    if soft:
        case["soft_dtype"] = draw(st.sampled_from([F32, F64, BF16, dtype]))
        case["soft_kind"] = draw(st.sampled_from(["dirichlet", "onehot", "sparse", "uniform", "unnormalized"]))
    else:
        case["ignore"] = draw(st.sampled_from([None, "default", "inside"]))
    return case


def _row(rng, spec, C, dtype):
    """One row of float64 values, already representable in `dtype` after the cast."""
    dmax, tiny = _dmax(dtype), _dtiny(dtype)
    kind = spec["kind"]
    if kind == "normal":
        scale = rng.choice([0.01, 1.0, 3.0, 30.0])
        offset = rng.choice([0.0, 0.0, 20.0, -300.0, 1e4])
        x = rng.standard_normal(C) * scale + offset
    elif kind == "huge":
        # magnitudes spread over the whole range, up to the dtype's maximum
        x = rng.choice([-1.0, 1.0], C) * 10.0 ** rng.uniform(0, np.log10(dmax), C)
        x[rng.random(C) < 0.05] = dmax
    elif kind == "huge_ties":
        top = np.log10(dmax)
        v = rng.choice([-1.0, 1.0]) * 10.0 ** rng.uniform(min(6.0, top - 1.0), top)
        x = v - np.abs(v) * rng.choice([0.0, 1e-7, 1e-6, 1e-3, 1.0], C)
        x[rng.integers(0, C)] = v
    elif kind == "spanning":
        x = rng.standard_normal(C)
        r = rng.random(C)
        x[r < 0.3] = -dmax
        x[r > 0.9] = dmax
    elif kind == "subnormal":
        x = rng.standard_normal(C) * tiny * rng.choice([1.0, 1e-3, 1e-6])
    elif kind == "constant":
        x = np.full(C, rng.choice([0.0, -7.5, 1e4, dmax, -dmax, tiny * 1e-3]))
    else:  # peaked: one logit far above the rest
        x = rng.standard_normal(C)
        x[rng.integers(0, C)] = rng.choice([30.0, 90.0, 1e3])
    mi = spec["minus_inf"]
    if mi == "all":
        x[:] = -np.inf
    elif mi == "sprinkle":
        x[rng.random(C) < 0.3] = -np.inf
    elif mi is not None:
        n = min(spec["run"], C)
        if mi == "prefix":
            x[:n] = -np.inf
        elif mi == "suffix":
            x[C - n :] = -np.inf
        else:
            a = int(rng.integers(0, C - n + 1))
            x[a : a + n] = -np.inf
    if spec["nan"]:
        x[rng.integers(0, C)] = np.nan
    if spec["posinf"]:
        x[rng.integers(0, C)] = np.inf
    return x


def build(case):
    rng = np.random.default_rng(case["seed"])
    dtype, C = case["dtype"], case["C"]
    n = len(case["rows"])
    x = cast(np.stack([_row(rng, s, C, dtype) for s in case["rows"]]), dtype)
    kw = dict(
        label_smoothing=case["label_smoothing"],
        logit_scale=case["logit_scale"],
        softcap=case["softcap"],
        z_loss=case["z_loss"],
    )
    wk = case["weight"]
    if wk is not None:
        w = rng.uniform(0.0, 2.0, C)
        if wk == "zeros":
            w[rng.random(C) < 0.3] = 0.0
        elif wk == "all_zero":
            w[:] = 0.0
        elif wk == "wide":
            w = 10.0 ** rng.uniform(-20, 20, C)
        kw["weight"] = w.astype(rng.choice([np.float32, np.float64]))
    if case["soft"]:
        sk = case["soft_kind"]
        if sk == "dirichlet":
            t = rng.dirichlet(np.ones(C), n)
        elif sk == "onehot":
            t = np.zeros((n, C))
            t[np.arange(n), rng.integers(0, C, n)] = 1.0
        elif sk == "sparse":
            t = rng.random((n, C)) * (rng.random((n, C)) < 0.05)
            t /= np.maximum(t.sum(-1, keepdims=True), 1e-300)
        elif sk == "uniform":
            t = np.full((n, C), 1.0 / C)
        else:
            t = rng.random((n, C)) * 3.0
        target = cast(t, case["soft_dtype"])
    else:
        target = rng.integers(0, C, n)
        ig = case["ignore"]
        if ig is not None:
            ii = -100 if ig == "default" else int(rng.integers(0, C))
            kw["ignore_index"] = ii
            target = np.where(rng.random(n) < 0.3, ii, target)
    go = np.ones(n) if case["grad_output"] == "ones" else rng.uniform(-2.0, 2.0, n)
    return x, target, kw, go


def _zmax(x64, kw):
    """Largest finite |transformed logit| of the case (what the transform's rounding scales with)."""
    with np.errstate(all="ignore"):
        z = np.abs(x64 * kw["logit_scale"])
    z = z[np.isfinite(z)]
    m = float(z.max()) if z.size else 0.0
    if kw.get("softcap") is not None:
        m = min(m, float(kw["softcap"]))
    return m


def _transform_fits(dtype, x64, kw):
    """Rows whose scaled logits fit the compute type (float32 for f32/f16/bf16): beyond it
    the engine's float32 transform gives inf (as float32 torch would) where the float64
    oracle does not; those rows are not compared."""
    cmax = float(np.finfo(np.float64 if dtype == F64 else np.float32).max)
    with np.errstate(all="ignore"):
        z = np.abs(x64 * kw["logit_scale"])
    return ~((z > cmax) & np.isfinite(x64)).any(-1)


def _sums_fit(dtype, x64, target, kw, soft):
    """float64 logits only: rows whose statistics sum_c w_c (z_c - max) (and with t_c) fit in
    float64. The engine returns these sums and the loss rules scale them by eps / C after:
    near float64's maximum a sum can overflow where the loss itself does not (the loss
    of those rows is not compared)."""
    n = x64.shape[0]
    if dtype != F64 or not (soft or kw["label_smoothing"] > 0.0):
        return np.ones(n, dtype=bool)
    with np.errstate(all="ignore"):
        z = transform_ref(x64, kw["logit_scale"], kw["softcap"])
        zf = np.where(np.isfinite(z), z, np.nan)
        m = np.nanmax(np.where(np.isnan(zf), -np.inf, zf), axis=-1, keepdims=True)
        d = np.abs(z * 2.0**-64 - m * 2.0**-64)  # scaled: no overflow here
        d = np.where(np.isfinite(d), d, 0.0)
        w = np.ones(x64.shape[-1]) if kw.get("weight") is None else to_f64(kw["weight"])
        big = (w * d).sum(-1)
        if soft:
            big = np.maximum(big, (w * np.abs(to_f64(target)) * d).sum(-1))
    return ~(big > float(np.finfo(np.float64).max) * 2.0**-66)


def _tol_scale(dtype, x64, kw):
    """Factor on conftest.row_tol: 1, or the transform's eps * |z| over row_tol's factor."""
    if kw["logit_scale"] == 1.0 and kw.get("softcap") is None:
        return 1.0
    return 1.0 + 8.0 * COMPUTE_EPS[dtype] * _zmax(x64, kw) / RTOL[dtype]


def _weight_scale(target, kw, soft):
    """Per row: how much the class weights / target mass multiply the log-probabilities
    (and with them the float32 noise of log-sum-exp) in the loss, at least 1."""
    w = kw.get("weight")
    w = None if w is None else to_f64(w)
    t = np.asarray(target)
    if soft:
        with np.errstate(all="ignore"):
            tt = np.abs(to_f64(t))
            f = (tt if w is None else tt * w).sum(-1) + (0.0 if w is None else w.sum())
        return np.maximum(1.0, np.nan_to_num(f, nan=1.0, posinf=1.0))
    n = t.shape[0]
    if w is None:
        return np.ones(n)
    return np.full(n, max(1.0, float(w.max()), float(w.sum()) / w.size))


def _grad_floor(x64, target, kw, go, lse):
    """Per row: the size of the terms of the gradient (grad_output * chain * weights * targets
    * z-loss factor), the scale its float32 noise is relative to."""
    w = kw.get("weight")
    wmax = 1.0 if w is None else max(1.0, float(np.max(w)))
    f = np.abs(go) * max(1.0, abs(kw["logit_scale"])) * wmax
    t = np.asarray(target)
    if t.dtype.kind in "fV":
        with np.errstate(all="ignore"):
            f = f * np.maximum(1.0, np.abs(to_f64(t)).sum(-1))
    if kw["z_loss"]:
        with np.errstate(all="ignore"):
            f = f * (1.0 + 2.0 * kw["z_loss"] * np.where(np.isfinite(lse), np.abs(lse), 0.0))
    return f


COUNT = [0]


@seed(int(SEED) if SEED else 0)
@SETTINGS
@given(case=cases())
def test_fuzz_against_oracle(case):
    COUNT[0] += 1
    if LONG and COUNT[0] % 1000 == 0:
        print(f"[fuzz] {COUNT[0]} examples", file=sys.stderr, flush=True)
    x, target, kw, go = build(case)
    dtype = case["dtype"]
    x64 = to_f64(x)
    t_ref = to_f64(target) if case["soft"] else target
    xl = with_layout(x, case["layout"])
    kw_ref = dict(kw)
    if "weight" in kw:
        kw_ref["weight"] = to_f64(kw["weight"])
    scale = _tol_scale(dtype, x64, kw)

    lse_ref = logsumexp_ref(x64)
    loss_ref = cross_entropy_ref(x64, t_ref, reduction="none", **kw_ref)
    grad_want = grad_ref(x64, t_ref, reduction="none", grad_output=go, **kw_ref)
    zt_lse = logsumexp_ref(transform_ref(x64, kw["logit_scale"], kw["softcap"]))
    floor = _grad_floor(x64, target, kw, go, zt_lse)

    ok = _transform_fits(dtype, x64, kw)
    # The gradient's coefficient of p (2 z_loss lse, ...) is a number of the compute type:
    # past float32's range inf * p gives NaN where p = 0 (as float32 torch would).
    cmax = float(np.finfo(np.float64 if dtype == F64 else np.float32).max)
    with np.errstate(all="ignore"):
        gok = ok & ~(2.0 * kw["z_loss"] * np.abs(zt_lse) * _weight_scale(target, kw, case["soft"]) > cmax / 4)
    lscale = scale * _weight_scale(target, kw, case["soft"])
    lok = ok & _sums_fit(dtype, x64, target, kw, case["soft"])

    results = {}
    for path in ("scalar", "auto"):
        with use_simd(path) as level:
            what = f"[{level}] {case} "
            lse = ce_fast.logsumexp(xl)
            assert_rows_close(lse, lse_ref, dtype, what=what + "logsumexp: ")
            loss = ce_fast.cross_entropy(xl, target, reduction="none", **kw)
            assert_rows_close(to_f64(loss)[lok], loss_ref[lok], dtype, scale=lscale[lok], what=what + "loss: ")
            floss, grad = ce_fast.cross_entropy_and_grad(xl, target, reduction="none", grad_output=go, **kw)
            np.testing.assert_array_equal(floss, loss, err_msg=what + "fused loss != cross_entropy")
            assert grad.dtype == x.dtype and grad.shape == x.shape
            assert_grad_close(
                to_f64(grad)[gok], grad_want[gok], dtype, floor=floor[gok], scale=scale, what=what + "grad: "
            )
            results[level] = (to_f64(lse), to_f64(loss), to_f64(grad))
    if len(results) == 2:
        simd = next(k for k in results if k != "scalar")
        (s_lse, s_loss, s_grad), (a_lse, a_loss, a_grad) = results["scalar"], results[simd]
        what = f"scalar vs {simd} {case} "
        assert_rows_close(a_lse, s_lse, dtype, scale=2.0, what=what + "logsumexp: ")
        assert_rows_close(a_loss[lok], s_loss[lok], dtype, scale=2.0 * lscale[lok], what=what + "loss: ")
        assert_grad_close(a_grad[gok], s_grad[gok], dtype, floor=floor[gok], scale=2.0 * scale, what=what + "grad: ")
