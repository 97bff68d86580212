"""Arrays beyond 2**31 elements (slow: run with `pytest -m slow`; ~4.5 GB of RAM)."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

import ce_fast

from conftest import assert_reduced_close, assert_rows_close
from oracle import cross_entropy_ref, logsumexp_ref

N, C = 17000, 131072  # 2_228_224_000 float16 elements (4.46 GB): offsets pass 2**31
FIRST_BEYOND = 2**31 // C  # row 16384 starts at element 2**31


@pytest.fixture(scope="module")
def huge():
    assert N * C > 2**31
    pattern = ((np.arange(C) % 1000) / 100.0 - 5.0).astype(np.float16)
    z = np.empty((N, C), dtype=np.float16)
    z[:] = pattern  # cheap fill: every row the same pattern ...
    rng = np.random.default_rng(0)
    special = [0, FIRST_BEYOND - 1, FIRST_BEYOND, FIRST_BEYOND + 1, N - 2, N - 1]
    for i, r in enumerate(special):  # ... except a few distinct rows, most of them past 2**31
        z[r] = (rng.standard_normal(C) * (1.0 + i)).astype(np.float16)
    z[N - 1, C - 1] = np.float16(12.5)  # the very last element: a clear maximum of its row
    y = rng.integers(0, C, N)
    y[N - 1] = C - 1
    yield z, y, pattern, special
    del z
    gc.collect()


def _row_refs(z, y, pattern, special):
    """float64 per-row lse and loss: one pattern row, and every special row."""
    lse = np.full(N, logsumexp_ref(pattern.astype(np.float64)[None])[0])
    pz = pattern.astype(np.float64)
    loss = lse - pz[y]
    for r in special:
        zr = z[r].astype(np.float64)[None]
        lse[r] = logsumexp_ref(zr)[0]
        loss[r] = cross_entropy_ref(zr, y[r : r + 1], reduction="none")[0]
    return lse, loss


@pytest.mark.slow
def test_beyond_2_31_elements_rows(huge):
    z, y, pattern, special = huge
    lse_ref, loss_ref = _row_refs(z, y, pattern, special)
    checked = np.array(special + [1, FIRST_BEYOND + 100, N - 3])

    lse = ce_fast.logsumexp(z)
    assert lse.shape == (N,) and lse.dtype == np.float32
    assert_rows_close(lse[checked], lse_ref[checked], np.float16, what="logsumexp: ")
    plain = np.ones(N, dtype=bool)
    plain[special] = False
    assert np.all(lse[plain] == lse[1]), "pattern rows differ: some rows were read at wrong offsets"

    loss = ce_fast.cross_entropy(z, y, reduction="none")
    assert loss.shape == (N,) and loss.dtype == np.float32
    assert_rows_close(loss[checked], loss_ref[checked], np.float16, what="cross_entropy: ")
    assert_rows_close(loss[plain], loss_ref[plain], np.float16, what="cross_entropy pattern rows: ")

    mean = ce_fast.cross_entropy(z, y)
    assert_reduced_close(mean, loss_ref.mean(), loss_ref, float(N), np.float16, "mean")

    # views that start past 2**31 elements, and torch over the same memory
    tail = ce_fast.cross_entropy(z[FIRST_BEYOND:], y[FIRST_BEYOND:], reduction="none")
    np.testing.assert_array_equal(tail, loss[FIRST_BEYOND:])
    tz = torch.from_numpy(z)
    tl = ce_fast.logsumexp(tz[-3:])
    assert isinstance(tl, torch.Tensor)
    np.testing.assert_array_equal(tl.numpy(), lse[-3:])
    # strided rows over the whole buffer: every 997th row, the last row included
    sel = np.arange(N - 1, -1, -997)
    np.testing.assert_array_equal(ce_fast.logsumexp(z[::-997]), lse[sel])


@pytest.mark.slow
def test_beyond_2_31_elements_single_row(huge):
    """The whole buffer as one row of 2.2e9 classes: column indices past 2**31."""
    z, y, pattern, special = huge
    lse_ref, _ = _row_refs(z, y, pattern, special)
    flat = z.reshape(-1)
    total_ref = logsumexp_ref(lse_ref[None])[0]
    got = ce_fast.logsumexp(flat)
    assert got.shape == ()
    assert_rows_close(got, np.float64(total_ref), np.float16, what="1-D logsumexp: ")
    last = N * C - 1  # the target is the very last class
    loss = ce_fast.cross_entropy(flat, np.array(last, dtype=np.int64), reduction="none")
    assert_rows_close(loss, np.float64(total_ref - 12.5), np.float16, what="1-D cross_entropy: ")
    with pytest.raises(IndexError, match=rf"target value {N * C} at position \(\) is out of range for {N * C} classes"):
        ce_fast.cross_entropy(flat, np.array(N * C))
