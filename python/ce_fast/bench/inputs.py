"""Benchmark inputs and the baselines ce_fast is measured against, on the host.

``fwd`` baselines: :func:`numpy_forward` (max / exp / sum / log in float32;
bfloat16 input is cast to float32 inside the call) and :func:`torch_forward`
(``F.cross_entropy``). ``fwd+bwd`` baselines: :func:`numpy_forward_backward` (the
forward plus ``softmax / N`` with ``1 / N`` taken off the target entries, cast back
to the input dtype) and :func:`torch_forward_backward` (``.backward()`` on a leaf).
Yardsticks: :func:`read_pass_fn` (a plain multithreaded read of the same bytes) and a
single-threaded ``np.copyto``.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from .. import _core
from .config import Shape


def np_dtype(name: str) -> np.dtype:
    """The NumPy dtype of a dtype name (``"bfloat16"``: ml_dtypes' bfloat16)."""
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def make_logits(shape: Shape, dtype: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random logits (normal, std 2) of ``shape`` and int64 targets, generated in row
    blocks so the peak memory is the result's size."""
    rng = np.random.default_rng(seed)
    C = shape[-1]
    N = int(np.prod(shape[:-1], dtype=np.int64))
    dt = np_dtype(dtype)
    z = np.empty((N, C), dtype=dt)
    step = max(1, (1 << 22) // C)
    for r in range(0, N, step):
        blk = rng.standard_normal((min(step, N - r), C), dtype=np.float64 if dt == np.float64 else np.float32)
        blk *= 2.0
        z[r : r + blk.shape[0]] = blk.astype(dt, copy=False)
    y = rng.integers(0, C, size=N, dtype=np.int64)
    return z.reshape(shape), y.reshape(shape[:-1])


def _compute_dtype(z: np.ndarray) -> type:
    return np.float64 if z.dtype == np.float64 else np.float32


def numpy_forward(z: np.ndarray, y: np.ndarray) -> float:
    """Mean cross-entropy by max / exp / sum / log, in float32 (float64 for float64)."""
    C = z.shape[-1]
    z = z.reshape(-1, C).astype(_compute_dtype(z), copy=False)
    rows = np.arange(z.shape[0])
    m = z.max(-1, keepdims=True)
    lse = m[..., 0] + np.log(np.exp(z - m).sum(-1))
    return float((lse - z[rows, y.reshape(-1)]).mean())


def numpy_forward_backward(z: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """The forward above and d(mean loss)/dz = (softmax - onehot) / N, in the input dtype."""
    shape, dt, C = z.shape, z.dtype, z.shape[-1]
    zf: np.ndarray = z.reshape(-1, C).astype(_compute_dtype(z), copy=False)
    N = zf.shape[0]
    rows = np.arange(N)
    yy = y.reshape(-1)
    m = zf.max(-1, keepdims=True)
    e = np.exp(zf - m)
    s = e.sum(-1, keepdims=True)
    lse = m[..., 0] + np.log(s[..., 0])
    loss = float((lse - zf[rows, yy]).mean())
    e /= s * N
    e[rows, yy] -= 1.0 / N
    return loss, e.astype(dt, copy=False).reshape(shape)


def as_torch(z: np.ndarray) -> Any:
    """A CPU torch tensor sharing ``z``'s memory (bfloat16 included)."""
    import torch

    if z.dtype == np_dtype("bfloat16"):
        return torch.from_numpy(z.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(z)


def torch_forward(zt: Any, yt: Any) -> Any:
    """The PyTorch forward baseline: ``F.cross_entropy(zt, yt)`` (mean)."""
    import torch.nn.functional as F

    return F.cross_entropy(zt, yt)


def torch_forward_backward(leaf: Any, yt: Any) -> Any:
    """The PyTorch forward + backward baseline: ``F.cross_entropy(leaf, yt).backward()``
    (the gradient lands in ``leaf.grad``); returns the detached loss."""
    import torch.nn.functional as F

    loss = F.cross_entropy(leaf, yt)
    loss.backward()
    return loss.detach()


def clear_grad(leaf: Any) -> None:
    """Drops ``leaf.grad`` (untimed setup between :func:`torch_forward_backward` runs)."""
    leaf.grad = None


def read_pass_fn(z: Any, threads: int = 0) -> Callable[[], int]:
    """A call that reads every byte of the C-contiguous ``z`` (a NumPy array or a CPU
    torch tensor) once with ``threads`` engine threads (0: the engine's default),
    ce_fast's read-bandwidth yardstick."""
    if not isinstance(z, np.ndarray):
        # torch: a same-width integer view, which NumPy can share for every dtype (bfloat16 too)
        ints = {1: "uint8", 2: "int16", 4: "int32", 8: "int64"}[z.element_size()]
        z = z.detach().view(getattr(sys.modules["torch"], ints)).numpy()
    return functools.partial(_core.read_pass, z, threads)
