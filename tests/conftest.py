"""Shared helpers for the ce_fast tests: SIMD-path fixture, tolerance checks,
array layouts and random inputs."""

from __future__ import annotations

import contextlib

import ml_dtypes
import numpy as np
import pytest
import torch

import ce_fast
from ce_fast import _core

BF16 = np.dtype(ml_dtypes.bfloat16)
LOW_DTYPES = (np.dtype(np.float32), np.dtype(np.float16), BF16)
ALL_DTYPES = (np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16), BF16)
DTYPE_IDS = {np.dtype(np.float32): "f32", np.dtype(np.float64): "f64", np.dtype(np.float16): "f16", BF16: "bf16"}
FINFO_MAX = {
    np.dtype(np.float32): 3.0e38,
    np.dtype(np.float64): 1e300,
    np.dtype(np.float16): 6.0e4,
    BF16: 3.0e38,
}

# ---------------------------------------------------------------- SIMD paths


# Every kernel set ce_fast has, in order; a CPU runs "scalar" and those it has the features for.
SIMD_SETS = ("scalar", "avx2", "avx512")


def simd_sets() -> list[str]:
    """The kernel sets this machine runs ("scalar" first, the best last)."""
    return list(_core.simd_available())


def simd_skip_reason(name: str) -> str | None:
    """Why the kernel set `name` cannot run here, or None when it can."""
    have = simd_sets()
    if name in have:
        return None
    return f"this CPU lacks the {name} kernel set's features (it runs {', '.join(have)})"


def _current_choice() -> str:
    return _core.simd_level()


@contextlib.contextmanager
def use_simd(name: str):
    """Runs the body with ce_fast's f32 kernels forced to `name` ('scalar', 'avx2',
    'avx512', or 'auto' for the best this CPU has)."""
    prev = _current_choice()
    _core.set_simd(name)
    try:
        yield _core.simd_level()
    finally:
        _core.set_simd(prev)


@pytest.fixture(params=SIMD_SETS)
def simd_path(request):
    """Parametrizes a test over every kernel set: those this CPU lacks are skipped, with
    the reason, never silently."""
    reason = simd_skip_reason(request.param)
    if reason is not None:
        pytest.skip(reason)
    with use_simd(request.param) as level:
        assert level == request.param
        yield level


@pytest.fixture(autouse=True)
def _restore_global_state():
    """Every test starts and ends with the default thread count and SIMD choice."""
    prev = _current_choice()
    yield
    ce_fast.set_threads(0)
    _core.set_simd(prev)


# ---------------------------------------------------------------- conversions


def to_f64(a) -> np.ndarray:
    """float64 NumPy copy of a NumPy / ml_dtypes / torch array (or scalar)."""
    if type(a).__module__.startswith("torch"):
        import torch

        return a.detach().to(torch.float64).cpu().numpy()
    return np.asarray(a).astype(np.float64)


def out_dtype(dtype) -> np.dtype:
    """The dtype ce_fast returns losses in for logits of `dtype`."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


# ---------------------------------------------------------------- tolerances


def row_tol(ref, dtype):
    """Per-row tolerance: 1e-5 (1 + |ref|) for f32/f16/bf16 input, 1e-12 (1 + |ref|) for f64."""
    r = 1e-12 if np.dtype(dtype) == np.float64 else 1e-5
    return r * (1.0 + np.abs(ref))


def assert_rows_close(got, ref, dtype, *, scale=1.0, what=""):
    """Per-row check of engine output `got` against float64 `ref` (computed on the same
    rounded input values). NaN exactly where ref is NaN, infs equal (also where ref
    overflows the output dtype), elsewhere |got - ref| <= tol(ref) * scale."""
    g = to_f64(got)
    r = np.asarray(ref, dtype=np.float64)
    assert g.shape == r.shape, f"{what}shape {g.shape} != reference shape {r.shape}"
    od = out_dtype(dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        r_out = r.astype(od).astype(np.float64)  # what the output dtype can hold
    nan_r = np.isnan(r)
    nan_g = np.isnan(g)
    bad = np.flatnonzero((nan_r != nan_g).reshape(-1))
    assert bad.size == 0, (
        f"{what}NaN mismatch at flat rows {bad[:10].tolist()}: got {g.reshape(-1)[bad[:10]]}, "
        f"ref {r.reshape(-1)[bad[:10]]}"
    )
    inf_r = np.isinf(r_out)
    inf_mismatch = (inf_r | np.isinf(g)) & ~nan_r & (g != r_out)
    bad = np.flatnonzero(inf_mismatch.reshape(-1))
    assert bad.size == 0, (
        f"{what}inf mismatch at flat rows {bad[:10].tolist()}: got {g.reshape(-1)[bad[:10]]}, "
        f"ref {r.reshape(-1)[bad[:10]]}"
    )
    fin = ~nan_r & ~inf_r
    with np.errstate(invalid="ignore"):  # inf - inf in the rows `fin` masks out
        err = np.where(fin, np.abs(g - r), 0.0)
    tol = np.where(fin, row_tol(r, dtype) * scale, 1.0)
    worst = np.flatnonzero((err > tol).reshape(-1))
    assert worst.size == 0, (
        f"{what}{worst.size} rows outside tolerance ({np.dtype(dtype).name}); first at flat rows "
        f"{worst[:10].tolist()}: got {g.reshape(-1)[worst[:10]]}, ref {r.reshape(-1)[worst[:10]]}, "
        f"max err/tol {float(np.max(err / tol)):.3g}"
    )


def assert_reduced_close(got, ref, ref_rows, den, dtype, reduction, *, scale=1.0, what=""):
    """Check a mean/sum loss: 0-d of the output dtype, NaN/inf as ref, and
    |got - ref| <= sum_i tol(ref_i) (/ |den| for the mean) plus output rounding."""
    g = np.asarray(got)
    assert g.shape == (), f"{what}mean/sum must be 0-d, got shape {g.shape}"
    g = float(g)
    r = float(ref)
    if np.isnan(r):
        assert np.isnan(g), f"{what}expected NaN, got {g}"
        return
    od = out_dtype(dtype)
    with np.errstate(over="ignore"):
        r_out = float(np.asarray(r).astype(od))
    if np.isinf(r_out):
        assert g == r_out, f"{what}expected {r_out}, got {g}"
        return
    rows = np.asarray(ref_rows, dtype=np.float64).reshape(-1)
    tol = float(np.sum(row_tol(rows[np.isfinite(rows)], dtype))) * scale
    if reduction == "mean":
        tol /= abs(den) if den else 1.0
    tol += abs(r) * float(np.finfo(od).eps) + 1e-300
    assert abs(g - r) <= tol, f"{what}{reduction}: got {g!r}, ref {r!r}, err {abs(g - r):.3g} > tol {tol:.3g}"


GRAD_EPS = {
    np.dtype(np.float64): 2.0**-52,
    np.dtype(np.float32): 2.0**-23,
    np.dtype(np.float16): 2.0**-10,
    BF16: 2.0**-7,
}
GRAD_TINY = {np.dtype(np.float64): 1e-300, np.dtype(np.float32): 1e-38, np.dtype(np.float16): 2.0**-24, BF16: 1e-38}


def assert_grad_close(got, ref, dtype, *, floor, scale=1.0, what=""):
    """Gradient of `dtype` logits against the float64 `ref` (same shape): NaN exactly
    where ref is NaN, infs equal (or an inf of ref's sign where the tolerance reaches past
    the dtype's maximum), elsewhere |got - ref| <= 2 ulp(dtype) |ref| (the one
    rounding at the store) + row_tol(floor) * scale, `floor` (broadcast per row) being the
    size of the terms that make up a row's gradient (grad_output * weights * chain)."""
    d = np.dtype(dtype)
    g = to_f64(got)
    r = np.asarray(ref, dtype=np.float64)
    assert g.shape == r.shape, f"{what}gradient shape {g.shape} != reference shape {r.shape}"
    nan_r, nan_g = np.isnan(r), np.isnan(g)
    bad = np.argwhere(nan_r != nan_g)
    assert bad.size == 0, (
        f"{what}NaN mismatch at {bad[:5].tolist()}: got {g[tuple(bad[:5].T)]}, ref {r[tuple(bad[:5].T)]}"
    )
    with np.errstate(over="ignore"):
        r_out = r.astype(d).astype(np.float64)
    fl = np.broadcast_to(np.asarray(floor, dtype=np.float64)[..., None], r.shape)
    with np.errstate(invalid="ignore", over="ignore"):
        tol = 2.0 * GRAD_EPS[d] * np.abs(r) + row_tol(0.0, d) * scale * fl + GRAD_TINY[d]
        # an inf where the tolerance reaches past the dtype's maximum is rounding, not a sign error
        reach = np.abs(r) + tol >= float(np.finfo(np.float32 if d == BF16 else d).max)
        same_side = np.sign(g) == np.sign(np.where(r == 0.0, g, r))
    bad = np.argwhere((np.isinf(r_out) | np.isinf(g)) & ~nan_r & (g != r_out) & ~(reach & same_side))
    assert bad.size == 0, (
        f"{what}inf mismatch at {bad[:5].tolist()}: got {g[tuple(bad[:5].T)]}, ref {r[tuple(bad[:5].T)]}"
    )
    fin = ~nan_r & ~np.isinf(r_out) & ~np.isinf(g)
    with np.errstate(invalid="ignore"):
        err = np.where(fin, np.abs(g - r), 0.0)
    bad = np.argwhere(err > tol)
    assert bad.size == 0, (
        f"{what}{len(bad)} gradient entries outside tolerance ({d.name}); first at {bad[:5].tolist()}: "
        f"got {g[tuple(bad[:5].T)]}, ref {r[tuple(bad[:5].T)]}, max err/tol {float(np.max(err / tol)):.3g}"
    )


def assert_loss_dtype(res, dtype, reduction, batch_shape):
    """mean/sum -> 0-d array of float32 (float64 for f64 logits); none -> shape batch."""
    assert isinstance(res, np.ndarray), f"expected a NumPy array, got {type(res).__name__}"
    assert res.dtype == out_dtype(dtype), f"loss dtype {res.dtype}, expected {out_dtype(dtype)}"
    if reduction == "none":
        assert res.shape == tuple(batch_shape)
    else:
        assert res.shape == ()


# ---------------------------------------------------------------- inputs


def cast(a64: np.ndarray, dtype) -> np.ndarray:
    with np.errstate(over="ignore"):
        return np.asarray(a64, dtype=np.float64).astype(dtype)


def random_logits(rng: np.random.Generator, shape, dtype, scale=3.0, offset=0.0) -> np.ndarray:
    """Normal logits of `dtype` (C-contiguous)."""
    z = rng.standard_normal(shape) * scale + offset
    return cast(z, dtype)


LAYOUTS = ("contig", "transposed", "sliced", "negative", "classes_strided")


def with_layout(a: np.ndarray, layout: str) -> np.ndarray:
    """A view holding the same values as `a` with another memory layout."""
    a = np.ascontiguousarray(a)
    if layout == "contig":
        return a
    if layout == "transposed":
        # class axis first in memory: the class axis of the view has stride = rows
        base = np.ascontiguousarray(np.moveaxis(a, -1, 0))
        v = np.moveaxis(base, 0, -1)
    elif layout == "sliced":
        big = np.zeros(tuple(2 * n + 1 for n in a.shape), dtype=a.dtype)
        idx = tuple(slice(1, 1 + 2 * n, 2) for n in a.shape)
        big[idx] = a
        v = big[idx]
    elif layout == "negative":
        rev = tuple(slice(None, None, -1) for _ in a.shape)
        base = np.ascontiguousarray(a[rev])
        v = base[rev]
    elif layout == "classes_strided":
        # only the class axis strided (stride 3 elements), batch axes contiguous in order
        big = np.zeros(a.shape[:-1] + (3 * a.shape[-1],), dtype=a.dtype)
        big[..., ::3] = a
        v = big[..., ::3]
    else:
        raise ValueError(layout)
    assert v.shape == a.shape
    np.testing.assert_array_equal(v.astype(np.float64), a.astype(np.float64))
    return v


def torch_of(a: np.ndarray) -> torch.Tensor:
    """A torch tensor sharing `a`'s values (ml_dtypes bfloat16 -> torch.bfloat16)."""
    a = np.array(a, order="C", copy=True)
    if a.dtype == BF16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def torch_with_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "transposed":
        return t.movedim(-1, 0).contiguous().movedim(0, -1)
    if layout in ("sliced", "classes_strided"):
        big = torch.zeros(tuple(2 * n + 1 for n in t.shape), dtype=t.dtype)
        idx = tuple(slice(1, 1 + 2 * n, 2) for n in t.shape)
        big[idx] = t
        return big[idx]
    return t  # torch has no negative strides


class ArrayInterfaceOnly:
    """Exposes only ``__array_interface__`` (no buffer protocol, not an ndarray)."""

    def __init__(self, a: np.ndarray):
        self._a = a
        self.__array_interface__ = a.__array_interface__
