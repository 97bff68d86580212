"""kernels/binary.cu without a GPU: NVRTC compiles every instantiation the engine may
launch (sm_80, sm_90, C++14 and C++17), the launch-argument list matches the kernel's
signature, and the kernel compiled for the CPU with tests/kernel_emulator_prelude.h (one
thread per CUDA thread) runs through ce_fast._engines.binary_cuda with NumPy standing in
for CuPy, compared with the Rust engine and the float64 references."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import numpy as np
import pytest

import ce_fast
from ce_fast import _binary, _core
from ce_fast._engines import binary_cuda as _bc

import kernel_emulator
import oracle_binary as ob
from conftest import BF16, LOW_DTYPES, cast
from test_binary import assert_close, bce_scale, grad_scale
from test_kernels_compile import _nvrtc, compile_module

ROOT = Path(__file__).resolve().parent.parent


def test_embedded_source_is_the_checkout_file():
    assert _core.kernel_source("binary.cu").encode() == (ROOT / "kernels" / "binary.cu").read_bytes()


def test_source_is_self_contained():
    code = re.sub(r"//[^\n]*", "", _core.kernel_source("binary.cu"))
    assert "#include" not in code


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("std", ["-std=c++14", "-std=c++17"])
def test_every_instantiation_compiles(arch, std):
    nvrtc = _nvrtc()
    names = _bc.names()
    assert len(names) == 3 * 4
    result, log, lowered, cubin = compile_module(_core.kernel_source("binary.cu"), names, arch, (std,))
    assert result == nvrtc.nvrtcResult.NVRTC_SUCCESS, log
    for n in names:
        assert lowered[n].startswith("_Z") and "bx_binary" in lowered[n]
        assert lowered[n].encode() in cubin


def test_launch_arguments_match_the_signature():
    src = re.sub(r"//[^\n]*", "", _core.kernel_source("binary.cu"))
    m = re.search(r"__global__\s+void\s+__launch_bounds__\(\w+\)\s+bx_binary\s*\(([^)]*)\)", src)
    assert m
    kinds = {"i64": "q", "double": "d", "int": "i", "float": "f"}
    params = []
    for p in m.group(1).split(","):
        p = " ".join(p.replace("__restrict__", "").split())
        name = re.findall(r"[A-Za-z_]\w*", p)[-1]
        ty = p[: p.rfind(name)].strip()
        params.append((name, "p" if "*" in ty else kinds[ty.replace("const ", "")]))
    assert _bc.PARAMS == tuple(params)
    src_consts = dict(re.findall(r"#define (BX_BLOCK|BX_TILE) (\d+)", src))
    assert int(src_consts["BX_BLOCK"]) == _bc.BLOCK and int(src_consts["BX_TILE"]) == _bc.TILE


# ---------------------------------------------------------------- the emulator


class BinaryEmulator(kernel_emulator.KernelLibrary):
    """binary.cu compiled for the CPU with the emulator prelude."""

    def __init__(self):
        super().__init__("binary.cu", _core.kernel_source("binary.cu"), _bc.names())


@pytest.fixture(scope="module")
def emu():
    if kernel_emulator.compiler() is None:
        pytest.skip("no C++ compiler for the kernel emulator")
    return BinaryEmulator()


@contextlib.contextmanager
def emulated(emu, sms=2):
    """NumPy inputs run through ce_fast._engines.binary_cuda, the kernel emulated."""
    with kernel_emulator.emulated_engine(emu, sms=sms):
        saved = (_binary._engine, _bc._function)
        _binary._engine = lambda x: _bc
        _bc._function = emu.function
        try:
            yield
        finally:
            _binary._engine, _bc._function = saved


def _inputs(rng, shape, dtype, tdtype=None):
    x = cast(rng.standard_normal(shape) * 4, dtype)
    t = cast(rng.random(shape), tdtype or dtype)
    return x, t


@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_bce_emulated_matches_cpu_and_reference(emu, dtype, reduction):
    rng = np.random.default_rng(1)
    x, t = _inputs(rng, (3, 1100), dtype, np.float64 if dtype == np.float32 else dtype)
    w = rng.random((3, 1)).astype(np.float32) + 0.5
    pw = rng.random(1100) * 2  # float64: converted to float32 on the device
    go = 0.5 if reduction != "none" else rng.standard_normal(x.shape)
    cpu = ce_fast.binary_cross_entropy_with_logits_and_grad(
        x, t, weight=w, pos_weight=pw, reduction=reduction, grad_output=go
    )
    with emulated(emu):
        gpu = ce_fast.binary_cross_entropy_with_logits_and_grad(
            x, t, weight=w, pos_weight=pw, reduction=reduction, grad_output=go
        )
    assert emu.launches and emu.launches[-1][0] == _bc.kernel_name(*(_bc_codes(x, t)))
    t32 = t.astype(np.float32)  # the kernels read float64 targets as float32, as the Rust engine
    pw32 = pw.astype(np.float32)
    ref = ob.bce(x, t32, w, pw32)
    ref = ref.mean() if reduction == "mean" else ref.sum() if reduction == "sum" else ref
    s = bce_scale(x, t32, w, pw32)
    s = s.mean() if reduction == "mean" else s.sum() if reduction == "sum" else s
    assert_close(gpu[0], ref, s, np.float32)
    np.testing.assert_allclose(gpu[0], cpu[0], rtol=2e-6, atol=1e-6)
    go_eff = np.asarray(go) / (x.size if reduction == "mean" else 1)
    gref = ob.bce_grad(x, t32, w, pw32) * go_eff
    assert gpu[1].dtype == x.dtype
    assert_close(gpu[1], gref, grad_scale(x, t32, go_eff, w, pw32) * 4, np.float32, stored=dtype)


def _bc_codes(x, t):
    from ce_fast import _arrays

    return _arrays.operand(x, "x").code, _arrays.operand(t, "t").code


@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (-1.0, 1.5), (0.5, 0.0)])
def test_focal_emulated(emu, alpha, gamma):
    rng = np.random.default_rng(2)
    x, t = _inputs(rng, (2, 3, 70), BF16)
    t = (t.astype(np.float32) > 0.5).astype(BF16)
    with emulated(emu):
        loss, g = ce_fast.sigmoid_focal_loss_and_grad(x, t, alpha=alpha, gamma=gamma, reduction="none")
        m = ce_fast.sigmoid_focal_loss(x, t, alpha=alpha, gamma=gamma, reduction="mean")
    ref = ob.focal(x, t, alpha, gamma)
    assert_close(loss, ref, 4 * bce_scale(x, t), np.float32)
    np.testing.assert_allclose(m, ref.mean(), rtol=1e-5)
    gref = ob.focal_grad(x, t, alpha, gamma)
    assert_close(g, gref, grad_scale(x, t, 1.0, focal=True) * 4, np.float32, stored=BF16)


def test_layouts_in_place_and_empty_emulated(emu):
    rng = np.random.default_rng(3)
    base_x, t = _inputs(rng, (4, 6, 40), np.float32)
    ref_g = ob.bce_grad(base_x, t)
    # batch dims that do not collapse (a transposed batch), class axis strided, in place
    x = np.ascontiguousarray(base_x.transpose(1, 0, 2)).transpose(1, 0, 2)
    xs = np.zeros((4, 6, 80), np.float32)[..., ::2]
    xs[...] = base_x
    with emulated(emu):
        l1, g1 = ce_fast.binary_cross_entropy_with_logits_and_grad(x, t, reduction="sum", out=x)
        l2, _ = ce_fast.binary_cross_entropy_with_logits_and_grad(xs, t, reduction="sum", out=xs)
        z = ce_fast.binary_cross_entropy_with_logits(np.zeros((0, 3), np.float32), np.zeros((0, 3), np.float32))
        s0 = ce_fast.sigmoid_focal_loss(np.float32(1.5), np.float32(1.0), reduction="sum")
    assert g1 is x
    assert_close(x, ref_g, 1.0, np.float32, stored=np.float32)
    assert_close(xs, ref_g, 1.0, np.float32, stored=np.float32)
    np.testing.assert_allclose(l1, ob.bce(base_x, t).sum(), rtol=1e-5)
    np.testing.assert_allclose(l2, l1, rtol=1e-6)
    assert np.isnan(z)
    np.testing.assert_allclose(s0, ob.focal(1.5, 1.0), rtol=1e-5)


def test_non_finite_emulated(emu):
    vals = np.array([np.inf, -np.inf, np.nan, 0.0, 60.0, -60.0], dtype=np.float32)
    x = np.repeat(vals, 3)
    t = np.tile(np.array([0.0, 1.0, 0.5], np.float32), len(vals))
    cpu = ce_fast.binary_cross_entropy_with_logits_and_grad(x, t, reduction="none")
    with emulated(emu):
        gpu = ce_fast.binary_cross_entropy_with_logits_and_grad(x, t, reduction="none")
    for a, b in zip(gpu, cpu):
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-30)
