"""ce_fast.torch.kl_divergence and focal_loss: autograd against torch's own formulas in
float64, gradcheck, the custom ops (opcheck) and torch.compile(fullgraph=True)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ce_fast.torch as ct

REDUCTIONS = ("mean", "sum", "none")


def _reduce(rows, valid, reduction):
    rows = torch.where(valid, rows, 0.0)
    if reduction == "none":
        return rows
    return rows.sum() / (valid.sum() if reduction == "mean" else 1)


def torch_kl(s, t, T, reverse, y, reduction, ignore_index=-100):
    ls, lt = F.log_softmax(s / T, -1), F.log_softmax(t / T, -1)
    a, b = (lt, ls) if reverse else (ls, lt)
    rows = F.kl_div(a, b, log_target=True, reduction="none").sum(-1)
    valid = torch.ones_like(rows, dtype=torch.bool) if y is None else y != ignore_index
    return _reduce(rows, valid, reduction)


def torch_focal(z, y, gamma, alpha, reduction, ignore_index=-100):
    valid = y != ignore_index
    yi = torch.where(valid, y, 0)
    lp = F.log_softmax(z, -1).gather(-1, yi.unsqueeze(-1)).squeeze(-1)
    a = torch.ones(z.shape[-1], dtype=z.dtype) if alpha is None else alpha
    rows = -a[yi] * (-torch.expm1(lp)) ** gamma * lp
    return _reduce(rows, valid, reduction)


def _case(seed, shape=(2, 3, 11)):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(shape, generator=g, dtype=torch.float64) * 2
    t = torch.randn(shape, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, shape[-1], shape[:-1], generator=g)
    y.view(-1)[1] = -100
    return s, t, y


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_kl_matches_torch_autograd(reduction, reverse, masked):
    s, t, y = _case(0)
    y = y if masked else None
    s1, t1 = s.clone().requires_grad_(), t.clone().requires_grad_()
    s2, t2 = s.clone().requires_grad_(), t.clone().requires_grad_()
    got = ct.kl_divergence(s1, t1, temperature=1.7, reverse=reverse, target=y, reduction=reduction)
    want = torch_kl(s2, t2, 1.7, reverse, y, reduction)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    gw = torch.randn(want.shape, dtype=torch.float64)
    (got * gw).sum().backward()
    (want * gw).sum().backward()
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(t1.grad, t2.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("gamma", [0.0, 1.5, 2.0])
@pytest.mark.parametrize("with_alpha", [False, True])
def test_focal_matches_torch_autograd(reduction, gamma, with_alpha):
    z, _, y = _case(1)
    alpha = torch.rand(z.shape[-1], dtype=torch.float64) if with_alpha else None
    z1, z2 = z.clone().requires_grad_(), z.clone().requires_grad_()
    got = ct.focal_loss(z1, y, gamma=gamma, alpha=alpha, reduction=reduction)
    want = torch_focal(z2, y, gamma, alpha, reduction)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    gw = torch.randn(want.shape, dtype=torch.float64)
    (got * gw).sum().backward()
    (want * gw).sum().backward()
    torch.testing.assert_close(z1.grad, z2.grad, rtol=1e-10, atol=1e-12)


def test_focal_gamma0_equals_cross_entropy():
    z, _, y = _case(2)
    z = z.float()
    z1, z2 = z.clone().requires_grad_(), z.clone().requires_grad_()
    a = ct.focal_loss(z1, y, gamma=0.0)
    b = ct.cross_entropy(z2, y)
    assert torch.equal(a, b)
    a.backward()
    b.backward()
    assert torch.equal(z1.grad, z2.grad)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck(reduction):
    s, t, y = _case(3, (2, 2, 6))
    for rev in (False, True):
        assert torch.autograd.gradcheck(
            lambda a, b: ct.kl_divergence(a, b, temperature=2.0, reverse=rev, target=y, reduction=reduction),
            (s.clone().requires_grad_(), t.clone().requires_grad_()),
        )
    alpha = torch.rand(6, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda a: ct.focal_loss(a, y, gamma=1.5, alpha=alpha, reduction=reduction), (s.clone().requires_grad_(),)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_dtypes(dtype):
    s, t, y = _case(4, (3, 300))
    s1 = s.to(dtype).requires_grad_()
    loss = ct.kl_divergence(s1, t.to(dtype), temperature=2.0)
    assert loss.dtype == torch.float32
    loss.backward()
    assert s1.grad.dtype == dtype
    s2 = s.to(dtype).double().requires_grad_()
    torch_kl(s2, t.to(dtype).double(), 2.0, False, None, "mean").backward()
    torch.testing.assert_close(s1.grad.double(), s2.grad, rtol=1e-2, atol=1e-4)
    z1 = s.to(dtype).requires_grad_()
    ct.focal_loss(z1, y).backward()
    assert z1.grad.dtype == dtype


def test_opcheck_custom_ops():
    s, t, y = _case(5, (2, 3, 5))
    alpha = torch.rand(5, dtype=torch.float64)
    for red in REDUCTIONS:
        for tgt in (None, y):
            args = (s.clone().requires_grad_(), t.clone(), tgt, 1.5, True, -100, red)
            torch.library.opcheck(torch.ops.ce_fast.kl_divergence.default, args)
            loss, stats = torch.ops.ce_fast.kl_divergence(*args)
            grad = torch.rand(loss.shape, dtype=loss.dtype)
            torch.library.opcheck(
                torch.ops.ce_fast.kl_divergence_backward.default, (grad, s, t, tgt, stats.detach()) + args[3:]
            )
        fargs = (s.clone().requires_grad_(), y, alpha, 2.0, -100, red)
        torch.library.opcheck(torch.ops.ce_fast.focal_loss.default, fargs)
        loss, stats = torch.ops.ce_fast.focal_loss(*fargs)
        grad = torch.rand(loss.shape, dtype=loss.dtype)
        torch.library.opcheck(
            torch.ops.ce_fast.focal_loss_backward.default, (grad, s, y, alpha, stats.detach()) + fargs[3:]
        )


def test_torch_compile_fullgraph():
    """A distillation step: compiled with fullgraph=True (no graph break), same loss and
    gradients as eager."""
    s, t, y = _case(6, (3, 4, 17))
    T = 2.0

    def step(student, teacher, labels):
        kd = ct.kl_divergence(student, teacher.detach(), temperature=T, target=labels) * T**2
        return kd + ct.focal_loss(student, labels, gamma=2.0)

    out = []
    for compiled in (False, True):
        x = s.clone().float().requires_grad_()
        fn = torch.compile(step, fullgraph=True, backend="aot_eager") if compiled else step
        loss = fn(x, t.float(), y)
        loss.backward()
        out.append((loss.detach(), x.grad))
    torch.testing.assert_close(out[1][0], out[0][0])
    torch.testing.assert_close(out[1][1], out[0][1])


@pytest.mark.parametrize(
    "call, exc, msg",
    [
        (lambda s, t, y: ct.kl_divergence(s.numpy(), t), TypeError, "input and teacher must be torch tensors"),
        (lambda s, t, y: ct.kl_divergence(s, t, temperature=0.0), ValueError, "temperature must be finite and > 0"),
        (lambda s, t, y: ct.kl_divergence(s, t, target=y.numpy()), TypeError, "target must be a torch tensor or None"),
        (lambda s, t, y: ct.kl_divergence(s, t, reduction="batchmean"), ValueError, "reduction must be one of"),
        (lambda s, t, y: ct.focal_loss(s, y, gamma=-1.0), ValueError, "gamma must be finite and >= 0"),
        (lambda s, t, y: ct.focal_loss(s, y, alpha=[1.0] * 11), TypeError, "alpha must be a torch tensor or None"),
        (lambda s, t, y: ct.focal_loss(s, y.numpy()), TypeError, "input and target must be torch tensors"),
    ],
)
def test_bad_input(call, exc, msg):
    s, t, y = _case(7)
    with pytest.raises(exc) as e:
        call(s, t, y)
    assert msg in str(e.value)
