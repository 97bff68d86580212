"""ce_fast.dask.cross_entropy on Dask arrays chunked along rows and/or the class axis,
against F.cross_entropy in float64 and single-array ce_fast, on the synchronous
scheduler and on a distributed.LocalCluster of two worker processes."""

from __future__ import annotations

import dask
import dask.array as da
import ml_dtypes
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from dask.callbacks import Callback

import ce_fast
import ce_fast.dask as cdask

C = 37
CHUNKINGS = {
    "one_chunk": (50, C),
    "rows": (13, C),
    "classes": (50, 10),
    "rows_and_classes": (13, 10),
    "uneven_classes": (7, (3, 30, 4)),
    "one_column_chunks": (25, 1),
}
SPLIT_OPTIONS = {
    "mean": dict(),
    "sum": dict(reduction="sum"),
    "none": dict(reduction="none"),
    "smooth_zloss": dict(label_smoothing=0.15, z_loss=1e-3),
    "ignore_index_is_a_class": dict(ignore_index=3, label_smoothing=0.05, reduction="sum"),
}


def inputs(seed=0, rows=50, ignore=-100):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, C)) * 2
    t = rng.integers(0, C, rows)
    t[::4] = ignore
    return x, t


def torch_reference(x, t, reduction="mean", label_smoothing=0.0, z_loss=0.0, ignore_index=-100, weight=None):
    """float64 F.cross_entropy (plus z * lse**2 per counted row) with the class axis last."""
    xt = torch.from_numpy(np.asarray(x, dtype=np.float64)).reshape(-1, x.shape[-1])
    tt = torch.from_numpy(np.asarray(t)).reshape(-1)
    w = None if weight is None else torch.from_numpy(weight)
    rows = F.cross_entropy(
        xt, tt, weight=w, reduction="none", ignore_index=ignore_index, label_smoothing=label_smoothing
    )
    valid = tt != ignore_index
    rows = torch.where(valid, rows + z_loss * torch.logsumexp(xt, -1) ** 2, 0.0)
    if reduction == "none":
        return rows.reshape(np.shape(t)).numpy()
    if reduction == "sum":
        return rows.sum().numpy()
    den = valid.sum() if w is None else torch.where(valid, w[tt.clamp(min=0)], 0.0).sum()
    return (rows.sum() / den).numpy()


def sync(a):
    with dask.config.set(scheduler="synchronous"):
        return a.compute()


class Shapes(Callback):
    """Records the shape of every task's result."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def _posttask(self, key, result, dsk, state, id):
        if isinstance(result, np.ndarray):
            self.shapes.append(result.shape)


@pytest.mark.parametrize("opts", list(SPLIT_OPTIONS), ids=list(SPLIT_OPTIONS))
@pytest.mark.parametrize("chunks", list(CHUNKINGS), ids=list(CHUNKINGS))
def test_matches_torch_float64_any_chunking(chunks, opts, simd_path):
    o = SPLIT_OPTIONS[opts]
    x, t = inputs(ignore=o.get("ignore_index", -100))
    X = da.from_array(x, chunks=CHUNKINGS[chunks])
    T = da.from_array(t, chunks=9)  # rechunked to the logits' rows
    got = cdask.cross_entropy(X, T, **o)
    assert isinstance(got, da.Array)
    assert got.shape == (() if o.get("reduction", "mean") != "none" else (50,))
    res = sync(got)
    assert res.dtype == np.float64
    np.testing.assert_allclose(res, torch_reference(x, t, **o), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(res, ce_fast.cross_entropy(x, t, **o), rtol=1e-13, atol=1e-13)


def test_class_chunks_are_never_concatenated():
    x, t = inputs()
    X = da.from_array(x, chunks=(13, 10))
    with Shapes() as cb:
        sync(cdask.cross_entropy(X, da.from_array(t, chunks=13), label_smoothing=0.1, reduction="none"))
    two_d = [s for s in cb.shapes if len(s) >= 2]
    # chunks of logits (at most 10 columns) and a few numbers per row; never a whole row
    assert two_d and max(s[-1] for s in two_d) <= 10
    assert (13, 1, 5) in cb.shapes  # a chunk's partial: 5 numbers per row


def test_tree_reduction_over_many_class_chunks():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((6, 400)) * 5
    t = rng.integers(0, 400, 6)
    want = torch_reference(x, t, label_smoothing=0.3, reduction="none")
    for tt in (t, t.astype(np.uint16), t.astype(np.int32)):  # narrow and unsigned targets do not wrap
        got = sync(cdask.cross_entropy(da.from_array(x, chunks=(3, 7)), tt, label_smoothing=0.3, reduction="none"))
        np.testing.assert_allclose(got, want, rtol=1e-12)


def test_leading_dims_and_float32():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 4, C)).astype(np.float32)
    t = rng.integers(0, C, (3, 4))
    X = da.from_array(x, chunks=(2, 2, 10))
    got = sync(cdask.cross_entropy(X, da.from_array(t, chunks=(1, 4)), reduction="none", z_loss=1e-2))
    assert got.shape == (3, 4) and got.dtype == np.float32
    np.testing.assert_allclose(got, torch_reference(x, t, reduction="none", z_loss=1e-2), rtol=2e-6)
    mean = sync(cdask.cross_entropy(X, t))
    assert mean.shape == () and mean.dtype == np.float32
    np.testing.assert_allclose(mean, torch_reference(x, t), rtol=2e-6)


def test_bfloat16_class_split():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((20, C)).astype(ml_dtypes.bfloat16)
    t = rng.integers(0, C, 20)
    got = sync(cdask.cross_entropy(da.from_array(x, chunks=(10, 12)), t, label_smoothing=0.1))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, torch_reference(x.astype(np.float64), t, label_smoothing=0.1), rtol=2e-6)


def test_row_chunks_take_every_option():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((40, C))
    t = rng.integers(0, C, 40)
    t[::5] = -100
    w = rng.uniform(0.1, 2.0, C)
    X = da.from_array(x, chunks=(7, C))
    opts = dict(weight=w, label_smoothing=0.1, softcap=3.0, logit_scale=0.5, z_loss=1e-3)
    for reduction in ("mean", "sum", "none"):
        got = sync(cdask.cross_entropy(X, t, reduction=reduction, **opts))
        want = ce_fast.cross_entropy(x, t, reduction=reduction, **opts)
        np.testing.assert_allclose(got, want, rtol=1e-13)
    np.testing.assert_allclose(sync(cdask.cross_entropy(X, t, weight=w)), torch_reference(x, t, weight=w), rtol=1e-12)
    p = rng.dirichlet(np.ones(C), 40)
    got = sync(cdask.cross_entropy(X, da.from_array(p, chunks=(7, C)), label_smoothing=0.2))
    want = F.cross_entropy(torch.from_numpy(x), torch.from_numpy(p), label_smoothing=0.2).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_nonfinite_and_edge_rows():
    x, t = inputs()
    x[0, 5] = np.nan
    x[1, 20] = np.inf
    x[2, :] = -np.inf
    x[3, 12:] = -np.inf
    t[3] = 2
    X = da.from_array(x, chunks=(10, 6))
    got = sync(cdask.cross_entropy(X, t, reduction="none", label_smoothing=0.1))
    want = torch_reference(x, t, reduction="none", label_smoothing=0.1)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got, want, rtol=1e-12)
    all_ignored = np.full(50, -100)
    assert np.isnan(sync(cdask.cross_entropy(X, all_ignored)))
    empty = da.zeros((0, C), chunks=(1, 10))
    assert np.isnan(sync(cdask.cross_entropy(empty, np.zeros(0, np.int64))))
    assert sync(cdask.cross_entropy(empty, np.zeros(0, np.int64), reduction="sum")) == 0.0


def test_errors():
    x, t = inputs()
    X = da.from_array(x, chunks=(13, 10))
    with pytest.raises(ValueError, match=r"^weight is not supported when the class axis is split"):
        cdask.cross_entropy(X, t, weight=np.ones(C))
    with pytest.raises(ValueError, match=r"^softcap is not supported when the class axis is split"):
        cdask.cross_entropy(X, t, softcap=2.0)
    with pytest.raises(ValueError, match=r"^soft \(probability\) targets are not supported when the class axis"):
        cdask.cross_entropy(X, da.from_array(np.full((50, C), 1 / C), chunks=(13, 10)))
    with pytest.raises(TypeError, match="unexpected option"):
        cdask.cross_entropy(X, t, smoothing=0.1)
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        cdask.cross_entropy(X, t, label_smoothing=2.0)
    with pytest.raises(ValueError, match=r"target shape \(49,\) does not match logits shape \(50, 37\)"):
        cdask.cross_entropy(X, t[:-1])
    bad = t.copy()
    bad[30] = C
    for chunks in ((13, 10), (13, C)):
        lazy = cdask.cross_entropy(da.from_array(x, chunks=chunks), bad)
        with pytest.raises(IndexError) as e:
            sync(lazy)
        assert str(e.value) == (
            f"target value {C} at position (30,) is out of range for {C} classes "
            f"(expected 0 <= target < {C}, or ignore_index=-100)"
        )


@pytest.fixture(scope="module")
def cluster_client():
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, worker_dashboard_address=None
    ) as cluster:
        with distributed.Client(cluster) as client:
            yield client


def test_local_cluster_of_two_processes(cluster_client):
    for o in SPLIT_OPTIONS.values():
        x, t = inputs(ignore=o.get("ignore_index", -100))
        X = da.from_array(x, chunks=(13, 10))
        got = cluster_client.compute(cdask.cross_entropy(X, t, **o)).result()
        np.testing.assert_allclose(got, torch_reference(x, t, **o), rtol=1e-12, atol=1e-13)
    assert len(cluster_client.scheduler_info()["workers"]) == 2


# ------------------------------------------------------------------ evaluate


@pytest.fixture
def streaming():
    return pytest.importorskip("ce_fast.streaming", reason="ce_fast.evaluate comes with the evaluation module")


def eval_inputs(dtype=np.float32):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((60, C)).astype(dtype)
    t = rng.integers(0, C, 60)
    t[::2] = np.argmax(x[::2], axis=-1)  # half the rows right
    t[::5] = -100
    x[1, 30] = x[1, 3] = x[1].max() + 1  # a tie across class chunks: the first one counts
    t[1] = 30
    return x, t


@pytest.mark.parametrize("chunks", [(60, C), (13, C), (1, C), (7, C)])
def test_evaluate_row_chunks_bitwise_equal_to_one_array(streaming, chunks):
    x, t = eval_inputs()
    want = ce_fast.evaluate(x, t)
    with dask.config.set(scheduler="synchronous"):
        got = cdask.evaluate(da.from_array(x, chunks=chunks), da.from_array(t, chunks=11))
    assert got == want
    assert got.tokens == int((t != -100).sum()) and 0 < got.correct < got.tokens


@pytest.mark.parametrize("chunks", [(60, 10), (13, (3, 30, 4)), (7, 1)])
def test_evaluate_class_chunks(streaming, chunks):
    x, t = eval_inputs(np.float64)
    want = ce_fast.evaluate(x, t)
    with dask.config.set(scheduler="synchronous"):
        got = cdask.evaluate(da.from_array(x, chunks=chunks), t)
    assert (got.tokens, got.correct) == (want.tokens, want.correct)
    assert got.loss == pytest.approx(want.loss, rel=1e-14)
    assert got.accuracy == want.accuracy


def test_evaluate_on_local_cluster(streaming, cluster_client):
    x, t = eval_inputs()
    assert cdask.evaluate(da.from_array(x, chunks=(13, C)), t) == ce_fast.evaluate(x, t)


def test_evaluate_bad_target(streaming):
    x, t = eval_inputs()
    t[44] = C
    for chunks in ((13, C), (13, 10)):
        with dask.config.set(scheduler="synchronous"), pytest.raises(IndexError, match=r"position \(44,\)"):
            cdask.evaluate(da.from_array(x, chunks=chunks), t)


def test_open_npy_ships_the_path_not_the_data(tmp_path, cluster_client):
    import cloudpickle

    rng = np.random.default_rng(8)
    x = rng.standard_normal((400, 300)).astype(np.float32)
    t = rng.integers(0, 300, 400)
    path = tmp_path / "logits.npy"
    np.save(path, x)
    X = cdask.open_npy(str(path), chunks=(128, 100))
    assert X.shape == x.shape and X.dtype == np.float32
    assert len(cloudpickle.dumps(dict(X.__dask_graph__()))) < 20_000 < x.nbytes // 2
    got = cluster_client.compute(cdask.cross_entropy(X, t, label_smoothing=0.1)).result()
    want = torch_reference(x, t, label_smoothing=0.1)
    np.testing.assert_allclose(got, want, rtol=2e-6)
    np.save(tmp_path / "objects.npy", np.array([1, "a"], dtype=object))
    with pytest.raises(ValueError, match="Python objects in dtype"):
        cdask.open_npy(str(tmp_path / "objects.npy"))
