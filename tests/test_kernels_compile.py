"""Every CUDA kernel instantiation of the GPU engine compiles, without a GPU.

NVRTC (from the ``cuda-bindings`` and ``nvidia-cuda-nvrtc`` wheels that torch's CUDA
builds install) compiles the source the engine loads (``ce_fast._engines.cuda.source()``:
kernels/ce.cu as embedded in ``_core``) to real cubins for sm_80 and
sm_90 (so ptxas checks the inline PTX too), module by module exactly as the engine asks
CuPy's RawModule for them, with CuPy's default dialect (C++14) and flush-to-zero. Each
expected name expression must lower to a mangled symbol. The launch-argument lists of
ce_fast._engines.cuda are checked against the kernels' C++ signatures.

This test must not be skipped on a machine without a GPU: a kernel that does not
compile fails it. Without cuda-bindings / libnvrtc it fails with a message naming the
missing pip packages.
"""

from __future__ import annotations

import functools
import os
import re
from concurrent.futures import ThreadPoolExecutor

import pytest

from ce_fast._engines import cuda as _cuda

ARCHS = ["sm_80", "sm_90"]
# What CuPy passes besides the architecture (RawModule defaults to -std=c++14 since
# CuPy 13; compile_with_cache adds -ftz=true), plus the engine's own options.
CUPY_OPTIONS = ("-std=c++14", "-ftz=true")


def _nvrtc():
    try:
        from cuda.bindings import nvrtc
    except ImportError as exc:  # pragma: no cover - depends on the environment
        pytest.fail(
            "NVRTC is needed to compile-check the CUDA kernels: pip install cuda-bindings "
            f"nvidia-cuda-nvrtc (torch's CUDA wheels bring both) ({exc})"
        )
    try:
        err, major, minor = nvrtc.nvrtcVersion()
    except Exception as exc:  # pragma: no cover - libnvrtc not found by cuda.pathfinder
        pytest.fail(f"libnvrtc could not be loaded (pip install nvidia-cuda-nvrtc): {exc}")
    assert err == nvrtc.nvrtcResult.NVRTC_SUCCESS, err
    return nvrtc


def _check(nvrtc, err, what):
    assert err == nvrtc.nvrtcResult.NVRTC_SUCCESS, f"{what}: {err}"


def compile_module(src: str, names, arch: str, options=()):
    """(result, log, {name expression: lowered name}, cubin bytes) of one NVRTC program."""
    nvrtc = _nvrtc()
    err, prog = nvrtc.nvrtcCreateProgram(src.encode(), b"ce.cu", 0, [], [])
    _check(nvrtc, err, "nvrtcCreateProgram")
    try:
        for n in names:
            (err,) = nvrtc.nvrtcAddNameExpression(prog, n.encode())
            _check(nvrtc, err, f"nvrtcAddNameExpression({n})")
        opts = [f"--gpu-architecture={arch}", *CUPY_OPTIONS, *_cuda.OPTIONS, *options]
        (result,) = nvrtc.nvrtcCompileProgram(prog, len(opts), [o.encode() for o in opts])
        err, size = nvrtc.nvrtcGetProgramLogSize(prog)
        _check(nvrtc, err, "nvrtcGetProgramLogSize")
        log = b" " * size
        (err,) = nvrtc.nvrtcGetProgramLog(prog, log)
        log = log.decode(errors="replace").rstrip("\x00 \n")
        lowered, cubin = {}, b""
        if result == nvrtc.nvrtcResult.NVRTC_SUCCESS:
            for n in names:
                err, low = nvrtc.nvrtcGetLoweredName(prog, n.encode())
                _check(nvrtc, err, f"nvrtcGetLoweredName({n})")
                lowered[n] = low.decode()
            err, size = nvrtc.nvrtcGetCUBINSize(prog)
            _check(nvrtc, err, "nvrtcGetCUBINSize")
            cubin = b" " * size
            (err,) = nvrtc.nvrtcGetCUBIN(prog, cubin)
            _check(nvrtc, err, "nvrtcGetCUBIN")
        return result, log, lowered, cubin
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


@functools.cache
def compiled_module(key, arch: str):
    """compile_module of one of the engine's modules (cached for the session: the SASS
    checks of tests/test_kernels_sass.py read the same cubins)."""
    return compile_module(_cuda.source(), _cuda.modules()[key], arch)


def compile_all(arch: str) -> list:
    """[(key, names, compile_module result)] of every module the engine may build."""
    modules = _cuda.modules()

    def job(item):
        key, names = item
        return key, names, compiled_module(key, arch)

    workers = max(1, min(len(modules), os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:  # NVRTC releases the GIL
        return list(pool.map(job, modules.items()))


@pytest.mark.parametrize("arch", ARCHS)
def test_every_kernel_compiles(arch):
    nvrtc = _nvrtc()
    modules = _cuda.modules()
    results = compile_all(arch)
    failures = []
    for key, names, (result, log, lowered, cubin) in results:
        if result != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            failures.append(f"module {key}: {result}\n{log[-4000:]}")
            continue
        assert len(cubin) > 0, key
        for n in names:
            low = lowered.get(n, "")
            base = n.split("<")[0]
            assert low.startswith("_Z") and base in low, (key, n, low)
            assert low.encode() in cubin, (key, n, "symbol missing from the cubin")
    assert not failures, "\n\n".join(failures)
    # Everything the engine can ask for was compiled.
    expected = {n for names in modules.values() for n in names}
    # Per logit type: statistics and fused kernels per soft-target type and for the plain call;
    # the target kernels, the read pass, the scaling kernels; the one-read kernels.
    assert len(expected) == 3 * (5 + 1) * 2 + len(_cuda.INT_TYPES) + 1 + 3 + 3 * 2 * (1 + len(_cuda.CLUSTERS))


def test_a_broken_kernel_fails_to_compile():
    """The harness reports compile errors (it is not vacuously green)."""
    nvrtc = _nvrtc()
    src = _cuda.source() + "\ntemplate <typename T> __global__ void ce_broken(T* p) { p[0] = undefined_name; }\n"
    result, log, _, _ = compile_module(src, ["ce_broken<float>"], "sm_80")
    assert result != nvrtc.nvrtcResult.NVRTC_SUCCESS
    assert "undefined_name" in log


def test_compiles_as_cxx17_too():
    """CuPy < 13 and user-chosen options may compile in C++17 (NVRTC's default)."""
    nvrtc = _nvrtc()
    names = list(_cuda.row_kernel_names(_cuda.BF16, None))
    result, log, lowered, _ = compile_module(_cuda.source(), names, "sm_80", ("-std=c++17",))
    assert result == nvrtc.nvrtcResult.NVRTC_SUCCESS, log
    assert set(lowered) == set(names)


def test_source_is_self_contained():
    """No #include: NVRTC needs no CUDA headers at run time (CuPy wheels ship no cuda_bf16.h)."""
    src = _cuda.source()
    code = re.sub(r"//[^\n]*", "", src)
    assert "#include" not in code


# ---------------------------------------------------------------- launch arguments

_KIND_OF_TYPE = {"i64": "q", "u64": "Q", "int": "i", "double": "d"}


def _signature(src: str, kernel: str):
    """[(name, kind)] of a __global__ kernel's parameters in ce.cu."""
    m = re.search(
        r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\)?\s*)?(?:CE_CLUSTER\([^)]*\)\s*)?"
        + kernel
        + r"\s*\(([^)]*)\)",
        src,
    )
    assert m, f"no __global__ {kernel} in ce.cu"
    params = []
    for p in m.group(1).split(","):
        p = " ".join(p.split())
        name = re.findall(r"[A-Za-z_]\w*", p)[-1]
        ty = p[: p.rfind(name)].strip()
        kind = "p" if "*" in ty else _KIND_OF_TYPE.get(ty.replace("const ", ""))
        assert kind is not None, f"{kernel}: parameter type {ty!r} has no marshalling kind"
        params.append((name, kind))
    return params


@pytest.mark.parametrize("kernel", sorted(_cuda.KERNEL_PARAMS))
def test_launch_arguments_match_the_kernel_signatures(kernel):
    assert _cuda.KERNEL_PARAMS[kernel] == tuple(_signature(_cuda.source(), kernel))


def test_kernel_args_types():
    import numpy as np

    args = _cuda.kernel_args(
        "ce_targets",
        t=16,
        rows=3,
        t_rs=1,
        t_tab=None,
        C=10,
        ign_s=-100,
        ign_s_ok=True,
        ign_u=0,
        ign_u_ok=False,
        idx=32,
        valid=48,
        bad=64,
    )
    assert [type(a) for a in args] == [
        np.uint64,
        np.int64,
        np.int64,
        np.uint64,
        np.int64,
        np.int64,
        np.int32,
        np.uint64,
        np.int32,
        np.uint64,
        np.uint64,
        np.uint64,
    ]
    assert int(args[3]) == 0 and int(args[5]) == -100
    with pytest.raises(TypeError, match="missing"):
        _cuda.kernel_args("ce_read_pass", p=0, n16=1)
