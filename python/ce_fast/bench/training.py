"""The training-step table of ``ce-fast bench`` (CPU): ``ce_fast.torch.cross_entropy(z, y)``
then ``.backward()`` against ``F.cross_entropy(z, y)`` then ``.backward()``, on one leaf
tensor of random logits (``.grad`` cleared, untimed, before every step), at the sizes a
training loop uses, from tiny to LLM vocabularies. Each step is timed whole (forward,
backward, autograd's own work and the gradient's allocation), best of a number of runs
that adapts to the step's time (about ``budget_s`` per measurement, 3 to 200 runs).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence
from typing import Any

from .base import say
from .config import Shape, format_size
from .inputs import as_torch, make_logits

#: The default sizes: a tiny model, a 32k vocabulary at a small and a large batch, and
#: Llama 3's 128256 classes.
TRAINING_SIZES = "8x1000,64x32000,512x32000,4096x32000,4096x128256"


def _best_of(step: Callable[[], Any], setup: Callable[[], Any], budget_s: float) -> tuple[float, int]:
    """(best seconds, runs) of ``step`` after one warm-up run; ``setup`` untimed before each."""
    setup()
    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    runs = int(min(200, max(3, budget_s / max(first, 1e-9))))
    best = first
    for _ in range(runs):
        setup()
        t0 = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - t0)
    return best, runs


def run_training(
    sizes: Sequence[Shape], dtypes: Sequence[str], *, seed: int = 0, budget_s: float = 0.5, quiet: bool = True
) -> list[dict]:
    """One record per size and dtype: ce_fast and torch best step times, their ratio,
    and the relative difference of the two losses."""
    records = []
    for shape in sizes:
        for dtype in dtypes:
            records.append(_case(shape, dtype, seed, budget_s, quiet))
            gc.collect()
    return records


def _case(shape: Shape, dtype: str, seed: int, budget_s: float, quiet: bool) -> dict:
    import torch
    import torch.nn.functional as F

    import ce_fast.torch as ct

    label = f"{format_size(shape)} {dtype}"
    say(quiet, f"[training {label}] generating inputs")
    z, y = make_logits(shape, dtype, seed)
    leaf = as_torch(z).reshape(-1, shape[-1]).detach().requires_grad_(True)
    yt = torch.from_numpy(y.reshape(-1))
    del z

    def clear() -> None:
        leaf.grad = None

    losses = {}
    times = {}
    for name, fn in (("ce_fast", ct.cross_entropy), ("torch", F.cross_entropy)):
        say(quiet, f"[training {label}] {name}")

        def step(fn: Callable = fn, name: str = name) -> None:
            loss = fn(leaf, yt)
            loss.backward()
            losses[name] = loss.detach()

        gc.collect()
        times[name] = _best_of(step, clear, budget_s)
    clear()
    a, b = float(losses["ce_fast"]), float(losses["torch"])
    return {
        "shape": list(shape),
        "dtype": dtype,
        "ce_fast_s": times["ce_fast"][0],
        "torch_s": times["torch"][0],
        "runs": [times["ce_fast"][1], times["torch"][1]],
        "speedup_torch": times["torch"][0] / times["ce_fast"][0],
        "loss_rel_diff": abs(a - b) / max(abs(b), 1e-30),
    }


def _t(s: float) -> str:
    return f"{s * 1e6:.0f} us" if s < 1e-3 else f"{s * 1e3:.4g} ms"


def format_training(records: Sequence[dict], markdown: bool = False) -> str:
    """The records as a table (plain text, or Markdown)."""
    head = ["training step (fwd+bwd)", "dtype", "ce_fast.torch", "F.cross_entropy", "vs torch", "loss diff"]
    rows = [
        [
            format_size(r["shape"]),
            r["dtype"],
            _t(r["ce_fast_s"]),
            _t(r["torch_s"]),
            f"{r['speedup_torch']:.2f}x",
            f"{r['loss_rel_diff']:.0e}",
        ]
        for r in records
    ]
    note = (
        "training step: loss = f(z, y); loss.backward() on a leaf, .grad cleared before each step (untimed); "
        "best of 3-200 runs; vs torch = F.cross_entropy time / ce_fast.torch time"
    )
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines) + f"\n\n{note}\n"
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" if i < 2 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*head)] + [fmt.format(*r) for r in rows] + [note])
