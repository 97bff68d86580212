"""kernels/eval.cu (the GPU side of StreamingCrossEntropy) without a GPU: every
instantiation compiles with NVRTC to sm_80 / sm_90 cubins, the launch arguments match
its signature, and the kernel emulated on the CPU (tests/kernel_emulator_prelude.h)
gives the Rust engine's counts, per-row losses close to its float64 ones, and device
bins that fold to exactly the sum of its own per-row losses."""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from ce_fast import _arrays, _eval_cuda, evaluate
from ce_fast._engines import cuda as _cuda
from ce_fast.streaming import exact_sum

from kernel_emulator import KernelLibrary, compiler
from test_kernels_compile import CUPY_OPTIONS, _signature, compile_module

HERE = Path(__file__).resolve().parent


# ---------------------------------------------------------------- NVRTC


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_eval_kernels_compile(arch):
    from cuda.bindings import nvrtc

    src = _cuda.load_source(_eval_cuda.KERNEL_FILE)
    names = _eval_cuda.names()
    result, log, lowered, cubin = compile_module(src, names, arch)
    assert result == nvrtc.nvrtcResult.NVRTC_SUCCESS, log
    for n in names:
        assert lowered[n].startswith("_Z") and lowered[n].encode() in cubin, n
    assert len(names) == 3


def test_eval_kernels_compile_as_cxx17():
    from cuda.bindings import nvrtc

    src = _cuda.load_source(_eval_cuda.KERNEL_FILE)
    result, log, _, _ = compile_module(src, _eval_cuda.names(), "sm_80", ("-std=c++17",))
    assert result == nvrtc.nvrtcResult.NVRTC_SUCCESS, log
    assert "-std=c++14" in CUPY_OPTIONS


def test_eval_launch_arguments_match_the_signature():
    assert _eval_cuda.PARAMS == tuple(_signature(_cuda.load_source(_eval_cuda.KERNEL_FILE), "ce_eval"))


def test_eval_source_is_self_contained():
    import re

    code = re.sub(r"//[^\n]*", "", _cuda.load_source(_eval_cuda.KERNEL_FILE))
    assert "#include" not in code


# ---------------------------------------------------------------- CPU emulation


class EvalEmulator(KernelLibrary):
    """eval.cu compiled with g++ against the emulator prelude (one OS thread per CUDA thread)."""

    def __init__(self):
        if compiler() is None:
            pytest.fail("no C++ compiler for the kernel emulator")
        super().__init__("eval.cu", _cuda.load_source(_eval_cuda.KERNEL_FILE), _eval_cuda.names())

    def __call__(self, name):
        return self.function(name)


@pytest.fixture(scope="module")
def emu():
    return EvalEmulator()


@pytest.fixture
def emulated(emu, monkeypatch):
    """_eval_cuda.launch on host arrays: NumPy for CuPy, the emulator for the RawModule,
    a pretend device of 2 multiprocessors (so grids loop over rows)."""
    monkeypatch.setattr(_eval_cuda, "_function", emu)
    monkeypatch.setattr(_cuda, "xp", lambda: np)
    monkeypatch.setattr(_cuda, "_device_id", lambda op: 0)
    monkeypatch.setattr(_cuda, "_device_info", lambda dev: (2, 1 << 20))


def _run(x, y, ignore_index=-100):
    """(part, per-row losses) of the emulated kernel over logits x and targets y."""
    op = _arrays.operand(x, "logits")
    y = np.asarray(y).reshape(-1)
    idx = np.where(y == ignore_index, -1, y).astype(np.int64)
    part = _eval_cuda.new_part()
    loss = np.full(op.rows, -7.0)
    _eval_cuda.launch(op, idx, part, o_loss=loss)
    return part, loss


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16], ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("C", [1, 5, 33, 300])
def test_emulated_kernel_matches_the_cpu_engine(emulated, dtype, C):
    rng = np.random.default_rng(C)
    rows = 45
    x = (rng.standard_normal((rows, C)) * 4).astype(np.float32).astype(dtype)
    if C > 3:
        x[3, :] = x[3, 0]  # ties everywhere: the first index wins
        x[4, C // 2] = np.nan
        x[5, :] = -np.inf
        x[6, 1] = np.inf
        x[7, 2:] = -np.inf
    y = rng.integers(0, C, rows)
    y[3] = 0
    y[::7] = -100
    part, loss = _run(x, y)
    tokens, correct, fixed, nan, pinf, ninf = _eval_cuda.fold(part)
    ref = evaluate(x, y)
    assert (tokens, correct) == (ref.tokens, ref.correct)
    counted = y != -100
    assert (loss[~counted] == 0).all()
    # The CPU engine's float64 per-row losses, with NaN where it has NaN.
    from test_streaming import _engine_rows

    cpu = _engine_rows(x, y)
    got = loss[counted]
    assert np.array_equal(np.isnan(got), np.isnan(cpu))
    fin = ~np.isnan(cpu)
    np.testing.assert_allclose(got[fin], cpu[fin], rtol=2e-6, atol=2e-6)
    # The bins hold exactly the kernel's own per-row losses.
    assert (fixed, nan, pinf, ninf) == exact_sum(got)
    assert Fraction(fixed, 1 << 1074) == sum((Fraction(v) for v in got[np.isfinite(got)].tolist()), Fraction(0))


def test_emulated_kernel_strided_rows_and_accumulation(emulated):
    rng = np.random.default_rng(9)
    base = (rng.standard_normal((6, 4, 50)) * 3).astype(np.float32)
    x = base.transpose(1, 0, 2)[:, ::2, ::2]  # batch dims that need a row table, class stride 2
    y = rng.integers(0, 25, x.shape[:-1])
    part, loss = _run(x, y)
    op = _arrays.operand(x[:2], "logits")
    idx = y[:2].reshape(-1).astype(np.int64)
    _eval_cuda.launch(op, idx, part)  # a second launch accumulates into the same bins
    tokens, correct, fixed, *_ = _eval_cuda.fold(part)
    ref = evaluate(np.concatenate([x, x[:2]]), np.concatenate([y, y[:2]]))
    assert (tokens, correct) == (ref.tokens, ref.correct)
    assert _ratio(fixed, tokens) == pytest.approx(ref.loss, rel=2e-6)


def _ratio(fixed, n):
    return fixed / (n << 1074)


def test_emulated_kernel_bins_are_order_free(emulated):
    """The same rows in two launches of any split fold to the same integer."""
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((40, 70)) * 10).astype(np.float32)
    y = rng.integers(0, 70, 40)
    whole, _ = _run(x, y)
    a, _ = _run(x[:13], y[:13])
    b, _ = _run(x[13:], y[13:])
    fa, fb, fw = _eval_cuda.fold(a), _eval_cuda.fold(b), _eval_cuda.fold(whole)
    assert tuple(p + q for p, q in zip(fa, fb)) == fw
    assert math.isfinite(_ratio(fw[2], fw[0]))


def test_emulated_update_through_the_accumulator(emulated):
    """_eval_cuda.update (target check by ce.cu's emulated kernel, then eval.cu) feeding a
    StreamingCrossEntropy's device state: the same counts as the CPU engine, and an
    out-of-range target raises before anything is added."""
    from ce_fast.streaming import StreamingCrossEntropy

    from kernel_emulator import Emulator, emulated_engine

    rng = np.random.default_rng(11)
    x = (rng.standard_normal((3, 10, 40)) * 3).astype(np.float32)
    y = rng.integers(0, 40, (3, 10)).astype(np.int32)
    y[0, :4] = -100
    acc = StreamingCrossEntropy()
    with emulated_engine(Emulator()):
        for i in range(3):
            dev, part = _eval_cuda.update(x[i], y[i], -100, acc._device)
            acc._device[dev] = part
        bad = y[0].copy()
        bad[6] = 40
        with pytest.raises(IndexError, match=r"target value 40 at position \(6,\) is out of range for 40 classes"):
            _eval_cuda.update(x[0], bad, -100, acc._device)
    r, ref = acc.result(), evaluate(x, y)
    assert (r.tokens, r.correct) == (ref.tokens, ref.correct)
    assert r.loss == pytest.approx(ref.loss, rel=2e-6)
    assert acc._device == {}  # folded into the host state by result()
