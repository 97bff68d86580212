"""The CUDA engine on a real device: CuPy arrays and CUDA torch tensors against a
float64 NumPy reference computed here from host copies of the inputs.

Skipped cleanly without CuPy or without a CUDA device. The kernels are those the engine
loads (kernels/ce.cu as embedded in _core, or $CE_FAST_KERNELS_DIR); tests/test_kernels_emulated.py
runs the same kernels on the CPU, tests/test_kernels_compile.py compiles them.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

cp = pytest.importorskip("cupy")
try:
    _NDEV = cp.cuda.runtime.getDeviceCount()
except Exception:  # no driver, no device
    _NDEV = 0
if _NDEV == 0:
    pytest.skip("no CUDA device", allow_module_level=True)

import ce_fast  # noqa: E402
from ce_fast._engines import cuda as _cuda  # noqa: E402

pytestmark = pytest.mark.gpu

try:
    import torch

    HAVE_TORCH = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    torch = None
    HAVE_TORCH = False

needs_torch = pytest.mark.skipif(not HAVE_TORCH, reason="needs torch with CUDA")
BF16 = np.dtype(ml_dtypes.bfloat16)


def _cupy_has_bf16() -> bool:
    try:
        cp.asarray(np.zeros(2, BF16))
        return True
    except Exception:
        return False


# ---------------------------------------------------------------- inputs


def make(lib: str, a: np.ndarray, dtype: str):
    """`a` (float64 or integer NumPy) on the GPU as `lib` ("cupy" / "torch") in `dtype`."""
    if lib == "torch":
        if not HAVE_TORCH:
            pytest.skip("needs torch with CUDA")
        t = torch.from_numpy(np.ascontiguousarray(a)).cuda()
        return t.to(getattr(torch, dtype)) if dtype else t
    if dtype == "bfloat16":
        if not _cupy_has_bf16():
            pytest.skip("this CuPy has no bfloat16")
        return cp.asarray(a.astype(BF16))
    return cp.asarray(a.astype(dtype) if dtype else a)


def host64(a) -> np.ndarray:
    if torch is not None and isinstance(a, torch.Tensor):
        return a.detach().to(torch.float64).cpu().numpy()
    return cp.asnumpy(a).astype(np.float64)


def host(a) -> np.ndarray:
    if torch is not None and isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return cp.asnumpy(a)


def is_lib(value, lib: str) -> bool:
    if lib == "torch":
        return isinstance(value, torch.Tensor) and value.is_cuda
    return isinstance(value, cp.ndarray)


# ---------------------------------------------------------------- float64 reference


def ref_transform(x, scale=1.0, softcap=None):
    z = x * scale
    if softcap is not None:
        z = softcap * np.tanh(z / softcap)
    return z


def ref_lse(z):
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        m = np.max(z, axis=-1, keepdims=True)
        m0 = np.where(np.isfinite(m), m, 0.0)
        return (np.log(np.sum(np.exp(z - m0), axis=-1, keepdims=True)) + m0)[..., 0]


def ref(
    x,
    target,
    *,
    weight=None,
    ignore_index=-100,
    reduction="mean",
    label_smoothing=0.0,
    z_loss=0.0,
    softcap=None,
    logit_scale=1.0,
    grad_output=1.0,
):
    """(loss, grad) of torch.nn.functional.cross_entropy semantics, class axis last, float64."""
    C = x.shape[-1]
    z = ref_transform(x, logit_scale, softcap)
    lse = ref_lse(z)
    p = np.exp(z - lse[..., None])
    w = np.ones(C) if weight is None else np.asarray(weight, np.float64)
    eps = label_smoothing
    if np.issubdtype(np.asarray(target).dtype, np.floating):
        t = (1 - eps) * target + eps / C
        rows = lse * np.sum(w * t, -1) - np.sum(w * t * z, -1)
        dz = np.sum(w * t, -1)[..., None] * p - w * t
        valid = np.ones(x.shape[:-1], bool)
        den = float(valid.sum())
    else:
        y = np.asarray(target).astype(np.int64)
        valid = y != ignore_index
        yc = np.where(valid, y, 0)
        wy = np.where(valid, w[yc], 0.0)
        zy = np.take_along_axis(z, yc[..., None], -1)[..., 0]
        rows = (1 - eps) * wy * (lse - zy)
        if eps:  # without smoothing, 0 * (sum over a row holding -inf) would be NaN, not 0
            rows = rows + eps / C * (w.sum() * lse - np.sum(w * z, -1))
        onehot = np.zeros_like(z)
        np.put_along_axis(onehot, yc[..., None], 1.0, -1)
        dz = (1 - eps) * wy[..., None] * (p - onehot) + eps / C * (w.sum() * p - w)
        den = float(wy.sum())
    rows = rows + z_loss * lse**2
    dz = dz + 2 * z_loss * lse[..., None] * p
    rows = np.where(valid, rows, 0.0)
    chain = logit_scale * (1 - (z / softcap) ** 2) if softcap is not None else logit_scale
    go = np.broadcast_to(np.asarray(grad_output, np.float64), x.shape[:-1])
    if reduction == "none":
        loss, g = rows, go
    elif reduction == "sum":
        loss, g = rows.sum(), go
    else:
        loss = rows.sum() / den if den else np.nan
        g = go / den if den else go * 0.0
    grad = np.where(valid[..., None], g[..., None] * chain * dz, 0.0)
    return loss, grad


def assert_loss(got, want, dtype, what=""):
    got = host64(got)
    rtol = 2e-5 if dtype in ("float32", None) else 1e-4
    np.testing.assert_allclose(got, want, rtol=rtol, atol=1e-5, equal_nan=True, err_msg=what)


def assert_grad(got, want, dtype, what=""):
    got = host64(got)
    eps = {"float32": 2.0**-23, "float16": 2.0**-10, "bfloat16": 2.0**-7}[dtype]
    scale = np.nanmax(np.abs(want)) if np.isfinite(want).any() else 1.0
    np.testing.assert_allclose(
        got, want, rtol=8 * eps + 1e-5, atol=8 * eps * scale + 1e-6 * scale, equal_nan=True, err_msg=what
    )


LIBS = ["cupy", "torch"]
DTYPES = ["float32", "float16", "bfloat16"]


# ---------------------------------------------------------------- logsumexp


@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C", [1, 7, 1000, 50257])
def test_logsumexp(lib, dtype, C):
    rng = np.random.default_rng(C)
    a = rng.standard_normal((33, C)) * 3
    x = make(lib, a, dtype)
    got = ce_fast.logsumexp(x)
    assert is_lib(got, lib) and tuple(got.shape) == (33,)
    assert str(got.dtype).endswith("float32")
    np.testing.assert_allclose(host64(got), ref_lse(host64(x)), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("lib", LIBS)
def test_logsumexp_non_finite_and_out(lib):
    a = np.random.default_rng(1).standard_normal((5, 300))
    a[0, 3] = np.nan
    a[1, 7] = np.inf
    a[2, :] = -np.inf
    a[3, [0, 299]] = np.inf
    x = make(lib, a, "float32")
    want = ref_lse(a)
    got = host64(ce_fast.logsumexp(x))
    assert np.isnan(got[0]) and got[1] == np.inf and got[2] == -np.inf and got[3] == np.inf
    np.testing.assert_allclose(got[4], want[4], rtol=1e-6)
    out = make(lib, np.zeros(5), "float64")
    assert ce_fast.logsumexp(x, out=out) is out
    np.testing.assert_allclose(host64(out)[4], want[4], rtol=1e-6)


# ---------------------------------------------------------------- cross_entropy


OPTIONS = [
    dict(),
    dict(reduction="sum"),
    dict(reduction="none"),
    dict(ignore_index=3),
    dict(label_smoothing=0.1, reduction="sum"),
    dict(weight=True, label_smoothing=0.2),
    dict(weight=True, ignore_index=3, reduction="none"),
    dict(z_loss=1e-3),
    dict(softcap=10.0, logit_scale=0.5),
    dict(softcap=3.0, z_loss=1e-4, label_smoothing=0.05, reduction="none"),
]


def _opts(opts, rng, C):
    kw = dict(opts)
    if kw.get("weight") is True:
        kw["weight"] = rng.uniform(0.1, 2.0, C)
    return kw


@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C", [5, 1000, 50257])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(o) or "plain")
def test_cross_entropy_and_grad(lib, dtype, C, opts):
    rng = np.random.default_rng(C)
    N = 37
    x = make(lib, rng.standard_normal((N, C)) * 2, dtype)
    y_np = rng.integers(0, C, N)
    y_np[[2, 9]] = 3 % C
    y = make(lib, y_np, None)
    kw = _opts(opts, rng, C)
    w = kw.get("weight")
    kw_dev = dict(kw)
    if w is not None:
        kw_dev["weight"] = make(lib, w, "float64")
    want_loss, want_grad = ref(host64(x), y_np, **kw)
    loss = ce_fast.cross_entropy(x, y, **kw_dev)
    assert is_lib(loss, lib)
    assert str(loss.dtype).endswith("float32")
    assert_loss(loss, want_loss, dtype, "cross_entropy")
    loss2, grad = ce_fast.cross_entropy_and_grad(x, y, **kw_dev)
    assert is_lib(grad, lib) and tuple(grad.shape) == (N, C) and grad.dtype == x.dtype
    assert_loss(loss2, want_loss, dtype, "cross_entropy_and_grad loss")
    assert_grad(grad, want_grad, dtype, "grad")


@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gradient_in_place(lib, dtype):
    rng = np.random.default_rng(5)
    x = make(lib, rng.standard_normal((64, 32000)) * 2, dtype)
    y_np = rng.integers(0, 32000, 64)
    y_np[5] = -100
    want_loss, want_grad = ref(host64(x), y_np, label_smoothing=0.1, z_loss=1e-4)
    ptr = x.data_ptr() if lib == "torch" else x.data.ptr
    loss, g = ce_fast.cross_entropy_and_grad(x, make(lib, y_np, None), label_smoothing=0.1, z_loss=1e-4, out=x)
    assert g is x and (x.data_ptr() if lib == "torch" else x.data.ptr) == ptr
    assert_loss(loss, want_loss, dtype)
    assert_grad(x, want_grad, dtype, "in place")
    assert np.all(host64(x)[5] == 0)


@needs_torch
def test_true_class_term_survives_bf16_in_place():
    """p_y - 1 is formed in f64 from the row's lse and rounded once: confident rows
    (p_y - 1 ~ -1.6e-9, below f32's resolution next to 1) keep a non-zero, correctly
    signed true-class gradient in bf16, in place."""
    C = 128256
    x = torch.full((4, C), -16.0, device="cuda", dtype=torch.bfloat16)
    y = torch.tensor([0, 1000, 64000, C - 1], device="cuda")
    x[torch.arange(4), y] = 16.0
    _, want_grad = ref(host64(x), host(y), reduction="sum")
    _, g = ce_fast.cross_entropy_and_grad(x, y, reduction="sum", out=x)
    got = host64(g)[np.arange(4), host(y)]
    want = want_grad[np.arange(4), host(y)]
    assert np.all(want < 0) and np.all(got < 0)
    # the lse loses the few tiny terms summed in f32 next to the maximum (< 1%)
    np.testing.assert_allclose(got, want, rtol=2.0**-6)


@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("xdtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("tdtype", ["float32", "float64", "float16", "bfloat16"])
def test_soft_targets(lib, xdtype, tdtype):
    rng = np.random.default_rng(7)
    N, C = 19, 4099
    x = make(lib, rng.standard_normal((N, C)), xdtype)
    t_np = rng.dirichlet(np.ones(C), N)
    t = make(lib, t_np, tdtype)
    w = rng.uniform(0.5, 1.5, C)
    kw = dict(label_smoothing=0.1, z_loss=1e-3)
    want_loss, want_grad = ref(host64(x), host64(t), weight=w, **kw)
    loss, g = ce_fast.cross_entropy_and_grad(x, t, weight=make(lib, w, "float32"), **kw)
    assert_loss(loss, want_loss, xdtype)
    assert_grad(g, want_grad, xdtype)


@pytest.mark.parametrize("lib", LIBS)
def test_layouts(lib):
    """Batch dims that do not collapse (a row table), rows starting off 16-byte
    boundaries, and a strided class axis."""
    rng = np.random.default_rng(9)
    base = make(lib, rng.standard_normal((6, 5, 1003)), "float16")
    y_np = rng.integers(0, 500, (6, 5))
    views = {
        "transposed": (base.transpose(1, 0, 2) if lib == "cupy" else base.permute(1, 0, 2))[..., :1000],
        "misaligned": base[..., 1:1001],
        "class-strided": base[..., ::2][..., :500],
    }
    for name, xv in views.items():
        yv = y_np.T.copy() if name == "transposed" else y_np
        yv = yv % xv.shape[-1]
        want_loss, want_grad = ref(host64(xv), yv, reduction="none")
        loss, g = ce_fast.cross_entropy_and_grad(xv, make(lib, yv, None), reduction="none")
        assert_loss(loss, want_loss, "float16", name)
        assert_grad(g, want_grad, "float16", name)


@pytest.mark.parametrize("lib", LIBS)
def test_grad_output_on_device(lib):
    rng = np.random.default_rng(11)
    x = make(lib, rng.standard_normal((8, 300)), "float32")
    y_np = rng.integers(0, 300, 8)
    go = rng.standard_normal(8)
    want_loss, want_grad = ref(host64(x), y_np, reduction="none", grad_output=go)
    _, g = ce_fast.cross_entropy_and_grad(
        x, make(lib, y_np, None), reduction="none", grad_output=make(lib, go, "float64")
    )
    assert_grad(g, want_grad, "float32")
    with pytest.raises(ValueError, match="grad_output"):
        ce_fast.cross_entropy_and_grad(x, make(lib, y_np, None), reduction="none", grad_output=go)


def test_zero_rows():
    x = cp.zeros((0, 10), cp.float32)
    y = cp.zeros((0,), cp.int64)
    assert float(ce_fast.cross_entropy(x, y, reduction="sum")) == 0.0
    assert np.isnan(float(ce_fast.cross_entropy(x, y)))
    loss, g = ce_fast.cross_entropy_and_grad(x, y, reduction="none")
    assert loss.shape == (0,) and g.shape == (0, 10)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("tdtype", ["int64", "int32", "uint8"])
def test_index_error_from_the_kernel_flag(lib, tdtype):
    x_np = np.zeros((4, 6, 50))
    y_np = np.ones((4, 6), dtype=tdtype)
    y_np[2, 3] = 50
    y_np[3, 0] = 200
    with pytest.raises(IndexError) as cpu:
        ce_fast.cross_entropy(x_np.astype(np.float32), y_np.astype(np.int64))
    x = make(lib, x_np, "float32")
    y = make(lib, y_np, None)
    with pytest.raises(IndexError) as gpu:
        ce_fast.cross_entropy(x, y)
    assert str(gpu.value) == str(cpu.value)
    assert "target value 50 at position (2, 3)" in str(gpu.value)
    with pytest.raises(IndexError):
        ce_fast.cross_entropy_and_grad(x, y, out=x)


@pytest.mark.parametrize("lib", LIBS)
def test_mixed_devices_name_both(lib):
    x_np = np.zeros((4, 10), np.float32)
    y_np = np.zeros(4, np.int64)
    x = make(lib, x_np, "float32")
    y = make(lib, y_np, None)
    with pytest.raises(ValueError, match=r"logits are on cuda:\d+ but target is on cpu"):
        ce_fast.cross_entropy(x, y_np)
    with pytest.raises(ValueError, match=r"logits are on cpu but target is on cuda:\d+"):
        ce_fast.cross_entropy(x_np, y)
    with pytest.raises(ValueError, match=r"logits are on cuda:\d+ but weight is on cpu"):
        ce_fast.cross_entropy(x, y, weight=np.ones(10))
    with pytest.raises(ValueError, match=r"logits are on cuda:\d+ but out is on cpu"):
        ce_fast.cross_entropy_and_grad(x, y, out=x_np)
    if HAVE_TORCH:
        with pytest.raises(ValueError, match=r"logits are on cpu but target is on cuda:\d+"):
            ce_fast.cross_entropy(torch.zeros(4, 10), torch.zeros(4, dtype=torch.int64, device="cuda"))


@pytest.mark.skipif(_NDEV < 2, reason="needs two GPUs")
def test_two_gpus():
    with cp.cuda.Device(1):
        x1 = cp.random.standard_normal((3, 100)).astype(cp.float32)
        y1 = cp.zeros(3, cp.int64)
    with cp.cuda.Device(0):
        y0 = cp.zeros(3, cp.int64)
        with pytest.raises(ValueError, match="logits are on cuda:1 but target is on cuda:0"):
            ce_fast.cross_entropy(x1, y0)
        loss = ce_fast.cross_entropy(x1, y1, reduction="none")  # runs on device 1 from device 0
    assert loss.device.id == 1
    np.testing.assert_allclose(
        cp.asnumpy(loss), ref(cp.asnumpy(x1).astype(np.float64), np.zeros(3, int), reduction="none")[0], rtol=1e-5
    )


# ---------------------------------------------------------------- streams and interop


@needs_torch
def test_torch_current_stream_is_used(monkeypatch):
    seen = []
    real_run = _cuda.run

    def spy(*a, **k):
        seen.append(cp.cuda.get_current_stream().ptr)
        return real_run(*a, **k)

    monkeypatch.setattr(_cuda, "run", spy)
    s = torch.cuda.Stream()
    x = torch.randn(64, 5000, device="cuda")
    y = torch.randint(0, 5000, (64,), device="cuda")
    torch.cuda.synchronize()
    with torch.cuda.stream(s):
        ce_fast.cross_entropy(x, y)
        ce_fast.cross_entropy_and_grad(x, y)
    ce_fast.logsumexp(x)
    assert seen[:2] == [s.cuda_stream, s.cuda_stream]
    assert seen[2] == torch.cuda.current_stream().cuda_stream


@needs_torch
def test_torch_stream_ordering():
    """Logits written on a side stream and consumed there without a sync: ce_fast's
    kernels queue behind the writes."""
    s = torch.cuda.Stream()
    y = torch.randint(0, 50000, (256,), device="cuda")
    torch.cuda.synchronize()
    with torch.cuda.stream(s):
        big = torch.randn(256, 50000, device="cuda")
        for _ in range(20):  # keep the stream busy
            big = big * 1.0001
        x = big.to(torch.bfloat16)
        loss = ce_fast.cross_entropy(x, y, reduction="none")
        want = torch.nn.functional.cross_entropy(x.float(), y, reduction="none")
    s.synchronize()
    torch.testing.assert_close(loss, want, rtol=1e-4, atol=1e-4)


@needs_torch
def test_torch_results_are_torch_on_the_device():
    x = torch.randn(8, 100, device="cuda", dtype=torch.bfloat16)
    y = torch.randint(0, 100, (8,), device="cuda")
    loss = ce_fast.cross_entropy(x, y)
    assert isinstance(loss, torch.Tensor) and loss.is_cuda and loss.dim() == 0 and loss.dtype == torch.float32
    rows = ce_fast.cross_entropy(x, y, reduction="none")
    assert rows.shape == (8,) and rows.device == x.device
    torch.testing.assert_close(
        rows, torch.nn.functional.cross_entropy(x.float(), y, reduction="none"), rtol=1e-5, atol=1e-5
    )
    loss, g = ce_fast.cross_entropy_and_grad(x, y)
    ref_x = x.float().requires_grad_()
    torch.nn.functional.cross_entropy(ref_x, y).backward()
    torch.testing.assert_close(g.float(), ref_x.grad, rtol=2.0**-7, atol=1e-6)


def test_argmax_statistic():
    from ce_fast import _batch
    from ce_fast._spec import LossSpec

    a = np.round(np.random.default_rng(13).standard_normal((9, 3000)) * 2)
    a[4, [10, 20]] = np.nan
    x = cp.asarray(a.astype(np.float32))
    y = cp.zeros(9, cp.int64)
    with _batch.device_scope(x):
        b = _batch.make_batch(x, y, LossSpec.make())
        am = cp.full(9, -1, cp.int64)
        _cuda.run(b, scale=1.0, softcap=0.0, want_wz=False, argmax=am)
    assert cp.asnumpy(am).tolist() == np.argmax(a.astype(np.float32), axis=-1).tolist()


def test_read_pass():
    a = cp.random.randint(0, 2**31, size=1 << 20, dtype=cp.int64)
    acc = _cuda.read_pass(a)
    words = cp.asnumpy(a).view(np.uint32)
    assert int(acc[0]) == int(np.bitwise_xor.reduce(words))


@pytest.mark.slow
def test_more_than_2_31_elements():
    """64-bit offsets: rows beyond element 2**31 of a bf16 array."""
    if not HAVE_TORCH:
        pytest.skip("needs torch with CUDA")
    rows, C = 2_200_000, 1000  # 2.2e9 elements, 4.4 GB
    x = torch.empty(rows, C, device="cuda", dtype=torch.bfloat16).normal_()
    y = torch.randint(0, C, (rows,), device="cuda")
    loss = ce_fast.cross_entropy(x, y, reduction="none")
    tail = slice(rows - 5, rows)
    want = torch.nn.functional.cross_entropy(x[tail].float(), y[tail], reduction="none")
    torch.testing.assert_close(loss[tail], want, rtol=1e-5, atol=1e-5)
    _, g = ce_fast.cross_entropy_and_grad(x, y, reduction="sum", out=x)
    ref_x = x[tail].float()  # x now holds the gradient; compare the tail's row sums (= 0)
    torch.testing.assert_close(ref_x.sum(-1), torch.zeros(5, device="cuda"), rtol=0, atol=2e-2)


# ---------------------------------------------------------------- issue 9: scale, both fused kernels, graphs

FUSED = list(_cuda.FUSED_KINDS)  # "two-pass" (ce_fused) and "one-read" (ce_fused1 / ce_fused1c)


@pytest.fixture(params=FUSED)
def fused(request, monkeypatch):
    """Runs a test with each fused loss+gradient kernel."""
    monkeypatch.setattr(_cuda, "FUSED_KERNEL", request.param)
    return request.param


def _torch_ref(x, y, **kw):
    """torch's own loss and gradient of float32 copies (class axis last)."""
    xf = x.detach().float().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(xf, y.long(), **kw)
    loss.backward(torch.ones_like(loss))
    return loss.detach(), xf.grad


@needs_torch
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", [(4096, 32000), (1024, 128256), (64, 262144), (7, 50257)])
def test_at_scale_against_torch(fused, dtype, shape):
    """Many rows per block and few huge rows (clusters), forward and fused, against torch."""
    torch.manual_seed(0)
    N, C = shape
    x = (torch.randn(N, C, device="cuda") * 3).to(getattr(torch, dtype))
    y = torch.randint(0, C, (N,), device="cuda")
    y[::17] = -100
    want_loss, want_grad = _torch_ref(x, y)
    loss = ce_fast.cross_entropy(x, y)
    torch.testing.assert_close(loss, want_loss, rtol=2e-5, atol=2e-5)
    loss2, g = ce_fast.cross_entropy_and_grad(x, y)
    torch.testing.assert_close(loss2, want_loss, rtol=2e-5, atol=2e-5)
    tol = (
        dict(rtol=2e-2, atol=2e-2 * float(want_grad.abs().max())) if dtype != "float32" else dict(rtol=1e-4, atol=1e-9)
    )
    torch.testing.assert_close(g.float(), want_grad, **tol)
    rows = ce_fast.cross_entropy(x, y, reduction="none")
    go = torch.rand(N, device="cuda")
    _, g2 = ce_fast.cross_entropy_and_grad(x, y, reduction="none", grad_output=go)
    xf = x.detach().float().requires_grad_(True)
    torch.nn.functional.cross_entropy(xf, y, reduction="none").backward(go)
    torch.testing.assert_close(
        rows, torch.nn.functional.cross_entropy(x.float(), y, reduction="none"), rtol=2e-5, atol=2e-5
    )
    torch.testing.assert_close(g2.float(), xf.grad, **tol)


@needs_torch
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("opts", [dict(), dict(label_smoothing=0.1, z_loss=1e-4), dict(reduction="sum")])
def test_autograd_half_precision(fused, dtype, inplace, opts):
    import ce_fast.torch as cet

    torch.manual_seed(1)
    x0 = torch.randn(256, 32000, device="cuda", dtype=getattr(torch, dtype)) * 2
    y = torch.randint(0, 32000, (256,), device="cuda")
    kw = {k: v for k, v in opts.items() if k != "z_loss"}
    xr = x0.float().requires_grad_(True)
    ref = torch.nn.functional.cross_entropy(xr, y, **kw)
    if "z_loss" in opts:
        ref = ref + opts["z_loss"] * torch.logsumexp(xr, -1).pow(2).mean()
    ref.backward()
    x = x0.clone().requires_grad_(True)
    h = x * 1  # a non-leaf, so inplace_backward may overwrite it
    loss = cet.cross_entropy(h, y, inplace_backward=inplace, **opts)
    loss.backward()
    torch.testing.assert_close(loss.float(), ref.detach(), rtol=1e-4, atol=1e-4)
    scale = float(xr.grad.abs().max())
    torch.testing.assert_close(x.grad.float(), xr.grad, rtol=2e-2, atol=2e-2 * scale)


@needs_torch
def test_side_stream(fused):
    torch.manual_seed(2)
    x = torch.randn(512, 32000, device="cuda")
    y = torch.randint(0, 32000, (512,), device="cuda")
    want_loss, want_grad = _torch_ref(x, y)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        x2 = x * 1.0  # produced on the side stream, consumed there without a sync
        loss, g = ce_fast.cross_entropy_and_grad(x2, y)
    torch.cuda.current_stream().wait_stream(s)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g, want_grad, rtol=1e-4, atol=1e-9)


@needs_torch
def test_cuda_graph_capture_of_a_training_step(fused):
    """A training step (linear head, ce_fast loss, backward, SGD) captured and replayed."""
    import ce_fast.torch as cet

    torch.manual_seed(3)
    lin = torch.nn.Linear(64, 4096, device="cuda")
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    h = torch.randn(256, 64, device="cuda")
    y = torch.randint(0, 4096, (256,), device="cuda")

    def step():
        opt.zero_grad(set_to_none=False)
        loss = cet.cross_entropy(lin(h), y)
        loss.backward()
        opt.step()
        return loss

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):  # warm up: compile the kernels, fill the allocator
            step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_loss = step()
    w0 = lin.weight.detach().clone()
    ref = torch.nn.functional.cross_entropy(lin(h), y)
    g.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(static_loss, ref.detach(), rtol=1e-5, atol=1e-6)
    assert not torch.equal(lin.weight, w0)  # the replay trained


@needs_torch
def test_graph_capture_turns_bad_targets_into_nan():
    """Under capture the range check is not read back: NaN instead of IndexError."""
    x = torch.randn(8, 1000, device="cuda")
    y = torch.randint(0, 1000, (8,), device="cuda")
    y[3] = 5000
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # compile the kernels outside the capture
        ce_fast.cross_entropy(x, torch.zeros_like(y), reduction="none")
        ce_fast.cross_entropy(x, torch.zeros_like(y))
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        rows = ce_fast.cross_entropy(x, y, reduction="none")
        mean = ce_fast.cross_entropy(x, y)
    g.replay()
    torch.cuda.synchronize()
    assert torch.isnan(rows[3]) and torch.isnan(mean)
    keep = torch.arange(8, device="cuda") != 3
    want = torch.nn.functional.cross_entropy(x[keep], y[keep], reduction="none")
    torch.testing.assert_close(rows[keep], want, rtol=1e-5, atol=1e-6)
    with pytest.raises(IndexError, match="target value 5000 at position \\(3,\\)"):
        ce_fast.cross_entropy(x, y)  # outside a capture: the error


@needs_torch
def test_graph_capture_with_class_weights_and_focal_alpha():
    """Weight and alpha checks read back nothing under capture (their values are checked
    outside one); the captured losses are torch's."""
    x = torch.randn(64, 3000, device="cuda")
    y = torch.randint(0, 3000, (64,), device="cuda")
    w = torch.rand(3000, device="cuda") + 0.1

    def calls():
        return (
            ce_fast.cross_entropy(x, y, weight=w, label_smoothing=0.1),
            ce_fast.focal_loss(x, y, alpha=w, gamma=2.0),
            ce_fast.kl_divergence(x, x.flip(0), temperature=2.0),
        )

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        calls()  # compile the kernels outside the capture
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        ce, focal, kl = calls()
    g.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(
        ce, torch.nn.functional.cross_entropy(x, y, weight=w, label_smoothing=0.1), rtol=1e-5, atol=1e-6
    )
    want_focal, want_kl = calls()[1:]
    torch.testing.assert_close(focal, want_focal, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(kl, want_kl, rtol=1e-6, atol=1e-7)


def test_cupy_stream_capture_needs_no_sync():
    """mean / sum come back as device arrays: the whole call captures into a CuPy graph."""
    x = cp.random.standard_normal((64, 5000), dtype=cp.float32)
    y = cp.random.randint(0, 5000, 64)
    stream = cp.cuda.Stream(non_blocking=True)

    def calls():
        mean = ce_fast.cross_entropy(x, y, label_smoothing=0.1)
        return mean, *ce_fast.cross_entropy_and_grad(x, y, reduction="sum", grad_output=2.0)

    with stream:
        calls()  # compile the kernels and fill the memory pool outside the capture
        stream.synchronize()
        stream.begin_capture()
        mean, loss, grad = calls()
        graph = stream.end_capture()
    graph.launch(stream)
    stream.synchronize()
    want_mean, _ = ref(cp.asnumpy(x).astype(np.float64), cp.asnumpy(y), label_smoothing=0.1)
    want_sum, want_grad = ref(cp.asnumpy(x).astype(np.float64), cp.asnumpy(y), reduction="sum", grad_output=2.0)
    assert isinstance(mean, cp.ndarray) and mean.shape == ()
    assert_loss(mean, want_mean, "float32")
    assert_loss(loss, want_sum, "float32")
    assert_grad(grad, want_grad, "float32")


@needs_torch
def test_torch_compile_training_step():
    import ce_fast.torch as cet

    torch.manual_seed(4)
    x = torch.randn(128, 8192, device="cuda", requires_grad=True)
    y = torch.randint(0, 8192, (128,), device="cuda")

    @torch.compile(fullgraph=True)
    def f(x, y):
        return cet.cross_entropy(x * 2.0, y, label_smoothing=0.1)

    loss = f(x, y)
    loss.backward()
    xr = x.detach().clone().requires_grad_(True)
    want = torch.nn.functional.cross_entropy(xr * 2.0, y, label_smoothing=0.1)
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-8)


@needs_torch
@pytest.mark.parametrize("view", ["misaligned", "strided-rows", "class-strided", "expanded"])
def test_in_place_on_views(fused, view):
    torch.manual_seed(5)
    C = 40001  # odd: rows start off 16-byte boundaries
    base = torch.randn(65, C + 3, device="cuda", dtype=torch.bfloat16) * 2
    y = torch.randint(0, C, (32,), device="cuda")
    if view == "expanded":
        x = base[0, :C].expand(32, C)
        with pytest.raises(ValueError, match="share one memory location"):
            ce_fast.cross_entropy_and_grad(x, y, out=x)
        return
    views = {
        "misaligned": lambda: base[:32, 1 : C + 1],
        "strided-rows": lambda: base[:64:2, 2 : C + 2],
        "class-strided": lambda: base[:32, 0 : 2 * (C // 2) : 2],
    }
    x = views[view]()
    Cx = x.shape[-1]
    want_loss, want_grad = _torch_ref(x, y % Cx)
    loss, g = ce_fast.cross_entropy_and_grad(x, y % Cx, out=x)
    assert g is x
    torch.testing.assert_close(loss, want_loss, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x.float(), want_grad, rtol=2e-2, atol=2e-2 * float(want_grad.abs().max()))


@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("tdtype", ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"])
def test_out_of_range_targets_of_every_integer_dtype(lib, tdtype):
    if lib == "torch" and tdtype in ("uint16", "uint32", "uint64"):
        pytest.skip("torch's wide unsigned dtypes have few CUDA ops; CuPy covers them")
    y_np = np.full(300, 7, dtype=tdtype)
    bad = np.iinfo(tdtype).max if tdtype.startswith("u") else -3
    y_np[257] = bad  # past the first block of the target kernel
    x = make(lib, np.zeros((300, 100)), "float32")
    y = make(lib, y_np, None)
    with pytest.raises(IndexError, match=f"target value {bad} at position \\(257,\\)"):
        ce_fast.cross_entropy(x, y)


@pytest.mark.parametrize("lib", LIBS)
def test_non_finite_rows_across_warps(lib, fused):
    """NaN / inf / all -inf in rows long enough that every warp of a block holds a part."""
    C = 70000
    a = np.random.default_rng(6).standard_normal((6, C))
    a[0, 65000] = np.nan
    a[1, 40000] = np.inf
    a[2, :] = -np.inf
    a[3, 100:60000] = -np.inf
    a[4, [10, 69999]] = np.inf
    x = make(lib, a, "float32")
    y_np = np.array([0, 1, 2, 3, 4, 5])
    want_loss, _ = ref(a, y_np, reduction="none")
    got = host64(ce_fast.cross_entropy(x, make(lib, y_np, None), reduction="none"))
    assert np.isnan(got[0]) and np.isnan(got[1]) and np.isnan(got[2]) and np.isnan(got[4])
    np.testing.assert_allclose(got[[3, 5]], want_loss[[3, 5]], rtol=1e-5)
    loss, g = ce_fast.cross_entropy_and_grad(x, make(lib, y_np, None), reduction="none")
    gh = host64(g)
    assert np.all(np.isnan(gh[0]))  # NaN anywhere in a row: NaN gradient, as torch
    np.testing.assert_allclose(host64(loss), got, rtol=1e-6, equal_nan=True)
    assert np.isfinite(gh[[3, 5]]).all()


# ---------------------------------------------------------------- syncs of the torch path


@needs_torch
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("grad", [1.0, 2.5, 0.0])
def test_inplace_backward_scaled_on_the_device(dtype, grad):
    """inplace_backward on CUDA: the incoming gradient scales the stored gradient in one
    kernel that skips the pass when it is 1. The stored gradient is the default path's at
    grad 1 bit for bit, and the scaled one is that times grad as torch's mul_ rounds it (a
    second rounding the default path, which folds grad in before rounding, does not have:
    the two agree to an ulp); a second backward still fails."""
    import ce_fast.torch as cet

    torch.manual_seed(4)
    x0 = torch.randn(64, 5000, device="cuda", dtype=getattr(torch, dtype)) * 2
    y = torch.randint(0, 5000, (64,), device="cuda")
    x1 = x0.clone().requires_grad_(True)
    cet.cross_entropy(x1 * 1, y).backward()
    xa = x0.clone().requires_grad_(True)
    (cet.cross_entropy(xa * 1, y) * grad).backward()
    x = x0.clone().requires_grad_(True)
    h = x * 1
    loss = cet.cross_entropy(h, y, inplace_backward=True)
    (loss * grad).backward(retain_graph=True)
    want = x1.grad * torch.tensor(grad, device="cuda")  # 0-d: rounded once into the dtype
    torch.testing.assert_close(x.grad, want, rtol=0, atol=0)
    if grad in (0.0, 1.0):
        tol = dict(rtol=0, atol=0)
    else:  # an ulp of the dtype; float16's subnormals round coarser
        tol = dict(rtol=2**-22, atol=0) if dtype == "float32" else dict(rtol=1e-2, atol=1e-5)
    torch.testing.assert_close(x.grad.float(), xa.grad.float(), **tol)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@needs_torch
def test_torch_backward_reuses_the_forward_check(monkeypatch):
    """The custom op's backward passes `checked` to the engine: the target flag is not
    read again (one host sync per training step, the forward's)."""
    import ce_fast.torch as cet

    calls = []
    real = _cuda.index_targets

    def spy(t, C, ignore_index, checked=False, checks=()):
        calls.append(checked)
        return real(t, C, ignore_index, checked, checks)

    monkeypatch.setattr(_cuda, "index_targets", spy)
    x = torch.randn(32, 1000, device="cuda", requires_grad=True)
    y = torch.randint(0, 1000, (32,), device="cuda")
    w = torch.rand(1000, device="cuda") + 0.1
    cet.cross_entropy(x, y, weight=w, label_smoothing=0.1).backward()
    assert calls == [False, True]
    xr = x.detach().clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(xr, y, weight=w, label_smoothing=0.1).backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("lib", LIBS)
def test_weights_checked_in_one_read_total_on_the_device(lib):
    """With weight=: one read back for both value checks, the weight total a 0-d device
    array, negative weights still a ValueError; soft targets with smoothing use it."""
    from ce_fast import _batch
    from ce_fast._spec import LossSpec

    rng = np.random.default_rng(8)
    xh = rng.standard_normal((16, 300)).astype(np.float32)
    wh = rng.uniform(0.1, 2.0, 300)
    th = rng.dirichlet(np.ones(300), 16).astype(np.float32)
    x, w, t = make(lib, xh, "float32"), make(lib, wh, "float64"), make(lib, th, "float32")
    b = _batch.make_batch(x, t, LossSpec.make(label_smoothing=0.1), w)
    assert isinstance(b.weight_total, cp.ndarray) and b.weight_total.shape == ()
    got = ce_fast.cross_entropy(x, t, weight=w, label_smoothing=0.1)
    ref = ce_fast.cross_entropy(xh, th, weight=wh, label_smoothing=0.1)
    np.testing.assert_allclose(float(got), float(ref), rtol=1e-5)
    bad = wh.copy()
    bad[7] = -0.5
    with pytest.raises(ValueError, match=r"weight must be non-negative; weight\[7\] = -0.5"):
        ce_fast.cross_entropy(x, make(lib, rng.integers(0, 300, 16), ""), weight=make(lib, bad, "float64"))
