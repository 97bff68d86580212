"""StreamingCrossEntropy and evaluate on a CUDA device (kernels/eval.cu): CuPy arrays and
CUDA torch tensors against the CPU engine on host copies. Skipped cleanly without CuPy
or a CUDA device."""

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

from ce_fast import StreamingCrossEntropy, evaluate  # noqa: E402

pytestmark = pytest.mark.gpu

torch = pytest.importorskip("torch")
needs_torch = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs torch with CUDA")


def _data(rows, C, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, C)) * 3).astype(np.float32)
    y = rng.integers(0, C, rows)
    y[::5] = -100
    return x, y


@pytest.mark.parametrize("C", [7, 1000, 50_000])
def test_cupy_float32_matches_the_cpu(C):
    x, y = _data(301, C)
    x[3, 5 % C] = np.nan
    x[4, :] = -np.inf
    ref = evaluate(x, y)
    r = evaluate(cp.asarray(x), cp.asarray(y))
    assert (r.tokens, r.correct) == (ref.tokens, ref.correct)
    assert np.isnan(r.loss) and np.isnan(ref.loss)
    x[3] = 0
    x[4] = 0
    ref, r = evaluate(x, y), evaluate(cp.asarray(x), cp.asarray(y))
    assert (r.tokens, r.correct) == (ref.tokens, ref.correct)
    assert r.loss == pytest.approx(ref.loss, rel=1e-6)


@needs_torch
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_torch_cuda_any_batch_shape(dtype):
    x, y = _data(240, 3000, seed=1)
    xt = torch.from_numpy(x).to(getattr(torch, dtype))
    host = xt.float().numpy()
    if dtype == "bfloat16":
        host_x = host.astype(ml_dtypes.bfloat16)
    else:
        host_x = host.astype(np.dtype(dtype))
    ref = evaluate(host_x.reshape(4, 60, 3000), y.reshape(4, 60))
    r = evaluate(xt.cuda().reshape(4, 60, 3000), torch.from_numpy(y).cuda().reshape(4, 60))
    assert (r.tokens, r.correct) == (ref.tokens, ref.correct)
    assert r.loss == pytest.approx(ref.loss, rel=2e-6)


@needs_torch
def test_any_split_is_bitwise_identical_on_the_device():
    x, y = _data(500, 777, seed=2)
    xt, yt = torch.from_numpy(x).cuda(), torch.from_numpy(y).cuda()
    whole = StreamingCrossEntropy().update(xt, yt)
    parts = StreamingCrossEntropy()
    for a, b in [(0, 17), (17, 300), (300, 301), (301, 500)]:
        assert parts.update(xt[a:b], yt[a:b]) is parts
    other = StreamingCrossEntropy().update(xt[:250], yt[:250]).merge(StreamingCrossEntropy().update(xt[250:], yt[250:]))
    assert parts.result() == whole.result() == other.result()
    assert parts.state_dict() == whole.state_dict()


@needs_torch
def test_out_of_range_target_on_the_device():
    x, y = _data(50, 10, seed=3)
    y[17] = 10
    acc = StreamingCrossEntropy()
    with pytest.raises(IndexError, match=r"target value 10 at position \(17,\)"):
        acc.update(torch.from_numpy(x).cuda(), torch.from_numpy(y).cuda())
    assert acc.result().tokens == 0


@needs_torch
def test_mixed_devices_are_refused():
    x, y = _data(5, 10)
    with pytest.raises(ValueError, match="logits are on cuda:0 but target is on cpu"):
        evaluate(torch.from_numpy(x).cuda(), torch.from_numpy(y))
