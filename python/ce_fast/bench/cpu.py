"""The CPU backend of ``ce-fast bench``: NumPy logits, the Rust engine, NumPy and
PyTorch (CPU) baselines, wall-clock timing and host peak memory.

Per logits shape and dtype (class axis last, C-contiguous) it times, best and median
of ``repeat`` runs after ``warmup`` runs:

yardsticks
    ``read pass``: :func:`ce_fast.bench.inputs.read_pass_fn` (the engine's threads);
    ``copy``: a single-threaded ``np.copyto`` into a prepared buffer (read + write bytes).
``fwd``
    ``ce_fast.cross_entropy(z, y)`` (mean) against :func:`~ce_fast.bench.inputs.numpy_forward`
    and ``F.cross_entropy``.
``fwd+bwd`` / ``fwd+bwd in-place``
    ``ce_fast.cross_entropy_and_grad(z, y)`` into a fresh gradient, and with ``out=z`` on
    a working copy restored (untimed) before every run; both against
    :func:`~ce_fast.bench.inputs.numpy_forward_backward` and ``F.cross_entropy(z, y).backward()``
    on a leaf tensor sharing z's memory (measured once, shared by both).

A baseline whose first run takes longer than ``slow_s`` seconds is run once (no
warm-up) unless ``baseline_repeat`` is given. A baseline that would need more memory
than is available is skipped with a note.
"""

from __future__ import annotations

import functools
import gc
from collections.abc import Callable
from types import MappingProxyType
from typing import Any

import numpy as np

from .. import _core, cross_entropy, cross_entropy_and_grad, get_threads, set_threads
from .base import first_loss, new_case, rel_diff, say
from .config import LOSS_RTOL_NUMPY, LOSS_RTOL_TORCH, Config, Shape, format_size
from .inputs import (
    as_torch,
    clear_grad,
    make_logits,
    numpy_forward,
    numpy_forward_backward,
    read_pass_fn,
    torch_forward,
    torch_forward_backward,
)
from .report import COPY, OP, READ, Column, Layout, Row, op_cell
from .timing import PeakMemory, Timer, mem_available


class CpuBackend:
    """Host arrays (NumPy; PyTorch CPU tensors sharing their memory), timed with the
    wall clock; peak memory is the resident-set growth of the first call."""

    name = "cpu"

    def __init__(self, threads: int | None = None):
        self.threads = threads
        if threads is not None:
            set_threads(threads)
        self.memory = PeakMemory()
        self.timer = Timer(self.sync, self.memory)

    @classmethod
    def from_config(cls, cfg: Config) -> CpuBackend:
        """The backend ``cfg`` asks for."""
        return cls(cfg.threads)

    def sync(self) -> None:
        """Nothing to wait for on the host."""

    def info(self) -> dict:
        """Engine threads, SIMD level and how peak memory is measured."""
        return {
            "device": "cpu",
            "ce_fast_threads": get_threads(),
            "simd": _core.simd_level(),
            "peak_memory_method": self.memory.description,
        }

    def bench_case(self, shape: Shape, dtype: str, cfg: Config, torch_mod: Any, quiet: bool) -> dict:
        """Times the yardsticks and ``cfg.ops`` on random logits of ``shape`` and ``dtype``."""
        case = _CpuCase(self, shape, dtype, cfg, torch_mod, quiet).run()
        gc.collect()  # the case's arrays are gone: collect before the next one is made
        return case


class _CpuCase:
    """One shape and dtype. The arrays live in :meth:`run`'s frame and are passed to
    each measurement, so they are freed when it returns."""

    def __init__(self, backend: CpuBackend, shape: Shape, dtype: str, cfg: Config, torch_mod: Any, quiet: bool):
        self.backend, self.shape, self.dtype, self.cfg, self.torch = (backend, shape, dtype, cfg, torch_mod)
        self.quiet = quiet
        self.label = f"{format_size(shape)} {dtype}"
        self.case: dict = {}
        self.nbytes = 0
        self.run_kw = {"repeat": cfg.repeat, "warmup": cfg.warmup}
        self.base_kw = {
            "repeat": cfg.baseline_repeat if cfg.baseline_repeat is not None else cfg.repeat,
            "warmup": cfg.warmup,
            "slow_s": None if cfg.baseline_repeat is not None else cfg.slow_s,
        }
        # fwd+bwd baselines: measured once, shared by the fresh and the in-place op
        self.np_bwd: dict | None = None
        self.np_bwd_loss: float | None = None
        self.t_bwd: dict | None = None
        self.t_bwd_loss: float | None = None

    def say(self, msg: str) -> None:
        say(self.quiet, f"[{self.label}] {msg}")

    def timed(self, fn: Callable[[], Any], n_bytes: int, **kw: Any) -> tuple[dict, Any]:
        """The timing record of ``fn`` (GB/s of ``n_bytes`` over the best run) and its kept result."""
        t, res = self.backend.timer.time(fn, **kw)
        d = t.to_json()
        d["bytes"] = n_bytes
        d["gbps"] = n_bytes / t.best_s / 1e9
        return d, res

    def mem_ok(self, factor: float) -> bool:
        """Whether a baseline needing ``factor`` float32 copies of the logits fits in memory."""
        avail = mem_available()
        need = factor * self.case["rows"] * self.case["classes"] * 4
        if avail is not None and need > 0.9 * avail:
            self.case["notes"].append(
                f"baseline skipped: needs ~{need / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB available"
            )
            return False
        return True

    def run(self) -> dict:
        self.say("generating inputs")
        z, y = make_logits(self.shape, self.dtype, self.cfg.seed)
        self.nbytes = int(z.nbytes)
        self.case = new_case(self.shape, self.dtype, self.nbytes)
        self.yardsticks(z)
        zt = yt = None
        if self.torch is not None:
            zt = as_torch(z).reshape(-1, self.shape[-1])
            yt = self.torch.from_numpy(y.reshape(-1))
        for op in self.cfg.ops:
            gc.collect()
            if op == "fwd":
                self.forward(z, y, zt, yt)
            else:
                self.forward_backward(op, z, y, zt, yt)
        return self.case

    def yardsticks(self, z: np.ndarray) -> None:
        """A plain read of the same bytes (engine threads) and a copy (NumPy, 1 thread)."""
        self.say("read pass")
        threads = self.backend.threads
        read, _ = self.timed(read_pass_fn(z, threads or 0), self.nbytes, **self.run_kw)
        read["what"] = f"ce_fast._core.read_pass, {threads or get_threads()} threads"
        self.case["yardsticks"]["read"] = read
        if self.cfg.copy:
            self.say("copy")
            dst = np.empty_like(z)
            cp, _ = self.timed(functools.partial(np.copyto, dst, z), 2 * self.nbytes, **self.run_kw)
            del dst
            cp["what"] = "numpy.copyto, 1 thread (read + write bytes)"
            self.case["yardsticks"]["copy"] = cp

    def forward(self, z: np.ndarray, y: np.ndarray, zt: Any, yt: Any) -> None:
        losses: dict[str, float | None] = {}
        np_res = t_res = None
        n = self.nbytes
        self.say("fwd: ce_fast")
        ce_res, loss = self.timed(functools.partial(cross_entropy, z, y), n, **self.run_kw)
        losses["ce_fast"] = float(loss)
        if self.cfg.numpy and self.mem_ok(4 + (1 if self.dtype != "float32" else 0)):
            self.say("fwd: numpy")
            np_res, losses["numpy"] = self.timed(functools.partial(numpy_forward, z, y), n, **self.base_kw)
        if zt is not None and self.mem_ok(3):
            self.say("fwd: torch")
            t_res, loss_t = self.timed(functools.partial(torch_forward, zt, yt), n, **self.base_kw)
            losses["torch"] = float(loss_t)
        self.finish("fwd", ce_res, np_res, t_res, losses)

    def forward_backward(self, op: str, z: np.ndarray, y: np.ndarray, zt: Any, yt: Any) -> None:
        losses: dict[str, float | None] = {}
        n = 2 * self.nbytes
        if op == "fwd+bwd":
            self.say("fwd+bwd: ce_fast")
            ce_res, losses["ce_fast"] = self.timed(
                functools.partial(cross_entropy_and_grad, z, y), n, keep=first_loss, **self.run_kw
            )
        else:
            self.say("fwd+bwd in-place: ce_fast")
            work = np.array(z, copy=True)
            ce_res, losses["ce_fast"] = self.timed(
                functools.partial(cross_entropy_and_grad, work, y, out=work),
                n,
                setup=functools.partial(np.copyto, work, z),
                keep=first_loss,
                **self.run_kw,
            )
            del work  # freed before the baselines run
        gc.collect()
        if self.cfg.numpy:
            if self.np_bwd is None and self.mem_ok(5 + (1 if self.dtype != "float32" else 0)):
                self.say("fwd+bwd: numpy")
                self.np_bwd, self.np_bwd_loss = self.timed(
                    functools.partial(numpy_forward_backward, z, y), n, keep=first_loss, **self.base_kw
                )
                gc.collect()
            if self.np_bwd_loss is not None:
                losses["numpy"] = self.np_bwd_loss
        if zt is not None:
            if self.t_bwd is None and self.mem_ok(5):
                self.say("fwd+bwd: torch")
                leaf = zt.detach().requires_grad_(True)
                # clear_grad: the previous gradient is freed outside the clock
                self.t_bwd, loss_t = self.timed(
                    functools.partial(torch_forward_backward, leaf, yt),
                    n,
                    setup=functools.partial(clear_grad, leaf),
                    **self.base_kw,
                )
                self.t_bwd_loss = float(loss_t)
                leaf.grad = None
                del leaf
                gc.collect()
            if self.t_bwd_loss is not None:
                losses["torch"] = self.t_bwd_loss
        self.finish(op, ce_res, self.np_bwd if self.cfg.numpy else None, self.t_bwd if zt is not None else None, losses)

    def finish(self, op: str, ce_res: dict, np_res: dict | None, t_res: dict | None, losses: dict) -> None:
        """The op's record: speeds, shares, speed-ups and the loss check."""
        case = self.case
        rec: dict[str, Any] = {"ce_fast": ce_res, "numpy": np_res, "torch": t_res}
        rec["gbps"] = ce_res["gbps"]
        rec["share_of_read"] = ce_res["gbps"] / case["yardsticks"]["read"]["gbps"]
        if "copy" in case["yardsticks"] and op != "fwd":
            rec["share_of_copy"] = ce_res["gbps"] / case["yardsticks"]["copy"]["gbps"]
        rec["speedup_numpy"] = np_res["best_s"] / ce_res["best_s"] if np_res else None
        rec["speedup_torch"] = t_res["best_s"] / ce_res["best_s"] if t_res else None
        rec["peak_rss_bytes"] = ce_res["peak_rss_bytes"]
        rec["loss"] = losses
        rec["loss_rel_diff"] = {
            "numpy": rel_diff(losses.get("ce_fast"), losses.get("numpy")),
            "torch": rel_diff(losses.get("ce_fast"), losses.get("torch")),
        }
        d_np, d_t = rec["loss_rel_diff"]["numpy"], rec["loss_rel_diff"]["torch"]
        ok = not (d_np is not None and d_np > LOSS_RTOL_NUMPY)
        ok = ok and not (d_t is not None and d_t > LOSS_RTOL_TORCH.get(self.dtype, 1e-2))
        rec["loss_ok"] = ok
        if not ok:
            case["notes"].append(f"{op}: loss mismatch {rec['loss_rel_diff']}")
        case["ops"][op] = rec


# ---------------------------------------------------------------------------
# the table


def _ms(t: dict | None) -> str:
    if not t:
        return "-"
    v = t["best_s"] * 1e3
    s = f"{v:.4g}" if v < 1e4 else f"{v:.0f}"
    return s + ("*" if t.get("single_run") else "")


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.3g}x"


def _mb(b: int | None) -> str:
    return "-" if b is None else f"{b / 2**20:.0f}"


def _best(row: Row) -> str:
    return _ms(row.timing)


def _median(row: Row) -> str:
    return f"{row.timing['median_s'] * 1e3:.4g}" if row.timing else ""


def _gbps(row: Row) -> str:
    return f"{row.timing['gbps']:.1f}" if row.timing else ""


def _share_of_read(row: Row) -> str:
    if row.kind == READ:
        return "100%"
    if row.kind == COPY:
        return f"{row.record['gbps'] / row.yardsticks['read']['gbps']:.0%}"
    if row.kind == OP:
        return f"{row.record['share_of_read']:.0%}"
    return ""


def _peak(rec: dict) -> str:
    parts = [_mb(rec["ce_fast"].get("peak_rss_bytes"))]
    for k in ("numpy", "torch"):
        parts.append(_mb(rec[k].get("peak_rss_bytes")) if rec.get(k) else "-")
    return " / ".join(parts)


def _check(rec: dict) -> str:
    diffs = [v for v in rec["loss_rel_diff"].values() if v is not None]
    return "-" if not diffs else (("ok " if rec["loss_ok"] else "BAD ") + f"{max(diffs):.0e}")


class CpuLayout(Layout):
    """The CPU table: times, GB/s, share of the read pass, NumPy and torch baselines,
    peak RSS, loss check."""

    yardstick_names = MappingProxyType({READ: "read pass", COPY: "copy (np, 1 thr)"})
    columns = (
        Column("best ms", _best),
        Column("median ms", _median),
        Column("GB/s", _gbps),
        Column("% read", _share_of_read),
        Column("NumPy ms", op_cell(lambda r: _ms(r["numpy"]))),
        Column("vs NumPy", op_cell(lambda r: _x(r["speedup_numpy"]))),
        Column("torch ms", op_cell(lambda r: _ms(r["torch"]))),
        Column("vs torch", op_cell(lambda r: _x(r["speedup_torch"]))),
        Column("peak RSS +MiB ce/np/torch", op_cell(_peak)),
        Column("loss check", op_cell(_check), "left"),
    )
    markdown_keys = (
        "cpu_model",
        "cores",
        "cores_usable",
        "memory_bytes",
        "simd",
        "ce_fast_threads",
        "torch_threads",
        "platform",
        "python",
        "numpy",
        "ml_dtypes",
        "torch",
        "ce_fast",
        "git_commit",
        "date",
        "peak_memory_method",
    )

    def machine_line(self, results: dict) -> str:
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

    def notes(self, results: dict) -> list[str]:
        cfg = results["config"]
        m = results["machine"]
        return [
            (
                f"times: best (and median) of {cfg['repeat']} runs after {cfg['warmup']} warm-up; "
                "GB/s = bytes of logits (fwd, read pass) or read + write bytes (fwd+bwd, copy) / best time, GB = 1e9 B"
            ),
            (
                "% read = GB/s / read-pass GB/s of the same array in the same run; "
                "vs NumPy / vs torch = baseline best time / ce_fast best time"
            ),
            (
                "NumPy: max/exp/sum/log in float32 (bf16 cast to float32 inside the timed call), single-threaded; "
                "fwd+bwd adds softmax/N - onehot/N. torch: F.cross_entropy (fwd+bwd: .backward() on a leaf), "
                f"{m.get('torch_threads', '-')} threads"
            ),
            (
                "* baseline ran once without warm-up (first run slower than "
                f"{cfg['slow_s']} s); use --baseline-repeat N to force N runs"
            ),
            (
                f"peak RSS: {m.get('peak_memory_method', '-')}; measured on the first (warm-up) call of ce_fast / "
                "NumPy / torch; memory the allocator recycles without new pages (e.g. buffers under glibc's 32 MiB "
                "mmap threshold) does not show"
            ),
            (
                "loss check: max relative difference of ce_fast's loss to the NumPy / torch loss "
                f"(tolerance {LOSS_RTOL_NUMPY:g} vs NumPy; torch bf16 returns a bf16-rounded loss)"
            ),
        ]


BACKEND = CpuBackend
LAYOUT = CpuLayout()
