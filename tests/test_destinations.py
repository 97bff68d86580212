"""Destinations and odd arguments: `out=` arrays that cannot be written as they are,
aliasing between rows or between arrays, torch's version counter and negative bit,
options beyond float32's range, and nonsense argument types. Every case either gives
the float64 answer or raises a clear exception; none writes into a copy the caller
never sees."""

from __future__ import annotations

import re

import ml_dtypes
import numpy as np
import pytest
import torch

import ce_fast
from ce_fast import _core

from conftest import ALL_DTYPES, DTYPE_IDS, assert_grad_close, assert_rows_close, cast, random_logits, to_f64
from oracle import cross_entropy_ref, grad_ref, logsumexp_ref

RNG = np.random.default_rng(11)
Z = RNG.standard_normal((4, 50)).astype(np.float32)
Y = RNG.integers(0, 50, 4)


# ---------------------------------------------------------------- rows that share memory


def test_torch_out_with_rows_sharing_memory_is_refused():
    z = torch.from_numpy(Z.copy())
    out = torch.zeros(1, 50).expand(4, 50)
    with pytest.raises(ValueError, match=r"share one memory location"):
        ce_fast.cross_entropy_and_grad(z, torch.from_numpy(Y), out=out)
    assert torch.count_nonzero(out) == 0


def test_in_place_on_expanded_logits_is_refused():
    z = torch.from_numpy(Z[:1].copy()).expand(4, 50)
    before = z.clone()
    with pytest.raises(ValueError, match=r"share one memory location"):
        ce_fast.cross_entropy_and_grad(z, torch.from_numpy(Y), out=z)
    assert torch.equal(z, before)


def test_numpy_as_strided_out_with_overlapping_rows_is_refused():
    base = np.zeros(60, dtype=np.float32)
    out = np.lib.stride_tricks.as_strided(base, shape=(4, 50), strides=(4 * 3, 4))
    with pytest.raises(ValueError, match=r"share one memory location"):
        ce_fast.cross_entropy_and_grad(Z, Y, out=out)
    lse_out = np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), shape=(4,), strides=(0,))
    with pytest.raises(ValueError, match=r"share one memory location"):
        ce_fast.logsumexp(Z, out=lse_out)


def test_disjoint_interleaved_out_is_accepted(simd_path):
    """z[:, ::2] and z[:, 1::2] lie in one address range but share no element."""
    buf = np.empty((4, 100), dtype=np.float32)
    buf[:, ::2] = Z
    buf[:, 1::2] = 7.0
    loss, grad = ce_fast.cross_entropy_and_grad(buf[:, ::2], Y, out=buf[:, 1::2])
    assert grad is not None
    want = grad_ref(Z.astype(np.float64), Y)
    assert_rows_close(buf[:, 1::2], want, np.float32)
    np.testing.assert_array_equal(buf[:, ::2], Z)  # the logits are untouched
    assert abs(float(loss) - cross_entropy_ref(Z.astype(np.float64), Y)) <= 1e-5


def test_partially_overlapping_out_is_still_refused():
    buf = np.zeros((5, 50), dtype=np.float32)
    buf[:4] = Z
    with pytest.raises(ValueError, match=r"out overlaps logits"):
        ce_fast.cross_entropy_and_grad(buf[:4], Y, out=buf[1:])


# ---------------------------------------------------------------- torch autograd bookkeeping


def test_grad_out_bumps_torch_version_counter():
    z = torch.from_numpy(Z.copy())
    out = torch.empty(4, 50)
    v = out._version
    ce_fast.cross_entropy_and_grad(z, torch.from_numpy(Y), out=out)
    assert out._version > v


def test_in_place_grad_makes_autograd_refuse_stale_saved_values():
    w = torch.from_numpy(Z.copy()).requires_grad_(True)
    z = w * 1.0
    s = torch.sin(z)  # saves z: writing the gradient into z must be noticed
    ce_fast.cross_entropy_and_grad(z.detach(), torch.from_numpy(Y), out=z.detach())
    with pytest.raises(RuntimeError, match=r"modified by an inplace operation"):
        s.sum().backward()


def test_logits_with_negative_bit_give_the_right_numbers(simd_path):
    c = torch.complex(torch.zeros(4, 50), torch.from_numpy(Z.copy()))
    z = c.conj().imag  # a lazily negated view: its memory holds +Z, its value is -Z
    assert z.is_neg()
    want = cross_entropy_ref(-Z.astype(np.float64), Y, reduction="none")
    got = ce_fast.cross_entropy(z, torch.from_numpy(Y), reduction="none")
    assert_rows_close(got, want, np.float32)
    assert_rows_close(ce_fast.logsumexp(z), logsumexp_ref(-Z.astype(np.float64)), np.float32)
    _, g = ce_fast.cross_entropy_and_grad(z, torch.from_numpy(Y))
    assert_rows_close(g, grad_ref(-Z.astype(np.float64), Y), np.float32)


def test_out_with_negative_bit_is_refused():
    c = torch.complex(torch.zeros(4, 50), torch.zeros(4, 50))
    out = c.conj().imag
    with pytest.raises(ValueError, match=r"negative bit"):
        ce_fast.cross_entropy_and_grad(torch.from_numpy(Z), torch.from_numpy(Y), out=out)


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("kind", ["sparse_coo", "sparse_csr"])
def test_sparse_tensors_are_type_errors(kind):
    z = torch.from_numpy(Z)
    s = z.to_sparse() if kind == "sparse_coo" else z.to_sparse_csr()
    with pytest.raises(TypeError, match=r"logits is a sparse_\w+ tensor; ce_fast needs a dense"):
        ce_fast.cross_entropy(s, torch.from_numpy(Y))
    with pytest.raises(TypeError, match=r"target is a sparse_\w+ tensor"):
        ce_fast.cross_entropy(z, torch.from_numpy(Y).to_sparse())
    with pytest.raises(TypeError, match=r"logits is a sparse_\w+ tensor"):
        ce_fast.logsumexp(s)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_nested_tensors_are_type_errors():
    nt = torch.nested.nested_tensor([torch.zeros(3, 5), torch.zeros(2, 5)])
    with pytest.raises(TypeError, match=r"logits is a nested tensor"):
        ce_fast.logsumexp(nt)


# ---------------------------------------------------------------- results never thrown away


def test_out_with_strides_that_are_not_whole_elements_is_refused():
    rec = np.zeros((4, 50), dtype=[("a", np.float32), ("b", np.int16)])
    out = rec["a"]  # a writable view with 6-byte strides
    assert out.flags.writeable and out.strides[-1] == 6
    with pytest.raises(ValueError, match=r"byte strides \(300, 6\) that are not whole float32 elements"):
        ce_fast.cross_entropy_and_grad(Z, Y, out=out)
    rec["a"] = Z
    with pytest.raises(ValueError, match=r"not whole float32 elements"):
        ce_fast.cross_entropy_and_grad(rec["a"], Y, out=rec["a"])
    lse = np.zeros(4, dtype=[("a", np.float32), ("b", np.int16)])["a"]
    with pytest.raises(ValueError, match=r"not whole float32 elements"):
        ce_fast.logsumexp(Z, out=lse)


def test_logits_with_strides_that_are_not_whole_elements_still_read_right(simd_path):
    rec = np.zeros((4, 50), dtype=[("a", np.float32), ("b", np.int16)])
    rec["a"] = Z
    assert_rows_close(ce_fast.logsumexp(rec["a"]), logsumexp_ref(Z.astype(np.float64)), np.float32)


@pytest.mark.parametrize("out", [[0.0] * 4, (0.0,) * 4], ids=["list", "tuple"])
def test_out_that_is_not_an_array_is_type_error(out):
    with pytest.raises(TypeError, match=r"out must be a NumPy array, torch tensor or CuPy array"):
        ce_fast.logsumexp(Z, out=out)
    with pytest.raises(TypeError, match=r"out must be a NumPy array, torch tensor or CuPy array"):
        ce_fast.cross_entropy_and_grad(Z, Y, out=[[0.0] * 50] * 4)


# ---------------------------------------------------------------- options beyond float32


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16], ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize(
    "kw, name",
    [
        (dict(softcap=1e39), "softcap"),
        (dict(softcap=1e-50), "softcap"),
        (dict(logit_scale=1e39), "logit_scale"),
        (dict(logit_scale=-1e39), "logit_scale"),
        (dict(logit_scale=1e-45), "logit_scale"),
    ],
)
def test_options_outside_float32_range_are_value_errors(dtype, kw, name):
    z = Z.astype(dtype)
    with pytest.raises(ValueError, match=rf"{name}=.* is outside float32's range"):
        ce_fast.cross_entropy(z, Y, **kw)
    with pytest.raises(ValueError, match=rf"{name}=.* is outside float32's range"):
        ce_fast.cross_entropy_and_grad(z, Y, **kw)


@pytest.mark.parametrize("kw", [dict(softcap=1e39), dict(softcap=1e-50), dict(logit_scale=1e39)])
def test_options_outside_float32_range_work_for_float64(kw, simd_path):
    z = Z.astype(np.float64)
    want = cross_entropy_ref(z, Y, reduction="none", **kw)
    got = ce_fast.cross_entropy(z, Y, reduction="none", **kw)
    assert_rows_close(got, want, np.float64)


def test_options_at_float32_edges_are_accepted(simd_path):
    z = random_logits(np.random.default_rng(5), (3, 40), np.float32)
    y = np.array([0, 5, 39])
    for kw in (dict(softcap=3e38), dict(softcap=1.2e-38), dict(logit_scale=0.0)):
        want = cross_entropy_ref(z.astype(np.float64), y, reduction="none", **kw)
        assert_rows_close(ce_fast.cross_entropy(z, y, reduction="none", **kw), want, np.float32)


# ---------------------------------------------------------------- nonsense arguments


@pytest.mark.parametrize(
    "go", [None, "2.0", b"1", 1 + 2j, np.array([1 + 1j] * 4), np.array(["a"] * 4), True, torch.tensor(1 + 1j)]
)
def test_grad_output_that_is_not_real_is_type_error(go):
    with pytest.raises(TypeError, match=r"grad_output must be a real number or an array of real numbers"):
        ce_fast.cross_entropy_and_grad(Z, Y, reduction="none", grad_output=go)


@pytest.mark.parametrize(
    "w", [np.full(50, 1 + 0j), np.array(["1"] * 50), np.ones(50, dtype=bool), torch.ones(50, dtype=torch.complex64)]
)
def test_weight_that_is_not_real_is_type_error(w):
    with pytest.raises(TypeError, match=r"weight must hold real numbers"):
        ce_fast.cross_entropy(
            Z if not torch.is_tensor(w) else torch.from_numpy(Z),
            Y if not torch.is_tensor(w) else torch.from_numpy(Y),
            weight=w,
        )


def test_integer_weight_is_accepted():
    w = np.arange(50) % 3
    want = cross_entropy_ref(Z.astype(np.float64), Y, weight=w.astype(np.float64))
    assert abs(float(ce_fast.cross_entropy(Z, Y, weight=w)) - want) <= 1e-5 * (1 + abs(want))


class _CpuDlpack:
    """A CPU array offered only through DLPack (as JAX or other libraries do)."""

    def __init__(self, a):
        self._a = a

    def __dlpack__(self, **kw):
        return self._a.__dlpack__(**kw)

    def __dlpack_device__(self):
        return self._a.__dlpack_device__()


def test_dlpack_only_cpu_objects_are_read(simd_path):
    got = ce_fast.logsumexp(_CpuDlpack(Z))
    assert_rows_close(got, logsumexp_ref(Z.astype(np.float64)), np.float32)
    loss = ce_fast.cross_entropy(_CpuDlpack(Z), _CpuDlpack(Y))
    assert abs(float(loss) - cross_entropy_ref(Z.astype(np.float64), Y)) <= 1e-5


def test_error_messages_name_the_argument():
    with pytest.raises(TypeError, match=re.escape("grad_output must be a real number")):
        ce_fast.cross_entropy_and_grad(Z, Y, grad_output=None)


class _CudaLike:
    """Says it lives on CUDA device 0 (DLPack device type 2); never read."""

    dtype = np.dtype(np.float64)
    shape = (4,)

    def __dlpack_device__(self):
        return (2, 0)


def test_grad_output_on_another_device_is_value_error():
    with pytest.raises(ValueError, match=r"logits are on cpu but grad_output is on cuda:0"):
        ce_fast.cross_entropy_and_grad(Z, Y, reduction="none", grad_output=_CudaLike())


# ---------------------------------------------------------------- arrays at any byte offset


def _at_odd_address(a: np.ndarray) -> np.ndarray:
    """A C-contiguous copy of `a` starting one byte past an aligned address (as a view of
    packed records or ``np.frombuffer(..., offset=1)`` does): no element is aligned."""
    buf = np.zeros(a.nbytes + 8, dtype=np.uint8)
    v = buf[1 : 1 + a.nbytes].view(a.dtype).reshape(a.shape)
    v[...] = a
    assert not v.flags.aligned
    return v


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_IDS.get)
def test_arrays_at_odd_addresses_give_the_right_numbers(dtype, simd_path):
    """Logits, soft target, weight and out may start anywhere: the engine reads and writes
    them element by element rather than as aligned slices."""
    rng = np.random.default_rng(5)
    shape = (3, 2100)  # one row spans two chunks
    x = random_logits(rng, shape, dtype)
    x64 = to_f64(x)
    y = rng.integers(0, shape[1], shape[0])
    w = rng.uniform(0.5, 2.0, shape[1])
    xo, wo = _at_odd_address(x), _at_odd_address(w)
    assert_rows_close(ce_fast.logsumexp(xo), logsumexp_ref(x64), dtype)
    out = _at_odd_address(np.zeros(shape, dtype))
    loss, g = ce_fast.cross_entropy_and_grad(xo, y, weight=wo, reduction="none", out=out)
    assert g is out
    assert_rows_close(loss, cross_entropy_ref(x64, y, weight=w, reduction="none"), dtype)
    assert_grad_close(out, grad_ref(x64, y, weight=w, reduction="none"), dtype, floor=np.full(3, 2.0))
    t = cast(rng.dirichlet(np.ones(shape[1]), shape[0]), dtype)
    t64 = to_f64(t)
    loss, g = ce_fast.cross_entropy_and_grad(xo, _at_odd_address(t), reduction="none", out=xo)
    assert g is xo
    assert_rows_close(loss, cross_entropy_ref(x64, t64, reduction="none"), dtype)
    assert_grad_close(xo, grad_ref(x64, t64, reduction="none"), dtype, floor=np.ones(3))


def test_weight_sharing_memory_with_out_is_read_before_the_pass(simd_path):
    """A weight that is a view of `out` gives the answer of the weights it held at the
    call: the engine reads its own copy, not memory the gradient overwrites."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal((64, 50))
    y = rng.integers(0, 50, 64)
    w = rng.uniform(0.5, 2.0, 50)
    out = np.empty((64, 50))
    out[0] = w
    ce_fast.set_threads(1)  # the rows in order: row 0's gradient lands before row 1 reads
    kw = dict(reduction="none", label_smoothing=0.1)  # smoothing reads the weights per class
    loss, g = ce_fast.cross_entropy_and_grad(x, y, weight=out[0], out=out, **kw)
    assert_rows_close(loss, cross_entropy_ref(x, y, weight=w, **kw), np.float64)
    assert_grad_close(g, grad_ref(x, y, weight=w, **kw), np.float64, floor=np.full(64, 2.0))


def test_engine_refuses_side_arrays_that_are_not_8_byte_aligned():
    """The engine's own float64 / int64 vectors come aligned from ce_fast; a caller of
    `_core` that passes a view at another byte offset gets an error, not a misaligned read."""
    x = ce_fast._arrays.operand(np.zeros((2, 5), np.float32), "logits")
    t = np.frombuffer(np.zeros(3, np.int64).tobytes(), dtype=np.int64, count=2, offset=4)
    with pytest.raises(ValueError) as e:
        _core.run(x, target=t)
    assert type(e.value) is ValueError
    assert str(e.value) == "target: values not aligned"


def test_engine_checks_every_vector_it_is_given():
    """Typed arguments: a vector of the wrong dtype is a TypeError, of the wrong length a
    ValueError naming it; an object without the descriptor's attributes an AttributeError."""
    from ce_fast._types import Stats

    x = ce_fast._arrays.operand(np.zeros((2, 5), np.float32), "logits")
    with pytest.raises(TypeError):
        _core.run(x, target=np.zeros(2, np.int32))
    with pytest.raises(ValueError, match="^target: 3 values, expected 2$"):
        _core.run(x, target=np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="^weight: 4 values, expected 5$"):
        _core.run(x, weight=np.ones(4))
    with pytest.raises(ValueError, match="^ls: 3 values, expected 2$"):
        _core.run(x, stats=Stats(mx=np.empty(2), ls=np.empty(3)))
    with pytest.raises(ValueError, match="^mx: not a contiguous array$"):
        _core.run(x, stats=Stats(mx=np.empty(4)[::2], ls=np.empty(2)))
    with pytest.raises(AttributeError, match="no attribute 'ptr'"):
        _core.run((x.ptr, 0, 5, 1, [2], [5]))
    s = Stats(mx=np.empty(2), ls=np.empty(2))
    _core.run(x, stats=s)
    np.testing.assert_array_equal(s.mx, 0.0)
    np.testing.assert_allclose(s.ls, np.log(5.0))


def test_kl_engine_checks_every_vector_it_is_given():
    """The distillation KL's statistics and gradient factors are typed too: wrong dtype,
    length, layout or alignment is an exception naming the vector, never a stray write."""
    from ce_fast._types import KlStats

    x = ce_fast._arrays.operand(np.zeros((2, 5), np.float32), "logits")
    t = ce_fast._arrays.operand(np.ones((2, 5), np.float32), "teacher")

    def stats(**bad):
        v = {k: np.empty(2) for k in ("ms", "ls", "mt", "lt", "cross")}
        return KlStats(**{**v, **bad})

    with pytest.raises(ValueError, match="^cross: 3 values, expected 2$"):
        _core.kl_run(x, t, 1.0, False, stats(cross=np.empty(3)))
    with pytest.raises(ValueError, match="^mt: not a contiguous array$"):
        _core.kl_run(x, t, 1.0, False, stats(mt=np.empty(4)[::2]))
    with pytest.raises(TypeError):
        _core.kl_run(x, t, 1.0, False, stats(ls=np.empty(2, np.float32)))
    odd = np.frombuffer(np.zeros(3).tobytes(), dtype=np.float64, count=2, offset=4)
    with pytest.raises(ValueError, match="^given ms: values not aligned$"):
        _core.kl_run(x, t, 1.0, False, stats(ms=odd), g=np.ones(2), out=x, given=True)
    with pytest.raises(ValueError, match="^g: 1 values, expected 2$"):
        _core.kl_run(x, t, 1.0, False, stats(), g=np.ones(1), out=x)
    with pytest.raises(ValueError, match="^g and out go together$"):
        _core.kl_run(x, t, 1.0, False, stats(), g=np.ones(2))
    with pytest.raises(ValueError, match="^given statistics need a gradient$"):
        _core.kl_run(x, t, 1.0, False, stats(), given=True)
    s = stats()
    _core.kl_run(x, t, 1.0, False, s)
    np.testing.assert_array_equal(s.ms, 0.0)
    np.testing.assert_array_equal(s.mt, 1.0)
    np.testing.assert_allclose(s.ls, np.log(5.0))
    np.testing.assert_allclose(s.cross, 1.0)  # E_teacher[teacher - student]


def test_read_pass_takes_empty_and_unaligned_spans():
    """The bandwidth yardstick's checksum folds to the xor of the bytes, for spans of any
    length at any address, empty ones included."""
    buf = np.arange(1, 41, dtype=np.uint8)
    assert _core.read_pass(np.empty(0)) == 0
    assert _core.read_pass(buf[3:3]) == 0
    for start, n in ((3, 2), (1, 7), (5, 20), (0, 40)):
        want = int(np.bitwise_xor.reduce(buf[start : start + n]))
        got = _core.read_pass(buf[start : start + n])
        folded = 0
        while got:
            folded ^= got & 0xFF
            got >>= 8
        assert folded == want, (start, n)
