"""Bounded memory: StreamingCrossEntropy.update over an np.memmap of a few GB keeps the
peak resident set (VmHWM, reset through /proc/self/clear_refs) 512 MiB above where it
started, because processed pages are released; reading the same file without
releasing them grows it by the whole file, so the measurement can fail."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from ce_fast.streaming import StreamingCrossEntropy

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")

LIMIT = 512 << 20


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak resident set size


def _peak() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/self/status")


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def big_file(tmp_path_factory):
    """2 GiB of float32 logits (rows x 8192): a sparse file of zeros (read back as
    real page-cache pages) where every 16th row has a 1 at class row % C."""
    C, rows = 8192, 64 * 1024
    path = tmp_path_factory.mktemp("mm") / "logits.f32"
    with open(path, "wb") as f:
        f.truncate(rows * C * 4)
        one = np.float32(1.0).tobytes()
        for r in range(0, rows, 16):
            f.seek((r * C + r % C) * 4)
            f.write(one)
    yield path, rows, C
    path.unlink()


def _targets(rows, C):
    """Right for the marked rows and for every other zero row (argmax 0), else wrong."""
    r = np.arange(rows, dtype=np.int64)
    y = np.where(r % 16 == 0, r % C, 0)
    y[(r % 16 != 0) & (r % 2 == 1)] = 5
    return y


def test_memmap_update_keeps_peak_rss_bounded(big_file):
    path, rows, C = big_file
    x = np.memmap(path, dtype=np.float32, mode="r", shape=(rows, C))
    y = _targets(rows, C)
    _reset_peak()
    before = _rss()
    r = StreamingCrossEntropy().update(x, y).result()
    growth = _peak() - before
    assert growth < LIMIT, f"peak RSS grew by {growth / 2**20:.0f} MiB over a {x.nbytes / 2**30:.1f} GiB file"
    marked = rows // 16
    assert (r.tokens, r.correct) == (rows, rows // 2)  # the marked rows and the even zero rows
    expect = (marked * (np.log(C - 1 + np.e) - 1.0) + (rows - marked) * np.log(C)) / rows
    assert r.loss == pytest.approx(expect, rel=1e-6)
    del x


def test_without_release_the_same_read_grows_the_peak(big_file):
    """The control: touching every page of the mapping keeps them resident."""
    path, rows, C = big_file
    x = np.memmap(path, dtype=np.float32, mode="r", shape=(rows, C))
    _reset_peak()
    before = _rss()
    total = 0.0
    for a in range(0, rows, 4096):
        total += float(x[a : a + 4096].sum(dtype=np.float64))
    assert total == rows // 16
    assert _peak() - before > 2 * LIMIT
    del x
