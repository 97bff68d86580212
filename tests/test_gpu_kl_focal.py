"""kl_divergence and focal_loss on a CUDA device (torch CUDA tensors and CuPy arrays)
against the CPU engine on the same values. Skipped without CuPy and a CUDA device."""

from __future__ import annotations

import numpy as np
import pytest

cp = pytest.importorskip("cupy")
try:
    if cp.cuda.runtime.getDeviceCount() < 1:
        raise RuntimeError
except Exception:
    pytest.skip("no CUDA device", allow_module_level=True)

import ce_fast  # noqa: E402

pytestmark = pytest.mark.gpu

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs torch with CUDA", allow_module_level=True)
import ce_fast.torch as ct  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _pair(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(shape, generator=g) * 3).to(dtype)
    t = (torch.randn(shape, generator=g) * 3).to(dtype)
    y = torch.randint(0, shape[-1], shape[:-1], generator=g)
    y.view(-1)[1] = -100
    return s, t, y


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("shape", [(7, 33), (3, 5, 40000)])
def test_kl_cuda_matches_cpu(dtype, reverse, shape):
    s, t, y = _pair(shape, dtype)
    kw = dict(temperature=2.0, reverse=reverse, target=y)
    want_rows = ce_fast.kl_divergence(s, t, reduction="none", **kw)
    want_loss, want_g = ce_fast.kl_divergence_and_grad(s, t, **kw)
    kwc = dict(kw, target=y.cuda())
    rows = ce_fast.kl_divergence(s.cuda(), t.cuda(), reduction="none", **kwc)
    loss, g = ce_fast.kl_divergence_and_grad(s.cuda(), t.cuda(), **kwc)
    assert rows.is_cuda and g.is_cuda and g.dtype == dtype
    torch.testing.assert_close(rows.cpu(), want_rows, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loss.cpu(), want_loss, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g.cpu().double(), want_g.double(), rtol=2e-2, atol=1e-6)
    z = s.cuda()
    ce_fast.kl_divergence_and_grad(z, t.cuda(), out=z, **kwc)
    torch.testing.assert_close(z, g)


def test_kl_cupy_and_non_finite():
    s, t, _ = _pair((4, 3000), torch.float32, seed=1)
    s[0, 5] = float("nan")
    t[1, :2000] = float("-inf")
    s[2, 7] = float("-inf")
    want = ce_fast.kl_divergence(s, t, reduction="none").numpy()
    got = ce_fast.kl_divergence(cp.asarray(s.numpy()), cp.asarray(t.numpy()), reduction="none")
    assert isinstance(got, cp.ndarray)
    np.testing.assert_allclose(cp.asnumpy(got), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_focal_cuda_matches_cpu(dtype):
    s, _, y = _pair((6, 5000), dtype, seed=2)
    alpha = torch.rand(5000, dtype=torch.float64)
    want_loss, want_g = ce_fast.focal_loss_and_grad(s, y, gamma=2.0, alpha=alpha)
    loss, g = ce_fast.focal_loss_and_grad(s.cuda(), y.cuda(), gamma=2.0, alpha=alpha.cuda())
    torch.testing.assert_close(loss.cpu(), want_loss, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g.cpu().double(), want_g.double(), rtol=2e-2, atol=1e-6)
    assert torch.equal(ce_fast.focal_loss(s.cuda(), y.cuda(), gamma=0.0), ce_fast.cross_entropy(s.cuda(), y.cuda()))


def test_torch_autograd_on_cuda():
    s, t, y = _pair((4, 8, 3000), torch.float32, seed=3)
    a = s.cuda().requires_grad_()
    (ct.kl_divergence(a, t.cuda(), temperature=2.0, target=y.cuda()) + ct.focal_loss(a, y.cuda())).backward()
    b = s.clone().requires_grad_()
    (ct.kl_divergence(b, t, temperature=2.0, target=y) + ct.focal_loss(b, y)).backward()
    torch.testing.assert_close(a.grad.cpu(), b.grad, rtol=1e-4, atol=1e-7)
