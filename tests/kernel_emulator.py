"""Runs the real CUDA kernel source on the CPU: the text the GPU engine loads
(``ce_fast._engines.cuda.source()``: kernels/ce.cu as embedded in ``_core``, or the file in
$CE_FAST_KERNELS_DIR).

ce.cu is compiled with g++ against ``kernel_emulator_prelude.h`` (one OS thread per
CUDA thread, real barriers and warp shuffles) into a shared library. ``Emulator``
launches its kernels with arguments built exactly as the GPU engine builds them
(``ce_fast._engines.cuda.kernel_args``: each argument passed as a pointer to a value of the
parameter's size, as cuLaunchKernel does) on host memory.

``emulated_engine()`` patches ``ce_fast._engines.cuda`` so that NumPy arrays run through the
whole GPU engine (launch configuration, row layouts, target check, fused gradient)
with the emulator standing in for CuPy's RawModule and NumPy for CuPy: the public API
can then be compared against the Rust CPU engine on this machine.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
PRELUDE = HERE / "kernel_emulator_prelude.h"


def compiler():
    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("g++") or shutil.which("clang++")


def _registry(names) -> str:
    lines = [
        '#include "kernel_emulator_prelude.h"',
        "",
        "struct EmuEntry { const char* name; int arity; void (*launch)(unsigned, unsigned, void**); };",
        "static const EmuEntry emu_entries[] = {",
    ]
    for n in names:
        lines.append(
            f'    {{"{n}", emu_arity(&{n}), [](unsigned g, unsigned b, void** a) {{ emu_kernel(&{n}, g, b, a); }}}},'
        )
    lines += [
        "};",
        'extern "C" int emu_launch_kernel(const char* name, unsigned grid, unsigned block, void** args, int nargs) {',
        "    for (const EmuEntry& e : emu_entries) {",
        "        if (std::strcmp(e.name, name) == 0) {",
        "            if (nargs != e.arity) return -2;",
        "            e.launch(grid, block, args);",
        "            return 0;",
        "        }",
        "    }",
        "    return -1;",
        "}",
        "// The kernels' own conversions, for direct tests: 0 f64->bf16, 1 f32->bf16, 2 f64->f16, 3 f32->f16.",
        'extern "C" unsigned emu_convert(int which, double v) {',
        "    switch (which) {",
        "        case 0: return ce_f64_to_bf16(v);",
        "        case 1: return ce_f32_to_bf16((float)v);",
        "        case 2: return ce_f64_to_f16(v);",
        "        default: return ce_f32_to_f16((float)v);",
        "    }",
        "}",
    ]
    return "\n".join(lines) + "\n"


class Emulator:
    """The kernels of ce.cu compiled for the CPU; build once per session (tens of seconds)."""

    def __init__(self):
        from ce_fast._engines import cuda as _cuda

        # Thread-block clusters (sm_90) have no CPU emulation: their bodies compile out here.
        names = [n for key, group in _cuda.modules().items() if key != "clusters" for n in group]
        src = _cuda.source()
        body = f'#include "{_cuda.KERNEL_NAME}"\n'  # written beside the unit below
        unit = _registry(names).replace(
            '#include "kernel_emulator_prelude.h"\n', '#include "kernel_emulator_prelude.h"\n' + body
        )
        key = hashlib.sha256((PRELUDE.read_text() + src + unit).encode()).hexdigest()[:16]
        out = Path(tempfile.gettempdir()) / f"ce_fast_emu_{key}.so"
        if not out.exists():
            cxx = compiler()
            if cxx is None:
                raise RuntimeError("no C++ compiler for the kernel emulator")
            with tempfile.TemporaryDirectory() as d:
                cpp = Path(d) / "emu.cpp"
                cpp.write_text(unit)
                (Path(d) / _cuda.KERNEL_NAME).write_bytes(src.encode("utf-8"))
                tmp = Path(d) / "emu.so"
                cmd = [cxx, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", f"-I{HERE}", str(cpp), "-o", str(tmp)]
                res = subprocess.run(cmd, capture_output=True, text=True)
                if res.returncode != 0:
                    raise RuntimeError(f"emulator build failed:\n{res.stderr[-8000:]}")
                shutil.move(str(tmp), str(out))
        self.lib = ctypes.CDLL(str(out))
        self.lib.emu_launch_kernel.argtypes = [
            ctypes.c_char_p,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.POINTER(ctypes.c_void_p),
            ctypes.c_int,
        ]
        self.lib.emu_launch_kernel.restype = ctypes.c_int
        self.lib.emu_convert.argtypes = [ctypes.c_int, ctypes.c_double]
        self.lib.emu_convert.restype = ctypes.c_uint
        self.launches = []  # (name, grid, block) of every launch

    _CTYPES = {
        np.dtype(np.uint64): ctypes.c_uint64,
        np.dtype(np.int64): ctypes.c_int64,
        np.dtype(np.int32): ctypes.c_int32,
        np.dtype(np.float64): ctypes.c_double,
    }

    def launch(self, name: str, grid, block, args) -> None:
        grid = grid[0] if isinstance(grid, tuple) else grid
        block = block[0] if isinstance(block, tuple) else block
        vals = [self._CTYPES[np.asarray(a).dtype](a.item()) for a in args]
        argv = (ctypes.c_void_p * len(vals))(*[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in vals])
        self.launches.append((name, int(grid), int(block)))
        rc = self.lib.emu_launch_kernel(name.encode(), int(grid), int(block), argv, len(vals))
        if rc == -1:
            raise KeyError(f"no emulated kernel {name}")
        if rc == -2:
            raise TypeError(f"{name}: wrong number of arguments ({len(vals)})")

    def convert(self, which: str, v: float) -> int:
        """Bits of `v` converted by the kernels' conversion `which` ("f64->bf16", ...)."""
        code = {"f64->bf16": 0, "f32->bf16": 1, "f64->f16": 2, "f32->f16": 3}[which]
        return int(self.lib.emu_convert(code, float(v)))

    def function(self, key, name):
        return lambda grid, block, args, **kw: self.launch(name, grid, block, args)


# ---------------------------------------------------------------- NumPy standing in for CuPy


class _Ctx:
    def __init__(self, *a, **k):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _NotADeviceArray:  # grad_output: NumPy arrays stay host arrays
    pass


def _fake_cupy(sms: int, l2: int):
    fake = types.SimpleNamespace()
    fake.__dict__.update({k: getattr(np, k) for k in dir(np) if not k.startswith("__")})
    fake.ndarray = _NotADeviceArray
    fake.cuda = types.SimpleNamespace(
        Device=_Ctx,
        ExternalStream=_Ctx,
        runtime=types.SimpleNamespace(getDeviceProperties=lambda dev: {"multiProcessorCount": sms, "l2CacheSize": l2}),
    )
    return fake


@contextlib.contextmanager
def emulated_engine(emu: Emulator, *, sms: int = 3, l2: int = 1 << 16, **knobs):
    """NumPy inputs run through ce_fast._engines.cuda with the kernels emulated on the CPU.

    `sms` / `l2` are the pretend device's multiprocessors and L2 bytes (small values
    make the grids loop over row tiles); `knobs` override _cuda module constants
    (e.g. VECTORS_PER_THREAD=1 for wider row groups on small rows)."""
    from ce_fast import _api, _batch
    from ce_fast._engines import cuda as _cuda

    fake = _fake_cupy(sms, l2)
    saved = {
        "xp": _cuda.xp,
        "_function": _cuda._function,
        "_device_id": _cuda._device_id,
        "_props": dict(_cuda._props),
        "_majors": dict(_cuda._majors),
    }
    saved_knobs = {k: getattr(_cuda, k) for k in knobs}
    saved_engine_for = _batch.engine_for
    saved_plain_loss = _api._plain_loss
    try:
        _cuda.xp = lambda: fake
        _cuda._function = emu.function
        _cuda._device_id = lambda op: 0
        _cuda._props.clear()
        _cuda._majors.clear()
        for k, v in knobs.items():
            setattr(_cuda, k, v)
        _batch.engine_for = lambda op: _cuda
        # The CPU's lean path would answer plain int64 NumPy calls before any engine runs.
        _api._plain_loss = lambda *args: None
        yield
    finally:
        _cuda.xp = saved["xp"]
        _cuda._function = saved["_function"]
        _cuda._device_id = saved["_device_id"]
        _cuda._props.clear()
        _cuda._props.update(saved["_props"])
        _cuda._majors.clear()
        _cuda._majors.update(saved["_majors"])
        for k, v in saved_knobs.items():
            setattr(_cuda, k, v)
        _batch.engine_for = saved_engine_for
        _api._plain_loss = saved_plain_loss


if __name__ == "__main__":  # pragma: no cover - manual build check
    sys.path.insert(0, str(HERE.parent / "python"))
    e = Emulator()
    print("built", e.lib)
