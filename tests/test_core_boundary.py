"""The typed boundary of the Rust engine (ce_fast._core) for its lean entry points:
`plain_forward`, `plain_backward`, `run_binary` and `read_pass`. Arrays are described by
objects read by attribute (`ce_fast._arrays.Operand` or `Layout`), per-row vectors are
NumPy arrays whose dtype, length and layout the engine checks, and `read_pass` reads an
array's address and size itself: a wrong argument is an exception, never a stray read
or write. The numbers through these entry points are checked against tests/oracle.py."""

from __future__ import annotations

import numpy as np
import pytest

from ce_fast import _core
from ce_fast._arrays import Layout, operand

from oracle import cross_entropy_ref, grad_ref, logsumexp_ref
from oracle_binary import bce, bce_grad, focal

ROWS, C = 3, 5
IGNORE = -100


def _op(a: np.ndarray):
    return operand(a, "array")


def _plain_inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((ROWS, C))
    y = np.array([1, IGNORE, 4], np.int64)
    return x, y


def _stats():
    """Destinations filled with NaN, so a refused call is seen to have written nothing."""
    return np.full((2, ROWS), np.nan), np.full(ROWS, np.nan)


def test_plain_forward_and_backward_match_the_reference(simd_path):
    """Per-row losses, lse and both gradients (fused into the forward, and from the saved
    lse with a batch or a per-row upstream) through operands and layouts alike."""
    x, y = _plain_inputs()
    lse, loss = _stats()
    assert _core.plain_forward(_op(x), y, IGNORE, lse, loss) == 2
    np.testing.assert_allclose(loss, cross_entropy_ref(x, y, reduction="none"), rtol=1e-13, atol=0)
    np.testing.assert_allclose(lse[0], x.max(axis=1), rtol=0, atol=0)
    np.testing.assert_allclose(lse[0] + lse[1], logsumexp_ref(x), rtol=1e-14)

    g = np.full_like(x, np.nan)
    out = Layout(g.ctypes.data, 1, g.shape, (C, 1))
    assert _core.plain_backward(_op(x), y, IGNORE, lse, out, go=2.0, mean=True) is None
    np.testing.assert_allclose(g, grad_ref(x, y, reduction="mean", grad_output=2.0), rtol=1e-13, atol=1e-300)
    go_rows = np.array([0.5, 7.0, -3.0])
    _core.plain_backward(_op(x), y, IGNORE, lse, _op(g), go_rows=go_rows)
    want = grad_ref(x, y, reduction="none", grad_output=go_rows)
    np.testing.assert_allclose(g, want, rtol=1e-13, atol=1e-300)

    z = x.copy()  # the gradient written over the logits in the forward's own pass
    lse2, loss2 = _stats()
    assert _core.plain_forward(_op(z), y, IGNORE, lse2, loss2, go=3.0, out=_op(z)) == 2
    np.testing.assert_array_equal(loss2, loss)
    np.testing.assert_allclose(z, grad_ref(x, y, reduction="sum", grad_output=3.0), rtol=1e-13, atol=1e-300)


def test_plain_forward_reports_the_first_bad_target_row_and_writes_nothing():
    x, _ = _plain_inputs()
    lse, loss = _stats()
    assert _core.plain_forward(_op(x), np.array([0, 5, -1], np.int64), IGNORE, lse, loss) == -2
    assert np.isnan(lse).all() and np.isnan(loss).all()


def _forward_errors(x, y):
    o = _op(x)
    lse, loss = _stats()
    narrow = _op(np.zeros((ROWS, C - 1)))
    return [
        (TypeError, "int32", dict(target=y.astype(np.int32))),
        (ValueError, "^target: 2 values, expected 3$", dict(target=y[:2])),
        (ValueError, "^target: not a contiguous array$", dict(target=np.repeat(y, 2)[::2])),
        (TypeError, "float32", dict(lse=lse.astype(np.float32))),
        (ValueError, r"^lse: shape \[3, 2\], expected \[2, 3\]$", dict(lse=np.empty((3, 2)))),
        (TypeError, "dimensionality mismatch", dict(lse=np.empty(6))),
        (ValueError, "^lse: not a contiguous array$", dict(lse=np.empty((2, 6))[:, ::2])),
        (ValueError, "^loss: 4 values, expected 3$", dict(loss=np.empty(4))),
        (ValueError, "^loss: not a contiguous array$", dict(loss=np.empty(6)[::2])),
        (ValueError, "^loss: values not aligned$", dict(loss=np.frombuffer(bytearray(32), np.float64, 3, 4))),
        (ValueError, "^go and out go together$", dict(go=1.0)),
        (ValueError, "^go and out go together$", dict(out=o)),
        (ValueError, "^mean needs go$", dict(mean=True)),
        (ValueError, r"^grad out: shape \[3, 4\] differs from the logits' \[3, 5\]$", dict(go=1.0, out=narrow)),
        (AttributeError, "'tuple' object has no attribute 'ptr'", dict(out=(o.ptr, 1, 5, 1, [3], [5]), go=1.0)),
    ]


def test_plain_forward_refuses_bad_arguments():
    """Each wrong argument is the exception naming it, and nothing is written."""
    x, y = _plain_inputs()
    for exc, msg, bad in _forward_errors(x, y):
        lse, loss = _stats()
        kw = dict(target=y, lse=lse, loss=loss) | bad
        with pytest.raises(exc, match=msg):
            _core.plain_forward(_op(x), kw.pop("target"), IGNORE, kw.pop("lse"), kw.pop("loss"), **kw)
        assert np.isnan(lse).all() and np.isnan(loss).all(), msg
    with pytest.raises(TypeError, match="positional"):  # the gradient's arguments are named
        _core.plain_forward(_op(x), y, IGNORE, *_stats(), 0, 1.0)


def test_plain_backward_refuses_bad_arguments():
    x, y = _plain_inputs()
    lse, loss = _stats()
    _core.plain_forward(_op(x), y, IGNORE, lse, loss)
    g = np.full_like(x, np.nan)
    cases = [
        (ValueError, "^exactly one of go and go_rows is needed$", dict()),
        (ValueError, "^exactly one of go and go_rows is needed$", dict(go=1.0, go_rows=np.ones(ROWS))),
        (ValueError, "^mean applies to go, not go_rows$", dict(go_rows=np.ones(ROWS), mean=True)),
        (ValueError, "^go_rows: 2 values, expected 3$", dict(go_rows=np.ones(2))),
        (TypeError, "float32", dict(go_rows=np.ones(ROWS, np.float32))),
        (ValueError, r"^lse: shape \[2, 4\], expected \[2, 3\]$", dict(go=1.0, lse=np.zeros((2, 4)))),
        (ValueError, "^lse: not a contiguous array$", dict(go=1.0, lse=np.zeros((4, 3))[::2])),
        (ValueError, "^target of row 2 out of range$", dict(go=1.0, target=np.array([0, 1, 5], np.int64))),
        (ValueError, r"^grad out: shape \[3, 5, 1\] differs", dict(go=1.0, out=_op(np.zeros((ROWS, C, 1))))),
        (ValueError, "^grad out: not a floating-point array$", dict(go=1.0, out=_op(np.zeros((ROWS, C), np.int64)))),
    ]
    for exc, msg, bad in cases:
        kw = dict(target=y, lse=lse, out=_op(g)) | bad
        with pytest.raises(exc, match=msg):
            _core.plain_backward(_op(x), kw.pop("target"), IGNORE, kw.pop("lse"), kw.pop("out"), **kw)
        assert np.isnan(g).all(), msg
    # a read-only lse is enough: the backward only reads it
    lse.flags.writeable = False
    _core.plain_backward(_op(x), y, IGNORE, lse, _op(g), go=1.0)
    np.testing.assert_allclose(g, grad_ref(x, y, reduction="sum"), rtol=1e-13, atol=1e-300)


@pytest.mark.parametrize(
    "layout, exc, msg",
    [
        (lambda p: (p, 1, 5, 1, [3], [5]), AttributeError, "'tuple' object has no attribute 'ptr'"),
        (lambda p: None, AttributeError, "'NoneType' object has no attribute 'ptr'"),
        (lambda p: Layout(p, 7, (3, 5), (5, 1)), ValueError, "^logits: unsupported dtype code 7$"),
        (lambda p: Layout(p, None, (3, 5), (5, 1)), ValueError, "^logits: not a floating-point array$"),
        (lambda p: Layout(p, 1, (), ()), ValueError, r"^logits: no class axis \(a 0-d array\)$"),
        (lambda p: Layout(p, 1, (3, 5), (1,)), ValueError, "^logits: shape and strides differ in length$"),
        (lambda p: Layout(p, 1, (3, 0), (5, 1)), ValueError, "^logits: zero classes$"),
        (lambda p: Layout(0, 1, (3, 5), (5, 1)), ValueError, "^logits: null data pointer$"),
        (lambda p: Layout(p, 1, (3, -5), (5, 1)), TypeError, r"ArrayDesc\.shape"),
        (lambda p: Layout(p, 1.5, (3, 5), (5, 1)), TypeError, r"ArrayDesc\.code"),
    ],
)
def test_every_entry_point_checks_the_logits_description(layout, exc, msg):
    """The same description checks in plain_forward, plain_backward and run_binary as in
    run: a bad attribute is an exception before anything is read."""
    x, y = _plain_inputs()
    lse, loss = _stats()
    d = layout(x.ctypes.data)
    with pytest.raises(exc, match=msg):
        _core.plain_forward(d, y, IGNORE, lse, loss)
    with pytest.raises(exc, match=msg):
        _core.plain_backward(d, y, IGNORE, lse, _op(x), go=1.0)
    with pytest.raises(exc, match=msg):
        _core.run_binary(0, d, _op(x))
    with pytest.raises(exc, match=msg):
        _core.run(d)
    assert np.isnan(lse).all() and np.isnan(loss).all()


def _binary_inputs():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((ROWS, C))
    t = (rng.random((ROWS, C)) > 0.5).astype(np.float64)
    w = rng.uniform(0.5, 2.0, C)
    return x, t, w


def test_run_binary_matches_the_reference(simd_path):
    """Losses, gradient and sum through named operands, a broadcast weight included."""
    x, t, w = _binary_inputs()
    wb = np.broadcast_to(w, x.shape)
    loss, g = np.full_like(x, np.nan), np.full_like(x, np.nan)
    total = _core.run_binary(0, _op(x), _op(t), w=_op(wb), loss=_op(loss), grad=_op(g), gscale=0.5)
    want = bce(x, t, weight=w)
    np.testing.assert_allclose(loss, want, rtol=1e-13)
    np.testing.assert_allclose(total, want.sum(), rtol=1e-13)
    np.testing.assert_allclose(g, 0.5 * bce_grad(x, t, weight=w), rtol=1e-13, atol=1e-300)
    total = _core.run_binary(1, _op(x), _op(t), alpha=0.3, gamma=1.5)
    np.testing.assert_allclose(total, focal(x, t, alpha=0.3, gamma=1.5).sum(), rtol=1e-13)


def test_run_binary_refuses_bad_arguments():
    x, t, w = _binary_inputs()
    loss, g = np.full_like(x, np.nan), np.full_like(x, np.nan)
    cases = [
        (ValueError, "^unknown loss kind 2$", dict(kind=2)),
        (ValueError, r"^target: shape \[3, 4\] differs from the logits' \[3, 5\]$", dict(t=_op(t[:, :4]))),
        (ValueError, r"^weight: shape \[5\] differs from the logits' \[3, 5\]$", dict(w=_op(w))),
        (ValueError, r"^pos_weight: shape \[1, 3, 5\] differs", dict(pw=_op(t[None]))),
        (ValueError, r"^loss out: shape \[5, 3\] differs", dict(loss=_op(loss.T))),
        (ValueError, "^loss out must be float32 or float64$", dict(loss=_op(loss.astype(np.float16)))),
        (ValueError, "^grad out must have the logits' dtype$", dict(grad=_op(g.astype(np.float32)))),
        (ValueError, "^grad_output needs grad$", dict(gout=_op(np.ones_like(x)), grad=None)),
        (ValueError, "^target: not a floating-point array$", dict(t=_op(t.astype(np.int64)))),
        (AttributeError, "'numpy.ndarray' object has no attribute 'ptr'", dict(w=w)),
    ]
    for exc, msg, bad in cases:
        kw = dict(kind=0, t=_op(t), loss=_op(loss), grad=_op(g)) | bad
        with pytest.raises(exc, match=msg):
            _core.run_binary(kw.pop("kind"), _op(x), kw.pop("t"), **kw)
        assert np.isnan(loss).all() and np.isnan(g).all(), msg
    with pytest.raises(TypeError, match="positional"):  # the operands after x and t are named
        _core.run_binary(0, _op(x), _op(t), _op(w))


def _fold(checksum: int) -> int:
    """The xor of a checksum's bytes: the xor of every byte read."""
    folded = 0
    while checksum:
        folded ^= checksum & 0xFF
        checksum >>= 8
    return folded


@pytest.mark.parametrize(
    "make",
    [
        lambda: np.arange(1, 1000, dtype=np.float64),
        lambda: np.arange(7 * 13, dtype=np.float32).reshape(7, 13),
        lambda: np.arange(300, dtype=np.uint16)[1:],  # 2 bytes past an aligned start
        lambda: np.frombuffer(bytes(range(256)) * 3, np.uint8),  # read-only
        lambda: np.zeros((4, 0)),
        lambda: np.array(2.5),
        lambda: np.zeros(3, dtype=[("a", np.int8), ("b", np.float64)]),
    ],
)
def test_read_pass_reads_every_byte_of_the_array(make):
    a = make()
    want = int(np.bitwise_xor.reduce(np.frombuffer(a.tobytes(), np.uint8), initial=0))
    assert _fold(_core.read_pass(a)) == want
    assert _fold(_core.read_pass(a, 2)) == want


@pytest.mark.parametrize(
    "arg, exc, msg",
    [
        (np.arange(12.0).reshape(3, 4)[:, ::2], ValueError, "^a: not a C-contiguous array$"),
        (np.arange(12.0).reshape(3, 4).T, ValueError, "^a: not a C-contiguous array$"),
        (np.array([1, "x"], dtype=object), TypeError, r"^a: an array of Python objects \(dtype object\)"),
        (np.zeros(2, dtype=[("a", object)]), TypeError, "^a: an array of Python objects"),
        (b"abcd", TypeError, "'bytes' object is not an instance of 'ndarray'"),
        (12345, TypeError, "'int' object is not an instance of 'ndarray'"),
        ([1.0, 2.0], TypeError, "'list' object is not an instance of 'ndarray'"),
    ],
)
def test_read_pass_refuses_what_it_cannot_read_as_one_span(arg, exc, msg):
    with pytest.raises(exc, match=msg):
        _core.read_pass(arg)
