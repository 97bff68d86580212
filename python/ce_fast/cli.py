"""The ``ce-fast`` command line.

``ce-fast bench`` times ce_fast against NumPy and PyTorch on the same logits and
reports every speed as bytes per second, as a share of a plain read of the same
bytes measured in the same run, and as ratios to the baselines::

    ce-fast bench                                   # default sizes and dtypes
    ce-fast bench --sizes 4096x128256 --dtype float32 --repeat 5
    ce-fast bench --json results.json --markdown benches/RESULTS.md

What is timed, per logits shape and dtype (class axis last, C-contiguous):

``fwd``
    ``ce_fast.cross_entropy(z, y)`` (mean). NumPy baseline:
    ``m = z.max(-1, keepdims=True); lse = m[..., 0] + np.log(np.exp(z - m).sum(-1));
    loss = (lse - z[rows, y]).mean()`` in float32 (bfloat16 input is cast to float32
    inside the timed call). PyTorch baseline: ``F.cross_entropy(z, y)`` on CPU.
``fwd+bwd``
    ``ce_fast.cross_entropy_and_grad(z, y)`` into a fresh gradient array. NumPy
    baseline: the forward above plus ``softmax / N`` with ``1 / N`` taken off the
    target entries (cast back to the input dtype). PyTorch baseline:
    ``F.cross_entropy(z, y).backward()`` on a leaf tensor sharing z's memory.
``fwd+bwd in-place``
    ``ce_fast.cross_entropy_and_grad(z, y, out=z)`` on a working copy that is
    restored (untimed) before every run; same baselines as ``fwd+bwd``.

Bytes counted: the logits once for ``fwd`` and the read pass, read + write for
``fwd+bwd`` and the copy. GB is 10**9 bytes. Times are best and median of
``--repeat`` runs after one warm-up run. A baseline whose first run takes longer
than ``--slow`` seconds is run once (no warm-up) unless ``--baseline-repeat`` is
given; the table marks such numbers with ``*``.

Peak memory: on Linux the high-water mark is reset by writing ``5`` to
``/proc/self/clear_refs`` and ``VmHWM`` is read after the (warm-up) call; without
that, the growth of ``getrusage().ru_maxrss`` is used, which only sees growth above
the process's earlier peak (a lower bound).

``--device cuda`` (``ce_fast._bench_cuda``, imported only then) benches the CUDA
engine on logits generated on the GPU (default sizes 16384 x {32000, 128256, 262144},
``--repeat 20 --warmup 3``), timed with CUDA events (GB/s from the median): a read
pass (``ce_fast._cuda.read_pass``) and a device copy as yardsticks, ``fwd`` against the
read pass, the fused loss + gradient (fresh and ``out=`` the logits) against the copy,
and PyTorch ``F.cross_entropy`` eager (forward; forward + backward) and
``torch.compile``-d (``--no-compile`` skips it; a failing compile reads ``n/a``). Inputs
are torch CUDA tensors when PyTorch has CUDA (needed for bfloat16), else CuPy arrays
(``--arrays`` picks). Without CuPy or a CUDA device it exits with code 3 and a message.

``main(argv)`` returns the exit code: 0 on success, 2 for bad options, 3 when the
requested device cannot be benched here (no CuPy / no CUDA device).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

DEFAULT_SIZES = "4096x32000,4096x128256,1024x256000"
GPU_DEFAULT_SIZES = "16384x32000,16384x128256,16384x262144"  # --device cuda (same as _bench_cuda's)
DEFAULT_DTYPES = "float32,bfloat16"
DEFAULT_REPEAT = {"cpu": 3, "cuda": 20}
DEFAULT_WARMUP = {"cpu": 1, "cuda": 3}
GPU_DTYPES = ("float32", "bfloat16", "float16")
OPS = ("fwd", "fwd+bwd", "fwd+bwd in-place")
_OP_ALIASES = {
    "fwd": "fwd",
    "forward": "fwd",
    "fwd+bwd": "fwd+bwd",
    "fwdbwd": "fwd+bwd",
    "grad": "fwd+bwd",
    "inplace": "fwd+bwd in-place",
    "in-place": "fwd+bwd in-place",
    "fwd+bwd in-place": "fwd+bwd in-place",
}
_DTYPE_ALIASES = {
    "float32": "float32",
    "f32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "f16": "float16",
    "fp16": "float16",
    "half": "float16",
    "float64": "float64",
    "f64": "float64",
    "fp64": "float64",
}
SCHEMA = "ce_fast.bench/1"
LOSS_RTOL_NUMPY = 1e-5
# torch returns a bfloat16 / float16 loss for such input: its rounding alone is ~4e-3.
# torch's CPU bfloat16 loss is itself rounded and accumulated coarsely: 1.2e-2 off the
# float64 value was seen at 4096x32000 (ce_fast matched NumPy's float32 loss exactly).
LOSS_RTOL_TORCH = {"float32": 1e-5, "float64": 1e-9, "bfloat16": 3e-2, "float16": 2e-3}


# ---------------------------------------------------------------------------
# timing


@dataclass
class Timing:
    """Wall-clock samples of one callable."""

    times_s: List[float]
    warmup: int
    single_run: bool = False  # a slow baseline timed once, without warm-up
    peak_rss_bytes: Optional[int] = None  # peak memory growth of the first call

    @property
    def best_s(self) -> float:
        return min(self.times_s)

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    def to_json(self) -> dict:
        return {
            "times_s": self.times_s,
            "best_s": self.best_s,
            "median_s": self.median_s,
            "repeat": len(self.times_s),
            "warmup": self.warmup,
            "single_run": self.single_run,
            "peak_rss_bytes": self.peak_rss_bytes,
        }


class Timer:
    """Times callables; ``sync`` is called before starting and before stopping the
    clock (a no-op on the CPU, a device synchronisation on a GPU backend)."""

    def __init__(self, sync: Callable[[], None], memory: "PeakMemory"):
        self.sync = sync
        self.memory = memory

    def _once(self, fn, setup) -> Tuple[float, Any]:
        if setup is not None:
            setup()
        self.sync()
        t0 = time.perf_counter()
        out = fn()
        self.sync()
        return time.perf_counter() - t0, out

    def time(
        self,
        fn: Callable[[], Any],
        repeat: int,
        warmup: int = 1,
        setup: Optional[Callable[[], None]] = None,
        slow_s: Optional[float] = None,
        keep: Callable[[Any], Any] = lambda r: r,
    ) -> Tuple[Timing, Any]:
        """Runs ``fn`` ``warmup + repeat`` times; returns the timing and ``keep`` of the
        first result (results are dropped after the clock stops, so freeing them is not timed).

        ``setup`` runs untimed before every call. The first call is the measured one for
        peak memory. With ``slow_s``, a first call slower than ``slow_s`` seconds is the
        only sample (``single_run``).
        """
        if setup is not None:
            setup()
        self.sync()
        self.memory.reset()
        try:
            t_first, first = self._once(fn, None)
        finally:
            peak = self.memory.peak_growth()
        first = keep(first)
        if slow_s is not None and t_first > slow_s:
            return Timing([t_first], warmup=0, single_run=True, peak_rss_bytes=peak), first
        times: List[float] = []
        if warmup <= 0:
            times.append(t_first)
        for _ in range(max(warmup - 1, 0)):
            self._once(fn, setup)
        while len(times) < repeat:
            times.append(self._once(fn, setup)[0])  # the result is dropped here, untimed
        return Timing(times, warmup=max(warmup, 0), peak_rss_bytes=peak), first


# ---------------------------------------------------------------------------
# peak memory


def _status_kb(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) if sys.platform == "darwin" else int(r) * 1024  # bytes on macOS, KiB on Linux


class PeakMemory:
    """Peak resident-set growth of a call, measured as well as the OS allows."""

    def __init__(self, method: Optional[str] = None):
        self.method = method or self._detect()
        self._base = 0

    @staticmethod
    def _clear_refs() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    @classmethod
    def _detect(cls) -> str:
        if _status_kb("VmHWM") is not None and _status_kb("VmRSS") is not None and cls._clear_refs():
            # Check that the reset really lowers the mark to the current RSS.
            big = np.ones(8 << 20, dtype=np.uint8)  # 8 MiB, touched
            del big
            if cls._clear_refs():
                hwm, rss = _status_kb("VmHWM"), _status_kb("VmRSS")
                if hwm is not None and rss is not None and hwm - rss < 4096:
                    return "vmhwm"
        try:
            _maxrss_bytes()
            return "ru_maxrss"
        except Exception:  # pragma: no cover - no resource accounting at all
            return "none"

    @property
    def description(self) -> str:
        return {
            "vmhwm": "VmHWM after resetting it via /proc/self/clear_refs (exact peak growth of the call)",
            "ru_maxrss": "growth of getrusage ru_maxrss (lower bound: only growth above the process's earlier peak)",
            "none": "not measured",
        }[self.method]

    def reset(self) -> None:
        if self.method == "vmhwm":
            self._clear_refs()
            self._base = (_status_kb("VmRSS") or 0) * 1024
        elif self.method == "ru_maxrss":
            self._base = _maxrss_bytes()

    def peak_growth(self) -> Optional[int]:
        if self.method == "vmhwm":
            return max(0, (_status_kb("VmHWM") or 0) * 1024 - self._base)
        if self.method == "ru_maxrss":
            return max(0, _maxrss_bytes() - self._base)
        return None


class _NoMemory(PeakMemory):
    def __init__(self):
        self.method = "none"
        self._base = 0


# ---------------------------------------------------------------------------
# inputs and baselines


def _np_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def make_logits(shape: Tuple[int, ...], dtype: str, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Random logits (normal, std 2) of ``shape`` and targets, generated in row blocks
    so the peak memory is the result's size."""
    rng = np.random.default_rng(seed)
    C = shape[-1]
    N = int(np.prod(shape[:-1], dtype=np.int64))
    dt = _np_dtype(dtype)
    z = np.empty((N, C), dtype=dt)
    step = max(1, (1 << 22) // C)
    for r in range(0, N, step):
        blk = rng.standard_normal((min(step, N - r), C), dtype=np.float64 if dt == np.float64 else np.float32)
        blk *= 2.0
        z[r : r + blk.shape[0]] = blk.astype(dt, copy=False)
    y = rng.integers(0, C, size=N, dtype=np.int64)
    return z.reshape(shape), y.reshape(shape[:-1])


def _compute_dtype(z: np.ndarray):
    return np.float64 if z.dtype == np.float64 else np.float32


def numpy_forward(z: np.ndarray, y: np.ndarray) -> float:
    """Mean cross-entropy by max / exp / sum / log, in float32 (float64 for float64)."""
    C = z.shape[-1]
    z = z.reshape(-1, C).astype(_compute_dtype(z), copy=False)
    rows = np.arange(z.shape[0])
    m = z.max(-1, keepdims=True)
    lse = m[..., 0] + np.log(np.exp(z - m).sum(-1))
    return float((lse - z[rows, y.reshape(-1)]).mean())


def numpy_forward_backward(z: np.ndarray, y: np.ndarray) -> Tuple[float, np.ndarray]:
    """The forward above and d(mean loss)/dz = (softmax - onehot) / N, in the input dtype."""
    shape, dt, C = z.shape, z.dtype, z.shape[-1]
    zf = z.reshape(-1, C).astype(_compute_dtype(z), copy=False)
    N = zf.shape[0]
    rows = np.arange(N)
    yy = y.reshape(-1)
    m = zf.max(-1, keepdims=True)
    e = np.exp(zf - m)
    s = e.sum(-1, keepdims=True)
    lse = m[..., 0] + np.log(s[..., 0])
    loss = float((lse - zf[rows, yy]).mean())
    e /= s * N
    e[rows, yy] -= 1.0 / N
    return loss, e.astype(dt, copy=False).reshape(shape)


def _torch_of(z: np.ndarray):
    import torch

    if z.dtype == _np_dtype("bfloat16"):
        return torch.from_numpy(z.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(z)


# ---------------------------------------------------------------------------
# backends


class CpuBackend:
    """Host arrays (NumPy; PyTorch CPU tensors sharing their memory)."""

    name = "cpu"

    def __init__(self, threads: Optional[int]):
        import ce_fast
        from ce_fast import _core

        self.ce = ce_fast
        self.core = _core
        self.threads = threads
        if threads is not None:
            ce_fast.set_threads(threads)
        self.memory: PeakMemory = PeakMemory()

    def sync(self) -> None:
        pass

    def info(self) -> dict:
        return {
            "device": "cpu",
            "ce_fast_threads": self.ce.get_threads(),
            "simd": self.core.simd_level(),
            "peak_memory_method": self.memory.description,
        }

    def inputs(self, z: np.ndarray, y: np.ndarray) -> Tuple[Any, Any]:
        return z, y

    def read_pass(self, z) -> Callable[[], Any]:
        ptr, nbytes, threads = z.ctypes.data, z.nbytes, self.threads or 0
        return lambda: self.core.read_pass(ptr, nbytes, threads)

    def copy_pass(self, z) -> Optional[Tuple[Callable[[], Any], Callable[[], None]]]:
        """A single-threaded ``np.copyto`` of the logits into a prepared buffer, and its cleanup."""
        dst = [np.empty_like(z)]
        return (lambda: np.copyto(dst[0], z)), (lambda: dst.clear())

    def working_copy(self, z):
        return np.array(z, copy=True)

    def restore(self, dst, src) -> None:
        np.copyto(dst, src)

    def torch_device(self) -> str:
        return "cpu"

    def mem_available(self) -> Optional[int]:
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError):
            return None
        return None


class DeviceUnavailable(RuntimeError):
    """The requested device cannot be benched here (``main`` exits with code 3)."""


def CudaBackend(threads: Optional[int] = None, arrays: Optional[str] = None):
    """The CUDA benchmark backend, :class:`ce_fast._bench_cuda.CudaBackend` (imported
    here, on use, so the CLI needs neither CuPy nor a GPU for anything else). Raises
    :class:`DeviceUnavailable` without CuPy or a CUDA device.

    Besides CpuBackend's ``sync`` / ``info`` / ``memory`` it brings its own ``timer``
    (CUDA events) and ``bench_case`` (inputs made on the device, torch eager and
    torch.compile baselines), which :func:`run_bench` uses when a backend has them.
    """
    from ._bench_cuda import CudaBackend as _CudaBackend

    return _CudaBackend(threads, arrays=arrays)


BACKENDS = {"cpu": CpuBackend, "cuda": CudaBackend}


# ---------------------------------------------------------------------------
# the benchmark


@dataclass
class Config:
    sizes: List[Tuple[int, ...]]
    dtypes: List[str]
    ops: List[str]
    repeat: int = 3
    warmup: int = 1
    threads: Optional[int] = None
    numpy: bool = True
    torch: bool = True
    copy: bool = True
    device: str = "cpu"
    slow_s: float = 1.0
    baseline_repeat: Optional[int] = None
    seed: int = 0
    argv: List[str] = field(default_factory=list)
    compile: bool = True  # torch.compile baseline (--device cuda)
    arrays: Optional[str] = None  # "torch" / "cupy" inputs for --device cuda (None: torch if it has CUDA)


def _fmt_size(shape: Sequence[int]) -> str:
    return "x".join(str(int(d)) for d in shape)


def _rel(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)):
        return None
    return abs(a - b) / max(abs(b), 1e-30)


def _say(quiet: bool, *msg) -> None:
    if not quiet:
        print(*msg, file=sys.stderr, flush=True)


def machine_info(backend, cfg: Config) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    import ce_fast

    info = {
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "cores_usable": usable,
        "memory_bytes": mem,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "ce_fast": getattr(ce_fast, "__version__", None),
        "date": _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
    }
    try:
        import ml_dtypes

        info["ml_dtypes"] = ml_dtypes.__version__
    except Exception:
        pass
    if cfg.torch:
        try:
            import torch

            info["torch"] = torch.__version__
            info["torch_threads"] = torch.get_num_threads()
        except ImportError:
            info["torch"] = None
    info.update(backend.info())
    return info


def _git_commit() -> Optional[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(
            ["git", "-C", here, "describe", "--always", "--dirty", "--abbrev=12"],
            capture_output=True, text=True, timeout=5,
        )
        return (out.stdout.strip() or None) if out.returncode == 0 else None
    except Exception:
        return None


def _bench_case(shape, dtype: str, cfg: Config, backend, timer: Timer, torch_mod, quiet: bool) -> dict:
    ce = backend.ce
    label = f"{_fmt_size(shape)} {dtype}"
    _say(quiet, f"[{label}] generating inputs")
    z_host, y_host = make_logits(shape, dtype, cfg.seed)
    z, y = backend.inputs(z_host, y_host)
    nbytes = int(z_host.nbytes)
    case: Dict[str, Any] = {
        "shape": list(shape),
        "dtype": dtype,
        "rows": int(np.prod(shape[:-1], dtype=np.int64)),
        "classes": int(shape[-1]),
        "bytes": nbytes,
        "yardsticks": {},
        "ops": {},
        "notes": [],
    }
    rep, warm = cfg.repeat, cfg.warmup
    base_rep = cfg.baseline_repeat if cfg.baseline_repeat is not None else rep
    base_slow = None if cfg.baseline_repeat is not None else cfg.slow_s

    def timed(fn, n_bytes, **kw):
        t, res = timer.time(fn, **kw)
        d = t.to_json()
        d["bytes"] = n_bytes
        d["gbps"] = n_bytes / t.best_s / 1e9
        return d, res

    # Yardsticks: a plain read of the same bytes (engine threads), a copy (NumPy, 1 thread).
    _say(quiet, f"[{label}] read pass")
    read, _ = timed(backend.read_pass(z), nbytes, repeat=rep, warmup=warm)
    read["what"] = f"ce_fast._core.read_pass, {backend.threads or ce.get_threads()} threads"
    case["yardsticks"]["read"] = read
    if cfg.copy:
        _say(quiet, f"[{label}] copy")
        fn, done = backend.copy_pass(z)
        cp, _ = timed(fn, 2 * nbytes, repeat=rep, warmup=warm)
        done()
        cp["what"] = "numpy.copyto, 1 thread (read + write bytes)"
        case["yardsticks"]["copy"] = cp
    read_gbps = read["gbps"]

    tdev = backend.torch_device()
    zt = yt = None
    if torch_mod is not None:
        zt = _torch_of(z_host).to(tdev).reshape(-1, shape[-1])
        yt = torch_mod.from_numpy(y_host.reshape(-1)).to(tdev)

    def mem_ok(factor: float) -> bool:
        avail = backend.mem_available()
        need = factor * case["rows"] * case["classes"] * 4
        if avail is not None and need > 0.9 * avail:
            case["notes"].append(f"baseline skipped: needs ~{need / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB available")
            return False
        return True

    def finish(op: str, ce_res: dict, np_res: Optional[dict], t_res: Optional[dict], losses: dict):
        rec = {"ce_fast": ce_res, "numpy": np_res, "torch": t_res}
        rec["gbps"] = ce_res["gbps"]
        rec["share_of_read"] = ce_res["gbps"] / read_gbps
        if "copy" in case["yardsticks"] and op != "fwd":
            rec["share_of_copy"] = ce_res["gbps"] / case["yardsticks"]["copy"]["gbps"]
        rec["speedup_numpy"] = np_res["best_s"] / ce_res["best_s"] if np_res else None
        rec["speedup_torch"] = t_res["best_s"] / ce_res["best_s"] if t_res else None
        rec["peak_rss_bytes"] = ce_res["peak_rss_bytes"]
        rec["loss"] = losses
        rec["loss_rel_diff"] = {
            "numpy": _rel(losses.get("ce_fast"), losses.get("numpy")),
            "torch": _rel(losses.get("ce_fast"), losses.get("torch")),
        }
        ok = True
        if rec["loss_rel_diff"]["numpy"] is not None and rec["loss_rel_diff"]["numpy"] > LOSS_RTOL_NUMPY:
            ok = False
        tt = LOSS_RTOL_TORCH.get(dtype, 1e-2)
        if rec["loss_rel_diff"]["torch"] is not None and rec["loss_rel_diff"]["torch"] > tt:
            ok = False
        rec["loss_ok"] = ok
        if not ok:
            case["notes"].append(f"{op}: loss mismatch {rec['loss_rel_diff']}")
        case["ops"][op] = rec

    np_bwd = t_bwd = None
    np_bwd_loss = t_bwd_loss = None
    for op in cfg.ops:
        gc.collect()
        losses: Dict[str, Optional[float]] = {}
        np_res = t_res = None
        if op == "fwd":
            _say(quiet, f"[{label}] fwd: ce_fast")
            ce_res, loss = timed(lambda: ce.cross_entropy(z, y), nbytes, repeat=rep, warmup=warm)
            losses["ce_fast"] = float(loss)
            if cfg.numpy and mem_ok(4 + (1 if dtype != "float32" else 0)):
                _say(quiet, f"[{label}] fwd: numpy")
                np_res, l_np = timed(lambda: numpy_forward(z_host, y_host), nbytes,
                                     repeat=base_rep, warmup=warm, slow_s=base_slow)
                losses["numpy"] = l_np
            if zt is not None and mem_ok(3):
                _say(quiet, f"[{label}] fwd: torch")
                t_res, l_t = timed(lambda: torch_mod.nn.functional.cross_entropy(zt, yt), nbytes,
                                   repeat=base_rep, warmup=warm, slow_s=base_slow)
                losses["torch"] = float(l_t)
            finish(op, ce_res, np_res, t_res, losses)
            continue

        # fwd+bwd, fresh gradient or in place; the baselines are the same for both.
        if op == "fwd+bwd":
            _say(quiet, f"[{label}] fwd+bwd: ce_fast")
            ce_res, loss = timed(lambda: ce.cross_entropy_and_grad(z, y), 2 * nbytes,
                                 repeat=rep, warmup=warm, keep=lambda r: float(r[0]))
        else:
            _say(quiet, f"[{label}] fwd+bwd in-place: ce_fast")
            work = backend.working_copy(z)
            ce_res, loss = timed(lambda: ce.cross_entropy_and_grad(work, y, out=work), 2 * nbytes,
                                 repeat=rep, warmup=warm, setup=lambda: backend.restore(work, z),
                                 keep=lambda r: float(r[0]))
            del work
        losses["ce_fast"] = float(loss)
        gc.collect()
        if cfg.numpy:
            if np_bwd is None and mem_ok(5 + (1 if dtype != "float32" else 0)):
                _say(quiet, f"[{label}] fwd+bwd: numpy")
                np_bwd, np_bwd_loss = timed(lambda: numpy_forward_backward(z_host, y_host), 2 * nbytes,
                                            repeat=base_rep, warmup=warm, slow_s=base_slow,
                                            keep=lambda r: r[0])
                gc.collect()
            np_res = np_bwd
            if np_bwd_loss is not None:
                losses["numpy"] = np_bwd_loss
        if zt is not None:
            if t_bwd is None and mem_ok(5):
                _say(quiet, f"[{label}] fwd+bwd: torch")
                leaf = zt.detach().requires_grad_(True)

                def torch_fb():
                    loss_t = torch_mod.nn.functional.cross_entropy(leaf, yt)
                    loss_t.backward()
                    return loss_t.detach()

                def no_grad():  # untimed: the previous gradient is freed outside the clock
                    leaf.grad = None

                t_bwd, l_t = timed(torch_fb, 2 * nbytes, repeat=base_rep, warmup=warm, slow_s=base_slow,
                                   setup=no_grad)
                t_bwd_loss = float(l_t)
                leaf.grad = None
                del leaf
                gc.collect()
            t_res = t_bwd
            if t_bwd_loss is not None:
                losses["torch"] = t_bwd_loss
        finish(op, ce_res, np_res, t_res, losses)

    del z, y, z_host, y_host, zt, yt
    gc.collect()
    return case


def run_bench(cfg: Config, quiet: bool = False, backend=None) -> dict:
    """Runs the benchmark described by ``cfg``; returns the JSON-ready results.

    ``backend`` (default: ``BACKENDS[cfg.device]``) is for tests that drive the bench
    loop with a stand-in device."""
    from . import _cpu

    prev_threads = _cpu._threads
    prev_torch_threads = None
    try:
        if backend is None:
            if cfg.device == "cuda":
                backend = BACKENDS["cuda"](cfg.threads, arrays=cfg.arrays)
            else:
                backend = BACKENDS[cfg.device](cfg.threads)
        torch_mod = None
        if cfg.torch:
            try:
                import torch as torch_mod  # noqa: F811

                if cfg.threads is not None:
                    prev_torch_threads = torch_mod.get_num_threads()
                    torch_mod.set_num_threads(cfg.threads)
            except ImportError:
                _say(quiet, "PyTorch is not installed: no PyTorch baseline")
                cfg.torch = False
        return _run_bench(cfg, backend, torch_mod, quiet)
    finally:  # the process's thread settings are left as they were
        _cpu.set_threads(prev_threads)
        if prev_torch_threads is not None:
            sys.modules["torch"].set_num_threads(prev_torch_threads)


def _run_bench(cfg: Config, backend, torch_mod, quiet: bool) -> dict:
    timer = getattr(backend, "timer", None) or Timer(backend.sync, backend.memory)
    bench_case = getattr(backend, "bench_case", None)
    results = {
        "schema": SCHEMA,
        "command": "ce-fast " + " ".join(cfg.argv),
        "machine": machine_info(backend, cfg),
        "config": {
            "sizes": [list(s) for s in cfg.sizes],
            "dtypes": cfg.dtypes,
            "ops": cfg.ops,
            "repeat": cfg.repeat,
            "warmup": cfg.warmup,
            "threads": cfg.threads,
            "numpy": cfg.numpy,
            "torch": cfg.torch,
            "device": cfg.device,
            "slow_s": cfg.slow_s,
            "baseline_repeat": cfg.baseline_repeat,
            "seed": cfg.seed,
            "compile": cfg.compile,
            "arrays": cfg.arrays,
        },
        "cases": [],
    }
    for shape in cfg.sizes:
        for dtype in cfg.dtypes:
            if bench_case is not None:
                results["cases"].append(bench_case(shape, dtype, cfg, timer, torch_mod, quiet))
            else:
                results["cases"].append(_bench_case(shape, dtype, cfg, backend, timer, torch_mod, quiet))
    return results


# ---------------------------------------------------------------------------
# reports


def _ms(t: Optional[dict]) -> str:
    if not t:
        return "-"
    v = t["best_s"] * 1e3
    s = f"{v:.4g}" if v < 1e4 else f"{v:.0f}"
    return s + ("*" if t.get("single_run") else "")


def _x(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.3g}x"


def _mb(b: Optional[int]) -> str:
    return "-" if b is None else f"{b / 2**20:.0f}"


def _rss(rec: dict) -> str:
    parts = [_mb(rec["ce_fast"].get("peak_rss_bytes"))]
    for k in ("numpy", "torch"):
        parts.append(_mb(rec[k].get("peak_rss_bytes")) if rec.get(k) else "-")
    return " / ".join(parts)


def _is_cuda(results: dict) -> bool:
    return results.get("config", {}).get("device") == "cuda"


def table_rows(results: dict) -> Tuple[List[str], List[List[str]]]:
    """Header and rows of the summary table (shared by the terminal and Markdown)."""
    if _is_cuda(results):
        from . import _bench_cuda

        return _bench_cuda.table_rows(results)
    head = ["size", "dtype", "op", "best ms", "median ms", "GB/s", "% read",
            "NumPy ms", "vs NumPy", "torch ms", "vs torch", "peak RSS +MiB ce/np/torch", "loss check"]
    rows = []
    for c in results["cases"]:
        size, dt = _fmt_size(c["shape"]), c["dtype"]
        y = c["yardsticks"]
        r = y["read"]
        rows.append([size, dt, "read pass", _ms(r), f"{r['median_s'] * 1e3:.4g}", f"{r['gbps']:.1f}", "100%",
                     "", "", "", "", "", ""])
        if "copy" in y:
            cp = y["copy"]
            rows.append(["", "", "copy (np, 1 thr)", _ms(cp), f"{cp['median_s'] * 1e3:.4g}", f"{cp['gbps']:.1f}",
                         f"{cp['gbps'] / r['gbps']:.0%}", "", "", "", "", "", ""])
        for op, rec in c["ops"].items():
            t = rec["ce_fast"]
            diffs = [v for v in rec["loss_rel_diff"].values() if v is not None]
            check = "-" if not diffs else (("ok " if rec["loss_ok"] else "BAD ") + f"{max(diffs):.0e}")
            rows.append(["", "", op, _ms(t), f"{t['median_s'] * 1e3:.4g}", f"{rec['gbps']:.1f}",
                         f"{rec['share_of_read']:.0%}", _ms(rec["numpy"]), _x(rec["speedup_numpy"]),
                         _ms(rec["torch"]), _x(rec["speedup_torch"]), _rss(rec), check])
    return head, rows


def _footnotes(results: dict) -> List[str]:
    if _is_cuda(results):
        from . import _bench_cuda

        return _bench_cuda.footnotes(results)
    cfg = results["config"]
    m = results["machine"]
    notes = [
        f"times: best (and median) of {cfg['repeat']} runs after {cfg['warmup']} warm-up; "
        "GB/s = bytes of logits (fwd, read pass) or read + write bytes (fwd+bwd, copy) / best time, GB = 1e9 B",
        "% read = GB/s / read-pass GB/s of the same array in the same run; "
        "vs NumPy / vs torch = baseline best time / ce_fast best time",
        "NumPy: max/exp/sum/log in float32 (bf16 cast to float32 inside the timed call), single-threaded; "
        "fwd+bwd adds softmax/N - onehot/N. torch: F.cross_entropy (fwd+bwd: .backward() on a leaf), "
        f"{m.get('torch_threads', '-')} threads",
        "* baseline ran once without warm-up (first run slower than "
        f"{cfg['slow_s']} s); use --baseline-repeat N to force N runs",
        f"peak RSS: {m.get('peak_memory_method', '-')}; measured on the first (warm-up) call of ce_fast / NumPy / "
        "torch; memory the allocator recycles without new pages (e.g. buffers under glibc's 32 MiB mmap "
        "threshold) does not show",
        "loss check: max relative difference of ce_fast's loss to the NumPy / torch loss "
        f"(tolerance {LOSS_RTOL_NUMPY:g} vs NumPy; torch bf16 returns a bf16-rounded loss)",
    ]
    for c in results["cases"]:
        for n in c["notes"]:
            notes.append(f"{_fmt_size(c['shape'])} {c['dtype']}: {n}")
    return notes


def _machine_line(results: dict) -> str:
    if _is_cuda(results):
        from . import _bench_cuda

        return _bench_cuda.machine_line(results)
    m = results["machine"]
    parts = [
        f"{m.get('cpu_model')}",
        f"{m.get('cores')} cores ({m.get('cores_usable')} usable)",
        f"{(m.get('memory_bytes') or 0) / 2**30:.0f} GiB",
        f"SIMD {m.get('simd', '-')}",
        f"ce_fast {m.get('ce_fast')} ({m.get('ce_fast_threads')} threads, git {m.get('git_commit')})",
        f"numpy {m.get('numpy')}",
    ]
    if m.get("torch"):
        parts.append(f"torch {m['torch']} ({m.get('torch_threads')} threads)")
    parts.append(m.get("date", ""))
    return ", ".join(parts)


def format_table(results: dict) -> str:
    head, rows = table_rows(results)
    right = set(range(3, len(head) - 1))  # numbers right-aligned; the check column is text
    widths = [max(len(head[i]), *(len(r[i]) for r in rows)) if rows else len(head[i]) for i in range(len(head))]

    def line(cells):
        return "  ".join(c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(cells)).rstrip()

    out = [_machine_line(results), results.get("command", ""), "", line(head), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    out.append("")
    out += ["  " + n for n in _footnotes(results)]
    return "\n".join(out)


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("*", "\\*")


def format_markdown(results: dict) -> str:
    """The results as Markdown (for benches/RESULTS.md)."""
    m = results["machine"]
    head, rows = table_rows(results)
    md = ["# ce_fast benchmark results", ""]
    md.append("## Machine")
    md.append("")
    keys: Sequence[str] = ("cpu_model", "cores", "cores_usable", "memory_bytes", "simd", "ce_fast_threads",
                           "torch_threads", "platform", "python", "numpy", "ml_dtypes", "torch", "ce_fast",
                           "git_commit", "date", "peak_memory_method")
    if _is_cuda(results):
        from . import _bench_cuda

        keys = _bench_cuda.MARKDOWN_KEYS
    for k in keys:
        if k in m and m[k] is not None:
            v = f"{m[k] / 2**30:.1f} GiB" if k in ("memory_bytes", "gpu_memory_bytes") else m[k]
            md.append(f"- **{k}**: {v}")
    md += ["", "## Command", "", "```", results.get("command", ""), "```", "", "## Results", ""]
    md.append("| " + " | ".join(head) + " |")
    md.append("|" + "|".join("---:" if i >= 3 else "---" for i in range(len(head))) + "|")
    for r in rows:
        md.append("| " + " | ".join(_md_escape(c) for c in r) + " |")
    md += ["", "## Notes", ""]
    md += [f"- {_md_escape(n)}" for n in _footnotes(results)]
    md.append("")
    return "\n".join(md)


# ---------------------------------------------------------------------------
# command line


def _parse_sizes(text: str) -> List[Tuple[int, ...]]:
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        try:
            dims = tuple(int(d) for d in part.split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad size {part!r}: expected ROWSxCLASSES like 4096x128256") from None
        if len(dims) < 2 or any(d <= 0 for d in dims):
            raise argparse.ArgumentTypeError(f"bad size {part!r}: expected positive ROWSxCLASSES like 4096x128256")
        out.append(dims)
    if not out:
        raise argparse.ArgumentTypeError("no sizes given")
    return out


def _parse_list(aliases: Dict[str, str], what: str):
    def parse(text: str) -> List[str]:
        out = []
        for part in text.split(","):
            key = part.strip().lower()
            if not key:
                continue
            if key not in aliases:
                raise argparse.ArgumentTypeError(
                    f"unknown {what} {part.strip()!r}; choose from {', '.join(sorted(set(aliases.values())))}"
                )
            if aliases[key] not in out:
                out.append(aliases[key])
        if not out:
            raise argparse.ArgumentTypeError(f"no {what} given")
        return out

    return parse


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {v}")
    return v


def _nonneg(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {v}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ce-fast",
        description="ce_fast: streaming cross-entropy over huge logits arrays (class axis last).",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    b = sub.add_parser(
        "bench",
        help="time ce_fast against NumPy and PyTorch; table of time, GB/s, share of a read pass, speed-ups",
        description="Time ce_fast.cross_entropy (fwd) and cross_entropy_and_grad (fwd+bwd, fresh gradient and "
        "in place) against NumPy and PyTorch on random logits; report time, GB/s, share of a plain read pass "
        "of the same bytes, speed-ups and peak memory growth. With no options: sizes "
        f"{DEFAULT_SIZES}, dtypes {DEFAULT_DTYPES} (a few minutes). With --device cuda: logits made on the "
        f"GPU (sizes {GPU_DEFAULT_SIZES}), CUDA-event timing, a read pass and a device copy as yardsticks, "
        "PyTorch F.cross_entropy eager and torch.compile as baselines. Progress goes to stderr, the table to stdout.",
    )
    b.add_argument("--sizes", type=_parse_sizes, default=None,
                   help=f"comma-separated logits shapes ROWSxCLASSES (or AxBxCLASSES) (default: {DEFAULT_SIZES}; "
                        f"with --device cuda: {GPU_DEFAULT_SIZES})")
    b.add_argument("--dtype", "--dtypes", dest="dtypes", type=_parse_list(_DTYPE_ALIASES, "dtype"),
                   default=DEFAULT_DTYPES, help="comma-separated: float32, bfloat16, float16, float64 (default: %(default)s)")
    b.add_argument("--ops", type=_parse_list(_OP_ALIASES, "op"), default="fwd,fwd+bwd,inplace",
                   help="comma-separated: fwd, fwd+bwd, inplace (default: %(default)s)")
    b.add_argument("--threads", type=_nonneg, default=None,
                   help="threads for ce_fast, its read pass and PyTorch (default: each library's default)")
    b.add_argument("--repeat", type=_positive, default=None,
                   help="timed runs per measurement (after --warmup) (default: 3; with --device cuda: 20)")
    b.add_argument("--warmup", type=_nonneg, default=None,
                   help="untimed warm-up runs (default: 1; with --device cuda: 3)")
    b.add_argument("--baseline-repeat", type=_positive, default=None,
                   help="timed runs of the NumPy / PyTorch baselines (default: --repeat, but once when slow)")
    b.add_argument("--slow", type=float, default=1.0,
                   help="a baseline whose first run takes longer (seconds) is timed once (default: %(default)s)")
    b.add_argument("--no-numpy", dest="numpy", action="store_false", help="skip the NumPy baseline")
    b.add_argument("--no-torch", dest="torch", action="store_false", help="skip the PyTorch baseline")
    b.add_argument("--no-copy", dest="copy", action="store_false", help="skip the copy yardstick")
    b.add_argument("--no-compile", dest="compile", action="store_false",
                   help="skip the torch.compile baseline (--device cuda)")
    b.add_argument("--device", choices=sorted(BACKENDS), default="cpu", help="where the logits live (default: %(default)s)")
    b.add_argument("--arrays", choices=["torch", "cupy"], default=None,
                   help="--device cuda inputs: torch CUDA tensors or CuPy arrays (default: torch when PyTorch has "
                        "CUDA, else cupy; bfloat16 needs torch)")
    b.add_argument("--seed", type=int, default=0, help="random seed of the logits and targets (default: %(default)s)")
    b.add_argument("--json", metavar="PATH", default=None, help="also write machine-readable results here")
    b.add_argument("--markdown", metavar="PATH", default=None, help="also write the table as Markdown here")
    b.add_argument("-q", "--quiet", action="store_true", help="no progress messages on stderr")
    return p


def _to_config(ns: argparse.Namespace, argv: List[str]) -> Config:
    """The options with their device-dependent defaults filled in."""
    dev = ns.device
    if ns.sizes is None:
        ns.sizes = GPU_DEFAULT_SIZES if dev == "cuda" else DEFAULT_SIZES
    sizes = ns.sizes if isinstance(ns.sizes, list) else _parse_sizes(ns.sizes)
    dtypes = ns.dtypes if isinstance(ns.dtypes, list) else _parse_list(_DTYPE_ALIASES, "dtype")(ns.dtypes)
    ops = ns.ops if isinstance(ns.ops, list) else _parse_list(_OP_ALIASES, "op")(ns.ops)
    return Config(
        sizes=sizes, dtypes=dtypes, ops=[o for o in OPS if o in ops],
        repeat=ns.repeat if ns.repeat is not None else DEFAULT_REPEAT.get(dev, 3),
        warmup=ns.warmup if ns.warmup is not None else DEFAULT_WARMUP.get(dev, 1),
        threads=ns.threads, numpy=ns.numpy, torch=ns.torch, copy=ns.copy, device=dev,
        slow_s=ns.slow, baseline_repeat=ns.baseline_repeat, seed=ns.seed, argv=list(argv),
        compile=ns.compile, arrays=ns.arrays,
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``ce-fast``; returns the exit code (2 for bad options)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        ns = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a bad option (2)
        return int(e.code or 0)
    if ns.command is None:
        parser.print_help()
        return 2
    if ns.command == "bench":
        cfg = _to_config(ns, argv)
        bad = None
        if cfg.device == "cuda" and any(d not in GPU_DTYPES for d in cfg.dtypes):
            bad = (f"--device cuda benches {', '.join(GPU_DTYPES)}; the CUDA engine has no "
                   f"{', '.join(d for d in cfg.dtypes if d not in GPU_DTYPES)}")
        elif cfg.arrays is not None and cfg.device != "cuda":
            bad = "--arrays applies to --device cuda only"
        if bad:
            print(f"ce-fast bench: error: {bad}", file=sys.stderr)
            return 2
        try:
            results = run_bench(cfg, quiet=ns.quiet)
        except DeviceUnavailable as e:
            print(f"ce-fast: {e}", file=sys.stderr)
            return 3
        print(format_table(results))
        if ns.json:
            with open(ns.json, "w") as f:
                json.dump(results, f, indent=1)
        if ns.markdown:
            with open(ns.markdown, "w") as f:
                f.write(format_markdown(results))
        return 0
    parser.error(f"unknown command {ns.command}")  # pragma: no cover
    return 2


if __name__ == "__main__":
    sys.exit(main())
