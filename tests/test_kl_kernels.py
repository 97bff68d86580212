"""kernels/kl.cu without a GPU: every instantiation the KL pass asks for compiles with
NVRTC (as tests/test_kernels_compile.py does for ce.cu), its launch arguments match the
kernels' signatures, and the kernels, compiled for the CPU with the emulator prelude of
tests/kernel_emulator.py and driven by ce_fast._engines.kl_cuda itself (NumPy standing
in for CuPy), give the Rust engine's numbers."""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import ce_fast
from ce_fast._engines import cuda as _cuda
from ce_fast._engines import kl_cuda

import kernel_emulator
from conftest import assert_grad_close, assert_rows_close, with_layout
from oracle_kl_focal import kl_grad_ref, kl_rows_ref
from test_kernels_compile import _nvrtc, _signature, compile_module

BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = [np.dtype(np.float32), np.dtype(np.float16), BF16]


def _src() -> str:
    return _cuda.load_source(kl_cuda.KERNEL_NAME)


def test_every_kl_kernel_compiles():
    nvrtc = _nvrtc()  # fails (never skips) without NVRTC, as the ce.cu compile test
    failures = []
    for key, names in kl_cuda.modules().items():
        result, log, lowered, cubin = compile_module(_src(), names, "sm_80")
        if result != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            failures.append(f"module {key}: {result}\n{log[-4000:]}")
            continue
        for n in names:
            assert lowered[n].encode() in cubin, (key, n)
    assert not failures, "\n\n".join(failures)
    assert len(kl_cuda.modules()) == 9


def test_kl_compiles_as_cxx17_and_sm90():
    nvrtc = _nvrtc()
    names = kl_cuda.kernel_names(kl_cuda.BF16, kl_cuda.F16)
    result, log, _, _ = compile_module(_src(), names, "sm_90", ("-std=c++17",))
    assert result == nvrtc.nvrtcResult.NVRTC_SUCCESS, log


def test_kl_source_is_embedded_and_self_contained():
    import re

    from ce_fast import _core

    assert "kl.cu" in _core.kernel_names()
    assert _core.kernel_source("kl.cu") == (Path(__file__).parent.parent / "kernels" / "kl.cu").read_text()
    assert "#include" not in re.sub(r"//[^\n]*", "", _src())


@pytest.mark.parametrize("kernel", sorted(kl_cuda.KERNEL_PARAMS))
def test_launch_arguments_match_the_kernel_signatures(kernel):
    assert kl_cuda.KERNEL_PARAMS[kernel] == tuple(_signature(_src(), kernel))


# ---------------------------------------------------------------- the emulated kernels


class KlEmulator(kernel_emulator.KernelLibrary):
    """kl.cu compiled for the CPU (the shared launcher, another source)."""

    def __init__(self):
        super().__init__("kl.cu", _src(), [n for group in kl_cuda.modules().values() for n in group])


needs_cxx = pytest.mark.skipif(kernel_emulator.compiler() is None, reason="no C++ compiler for the kernel emulator")


@pytest.fixture(scope="module")
def emulated():
    """A context manager: NumPy inputs through the CUDA engine and kl_cuda, kernels emulated."""
    import contextlib

    ce_emu = kernel_emulator.Emulator()
    kl_emu = KlEmulator()

    @contextlib.contextmanager
    def ctx(block=64):
        saved = (kl_cuda._function, kl_cuda.BLOCK)
        with kernel_emulator.emulated_engine(ce_emu, sms=2):
            kl_cuda._function = kl_emu.function
            kl_cuda.BLOCK = block
            try:
                yield kl_emu
            finally:
                kl_cuda._function, kl_cuda.BLOCK = saved

    return ctx


def _pair(rng, shape, dtype, scale=3.0):
    s = (rng.standard_normal(shape) * scale).astype(dtype)
    t = (rng.standard_normal(shape) * scale).astype(dtype)
    return s, t


def _scale(s, t, T):
    return 1.0 + np.abs(s.astype(np.float64) / T).max() + np.abs(t.astype(np.float64) / T).max()


@needs_cxx
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("T", [1.0, 2.5])
def test_emulated_matches_reference(emulated, dtype, reverse, T):
    rng = np.random.default_rng(0)
    shape = (5, 300)
    s, t = _pair(rng, shape, dtype)
    t2 = t.astype(BF16) if dtype == np.float32 else t  # mixed dtypes: another instantiation
    y = rng.integers(0, shape[-1], shape[:-1])
    y[2] = -100
    kw = dict(temperature=T, reverse=reverse, target=y)
    with emulated() as emu:
        rows = ce_fast.kl_divergence(s, t2, reduction="none", **kw)
        loss, g = ce_fast.kl_divergence_and_grad(s, t2, grad_output=0.5, **kw)
        assert any(n.startswith("kl_stats") for n, _, _ in emu.launches)
        assert any(n.startswith("kl_grad") for n, _, _ in emu.launches)
    sc = _scale(s, t2, T)
    assert_rows_close(rows, kl_rows_ref(s, t2, **kw), dtype, scale=sc)
    np.testing.assert_allclose(float(loss), float(ce_fast.kl_divergence(s, t2, **kw)), rtol=1e-5, atol=1e-6)
    assert_grad_close(g, kl_grad_ref(s, t2, grad_output=0.5, **kw), dtype, floor=np.full(shape[0], sc / T))
    assert np.all(g[2] == 0)


@needs_cxx
def test_emulated_layouts_in_place_and_non_finite(emulated):
    rng = np.random.default_rng(1)
    s, t = _pair(rng, (2, 3, 200), np.float32)
    s[0, 0, 5] = np.nan
    t[0, 1, :150] = -np.inf
    s[1, 2, 7] = -np.inf
    t[1, 0, 3] = np.inf
    t[1, 1] = -np.inf
    with emulated(block=32):
        got = ce_fast.kl_divergence(with_layout(s, "sliced"), with_layout(t, "transposed"), reduction="none")
        want_g = ce_fast.kl_divergence_and_grad(s[:, 1:], t[:, 1:], reverse=True)[1]
        z = s.copy()
        ce_fast.kl_divergence_and_grad(z[:, 1:], t[:, 1:], reverse=True, out=z[:, 1:])
    ref = kl_rows_ref(s, t)
    assert np.isnan(got[0, 0]) and np.isnan(got[1, 0]) and np.isnan(got[1, 1])
    assert got[1, 2] == np.inf
    assert_rows_close(got, ref, np.float32, scale=_scale(s[np.isfinite(s)], t[np.isfinite(t)], 1.0))
    np.testing.assert_array_equal(z[:, 1:], want_g)
    cpu = ce_fast.kl_divergence_and_grad(s[:, 1:], t[:, 1:], reverse=True)[1]
    fin = np.isfinite(cpu)
    np.testing.assert_allclose(want_g[fin], cpu[fin], rtol=1e-4, atol=1e-7)
