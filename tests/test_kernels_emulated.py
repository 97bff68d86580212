"""The GPU engine without a GPU: the kernel source it loads (kernels/ce.cu as embedded
in _core) compiled for the CPU (tests/kernel_emulator.py: one thread per CUDA thread,
real barriers and warp shuffles) and driven by ce_fast._engines.cuda itself, with NumPy
standing in for CuPy.

Every public call below runs the GPU engine's launch configuration, row layouts,
argument marshalling, target check (the kernel's error flag) and fused gradient
kernel, and is compared with the Rust CPU engine on the same input. What this cannot
show (timing, real memory ordering, the PTX conversions, CuPy and torch interop) is
covered by tests/test_gpu.py on a machine with a GPU.
"""

from __future__ import annotations

import contextlib
import types
from fractions import Fraction

import ml_dtypes
import numpy as np
import pytest

import ce_fast
from ce_fast import _batch, _rules
from ce_fast._engines import cuda as _cuda
from ce_fast._spec import LossSpec

import kernel_emulator
import oracle
from conftest import assert_rows_close

pytestmark = pytest.mark.skipif(kernel_emulator.compiler() is None, reason="no C++ compiler for the kernel emulator")

BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = [np.dtype(np.float32), np.dtype(np.float16), BF16]
IDS = {np.dtype(np.float32): "f32", np.dtype(np.float16): "f16", BF16: "bf16"}


@pytest.fixture(scope="module")
def emu():
    return kernel_emulator.Emulator()


# Launch shapes to cover: (knobs of the engine, pretend device). VECTORS_PER_THREAD=1
# widens the row groups (a block per row already at a few hundred classes); a tiny
# device makes blocks loop over row tiles.
SHAPES = {
    "default": dict(),
    "wide": dict(VECTORS_PER_THREAD=1),
    "narrow": dict(VECTORS_PER_THREAD=64),
}


def _f64(a) -> np.ndarray:
    return np.asarray(a).astype(np.float64)


def _tol(dtype):
    return {np.dtype(np.float32): 2e-6, np.dtype(np.float16): 2e-6, BF16: 2e-6}[np.dtype(dtype)]


def _close(got, ref, rtol, atol, what=""):
    got, ref = _f64(got), _f64(ref)
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=atol, equal_nan=True, err_msg=what)


def _grad_close(got, ref, dtype, what=""):
    """Gradients of the stored dtype: within a couple of ulps of that dtype."""
    got64, ref64 = _f64(got), _f64(ref)
    eps = {np.dtype(np.float32): 2.0**-23, np.dtype(np.float16): 2.0**-10, BF16: 2.0**-7}[np.dtype(dtype)]
    scale = np.nanmax(np.abs(ref64)) if np.isfinite(ref64).any() else 1.0
    np.testing.assert_allclose(got64, ref64, rtol=4 * eps, atol=16 * eps * scale + 1e-30, equal_nan=True, err_msg=what)


def _logits(rng, shape, dtype, scale=3.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


def _both(emu, fn, shape="default", **device):
    """fn() on the Rust CPU engine, then through the emulated GPU engine."""
    ref = fn()
    with kernel_emulator.emulated_engine(emu, **device, **SHAPES[shape]):
        got = fn()
    return got, ref


# ---------------------------------------------------------------- losses


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: IDS[d])
@pytest.mark.parametrize("C", [1, 2, 7, 37, 300, 3000])
@pytest.mark.parametrize("shape", ["default", "wide", "narrow"])
def test_logsumexp_and_loss(emu, dtype, C, shape):
    rng = np.random.default_rng(C)
    x = _logits(rng, (9, C), dtype)
    y = rng.integers(0, C, 9)
    got, ref = _both(emu, lambda: (ce_fast.logsumexp(x), ce_fast.cross_entropy(x, y, reduction="none")), shape)
    _close(got[0], ref[0], 1e-6, 1e-6, "lse")
    _close(got[1], ref[1], 1e-5, 1e-5, "loss")


OPTIONS = [
    dict(),
    dict(reduction="sum"),
    dict(reduction="mean", ignore_index=3),
    dict(label_smoothing=0.1),
    dict(label_smoothing=0.2, weight="w"),
    dict(weight="w", reduction="mean"),
    dict(z_loss=1e-3),
    dict(softcap=5.0),
    dict(softcap=2.0, logit_scale=0.7, label_smoothing=0.05, z_loss=1e-4),
    dict(logit_scale=-1.5),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: IDS[d])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(f"{k}" for k in o) or "plain")
@pytest.mark.parametrize("C", [5, 130, 2500])
def test_options_loss_and_grad(emu, dtype, opts, C):
    rng = np.random.default_rng(7)
    x = _logits(rng, (11, C), dtype)
    y = rng.integers(0, C, 11)
    y[[1, 6]] = 3 if C > 3 else 0
    kw = dict(opts)
    if kw.get("weight") == "w":
        kw["weight"] = rng.uniform(0.1, 2.0, C)
    got, ref = _both(emu, lambda: ce_fast.cross_entropy_and_grad(x, y, **kw), "wide" if C == 130 else "default")
    _close(got[0], ref[0], 1e-5, 1e-6, "loss")
    assert got[1].dtype == x.dtype and got[1].shape == x.shape
    _grad_close(got[1], ref[1], dtype, "grad")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: IDS[d])
@pytest.mark.parametrize("tdtype", [np.float32, np.float64, np.float16, BF16], ids=["t32", "t64", "t16", "tbf"])
@pytest.mark.parametrize("C", [3, 64, 1000])
def test_soft_targets(emu, dtype, tdtype, C):
    rng = np.random.default_rng(C)
    x = _logits(rng, (6, C), dtype)
    t = rng.dirichlet(np.ones(C), 6).astype(tdtype)
    w = rng.uniform(0.5, 1.5, C)
    for kw in (dict(), dict(label_smoothing=0.1, weight=w, z_loss=1e-3, reduction="sum")):
        got, ref = _both(emu, lambda: ce_fast.cross_entropy_and_grad(x, t, **kw), "wide")
        _close(got[0], ref[0], 1e-5, 1e-6, "loss")
        _grad_close(got[1], ref[1], dtype, "grad")


# ---------------------------------------------------------------- layouts


def _layouts(rng, dtype):
    """(name, logits, target) with the batch and class strides the engine must handle."""
    base = _logits(rng, (4, 5, 203), dtype)
    y = rng.integers(0, 200, (4, 5))
    yield "contiguous-3d", base[..., :200].copy(), y
    yield "row-misaligned", base[..., 1:201], y  # each row starts at a different 16-byte phase
    yield "class-strided", base[..., ::2][..., :100], y % 100
    yield "batch-transposed", base.transpose(1, 0, 2)[..., :200], y.T.copy()
    yield "negative-strides", base[::-1, ::-1, :200], y
    yield "negative-class-stride", base[..., ::-1][..., :200], y
    yield "broadcast-rows", np.broadcast_to(base[:1, :1, :200], (4, 5, 200)), y
    yield "strided-target", base[..., :200], np.repeat(y, 2, axis=1)[:, ::2]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: IDS[d])
def test_layouts(emu, dtype):
    rng = np.random.default_rng(3)
    for name, x, y in _layouts(rng, dtype):
        for shape in ("default", "wide"):
            got, ref = _both(
                emu, lambda: ce_fast.cross_entropy_and_grad(x, y, reduction="none", label_smoothing=0.1), shape
            )
            _close(got[0], ref[0], 1e-5, 1e-6, f"{name} loss")
            _grad_close(got[1], ref[1], dtype, f"{name} grad")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: IDS[d])
def test_soft_target_layouts(emu, dtype):
    """Soft targets whose rows have another 16-byte phase than the logits take the scalar path."""
    rng = np.random.default_rng(5)
    x = _logits(rng, (5, 301), dtype)[:, 1:]
    t = rng.dirichlet(np.ones(300), 5)
    for tt in (t.astype(np.float32), np.pad(t, ((0, 0), (3, 0))).astype(dtype)[:, 3:], t[:, ::-1].astype(dtype)):
        got, ref = _both(emu, lambda: ce_fast.cross_entropy_and_grad(x, tt, reduction="none"), "wide")
        _close(got[0], ref[0], 1e-5, 1e-6, "loss")
        _grad_close(got[1], ref[1], dtype, "grad")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: IDS[d])
@pytest.mark.parametrize("view", ["contiguous", "row-misaligned", "class-strided"])
def test_in_place_gradient(emu, dtype, view):
    rng = np.random.default_rng(11)
    big = _logits(rng, (13, 402), dtype)
    sl = {"contiguous": np.s_[:, :400], "row-misaligned": np.s_[:, 1:401], "class-strided": np.s_[:, ::2]}[view]
    y = rng.integers(0, 200, 13)
    y[4] = -100
    opts = dict(label_smoothing=0.1, z_loss=1e-3, softcap=8.0)
    ref_in = big[sl].copy()
    ref = ce_fast.cross_entropy_and_grad(ref_in, y, **opts)
    for shape in ("default", "wide"):
        work = big.copy()
        x = work[sl]
        with kernel_emulator.emulated_engine(emu, **SHAPES[shape]):
            loss, g = ce_fast.cross_entropy_and_grad(x, y, out=x, **opts)
        assert g is x
        _close(loss, ref[0], 1e-5, 1e-6, "loss")
        _grad_close(x, ref[1], dtype, "in-place grad")
        untouched = np.ones(big.shape, bool)
        untouched[sl] = False
        assert np.array_equal(work[untouched].view(np.uint8), big[untouched].view(np.uint8)), "wrote outside the view"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: IDS[d])
def test_out_with_other_layout(emu, dtype):
    """out with another alignment phase than the logits: pass 2 takes the scalar path."""
    rng = np.random.default_rng(12)
    x = _logits(rng, (6, 300), dtype)
    y = rng.integers(0, 300, 6)
    ref = ce_fast.cross_entropy_and_grad(x, y)
    buf = np.zeros((6, 301), dtype)
    with kernel_emulator.emulated_engine(emu):
        loss, g = ce_fast.cross_entropy_and_grad(x, y, out=buf[:, 1:])
    _grad_close(buf[:, 1:], ref[1], dtype, "grad")
    assert np.all(_f64(buf[:, 0]) == 0)


def _bf16_bits_exact(v: float) -> int:
    """Bits of the bfloat16 nearest to the float64 `v` (ties to even), by exact arithmetic."""
    if np.isnan(v):
        return 0x7FC0
    guess = int(np.array([v], np.float32).astype(BF16).view(np.uint16)[0])
    best = None
    for bits in (guess - 1, guess, guess + 1):
        b = np.array([bits & 0xFFFF], np.uint16).view(BF16)[0]
        if not np.isfinite(float(b)):
            continue
        d = abs(Fraction(float(b)) - Fraction(v))
        key = (d, bits & 1)  # nearest, then even
        if best is None or key < best[0]:
            best = (key, bits & 0xFFFF)
    return best[1]


def test_bf16_conversions_round_once(emu):
    """ce.cu's f64 -> bf16 store of the true-class term rounds once (no double rounding
    through f32); f32 -> bf16 is round-to-nearest-even with quiet NaN."""
    one = 1.0
    tie_up = one + 2.0**-8 + 2.0**-30  # f32 rounds it onto the bf16 tie; exact rounding goes up
    tie_down = -(one + 3 * 2.0**-8 - 2.0**-31)
    for v in (tie_up, tie_down, 1.0, -2.5, 3.0e38, -1e-30, 0.0, -0.0):
        assert emu.convert("f64->bf16", v) == _bf16_bits_exact(v), v
    assert emu.convert("f64->bf16", tie_up) != emu.convert("f32->bf16", tie_up)
    rng = np.random.default_rng(37)
    vals = rng.standard_normal(3000) * np.exp2(rng.integers(-60, 60, 3000))
    for v in vals:
        assert emu.convert("f64->bf16", v) == _bf16_bits_exact(float(v)), v
        f = float(np.float32(v))
        assert emu.convert("f32->bf16", f) == int(np.array([f], np.float32).astype(BF16).view(np.uint16)[0]), v
    assert emu.convert("f64->bf16", float("nan")) == 0x7FC0
    assert emu.convert("f32->bf16", float("inf")) == 0x7F80


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_true_class_term_in_f64_rounded_once(emu, reduction):
    """bf16 in place: the true-class element is g * (exp(z_y - lse) - 1) evaluated in f64
    from the row's lse and rounded once; the other elements are f32 maths."""
    rng = np.random.default_rng(41)
    C, N = 3000, 6
    x = (rng.standard_normal((N, C)) * 2).astype(BF16)
    y = rng.integers(0, C, N)
    x[np.arange(N), y] = np.array([4.0, 8.0, 12.0, 2.0, 16.0, 0.5], dtype=BF16)
    inp = x.copy()
    with kernel_emulator.emulated_engine(emu):
        lse = _f64(ce_fast.logsumexp(inp).astype(np.float64))
        # the engine's f64 lse, not the f32 result: take it from the statistics directly
        b = _batch_of(inp, y, LossSpec.make())
        st = _cuda.run(b, scale=1.0, softcap=0.0, want_wz=False)
        loss, g = ce_fast.cross_entropy_and_grad(x, y, reduction=reduction, out=x)
    g_row = 1.0 / N if reduction == "mean" else 1.0
    zy = _f64(inp)[np.arange(N), y]
    for i in range(N):
        want = g_row * (np.exp((zy[i] - st.mx[i]) - st.ls[i]) - 1.0)
        assert int(np.asarray(x).view(np.uint16)[i, y[i]]) == _bf16_bits_exact(want), (i, want)
    np.testing.assert_allclose(lse, st.lse, rtol=1e-7)


# ---------------------------------------------------------------- non-finite rows


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: IDS[d])
@pytest.mark.parametrize("C", [700, 3000])
def test_plain_loops_give_the_general_loops_bits(emu, dtype, C):
    """The plain call (no weight, scale, softcap, smoothing) runs vector loops compiled apart,
    whose NaN test rides on the sum: the same bits as the general loops (all-ones weights
    take those), NaN rows included wherever the NaN sits (inside a -inf prefix, after the
    max, beside +inf)."""
    rng = np.random.default_rng(17)
    x = _logits(rng, (10, C), np.float32)
    x[0, C // 2] = np.nan
    x[1, : C // 2] = -np.inf
    x[1, C // 3] = np.nan  # while the running max is still -inf
    x[2, : C - 1] = -np.inf
    x[3, 5] = np.nan
    x[3, C - 3] = np.inf
    x[4, C - 1] = np.inf
    x[5, :] = -np.inf
    x[6, 3 : C - 3] = -np.inf
    x[7, 1] = np.nan
    x[7, 2:] = -np.inf
    x = x.astype(dtype)
    y = rng.integers(0, C, 10)
    y[6] = 1  # a finite logit of the row that is mostly -inf
    ones = np.ones(C, np.float32)
    for shape in ("default", "wide", "narrow"):
        with kernel_emulator.emulated_engine(emu, **SHAPES[shape]):
            plain = ce_fast.cross_entropy_and_grad(x, y, reduction="none")
            general = ce_fast.cross_entropy_and_grad(x, y, weight=ones, reduction="none")
            fwd = ce_fast.cross_entropy(x, y, reduction="none")
        np.testing.assert_array_equal(_f64(plain[0]).view(np.int64), _f64(general[0]).view(np.int64))
        np.testing.assert_array_equal(_f64(plain[1]), _f64(general[1]))
        np.testing.assert_array_equal(_f64(fwd).view(np.int64), _f64(plain[0]).view(np.int64))
        assert np.isnan(_f64(fwd)[[0, 1, 3, 7]]).all() and np.isfinite(_f64(fwd)[[6, 8, 9]]).all()
        assert np.isnan(_f64(plain[1])[[0, 1, 3, 7]]).all(axis=1).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: IDS[d])
@pytest.mark.parametrize("C", [6, 700])
def test_non_finite_rows(emu, dtype, C):
    rng = np.random.default_rng(13)
    x = _logits(rng, (6, C), np.float32)
    x[0, 2] = np.nan
    x[1, 3] = np.inf
    x[2, :] = -np.inf
    x[3, 1] = -np.inf
    x[4, [0, C - 1]] = np.inf
    x = x.astype(dtype)
    y = np.array([0, 1, 2, 3, 4, 5])
    for shape in ("default", "wide"):
        got, ref = _both(emu, lambda: (ce_fast.logsumexp(x), ce_fast.cross_entropy(x, y, reduction="none")), shape)
        _close(got[0], ref[0], 1e-6, 1e-6, "lse")
        _close(got[1], ref[1], 1e-5, 1e-6, "loss")
        got, ref = _both(emu, lambda: ce_fast.cross_entropy_and_grad(x, y, reduction="none", ignore_index=5), shape)
        _close(got[0], ref[0], 1e-5, 1e-6, "loss")
        _grad_close(got[1], ref[1], dtype, "grad")
        assert np.all(_f64(got[1])[5] == 0)  # ignored row: exact zeros


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: IDS[d])
@pytest.mark.parametrize("offset", [1e4, -3e4])
def test_large_common_offset_with_smoothing_and_soft_targets(emu, dtype, offset):
    """Sums relative to the row max (swz, swtz) keep label smoothing and soft targets
    exact under a large common offset; compared with a float64 reference on the
    rounded inputs (the offset cancels in every loss)."""
    rng = np.random.default_rng(43)
    C = 2000
    if np.dtype(dtype) == np.float16:
        offset = offset / 10  # within float16's range
    x = (offset + rng.standard_normal((5, C))).astype(dtype)
    y = rng.integers(0, C, 5)
    t = rng.dirichlet(np.ones(C), 5)
    x64 = x.astype(np.float64)
    z = x64 - x64.max(-1, keepdims=True)  # the same row, offset removed
    with kernel_emulator.emulated_engine(emu, VECTORS_PER_THREAD=1):
        got_s = ce_fast.cross_entropy(x, y, label_smoothing=0.1, reduction="none")
        got_t = ce_fast.cross_entropy(x, t, label_smoothing=0.1, reduction="none")
    want_s = ce_fast.cross_entropy(z, y, label_smoothing=0.1, reduction="none")
    want_t = ce_fast.cross_entropy(z, t, label_smoothing=0.1, reduction="none")
    _close(got_s, want_s, 1e-5, 1e-5, "smoothing")
    _close(got_t, want_t, 1e-5, 1e-5, "soft")


def _ref_rows(x, target, weight=None, label_smoothing=0.0):
    """Per-row float64 loss with IEEE semantics (0 * -inf = NaN, as torch), reduction none."""
    x = np.asarray(x).astype(np.float64)
    C = x.shape[-1]
    w = np.ones(C) if weight is None else np.asarray(weight, np.float64)
    eps = label_smoothing
    with np.errstate(all="ignore"):
        m = x.max(-1, keepdims=True)
        m0 = np.where(np.isfinite(m), m, 0.0)
        lse = np.log(np.exp(x - m0).sum(-1, keepdims=True)) + m0
        logp = x - lse
        if np.asarray(target).dtype.kind == "f":
            # torch smooths the target first: t' = (1-eps) t + eps/C > 0, so zero mass on a
            # -inf logit is +inf with smoothing (NaN without, or under a zero weight).
            t = (1 - eps) * np.asarray(target, np.float64) + eps / C
            return -(w * t * logp).sum(-1)
        y = np.asarray(target)
        ly = np.take_along_axis(logp, y[:, None], -1)[:, 0]
        out = -(1 - eps) * w[y] * ly
        if eps > 0:
            out = out - eps / C * (w * logp).sum(-1)
        return out


@pytest.mark.parametrize("C", [50, 3000])
def test_minus_inf_runs_with_smoothing_and_soft_targets(emu, C):
    """-inf logits before, after and between the finite ones, with zero and non-zero
    weights / target mass on them: the max-relative sums give float64's answer (inf, or
    NaN for 0 * -inf as torch), whatever the position of the -inf run in the row, and
    agree with the Rust engine (runs longer than its 2048-element chunk:
    test_minus_inf_runs_longer_than_a_cpu_chunk)."""
    rng = np.random.default_rng(47)
    x = rng.standard_normal((6, C)).astype(np.float32)
    x[0, : C // 2] = -np.inf
    x[1, C // 2 :] = -np.inf
    x[2, ::3] = -np.inf
    x[3, :] = -np.inf
    x[4, : C // 2] = -np.inf
    y = np.array([C - 1, 0, 1, 0, C - 2, 3])
    t = rng.dirichlet(np.ones(C), 6).astype(np.float32)
    t[[0, 4], : C // 2] = 0.0  # zero target mass where the logits are -inf
    w = rng.uniform(0.5, 1.5, C)
    w0 = w.copy()
    w0[: C // 2] = 0.0  # zero weight where rows 0 and 4 are -inf
    for shape in ("default", "wide", "narrow"):
        with kernel_emulator.emulated_engine(emu, **SHAPES[shape]):
            for kw in (
                dict(label_smoothing=0.1),
                dict(label_smoothing=0.1, weight=w0),
                dict(weight=w),
                dict(weight=w0),
                dict(),
            ):
                got = ce_fast.cross_entropy(x, y, reduction="none", **kw)
                _close(got, _ref_rows(x, y, **kw), 1e-5, 1e-6, f"int {shape} {list(kw)}")
                got = ce_fast.cross_entropy(x, t, reduction="none", **kw)
                _close(got, _ref_rows(x, t, **kw), 1e-5, 1e-6, f"soft {shape} {list(kw)}")
    for kw in (dict(label_smoothing=0.1), dict(label_smoothing=0.1, weight=w0), dict(weight=w0)):
        for tgt in (y, t):
            got, ref = _both(emu, lambda: ce_fast.cross_entropy(x, tgt, reduction="none", **kw))
            _close(got, ref, 1e-5, 1e-6, f"vs CPU {list(kw)}")


def _oracle_rows(x, target, **kw):
    t = np.asarray(target)
    return oracle.cross_entropy_ref(_f64(x), _f64(t) if t.dtype.kind in "fV" else t, reduction="none", **kw)


@pytest.mark.parametrize("dtype", [np.dtype(np.float32), BF16], ids=lambda d: IDS[d])
@pytest.mark.parametrize("C", [4, 700, 3000])
def test_rows_spanning_float32_range(emu, dtype, C):
    """3e38 and -3e38 in one row: z - max = -6e38 does not fit in float32, the smoothing and
    soft-target sums take it in float64 (3e37 for label smoothing 0.1 on [3e38, -3e38, 0, 1]),
    also where a thread's own max grows from -3e38 to 3e38, as the oracle and the Rust engine."""
    rng = np.random.default_rng(C)
    x = rng.standard_normal((5, C))
    x[0, :4] = [3e38, -3e38, 0.0, 1.0]
    x[1, :] = -3e38
    x[1, C - 1] = 3e38  # the max comes last
    x[2, rng.random(C) < 0.5] = -3e38
    x[2, C // 2] = 3e38
    x[3, ::2] = 3e38
    x[3, 1::2] = -3e38
    x = x.astype(dtype)
    y = np.array([0, C - 1, C // 2, 1, 2])
    w = rng.uniform(0.5, 1.5, C)
    w[1] = 0.0
    t = np.zeros((5, C), np.float32)
    t[np.arange(5), y] = 1.0
    t_full = rng.dirichlet(np.ones(C), 5).astype(np.float32)
    cases = [
        (y, dict(label_smoothing=0.1)),
        (y, dict(label_smoothing=0.1, weight=w)),
        (t, dict()),
        (t, dict(weight=w)),
        (t_full, dict()),
        (t, dict(label_smoothing=0.2)),
    ]
    for shape in ("default", "wide", "narrow"):
        with kernel_emulator.emulated_engine(emu, **SHAPES[shape]):
            for tgt, kw in cases:
                got = ce_fast.cross_entropy(x, tgt, reduction="none", **kw)
                assert_rows_close(got, _oracle_rows(x, tgt, **kw), dtype, what=f"{shape} {list(kw)} ")
    if C == 4:
        got = ce_fast.cross_entropy(x[:1], y[:1], reduction="none", label_smoothing=0.1)
        assert float(got[0]) == pytest.approx(0.1 * float(x[0, 0]), rel=1e-6)
    for tgt, kw in cases:
        got, ref = _both(emu, lambda: ce_fast.cross_entropy_and_grad(x, tgt, reduction="none", **kw))
        _close(got[0], ref[0], 1e-5, 1e-6, f"vs CPU {list(kw)}")
        _grad_close(got[1], ref[1], dtype, f"grad vs CPU {list(kw)}")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: IDS[d])
def test_minus_inf_runs_longer_than_a_cpu_chunk(emu, dtype):
    """-inf runs of 2048 (the CPU engine's chunk) and more before the first finite logit,
    with zero weight / zero target mass inside the run: NaN (0 * -inf), +inf with positive
    weights, as the oracle, the CPU engine and the GPU engine all say."""
    C = 5000
    rng = np.random.default_rng(53)
    x = rng.standard_normal((4, C))
    for i, n in enumerate([2047, 2048, 3000, 4200]):
        x[i, :n] = -np.inf
    x = x.astype(dtype)
    y = np.full(4, C - 1)
    w = np.ones(C)
    w[5] = 0.0
    onehot = np.zeros((4, C), np.float32)
    onehot[:, C - 1] = 1.0
    full = np.full((4, C), 1.0 / C, np.float32)
    cases = [
        (y, dict(label_smoothing=0.1)),
        (y, dict(label_smoothing=0.1, weight=w)),
        (y, dict(weight=w)),
        (onehot, dict()),
        (full, dict()),
        (full, dict(weight=w)),
    ]
    for tgt, kw in cases:
        want = _oracle_rows(x, tgt, **kw)
        for shape in ("default", "wide"):
            with kernel_emulator.emulated_engine(emu, **SHAPES[shape]):
                got = ce_fast.cross_entropy(x, tgt, reduction="none", **kw)
            assert_rows_close(got, want, dtype, what=f"{shape} {list(kw)} ")
        assert_rows_close(ce_fast.cross_entropy(x, tgt, reduction="none", **kw), want, dtype, what=f"CPU {list(kw)} ")


@pytest.mark.parametrize("dtype", [np.dtype(np.float32), BF16], ids=lambda d: IDS[d])
def test_huge_row_maximum(emu, dtype):
    """Maxima from 1e8 to 3e38, tied: the loss at a tie is log(#ties) (the kernels subtract
    the max before the exponential, no rounding of max * log2(e))."""
    C = 300
    rng = np.random.default_rng(59)
    mags = [1e8, 2e9, 1e12, 1e20, 1e30, -1e12, 3e38]
    x = np.asarray(np.stack([np.full(C, m) for m in mags]).astype(dtype))
    x[:, rng.random(C) < 0.7] = 0.0
    x[:, 0] = np.array(mags).astype(dtype)
    y = np.zeros(len(mags), dtype=np.int64)
    for shape in ("default", "wide"):
        with kernel_emulator.emulated_engine(emu, **SHAPES[shape]):
            got = ce_fast.cross_entropy(x, y, reduction="none")
            lse = ce_fast.logsumexp(x)
        assert_rows_close(got, _oracle_rows(x, y), dtype, what=shape)
        assert_rows_close(lse, oracle.logsumexp_ref(_f64(x)), dtype, what=shape)


@pytest.mark.parametrize("opts", [dict(logit_scale=1.7), dict(softcap=1e20)], ids=["scale", "softcap"])
def test_target_logit_transformed_like_its_row(emu, opts):
    """The target logit goes through the same f32 transform as its row: at a tie with the
    max the loss is log(#ties) and the gradient finite, however large |z| (a float64 z_y
    differs from the f32 max by eps * |z|, beyond exp's range from |z| ~ 1e9 on)."""
    mags = np.array([1e9, 3e12, 1e15, 7e20, 1e30, 1e37])
    x = np.zeros((len(mags), 40), np.float32)
    x[:, 3] = x[:, 17] = mags
    x[:, 20:] = -mags[:, None]
    y = np.full(len(mags), 17)
    for shape in ("default", "wide"):
        with kernel_emulator.emulated_engine(emu, **SHAPES[shape]):
            loss, g = ce_fast.cross_entropy_and_grad(x, y, reduction="none", **opts)
        assert_rows_close(loss, np.full(len(mags), np.log(2.0)), x.dtype, what=shape)
        ref = oracle.grad_ref(_f64(x), y, reduction="none", **opts)
        _grad_close(g, ref, x.dtype, shape)


# ---------------------------------------------------------------- targets


@pytest.mark.parametrize("tdtype", ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"])
def test_target_dtypes_and_ignore(emu, tdtype):
    rng = np.random.default_rng(17)
    x = _logits(rng, (8, 100), np.float32)
    y = rng.integers(0, 100, 8).astype(tdtype)
    y[[2, 5]] = 7
    # The reference runs on int64 targets: the CPU engine's own unsigned handling is not under test.
    ref = ce_fast.cross_entropy(x, y.astype(np.int64), ignore_index=7, reduction="none")
    with kernel_emulator.emulated_engine(emu):
        got = ce_fast.cross_entropy(x, y, ignore_index=7, reduction="none")
    _close(got, ref, 1e-6, 1e-6)
    with kernel_emulator.emulated_engine(emu):
        idx, valid = _cuda.index_targets(_batch._arrays.operand(y, "target"), 100, 7)
    assert list(valid) == [v != 7 for v in y.tolist()]
    assert list(idx) == [v if v != 7 else -1 for v in y.tolist()]


@pytest.mark.parametrize(
    "tdtype, values, bad_pos, bad_value",
    [
        ("int64", [1, 2, 100, 3, 200], (2,), 100),
        ("int32", [1, -1, 2, -100, 5], (1,), -1),
        ("uint8", [1, 2, 3, 255, 4], (3,), 255),
        ("uint64", [1, 2, 2**64 - 1, 0, 0], (2,), 2**64 - 1),
        ("int8", [-100, -100, -100, -100, 127], (4,), 127),
    ],
)
def test_index_error_from_kernel_flag(emu, tdtype, values, bad_pos, bad_value):
    x = np.zeros((5, 100), np.float32)
    y = np.array(values, dtype=tdtype)
    with pytest.raises(IndexError) as cpu:
        ce_fast.cross_entropy(x, y)
    with kernel_emulator.emulated_engine(emu):
        with pytest.raises(IndexError) as gpu:
            ce_fast.cross_entropy(x, y)
    assert str(gpu.value) == str(cpu.value)
    assert f"target value {bad_value} at position {bad_pos}" in str(gpu.value)


@pytest.mark.parametrize(
    "tdtype, values", [("int64", [1, 2, 100, 3, 200]), ("int32", [1, -1, 2, -100, 5]), ("uint8", [1, 2, 3, 255, 4])]
)
def test_out_of_range_targets_under_graph_capture_give_nan_rows(emu, monkeypatch, tdtype, values):
    """While a CUDA graph is captured the range check cannot be read back: no IndexError,
    the offending rows' losses and gradients are NaN, the other rows are exact."""
    rng = np.random.default_rng(3)
    x = _logits(rng, (5, 100), np.float32)
    y = np.array(values, dtype=tdtype)
    bad = np.array([(v < 0 and v != -100) or v >= 100 for v in values])
    ok_y = np.where(bad, 0, y).astype(np.int64)
    ref_rows = ce_fast.cross_entropy(x, ok_y, reduction="none")
    _, ref_grad = ce_fast.cross_entropy_and_grad(x, ok_y, reduction="none")
    monkeypatch.setattr(_cuda, "capturing", lambda: True)
    with kernel_emulator.emulated_engine(emu):
        rows = ce_fast.cross_entropy(x, y, reduction="none")
        mean = ce_fast.cross_entropy(x, y)
        loss, grad = ce_fast.cross_entropy_and_grad(x, y, reduction="sum")
    assert np.all(np.isnan(rows[bad])) and np.isnan(mean) and np.isnan(loss)
    keep = ~bad & (y.astype(np.int64) != -100)
    _close(rows[keep], ref_rows[keep], 1e-6, 1e-6, "rows")
    assert np.all(np.isnan(grad[bad]))
    _grad_close(grad[keep], ref_grad[keep], np.float32, "grad")


def test_index_error_position_in_nd_target(emu):
    x = np.zeros((3, 4, 10), np.float32)
    y = np.zeros((3, 4), np.int64)
    y[2, 1] = 10
    y[1, 3] = 11  # the first offending position in C order wins
    with kernel_emulator.emulated_engine(emu, sms=1):
        with pytest.raises(IndexError, match=r"target value 11 at position \(1, 3\)"):
            ce_fast.cross_entropy(x, y)
        with pytest.raises(IndexError, match=r"target value 10 at position \(1, 2\)"):
            ce_fast.cross_entropy(x.transpose(1, 0, 2), y.T)


def test_zero_rows_launch_nothing(emu):
    x = np.zeros((0, 10), np.float32)
    y = np.zeros((0,), np.int64)
    n = len(emu.launches)
    with kernel_emulator.emulated_engine(emu):
        assert float(ce_fast.cross_entropy(x, y, reduction="sum")) == 0.0
        assert np.isnan(float(ce_fast.cross_entropy(x, y)))
        loss, g = ce_fast.cross_entropy_and_grad(x, y, reduction="none")
        assert loss.shape == (0,) and g.shape == (0, 10)
    assert len(emu.launches) == n


# ---------------------------------------------------------------- engine extras


def _batch_of(x, y, spec):
    return _batch.make_batch(x, y, spec)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: IDS[d])
@pytest.mark.parametrize("C", [9, 1500])
def test_argmax(emu, dtype, C):
    rng = np.random.default_rng(19)
    x = np.round(_logits(rng, (7, C), np.float32))  # many ties
    x[3, [4, 8]] = np.nan
    x[4, :] = -np.inf
    x[5, C // 2] = np.inf
    x = x.astype(dtype)
    y = np.zeros(7, np.int64)
    spec = LossSpec.make()
    with kernel_emulator.emulated_engine(emu, VECTORS_PER_THREAD=1):
        b = _batch_of(x, y, spec)
        am = np.full(7, -7, np.int64)
        _cuda.run(b, scale=-1.0, softcap=0.0, want_wz=False, argmax=am)
    assert am.tolist() == np.argmax(-x.astype(np.float32), axis=-1).tolist()


@pytest.mark.parametrize("soft", [False, True])
def test_gradient_from_given_statistics(emu, soft):
    """run(given=...) skips pass 1 and gives the fused kernel's gradient."""
    rng = np.random.default_rng(23)
    x = _logits(rng, (5, 700), BF16)
    y = rng.dirichlet(np.ones(700), 5).astype(np.float32) if soft else rng.integers(0, 700, 5)
    spec = LossSpec.make(label_smoothing=0.1, z_loss=1e-3)
    with kernel_emulator.emulated_engine(emu):
        b = _batch.make_batch(x, y, spec, grad_output=1.0)
        coef = _rules.grad_coef(b, spec)
        out1 = np.empty_like(x)
        s = _cuda.run(b, scale=1.0, softcap=0.0, want_wz=True, grad=coef, out=_batch._arrays.operand(out1, "out"))
        out2 = np.empty_like(x)
        again = _cuda.run(
            b, scale=1.0, softcap=0.0, want_wz=True, grad=coef, out=_batch._arrays.operand(out2, "out"), given=s
        )
    assert again is s
    assert np.array_equal(out1.view(np.uint16), out2.view(np.uint16))


def test_grad_output_array_for_none(emu):
    rng = np.random.default_rng(29)
    x = _logits(rng, (4, 50), np.float32)
    y = rng.integers(0, 50, 4)
    go = np.array([0.5, 0.0, -2.0, 1.0])
    ref = ce_fast.cross_entropy_and_grad(x, y, reduction="none", grad_output=go)
    with kernel_emulator.emulated_engine(emu):
        # (A host array next to device logits is a mixed-device call, refused by the batch
        # builder from the operands' devices: tests/test_gpu.py checks it on a GPU.)
        for i, g in enumerate(go):
            loss, grad = ce_fast.cross_entropy_and_grad(x[i : i + 1], y[i : i + 1], reduction="none", grad_output=g)
            _grad_close(grad[0], ref[1][i], np.float32)


def test_large_class_count_block_per_row(emu):
    """Rows of 70k classes: a block of 512 threads per row, many vectors per thread."""
    rng = np.random.default_rng(31)
    x = _logits(rng, (3, 70001), BF16)
    y = np.array([0, 35000, 70000])
    got, ref = _both(emu, lambda: ce_fast.cross_entropy_and_grad(x, y, reduction="none"))
    assert [b for n, _, b in emu.launches if n.startswith("ce_fused")][-1] == 512
    _close(got[0], ref[0], 1e-5, 1e-6)
    _grad_close(got[1], ref[1], BF16)


def test_launch_configuration(monkeypatch):
    """G: about VECTORS_PER_THREAD 16-byte vectors per thread, a power of two up to
    MAX_GROUP; small rows share a block; the fused grid keeps rows in flight within L2."""
    saved = dict(_cuda._props)
    try:
        _cuda._props[0] = (132, 50 << 20)
        # The default: 32 vectors a thread, 128 threads for a 62.5 KiB row, at most 512.
        assert _cuda._config(16384, 32000, 2, 0, fused=False) == (128, 128, 132 * 16)
        assert _cuda._config(16384, 32000, 2, 0, fused=True) == (128, 128, 409)
        assert _cuda._config(16384, 128256, 4, 0, fused=False) == (512, 512, 132 * 4)
        monkeypatch.setattr(_cuda, "VECTORS_PER_THREAD", 8)
        assert _cuda._config(16384, 128256, 2, 0, fused=False) == (512, 512, 132 * 4)
        G, block, grid = _cuda._config(16384, 128256, 2, 0, fused=True)
        assert (G, block) == (512, 512) and grid == 132  # 25 MiB / 256 KiB = 100 < SMs
        G, block, grid = _cuda._config(16384, 32000, 2, 0, fused=True)
        assert (G, block) == (512, 512) and grid == 409  # 25 MiB / 62.5 KiB
        assert _cuda._config(1000, 10, 2, 0, fused=False) == (1, 256, 4)  # 256 rows per block
        assert _cuda._config(1000, 100, 4, 0, fused=False) == (4, 256, 16)  # 64 rows per block
    finally:
        _cuda._props.clear()
        _cuda._props.update(saved)


def test_scope_uses_the_device_and_torch_current_stream(monkeypatch):
    """_cuda.scope: CuPy's device is the operand's; for torch operands CuPy's current
    stream wraps torch's current stream of that device (fakes stand in for CuPy and
    torch.cuda: this machine may have neither a GPU nor CuPy)."""
    import torch

    events = []

    class Dev:
        def __init__(self, i):
            self.i = i

        def __enter__(self):
            events.append(("device", self.i))

        def __exit__(self, *exc):
            events.append(("device-exit", self.i))

    class Ext:
        def __init__(self, ptr, dev=-1):
            self.ptr, self.dev = ptr, dev

        def __enter__(self):
            events.append(("stream", self.ptr, self.dev))

        def __exit__(self, *exc):
            events.append(("stream-exit", self.ptr))

    class Alloc:  # cupy.cuda.memory.PythonFunctionAllocator
        def __init__(self, malloc, free):
            self.malloc_fn, self.free_fn = malloc, free

        def malloc(self, size):
            return self.malloc_fn(size, 1)

    @contextlib.contextmanager
    def using_allocator(alloc):
        events.append("torch-allocator")
        yield
        events.append("allocator-exit")
        allocators.append(alloc)

    allocators: list = []
    fake = types.SimpleNamespace(
        cuda=types.SimpleNamespace(
            Device=Dev,
            ExternalStream=Ext,
            using_allocator=using_allocator,
            memory=types.SimpleNamespace(PythonFunctionAllocator=Alloc),
            get_current_stream=lambda: types.SimpleNamespace(ptr=4243),
        )
    )
    monkeypatch.setattr(_cuda, "xp", lambda: fake)
    monkeypatch.setattr(_cuda, "_torch_alloc", None)
    monkeypatch.delenv(_cuda.ALLOCATOR_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda dev=None: types.SimpleNamespace(cuda_stream=4242 + dev))
    torch_calls = []
    monkeypatch.setattr(torch.cuda, "caching_allocator_alloc", lambda *a: torch_calls.append(("alloc", *a)) or 777)
    monkeypatch.setattr(torch.cuda, "caching_allocator_delete", lambda *a: torch_calls.append(("delete", *a)))
    op = _batch._arrays.Operand(
        array=None,
        lib="torch",
        device="cuda:1",
        shape=(2, 3),
        strides=(3, 1),
        dtype_name="float32",
        code=_batch._arrays.F32,
        ptr=0,
    )
    with _cuda.scope(op):
        events.append("body")
    assert events == [
        ("device", 1),
        ("stream", 4243, 1),
        "torch-allocator",
        "body",
        "allocator-exit",
        ("stream-exit", 4243),
        ("device-exit", 1),
    ]
    # CuPy's allocations inside come from torch's caching allocator, on the current stream.
    malloc = allocators[0].__self__
    assert malloc.malloc(256) == 777 and malloc.malloc(0) == 0
    malloc.free_fn(777, 1)
    malloc.free_fn(0, 1)
    assert torch_calls == [("alloc", 256, 1, 4243), ("delete", 777)]
    events.clear()
    monkeypatch.setenv(_cuda.ALLOCATOR_ENV, "cupy")
    with _cuda.scope(op):
        events.append("body")
    assert events == [("device", 1), ("stream", 4243, 1), "body", ("stream-exit", 4243), ("device-exit", 1)]
    events.clear()
    with _cuda.scope(op.__class__(**{**op.__dict__, "lib": "cupy", "device": "cuda:0"})):
        events.append("body")
    assert events == [("device", 0), "body", ("device-exit", 0)]
    # NumPy logits: no CUDA scope at all.
    with _batch.device_scope(np.zeros((2, 3), np.float32)):
        pass
    # A saved tensor becomes a CuPy view exported on torch's current stream, so DLPack asks
    # torch for no wait from the legacy stream (illegal while a CUDA graph is captured).
    events.clear()
    fake.from_dlpack = lambda t: events.append(("from_dlpack", t)) or "view"
    t = types.SimpleNamespace(device=types.SimpleNamespace(index=1))
    assert _cuda.from_torch(t) == "view"
    assert events == [("stream", 4243, 1), ("from_dlpack", t), ("stream-exit", 4243)]
    # A torch stream speaking the CUDA stream protocol goes through Stream.from_external.
    events.clear()
    protocol = types.SimpleNamespace(cuda_stream=4300, __cuda_stream__=lambda: (0, 4300))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda dev=None: protocol)
    fake.cuda.Stream = types.SimpleNamespace(from_external=lambda s: Ext(s.cuda_stream + 1, 7))
    assert _cuda.from_torch(t) == "view"
    assert events == [("stream", 4301, 7), ("from_dlpack", t), ("stream-exit", 4301)]


# ---------------------------------------------------------------- one-read fused kernel

ONE_READ = dict(FUSED_KERNEL="one-read", ONE_READ_MIN_BYTES=0)
KERNEL_TYPES = {np.dtype(np.float32): "float", np.dtype(np.float16): "ce_half", BF16: "ce_bf16"}


def _one_read_launches(emu, start):
    return [n for n, _, _ in emu.launches[start:] if n.startswith("ce_fused1")]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: IDS[d])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(f"{k}" for k in o) or "plain")
@pytest.mark.parametrize("C", [37, 2501])
def test_one_read_kernel_matches_the_cpu_engine(emu, dtype, opts, C):
    """The one-read kernel (row kept in registers) against the Rust engine: every option,
    rows that start off a 16-byte boundary (odd C), ignored rows, 1 to 16 kept vectors."""
    rng = np.random.default_rng(C)
    x = _logits(rng, (7, C), dtype)
    y = rng.integers(0, C, 7)
    y[2] = opts.get("ignore_index", -100)
    kw = dict(opts)
    if kw.get("weight") == "w":
        kw["weight"] = rng.uniform(0.2, 2.0, C)
    ref = ce_fast.cross_entropy_and_grad(x, y, **kw)
    start = len(emu.launches)
    with kernel_emulator.emulated_engine(emu, **ONE_READ):
        got = ce_fast.cross_entropy_and_grad(x, y, **kw)
    plain = "weight" not in kw and "label_smoothing" not in kw
    want = f"ce_fused1<{KERNEL_TYPES[np.dtype(dtype)]}, {'true' if plain else 'false'}>"
    assert _one_read_launches(emu, start) == [want]
    _close(got[0], ref[0], 1e-5, 1e-6, "loss")
    _grad_close(got[1], ref[1], dtype, "grad")
    assert np.all(_f64(got[1])[2] == 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: IDS[d])
def test_one_read_kernel_in_place_and_non_finite_rows(emu, dtype):
    rng = np.random.default_rng(11)
    C = 1203
    x = _logits(rng, (6, C), np.float32)
    x[0, 2] = np.nan
    x[1, 3] = np.inf
    x[2, :] = -np.inf
    x[3, 1] = -np.inf
    x = x.astype(dtype)
    y = np.array([0, 1, 2, 3, 4, 5])
    ref = ce_fast.cross_entropy_and_grad(x, y, reduction="none", label_smoothing=0.1)
    buf = x.copy()
    start = len(emu.launches)
    with kernel_emulator.emulated_engine(emu, **ONE_READ):
        loss, g = ce_fast.cross_entropy_and_grad(buf, y, reduction="none", label_smoothing=0.1, out=buf)
    assert g is buf and len(_one_read_launches(emu, start)) == 1
    _close(loss, ref[0], 1e-5, 1e-6, "loss")
    _grad_close(buf, ref[1], dtype, "grad")


def test_one_read_falls_back_where_it_does_not_apply(emu):
    """Soft targets, a strided class axis, a gradient of another 16-byte phase and rows
    too long for one block without clusters take the two-pass kernel, with the same numbers."""
    rng = np.random.default_rng(2)
    x = _logits(rng, (4, 600), np.float32)
    y = rng.integers(0, 300, 4)
    soft = rng.dirichlet(np.ones(600), 4).astype(np.float32)
    out = np.empty((4, 601), np.float32)[:, 1:]  # another 16-byte phase than x
    cases = [
        lambda: ce_fast.cross_entropy_and_grad(x, soft),
        lambda: ce_fast.cross_entropy_and_grad(x[:, ::2], y),
        lambda: ce_fast.cross_entropy_and_grad(x, y, out=out),
    ]
    for fn in cases:
        ref = fn()
        ref = (ref[0], ref[1].copy())
        start = len(emu.launches)
        with kernel_emulator.emulated_engine(emu, **ONE_READ):
            got = fn()
        assert not _one_read_launches(emu, start)
        _close(got[0], ref[0], 1e-6, 1e-7)
        _grad_close(got[1], ref[1], np.float32)
    start = len(emu.launches)
    with kernel_emulator.emulated_engine(emu, **ONE_READ, KEEP={True: 1, False: 1}, ONE_READ_GROUP=64):
        # KEEP / ONE_READ_GROUP only steer the plan: a row of 150 vectors exceeds 64 x 1 kept ones
        got = ce_fast.cross_entropy_and_grad(x, y)
    assert not _one_read_launches(emu, start)
    _grad_close(got[1], ce_fast.cross_entropy_and_grad(x, y)[1], np.float32)


def test_one_read_plan():
    """Blocks per row and threads per block of the one-read kernel."""

    def plan(rows, C, itemsize, major, sms=132, plain=True, ptr=1 << 20):
        _cuda._majors[99], _cuda._props[99] = major, (sms, 50 << 20)
        try:
            x = types.SimpleNamespace(strides=(C, 1), ptr=ptr)
            return _cuda._one_read_plan(rows, C, itemsize, 99, x, x, C, None, C, None, plain)
        finally:
            del _cuda._majors[99], _cuda._props[99]

    assert plan(16384, 32000, 2, 9) == (1, 128)  # 4000 vectors: 128 threads x 32 kept
    assert plan(16384, 32000, 2, 9, plain=False) == (1, 256)  # 16 kept with weights
    assert plan(16384, 32000, 2, 9, ptr=(1 << 20) + 2) == (1, 128)  # 4001 vectors
    assert plan(16384, 128256, 2, 9) == (2, 256)
    assert plan(16384, 262144, 4, 9) == (8, 256)
    assert plan(16384, 262144, 4, 9, plain=False) is None  # 16 kept: beyond 8 blocks
    assert plan(16384, 262144, 4, 8) is None  # no clusters before sm_90: two-pass
    assert plan(16384, 32000, 4, 8) == (1, 256)
    assert plan(8, 32000, 2, 9) == (8, 64)  # few rows: each spread over a cluster
    assert plan(16384, 1000, 2, 9) is None  # short rows: the two-pass kernel's row packing
    assert plan(16384, 600000, 2, 9) is None  # beyond 8 blocks of registers


def test_fused_kernel_switch(monkeypatch):
    monkeypatch.setattr(_cuda, "FUSED_KERNEL", None)
    monkeypatch.delenv(_cuda.FUSED_ENV, raising=False)
    assert _cuda.fused_kind() == "two-pass"
    monkeypatch.setenv(_cuda.FUSED_ENV, "one-read")
    assert _cuda.fused_kind() == "one-read"
    monkeypatch.setattr(_cuda, "FUSED_KERNEL", "two-pass")  # the module setting wins
    assert _cuda.fused_kind() == "two-pass"
    monkeypatch.setattr(_cuda, "FUSED_KERNEL", None)
    monkeypatch.setenv(_cuda.FUSED_ENV, "fast")
    with pytest.raises(ValueError, match="CE_FAST_FUSED='fast'"):
        _cuda.fused_kind()


# ---------------------------------------------------------------- in-place scaling, checked targets


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: IDS[d])
@pytest.mark.parametrize("s", [1.0, 0.37, -2.5, 0.0])
def test_scale_kernel_rounds_once_and_skips_one(emu, dtype, s):
    """ce_scale: g * s formed in f32 and rounded once into g's dtype (torch's
    g.mul_(s) with s given dims); s == 1 leaves every bit as it was (inf / NaN too)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(11)
    g = _logits(rng, (3, 1000), dtype, scale=0.01)
    g.reshape(-1)[[5, 77, 901]] = [np.inf, -np.inf, np.nan]
    before = g.copy()
    sv = np.array(s, dtype=np.float32)
    with kernel_emulator.emulated_engine(emu):
        assert _cuda.scale_kernel_name  # the engine's name for it
        args = _cuda.kernel_args("ce_scale", g=g.ctypes.data, n=g.size, s=sv)  # bf16: no array interface
        start = len(emu.launches)
        emu.function("targets", _cuda.scale_kernel_name(_code(dtype)))((2,), (256,), args)
        assert len(emu.launches) == start + 1
    if s == 1.0:
        assert before.tobytes() == g.tobytes()
        return
    # torch's own rounding, value for value (bf16 through its int16 view; NaN payloads aside)
    ref = torch.from_numpy(before.view(np.int16)).view(torch.bfloat16) if dtype == BF16 else torch.from_numpy(before)
    ref = ref.clone().mul_(torch.tensor(s, dtype=torch.float32).reshape(1, 1))
    want = ref.view(torch.int16).numpy().view(BF16) if dtype == BF16 else ref.numpy()
    np.testing.assert_array_equal(_f64(g), _f64(want))


def _code(dtype):
    from ce_fast import _arrays

    return {np.dtype(np.float32): _arrays.F32, np.dtype(np.float16): _arrays.F16, BF16: _arrays.BF16}[np.dtype(dtype)]


def test_checked_targets_are_not_read_back(emu):
    """A backward reusing its forward's check (`checked`) does not read the kernel's
    error flag: no IndexError (no host sync) and, as under graph capture, NaN rows for a
    target the check would have refused; unchecked, the same call raises."""
    rng = np.random.default_rng(5)
    x = _logits(rng, (4, 50), np.float32)
    y = np.array([1, 2, 50, 3], dtype=np.int64)
    spec = LossSpec.make()
    with kernel_emulator.emulated_engine(emu):
        with pytest.raises(IndexError):
            _batch.make_batch(x, y, spec)
        b = _batch.make_batch(x, y, spec, checked=True)
    assert b.target.tolist() == [1, 2, -2, 3]


def test_weight_checks_read_back_once_and_keep_the_total_on_the_device(emu):
    """With weight= the GPU engine's batch reads one small array back (both value
    checks) and leaves the weight total a device value; the losses match the CPU."""
    rng = np.random.default_rng(6)
    x = _logits(rng, (6, 40), np.float32)
    y = rng.integers(0, 40, 6)
    w = rng.uniform(0.1, 2.0, 40)
    spec = LossSpec.make(label_smoothing=0.1)
    with kernel_emulator.emulated_engine(emu):
        b = _batch.make_batch(x, y, spec, w)
        got = ce_fast.cross_entropy(x, y, weight=w, label_smoothing=0.1)
    assert type(b.weight_total) is not float  # an array of the engine (CuPy: 0-d on the device)
    assert float(b.weight_total) == pytest.approx(w.sum(), rel=1e-15)
    _close(got, ce_fast.cross_entropy(x, y, weight=w, label_smoothing=0.1), 1e-6, 1e-7)
