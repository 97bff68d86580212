"""ce_fast.torch.binary_cross_entropy_with_logits / sigmoid_focal_loss: autograd against
torch in float64 (F.binary_cross_entropy_with_logits, torchvision's focal formula),
gradcheck, target gradients, the module, and torch.compile(fullgraph=True)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ce_fast.torch as ct

from test_binary import torchvision_focal


def _case(seed, shape, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3).to(dtype)
    t = torch.rand(shape, generator=g, dtype=torch.float64).to(dtype)
    return x, t


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opts", ["plain", "weight", "pos_weight", "both"])
def test_bce_autograd_matches_torch(simd_path, reduction, opts):
    x, t = _case(1, (3, 5, 17))
    kw = {}
    if opts in ("weight", "both"):
        kw["weight"] = torch.rand(5, 1, dtype=torch.float64) + 0.5
    if opts in ("pos_weight", "both"):
        kw["pos_weight"] = torch.rand(17, dtype=torch.float64) * 2
    x1, t1 = x.clone().requires_grad_(), t.clone().requires_grad_()
    x2, t2 = x.clone().requires_grad_(), t.clone().requires_grad_()
    a = ct.binary_cross_entropy_with_logits(
        x1, t1, kw.get("weight"), pos_weight=kw.get("pos_weight"), reduction=reduction
    )
    b = F.binary_cross_entropy_with_logits(x2, t2, reduction=reduction, **kw)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    go = torch.randn(a.shape, dtype=torch.float64)
    a.backward(go)
    b.backward(go)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(t1.grad, t2.grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bce_low_precision_tensors(simd_path, dtype):
    x, t = _case(2, (4, 33), dtype)
    xx = x.clone().requires_grad_()
    loss = ct.binary_cross_entropy_with_logits(xx, t)
    assert loss.dtype == torch.float32
    loss.backward()
    assert xx.grad.dtype == dtype
    xr = x.double().requires_grad_()
    ref = F.binary_cross_entropy_with_logits(xr, t.double())
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(xx.grad.double(), xr.grad.to(dtype).double(), rtol=2e-2, atol=1e-6)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (-1.0, 1.5), (0.6, 0.0)])
def test_focal_autograd_matches_torchvision_formula(simd_path, reduction, alpha, gamma):
    x, t = _case(3, (6, 19))
    t = (t > 0.5).double() * 0.9 + 0.05  # soft targets away from 0 and 1
    x1, t1 = x.clone().requires_grad_(), t.clone().requires_grad_()
    x2, t2 = x.clone().requires_grad_(), t.clone().requires_grad_()
    a = ct.sigmoid_focal_loss(x1, t1, alpha, gamma, reduction)
    b = torchvision_focal(x2, t2, alpha, gamma, reduction)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-14)
    go = torch.rand(a.shape, dtype=torch.float64) + 0.5
    a.backward(go)
    b.backward(go)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-9, atol=1e-14)
    torch.testing.assert_close(t1.grad, t2.grad, rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck(reduction):
    x, t = _case(4, (3, 6))
    x.requires_grad_()
    t.requires_grad_()
    pw = torch.rand(6, dtype=torch.float64) + 0.5
    w = torch.rand(3, 1, dtype=torch.float64) + 0.5
    assert torch.autograd.gradcheck(
        lambda x, t: ct.binary_cross_entropy_with_logits(x, t, w, pos_weight=pw, reduction=reduction), (x, t)
    )
    assert torch.autograd.gradcheck(lambda x, t: ct.sigmoid_focal_loss(x, t, 0.3, 2.0, reduction), (x, t))
    assert torch.autograd.gradcheck(lambda x, t: ct.sigmoid_focal_loss(x, t, -1.0, 2.5, reduction), (x, t))


def test_weight_requiring_grad_is_refused():
    x, t = _case(5, (2, 3))
    with pytest.raises(ValueError, match="weight must not require grad"):
        ct.binary_cross_entropy_with_logits(x, t, torch.ones(3, dtype=torch.float64, requires_grad=True))


def test_module():
    x, t = _case(6, (4, 7))
    pw = torch.rand(7, dtype=torch.float64)
    crit = ct.BCEWithLogitsLoss(pos_weight=pw, reduction="sum")
    ref = torch.nn.BCEWithLogitsLoss(pos_weight=pw, reduction="sum")
    torch.testing.assert_close(crit(x, t), ref(x, t), rtol=1e-12, atol=0)


def test_bad_input_errors_pass_through():
    x, t = _case(7, (2, 3))
    with pytest.raises(ValueError, match="target shape"):
        ct.binary_cross_entropy_with_logits(x, t[0])
    with pytest.raises(ValueError, match="gamma must be non-negative"):
        ct.sigmoid_focal_loss(x, t, 0.25, -2.0)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend):
    """A multi-label head trained through both losses, compiled with fullgraph=True: same
    loss and gradients as eager."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 5)
    g = torch.Generator().manual_seed(8)
    h = torch.randn(4, 6, 8, generator=g)
    y = (torch.rand(4, 6, 5, generator=g) > 0.5).float()
    pw = torch.rand(5) + 0.5

    def loss_fn(h, y):
        z = lin(h)
        return ct.binary_cross_entropy_with_logits(z, y, pos_weight=pw) + ct.sigmoid_focal_loss(z, y, reduction="mean")

    def run(fn):
        lin.zero_grad()
        loss = fn(h, y)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in lin.parameters()]

    torch._dynamo.reset()
    l0, g0 = run(loss_fn)
    l1, g1 = run(torch.compile(loss_fn, fullgraph=True, backend=backend))
    torch.testing.assert_close(l1, l0)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b)
    ref = F.binary_cross_entropy_with_logits(lin(h).double(), y.double(), pos_weight=pw.double())
    ref = ref + torchvision_focal(lin(h).double(), y.double(), 0.25, 2.0, "mean")
    torch.testing.assert_close(l0.double(), ref.detach(), rtol=1e-6, atol=1e-7)
