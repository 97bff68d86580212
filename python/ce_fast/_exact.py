"""Exact sums of float64 values: every finite double is an integer multiple of 2**-1074,
so a sum scaled by 2**1074 is a Python int, exact and independent of the order of the
terms. NumPy splits the values by their bits and bins them (vectorised); kernels/eval.cu
bins them the same way on the GPU, and :func:`fold_bins` turns bins into the integer."""

from __future__ import annotations

from typing import Any

import numpy as np

#: Scale of the fixed-point loss sum: the smallest positive double is 2**-1074.
FIXED_BITS = 1074

_LO_BITS = 26
_LO_MASK = (1 << _LO_BITS) - 1
_BINCOUNT_ROWS = 1 << 24  # bin sums of 27-bit parts stay below 2**51: exact in float64
SHIFTS = 2046  # fixed-point shifts of finite doubles: 0 .. 2045


def split_doubles(v: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Finite float64 values as ``(hi * 2**26 + lo) * 2**shift * 2**-1074``: int64 arrays
    hi (|hi| < 2**27), lo (0 <= lo < 2**26) and shift (0 .. 2045), read from the bits."""
    bits = np.ascontiguousarray(v, dtype=np.float64).view(np.uint64)
    e = ((bits >> np.uint64(52)) & np.uint64(0x7FF)).astype(np.int64)
    m = (bits & np.uint64((1 << 52) - 1)).astype(np.int64)
    m |= (e != 0).astype(np.int64) << 52  # the implicit bit of normal numbers
    m = np.where((bits >> np.uint64(63)) != 0, -m, m)
    return m >> _LO_BITS, m & _LO_MASK, np.maximum(e, 1) - 1


def fold_bins(hi: Any, lo: Any) -> int:
    """The fixed-point integer of per-shift sums of hi and lo parts (any int sequences)."""
    total = 0
    for k in np.flatnonzero((np.asarray(hi) != 0) | (np.asarray(lo) != 0)):
        total += ((int(hi[k]) << _LO_BITS) + int(lo[k])) << int(k)
    return total


def exact_sum(v: np.ndarray) -> tuple[int, int, int, int]:
    """(sum of the finite values * 2**1074 as an exact int, NaN count, +inf count, -inf count)."""
    v = np.asarray(v, dtype=np.float64).reshape(-1)
    finite = np.isfinite(v)
    nan = posinf = neginf = 0
    if not finite.all():
        nan = int(np.isnan(v).sum())
        posinf = int((v == np.inf).sum())
        neginf = int((v == -np.inf).sum())
        v = v[finite]
    total = 0
    for start in range(0, v.size, _BINCOUNT_ROWS):
        hi, lo, shift = split_doubles(v[start : start + _BINCOUNT_ROWS])
        total += fold_bins(
            np.bincount(shift, weights=hi, minlength=SHIFTS).astype(np.int64),
            np.bincount(shift, weights=lo, minlength=SHIFTS).astype(np.int64),
        )
    return total, nan, posinf, neginf
