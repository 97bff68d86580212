"""CPU benchmarks of the other losses against the PyTorch way of computing them:

- ``kl``: ``ce_fast.kl_divergence(s, t, temperature=2)`` against
  ``F.kl_div(F.log_softmax(s/T), F.log_softmax(t/T), log_target=True)`` and a read pass
  over both arrays (group "<size> <dtype> kl");
- ``focal``: ``ce_fast.focal_loss(z, y, gamma=2)`` against the focal formula in torch ops
  and ``ce_fast.cross_entropy`` on the same logits (group "<size> <dtype> focal").

    python -m pytest benches/test_bench_losses.py -q --benchmark-only
    CE_FAST_BENCH_LOSS_SIZES=256x32000 python -m pytest benches/test_bench_losses.py -q --benchmark-only

Sizes: CE_FAST_BENCH_LOSS_SIZES (default 4096x128256); dtypes as the other benches
(--bench-dtypes / CE_FAST_BENCH_DTYPES, default float32,bfloat16). The losses and
baselines are the table of :mod:`ce_fast.bench.losses`.
"""

from __future__ import annotations

import gc
import os

import numpy as np
import pytest

import ce_fast
from ce_fast import bench
from ce_fast.bench import losses as L


def pytest_generate_tests(metafunc):
    if "loss_case" in metafunc.fixturenames:
        sizes = bench.parse_sizes(os.environ.get("CE_FAST_BENCH_LOSS_SIZES") or L.DEFAULT_LOSS_SIZES)
        dtypes = bench.parse_dtypes(
            metafunc.config.getoption("--bench-dtypes") or os.environ.get("CE_FAST_BENCH_DTYPES") or "float32,bfloat16"
        )
        cases = [(s, d) for s in sizes for d in dtypes]
        ids = [f"{bench.format_size(s)}-{d}" for s, d in cases]
        metafunc.parametrize("loss_case", cases, ids=ids, indirect=True, scope="module")


@pytest.fixture(scope="module")
def loss_case(request):
    shape, dtype = request.param
    z, y = bench.make_logits(shape, dtype, seed=0)
    t, _ = bench.make_logits(shape, dtype, seed=1)
    yield shape, dtype, z, t, y
    del z, t, y
    gc.collect()


def _time(benchmark, group, fn, nbytes, rounds=3, warmup=1):
    benchmark.group = group
    out = benchmark.pedantic(fn, rounds=rounds, warmup_rounds=warmup, iterations=1)
    benchmark.extra_info.update({"bytes": nbytes, "GB/s": nbytes / benchmark.stats.stats.min / 1e9})
    return out


def _torch(*arrays):
    torch = pytest.importorskip("torch")
    return torch, [bench.as_torch(a) for a in arrays]


def _label(shape, dtype, what):
    return f"{bench.format_size(shape)} {dtype} {what}"


def test_kl_ce_fast(loss_case, benchmark):
    shape, dtype, z, t, y = loss_case
    loss = _time(benchmark, _label(shape, dtype, "kl"), lambda: L.LOSSES["kl"].ce_fast(z, t, y), z.nbytes + t.nbytes)
    assert np.isfinite(float(loss)) and float(loss) > 0


def test_kl_read_pass(loss_case, benchmark):
    shape, dtype, z, t, y = loss_case
    rz, rt = bench.read_pass_fn(z), bench.read_pass_fn(t)
    _time(benchmark, _label(shape, dtype, "kl"), lambda: (rz(), rt()), z.nbytes + t.nbytes)


def test_kl_torch(loss_case, benchmark):
    shape, dtype, z, t, y = loss_case
    torch, (zt, tt) = _torch(z, t)
    yt = torch.from_numpy(y)
    with torch.no_grad():
        ref = _time(
            benchmark, _label(shape, dtype, "kl"), lambda: L.LOSSES["kl"].torch(zt, tt, yt), z.nbytes + t.nbytes, 1, 0
        )
    mine = float(L.LOSSES["kl"].ce_fast(z, t, y))
    assert abs(float(ref) - mine) <= 1e-2 * abs(mine)


def test_focal_ce_fast(loss_case, benchmark):
    shape, dtype, z, t, y = loss_case
    loss = _time(benchmark, _label(shape, dtype, "focal"), lambda: ce_fast.focal_loss(z, y, gamma=2.0), z.nbytes)
    assert np.isfinite(float(loss))


def test_focal_cross_entropy(loss_case, benchmark):
    shape, dtype, z, t, y = loss_case
    _time(benchmark, _label(shape, dtype, "focal"), lambda: ce_fast.cross_entropy(z, y), z.nbytes)


def test_focal_torch(loss_case, benchmark):
    shape, dtype, z, t, y = loss_case
    torch, (zt,) = _torch(z)
    yt = torch.from_numpy(y)
    with torch.no_grad():
        ref = _time(benchmark, _label(shape, dtype, "focal"), lambda: L.LOSSES["focal"].torch(zt, yt), z.nbytes, 1, 0)
    mine = float(ce_fast.focal_loss(z, y, gamma=2.0))
    assert abs(float(ref) - mine) <= 1e-2 * abs(mine)
