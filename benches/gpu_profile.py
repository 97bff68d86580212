"""Where the CUDA engine's time goes, for benches/gpu_check.sh (run on a GPU machine).

For each case it prints the wall time of one call (host work and its one sync included),
the device time of every kernel the call launches (torch.profiler, which sees CuPy's
launches too) and their sum, and then the resources of every ce.cu kernel loaded
(registers, local memory, static shared memory). With --ncu it only runs each case
once, for `ncu` to profile the launches.

    python benches/gpu_profile.py [--ncu]
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict

import torch
import torch.nn.functional as F

import ce_fast
from ce_fast._engines import cuda as ce_cuda

CASES = [
    # (name, rows, classes, dtype, op)
    ("tiny fwd", 16, 1000, torch.float32, "fwd"),
    ("fwd", 16384, 32000, torch.bfloat16, "fwd"),
    ("fwd", 16384, 128256, torch.float32, "fwd"),
    ("fwd+bwd", 16384, 32000, torch.bfloat16, "fused"),
    ("fwd+bwd", 16384, 128256, torch.float32, "fused"),
    ("torch fwd", 16384, 32000, torch.bfloat16, "torch"),
]


def call(op, x, y):
    if op == "fwd":
        return ce_fast.cross_entropy(x, y)
    if op == "fused":
        return ce_fast.cross_entropy_and_grad(x, y)
    return F.cross_entropy(x, y)


def kernel_times(fn, reps: int = 5) -> dict[str, tuple[int, float]]:
    """Kernel name -> (launches per call, device us per call), from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    out: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for ev in prof.events():
        dt = getattr(ev, "device_time", None)
        if dt is None:
            dt = getattr(ev, "cuda_time", 0.0)
        if ev.device_type == torch.autograd.DeviceType.CUDA and dt:
            out[ev.name][0] += 1
            out[ev.name][1] += dt
    return {k: (round(v[0] / reps), v[1] / reps) for k, v in out.items()}


def wall_us(fn, reps: int = 20) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps * 1e6


def sweep(knob: str, values: tuple, op: str, shapes: list) -> None:
    """The longest kernel of `op` (and the call's wall time) for each value of the CUDA
    engine's launch constant `knob`, in microseconds."""
    print(f"\n== {op}: the longest kernel / wall, us, against {knob}")
    saved = getattr(ce_cuda, knob)
    for rows, C, dtype in shapes:
        x = torch.randn(rows, C, device="cuda", dtype=dtype)
        y = torch.randint(0, C, (rows,), device="cuda")
        cells = []
        for v in values:
            setattr(ce_cuda, knob, v)
            for _ in range(3):
                call(op, x, y)
            ks = kernel_times(lambda x=x, y=y: call(op, x, y))
            longest = max(t for _, t in ks.values())
            cells.append(f"{v}: {longest:7.1f} / {wall_us(lambda x=x, y=y: call(op, x, y)):7.1f}")
        setattr(ce_cuda, knob, saved)
        print(f"   {rows}x{C} {str(dtype)[6:]:9} " + "   ".join(cells))
        del x, y
        torch.cuda.empty_cache()


def main() -> None:
    ncu = "--ncu" in sys.argv
    print("torch's stream in CuPy:", type(ce_cuda.torch_stream(0)).__name__)
    torch.manual_seed(0)
    for name, rows, C, dtype, op in CASES:
        x = torch.randn(rows, C, device="cuda", dtype=dtype)
        y = torch.randint(0, C, (rows,), device="cuda")

        def fn(op=op, x=x, y=y):
            return call(op, x, y)

        fn()
        torch.cuda.synchronize()
        if ncu:
            continue
        for _ in range(2):
            fn()
        wall = wall_us(fn)
        ks = kernel_times(fn)
        total = sum(t for _, t in ks.values())
        gb = rows * C * x.element_size() / 1e9
        print(
            f"\n== {name} {rows}x{C} {str(dtype)[6:]}: wall {wall:.0f} us per call, kernels {total:.0f} us "
            f"({gb / (total * 1e-6) if total else 0:.0f} GB/s of logits over kernel time)"
        )
        for k, (n, t) in sorted(ks.items(), key=lambda kv: -kv[1][1]):
            print(f"   {t:9.1f} us  x{n}  {k[:110]}")
        del x, y
        torch.cuda.empty_cache()
    if ncu:
        return
    big = [(16384, 32000, torch.bfloat16), (16384, 128256, torch.bfloat16), (16384, 128256, torch.float32)]
    sweep("VECTORS_PER_THREAD", (8, 16, 32), "fwd", big)
    sweep("VECTORS_PER_THREAD", (8, 16, 32), "fused", big[:2])
    print("\n== kernels loaded (registers, local bytes, static shared bytes, max threads)")
    for (key, kname), ker in sorted(ce_cuda._kernel_file._kernels.items(), key=lambda kv: str(kv[0])):
        try:
            attrs = (ker.num_regs, ker.local_size_bytes, ker.shared_size_bytes, ker.max_threads_per_block)
        except Exception as exc:  # attribute names differ between CuPy versions
            attrs = (f"n/a: {exc}",)
        print(f"   {key!s:12} {kname[:80]:80} {attrs}")


if __name__ == "__main__":
    main()
