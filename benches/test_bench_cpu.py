"""CPU benchmarks: ce_fast against NumPy, PyTorch F.cross_entropy and a plain read pass.

    python -m pytest benches -q --benchmark-only
    CE_FAST_BENCH_SIZES=256x32000 python -m pytest benches -q --benchmark-only   # quick
    python -m pytest benches --benchmark-only --benchmark-json=bench.json

Groups are "<size> <dtype> fwd" (ce_fast.cross_entropy mean, NumPy max/exp/sum/log,
torch F.cross_entropy, read pass) and "<size> <dtype> fwd+bwd" (cross_entropy_and_grad
into a fresh array and in place, NumPy softmax gradient, torch forward + .backward(),
single-threaded NumPy copy). extra_info["GB/s"]: logits bytes (fwd, read) or read + write
bytes (fwd+bwd, copy) over the best round. The in-place variant restores the logits
(untimed) before every round. Fixtures and settings: benches/conftest.py.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

import ce_fast
from ce_fast import bench


def _need_torch(case):
    if case.zt is None:
        pytest.skip("PyTorch is not installed")


# ----------------------------------------------------------------------------- forward


def test_fwd_ce_fast(case, measure):
    loss = measure(
        case, "fwd", lambda: ce_fast.cross_entropy(case.z, case.y), case.nbytes, what="ce_fast.cross_entropy (mean)"
    )
    assert np.isfinite(float(loss))


def test_fwd_read_pass(case, measure):
    threads = ce_fast.get_threads()
    measure(
        case,
        "fwd",
        bench.read_pass_fn(case.z, threads),
        case.nbytes,
        what=f"read pass of the logits bytes, {threads} threads (yardstick)",
    )


def test_fwd_numpy(case, measure):
    loss = measure(
        case,
        "fwd",
        functools.partial(bench.numpy_forward, case.z, case.y),
        case.nbytes,
        baseline=True,
        what="NumPy max/exp/sum/log in float32",
    )
    ref = float(ce_fast.cross_entropy(case.z, case.y))
    assert abs(loss - ref) <= 1e-5 * abs(ref)


def test_fwd_torch(case, measure):
    _need_torch(case)
    measure(
        case,
        "fwd",
        functools.partial(bench.torch_forward, case.zt, case.yt),
        case.nbytes,
        baseline=True,
        what="torch F.cross_entropy (CPU)",
    )


# ----------------------------------------------------------------------------- forward + backward


def test_fwdbwd_ce_fast(case, measure):
    loss, grad = measure(
        case,
        "fwd+bwd",
        lambda: ce_fast.cross_entropy_and_grad(case.z, case.y),
        2 * case.nbytes,
        what="ce_fast.cross_entropy_and_grad, fresh gradient",
    )
    assert grad.shape == case.z.shape
    del grad


def test_fwdbwd_ce_fast_inplace(case, measure):
    work = case.z.copy()
    measure(
        case,
        "fwd+bwd",
        functools.partial(ce_fast.cross_entropy_and_grad, work, case.y, out=work),
        2 * case.nbytes,
        setup=functools.partial(np.copyto, work, case.z),
        what="ce_fast.cross_entropy_and_grad(out=logits)",
    )
    del work


def test_fwdbwd_numpy(case, measure):
    measure(
        case,
        "fwd+bwd",
        functools.partial(bench.numpy_forward_backward, case.z, case.y),
        2 * case.nbytes,
        baseline=True,
        what="NumPy forward + (softmax - onehot) / N",
    )


def test_fwdbwd_torch(case, measure):
    _need_torch(case)
    leaf = case.zt.detach().requires_grad_(True)
    measure(
        case,
        "fwd+bwd",
        functools.partial(bench.torch_forward_backward, leaf, case.yt),
        2 * case.nbytes,
        baseline=True,
        setup=functools.partial(bench.clear_grad, leaf),
        what="torch F.cross_entropy + .backward() (CPU)",
    )
    leaf.grad = None


def test_fwdbwd_copy(case, measure):
    dst = np.empty_like(case.z)
    measure(
        case,
        "fwd+bwd",
        functools.partial(np.copyto, dst, case.z),
        2 * case.nbytes,
        what="numpy.copyto, 1 thread (yardstick)",
    )
    del dst
