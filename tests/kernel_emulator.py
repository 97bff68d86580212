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


def _registry(names, conversions: bool = True) -> str:
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
    ]
    if not conversions:
        return "\n".join(lines) + "\n"
    lines += [
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


def _build(unit: str, files: dict[str, str]) -> Path:
    """A shared library of the C++ `unit` (with the prelude and `files` written beside
    it), cached in the temporary directory by the hash of everything it is made of."""
    key = hashlib.sha256((PRELUDE.read_text() + unit + "".join(files.values())).encode()).hexdigest()[:16]
    out = Path(tempfile.gettempdir()) / f"ce_fast_emu_{key}.so"
    if not out.exists():
        cxx = compiler()
        if cxx is None:
            raise RuntimeError("no C++ compiler for the kernel emulator")
        with tempfile.TemporaryDirectory() as d:
            cpp = Path(d) / "emu.cpp"
            cpp.write_text(unit)
            for name, text in files.items():
                (Path(d) / name).write_bytes(text.encode("utf-8"))
            tmp = Path(d) / "emu.so"
            cmd = [cxx, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", f"-I{HERE}", str(cpp), "-o", str(tmp)]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                raise RuntimeError(f"emulator build failed:\n{res.stderr[-8000:]}")
            shutil.move(str(tmp), str(out))
    return out


def _launcher(lib: ctypes.CDLL) -> ctypes.CDLL:
    lib.emu_launch_kernel.argtypes = [
        ctypes.c_char_p,
        ctypes.c_uint,
        ctypes.c_uint,
        ctypes.POINTER(ctypes.c_void_p),
        ctypes.c_int,
    ]
    lib.emu_launch_kernel.restype = ctypes.c_int
    return lib


class KernelLibrary:
    """The kernels `names` of one CUDA source file compiled for the CPU, launched as
    cuLaunchKernel would (each argument a pointer to a value of its parameter's size);
    every launch is logged in ``launches`` as (name, grid, block)."""

    def __init__(self, file_name: str, source: str, names, conversions: bool = False):
        unit = _registry(names, conversions).replace(
            '#include "kernel_emulator_prelude.h"\n', f'#include "kernel_emulator_prelude.h"\n#include "{file_name}"\n'
        )
        self.lib = _launcher(ctypes.CDLL(str(_build(unit, {file_name: source}))))
        self.generated_libs: dict[str, ctypes.CDLL] = {}  # generated rule kernels by name
        self.launches: list = []

    _CTYPES = {
        np.dtype(np.uint64): ctypes.c_uint64,
        np.dtype(np.int64): ctypes.c_int64,
        np.dtype(np.int32): ctypes.c_int32,
        np.dtype(np.float64): ctypes.c_double,
        np.dtype(np.float32): ctypes.c_float,
    }

    def launch(self, name: str, grid, block, args, lib=None) -> None:
        grid = grid[0] if isinstance(grid, tuple) else grid
        block = block[0] if isinstance(block, tuple) else block
        vals = [self._CTYPES[np.asarray(a).dtype](a.item()) for a in args]
        argv = (ctypes.c_void_p * len(vals))(*[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in vals])
        self.launches.append((name, int(grid), int(block)))
        rc = (lib or self.lib).emu_launch_kernel(name.encode(), int(grid), int(block), argv, len(vals))
        if rc == -1:
            raise KeyError(f"no emulated kernel {name}")
        if rc == -2:
            raise TypeError(f"{name}: wrong number of arguments ({len(vals)})")

    def function(self, *key_and_name):
        """A launcher of the kernel named last, as the engines' ``_function(...)`` gives one."""
        name = key_and_name[-1]
        return lambda grid, block, args, **kw: self.launch(name, grid, block, args)

    def generated(self, program):
        """A generated kernel (ce_fast._symbolic.Program) compiled for the CPU, as
        ``ce_fast._engines.cuda._generated`` gives it on a GPU."""
        lib = self.generated_libs.get(program.name)
        if lib is None:
            unit = _registry([program.name], conversions=False).replace(
                '#include "kernel_emulator_prelude.h"\n', '#include "kernel_emulator_prelude.h"\n' + program.source
            )
            lib = self.generated_libs[program.name] = _launcher(ctypes.CDLL(str(_build(unit, {}))))
        return lambda grid, block, args, **kw: self.launch(program.name, grid, block, args, lib)


class Emulator(KernelLibrary):
    """The kernels of ce.cu compiled for the CPU; build once per session (tens of seconds)."""

    def __init__(self):
        from ce_fast._engines import cuda as _cuda

        # Thread-block clusters (sm_90) have no CPU emulation: their bodies compile out here.
        names = [n for key, group in _cuda.modules().items() if key != "clusters" for n in group]
        super().__init__(_cuda.KERNEL_NAME, _cuda.source(), names, conversions=True)
        self.lib.emu_convert.argtypes = [ctypes.c_int, ctypes.c_double]
        self.lib.emu_convert.restype = ctypes.c_uint

    def convert(self, which: str, v: float) -> int:
        """Bits of `v` converted by the kernels' conversion `which` ("f64->bf16", ...)."""
        code = {"f64->bf16": 0, "f32->bf16": 1, "f64->f16": 2, "f32->f16": 3}[which]
        return int(self.lib.emu_convert(code, float(v)))


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


class DeviceOps:
    """What a call would cost on a GPU besides the kernels the emulator logs: each CuPy
    operation that launches a kernel of its own (elementwise, reduction, fill, copy) and
    each read of a device value on the host (a synchronisation)."""

    def __init__(self):
        self.ops: list[str] = []
        self.syncs: list[str] = []


_counting: DeviceOps | None = None
# NumPy functions that make no kernel on CuPy: allocation, views, metadata.
_FREE = {"empty", "empty_like", "reshape", "broadcast_to", "ravel", "shape", "ndim", "result_type", "dtype"}
_FREE |= {"iinfo", "finfo", "errstate", "can_cast", "promote_types", "shares_memory", "may_share_memory"}


def _plain(v):
    if isinstance(v, _DeviceArray):
        return v.view(np.ndarray)
    if isinstance(v, (tuple, list)):
        return type(v)(_plain(a) for a in v)
    if isinstance(v, dict):
        return {k: _plain(a) for k, a in v.items()}
    return v


def _device(v):
    if isinstance(v, np.ndarray) and not isinstance(v, _DeviceArray):
        return v.view(_DeviceArray)
    if isinstance(v, np.generic):
        return np.asarray(v).view(_DeviceArray)  # CuPy keeps 0-d results on the device
    if isinstance(v, tuple):
        return tuple(_device(a) for a in v)
    return v


def _op(name: str) -> None:
    if _counting is not None:
        _counting.ops.append(name)


def _sync(name: str) -> None:
    if _counting is not None:
        _counting.syncs.append(name)


class _DeviceArray(np.ndarray):
    """A NumPy array standing for a CuPy array while operations are counted."""

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        _op(f"{ufunc.__name__}.{method}")
        if "out" in kwargs:
            kwargs["out"] = _plain(kwargs["out"])
        return _device(getattr(ufunc, method)(*_plain(inputs), **kwargs))

    def __array_function__(self, func, types, args, kwargs):
        if func.__name__ not in _FREE:
            _op(func.__name__)
        return _device(func(*_plain(args), **_plain(kwargs)))

    def __getitem__(self, index):
        if isinstance(index, np.ndarray) or (
            isinstance(index, tuple) and any(isinstance(i, np.ndarray) for i in index)
        ):
            _op("take")
        return _device(self.view(np.ndarray)[_plain(index)])

    def astype(self, dtype, *args, **kwargs):
        _op("astype")
        return _device(self.view(np.ndarray).astype(dtype, *args, **kwargs))

    def copy(self, *args, **kwargs):
        _op("copy")
        return _device(self.view(np.ndarray).copy(*args, **kwargs))

    def item(self, *args):
        _sync("item")
        return self.view(np.ndarray).item(*args)

    def tolist(self):
        _sync("tolist")
        return self.view(np.ndarray).tolist()

    def __int__(self):
        _sync("int")
        return int(self.view(np.ndarray))

    def __float__(self):
        _sync("float")
        return float(self.view(np.ndarray))

    def __bool__(self):
        _sync("bool")
        return bool(self.view(np.ndarray))


def _counted(name: str, fn):
    """A NumPy function as CuPy's would cost: counted unless free or a no-op conversion."""

    def call(*args, **kwargs):
        res = fn(*_plain(args), **_plain(kwargs))
        first = args[0] if args else None
        same = isinstance(first, np.ndarray) and isinstance(res, np.ndarray) and res.base is not None
        no_copy = name in ("asarray", "ascontiguousarray") and (res is _plain(first) or same)
        if name not in _FREE and not no_copy:
            _op(name)
        return _device(res)

    return call


def _fake_cupy(sms: int, l2: int, counting: bool = False):
    fake = types.SimpleNamespace()
    fake.__dict__.update({k: getattr(np, k) for k in dir(np) if not k.startswith("__")})
    fake.ndarray = _NotADeviceArray
    if counting:
        fake.ndarray = _DeviceArray  # results of counted operations are device arrays
        for k, v in list(fake.__dict__.items()):
            if isinstance(v, (types.FunctionType, types.BuiltinFunctionType, np.ufunc)) or (
                callable(v) and type(v).__name__ == "_ArrayFunctionDispatcher"
            ):
                setattr(fake, k, _counted(k, v))
    fake.cuda = types.SimpleNamespace(
        Device=_Ctx,
        ExternalStream=_Ctx,
        runtime=types.SimpleNamespace(getDeviceProperties=lambda dev: {"multiProcessorCount": sms, "l2CacheSize": l2}),
    )
    return fake


@contextlib.contextmanager
def emulated_engine(emu: Emulator, *, sms: int = 3, l2: int = 1 << 16, count: DeviceOps | None = None, **knobs):
    """NumPy inputs run through ce_fast._engines.cuda with the kernels emulated on the CPU.

    `sms` / `l2` are the pretend device's multiprocessors and L2 bytes (small values
    make the grids loop over row tiles); `knobs` override _cuda module constants
    (e.g. VECTORS_PER_THREAD=1 for wider row groups on small rows)."""
    from ce_fast import _api, _batch
    from ce_fast._engines import cuda as _cuda

    global _counting
    fake = _fake_cupy(sms, l2, counting=count is not None)
    saved = {
        "xp": _cuda.xp,
        "_function": _cuda._function,
        "_generated": _cuda._generated,
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
        _cuda._generated = emu.generated
        _cuda._device_id = lambda op: 0
        _cuda._props.clear()
        _cuda._majors.clear()
        for k, v in knobs.items():
            setattr(_cuda, k, v)
        _batch.engine_for = lambda op: _cuda
        # The CPU's lean path would answer plain int64 NumPy calls before any engine runs.
        _api._plain_loss = lambda *args: None
        _counting = count
        yield
    finally:
        _counting = None
        _cuda.xp = saved["xp"]
        _cuda._function = saved["_function"]
        _cuda._generated = saved["_generated"]
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
