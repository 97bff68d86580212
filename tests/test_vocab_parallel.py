"""ce_fast.torch.vocab_parallel_cross_entropy over 2 and 3 gloo processes on localhost,
against single-process F.cross_entropy in float64 on the gathered logits.

Each world size starts its processes once (spawn; a free port; a bounded wait, the
children killed on a timeout) and runs every case, on every kernel set, in them.
"""

from __future__ import annotations

import os
import queue
import socket
import traceback
import zlib
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import ce_fast.torch as cet

V = 37
# (vocab_start, width) per rank: unequal widths, and for 3 ranks not in rank order.
SHARDS = {2: [(0, 13), (13, 24)], 3: [(25, 12), (0, 5), (5, 20)]}
SIMD = ("scalar", "auto")
TIMEOUT_S = 150

CASES = {
    "mean": dict(reduction="mean"),
    "sum": dict(reduction="sum"),
    "none": dict(reduction="none"),
    "smooth": dict(reduction="mean", label_smoothing=0.1),
    "smooth_none": dict(reduction="none", label_smoothing=0.25),
    "zloss": dict(reduction="mean", z_loss=1e-2),
    "all_options": dict(reduction="sum", label_smoothing=0.3, z_loss=1e-3),
    "ignore": dict(reduction="mean", label_smoothing=0.1, ignored=True),
    "ignore_index_is_a_class": dict(reduction="mean", ignore_index=14, ignored=True),
    "leading_dims": dict(reduction="none", batch=(3, 4), label_smoothing=0.1),
    "huge_offsets": dict(reduction="mean", label_smoothing=0.2, z_loss=1e-4, offset=1e4),
    "float32": dict(reduction="mean", label_smoothing=0.1, dtype="float32"),
    "bfloat16": dict(reduction="none", z_loss=1e-3, dtype="bfloat16"),
    "nonfinite": dict(reduction="none", label_smoothing=0.1, nonfinite=True),
    "all_ignored": dict(reduction="mean", all_ignored=True),
    "no_rows": dict(reduction="mean", batch=(0,)),
}


def make_inputs(name: str):
    """Full float64 logits (*batch, V), targets, and grad_output of case `name`."""
    c = CASES[name]
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    batch = c.get("batch", (11,))
    x = rng.standard_normal((*batch, V)) * 3 + c.get("offset", 0.0)
    ii = c.get("ignore_index", -100)
    t = rng.integers(0, V, size=batch)
    if c.get("ignored"):
        t.reshape(-1)[::3] = ii
    if c.get("all_ignored"):
        t[...] = ii
    if c.get("nonfinite"):
        x[0, 20] = np.nan  # NaN in one shard
        x[1, 2] = np.inf
        x[2, :] = -np.inf  # every shard of the row -inf
        x[3, 13:] = -np.inf  # some shards -inf, the target among the finite ones
        t[3] = 2
        x[4, :13] = -np.inf  # the target logit -inf
        t[4] = 5
    go = rng.standard_normal(batch) if c["reduction"] == "none" else np.asarray(0.75)
    return x, t, go


def _dtype(name):
    return getattr(torch, CASES[name].get("dtype", "float64"))


def options(name):
    c = CASES[name]
    return dict(
        reduction=c["reduction"],
        label_smoothing=c.get("label_smoothing", 0.0),
        z_loss=c.get("z_loss", 0.0),
        ignore_index=c.get("ignore_index", -100),
    )


def reference(name):
    """(loss, full gradient) from F.cross_entropy in float64 on the gathered logits."""
    x, t, go = make_inputs(name)
    opts = options(name)
    full = torch.from_numpy(x).to(_dtype(name)).double().requires_grad_()
    tt = torch.from_numpy(t)
    rows = F.cross_entropy(
        full.reshape(-1, V),
        tt.reshape(-1),
        reduction="none",
        ignore_index=opts["ignore_index"],
        label_smoothing=opts["label_smoothing"],
    )
    valid = tt.reshape(-1) != opts["ignore_index"]
    rows = rows + opts["z_loss"] * torch.logsumexp(full.reshape(-1, V), -1) ** 2 * valid
    rows = torch.where(valid, rows, 0.0)
    if opts["reduction"] == "none":
        loss = rows.reshape(t.shape)
    elif opts["reduction"] == "sum":
        loss = rows.sum()
    else:
        loss = rows.sum() / valid.sum()
    (loss * torch.from_numpy(go)).sum().backward()
    return loss.detach().numpy(), full.grad.numpy()


# ----------------------------------------------------------------- in the workers


def _run_case(rank, world, name):
    x, t, go = make_inputs(name)
    start, width = SHARDS[world][rank]
    shard = torch.from_numpy(np.ascontiguousarray(x[..., start : start + width])).to(_dtype(name))
    shard.requires_grad_()
    loss = cet.vocab_parallel_cross_entropy(shard, torch.from_numpy(t), vocab_start=start, **options(name))
    (loss * torch.from_numpy(go).to(loss.dtype)).sum().backward()
    return loss.detach().numpy(), shard.grad.double().numpy(), str(loss.dtype)


def _error_case(rank, world, name):
    """What one rank raises in a case that every rank must refuse."""
    x, t, _ = make_inputs("mean")
    start, width = SHARDS[world][rank]
    shard = torch.from_numpy(np.ascontiguousarray(x[..., start : start + width]))
    target = torch.from_numpy(t)
    kw = {}
    if name == "gap" and rank == world - 1:
        shard = shard[..., 1:]
        start += 1
    if name == "overlap" and rank == world - 1:
        start -= 1
        shard = torch.from_numpy(np.ascontiguousarray(x[..., start : start + width + 1]))
    if name == "rows" and rank == 0:
        shard, target = shard[:-1], target[:-1]
    if name == "weight" and rank == 0:
        kw["weight"] = torch.ones(width)
    if name == "int_logits" and rank == world - 1:
        shard = shard.to(torch.int32)
    if name == "soft":
        target = torch.softmax(torch.from_numpy(x), -1)[..., start : start + width]
    if name == "out_of_range":
        target = target.clone()
        target[4] = V
    try:
        cet.vocab_parallel_cross_entropy(shard, target, vocab_start=start, **kw)
    except Exception as exc:
        return type(exc).__name__, str(exc)
    return None


ERRORS = ("gap", "overlap", "rows", "weight", "int_logits", "soft", "out_of_range")


def _worker(rank, world, port, results):
    try:
        import ce_fast
        from ce_fast import _core

        ce_fast.set_threads(1)
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=60),
        )
        out = {}
        for simd in SIMD:
            _core.set_simd(simd)
            for name in CASES:
                out[(simd, name)] = _run_case(rank, world, name)
        for name in ERRORS:
            out[name] = _error_case(rank, world, name)
        # The group still works after the refusals: one more call agrees on the loss.
        out["after_errors"] = _run_case(rank, world, "mean")
        results.put((rank, out))
    except BaseException:
        results.put((rank, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(world):
    """Every rank's results; fails (never hangs) when a rank dies or time runs out."""
    ctx = torch.multiprocessing.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    env = {"OMP_NUM_THREADS": "1", "RAYON_NUM_THREADS": "1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        procs = [ctx.Process(target=_worker, args=(r, world, port, results), daemon=True) for r in range(world)]
        for p in procs:
            p.start()
        got = {}
        try:
            for _ in range(world):
                rank, out = results.get(timeout=TIMEOUT_S)
                if isinstance(out, str):
                    pytest.fail(f"rank {rank} failed:\n{out}")
                got[rank] = out
        except queue.Empty:
            pytest.fail(f"{world} ranks did not finish within {TIMEOUT_S} s")
        finally:
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
        return got
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module", params=[2, 3], ids=["2ranks", "3ranks"])
def world(request):
    return request.param, run_world(request.param)


# ----------------------------------------------------------------- the checks


def _tol(name):
    return {"float32": 2e-6, "bfloat16": 2e-6}.get(CASES[name].get("dtype", "float64"), 1e-12)


@pytest.mark.parametrize("simd", SIMD)
@pytest.mark.parametrize("name", list(CASES))
def test_loss_and_shard_gradients_match_f_cross_entropy(world, name, simd):
    n, got = world
    ref_loss, ref_grad = reference(name)
    tol = _tol(name)
    for rank in range(n):
        loss, grad, dtype = got[rank][(simd, name)]
        assert dtype == ("torch.float64" if _dtype(name) == torch.float64 else "torch.float32")
        assert loss.shape == ref_loss.shape
        np.testing.assert_allclose(loss, ref_loss, rtol=tol, atol=tol)
        start, width = SHARDS[n][rank]
        want = ref_grad[..., start : start + width]
        if CASES[name].get("dtype") == "bfloat16":
            # the gradient is rounded once into bfloat16
            np.testing.assert_allclose(grad, want, rtol=2**-8, atol=1e-6)
        else:
            np.testing.assert_allclose(grad, want, rtol=max(tol, 1e-12) * 10, atol=tol)
    # every rank returns the same loss, bit for bit
    for rank in range(1, n):
        np.testing.assert_array_equal(got[rank][(simd, name)][0], got[0][(simd, name)][0])


def test_nonfinite_rows_as_float64_torch(world):
    n, got = world
    ref_loss, _ = reference("nonfinite")
    loss = got[0][("auto", "nonfinite")][0]
    assert np.isnan(loss[[0, 1, 2]]).all() and np.isnan(ref_loss[[0, 1, 2]]).all()
    # with label smoothing a -inf logit makes the row's loss +inf, as in torch
    assert loss[3] == np.inf == ref_loss[3] and loss[4] == np.inf == ref_loss[4]
    assert np.isfinite(loss[5:]).all()


def test_all_ignored_mean_is_nan_and_no_rows(world):
    n, got = world
    for rank in range(n):
        assert np.isnan(got[rank][("auto", "all_ignored")][0])
        assert np.isnan(got[rank][("auto", "no_rows")][0])
        assert not got[rank][("auto", "all_ignored")][1].any()


def test_bad_tilings_raise_value_error_on_every_rank(world):
    n, got = world
    for rank in range(n):
        kind, msg = got[rank]["gap"]
        assert kind == "ValueError" and "do not tile the vocabulary: a gap at column" in msg
        kind, msg = got[rank]["overlap"]
        assert kind == "ValueError" and "do not tile the vocabulary: an overlap at column" in msg
        kind, msg = got[rank]["rows"]
        assert kind == "ValueError" and "every rank must hold the same rows" in msg


def test_refused_arguments_raise_on_every_rank(world):
    n, got = world
    kind, msg = got[0]["weight"]
    assert kind == "ValueError" and msg == "class weights are not supported by vocab_parallel_cross_entropy"
    kind, msg = got[n - 1]["int_logits"]
    assert kind == "TypeError" and "logits dtype int32 is not supported" in msg
    for rank in range(1, n):
        kind, msg = got[rank]["weight"]
        assert kind == "ValueError" and msg.endswith("rank(s) [0] refused their arguments (see their error)")
    for rank in range(n - 1):
        kind, msg = got[rank]["int_logits"]
        assert kind == "ValueError" and f"rank(s) [{n - 1}] refused" in msg
    for rank in range(n):
        kind, msg = got[rank]["soft"]
        assert kind == "ValueError" and msg.startswith("soft (probability) targets are not supported")
        kind, msg = got[rank]["out_of_range"]
        assert kind == "IndexError"
        assert msg == f"target value {V} at position (4,) is out of range for {V} classes " + (
            f"(expected 0 <= target < {V}, or ignore_index=-100)"
        )
        np.testing.assert_array_equal(got[rank]["after_errors"][0], got[rank][("auto", "mean")][0])


def test_comm_bytes_grow_with_rows_only():
    from ce_fast._vocab_parallel import comm_bytes

    assert comm_bytes(4096, 2) == 8 * 8 + 8 * 3 * 4096
    assert comm_bytes(4096, 2, label_smoothing=0.1) == 8 * 8 + 8 * 4 * 4096
    assert comm_bytes(1, 3) == 8 * 12 + 8 * 3


def test_needs_an_initialised_process_group():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="call init_process_group first"):
        cet.vocab_parallel_cross_entropy(torch.zeros(2, 3), torch.zeros(2, dtype=torch.int64), vocab_start=0)
