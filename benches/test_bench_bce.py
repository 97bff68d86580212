"""CPU benchmarks of binary_cross_entropy_with_logits: ce_fast against PyTorch's
F.binary_cross_entropy_with_logits and a plain read pass of the same bytes.

    python -m pytest benches/test_bench_bce.py -q --benchmark-only
    CE_FAST_BCE_SIZES=1024x1024 python -m pytest benches/test_bench_bce.py -q --benchmark-only   # quick

Groups are "bce <size> <dtype> fwd" (ce_fast mean, torch mean, read pass of logits and
targets) and "bce <size> <dtype> fwd+bwd" (ce_fast's fused loss and gradient into a fresh
array; torch forward + .backward()). extra_info["GB/s"]: logits + target bytes read (fwd,
read), plus the gradient bytes written (fwd+bwd), over the best round. The goal is ce_fast
>= 3x PyTorch at 16384 x 4096 in float32 and bfloat16, in the same run.
"""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import ce_fast  # noqa: E402
from ce_fast import bench  # noqa: E402

SIZES = [tuple(int(n) for n in s.split("x")) for s in os.environ.get("CE_FAST_BCE_SIZES", "16384x4096").split(",")]
DTYPES = ["float32", "bfloat16"]
ROUNDS = int(os.environ.get("CE_FAST_BENCH_ROUNDS", "3"))


@pytest.fixture(scope="module", params=[(s, d) for s in SIZES for d in DTYPES], ids=lambda p: f"{p[1]}-{p[0]}")
def bce_case(request):
    shape, name = request.param
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(shape, generator=g) * 3).to(getattr(torch, name))
    t = (torch.rand(shape, generator=g) > 0.5).to(z.dtype)
    label = f"bce {'x'.join(map(str, shape))} {name}"
    return label, z, t, z.numel() * z.element_size()


def _run(benchmark, label, group, fn, nbytes, what):
    benchmark.group = f"{label} {group}"
    out = benchmark.pedantic(fn, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    benchmark.extra_info.update({"bytes": nbytes, "GB/s": nbytes / benchmark.stats.stats.min / 1e9, "what": what})
    return out


def test_fwd_ce_fast(benchmark, bce_case):
    label, z, t, nb = bce_case
    loss = _run(benchmark, label, "fwd", lambda: ce_fast.binary_cross_entropy_with_logits(z, t), 2 * nb, "ce_fast")
    assert torch.isfinite(loss)


def test_fwd_torch(benchmark, bce_case):
    label, z, t, nb = bce_case
    _run(benchmark, label, "fwd", lambda: F.binary_cross_entropy_with_logits(z, t), 2 * nb, "torch (baseline)")


def test_fwd_read_pass(benchmark, bce_case):
    label, z, t, nb = bce_case

    read_z, read_t = bench.read_pass_fn(z), bench.read_pass_fn(t)

    def read():
        read_z()
        read_t()

    _run(benchmark, label, "fwd", read, 2 * nb, "read pass of logits and targets (yardstick)")


def test_fwd_bwd_ce_fast(benchmark, bce_case):
    label, z, t, nb = bce_case
    fn = lambda: ce_fast.binary_cross_entropy_with_logits_and_grad(z, t)  # noqa: E731
    _run(benchmark, label, "fwd+bwd", fn, 3 * nb, "ce_fast fused loss + gradient")


def test_fwd_bwd_torch(benchmark, bce_case):
    label, z, t, nb = bce_case
    leaf = z.detach().requires_grad_()

    def fwd_bwd():
        F.binary_cross_entropy_with_logits(leaf, t).backward()
        leaf.grad = None

    _run(benchmark, label, "fwd+bwd", fwd_bwd, 3 * nb, "torch forward + backward (baseline)")
