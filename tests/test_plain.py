"""The lean path of the plain cross-entropy (integer targets, ignore_index, no other
option; ce_fast._plain): bit for bit the general path's numbers, which the other
tests hold against the float64 oracle and PyTorch. A weight of all ones takes the
general path with the same arithmetic, so the two must agree exactly."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch

import ce_fast
import ce_fast.torch as ct
from ce_fast import _plain

from oracle import cross_entropy_ref

TORCH_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _case(seed, batch, C, dtype):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*batch, C, generator=g, dtype=torch.float64) * 4).to(dtype)
    t = torch.randint(0, C, batch, generator=g)
    t.view(-1)[:: max(1, t.numel() // 3)] = -100  # some ignored rows
    return x, t


def _loss_and_grad(x, t, go, **kw):
    leaf = x.clone().requires_grad_()
    loss = ct.cross_entropy(leaf, t, **kw)
    loss.backward(go)
    return loss.detach(), leaf.grad


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("batch", [(7,), (3, 5), ()])
def test_torch_plain_path_equals_general_path(simd_path, dtype, reduction, batch):
    x, t = _case(1, batch, 37, dtype)
    go = torch.rand(batch) + 0.5 if reduction == "none" else torch.tensor(1.75)
    ones = torch.ones(37, dtype=torch.float64)
    lp, gp = _loss_and_grad(x, t, go, reduction=reduction)
    lg, gg = _loss_and_grad(x, t, go, reduction=reduction, weight=ones)
    assert lp.dtype == lg.dtype and lp.shape == lg.shape
    assert torch.equal(lp, lg) or (lp.isnan().all() and lg.isnan().all())
    assert torch.equal(gp, gg)
    ref = cross_entropy_ref(x.double().numpy(), t.numpy(), reduction=reduction)
    np.testing.assert_allclose(lp.double().numpy(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_numpy_plain_path_equals_general_path(simd_path, reduction):
    x, t = _case(2, (4, 6), 50, torch.float32)
    for dt in (np.float32, np.float64, np.float16, ml_dtypes.bfloat16):
        z = x.numpy().astype(dt)[:, ::2]  # a strided view
        y = t.numpy()[:, ::2].astype(np.int32)
        a = ce_fast.cross_entropy(z, y, reduction=reduction)
        b = ce_fast.cross_entropy(z, y, reduction=reduction, weight=np.ones(50))
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)


def test_plain_path_is_taken_only_for_plain_options():
    assert _plain.plain_options(None, -100, "mean", 0.0, 0, None, 1.0)
    assert _plain.plain_options(None, 3, "none", 0, 0.0, None, 1)
    assert not _plain.plain_options(np.ones(3), -100, "mean", 0.0, 0.0, None, 1.0)
    assert not _plain.plain_options(None, True, "mean", 0.0, 0.0, None, 1.0)  # bool is no index
    assert not _plain.plain_options(None, -100, "avg", 0.0, 0.0, None, 1.0)
    assert not _plain.plain_options(None, -100, "mean", 0.1, 0.0, None, 1.0)
    assert not _plain.plain_options(None, -100, "mean", 0.0, 0.0, 5.0, 1.0)
    assert not _plain.plain_options(None, -100, "mean", 0.0, 0.0, None, 2.0)
    assert not _plain.plain_options(None, -100, "mean", float("nan"), 0.0, None, 1.0)


def test_plain_path_declines_what_it_does_not_compute():
    x, t = _case(3, (4,), 9, torch.float32)
    assert _plain.torch_prepare(x, t) is not None
    assert _plain.torch_prepare(x, t.int()) is None  # other target dtypes: general path
    assert _plain.torch_prepare(x[:0], t[:0]) is None  # empty
    assert _plain.torch_prepare(x.t().contiguous().t(), t, inplace=True) is None  # in place needs contiguous
    assert _plain.torch_prepare(x.to(torch.int32), t) is None


def test_bad_targets_raise_the_general_paths_error():
    z = torch.zeros(2, 3, 4)
    y = torch.zeros(2, 3, dtype=torch.int64)
    y[1, 2], y[1, 1] = 4, -3
    msg = r"target value -3 at position \(1, 1\) is out of range for 4 classes"
    with pytest.raises(IndexError, match=msg):
        ct.cross_entropy(z.requires_grad_(), y)
    with pytest.raises(IndexError, match=msg):
        ce_fast.cross_entropy(z.detach(), y)
    with pytest.raises(IndexError, match=msg):
        ce_fast.cross_entropy(z.detach().numpy(), y.numpy())


def test_inplace_plain_path_gradient_and_second_backward():
    """An incoming gradient of 1 skips the scaling pass, still bumping the version."""
    x, t = _case(4, (6,), 11, torch.float32)
    ref_loss, ref_grad = _loss_and_grad(x, t, torch.tensor(1.0))
    logits = x.clone().requires_grad_() * 1.0
    loss = ct.cross_entropy(logits, t, inplace_backward=True)
    loss.backward(retain_graph=True)
    assert torch.equal(loss.detach(), ref_loss)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    logits = x.clone().requires_grad_() * 1.0
    loss = ct.cross_entropy(logits, t, inplace_backward=True)
    (g,) = torch.autograd.grad(loss, logits)
    assert torch.equal(g, ref_grad)
    logits = x.clone().requires_grad_() * 1.0
    (g,) = torch.autograd.grad(ct.cross_entropy(logits, t, inplace_backward=True), logits, torch.tensor(3.0))
    torch.testing.assert_close(g, 3.0 * ref_grad, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_small_call_gradient_comes_with_the_forward(simd_path, monkeypatch, dtype, reduction):
    """Up to _EAGER_GRAD_ELEMS logits the forward pass also writes the gradient for an
    incoming gradient of 1: the same bits as the backward pass, handed over only once."""
    x, t = _case(5, (3, 4), 29, dtype)
    ones = torch.ones(29, dtype=torch.float64)
    _, general = _loss_and_grad(x, t, torch.tensor(1.0), reduction=reduction, weight=ones)
    _, eager = _loss_and_grad(x, t, torch.tensor(1.0), reduction=reduction)
    monkeypatch.setattr(ct, "_EAGER_GRAD_ELEMS", 0)
    _, late = _loss_and_grad(x, t, torch.tensor(1.0), reduction=reduction)
    assert torch.equal(eager, general) and torch.equal(eager, late)
    monkeypatch.undo()

    # Three backward passes through one graph add three gradients, as the general path.
    def thrice(**kw):
        leaf = x.clone().requires_grad_()
        loss = ct.cross_entropy(leaf, t, reduction=reduction, **kw)
        for _ in range(3):
            loss.backward(retain_graph=True)
        return leaf.grad

    lean3, general3 = thrice(), thrice(weight=ones)
    assert torch.equal(lean3, general3) and not torch.equal(lean3, eager)


def test_only_small_calls_hold_a_gradient_before_backward():
    x, t = _case(6, (4,), 9, torch.float32)
    loss = ct.cross_entropy(x.clone().requires_grad_(), t)
    assert loss.grad_fn.g1 is not None and loss.grad_fn.g1.shape == (4, 9)
    loss.backward()
    assert loss.grad_fn.g1 is None  # handed over
    big = torch.zeros(2, ct._EAGER_GRAD_ELEMS // 2 + 1, requires_grad=True)
    assert ct.cross_entropy(big, torch.zeros(2, dtype=torch.int64)).grad_fn.g1 is None
    loss = ct.cross_entropy(x.clone().requires_grad_(), t, reduction="none")
    assert loss.grad_fn.g1 is None  # per-row incoming gradients: nothing to precompute
