"""Threads: concurrent Python callers, the GIL released during native work, the
engine's own thread count and pool, forked children, and bitwise-reproducible results."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import ml_dtypes
import numpy as np
import pytest
import torch

import ce_fast
from ce_fast import _core

from conftest import assert_rows_close, random_logits, to_f64
from oracle import cross_entropy_ref, logsumexp_ref


def _jobs():
    """(name, thunk) pairs: small and parallel-sized inputs of several kinds."""
    rng = np.random.default_rng(0)
    z32 = random_logits(rng, (300, 2000), np.float32)  # 600k elements: the engine goes parallel
    y32 = rng.integers(0, 2000, 300)
    zbf = random_logits(rng, (4, 50, 1000), ml_dtypes.bfloat16)
    ybf = rng.integers(0, 1000, (4, 50))
    z64 = random_logits(rng, (20, 777), np.float64)
    p64 = rng.dirichlet(np.ones(777), 20)
    zt = torch.from_numpy(random_logits(rng, (64, 4096), np.float16))
    yt = torch.from_numpy(rng.integers(0, 4096, 64))
    zsmall = random_logits(rng, (3, 7), np.float32)
    w = rng.uniform(0, 2, 2000)
    jobs = {
        "f32-mean": lambda: ce_fast.cross_entropy(z32, y32),
        "f32-none-opts": lambda: ce_fast.cross_entropy(
            z32, y32, reduction="none", weight=w, label_smoothing=0.1, z_loss=1e-3, softcap=20.0
        ),
        "f32-T-none": lambda: ce_fast.cross_entropy(z32.T.copy().T, y32, reduction="none"),
        "bf16-sum": lambda: ce_fast.cross_entropy(zbf, ybf, reduction="sum", label_smoothing=0.2),
        "f64-soft": lambda: ce_fast.cross_entropy(z64, p64, reduction="none", logit_scale=0.5),
        "torch-f16": lambda: ce_fast.cross_entropy(zt, yt, reduction="none").numpy(),
        "lse-bf16": lambda: ce_fast.logsumexp(zbf),
        "lse-small": lambda: ce_fast.logsumexp(zsmall),
        "grad-loss": lambda: ce_fast.cross_entropy_and_grad(z32, y32)[0],
        "ppl": lambda: np.float64(ce_fast.perplexity(zbf, ybf)),
    }
    refs = {
        "f32-mean": lambda: cross_entropy_ref(z32.astype(np.float64), y32),
        "lse-bf16": lambda: logsumexp_ref(zbf.astype(np.float64)),
        "f64-soft": lambda: cross_entropy_ref(z64, p64, reduction="none", logit_scale=0.5),
    }
    return jobs, refs


def _same(a, b) -> bool:
    a = np.asarray(a)
    b = np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def test_concurrent_calls_match_sequential():
    jobs, refs = _jobs()
    sequential = {k: f() for k, f in jobs.items()}
    # the sequential numbers are right to begin with
    assert_rows_close(np.asarray(sequential["f32-mean"]), refs["f32-mean"](), np.float32)
    assert_rows_close(sequential["lse-bf16"], refs["lse-bf16"](), np.float32)
    assert_rows_close(sequential["f64-soft"], refs["f64-soft"](), np.float64)
    names = list(jobs) * 6
    np.random.default_rng(1).shuffle(names)
    with ThreadPoolExecutor(max_workers=6) as ex:
        results = list(ex.map(lambda n: (n, jobs[n]()), names))
    assert len(results) == len(names)
    for n, r in results:
        assert _same(r, sequential[n]), f"{n}: a concurrent call differs from the sequential one"


def test_concurrent_calls_with_explicit_thread_pool():
    ce_fast.set_threads(2)
    try:
        jobs, _ = _jobs()
        sequential = {k: f() for k, f in jobs.items()}
        barrier = threading.Barrier(4)
        errors = []

        def worker(i):
            barrier.wait()
            for n in list(jobs)[i::4] * 3:
                if not _same(jobs[n](), sequential[n]):
                    errors.append(n)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads)
        assert errors == []
    finally:
        ce_fast.set_threads(0)


def test_gil_is_released_during_a_long_call():
    """While the worker thread is inside the native call, the main thread runs Python
    code. Measured without clocks: a profile hook reads the main thread's counter when
    the worker enters `_core.run` and when it leaves. With the switch interval made
    huge, the worker only gives up the GIL voluntarily, so a native call that kept it
    would see the counter unchanged, whatever the machine's speed."""
    row = np.random.default_rng(2).standard_normal(8192).astype(np.float32)
    z = np.broadcast_to(row, (2048, 8192))  # 16M elements, no memory: long next to a 0.1 ms tick
    y = np.zeros(2048, dtype=np.int64)
    kw = dict(label_smoothing=0.1, softcap=30.0, z_loss=1e-4)
    ticks = [0]
    inside = []  # counter advance over each native call
    entered = {}

    def profile(frame, event, arg):
        if arg is _core.run:
            if event == "c_call":
                entered["at"] = ticks[0]
            elif event in ("c_return", "c_exception"):
                inside.append(ticks[0] - entered.pop("at"))

    done = threading.Event()
    result = {}

    def call():
        sys.setprofile(profile)  # this thread only
        try:
            result["loss"] = ce_fast.cross_entropy(z, y, **kw)
        finally:
            sys.setprofile(None)
            done.set()

    ce_fast.set_threads(1)
    want = ce_fast.cross_entropy(z, y, **kw)
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1000.0)
    try:
        worker = threading.Thread(target=call)
        worker.start()
        while not done.is_set():
            ticks[0] += 1
            time.sleep(1e-4)  # lets go of the GIL so the worker can take it back
        worker.join()
    finally:
        sys.setswitchinterval(switch)
        ce_fast.set_threads(0)
    assert _same(result["loss"], want)
    ref = cross_entropy_ref(row[None].astype(np.float64), np.array([0]), **kw)
    assert abs(float(want) - ref) <= 1e-5 * (1 + abs(ref))
    assert len(inside) >= 1, "the profile hook never saw _core.run"
    assert max(inside) >= 1, f"the main thread made no progress during the native call(s) {inside}: GIL held?"


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_thread_count_does_not_change_results(threads):
    jobs, _ = _jobs()
    default = {k: f() for k, f in jobs.items()}
    ce_fast.set_threads(threads)
    try:
        assert ce_fast.get_threads() == threads
        other = {k: f() for k, f in jobs.items()}
    finally:
        ce_fast.set_threads(0)
    assert ce_fast.get_threads() >= 1
    for k in jobs:
        a, b = to_f64(default[k]), to_f64(other[k])
        assert a.shape == b.shape
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7, equal_nan=True, err_msg=k)


def test_repeated_calls_are_bitwise_identical():
    jobs, _ = _jobs()
    first = {k: f() for k, f in jobs.items()}
    for _ in range(5):
        for k, f in jobs.items():
            assert _same(f(), first[k]), f"{k}: result changed between identical calls"


def test_repeated_calls_bitwise_identical_on_both_simd_paths():
    from conftest import use_simd

    rng = np.random.default_rng(3)
    z = random_logits(rng, (257, 1031), np.float16)
    y = rng.integers(0, 1031, 257)
    for name in ("scalar", "auto"):
        with use_simd(name):
            a = ce_fast.cross_entropy(z, y, reduction="none", label_smoothing=0.3, softcap=10.0)
            for _ in range(3):
                assert _same(ce_fast.cross_entropy(z, y, reduction="none", label_smoothing=0.3, softcap=10.0), a)
            ref = cross_entropy_ref(z.astype(np.float64), y, reduction="none", label_smoothing=0.3, softcap=10.0)
            assert_rows_close(a, ref, np.float16)


# ---------------------------------------------------------------- the engine's pool


def _parallel_call():
    """A call big enough for the engine to split its rows over threads."""
    rng = np.random.default_rng(5)
    rows, cols = 256, 1024
    assert rows * cols >= _core.PAR_MIN_ELEMS
    z = rng.standard_normal((rows, cols)).astype(np.float32)
    y = rng.integers(0, cols, rows)
    return z, y, ce_fast.cross_entropy(z, y, reduction="none")


def _child(conn):
    try:
        conn.send(("ok", _parallel_call()[2]))
    except BaseException as exc:  # reported to the parent, which fails the test
        conn.send(("error", repr(exc)))
    finally:
        conn.close()


CHILD_WAIT_S = 60  # a hang guard only: the child's call takes milliseconds


@pytest.mark.parametrize("threads", [0, 2], ids=["default", "explicit"])
def test_forked_child_runs_parallel_calls(threads):
    """A child forked after the parent's pool exists builds its own: the parent's
    worker threads are not copied by fork, and waiting on them would hang forever."""
    ce_fast.set_threads(threads)
    if ce_fast.get_threads() < 2:
        pytest.skip("one CPU: the default thread count does not go parallel")
    z, y, want = _parallel_call()  # the parent's pool now exists and has run
    assert_rows_close(want, cross_entropy_ref(z.astype(np.float64), y, reduction="none"), np.float32)
    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # Python 3.12+: fork of a threaded process
        proc.start()
    send.close()
    try:
        answer = recv.recv() if recv.poll(CHILD_WAIT_S) else None
        if answer is not None:
            proc.join(timeout=CHILD_WAIT_S)
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()
        recv.close()
    assert answer is not None, f"the forked child gave no answer in {CHILD_WAIT_S} s: hung in the engine"
    status, got = answer
    assert status == "ok", got
    assert proc.exitcode == 0
    assert _same(got, want), "the child's result differs from the parent's"
    # and the parent's own pool still works
    assert _same(_parallel_call()[2], want)


def _task_count() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
def test_changing_thread_count_keeps_one_pool():
    """set_threads over many sizes, a parallel call with each: the engine keeps one pool
    of the current size, so the process is left with a handful of threads, not the sum."""
    ce_fast.set_threads(2)
    _, _, want = _parallel_call()
    base = _task_count()  # with a 2-thread pool
    sizes = list(range(2, 25)) * 2  # kept all, they would be 598 threads
    for n in sizes:
        ce_fast.set_threads(n)
        assert ce_fast.get_threads() == n
        assert _same(_parallel_call()[2], want)
    ce_fast.set_threads(3)
    assert _same(_parallel_call()[2], want)
    # The replaced pools' threads exit once told to; give them time (a hang guard only).
    deadline = time.monotonic() + 30
    while _task_count() > base + 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _task_count() <= base + 1, f"{_task_count()} threads left, {base} before with a 2-thread pool"


def test_absurd_thread_counts_are_refused():
    default = ce_fast.get_threads()
    with pytest.raises(ValueError) as e:
        ce_fast.set_threads(10**6)
    assert type(e.value) is ValueError
    assert str(e.value) == "threads must be at most 1024 (0 = the default), got 1000000"
    assert ce_fast.get_threads() == default  # unchanged
    assert _core.MAX_THREADS == 1024
    ce_fast.set_threads(1024)  # the bound itself is accepted (no call, so no pool is built)
    assert ce_fast.get_threads() == 1024
    ce_fast.set_threads(0)
    # the engine refuses it too, for callers of _core
    buf = np.zeros(64, dtype=np.uint8)
    with pytest.raises(ValueError) as e:
        _core.read_pass(buf, 1025)
    assert str(e.value) == "threads must be at most 1024 (0 = the default), got 1025"
    assert _core.read_pass(buf, 3) == 0


def test_default_threads_follows_rayon_num_threads():
    """The default comes from RAYON_NUM_THREADS (a positive integer) or the CPUs the
    process may use, as rayon's own default does, without rayon's global pool."""
    code = "import ce_fast; print(ce_fast.get_threads())"
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    for value, want in (("3", 3), ("0", None), ("x", None), ("5000", 1024), (None, None)):
        env = _child_env(RAYON_NUM_THREADS=value)
        got = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert got.returncode == 0, got.stderr
        if want is None:
            assert 1 <= int(got.stdout) <= max(cpus, 1), (value, got.stdout)
        else:
            assert int(got.stdout) == want, (value, got.stdout)


def _child_env(**kw):
    """The environment for a `python -c` child importing the ce_fast under test."""
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(ce_fast.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    for k, v in kw.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env
