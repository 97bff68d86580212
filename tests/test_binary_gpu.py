"""BCE-with-logits and the sigmoid focal loss on a real CUDA device: CuPy arrays and CUDA
torch tensors against the CPU engine and the float64 references. Skipped cleanly without
CuPy or a device (tests/test_binary_kernels.py runs the same kernel on the CPU)."""

from __future__ import annotations

import numpy as np
import pytest

cp = pytest.importorskip("cupy")
try:
    _NDEV = cp.cuda.runtime.getDeviceCount()
except Exception:  # no driver, no device
    _NDEV = 0
if _NDEV == 0:
    pytest.skip("no CUDA device", allow_module_level=True)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import ce_fast  # noqa: E402
import ce_fast.torch as ct  # noqa: E402

pytestmark = pytest.mark.gpu
needs_torch = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs torch with CUDA")


def _case(shape, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * 4).astype(np.float32), rng.random(shape).astype(np.float32)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cupy_matches_cpu(reduction):
    x, t = _case((5, 3000))
    pw = np.random.default_rng(1).random(3000).astype(np.float32)
    cpu = ce_fast.binary_cross_entropy_with_logits_and_grad(x, t, pos_weight=pw, reduction=reduction)
    gpu = ce_fast.binary_cross_entropy_with_logits_and_grad(
        cp.asarray(x), cp.asarray(t), pos_weight=cp.asarray(pw), reduction=reduction
    )
    assert isinstance(gpu[0], cp.ndarray) and isinstance(gpu[1], cp.ndarray)
    np.testing.assert_allclose(cp.asnumpy(gpu[0]), cpu[0], rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(cp.asnumpy(gpu[1]), cpu[1], rtol=2e-5, atol=1e-7)
    f_cpu = ce_fast.sigmoid_focal_loss(x, t, reduction=reduction)
    f_gpu = ce_fast.sigmoid_focal_loss(cp.asarray(x), cp.asarray(t), reduction=reduction)
    np.testing.assert_allclose(cp.asnumpy(f_gpu), f_cpu, rtol=2e-5, atol=1e-6)


@needs_torch
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_torch_cuda_autograd_and_in_place(dtype):
    x, t = _case((4, 7, 129), seed=2)
    xc = torch.from_numpy(x).to("cuda", dtype).requires_grad_()
    tc = torch.from_numpy(t).to("cuda", dtype)
    w = torch.rand(7, 1, device="cuda") + 0.5
    loss = ct.binary_cross_entropy_with_logits(xc, tc, w, pos_weight=torch.rand(129, device="cuda"))
    loss.backward()
    assert loss.device.type == "cuda" and loss.dtype == torch.float32 and xc.grad.dtype == dtype
    xr = xc.detach().double().requires_grad_()
    ref = F.binary_cross_entropy_with_logits(xr, tc.double(), w.double())
    z = xc.detach().clone()
    l2, g2 = ce_fast.binary_cross_entropy_with_logits_and_grad(z, tc, weight=w, out=z)
    assert g2 is z
    ref.backward()
    torch.testing.assert_close(l2.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(z.double(), xr.grad.to(dtype).double(), rtol=2e-2, atol=1e-6)


@needs_torch
def test_no_host_sync_and_cuda_graph_capture():
    """Without weights nothing waits for the device: the call can be captured."""
    x = torch.randn(64, 512, device="cuda")
    t = torch.rand(64, 512, device="cuda")
    g = torch.empty_like(x)
    ce_fast.sigmoid_focal_loss_and_grad(x, t, reduction="mean", out=g)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss, _ = ce_fast.sigmoid_focal_loss_and_grad(x, t, reduction="mean", out=g)
    graph.replay()
    torch.cuda.synchronize()
    ref = ce_fast.sigmoid_focal_loss(x.cpu(), t.cpu(), reduction="mean")
    torch.testing.assert_close(loss.cpu(), ref, rtol=1e-5, atol=1e-7)


def test_mixed_devices_are_refused():
    x, t = _case((2, 3))
    with pytest.raises(ValueError, match="logits are on cuda:0 but target is on cpu"):
        ce_fast.binary_cross_entropy_with_logits(cp.asarray(x), t)
