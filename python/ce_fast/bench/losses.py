"""``ce-fast bench --loss NAME``: one loss timed against the PyTorch way of computing it,
with a plain read pass over the same input bytes (both arrays for the KL) and, for focal,
``ce_fast.cross_entropy`` on the same logits, all measured in the same run.

``LOSSES`` is the table of benchable losses, keyed by the ``--loss`` name (``ce`` is the
full cross-entropy bench of :mod:`ce_fast.bench`). Each entry makes its inputs from the
logits and targets of :func:`~ce_fast.bench.inputs.make_logits` and names what is timed.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .base import say
from .config import Shape, format_size
from .inputs import as_torch, make_logits, read_pass_fn

#: Default size of the per-loss benches: an LLM's logits (Llama 3 vocabulary).
DEFAULT_LOSS_SIZES = "4096x128256"
TEMPERATURE = 2.0


@dataclass
class Inputs:
    arrays: list  # NumPy arrays the loss reads (their bytes are the read yardstick)
    y: np.ndarray
    torch: list = field(default_factory=list)  # the same arrays as CPU torch tensors
    yt: Any = None


def _kl_inputs(z: np.ndarray, y: np.ndarray, seed: int) -> Inputs:
    teacher, _ = make_logits(z.shape, str(z.dtype), seed=seed + 1)
    return Inputs([z, teacher], y)


def _one(z: np.ndarray, y: np.ndarray, seed: int) -> Inputs:
    return Inputs([z], y)


def _torch_kl(s, t, y):
    import torch.nn.functional as F

    T = TEMPERATURE
    ls = F.log_softmax(s / T, -1)
    lt = F.log_softmax(t / T, -1)
    return F.kl_div(ls, lt, log_target=True, reduction="batchmean")


def _torch_focal(z, y):
    import torch
    import torch.nn.functional as F

    lp = F.log_softmax(z, -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
    return (-((-torch.expm1(lp)) ** 2.0) * lp).mean()


def _torch_ce(z, y):
    import torch.nn.functional as F

    return F.cross_entropy(z, y)


@dataclass(frozen=True)
class LossBench:
    what: str  # the ce_fast call, in words
    torch_what: str  # the PyTorch way, in words
    inputs: Callable[[np.ndarray, np.ndarray, int], Inputs]
    ce_fast: Callable[..., Any]  # (*arrays, y) -> loss
    torch: Callable[..., Any]  # (*tensors, yt) -> loss
    compare_ce: bool = False  # also time cross_entropy on the same logits


def _ce_fast_kl(s, t, y):
    import ce_fast

    return ce_fast.kl_divergence(s, t, temperature=TEMPERATURE)


def _ce_fast_focal(z, y):
    import ce_fast

    return ce_fast.focal_loss(z, y, gamma=2.0)


def _ce_fast_ce(z, y):
    import ce_fast

    return ce_fast.cross_entropy(z, y)


#: The losses ``--loss`` takes, by name.
LOSSES: dict[str, LossBench] = {
    "ce": LossBench("ce_fast.cross_entropy (mean)", "F.cross_entropy", _one, _ce_fast_ce, _torch_ce),
    "kl": LossBench(
        f"ce_fast.kl_divergence(s, t, temperature={TEMPERATURE})",
        f"F.kl_div(F.log_softmax(s/T), F.log_softmax(t/T), log_target=True), T={TEMPERATURE}",
        _kl_inputs,
        _ce_fast_kl,
        _torch_kl,
    ),
    "focal": LossBench(
        "ce_fast.focal_loss(z, y, gamma=2)",
        "-(1 - p_y)**2 log p_y from F.log_softmax + gather",
        _one,
        _ce_fast_focal,
        _torch_focal,
        compare_ce=True,
    ),
}


def _all(calls: list) -> list:
    return [c() for c in calls]


def _best(fn: Callable[[], Any], repeat: int, warmup: int) -> tuple[float, Any]:
    out = None
    for _ in range(warmup):
        out = fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def bench_loss(
    name: str,
    sizes: list[Shape],
    dtypes: list[str],
    *,
    repeat: int = 3,
    warmup: int = 1,
    threads: int = 0,
    torch: bool = True,
    seed: int = 0,
    quiet: bool = False,
) -> list[dict]:
    """Times loss `name` on every size and dtype; one record per case with the times in
    seconds of ``read`` (all input bytes once), ``ce_fast``, ``torch`` (None when skipped)
    and ``cross_entropy`` (focal only), and the bytes read."""
    lb = LOSSES[name]
    records = []
    for shape in sizes:
        for dtype in dtypes:
            say(quiet, f"[{name}] {format_size(shape)} {dtype}: making inputs")
            z, y = make_logits(shape, dtype, seed=seed)
            inp = lb.inputs(z, y, seed)
            nbytes = sum(a.nbytes for a in inp.arrays)
            reads = [read_pass_fn(a, threads) for a in inp.arrays]
            rec: dict[str, Any] = {"loss": name, "shape": list(shape), "dtype": dtype, "bytes": nbytes}
            rec["read"], _ = _best(functools.partial(_all, reads), repeat, warmup)
            rec["ce_fast"], loss = _best(functools.partial(lb.ce_fast, *inp.arrays, y), repeat, warmup)
            rec["value"] = float(loss)
            rec["cross_entropy"] = None
            if lb.compare_ce:
                rec["cross_entropy"], _ = _best(functools.partial(_ce_fast_ce, z, y), repeat, warmup)
            rec["torch"] = None
            if torch:
                import torch as _torch

                if threads:
                    _torch.set_num_threads(threads)
                ts = [as_torch(a) for a in inp.arrays]
                yt = _torch.from_numpy(y)
                with _torch.no_grad():
                    rec["torch"], ref = _best(functools.partial(lb.torch, *ts, yt), 1, 0)
                rec["torch_value"] = float(ref)
            records.append(rec)
    return records


def format_loss_table(records: list[dict]) -> str:
    """A plain-text table of :func:`bench_loss` records."""
    head = (
        "loss",
        "size",
        "dtype",
        "read ms",
        "ce_fast ms",
        "GB/s",
        "% read",
        "torch ms",
        "vs torch",
        "CE ms",
        "vs CE",
    )
    rows = [head]
    for r in records:
        gbs = r["bytes"] / r["ce_fast"] / 1e9
        t = r["torch"]
        ce = r["cross_entropy"]
        rows.append(
            (
                r["loss"],
                format_size(r["shape"]),
                r["dtype"],
                f"{r['read'] * 1e3:.1f}",
                f"{r['ce_fast'] * 1e3:.1f}",
                f"{gbs:.1f}",
                f"{100 * r['read'] / r['ce_fast']:.0f}%",
                "" if t is None else f"{t * 1e3:.0f}",
                "" if t is None else f"{t / r['ce_fast']:.1f}x",
                "" if ce is None else f"{ce * 1e3:.1f}",
                "" if ce is None else f"{r['ce_fast'] / ce:.2f}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows)
