"""Fixtures of the pytest-benchmark suite (not part of the unit-test run).

Run:   python -m pytest benches -q --benchmark-only
Quick: CE_FAST_BENCH_SIZES=256x32000 python -m pytest benches -q --benchmark-only
       (or --bench-sizes 256x32000 --bench-dtypes float32)

Environment / options:
  CE_FAST_BENCH_SIZES / --bench-sizes     comma-separated ROWSxCLASSES
                                          (default 4096x32000,4096x128256,1024x256000)
  CE_FAST_BENCH_DTYPES / --bench-dtypes   comma-separated (default float32,bfloat16)
  CE_FAST_BENCH_ROUNDS                    timed rounds of ce_fast and the yardsticks (default 3)
  CE_FAST_BENCH_BASELINE_ROUNDS           timed rounds of NumPy / PyTorch (default 3 for arrays
                                          under 2**26 elements, else 1 without warm-up: they take seconds)
  CE_FAST_BENCH_THREADS                   ce_fast / read pass / torch threads (default: libraries' own)

Inputs are built once per (size, dtype) and shared by every benchmark of that case
(tests are grouped so that only one case's arrays are alive at a time).
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from ce_fast import bench

DEFAULT_SIZES = bench.DEFAULT_SIZES
DEFAULT_DTYPES = bench.DEFAULT_DTYPES


def pytest_addoption(parser):
    g = parser.getgroup("ce_fast benchmarks")
    g.addoption(
        "--bench-sizes", default=None, help=f"ROWSxCLASSES list (env CE_FAST_BENCH_SIZES; default {DEFAULT_SIZES})"
    )
    g.addoption("--bench-dtypes", default=None, help=f"dtype list (env CE_FAST_BENCH_DTYPES; default {DEFAULT_DTYPES})")


def _cases(config):
    sizes = config.getoption("--bench-sizes") or os.environ.get("CE_FAST_BENCH_SIZES") or DEFAULT_SIZES
    dtypes = config.getoption("--bench-dtypes") or os.environ.get("CE_FAST_BENCH_DTYPES") or DEFAULT_DTYPES
    shapes = bench.parse_sizes(sizes)
    dts = bench.parse_dtypes(dtypes)
    return [(s, d) for s in shapes for d in dts]


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        cases = _cases(metafunc.config)
        metafunc.parametrize(
            "case", cases, ids=[f"{bench.format_size(s)}-{d}" for s, d in cases], indirect=True, scope="module"
        )


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    return int(v) if v else None


THREADS = _env_int("CE_FAST_BENCH_THREADS")


@dataclass
class Case:
    shape: tuple
    dtype: str
    z: np.ndarray  # logits (NumPy; bfloat16 as ml_dtypes)
    y: np.ndarray  # int64 targets
    zt: Any  # torch view of z as (rows, classes), or None
    yt: Any
    nbytes: int
    rounds: int
    baseline_rounds: int
    baseline_warmup: int

    @property
    def label(self) -> str:
        return f"{bench.format_size(self.shape)} {self.dtype}"


@pytest.fixture(scope="module")
def case(request):
    import ce_fast

    shape, dtype = request.param
    if THREADS is not None:
        ce_fast.set_threads(THREADS)
    z, y = bench.make_logits(shape, dtype, seed=0)
    zt = yt = None
    try:
        import torch

        if THREADS is not None:
            torch.set_num_threads(THREADS)
        zt = bench.as_torch(z).reshape(-1, shape[-1])
        yt = torch.from_numpy(y.reshape(-1))
    except ImportError:
        pass
    big = z.size >= 2**26
    base_rounds = _env_int("CE_FAST_BENCH_BASELINE_ROUNDS") or (1 if big else 3)
    c = Case(
        shape=shape,
        dtype=dtype,
        z=z,
        y=y,
        zt=zt,
        yt=yt,
        nbytes=int(z.nbytes),
        rounds=_env_int("CE_FAST_BENCH_ROUNDS") or 3,
        baseline_rounds=base_rounds,
        baseline_warmup=0 if (big and base_rounds == 1) else 1,
    )
    yield c
    del c, z, y, zt, yt
    gc.collect()


@pytest.fixture
def measure(benchmark):
    """``measure(group, fn, nbytes, baseline=False, setup=None)``: pedantic timing with the
    case's rounds; records bytes and GB/s (of the best round) in extra_info."""

    def run(case: Case, group: str, fn, nbytes: int, *, baseline: bool = False, setup=None, what: str = ""):
        benchmark.group = f"{case.label} {group}"
        rounds = case.baseline_rounds if baseline else case.rounds
        warm = case.baseline_warmup if baseline else 1
        result = benchmark.pedantic(fn, setup=setup, rounds=rounds, warmup_rounds=warm, iterations=1)
        best = benchmark.stats.stats.min
        benchmark.extra_info.update(
            {"shape": list(case.shape), "dtype": case.dtype, "bytes": nbytes, "GB/s": nbytes / best / 1e9, "what": what}
        )
        return result

    return run
