"""Host time of one CUDA-engine call, measured without a GPU.

The CUDA engine (ce_fast._engines.cuda) runs here on NumPy arrays with every kernel
launch a no-op: tests/kernel_emulator.py's NumPy stand-in for CuPy, with a null kernel
library in place of the emulator. What is left is the engine's own Python: operands,
options, the batch, the target check's read back, the rules' trace-cache lookup,
argument typing, allocations. CuPy's and torch's own per-call costs on a real device
(launches, the caching-allocator callbacks, stream objects, DLPack) are not in it.

    PYTHONPATH=python python benches/host_overhead.py [--profile] [--calls N] [--rows R] [--classes C]

prints the best per-call time (microseconds, best of several rounds) of each case and,
with --profile, the Python function calls per engine call and the top costs (cProfile).
On a GPU machine, ``--cuda`` times the same calls on torch CUDA tensors for real (each
followed by a device sync) next to ``torch.nn.functional.cross_entropy``; with
``--profile`` the cProfile listing then includes CuPy's and torch's own Python.
Under no-op kernels NumPy stands in for CuPy: its arrays' addresses cost more to read
than CuPy's, and CuPy's own per-call costs are missing, so compare runs, not machines.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import ce_fast  # noqa: E402

import kernel_emulator  # noqa: E402  (tests/: the NumPy stand-in for CuPy)

ALLOCATING = ("empty", "zeros", "ones", "full", "empty_like", "zeros_like", "ones_like", "full_like", "concatenate")


class NullKernels:
    """A kernel library whose launches do nothing but count (in place of the emulator)."""

    def __init__(self) -> None:
        self.launches = 0
        self.allocations = 0  # calls of CuPy's allocating functions (ALLOCATING)

    def _launch(self, grid: Any, block: Any, args: Any, **kw: Any) -> None:
        self.launches += 1

    def function(self, *key_and_name: Any) -> Callable:
        return self._launch

    def generated(self, program: Any) -> Callable:
        return self._launch


@contextlib.contextmanager
def null_engine(sms: int = 132, l2: int = 60 << 20):
    """NumPy inputs run through the CUDA engine with no-op kernels (an H200's 132 SMs)."""
    kernels = NullKernels()
    import ce_fast.torch as cet

    saved = cet._plain_call
    cet._plain_call = lambda *a: None  # CPU tensors would take the CPU's lean path
    try:
        with kernel_emulator.emulated_engine(kernels, sms=sms, l2=l2):  # type: ignore[arg-type]
            from ce_fast._engines import cuda

            fake = cuda.xp()
            for name in ALLOCATING:
                setattr(fake, name, _counting(kernels, getattr(fake, name)))
            yield kernels
    finally:
        cet._plain_call = saved


def _counting(kernels: NullKernels, fn: Callable) -> Callable:
    def call(*args: Any, **kwargs: Any) -> Any:
        kernels.allocations += 1
        return fn(*args, **kwargs)

    return call


def cases(rows: int, classes: int) -> dict[str, Callable[[], Any]]:
    import torch

    import ce_fast.torch as cet

    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, classes)).astype(np.float32)
    y = rng.integers(0, classes, rows)
    xt = torch.from_numpy(x).requires_grad_()
    yt = torch.from_numpy(y)

    def torch_fwd_bwd():
        cet.cross_entropy(xt, yt).backward()
        xt.grad = None

    return {
        "cross_entropy": lambda: ce_fast.cross_entropy(x, y),
        "cross_entropy_and_grad": lambda: ce_fast.cross_entropy_and_grad(x, y),
        "torch fwd+bwd": torch_fwd_bwd,
    }


def cuda_cases(rows: int, classes: int) -> dict[str, Callable[[], Any]]:
    """The same calls on torch CUDA tensors (a GPU machine), each ending in a device sync,
    with PyTorch's own cross-entropy as the yardstick."""
    import torch
    import torch.nn.functional as F

    import ce_fast.torch as cet

    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(rows, classes, device="cuda", generator=gen)
    y = torch.randint(0, classes, (rows,), device="cuda", generator=gen)
    xg = x.clone().requires_grad_()
    sync = torch.cuda.synchronize

    def ce_torch_fwd_bwd():
        cet.cross_entropy(xg, y).backward()
        xg.grad = None

    def torch_fwd_bwd():
        F.cross_entropy(xg, y).backward()
        xg.grad = None

    return {
        "cross_entropy": lambda: (ce_fast.cross_entropy(x, y), sync()),
        "cross_entropy_and_grad": lambda: (ce_fast.cross_entropy_and_grad(x, y), sync()),
        "torch fwd+bwd": lambda: (ce_torch_fwd_bwd(), sync()),
        "F.cross_entropy": lambda: (F.cross_entropy(x, y), sync()),
        "F.cross_entropy fwd+bwd": lambda: (torch_fwd_bwd(), sync()),
    }


def per_call(fn: Callable[[], Any], calls: int, rounds: int = 25) -> tuple[float, float]:
    """Best over `rounds` of the mean seconds per call over `calls` calls: (wall time, this
    thread's CPU time; the latter leaves out waits for a busy machine's cores)."""
    wall = cpu = float("inf")
    for _ in range(rounds):
        t0, c0 = time.perf_counter(), time.thread_time()
        for _ in range(calls):
            fn()
        wall = min(wall, (time.perf_counter() - t0) / calls)
        cpu = min(cpu, (time.thread_time() - c0) / calls)
    return wall, cpu


def count_calls(fn: Callable[[], Any]) -> int:
    """Python function calls (cProfile's count, builtins included) of one call."""
    pr = cProfile.Profile()
    pr.enable()
    fn()
    pr.disable()
    return pstats.Stats(pr).total_calls  # type: ignore[attr-defined]


def profile(fn: Callable[[], Any], calls: int, top: int = 25) -> str:
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(calls):
        fn()
    pr.disable()
    st = pstats.Stats(pr)
    total_calls = st.total_calls  # type: ignore[attr-defined]
    out = io.StringIO()
    out.write(f"  {total_calls / calls:.0f} Python function calls per call\n")
    pstats.Stats(pr, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--calls", type=int, default=100)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--only", default=None, help="run only the case of this name")
    ap.add_argument("--cuda", action="store_true", help="real calls on torch CUDA tensors (a GPU machine)")
    args = ap.parse_args(argv)
    if args.cuda:
        for name, fn in cuda_cases(args.rows, args.classes).items():
            if args.only and name != args.only:
                continue
            for _ in range(20):
                fn()
            wall, cpu = per_call(fn, args.calls)
            print(f"{name:24s} {wall * 1e6:8.1f} us wall, {cpu * 1e6:8.1f} us CPU per call (synchronised)")
            if args.profile:
                print(profile(fn, args.calls))
        return
    with null_engine() as kernels:
        for name, fn in cases(args.rows, args.classes).items():
            if args.only and name != args.only:
                continue
            for _ in range(20):  # warm: traces, compiled programs, caches
                fn()
            kernels.launches = kernels.allocations = 0
            fn()
            launches, allocations = kernels.launches, kernels.allocations
            wall, cpu = per_call(fn, args.calls)
            calls = count_calls(fn)
            print(
                f"{name:24s} {wall * 1e6:8.1f} us wall, {cpu * 1e6:8.1f} us CPU per call; "
                f"{calls} Python calls, {launches} kernel launches, {allocations} CuPy allocations"
            )
            if args.profile:
                print(profile(fn, args.calls))


if __name__ == "__main__":
    main()
