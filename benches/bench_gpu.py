"""GPU benchmark of ce_fast's CUDA engine (a standalone script; no pytest needed).

    python benches/bench_gpu.py
    python benches/bench_gpu.py --sizes 16384x128256 --dtypes bfloat16 --iters 50

For each ROWS x CLASSES and dtype (default 16384 x {32000, 128256, 262144}, bfloat16 and
float32) it measures, with CUDA events on the current stream (median of --iters runs
after --warmup runs):

- the machine's yardsticks on the same array: a read pass (a 16-byte-load read-reduce
  kernel, ce_fast._cuda.read_pass) and a copy (cupy.copyto into a second buffer);
- ce_fast forward: logsumexp (the statistics kernel alone) and cross_entropy (mean:
  target check, kernel, reduction), as GB/s of the logits read once and as a share of
  the read pass;
- ce_fast fused loss + gradient (cross_entropy_and_grad into a preallocated buffer),
  as GB/s of one read and one write of the logits and as a share of the copy;
- PyTorch on the same tensors: F.cross_entropy eager forward, eager forward + backward
  (torch.autograd.grad), and the same under torch.compile.

Prints two Markdown tables headed by the device name. Cases that run out of memory
(262144 classes in float32 is 17 GB per array) print "OOM" in their cells.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
from typing import Callable, List, Optional

DEFAULT_SIZES = "16384x32000,16384x128256,16384x262144"
DEFAULT_DTYPES = "bfloat16,float32"


def _parse_sizes(text: str):
    out = []
    for item in text.split(","):
        r, c = item.lower().split("x")
        out.append((int(r), int(c)))
    return out


class OOM(Exception):
    pass


class Bench:
    def __init__(self, iters: int, warmup: int):
        import cupy as cp
        import torch

        self.cp, self.torch = cp, torch
        self.iters, self.warmup = iters, warmup

    def time_ms(self, fn: Callable[[], object]) -> float:
        """Median milliseconds of fn() on torch's current stream (CUDA events)."""
        torch = self.torch
        try:
            for _ in range(self.warmup):
                fn()
            torch.cuda.synchronize()
            times = []
            for _ in range(self.iters):
                a = torch.cuda.Event(enable_timing=True)
                b = torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b))
            return statistics.median(times)
        except (torch.cuda.OutOfMemoryError, self.cp.cuda.memory.OutOfMemoryError) as exc:
            raise OOM() from exc
        except RuntimeError as exc:
            if "out of memory" in str(exc).lower():
                raise OOM() from exc
            raise

    def free(self):
        gc.collect()
        self.torch.cuda.synchronize()
        self.torch.cuda.empty_cache()
        self.cp.get_default_memory_pool().free_all_blocks()


def _gbs(nbytes: float, ms: Optional[float]) -> Optional[float]:
    return None if ms is None else nbytes / (ms * 1e-3) / 1e9


def _fmt(v: Optional[float], unit: str = "") -> str:
    if v is None:
        return "OOM"
    if unit == "%":
        return f"{v:.0f}%"
    if unit == "x":
        return f"{v:.2f}x"
    if unit == "ms":
        return f"{v:.3f}"
    return f"{v:.0f}"


def run_case(bench: Bench, rows: int, C: int, dtype: str, use_compile: bool, check: bool) -> dict:
    import ce_fast
    from ce_fast import _cuda

    torch, cp = bench.torch, bench.cp
    F = torch.nn.functional
    tdt = getattr(torch, dtype)
    item = torch.tensor([], dtype=tdt).element_size()
    nbytes = rows * C * item
    res = {"dtype": dtype, "rows": rows, "C": C}

    def attempt(key, fn):
        try:
            res[key] = bench.time_ms(fn)
        except OOM:
            res[key] = None
            bench.free()

    try:
        x = torch.randn(rows, C, device="cuda", dtype=torch.float32).mul_(2.0).to(tdt)
        y = torch.randint(0, C, (rows,), device="cuda")
    except torch.cuda.OutOfMemoryError:
        return dict(res, oom=True)

    # Yardsticks: one read of the array, and a copy of it.
    attempt("read", lambda: _cuda.read_pass(x))
    dst = None
    try:
        dst = torch.empty_like(x)
    except torch.cuda.OutOfMemoryError:
        res["copy"] = res["fused"] = None
    if dst is not None:
        src_c = cp.from_dlpack(x.view(torch.int16))  # CuPy has no bfloat16: copy the bits
        dst_c = cp.from_dlpack(dst.view(torch.int16))
        stream = cp.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)

        def copy():
            with stream:
                cp.copyto(dst_c, src_c)

        attempt("copy", copy)
        del src_c, dst_c
    # ce_fast forward: the statistics kernel alone, and the whole mean loss.
    attempt("lse", lambda: ce_fast.logsumexp(x))
    attempt("ce", lambda: ce_fast.cross_entropy(x, y))
    # ce_fast fused loss + gradient into the preallocated buffer.
    if dst is not None:
        attempt("fused", lambda: ce_fast.cross_entropy_and_grad(x, y, out=dst))
        if check:
            k = min(64, rows)
            got = ce_fast.cross_entropy(x[:k], y[:k], reduction="none")
            res["check_loss"] = float((got - F.cross_entropy(x[:k].float(), y[:k], reduction="none")).abs().max())
            ce_fast.cross_entropy_and_grad(x, y, out=dst)  # mean over all rows
            xr = x[:k].float().requires_grad_()
            (F.cross_entropy(xr, y[:k], reduction="sum") / rows).backward()
            res["check_grad"] = float((dst[:k].float() - xr.grad).abs().max())
            del got, xr
    dst = None
    bench.free()

    # PyTorch eager.
    with torch.no_grad():
        attempt("t_fwd", lambda: F.cross_entropy(x, y))
    xr = x.detach().requires_grad_()

    def fwd_bwd(f):
        def run():
            loss = f(xr, y)
            (g,) = torch.autograd.grad(loss, xr)
            return g

        return run

    attempt("t_fb", fwd_bwd(F.cross_entropy))
    bench.free()
    if use_compile:
        try:
            cf = torch.compile(F.cross_entropy)

            def cfwd():
                with torch.no_grad():
                    return cf(x, y)

            attempt("c_fwd", cfwd)
            bench.free()
            attempt("c_fb", fwd_bwd(cf))
        except Exception as exc:  # compile failures are reported, not fatal
            print(f"# torch.compile failed for {dtype} {rows}x{C}: {type(exc).__name__}: {exc}", file=sys.stderr)
            res.setdefault("c_fwd", None)
            res.setdefault("c_fb", None)
    del xr, x, y
    bench.free()
    res["bytes"] = nbytes
    return res


def tables(results: List[dict], device: str, use_compile: bool) -> str:
    lines = [f"## ce_fast CUDA engine on {device}", ""]
    lines.append("Forward (bytes = the logits read once). GB/s and share of the read pass; "
                 "times in ms; speed-up = PyTorch time / ce_fast cross_entropy time.")
    lines.append("")
    head = ["dtype", "rows x C", "read pass GB/s", "logsumexp GB/s", "% of read", "cross_entropy ms",
            "cross_entropy GB/s", "torch eager ms", "speed-up"]
    if use_compile:
        head += ["torch.compile ms", "speed-up"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        if r.get("oom"):
            lines.append(f"| {r['dtype']} | {r['rows']} x {r['C']} | " + " | ".join(["OOM"] * (len(head) - 2)) + " |")
            continue
        nb = r["bytes"]
        read, lse, ce = _gbs(nb, r.get("read")), _gbs(nb, r.get("lse")), r.get("ce")
        cells = [r["dtype"], f"{r['rows']} x {r['C']}", _fmt(read), _fmt(lse),
                 _fmt(None if read is None or lse is None else 100 * lse / read, "%"),
                 _fmt(ce, "ms"), _fmt(_gbs(nb, ce)), _fmt(r.get("t_fwd"), "ms"),
                 _fmt(None if ce is None or r.get("t_fwd") is None else r["t_fwd"] / ce, "x")]
        if use_compile:
            cells += [_fmt(r.get("c_fwd"), "ms"),
                      _fmt(None if ce is None or r.get("c_fwd") is None else r["c_fwd"] / ce, "x")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Loss + gradient (bytes = the logits read once and the gradient written once). "
              "GB/s and share of a copy; speed-up = PyTorch forward+backward time / ce_fast fused time.", ""]
    head = ["dtype", "rows x C", "copy GB/s", "fused ms", "fused GB/s", "% of copy", "torch eager fwd+bwd ms",
            "speed-up"]
    if use_compile:
        head += ["torch.compile fwd+bwd ms", "speed-up"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        if r.get("oom"):
            lines.append(f"| {r['dtype']} | {r['rows']} x {r['C']} | " + " | ".join(["OOM"] * (len(head) - 2)) + " |")
            continue
        nb2 = 2 * r["bytes"]
        copy, fused = _gbs(nb2, r.get("copy")), r.get("fused")
        fgbs = _gbs(nb2, fused)
        cells = [r["dtype"], f"{r['rows']} x {r['C']}", _fmt(copy), _fmt(fused, "ms"), _fmt(fgbs),
                 _fmt(None if copy is None or fgbs is None else 100 * fgbs / copy, "%"),
                 _fmt(r.get("t_fb"), "ms"),
                 _fmt(None if fused is None or r.get("t_fb") is None else r["t_fb"] / fused, "x")]
        if use_compile:
            cells += [_fmt(r.get("c_fb"), "ms"),
                      _fmt(None if fused is None or r.get("c_fb") is None else r["c_fb"] / fused, "x")]
        lines.append("| " + " | ".join(cells) + " |")
    checks = [r for r in results if "check_grad" in r]
    if checks:
        lines += ["", "Checks against PyTorch (max |grad difference| on 64 rows, |loss difference|): " + "; ".join(
            f"{r['dtype']} {r['rows']}x{r['C']}: {r['check_grad']:.2e}, {r['check_loss']:.2e}" for r in checks)]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default=DEFAULT_SIZES, help=f"ROWSxCLASSES list (default {DEFAULT_SIZES})")
    p.add_argument("--dtypes", default=DEFAULT_DTYPES, help=f"dtype list (default {DEFAULT_DTYPES})")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    p.add_argument("--no-check", action="store_true", help="skip the correctness check against PyTorch")
    args = p.parse_args(argv)
    try:
        import cupy  # noqa: F401
        import torch
    except ImportError as exc:
        print(f"bench_gpu needs CuPy and PyTorch with CUDA: {exc}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("bench_gpu needs a CUDA device", file=sys.stderr)
        return 2
    bench = Bench(args.iters, args.warmup)
    device = torch.cuda.get_device_name()
    results = []
    for dtype in [d.strip() for d in args.dtypes.split(",") if d.strip()]:
        for rows, C in _parse_sizes(args.sizes):
            print(f"# {dtype} {rows}x{C} ...", file=sys.stderr, flush=True)
            results.append(run_case(bench, rows, C, dtype, not args.no_compile, not args.no_check))
    print(tables(results, device, not args.no_compile))
    return 0


if __name__ == "__main__":
    sys.exit(main())
