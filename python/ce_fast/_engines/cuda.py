"""The CUDA engine: a thin adapter from batches to the CUDA kernels in ``kernels/ce.cu``.

Same small protocol as :mod:`ce_fast._engines.cpu` (``xp``, ``to_float64``,
``index_targets``, ``run``, ``wrap``, ``copy_into``, ``empty_like``, ``writable``,
``grad_output``), with CuPy as the array module. The loss and gradient rules stay in
:mod:`ce_fast._rules`; the kernels only produce per-row statistics and write the
gradient.

- The kernel source (``kernels/ce.cu`` in the source tree) is embedded in
  ``ce_fast._core`` when the extension is built, so the wheel ships it and the GPU host
  needs no CUDA toolkit. For kernel work, ``CE_FAST_KERNELS_DIR=/path/to/kernels`` makes
  the engine read ``ce.cu`` from that directory instead (no rebuild of ``_core``); the
  variable is read once, when the first kernel of the process is compiled.
- Kernels are compiled by NVRTC through ``cupy.RawModule`` on first use, one module
  per (logits dtype, soft-target dtype) and one for the integer-target kernels;
  CuPy keeps one binary per device in the process and caches it on disk
  (``~/.cupy/kernel_cache``) across processes.
- Work runs on CuPy's current stream; for torch tensors :func:`scope` makes that
  torch's current stream of the tensor's device, so ce_fast orders correctly with
  the surrounding torch work (``torch.cuda.stream(...)`` included).
- Loss + gradient: ``CE_FAST_FUSED=two-pass`` (default: ce_fused, the row read twice,
  the second read meant to hit L2) or ``one-read`` (ce_fused1 / ce_fused1c: the row kept
  in registers, split over a thread-block cluster on sm_90; one read, one write), also
  settable as ``ce_fast._engines.cuda.FUSED_KERNEL``. Where the one-read kernel does not
  apply (soft targets, strided rows, rows beyond its registers) the two-pass one runs.
- Logits never leave the device. The host reads one flag after the target check
  (an out-of-range target -> IndexError; skipped under CUDA-graph capture, where such
  rows give NaN) and, with class weights, one after the weight checks (also skipped
  under capture: the weights' values are then not checked); the rules and reductions
  stay on the device (mean and sum are 0-d device arrays), so nothing else waits for
  the device.
- The loss rules of :mod:`ce_fast._rules` run as one generated kernel per rule and
  option set (:func:`apply`, :mod:`ce_fast._engines.cuda_rules`): a forward is the target
  check, the statistics kernel and one rules kernel; loss + gradient adds one kernel
  for the gradient's per-row coefficients.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np

from .._arrays import BF16, F16, F32, F64, Operand, _torch, is_torch, operand
from .._core import kernel_source
from .._errors import index_error
from .._types import Batch, GradCoef, Stats
from .cuda_rules import apply as _apply_rule

KERNEL_NAME = "ce.cu"  # the engine's kernel file: kernels/ce.cu, embedded in _core
KERNELS_DIR_ENV = "CE_FAST_KERNELS_DIR"  # a directory whose .cu files replace the embedded ones

# Extra NVRTC options. The source is C++14 and header-free, so CuPy's defaults do.
OPTIONS: tuple[str, ...] = ()

# Kernel element types by dtype code. f16 / bf16 are 2-byte storage structs of the
# kernel file (no cuda_fp16.h / cuda_bf16.h needed).
LOGIT_TYPES = {F32: "float", F16: "ce_half", BF16: "ce_bf16"}
SOFT_TYPES = {None: "ce_nosoft", F32: "float", F64: "double", F16: "ce_half", BF16: "ce_bf16"}
INT_TYPES = {
    "int8": "signed char",
    "int16": "short",
    "int32": "int",
    "int64": "long long",
    "uint8": "unsigned char",
    "uint16": "unsigned short",
    "uint32": "unsigned int",
    "uint64": "unsigned long long",
}

MAX_GROUP = 512  # threads per row; the kernels are compiled with __launch_bounds__(512)
SMALL_BLOCK = 256  # block size when several rows share a block (G <= 32)
# G is chosen so each thread reads about this many 16-byte vectors of a row. A row's
# reduction costs each of its threads the same whatever G, so fewer, longer-working threads
# spend less of their time on it: on an H200, 8 -> 32 took the bf16 statistics kernel from
# 441 to 304 us at 16384 x 32000 (the read pass: 290 us) and the fused kernel from 1245 to
# 945 us; rows of 128256 classes, at G = 512 either way, did not move.
VECTORS_PER_THREAD = 32
_NO_BAD = np.iinfo(np.uint64).max

# Which kernel writes loss + gradient: "two-pass" (ce_fused: the row read twice, the second
# read meant to hit L2) or "one-read" (ce_fused1 / ce_fused1c: the row kept on chip, one
# read and one write). FUSED_KERNEL, when set, wins over $CE_FAST_FUSED; "two-pass" stays
# the default until the one-read kernels have been measured on hardware
# (benches/gpu_check.sh runs both).
FUSED_ENV = "CE_FAST_FUSED"
FUSED_KINDS = ("two-pass", "one-read")
FUSED_KERNEL: str | None = None
ONE_READ_MIN_BYTES = 32 << 10  # shorter rows: ce_fused (several rows per block) does better


# ---------------------------------------------------------------- kernels


def row_kernel_names(x_code: int, soft_code: int | None, plain: bool = False) -> tuple[str, str]:
    """Name expressions of the statistics and fused kernels for these dtypes; `plain`: the
    variants for the plain call (hard targets, no weight, softcap, logit scale, smoothing
    sums or argmax), compiled apart with only what it needs."""
    tx, ts, pl = LOGIT_TYPES[x_code], SOFT_TYPES[soft_code], "true" if plain else "false"
    return f"ce_stats<{tx}, {ts}, {pl}>", f"ce_fused<{tx}, {ts}, {pl}>"


CLUSTERS = (2, 4, 8)  # blocks per row of the one-read cluster kernels (sm_90+)
# 16-byte vectors of a row each thread of the one-read kernels keeps in registers
# (CE_KEEP_PLAIN / CE_KEEP_FULL: without / with class weights or label smoothing), and
# their block size (__launch_bounds__(256, 1): up to 255 registers a thread).
KEEP = {True: 32, False: 16}
ONE_READ_GROUP = 256


def one_read_kernel_name(x_code: int, cluster: int = 1, plain: bool = True) -> str:
    """Name expression of the one-read fused kernel: a block per row (cluster 1), or a
    thread-block cluster of `cluster` blocks per row (sm_90+); `plain`: no class weights
    and no label smoothing."""
    tx, p = LOGIT_TYPES[x_code], "true" if plain else "false"
    return f"ce_fused1<{tx}, {p}>" if cluster == 1 else f"ce_fused1c<{tx}, {cluster}, {p}>"


def target_kernel_name(dtype_name: str) -> str:
    return f"ce_targets<{INT_TYPES[dtype_name]}>"


READ_PASS = "ce_read_pass"


def scale_kernel_name(x_code: int) -> str:
    return f"ce_scale<{LOGIT_TYPES[x_code]}>"


# The kernels' parameters in order, with their kinds: "p" pointer, "q" int64 (i64),
# "Q" uint64 (u64), "i" int32, "d" double, "f" float. tests/test_kernels_compile.py checks these
# against the signatures in ce.cu, so the launch arguments cannot drift from the source.
_ROW = (
    ("x", "p"),
    ("rows", "q"),
    ("C", "q"),
    ("x_cs", "q"),
    ("x_rs", "q"),
    ("x_tab", "p"),
    ("t", "p"),
    ("t_cs", "q"),
    ("t_rs", "q"),
    ("t_tab", "p"),
    ("target", "p"),
    ("w32", "p"),
)
_STATS_OUT = (
    ("o_mx", "p"),
    ("o_ls", "p"),
    ("o_zy", "p"),
    ("o_swz", "p"),
    ("o_swtz", "p"),
    ("o_swt", "p"),
    ("o_amax", "p"),
)
_ONE_READ = (
    ("x", "p"),
    ("rows", "q"),
    ("C", "q"),
    ("x_rs", "q"),
    ("target", "p"),
    ("w32", "p"),
    ("w64", "p"),
    ("scale", "d"),
    ("cap", "d"),
    ("o_mx", "p"),
    ("o_ls", "p"),
    ("o_zy", "p"),
    ("o_swz", "p"),
    ("out", "p"),
    ("o_rs", "q"),
    ("a0", "p"),
    ("bco", "p"),
    ("gco", "p"),
    ("a_lse", "d"),
    ("dco", "d"),
)
KERNEL_PARAMS = {
    "ce_stats": _ROW + (("scale", "d"), ("cap", "d"), ("G", "i")) + _STATS_OUT,
    "ce_fused": _ROW
    + (("w64", "p"), ("scale", "d"), ("cap", "d"), ("G", "i"))
    + _STATS_OUT
    + (
        ("out", "p"),
        ("o_cs", "q"),
        ("o_rs", "q"),
        ("o_tab", "p"),
        ("a0", "p"),
        ("bco", "p"),
        ("gco", "p"),
        ("a_lse", "d"),
        ("a_swt", "d"),
        ("dco", "d"),
        ("eco", "d"),
        ("given_mx", "p"),
        ("given_ls", "p"),
        ("given_swt", "p"),
    ),
    "ce_fused1": _ONE_READ,
    "ce_fused1c": _ONE_READ,
    "ce_targets": (
        ("t", "p"),
        ("rows", "q"),
        ("t_rs", "q"),
        ("t_tab", "p"),
        ("C", "q"),
        ("ign_s", "q"),
        ("ign_s_ok", "i"),
        ("ign_u", "Q"),
        ("ign_u_ok", "i"),
        ("idx", "p"),
        ("valid", "p"),
        ("bad", "p"),
    ),
    "ce_read_pass": (("p", "p"), ("n16", "q"), ("out", "p")),
    "ce_scale": (("g", "p"), ("n", "q"), ("s", "p")),
}


def modules() -> dict[Any, list[str]]:
    """Every module the engine may build: key -> its name expressions (the NVRTC test
    compiles exactly these)."""
    mods: dict[Any, list[str]] = {}
    for x_code in LOGIT_TYPES:
        for soft_code in SOFT_TYPES:
            mods[(x_code, soft_code)] = list(row_kernel_names(x_code, soft_code))
            if soft_code is None:
                mods[(x_code, soft_code)] += row_kernel_names(x_code, soft_code, plain=True)
    mods["targets"] = [target_kernel_name(n) for n in INT_TYPES] + [READ_PASS]
    mods["targets"] += [scale_kernel_name(c) for c in LOGIT_TYPES]
    plains = (True, False)
    mods["one-read"] = [one_read_kernel_name(c, 1, p) for c in LOGIT_TYPES for p in plains]
    # Thread-block clusters: sm_90+ only (compiled out elsewhere and in the CPU emulator).
    mods["clusters"] = [one_read_kernel_name(c, n, p) for c in LOGIT_TYPES for n in CLUSTERS for p in plains]
    return mods


_source: str | None = None
_lock = threading.Lock()


def load_source(name: str = KERNEL_NAME) -> str:
    """The text of the kernel file `name`: read from $CE_FAST_KERNELS_DIR when that is
    set and not empty, else the copy embedded in ``_core`` at build time (what ships)."""
    folder = os.environ.get(KERNELS_DIR_ENV)
    if folder:
        path = Path(folder) / name
        try:
            return path.read_bytes().decode("utf-8")  # bytes as written, like the embedded copy
        except FileNotFoundError:
            raise FileNotFoundError(f"{KERNELS_DIR_ENV}={folder!r} has no kernel file {name!r} ({path})") from None
    return kernel_source(name)


def source() -> str:
    """The engine's kernel source, loaded once per process (see :func:`load_source`)."""
    global _source
    if _source is None:
        _source = load_source()
    return _source


class KernelFile:
    """The kernels of one kernel file (ce.cu, kl.cu, binary.cu, eval.cu), compiled by NVRTC
    through cupy.RawModule one module at a time (`modules()`: key -> name expressions) on
    first use in the process, then kept. A RawKernel keeps one loaded binary per device
    and compiles (or loads from CuPy's disk cache) for another device on its first launch
    there."""

    def __init__(self, name: str, modules: Any):
        self.name, self.modules = name, modules
        self._modules: dict[Any, Any] = {}
        self._kernels: dict[tuple[Any, str], Any] = {}
        self._lock = threading.Lock()

    def function(self, key: Any, kernel: str) -> Any:
        """The kernel `kernel` (a name expression) of module `key`."""
        ker = self._kernels.get((key, kernel))
        if ker is not None:
            return ker
        with self._lock:
            ker = self._kernels.get((key, kernel))
            if ker is None:
                mod = self._modules.get(key)
                if mod is None:
                    code = source() if self.name == KERNEL_NAME else load_source(self.name)
                    mod = xp().RawModule(code=code, options=OPTIONS, name_expressions=self.modules()[key])
                    self._modules[key] = mod
                ker = self._kernels[(key, kernel)] = mod.get_function(kernel)
            return ker


_kernel_file = KernelFile(KERNEL_NAME, modules)


def _function(key, name: str):
    """The kernel `name` of module `key` of ce.cu (a cupy.RawKernel; see :class:`KernelFile`)."""
    return _kernel_file.function(key, name)


# ---------------------------------------------------------------- devices and streams


def xp():
    cupy = sys.modules.get("cupy")  # imported: called several times per call and allocation
    if cupy is not None and not getattr(getattr(cupy, "__spec__", None), "_initializing", False):
        return cupy  # (a module another thread is still importing goes through the import lock)
    try:
        import cupy
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "these arrays live on a CUDA device; ce_fast's GPU engine needs CuPy "
            "(pip install 'ce_fast[cuda]', or a cupy-cuda* wheel matching your CUDA)"
        ) from exc
    return cupy


def _device_id(op: Operand) -> int:
    return int(op.device.split(":", 1)[1])


# Where CuPy allocates while a call on torch tensors runs: "torch" (default) takes the
# memory from torch's caching allocator, so results handed to torch via DLPack follow
# torch's stream rules (record_stream works) and allocations made while a CUDA graph is
# captured land in the graph's private pool; "cupy" keeps CuPy's own pool.
ALLOCATOR_ENV = "CE_FAST_CUDA_ALLOCATOR"
_torch_alloc: Any = None


def _torch_allocator():
    """A CuPy allocator over torch's caching allocator (on the stream CuPy allocates on)."""
    global _torch_alloc
    if _torch_alloc is None:
        torch = _torch()

        def malloc(size: int, device: int) -> int:
            if size == 0:
                return 0
            stream = xp().cuda.get_current_stream().ptr  # torch's current stream inside scope()
            return int(torch.cuda.caching_allocator_alloc(size, device, stream))

        def free(ptr: int, device: int) -> None:
            if ptr:
                torch.cuda.caching_allocator_delete(ptr)

        _torch_alloc = xp().cuda.memory.PythonFunctionAllocator(malloc, free).malloc
    return _torch_alloc


def torch_stream(device: int) -> Any:
    """torch's current stream on CUDA `device` as a CuPy stream (a context manager that
    makes it CuPy's current stream)."""
    cp = xp()
    stream = _torch().cuda.current_stream(device)
    from_external = getattr(getattr(cp.cuda, "Stream", None), "from_external", None)
    if from_external is not None and hasattr(stream, "__cuda_stream__"):
        try:
            return from_external(stream)  # CuPy 14 deprecates ExternalStream for this protocol
        except (TypeError, ValueError, AttributeError):  # a protocol version it does not read
            pass
    return cp.cuda.ExternalStream(stream.cuda_stream, device)


def from_torch(t: Any) -> Any:
    """A CuPy view of CUDA tensor `t`, exported on torch's current stream. DLPack then asks
    torch for no cross-stream wait: from CuPy's default (legacy) stream that wait is
    illegal while a CUDA graph is being captured."""
    with torch_stream(t.device.index):
        return xp().from_dlpack(t)


@contextlib.contextmanager
def scope(x: Operand):
    """CuPy's current device is the logits' device while the body runs; for torch
    tensors CuPy's current stream is also torch's current stream on that device, and
    CuPy allocates from torch's caching allocator (see ALLOCATOR_ENV)."""
    cp = xp()
    dev = _device_id(x)
    with cp.cuda.Device(dev):
        if x.lib == "torch":
            with torch_stream(dev):
                if os.environ.get(ALLOCATOR_ENV, "torch") == "cupy":
                    yield
                else:
                    with cp.cuda.using_allocator(_torch_allocator()):
                        yield
        else:
            yield


def capturing() -> bool:
    """Whether CuPy's current stream (torch's, inside :func:`scope`) is capturing a CUDA
    graph: then nothing may wait for the device."""
    try:
        return bool(xp().cuda.get_current_stream().is_capturing())
    except Exception:  # pragma: no cover - a CuPy without stream capture
        return False


_props: dict[int, tuple[int, int]] = {}


def _device_info(dev: int) -> tuple[int, int]:
    """(multiprocessors, L2 bytes) of a device."""
    info = _props.get(dev)
    if info is None:
        p = xp().cuda.runtime.getDeviceProperties(dev)
        info = (int(p.get("multiProcessorCount", 108)) or 108, int(p.get("l2CacheSize", 40 << 20)) or (40 << 20))
        _props[dev] = info
    return info


def fused_kind() -> str:
    """The fused kernel in use: FUSED_KERNEL, else $CE_FAST_FUSED, else "two-pass"."""
    kind = FUSED_KERNEL or os.environ.get(FUSED_ENV) or "two-pass"
    if kind not in FUSED_KINDS:
        raise ValueError(f"{FUSED_ENV}={kind!r}: expected one of {FUSED_KINDS}")
    return kind


_majors: dict[int, int] = {}


def _compute_major(dev: int) -> int:
    """The device's compute capability major (9 for Hopper: thread-block clusters)."""
    major = _majors.get(dev)
    if major is None:
        major = _majors[dev] = int(xp().cuda.runtime.getDeviceProperties(dev).get("major", 0))
    return major


# ---------------------------------------------------------------- arguments


def _cupy_array(op: Operand):
    a = op.array
    return a[0] if isinstance(a, tuple) else a


def _ptr(a) -> int:
    """Address of a CuPy array, an int address, or None (null)."""
    if a is None:
        return 0
    if type(a) is int:
        return a
    if isinstance(a, np.integer):
        return int(a)
    ptr = getattr(getattr(a, "data", None), "ptr", None)
    if ptr is not None:  # CuPy
        return int(ptr)
    return int(a.__array_interface__["data"][0])  # host arrays: the tests' CPU emulation


_U64, _I64, _I32, _F64S, _F32S = np.uint64, np.int64, np.int32, np.float64, np.float32  # scalar types


def _p(v: Any) -> Any:
    return _U64(_ptr(v))


def _q(v: Any) -> Any:
    return _I64(v if type(v) is int else int(v))


def _uq(v: Any) -> Any:
    return _U64(v if type(v) is int else int(v))


def _i(v: Any) -> Any:
    return _I32(v if type(v) is int else int(v))


def _d(v: Any) -> Any:
    return _F64S(v if type(v) is float else float(v))


def _f(v: Any) -> Any:
    return _F32S(v if type(v) is float else float(v))


# How each parameter kind becomes a launch argument (the C++ parameter's size and type).
_KINDS = {"p": _p, "q": _q, "Q": _uq, "i": _i, "d": _d, "f": _f}

# Per parameter tuple (the kernels' fixed signatures, by identity): its names and each
# parameter's converter, built once.
_arg_plans: dict[int, tuple[Any, frozenset, tuple]] = {}


def arg_plan(params: Any) -> tuple[frozenset, tuple]:
    """(parameter names, (name, converter) in order) of a parameter list; cached for tuples."""
    plan = _arg_plans.get(id(params))
    if plan is None or plan[0] is not params:
        plan = (params, frozenset(n for n, _ in params), tuple((n, _KINDS[k]) for n, k in params))
        if isinstance(params, tuple) and len(_arg_plans) < 256:
            _arg_plans[id(params)] = plan  # holds `params`, so its id is not reused while cached
    return plan[1], plan[2]


def typed_args(kernel: str, params: Any, values: dict) -> tuple:
    """Launch arguments typed as the C++ parameters `params` ((name, kind) in order; kinds as
    in KERNEL_PARAMS) of `kernel`, from values named as in the kernel file. Pointers take
    CuPy arrays, ints or None. TypeError names missing and unknown arguments."""
    names, convert = arg_plan(params)
    if values.keys() != names:
        missing = [n for n, _ in params if n not in values]
        extra = sorted(set(values) - names)
        raise TypeError(f"{kernel}: missing arguments {missing}, unknown {extra}")
    return tuple([c(values[n]) for n, c in convert])


def kernel_args(kernel: str, **values) -> tuple:
    """The launch arguments of `kernel` (a template's base name in ce.cu), typed as its C++
    parameters, from keyword values named as in ce.cu."""
    return typed_args(kernel, KERNEL_PARAMS[kernel], values)


def _layout(shape, strides) -> tuple[int, Any]:
    """(row stride, row table) of the rows of a batch: row r starts at r * stride when
    the batch dims collapse into one stride, else at table[r] (an int64 device array
    built here; O(rows) memory). Strides in elements."""
    dims = [(int(n), int(s)) for n, s in zip(shape, strides) if n != 1]
    if not dims:
        return 0, None
    expect = dims[-1][1]
    linear = True
    for n, s in reversed(dims):
        if s != expect:
            linear = False
            break
        expect = s * n
    if linear:
        return dims[-1][1], None
    cp = xp()
    rows = int(np.prod([n for n, _ in dims], dtype=np.int64))
    r = cp.arange(rows, dtype=cp.int64)
    off = cp.zeros(rows, dtype=cp.int64)
    for n, s in reversed(dims):
        off += (r % n) * s
        r //= n
    return 0, off


def _one_read_plan(
    rows: int, C: int, itemsize: int, dev: int, x: Operand, out: Operand, x_rs, x_tab, o_rs, o_tab, plain: bool = True
):
    """(blocks per row, threads per block) of the one-read fused kernel, or None where it
    does not apply: rows must be contiguous and the gradient must share the logits' 16-byte
    phase in every row (16-byte loads and stores at the same offsets), and the row must fit
    in the registers of at most max(CLUSTERS) blocks (one block without clusters)."""
    if x.strides[-1] != 1 or out.strides[-1] != 1 or x_tab is not None or o_tab is not None:
        return None
    if (x.ptr - out.ptr) % 16 or ((x_rs - o_rs) * itemsize) % 16 or x.ptr % itemsize:
        return None
    if C * itemsize < ONE_READ_MIN_BYTES:
        return None
    nvec = -(-C // (16 // itemsize))
    if x.ptr % 16 or (x_rs * itemsize) % 16:
        nvec += 1  # a row starting off a 16-byte boundary may need one vector more
    keep = KEEP[plain]
    max_cl = max(CLUSTERS) if _compute_major(dev) >= 9 else 1
    cl = 1
    while cl * ONE_READ_GROUP * keep < nvec:
        cl *= 2
    if cl > max_cl:
        return None
    sms, _ = _device_info(dev)
    while cl < max_cl and rows * cl < sms:  # few rows: spread each over more SMs
        cl *= 2
    G = 64
    while G * cl * keep < nvec and G < ONE_READ_GROUP:
        G *= 2
    return cl, G


def _config(rows: int, C: int, itemsize: int, dev: int, fused: bool, bounded: bool = False) -> tuple[int, int, int]:
    """(threads per row G, block size, grid size) of a row kernel.

    G grows with the row (about VECTORS_PER_THREAD 16-byte vectors per thread, at most
    MAX_GROUP); G <= 32 packs several rows into a block of SMALL_BLOCK threads, G > 32
    is one row per block. Blocks loop over row tiles. The fused kernel reads each row
    twice; its grid is capped so that the rows in flight fit in half the L2 and the
    second read hits the cache; with `bounded` (the one-read mode's fallback, e.g. rows too
    long for one block on sm_80) that cap is not raised to one row per SM. Both kernels take
    the same G, so a row is summed in the same order by either.
    """
    vec = 16 // itemsize
    nvec = -(-C // vec)
    want = -(-nvec // VECTORS_PER_THREAD)
    G = 1
    while G < want and G < MAX_GROUP:
        G *= 2
    if G > 32:
        block, rpb = G, 1
    else:
        block, rpb = SMALL_BLOCK, SMALL_BLOCK // G
    tiles = -(-rows // rpb)
    sms, l2 = _device_info(dev)
    cap = sms * max(1, 2048 // block)
    if fused:
        fit = (l2 // 2) // max(1, C * itemsize * rpb)
        cap = max(1 if bounded else sms, min(cap, fit))
    return G, block, max(1, min(tiles, cap))


# ---------------------------------------------------------------- protocol


def to_float64(op: Operand):
    cp = xp()
    if op.lib == "torch":
        torch = _torch()
        return cp.from_dlpack(op.array.detach().to(torch.float64).contiguous())
    return cp.ascontiguousarray(_cupy_array(op), dtype=cp.float64)


def _element(op: Operand, pos: tuple) -> int:
    if op.lib == "torch":
        return int(op.array[pos].item())
    return int(_cupy_array(op)[pos])


def _read_back(arrays: list) -> list:
    """Host values of small device arrays (uint64 or float64), in one transfer: one sync."""
    cp = xp()
    bits = [a.view(cp.uint64) if a.dtype == cp.float64 else a for a in arrays]
    flat = (bits[0] if len(bits) == 1 else cp.concatenate(bits)).tolist()
    out, at = [], 0
    for a in arrays:
        part = flat[at : at + a.size]
        at += a.size
        out.append(np.array(part, dtype=np.uint64).view(np.float64).tolist() if a.dtype == cp.float64 else part)
    return out


def settle(checks: Any) -> None:
    """Runs pending value checks (device values, raising function) with one read back;
    nothing under CUDA-graph capture (no sync is allowed there)."""
    if not checks or capturing():
        return
    for (_, raise_for), host in zip(checks, _read_back([v for v, _ in checks])):
        raise_for(host)


def index_targets(t: Operand, C: int, ignore_index: int, checked: bool = False, checks: Any = ()):
    """int64 class indices with -1 for ignored rows, and the mask of counted rows.

    One kernel converts any integer dtype and checks the range; an offending row is
    recorded on the device (atomicMin of its flat position) and read back once, together
    with the values of the pending `checks` (see :func:`settle`, settled first): the one
    host sync of a call. Under CUDA-graph capture nothing is read: out-of-range rows get
    index -2 and NaN losses. With `checked` (targets an earlier call checked, e.g. the
    forward of this backward) the target flag is not read either.
    """
    cp = xp()
    n = math.prod(t.shape)
    # One allocation for both (each allocation is a host callback into torch's allocator).
    buf = cp.empty(9 * n, dtype=cp.uint8)
    idx, valid = buf[: 8 * n].view(cp.int64), buf[8 * n :].view(cp.bool_)
    if n == 0:
        settle(checks)
        return idx, valid
    name = INT_TYPES.get(t.dtype_name)
    if name is None:
        raise TypeError(f"target dtype {t.dtype_name} is not supported on the GPU")
    rs, tab = _layout(t.shape, t.strides)
    bad = cp.full(1, _NO_BAD, dtype=cp.uint64)
    ign = int(ignore_index)
    s_ok = -(1 << 63) <= ign < (1 << 63)
    u_ok = 0 <= ign < (1 << 64)
    sms, _ = _device_info(_device_id(t))
    block = 256
    grid = max(1, min(-(-n // block), sms * 8))
    args = kernel_args(
        "ce_targets",
        t=t.ptr,
        rows=n,
        t_rs=rs,
        t_tab=tab,
        C=C,
        ign_s=ign if s_ok else 0,
        ign_s_ok=s_ok,
        ign_u=ign if u_ok else 0,
        ign_u_ok=u_ok,
        idx=idx,
        valid=valid,
        bad=bad,
    )
    _function("targets", target_kernel_name(t.dtype_name))((grid,), (block,), args)
    if checked or capturing():
        # No sync while a CUDA graph is captured: the kernel marked such rows -2, which
        # the row kernels turn into NaN losses (and NaN gradients).
        settle(checks)
        return idx, valid
    host = _read_back([bad] + [v for v, _ in checks])  # the one synchronisation of the checks
    for (_, raise_for), values in zip(checks, host[1:]):
        raise_for(values)
    flat = int(host[0][0])
    if flat != _NO_BAD:
        pos = tuple(int(i) for i in np.unravel_index(flat, t.shape)) if len(t.shape) else ()
        raise index_error(pos, _element(t, pos), C, ignore_index)
    return idx, valid


def run(
    b: Batch,
    *,
    scale: float,
    softcap: float,
    want_wz: bool,
    grad: GradCoef | None = None,
    out: Operand | None = None,
    given: Stats | None = None,
    argmax: Any = None,
) -> Stats:
    """Per-row statistics of the batch; with `grad`, the gradient is written into `out`.

    The statistics are those of ce_fast._rules.Stats: mx and ls (lse = mx + ls), zy,
    swz = sum w (z - mx), and for soft targets swt = sum w t, swtz = sum w t (z - mx).
    With `given` (mx, ls, and swt for soft targets, from an earlier call) only the
    gradient pass runs and `given` is returned. `argmax`, an int64 CuPy array of one entry per
    row, receives each row's argmax of the transformed logits (numpy.argmax rules: first
    NaN, else first maximum); it is ignored with `given`.
    """
    cp = xp()
    f64 = cp.float64
    x = b.x
    rows, C = b.rows, b.classes
    if given is not None and grad is None:
        raise ValueError("given statistics need a gradient")
    if grad is not None and out is None:
        raise ValueError("a gradient needs an out operand")
    if given is None:
        # The statistics are rows of one float64 array: one allocation.
        fields = ["mx", "ls"] + ["zy"] * (b.target is not None) + ["swz"] * want_wz
        fields += ["swtz", "swt"] * (b.soft is not None)
        buf = cp.empty((len(fields), rows), dtype=f64)
        s = Stats(mx=None, ls=None)
        for i, name in enumerate(fields):
            setattr(s, name, buf[i])
    else:
        s = given
    if rows == 0:
        return s

    if x.code not in LOGIT_TYPES:
        raise TypeError(f"logits dtype {x.dtype_name} is not supported on the GPU")
    dev = _device_id(x)
    soft = b.soft
    itemsize = 4 if x.code == F32 else 2
    one_read = grad is not None and fused_kind() == "one-read"
    G, block, grid = _config(rows, C, itemsize, dev, fused=grad is not None, bounded=one_read)
    x_rs, x_tab = _layout(x.batch_shape, x.strides[:-1])
    if soft is not None:
        t_rs, t_tab = _layout(soft.batch_shape, soft.strides[:-1])
        t_ptr, t_cs = soft.ptr, soft.strides[-1]
    else:
        t_rs, t_tab, t_ptr, t_cs = 0, None, 0, 0
    target = None if b.target is None else cp.ascontiguousarray(b.target, dtype=cp.int64)
    w64 = None if b.weight is None else cp.ascontiguousarray(b.weight, dtype=f64)
    w32 = None if w64 is None else w64.astype(cp.float32)
    if argmax is not None and (argmax.dtype != cp.int64 or argmax.size != rows or not argmax.flags.c_contiguous):
        raise ValueError(f"argmax must be a C-contiguous int64 CuPy array of {rows} entries")
    names = ("o_mx", "o_ls", "o_zy", "o_swz", "o_swtz", "o_swt", "o_amax")
    outs = (None,) * 7 if given is not None else (s.mx, s.ls, s.zy, s.swz, s.swtz, s.swt, argmax)
    kw = dict(zip(names, outs))
    kw.update(
        x=x.ptr,
        rows=rows,
        C=C,
        x_cs=x.strides[-1],
        x_rs=x_rs,
        x_tab=x_tab,
        t=t_ptr,
        t_cs=t_cs,
        t_rs=t_rs,
        t_tab=t_tab,
        target=target,
        w32=w32,
        scale=scale,
        cap=softcap,
        G=G,
    )
    key = (x.code, None if soft is None else soft.code)
    plain_row = soft is None and w32 is None and not want_wz and argmax is None and scale == 1.0 and not softcap > 0
    stats_kernel, fused_kernel = row_kernel_names(*key, plain=plain_row)
    if grad is None:
        _function(key, stats_kernel)((grid,), (block,), kernel_args("ce_stats", **kw))
        return s

    def vec(a):
        if isinstance(a, cp.ndarray) and a.dtype == f64 and a.shape == (rows,) and a.flags.c_contiguous:
            return a  # the rules' per-row outputs already are
        return cp.ascontiguousarray(cp.broadcast_to(cp.asarray(a, dtype=f64), (rows,)))

    assert out is not None  # checked above
    o_rs, o_tab = _layout(out.batch_shape, out.strides[:-1])
    plan = None
    plain = b.weight is None and not want_wz
    if one_read and given is None and soft is None and argmax is None:
        plan = _one_read_plan(rows, C, itemsize, dev, x, out, x_rs, x_tab, o_rs, o_tab, plain)
    if plan is not None:
        cl, threads = plan
        base = "ce_fused1" if cl == 1 else "ce_fused1c"
        args = kernel_args(
            base,
            x=x.ptr,
            rows=rows,
            C=C,
            x_rs=x_rs,
            target=target,
            w32=w32,
            w64=w64,
            scale=scale,
            cap=softcap,
            o_mx=s.mx,
            o_ls=s.ls,
            o_zy=s.zy,
            o_swz=s.swz,
            out=out.ptr,
            o_rs=o_rs,
            a0=vec(grad.a0),
            bco=vec(grad.b),
            gco=vec(grad.g),
            a_lse=grad.a_lse,
            dco=grad.d,
        )
        name = one_read_kernel_name(x.code, cl, plain)
        _function("one-read" if cl == 1 else "clusters", name)((rows * cl,), (threads,), args)
        return s
    kw.update(
        w64=w64,
        out=out.ptr,
        o_cs=out.strides[-1],
        o_rs=o_rs,
        o_tab=o_tab,
        a0=vec(grad.a0),
        bco=vec(grad.b),
        gco=vec(grad.g),
        a_lse=grad.a_lse,
        a_swt=grad.a_swt,
        dco=grad.d,
        eco=grad.e,
        given_mx=None if given is None else vec(given.mx),
        given_ls=None if given is None else vec(given.ls),
        given_swt=None if given is None or given.swt is None else vec(given.swt),
    )
    _function(key, fused_kernel)((grid,), (block,), kernel_args("ce_fused", **kw))
    return s


def read_pass(a) -> Any:
    """Reads every byte of a C-contiguous, 16-byte aligned CUDA array once (the
    bandwidth yardstick of the benchmarks). Returns a 1-element uint32 CuPy array
    holding an xor checksum; nothing is synchronised."""
    op = operand(a, "array")
    if not op.is_cuda:
        raise ValueError("read_pass needs a CUDA array")
    item = {F32: 4, F64: 8, F16: 2, BF16: 2}[op.code] if op.code is not None else np.dtype(op.dtype_name).itemsize
    n = int(np.prod(op.shape, dtype=np.int64)) * item
    if op.ptr % 16 or n % 16:
        raise ValueError("read_pass needs a 16-byte aligned array whose size is a multiple of 16 bytes")
    cp = xp()
    with scope(op):
        acc = cp.zeros(1, dtype=cp.uint32)
        sms, _ = _device_info(_device_id(op))
        n16 = n // 16
        block = 512
        grid = max(1, min(-(-n16 // block), sms * 4))
        _function("targets", READ_PASS)((grid,), (block,), kernel_args("ce_read_pass", p=op.ptr, n16=n16, out=acc))
    return acc


def scale_inplace(g: Any, s: Any) -> bool:
    """``g *= s`` in place for a C-contiguous CUDA gradient `g` (float32, float16 or
    bfloat16) and a 0-d float32 `s` on its device, as one launch on the current stream
    that leaves `g` untouched when s == 1 (no pass over it, no host sync). False, with
    nothing done, where it does not apply (the caller multiplies)."""
    op, so = operand(g, "gradient"), operand(s, "grad")
    if not (op.is_cuda and so.is_cuda) or op.code not in LOGIT_TYPES or so.code != F32 or so.shape != ():
        return False
    if _device_id(op) != _device_id(so) or not _dense(op):
        return False
    n = int(np.prod(op.shape, dtype=np.int64))
    if n == 0:
        return True
    with scope(op):
        sms, _ = _device_info(_device_id(op))
        block = 256
        grid = max(1, min(-(-n // block), sms * 8))
        args = kernel_args("ce_scale", g=op.ptr, n=n, s=so.ptr)
        _function("targets", scale_kernel_name(op.code))((grid,), (block,), args)
    return True


def _dense(op: Operand) -> bool:
    """C-contiguous: every element once, in order."""
    expect = 1
    for n, st in reversed(list(zip(op.shape, op.strides))):
        if n != 1 and st != expect:
            return False
        expect *= n
    return True


def wrap(value, like: Operand):
    """A CuPy result as the library of `like`: CuPy, or a torch tensor sharing its memory."""
    if like.lib == "torch":
        return _torch().from_dlpack(value)
    return value


def copy_into(o: Operand, value) -> None:
    if o.lib == "torch":
        o.array.copy_(_torch().from_dlpack(value))
    else:
        xp().copyto(_cupy_array(o), value, casting="same_kind")


def empty_like(x: Operand):
    """A C-contiguous array of the logits' shape, dtype, library and device."""
    if x.lib == "torch":
        t = x.array
        return _torch().empty(x.shape, dtype=t.dtype, device=t.device)
    cp = xp()
    with cp.cuda.Device(_device_id(x)):
        return cp.empty(x.shape, dtype=_cupy_array(x).dtype)


def writable(o: Operand) -> bool:
    return True


def grad_output(value: Any, x: Operand):
    """A real grad_output (checked by the batch builder: a host scalar, or an array on the
    logits' device) as float64: a NumPy 0-d array or a CuPy array."""
    cp = xp()
    if is_torch(value):
        if value.device.type != "cuda":
            return np.asarray(value.item(), dtype=np.float64)
        torch = _torch()
        return cp.from_dlpack(value.detach().to(torch.float64).contiguous())
    if isinstance(value, cp.ndarray) or hasattr(value, "__cuda_array_interface__"):
        return cp.asarray(value).astype(cp.float64)
    return np.asarray(value, dtype=np.float64)


# ---------------------------------------------------------------- the loss rules

# Options of the generated rule kernels: no fused multiply-add contraction, so each
# operation rounds as NumPy's does and the CPU and GPU engines agree to the bit per row.
RULE_OPTIONS: tuple[str, ...] = ("--fmad=false",)
_rule_kernels: dict[str, Any] = {}


def _generated(program: Any) -> Any:
    """The kernel of a generated program (ce_fast._symbolic.Program), compiled by NVRTC on
    first use in the process (CuPy's disk cache keeps it across processes)."""
    ker = _rule_kernels.get(program.name)
    if ker is None:
        with _lock:
            ker = _rule_kernels.get(program.name)
            if ker is None:
                mod = xp().RawModule(code=program.source, options=OPTIONS + RULE_OPTIONS)
                ker = _rule_kernels[program.name] = mod.get_function(program.name)
    return ker


def apply(rule: Any, b: Batch, *args: Any, **options: Any) -> Any:
    """``rule(b, *args, **options)`` for a rule of ce_fast._rules, as one generated kernel
    on the batch's device (see :mod:`ce_fast._engines.cuda_rules`)."""
    return _apply_rule(sys.modules[__name__], rule, b, *args, **options)
