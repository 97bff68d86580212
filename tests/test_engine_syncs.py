"""What the batch layer and the torch backward read back on the host: on a GPU each
read is a device sync, so they are counted here on host arrays that count them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ce_fast.torch as cet
from ce_fast import _batch, _rules
from ce_fast._engines import cpu as _cpu


class Counted(np.ndarray):
    """A NumPy array that counts every read of a value onto the host, as CuPy syncs for."""

    reads = 0

    def _read(self, kind):
        Counted.reads += 1
        return getattr(np.asarray(self), kind)

    def tolist(self):
        return self._read("tolist")()

    def item(self, *a):
        return self._read("item")(*a)

    def __bool__(self):
        return bool(self._read("__bool__")())

    def __int__(self):
        return int(self._read("__int__")())

    def __float__(self):
        return float(self._read("__float__")())

    def __index__(self):
        return int(self._read("__int__")())


class CountingXp:
    """NumPy whose results are Counted arrays (as CuPy's stay on the device)."""

    def __getattr__(self, name):
        f = getattr(np, name)
        if not callable(f) or isinstance(f, type):
            return f

        def wrapped(*args, **kwargs):
            r = f(*args, **kwargs)
            return np.asarray(r).view(Counted) if isinstance(r, (np.ndarray, np.generic)) else r

        return wrapped


def _check(w):
    Counted.reads = 0
    wa = np.asarray(w, dtype=np.float64).view(Counted)
    _batch._weight_errors(_rules.summarize_weights(CountingXp(), wa, len(w)).tolist(), wa, "weight")
    return Counted.reads


def test_weight_checks_read_back_once():
    assert _check([0.5, 1.0, 0.0, 2.0]) == 1


@pytest.mark.parametrize(
    "w, message",
    [
        ([1.0, np.nan, -1.0], "weight must be finite"),
        ([1.0, -np.inf], "weight must be finite"),
        ([1.0, 2.0, -0.5, -3.0], r"weight must be non-negative; weight\[2\] = -0.5"),
    ],
)
def test_weight_check_errors(w, message):
    with pytest.raises(ValueError, match=message):
        _check(w)


@pytest.mark.parametrize("opts", [dict(label_smoothing=0.1), dict(weight=True)])
def test_torch_backward_reuses_the_forward_check(monkeypatch, opts):
    """The custom op's backward does not check target or weight values again (on CUDA:
    no second host sync per step); the gradient is still torch's."""
    calls = []
    real = _cpu.index_targets

    def spy(t, C, ignore_index, checked=False, checks=()):
        calls.append(checked)
        return real(t, C, ignore_index, checked, checks)

    weight_checks = []
    real_errors = _batch._weight_errors
    monkeypatch.setattr(_cpu, "index_targets", spy)
    monkeypatch.setattr(_batch, "_weight_errors", lambda *a, **k: (weight_checks.append(1), real_errors(*a, **k)))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 11, generator=g, requires_grad=True)
    y = torch.tensor([1, 0, -100, 10, 3])
    kw = dict(opts)
    if kw.pop("weight", False):
        kw["weight"] = torch.rand(11, generator=g) + 0.1
    loss = cet.cross_entropy(x, y, **kw)
    assert calls == [False]
    loss.backward()
    assert calls == [False, True]
    assert len(weight_checks) == (1 if "weight" in kw else 0)
    xr = x.detach().clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(xr, y, **kw).backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-7)
