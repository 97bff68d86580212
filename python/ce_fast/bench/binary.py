"""``ce-fast bench --loss bce``: ``ce_fast.binary_cross_entropy_with_logits`` against
``torch.nn.functional.binary_cross_entropy_with_logits`` on the same CPU tensors.

Per logits shape and dtype (targets 0/1 of the logits' dtype, C-contiguous):

``fwd``
    ``binary_cross_entropy_with_logits(z, t)`` (mean), ce_fast and PyTorch.
``fwd+bwd``
    ce_fast: ``binary_cross_entropy_with_logits_and_grad(z, t)`` into a fresh gradient
    (one fused pass). PyTorch: the forward and ``.backward()`` on a leaf sharing z.

Bytes counted: logits and targets read once (``fwd``), plus the gradient written
(``fwd+bwd``). The yardstick is a plain read pass over the same bytes (ce_fast's own
``read_pass``, the engine's threads) measured in the same run. Times are the best of
``repeat`` runs after ``warmup``.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

DEFAULT_SIZES = "16384x4096"


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what platform reports."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _best(fn: Callable[[], Any], repeat: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def run_bce(
    sizes: list[tuple[int, ...]],
    dtypes: list[str],
    *,
    repeat: int = 3,
    warmup: int = 1,
    threads: int | None = None,
    seed: int = 0,
    quiet: bool = False,
) -> list[dict]:
    """One row per (shape, dtype, op): seconds and GB/s of ce_fast and PyTorch."""
    import torch

    import ce_fast

    if threads is not None:
        ce_fast.set_threads(threads)
        torch.set_num_threads(threads or os.cpu_count() or 1)
    g = torch.Generator().manual_seed(seed)
    rows: list[dict] = []
    for shape in sizes:
        for name in dtypes:
            z = (torch.randn(shape, generator=g) * 3).to(getattr(torch, name))
            t = (torch.rand(shape, generator=g) > 0.5).to(z.dtype)
            if not quiet:
                print(f"bench bce {'x'.join(map(str, shape))} {name}", file=sys.stderr)
            rows += _case(z, t, name, repeat, warmup)
    return rows


def _case(z: Any, t: Any, name: str, repeat: int, warmup: int) -> list[dict]:
    """The rows of one logits tensor `z` and its targets `t`."""
    import torch.nn.functional as F

    import ce_fast

    from .inputs import read_pass_fn

    nbytes = z.numel() * z.element_size() * 2
    read_z, read_t = read_pass_fn(z), read_pass_fn(t)

    def read():
        read_z()
        read_t()

    leaf = z.detach().requires_grad_()

    def torch_fwd_bwd():
        F.binary_cross_entropy_with_logits(leaf, t).backward()
        leaf.grad = None

    read_s = _best(read, repeat, warmup)
    cases = {
        "fwd": (
            lambda: ce_fast.binary_cross_entropy_with_logits(z, t),
            lambda: F.binary_cross_entropy_with_logits(z, t),
            nbytes,
        ),
        "fwd+bwd": (
            lambda: ce_fast.binary_cross_entropy_with_logits_and_grad(z, t),
            torch_fwd_bwd,
            nbytes + nbytes // 2,
        ),
    }
    rows = []
    for op, (ours, theirs, nb) in cases.items():
        a = _best(ours, repeat, warmup)
        b = _best(theirs, repeat, warmup)
        rows.append(
            {
                "shape": "x".join(map(str, z.shape)),
                "dtype": name,
                "op": op,
                "ce_fast_s": a,
                "torch_s": b,
                "ce_fast_gbs": nb / a / 1e9,
                "read_gbs": nbytes / read_s / 1e9,
                "speedup_vs_torch": b / a,
            }
        )
    return rows


def format_bce(rows: list[dict]) -> str:
    """A text table of :func:`run_bce`'s rows, with the CPU and kernel set."""
    from ce_fast import _core, get_threads

    head = f"binary_cross_entropy_with_logits on {cpu_model()}, kernels {_core.simd_level()}, {get_threads()} threads"
    lines = [
        head,
        f"{'shape':>12} {'dtype':>9} {'op':>8} {'ce_fast ms':>11} {'torch ms':>9} {'GB/s':>7} "
        f"{'read GB/s':>10} {'x torch':>8}",
    ]
    for r in rows:
        lines.append(
            f"{r['shape']:>12} {r['dtype']:>9} {r['op']:>8} {r['ce_fast_s'] * 1e3:>11.1f} {r['torch_s'] * 1e3:>9.1f} "
            f"{r['ce_fast_gbs']:>7.2f} {r['read_gbs']:>10.2f} {r['speedup_vs_torch']:>8.2f}"
        )
    return "\n".join(lines)
