"""The CUDA backend of ``ce-fast bench`` (``--device cuda``), imported only when asked for
(``ce_fast.bench`` itself never imports it).

Per logits shape and dtype (default 16384 x {32000, 128256, 262144}, float32 and bfloat16)
it times, with CUDA events on the current stream (median of ``--repeat`` runs after
``--warmup`` runs):

yardsticks
    ``read pass``: ``ce_fast._engines.cuda.read_pass`` (one 16-byte-load read of the array);
    ``copy``: ``Tensor.copy_`` (torch arrays) or ``cupy.copyto`` into a second buffer,
    counted as read + write bytes.
``fwd``
    ``ce_fast.cross_entropy(x, y)`` (mean: target check, statistics kernel, reduction),
    GB/s of the logits read once and its share of the read pass; against
    ``F.cross_entropy`` eager (under ``no_grad``) and ``torch.compile``-d.
``fwd+bwd`` / ``fwd+bwd in-place``
    ``ce_fast.cross_entropy_and_grad(x, y)`` into a fresh gradient, and with ``out=``
    the logits (a working copy restored before every run, stream-ordered before the
    start event, so untimed); GB/s of one read and one write of the logits and the
    share of the copy; against ``F.cross_entropy`` + ``torch.autograd.grad`` eager and
    ``torch.compile``-d.

A measurement that runs out of device memory reads ``OOM``; a ``torch.compile`` that
fails reads ``n/a`` with the reason in the notes; neither stops the run. A 64-row
check of ce_fast's losses and gradient against a float64 NumPy reference is run per
case (untimed).

Inputs are generated on the device (torch's or CuPy's generator, seeded), never on
the host. With PyTorch (CUDA build) installed the arrays are torch tensors, which is
the only way to bench bfloat16 (CuPy has no bfloat16); ``--arrays cupy`` benches
CuPy arrays (the torch baselines then see them through DLPack).

Everything that needs CuPy or torch is imported lazily, so this module (the table
and the default sizes included) imports on machines without a GPU.
"""

from __future__ import annotations

import functools
import gc
import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from .base import DeviceUnavailable, first_loss, new_case, ratio, rel_diff, say
from .config import GPU_DEFAULT_SIZES, LOSS_RTOL_TORCH, Config, Shape, format_size, parse_sizes
from .report import COPY, NOT_RUN, OP, READ, Column, Layout, Row, op_cell
from .timing import MemoryProbe, Timer

ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
CHECK_ROWS = 64
# The 64-row check: per-row loss error relative to 1 + |loss|, and max |gradient error|
# relative to max |gradient| (the gradient is rounded to the logits' dtype).
CHECK_LOSS_TOL = 1e-5
CHECK_GRAD_TOL = {"float32": 1e-4, "bfloat16": 1e-2, "float16": 2e-3}
_INPUT_CHUNK_BYTES = 1 << 28  # float32 temporaries of the input generator


class UnsupportedCase(Exception):
    """A shape / dtype this array library cannot bench (reported, not fatal)."""


# ---------------------------------------------------------------------------
# defaults and availability


def default_sizes() -> list[Shape]:
    """The sizes ``--device cuda`` benches by default (:data:`GPU_DEFAULT_SIZES`)."""
    return parse_sizes(GPU_DEFAULT_SIZES)


def probe(arrays: str | None = None) -> tuple[str, Any, Any]:
    """(array library, cupy, torch-or-None) for a CUDA bench, or DeviceUnavailable with
    a message saying what is missing. ``torch`` is returned only for a CUDA build that
    sees a device."""
    what = "ce-fast bench --device cuda needs CuPy (the GPU engine) and a CUDA device"
    try:
        import cupy
    except ImportError:
        raise DeviceUnavailable(
            f"{what}: CuPy is not installed (pip install 'ce_fast[cuda]' for CUDA 13, "
            "'ce_fast[cuda12]' for CUDA 12); use --device cpu"
        ) from None
    except Exception as exc:  # a broken CUDA installation can fail inside the import
        raise DeviceUnavailable(f"{what}: importing CuPy failed: {type(exc).__name__}: {exc}") from None
    try:
        n = int(cupy.cuda.runtime.getDeviceCount())
    except Exception as exc:  # no driver, no device
        raise DeviceUnavailable(f"{what}: no usable CUDA device ({type(exc).__name__}: {exc})") from None
    if n < 1:
        raise DeviceUnavailable(f"{what}: no CUDA device found")
    torch = None
    try:
        import torch as _torch

        if _torch.cuda.is_available():
            torch = _torch
    except ImportError:
        pass
    if arrays == "torch" and torch is None:
        raise DeviceUnavailable("--arrays torch needs PyTorch built with CUDA that sees the device")
    lib = arrays or ("torch" if torch is not None else "cupy")
    return lib, cupy, torch


def is_oom(exc: BaseException, torch: Any = None, cupy: Any = None) -> bool:
    """Whether ``exc`` is a device out-of-memory error (torch's, CuPy's, or a CUDA
    runtime error saying so)."""
    t_oom = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None) if torch is not None else None
    if t_oom is not None and isinstance(exc, t_oom):
        return True
    c_oom = None
    if cupy is not None:
        c_oom = getattr(getattr(getattr(cupy, "cuda", None), "memory", None), "OutOfMemoryError", None)
    if c_oom is not None and isinstance(exc, c_oom):
        return True
    return isinstance(exc, (MemoryError, RuntimeError)) and "out of memory" in str(exc).lower()


def _reason(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    text = lines[0] if lines else ""
    if len(text) > 200:
        text = text[:197] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _version(v: Any) -> str | None:
    """12040 -> '12.4' (CUDA's encoding of versions)."""
    try:
        v = int(v)
    except (TypeError, ValueError):
        return None
    return f"{v // 1000}.{(v % 1000) // 10}"


# ---------------------------------------------------------------------------
# timing and device memory


class EventTimer(Timer):
    """Times callables with CUDA events: an event recorded on the current stream
    before and after each call, the end event waited for, elapsed time read off the
    pair. Only the single measurement differs from :class:`ce_fast.bench.Timer`.

    ``events`` gives ``event_pair()`` (two objects with ``record()`` and
    ``synchronize()``), ``elapsed_ms(start, end)`` and ``sync()``. ``setup`` runs
    before the start event is recorded: work it enqueues on the same stream finishes
    before the clock starts and is not timed. Host work inside ``fn`` (e.g. reading a
    flag back) is inside the interval. The first call is the peak-memory one; it is a
    timed sample only with ``warmup=0``.
    """

    def __init__(self, events: Any, memory: Any):
        super().__init__(events.sync, memory)
        self.events = events

    def _once(self, fn: Callable[[], Any], setup: Callable[[], None] | None) -> tuple[float, Any]:
        if setup is not None:
            setup()
        start, end = self.events.event_pair()
        start.record()
        out = fn()
        end.record()
        end.synchronize()
        return float(self.events.elapsed_ms(start, end)) * 1e-3, out


def _cupy_peak_hook(cupy: Any) -> Any:
    """A CuPy MemoryHook tracking the bytes taken from the memory pool while it is
    registered (current and peak; frees of earlier allocations are ignored)."""

    class _PeakHook(cupy.cuda.MemoryHook):
        name = "ce_fast.bench.peak"

        def __init__(self) -> None:
            self.live: dict[int, int] = {}
            self.cur = 0
            self.peak = 0

        def malloc_postprocess(self, **kw):
            ptr = int(kw.get("mem_ptr") or 0)
            if ptr:
                size = int(kw.get("mem_size") or 0)
                self.live[ptr] = size
                self.cur += size
                self.peak = max(self.peak, self.cur)

        def free_postprocess(self, **kw):
            size = self.live.pop(int(kw.get("mem_ptr") or 0), None)
            if size is not None:
                self.cur -= size

    return _PeakHook()


class DeviceMemory:
    """Peak device-memory growth of a call: torch's caching allocator
    (``max_memory_allocated`` after ``reset_peak_memory_stats``, over the allocated
    bytes before) plus the peak of CuPy's memory pool (a MemoryHook registered for the
    call). The sum bounds the combined peak from above (the two peaks need not
    coincide); memory taken outside both allocators does not show."""

    method = "cuda"

    def __init__(self, torch: Any = None, cupy: Any = None, device_index: int = 0):
        self.torch, self.cupy, self.index = torch, cupy, device_index
        self._t_base = 0
        self._hook = None

    @property
    def description(self) -> str:
        parts = []
        if self.torch is not None:
            parts.append("torch.cuda.max_memory_allocated growth")
        if self.cupy is not None:
            parts.append("CuPy memory-pool peak (MemoryHook)")
        return " + ".join(parts) + " during the first call" if parts else "not measured"

    def _stop_hook(self) -> None:
        if self._hook is not None:
            try:
                self._hook.__exit__(None, None, None)
            except Exception:
                pass

    def reset(self) -> None:
        if self.torch is not None:
            try:
                self.torch.cuda.reset_peak_memory_stats(self.index)
                self._t_base = int(self.torch.cuda.memory_allocated(self.index))
            except Exception:
                self.torch = None
        self._stop_hook()
        self._hook = None
        if self.cupy is not None:
            try:
                hook = _cupy_peak_hook(self.cupy)
                hook.__enter__()
                self._hook = hook
            except Exception:
                self.cupy = None

    def peak_growth(self) -> int | None:
        total: int | None = None
        if self.torch is not None:
            try:
                total = max(0, int(self.torch.cuda.max_memory_allocated(self.index)) - self._t_base)
            except Exception:
                pass
        if self._hook is not None:
            self._stop_hook()
            total = (total or 0) + int(self._hook.peak)
            self._hook = None
        return total


# ---------------------------------------------------------------------------
# array libraries


def _rows_classes(shape: Sequence[int]) -> tuple[int, int]:
    return int(np.prod(shape[:-1], dtype=np.int64)), int(shape[-1])


def _chunk_rows(C: int) -> int:
    return max(1, _INPUT_CHUNK_BYTES // (4 * C))


class DeviceArrays(Protocol):
    """The array library a CUDA bench runs on (:class:`TorchArrays`, :class:`CupyArrays`):
    how inputs are made, copied, viewed and brought back, and its events and memory."""

    lib: str  # "torch" or "cupy"

    @property
    def copy_what(self) -> str:
        """What the copy yardstick is, for the report."""
        ...

    def make_inputs(self, shape: Sequence[int], dtype: str, seed: int) -> tuple[Any, Any]:
        """Normal logits (std 2) of ``shape`` and ``dtype`` and uniform int64 targets, on the device."""
        ...

    def as_torch(self, a: Any) -> Any:
        """``a`` as a torch tensor sharing its memory (``None`` without a CUDA torch)."""
        ...

    def rows2d(self, a: Any, C: int) -> Any:
        """``a`` viewed as (rows, C)."""
        ...

    def flat(self, a: Any) -> Any:
        """``a`` viewed as one dimension."""
        ...

    def empty_like(self, a: Any) -> Any:
        """A new uninitialised array like ``a``."""
        ...

    def copy(self, dst: Any, src: Any) -> None:
        """Copies ``src`` into ``dst`` on the current stream."""
        ...

    def to_host64(self, a: Any) -> np.ndarray:
        """``a`` as a float64 NumPy array."""
        ...

    def to_host(self, a: Any) -> np.ndarray:
        """``a`` as a NumPy array."""
        ...

    def event_pair(self) -> tuple[Any, Any]:
        """Two timing events (``record()``, ``synchronize()``) on the current stream."""
        ...

    def elapsed_ms(self, start: Any, end: Any) -> float:
        """Milliseconds between two recorded events."""
        ...

    def sync(self) -> None:
        """Waits for the device."""
        ...

    def free(self) -> None:
        """Collects garbage and returns the allocators' cached blocks to the device."""
        ...

    def is_oom(self, exc: BaseException) -> bool:
        """Whether ``exc`` is this library's out-of-device-memory error."""
        ...


class TorchArrays:
    """:class:`DeviceArrays` as torch tensors on ``device``; events on torch's current
    stream (which is also the stream ce_fast runs on for torch tensors)."""

    lib = "torch"

    def __init__(self, torch: Any, device: Any, cupy: Any = None):
        self.torch, self.device, self.cupy = torch, device, cupy

    @property
    def copy_what(self) -> str:
        return "torch Tensor.copy_ into a second buffer"

    def make_inputs(self, shape: Sequence[int], dtype: str, seed: int) -> tuple[Any, Any]:
        """Normal logits (std 2), made in float32 row blocks and cast; uniform targets."""
        torch = self.torch
        rows, C = _rows_classes(shape)
        x = torch.empty(tuple(shape), dtype=getattr(torch, dtype), device=self.device)
        x2 = x.view(rows, C)
        g = torch.Generator(device=self.device)
        g.manual_seed(int(seed))
        step = _chunk_rows(C)
        for r in range(0, rows, step):
            k = min(step, rows - r)
            blk = torch.randn(k, C, generator=g, device=self.device, dtype=torch.float32)
            x2[r : r + k].copy_(blk.mul_(2.0))
            del blk
        y = torch.randint(0, C, tuple(shape[:-1]), generator=g, device=self.device, dtype=torch.int64)
        return x, y

    def as_torch(self, a: Any) -> Any:
        return a

    def rows2d(self, a: Any, C: int) -> Any:
        return a.reshape(-1, C)

    def flat(self, a: Any) -> Any:
        return a.reshape(-1)

    def empty_like(self, a: Any) -> Any:
        return self.torch.empty_like(a)

    def copy(self, dst: Any, src: Any) -> None:
        dst.copy_(src)

    def to_host64(self, a: Any) -> np.ndarray:
        return a.detach().to(self.torch.float64).cpu().numpy()

    def to_host(self, a: Any) -> np.ndarray:
        return a.detach().cpu().numpy()

    def event_pair(self) -> tuple[Any, Any]:
        ev = self.torch.cuda.Event
        return ev(enable_timing=True), ev(enable_timing=True)

    def elapsed_ms(self, start: Any, end: Any) -> float:
        return start.elapsed_time(end)

    def sync(self) -> None:
        self.torch.cuda.synchronize(self.device)

    def free(self) -> None:
        gc.collect()
        try:
            self.torch.cuda.synchronize(self.device)
            self.torch.cuda.empty_cache()
        except Exception:
            pass
        if self.cupy is not None:
            try:
                self.cupy.get_default_memory_pool().free_all_blocks()
            except Exception:
                pass

    def is_oom(self, exc: BaseException) -> bool:
        return is_oom(exc, self.torch, self.cupy)


class CupyArrays:
    """:class:`DeviceArrays` as CuPy arrays on the current device; events on CuPy's current stream
    (the stream ce_fast runs on for CuPy arrays). The torch baselines, when torch is
    there, see the same memory through DLPack (torch's default stream is also the
    legacy default stream)."""

    lib = "cupy"

    def __init__(self, cupy: Any, torch: Any = None):
        self.cp, self.torch = cupy, torch

    @property
    def copy_what(self) -> str:
        return "cupy.copyto into a second buffer"

    def _dtype(self, dtype: str) -> np.dtype:
        if dtype != "bfloat16":
            return np.dtype(dtype)
        import ml_dtypes

        dt = np.dtype(ml_dtypes.bfloat16)
        try:
            self.cp.empty(1, dtype=dt)
        except Exception:
            raise UnsupportedCase("this CuPy has no bfloat16: bench it as torch tensors (--arrays torch)") from None
        return dt

    def make_inputs(self, shape: Sequence[int], dtype: str, seed: int) -> tuple[Any, Any]:
        cp = self.cp
        dt = self._dtype(dtype)
        rows, C = _rows_classes(shape)
        x = cp.empty(tuple(shape), dtype=dt)
        x2 = x.reshape(rows, C)
        rs = cp.random.RandomState(int(seed))
        step = _chunk_rows(C)
        for r in range(0, rows, step):
            k = min(step, rows - r)
            blk = rs.standard_normal((k, C), dtype=cp.float32)
            blk *= 2.0
            x2[r : r + k] = blk.astype(dt)
            del blk
        y = rs.randint(0, C, size=tuple(shape[:-1])).astype(cp.int64)
        return x, y

    def as_torch(self, a: Any) -> Any:
        return None if self.torch is None else self.torch.from_dlpack(a)

    def rows2d(self, a: Any, C: int) -> Any:
        return a.reshape(-1, C)

    def flat(self, a: Any) -> Any:
        return a.reshape(-1)

    def empty_like(self, a: Any) -> Any:
        return self.cp.empty_like(a)

    def copy(self, dst: Any, src: Any) -> None:
        self.cp.copyto(dst, src)

    def to_host64(self, a: Any) -> np.ndarray:
        return self.cp.asnumpy(a.astype(self.cp.float64))

    def to_host(self, a: Any) -> np.ndarray:
        return self.cp.asnumpy(a)

    def event_pair(self) -> tuple[Any, Any]:
        stream = self.cp.cuda.get_current_stream()

        class _Ev:
            def __init__(self, cp: Any):
                self.e = cp.cuda.Event()

            def record(self) -> None:
                self.e.record(stream)

            def synchronize(self) -> None:
                self.e.synchronize()

        return _Ev(self.cp), _Ev(self.cp)

    def elapsed_ms(self, start: Any, end: Any) -> float:
        return self.cp.cuda.get_elapsed_time(start.e, end.e)

    def sync(self) -> None:
        self.cp.cuda.Device().synchronize()  # CuPy's stream and torch's (baselines) alike

    def free(self) -> None:
        gc.collect()
        try:
            self.cp.cuda.Device().synchronize()
            self.cp.get_default_memory_pool().free_all_blocks()
        except Exception:
            pass
        if self.torch is not None:
            try:
                self.torch.cuda.empty_cache()
            except Exception:
                pass

    def is_oom(self, exc: BaseException) -> bool:
        return is_oom(exc, self.torch, self.cp)


def torch_ce(torch: Any) -> Callable:
    """What torch.compile compiles: the mean cross-entropy of (N, C) logits."""
    F = torch.nn.functional

    def cross_entropy(x: Any, y: Any) -> Any:
        return F.cross_entropy(x, y)

    return cross_entropy


def reference_check(
    z: np.ndarray, y: np.ndarray, total_rows: int, loss_rows: np.ndarray, grad: np.ndarray, dtype: str
) -> dict:
    """ce_fast's per-row losses and its gradient of sum(loss) / total_rows on a few rows
    against float64 NumPy on the same (rounded) logits."""
    z = np.asarray(z, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64).reshape(-1)
    r = np.arange(z.shape[0])
    m = z.max(-1, keepdims=True)
    e = np.exp(z - m)
    s = e.sum(-1, keepdims=True)
    ref_loss = m[:, 0] + np.log(s[:, 0]) - z[r, y]
    ref_grad = e / s / total_rows
    ref_grad[r, y] -= 1.0 / total_rows
    loss_err = float(np.max(np.abs(np.asarray(loss_rows, np.float64) - ref_loss) / (1.0 + np.abs(ref_loss))))
    scale = float(np.max(np.abs(ref_grad))) or 1.0
    grad_err = float(np.max(np.abs(np.asarray(grad, np.float64) - ref_grad))) / scale
    gtol = CHECK_GRAD_TOL.get(dtype, 1e-2)
    return {
        "rows": int(z.shape[0]),
        "loss_max_err": loss_err,
        "loss_tol": CHECK_LOSS_TOL,
        "grad_max_rel_err": grad_err,
        "grad_tol": gtol,
        "ok": bool(loss_err <= CHECK_LOSS_TOL and grad_err <= gtol),
    }


# ---------------------------------------------------------------------------
# the backend


class CudaBackend:
    """``ce-fast bench --device cuda``: inputs on the device, CUDA-event timing, read-pass
    and copy yardsticks, torch eager and torch.compile baselines (see the module doc).
    Raises :class:`~ce_fast.bench.DeviceUnavailable` without CuPy or a CUDA device."""

    name = "cuda"

    def __init__(self, threads: int | None = None, arrays: str | None = None):
        lib, cupy, torch = probe(arrays)
        import ce_fast

        from .._engines import cuda as _cuda

        self.ce = ce_fast
        self._cuda = _cuda
        self.threads = threads
        self.cupy = cupy
        self.torch = torch  # a CUDA-capable torch, or None
        if lib == "torch":
            self.device_index = int(torch.cuda.current_device())
            self.arrays: DeviceArrays = TorchArrays(torch, torch.device("cuda", self.device_index), cupy)
        else:
            self.device_index = int(cupy.cuda.Device().id)
            self.arrays = CupyArrays(cupy, torch)
        self.memory: MemoryProbe = DeviceMemory(torch, cupy, self.device_index)
        self.timer: Timer = EventTimer(self.arrays, self.memory)

    @classmethod
    def from_config(cls, cfg: Config) -> CudaBackend:
        """The backend ``cfg`` asks for (``cfg.arrays`` picks torch or CuPy inputs)."""
        return cls(cfg.threads, arrays=cfg.arrays)

    def sync(self) -> None:
        """Waits for the device."""
        self.arrays.sync()

    def device_name(self) -> str:
        """The GPU's name."""
        if self.torch is not None:
            return str(self.torch.cuda.get_device_name(self.device_index))
        name = self.cupy.cuda.runtime.getDeviceProperties(self.device_index).get("name", b"?")
        return name.decode() if isinstance(name, bytes) else str(name)

    def info(self) -> dict:
        """The GPU, CUDA versions, array library and how time and memory are measured."""
        cp = self.cupy
        d: dict[str, Any] = {"device": f"cuda:{self.device_index}"}
        try:
            d["gpu"] = self.device_name()
        except Exception:
            d["gpu"] = None
        try:
            p = cp.cuda.runtime.getDeviceProperties(self.device_index)
            d["gpu_memory_bytes"] = int(p.get("totalGlobalMem", 0)) or None
            d["compute_capability"] = f"{p.get('major')}.{p.get('minor')}"
            d["multiprocessors"] = int(p.get("multiProcessorCount", 0)) or None
        except Exception:
            pass
        for key, fn in (("cuda_driver", "driverGetVersion"), ("cuda_runtime", "runtimeGetVersion")):
            try:
                d[key] = _version(getattr(cp.cuda.runtime, fn)())
            except Exception:
                pass
        d["cupy"] = getattr(cp, "__version__", None)
        if self.torch is not None:
            d["torch_cuda"] = getattr(self.torch.version, "cuda", None)
        d["arrays"] = self.arrays.lib
        d["timing"] = "CUDA events on the current stream; median of the runs"
        d["peak_memory_method"] = self.memory.description
        return d

    def read_pass(self, a: Any) -> Callable[[], Any]:
        """A call that reads every byte of the device array ``a`` once."""
        return functools.partial(self._cuda.read_pass, a)

    @property
    def read_what(self) -> str:
        """What :meth:`read_pass` is, for the report."""
        return "ce_fast._engines.cuda.read_pass, 16-byte loads"

    def compile(self, fn: Callable, torch: Any) -> Callable:
        """torch.compile of ``fn`` with a fresh dynamo cache (so the per-shape graphs of
        earlier cases do not hit the recompile limit), static shapes."""
        try:
            torch._dynamo.reset()
        except Exception:
            pass
        return torch.compile(fn, dynamic=False)

    def bench_case(self, shape: Shape, dtype: str, cfg: Config, torch_mod: Any, quiet: bool) -> dict:
        """Times the yardsticks and ``cfg.ops`` on device logits of ``shape`` and ``dtype``."""
        return _CudaCase(self, shape, dtype, cfg, torch_mod, quiet).run()


def _oom(n_bytes: int, what: str) -> dict:
    return {"error": "out of memory", "oom": True, "bytes": n_bytes, "what": what}


def _no_grad_call(torch: Any, fn: Callable, *args: Any) -> Any:
    with torch.no_grad():
        return fn(*args)


def _loss_and_grad(torch: Any, loss_fn: Callable, leaf: Any, yt: Any) -> Any:
    """The torch fwd+bwd baseline: the mean loss and its gradient w.r.t. the logits
    (dropped at once); returns the detached loss."""
    loss = loss_fn(leaf, yt)
    (g,) = torch.autograd.grad(loss, leaf)
    del g
    return loss.detach()


class _CudaCase:
    """One shape and dtype on the device. The device arrays are attributes of this
    object (bound into each timed call as arguments) and dropped by :meth:`release`
    before the allocator caches are emptied."""

    def __init__(self, backend: CudaBackend, shape: Shape, dtype: str, cfg: Config, torch_mod: Any, quiet: bool):
        self.backend, self.A, self.ce = backend, backend.arrays, backend.ce
        self.dtype, self.cfg, self.torch = dtype, cfg, torch_mod
        self.quiet = quiet
        self.label = f"{format_size(shape)} {dtype}"
        self.rows, self.C = _rows_classes(shape)
        self.nbytes = self.rows * self.C * ITEMSIZE[dtype]
        self.case = new_case(shape, dtype, self.nbytes, arrays=self.A.lib)
        self.repeat, self.warmup = cfg.repeat, cfg.warmup
        self.base_repeat = cfg.baseline_repeat if cfg.baseline_repeat is not None else cfg.repeat
        self.x: Any = None  # logits
        self.y: Any = None  # targets
        self.xt: Any = None  # the same memory as torch (N, C) / (N,) tensors, for the baselines
        self.yt: Any = None
        self.leaf: Any = None  # xt as a leaf that requires grad (fwd+bwd baselines)
        self.compiled: Callable | None = None
        self.compile_error: str | None = None
        # fwd+bwd baselines: measured once, shared by the fresh and the in-place op
        self.t_fb: dict | None = None
        self.c_fb: dict | None = None
        self.t_fb_loss: float | None = None
        self.c_fb_loss: float | None = None

    def say(self, *msg: str) -> None:
        say(self.quiet, f"[{self.label}]", *msg)

    def measure(
        self,
        what: str,
        fn: Callable[[], Any],
        n_bytes: int,
        *,
        repeat: int | None = None,
        setup: Callable[[], None] | None = None,
        keep: Callable[[Any], Any] | None = None,
    ) -> tuple[dict, Any]:
        """The timing record of ``fn`` (GB/s of ``n_bytes`` over the median run) and its
        kept first result; out of device memory: an ``OOM`` record and ``None``."""
        kw: dict[str, Any] = {} if keep is None else {"keep": keep}
        try:
            t, first = self.backend.timer.time(
                fn, repeat=self.repeat if repeat is None else repeat, warmup=self.warmup, setup=setup, **kw
            )
        except Exception as exc:
            if not self.A.is_oom(exc):
                raise
            self.A.free()
            return _oom(n_bytes, what), None
        d = t.to_json()
        d["peak_device_bytes"] = d.pop("peak_rss_bytes")
        d["bytes"] = n_bytes
        d["gbps"] = n_bytes / t.median_s / 1e9 if t.median_s > 0 else None
        d["what"] = what
        return d, first

    def alloc(self, fn: Callable[..., Any], *args: Any) -> tuple[Any, dict | None]:
        """``fn(*args)``, or ``None`` and an OOM record when the device is out of memory."""
        try:
            return fn(*args), None
        except Exception as exc:
            if not self.A.is_oom(exc):
                raise
            self.A.free()
            return None, {"error": "out of memory", "oom": True}

    def run(self) -> dict:
        if not self.make_inputs():
            return self.case
        self.yardsticks()
        self.baseline_views()
        for op in self.cfg.ops:
            gc.collect()
            if op == "fwd":
                self.forward()
            else:
                self.forward_backward(op)
        self.check()
        self.release()
        return self.case

    def release(self) -> None:
        """Drops the device arrays and the compiled baseline, then empties the caches."""
        self.x = self.y = self.xt = self.yt = self.leaf = self.compiled = None
        self.A.free()

    def make_inputs(self) -> bool:
        """Generates the logits and targets on the device; ``False`` (and the reason in
        the case) when they cannot be made here."""
        case = self.case
        self.say("generating inputs on the device")
        try:
            self.x, self.y = self.A.make_inputs(case["shape"], self.dtype, self.cfg.seed)
        except UnsupportedCase as exc:
            case["error"] = str(exc)
            case["notes"].append(f"not run: {exc}")
            return False
        except Exception as exc:
            if not self.A.is_oom(exc):
                raise
            self.A.free()
            case["error"] = "out of memory"
            case["oom"] = True
            case["notes"].append(f"not run: the inputs ({self.nbytes / 2**30:.1f} GiB of logits) do not fit")
            return False
        return True

    def yardsticks(self) -> None:
        """A read of the same bytes, and a copy of them."""
        A, case, nbytes = self.A, self.case, self.nbytes
        self.say("read pass")
        n_read = (nbytes // 16) * 16
        if n_read:
            xr = A.flat(self.x)
            if n_read != nbytes:
                xr = xr[: n_read // ITEMSIZE[self.dtype]]
                case["notes"].append(f"read pass over the first {n_read} bytes (16-byte multiple)")
            case["yardsticks"]["read"], _ = self.measure(self.backend.read_what, self.backend.read_pass(xr), n_read)
            del xr
        if self.cfg.copy:
            self.say("copy")
            dst, err = self.alloc(A.empty_like, self.x)
            if err is not None:
                case["yardsticks"]["copy"] = dict(err, bytes=2 * nbytes, what=A.copy_what)
            else:
                case["yardsticks"]["copy"], _ = self.measure(
                    A.copy_what, functools.partial(A.copy, dst, self.x), 2 * nbytes
                )
            del dst
            A.free()

    def baseline_views(self) -> None:
        """The logits and targets as torch tensors, and the compiled baseline."""
        if self.torch is None:
            return
        xt = self.A.as_torch(self.x)
        if xt is None:
            self.case["notes"].append("no PyTorch baselines: PyTorch has no CUDA here")
            return
        self.xt = xt.reshape(-1, self.C)
        self.yt = self.A.as_torch(self.y).reshape(-1)
        if self.cfg.compile:
            try:
                self.compiled = self.backend.compile(torch_ce(self.torch), self.torch)
            except Exception as exc:
                self.compile_error = f"torch.compile failed: {_reason(exc)}"

    def compiled_measure(
        self, op: str, what: str, fn: Callable[[], Any] | None, n_bytes: int, keep: Callable[[Any], Any]
    ) -> tuple[dict, Any]:
        """Like :meth:`measure` for the compiled baseline ``fn``, compiled (untimed) by its
        first call; a failing compile or run reads ``n/a`` with the reason in the notes."""
        A, notes = self.A, self.case["notes"]
        if self.compiled is None or fn is None:
            notes.append(f"{op}: torch.compile n/a ({self.compile_error})")
            return {"error": self.compile_error, "bytes": n_bytes, "what": what}, None
        try:
            fn()  # compiles, untimed
            A.sync()
        except Exception as exc:
            A.free()
            if A.is_oom(exc):
                return _oom(n_bytes, what), None
            reason = f"torch.compile failed: {_reason(exc)}"
            notes.append(f"{op}: torch.compile n/a ({reason})")
            return {"error": reason, "bytes": n_bytes, "what": what}, None
        try:
            return self.measure(what, fn, n_bytes, repeat=self.base_repeat, keep=keep)
        except Exception as exc:  # a compiled graph failing after compiling: reported, not fatal
            A.free()
            reason = f"torch.compile run failed: {_reason(exc)}"
            notes.append(f"{op}: torch.compile n/a ({reason})")
            return {"error": reason, "bytes": n_bytes, "what": what}, None

    def forward(self) -> None:
        losses: dict[str, float | None] = {}
        t_res = c_res = None
        A, torch, n = self.A, self.torch, self.nbytes
        self.say("fwd: ce_fast")
        ce_res, losses["ce_fast"] = self.measure(
            "ce_fast.cross_entropy (mean)", functools.partial(self.ce.cross_entropy, self.x, self.y), n, keep=float
        )
        if self.xt is not None:
            self.say("fwd: torch eager")
            t_res, losses["torch"] = self.measure(
                "torch F.cross_entropy, eager, no_grad",
                functools.partial(_no_grad_call, torch, torch.nn.functional.cross_entropy, self.xt, self.yt),
                n,
                repeat=self.base_repeat,
                keep=float,
            )
            A.free()
            if self.cfg.compile:
                self.say("fwd: torch.compile")
                c_fwd = None
                if self.compiled is not None:
                    c_fwd = functools.partial(_no_grad_call, torch, self.compiled, self.xt, self.yt)
                c_res, losses["torch_compile"] = self.compiled_measure(
                    "fwd", "torch.compile(F.cross_entropy), no_grad", c_fwd, n, keep=float
                )
                A.free()
        self.finish("fwd", ce_res, t_res, c_res, losses)

    def forward_backward(self, op: str) -> None:
        losses: dict[str, float | None] = {}
        t_res = c_res = None
        A, ce, torch, n = self.A, self.ce, self.torch, 2 * self.nbytes
        if op == "fwd+bwd":
            self.say("fwd+bwd: ce_fast (fresh gradient)")
            ce_res, losses["ce_fast"] = self.measure(
                "ce_fast.cross_entropy_and_grad, fresh gradient",
                functools.partial(ce.cross_entropy_and_grad, self.x, self.y),
                n,
                keep=first_loss,
            )
        else:
            self.say("fwd+bwd in-place: ce_fast (out=logits)")
            work, err = self.alloc(A.empty_like, self.x)
            what = "ce_fast.cross_entropy_and_grad, out=logits (working copy restored untimed)"
            if err is not None:
                ce_res = dict(err, bytes=n, what=what)
            else:
                ce_res, losses["ce_fast"] = self.measure(
                    what,
                    functools.partial(ce.cross_entropy_and_grad, work, self.y, out=work),
                    n,
                    setup=functools.partial(A.copy, work, self.x),
                    keep=first_loss,
                )
            del work  # freed before the baselines run
        A.free()
        if self.xt is not None:
            if self.leaf is None:
                self.leaf = self.xt.detach().requires_grad_(True)
            if self.t_fb is None:
                self.say("fwd+bwd: torch eager")
                self.t_fb, self.t_fb_loss = self.measure(
                    "torch F.cross_entropy + autograd.grad, eager",
                    functools.partial(_loss_and_grad, torch, torch.nn.functional.cross_entropy, self.leaf, self.yt),
                    n,
                    repeat=self.base_repeat,
                    keep=float,
                )
                A.free()
                if self.cfg.compile:
                    self.say("fwd+bwd: torch.compile")
                    c_fb = None
                    if self.compiled is not None:
                        c_fb = functools.partial(_loss_and_grad, torch, self.compiled, self.leaf, self.yt)
                    self.c_fb, self.c_fb_loss = self.compiled_measure(
                        op, "torch.compile(F.cross_entropy) + autograd.grad", c_fb, n, keep=float
                    )
                    A.free()
            t_res, c_res = self.t_fb, self.c_fb
            if self.t_fb_loss is not None:
                losses["torch"] = self.t_fb_loss
            if self.c_fb_loss is not None:
                losses["torch_compile"] = self.c_fb_loss
        self.finish(op, ce_res, t_res, c_res, losses)

    def finish(self, op: str, ce_res: dict, t_res: dict | None, c_res: dict | None, losses: dict) -> None:
        """The op's record: speeds, shares of the yardsticks, speed-ups and the loss check."""
        case = self.case
        read = case["yardsticks"].get("read") or {}
        copy = case["yardsticks"].get("copy") or {}
        rec: dict[str, Any] = {"ce_fast": ce_res, "numpy": None, "torch": t_res, "torch_compile": c_res}
        rec["gbps"] = ce_res.get("gbps")
        rec["share_of_read"] = ratio(rec["gbps"], read.get("gbps"))
        rec["share_of_copy"] = None if op == "fwd" else ratio(rec["gbps"], copy.get("gbps"))
        rec["speedup_numpy"] = None
        rec["speedup_torch"] = ratio((t_res or {}).get("median_s"), ce_res.get("median_s"))
        rec["speedup_torch_compile"] = ratio((c_res or {}).get("median_s"), ce_res.get("median_s"))
        rec["peak_device_bytes"] = ce_res.get("peak_device_bytes")
        rec["loss"] = losses
        rec["loss_rel_diff"] = {
            "torch": rel_diff(losses.get("ce_fast"), losses.get("torch")),
            "torch_compile": rel_diff(losses.get("ce_fast"), losses.get("torch_compile")),
        }
        tol = LOSS_RTOL_TORCH.get(self.dtype, 1e-2)
        ok = all(v is None or v <= tol for v in rec["loss_rel_diff"].values())
        ok = ok and (losses.get("ce_fast") is None or math.isfinite(losses["ce_fast"]))
        rec["loss_ok"] = ok
        if not ok:
            case["notes"].append(f"{op}: loss mismatch {rec['loss_rel_diff']}")
        case["ops"][op] = rec

    def check(self) -> None:
        """Untimed check of a few rows against float64 NumPy."""
        A, ce, case, rows = self.A, self.ce, self.case, self.rows
        try:
            k = min(CHECK_ROWS, rows)
            xs, ys = A.rows2d(self.x, self.C)[:k], A.flat(self.y)[:k]
            loss_rows = ce.cross_entropy(xs, ys, reduction="none")
            _, g = ce.cross_entropy_and_grad(xs, ys, reduction="sum", grad_output=1.0 / rows)
            chk = reference_check(
                A.to_host64(xs), A.to_host(ys), rows, A.to_host64(loss_rows), A.to_host64(g), self.dtype
            )
            case["check"] = chk
            case["notes"].append(
                f"check on {chk['rows']} rows vs float64 NumPy: loss err {chk['loss_max_err']:.1e} "
                f"(tol {chk['loss_tol']:g}), gradient err {chk['grad_max_rel_err']:.1e} of max |grad| "
                f"(tol {chk['grad_tol']:g}): {'ok' if chk['ok'] else 'BAD'}"
            )
            del xs, ys, loss_rows, g
        except Exception as exc:
            if not A.is_oom(exc):
                raise
            case["notes"].append("check skipped: out of memory")


# ---------------------------------------------------------------------------
# the table


def _ms(t: dict | None, key: str = "median_s") -> str:
    if not t:
        return "-"
    if t.get("error"):
        return "OOM" if t.get("oom") else "n/a"
    v = t[key] * 1e3
    return f"{v:.4g}" if v < 1e4 else f"{v:.0f}"


def _gb(t: dict | None) -> str:
    if not t:
        return "-"
    if t.get("error"):
        return "OOM" if t.get("oom") else "n/a"
    return "-" if t.get("gbps") is None else f"{t['gbps']:.0f}" if t["gbps"] >= 100 else f"{t['gbps']:.1f}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.0%}"


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _mb(t: dict | None) -> str:
    if not t or t.get("error") or t.get("peak_device_bytes") is None:
        return "-"
    return f"{t['peak_device_bytes'] / 2**20:.0f}"


def _g(d: dict | None, key: str) -> float | None:
    return None if not d or d.get("error") else d.get(key)


def _best(row: Row) -> str:
    if row.kind == NOT_RUN:
        return "OOM" if row.case.get("oom") else "n/a"
    return _ms(row.timing, "best_s")


def _median(row: Row) -> str:
    return "" if row.kind == NOT_RUN else _ms(row.timing)


def _gbps(row: Row) -> str:
    return "" if row.kind == NOT_RUN else _gb(row.timing)


def _share(of: str, pct_key: str) -> Callable[[Row], str]:
    """The ``% read`` / ``% copy`` cell: 100% on that yardstick's own line, the other
    yardstick's GB/s over it, and the op record's ``pct_key`` on op lines."""

    def cell(row: Row) -> str:
        if row.kind == OP:
            return _pct(row.record.get(pct_key))
        if row.kind == of:
            return "-" if row.record.get("error") else "100%"
        if row.kind in (READ, COPY):
            return _pct(ratio(_g(row.record, "gbps"), _g(row.yardsticks.get(of), "gbps")))
        return ""

    return cell


def _peak(rec: dict) -> str:
    return " / ".join(_mb(rec.get(k)) for k in ("ce_fast", "torch", "torch_compile"))


def _check(rec: dict) -> str:
    diffs = [v for v in rec["loss_rel_diff"].values() if v is not None]
    if diffs:
        return ("ok " if rec["loss_ok"] else "BAD ") + f"{max(diffs):.0e}"
    return "-" if rec["loss_ok"] else "BAD"


class CudaLayout(Layout):
    """The CUDA table: event times, GB/s, shares of the read pass and the copy, torch
    eager and torch.compile baselines, peak device memory, loss check."""

    columns = (
        Column("best ms", _best),
        Column("median ms", _median),
        Column("GB/s", _gbps),
        Column("% read", _share(READ, "share_of_read")),
        Column("% copy", _share(COPY, "share_of_copy")),
        Column("torch ms", op_cell(lambda r: _ms(r.get("torch")))),
        Column("vs torch", op_cell(lambda r: _x(r.get("speedup_torch")))),
        Column("compile ms", op_cell(lambda r: _ms(r.get("torch_compile")))),
        Column("vs compile", op_cell(lambda r: _x(r.get("speedup_torch_compile")))),
        Column("peak dev +MiB ce/torch/compile", op_cell(_peak)),
        Column("loss check", op_cell(_check), "left"),
    )
    markdown_keys = (
        "device",
        "gpu",
        "gpu_memory_bytes",
        "compute_capability",
        "multiprocessors",
        "cuda_driver",
        "cuda_runtime",
        "cupy",
        "torch",
        "torch_cuda",
        "arrays",
        "timing",
        "cpu_model",
        "platform",
        "python",
        "numpy",
        "ml_dtypes",
        "ce_fast",
        "git_commit",
        "date",
        "peak_memory_method",
    )

    def machine_line(self, results: dict) -> str:
        m = results["machine"]
        gpu = f"{m.get('gpu') or '?'} ({m.get('device', 'cuda')}"
        if m.get("gpu_memory_bytes"):
            gpu += f", {m['gpu_memory_bytes'] / 2**30:.0f} GiB"
        if m.get("compute_capability"):
            gpu += f", sm {m['compute_capability']}"
        if m.get("multiprocessors"):
            gpu += f", {m['multiprocessors']} SMs"
        gpu += ")"
        parts = [gpu]
        if m.get("cuda_driver") or m.get("cuda_runtime"):
            parts.append(f"CUDA driver {m.get('cuda_driver', '-')} / runtime {m.get('cuda_runtime', '-')}")
        parts.append(f"ce_fast {m.get('ce_fast')} (git {m.get('git_commit')})")
        parts.append(f"cupy {m.get('cupy', '-')}")
        if m.get("torch"):
            parts.append(f"torch {m['torch']}")
        parts.append(f"host {m.get('cpu_model')}")
        parts.append(m.get("date", ""))
        return ", ".join(parts)

    def notes(self, results: dict) -> list[str]:
        cfg = results["config"]
        m = results["machine"]

        def what(key: str, default: str) -> str:
            return next(
                (c["yardsticks"][key].get("what") for c in results["cases"] if key in c.get("yardsticks", {})), default
            )

        return [
            (
                f"times: CUDA events on the current stream around each call (host work inside the call, such as "
                f"the target check's flag read and the loss reduction's read-back, included); best and median of "
                f"{cfg['repeat']} runs after {cfg['warmup']} warm-up runs; arrays: {m.get('arrays', '-')}"
            ),
            (
                "GB/s = bytes / median time, GB = 1e9 B; bytes = the logits once (fwd, read pass) or read + write "
                "(fwd+bwd, in-place, copy)"
            ),
            (
                f"% read = GB/s / read-pass GB/s ({what('read', 'ce_fast._engines.cuda.read_pass')}); % copy = GB/s / "
                f"copy GB/s ({what('copy', 'a device copy')}), for the fused loss + gradient"
            ),
            (
                "fwd: ce_fast.cross_entropy (mean); fwd+bwd: ce_fast.cross_entropy_and_grad into a fresh gradient; "
                "in-place: out=logits on a working copy restored before every run (untimed)"
            ),
            (
                "torch: F.cross_entropy eager (fwd under no_grad; fwd+bwd: the mean loss and torch.autograd.grad "
                "w.r.t. the logits); compile: torch.compile(F.cross_entropy, dynamic=False), compiled before timing; "
                "vs = baseline median / ce_fast median; OOM = out of device memory, n/a = failed (see below)"
            ),
            f"peak dev: {m.get('peak_memory_method', '-')}",
            (
                "loss check: max relative difference of ce_fast's loss to torch eager / torch.compile's "
                "(torch bf16 / f16 returns a loss rounded to that dtype)"
            ),
        ]


BACKEND = CudaBackend
LAYOUT = CudaLayout()
