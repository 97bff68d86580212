"""``ce-fast bench --plot out.png``: GB/s against vocabulary size, one panel per dtype
(and row count), for ce_fast's forward and fused forward + gradient, NumPy and
PyTorch, with the same run's read pass drawn as the roof.

Speeds are what the table reports (``gbps``: the logits' bytes for the forward, read +
write bytes for forward + gradient, over the median time). matplotlib is an optional
extra (``pip install 'ce_fast[plot]'``); it is imported only when a plot is drawn.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: ``ce-fast bench --plot`` without ``--sizes``: 8k to 256k classes.
PLOT_SIZES = ",".join(f"1024x{2**k}" for k in range(13, 19))

#: (operation in the results, label) of the curves, in drawing order.
OPS = (("fwd", "forward"), ("fwd+bwd", "forward + gradient"))
IMPLS = (("ce_fast", "ce_fast", "C0"), ("numpy", "NumPy", "C1"), ("torch", "PyTorch", "C2"))
STYLE = {"fwd": ("-", "o"), "fwd+bwd": ("--", "s")}


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


MISSING = "--plot needs matplotlib: pip install 'ce_fast[plot]'"


def require_matplotlib() -> Any:
    """matplotlib's pyplot on the non-interactive Agg backend, or PlotUnavailable."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise PlotUnavailable(MISSING) from exc
    return plt


@dataclass
class Panel:
    """The curves of one dtype and row count: x = classes, y = GB/s (None where not run)."""

    dtype: str
    rows: int
    classes: list[int] = field(default_factory=list)
    curves: dict[str, list[float | None]] = field(default_factory=dict)  # label -> GB/s per class count
    roof: list[float | None] = field(default_factory=list)  # the read pass


def panels(results: dict) -> list[Panel]:
    """The plotted numbers of a ``run_bench`` result, grouped by (dtype, rows)."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for case in results.get("cases", []):
        groups.setdefault((case["dtype"], int(case["rows"])), []).append(case)
    out = []
    for (dtype, rows), cases in groups.items():
        cases = sorted(cases, key=lambda c: int(c["classes"]))
        p = Panel(dtype=dtype, rows=rows, classes=[int(c["classes"]) for c in cases])
        p.roof = [_gbps(c.get("yardsticks", {}).get("read")) for c in cases]
        for op, op_label in OPS:
            for impl, impl_label, _ in IMPLS:
                ys = [_gbps(c.get("ops", {}).get(op, {}).get(impl)) for c in cases]
                if any(y is not None for y in ys):
                    p.curves[f"{impl_label} {op_label}"] = ys
        out.append(p)
    return out


def _gbps(entry: Any) -> float | None:
    if not isinstance(entry, dict):
        return None
    v = entry.get("gbps")
    return float(v) if isinstance(v, (int, float)) and v > 0 else None


def _size_label(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def plot(results: dict, path: str) -> list[Panel]:
    """Draws the results into the image file `path` (PNG for ``.png``); returns the panels."""
    plt = require_matplotlib()
    ps = panels(results)
    if not ps:
        raise ValueError("no benchmark cases to plot")
    fig, axes = plt.subplots(1, len(ps), figsize=(6.4 * len(ps), 4.8), squeeze=False)
    for ax, p in zip(axes[0], ps):
        xs = p.classes
        ax.plot(xs, _nan(p.roof), color="black", linewidth=2.5, label="read pass (roof)")
        for label, ys in p.curves.items():
            impl = next(i for i in IMPLS if label.startswith(i[1] + " "))
            op = next(o for o, ol in OPS if label.endswith(" " + ol))
            ls, marker = STYLE[op]
            ax.plot(xs, _nan(ys), color=impl[2], linestyle=ls, marker=marker, label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs)
        ax.set_xticklabels([_size_label(x) for x in xs])
        ax.minorticks_off()
        ax.set_ylim(bottom=0)
        ax.set_xlabel("vocabulary size (classes)")
        ax.set_ylabel("GB/s (forward: bytes read; + gradient: read + written)")
        ax.set_title(f"{p.dtype}, {p.rows} rows")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    machine = results.get("machine", {})
    threads = machine.get("ce_fast_threads")
    fig.suptitle(
        f"ce-fast bench on {machine.get('cpu_model', 'this machine')}" + (f", {threads} threads" if threads else "")
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return ps


def _nan(ys: list[float | None]) -> list[float]:
    return [float("nan") if y is None else y for y in ys]
