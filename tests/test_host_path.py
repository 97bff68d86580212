"""The CUDA engine's host path, on the CPU: what one call asks of CuPy besides its kernels
(allocations: on torch tensors each is a callback into torch's caching allocator),
its launch arguments, and the logits' operand a device scope lends to the call's batch."""

from __future__ import annotations

import contextlib
import types

import numpy as np
import pytest
import torch

import ce_fast
from ce_fast import _arrays, _batch
from ce_fast._engines import cuda as _cuda

from kernel_emulator import emulated_engine

ALLOCATING = ("empty", "zeros", "ones", "full", "empty_like", "zeros_like", "ones_like", "full_like", "concatenate")


class NullKernels:
    """Launches that do nothing but count, in place of the emulator's kernels."""

    def __init__(self):
        self.launches: list = []
        self.allocations: list = []

    def function(self, *key_and_name):
        return lambda grid, block, args, **kw: self.launches.append(key_and_name[-1].split("<")[0])

    def generated(self, program):
        return lambda grid, block, args, **kw: self.launches.append("rules")


@contextlib.contextmanager
def null_engine():
    kernels = NullKernels()
    with emulated_engine(kernels):  # type: ignore[arg-type]
        fake = _cuda.xp()
        for name in ALLOCATING:
            fn = getattr(fake, name)
            setattr(fake, name, lambda *a, _fn=fn, _name=name, **k: kernels.allocations.append(_name) or _fn(*a, **k))
        yield kernels


def _inputs(rows=16, C=1000):
    rng = np.random.default_rng(3)
    return rng.standard_normal((rows, C)).astype(np.float32), rng.integers(0, C, rows)


def test_forward_allocates_four_arrays():
    """Target indices and mask (one buffer), the target check's flag, the statistics (one
    buffer) and the loss; three launches."""
    x, y = _inputs()
    with null_engine() as k:
        ce_fast.cross_entropy(x, y)
    assert k.launches == ["ce_targets", "ce_stats", "rules"]
    assert k.allocations == ["empty", "full", "empty", "empty"]


def test_fused_call_allocates_six_arrays():
    """As the forward, plus the gradient coefficients (one buffer for the three of them)
    and the gradient itself."""
    x, y = _inputs()
    with null_engine() as k:
        ce_fast.cross_entropy_and_grad(x, y, label_smoothing=0.1)
    assert k.launches == ["ce_targets", "rules", "ce_fused", "rules"]
    assert sorted(k.allocations) == ["empty"] * 5 + ["full"]


def test_rule_outputs_share_one_buffer_and_keep_their_types():
    x, y = _inputs(5, 7)
    from ce_fast import _rules
    from ce_fast._spec import LossSpec

    with null_engine():
        b = _batch.make_batch(x, y, LossSpec.make(label_smoothing=0.1), grad_output=1.0)
        coef = _cuda.apply(_rules.grad_coef, b, LossSpec.make(label_smoothing=0.1))
    arrays = [coef.a0, coef.b, coef.g]
    assert all(a.dtype == np.float64 and a.shape == (5,) and a.flags.c_contiguous for a in arrays)
    assert len({a.__array_interface__["data"][0] for a in arrays}) == 3
    assert all(np.shares_memory(arrays[0].base, a) for a in arrays)


def test_statistics_are_rows_of_one_array():
    x, y = _inputs(6, 9)
    from ce_fast._spec import LossSpec

    with null_engine():
        b = _batch.make_batch(x, y, LossSpec.make(label_smoothing=0.1))
        s = _cuda.run(b, scale=1.0, softcap=0.0, want_wz=True)
    rows = [s.mx, s.ls, s.zy, s.swz]
    assert s.swt is None and s.swtz is None
    assert all(r.shape == (6,) and r.dtype == np.float64 and r.flags.c_contiguous for r in rows)
    assert len({r.__array_interface__["data"][0] for r in rows}) == 4


def test_kernel_args_are_typed_and_name_bad_arguments():
    args = _cuda.kernel_args("ce_scale", g=None, n=5, s=16)
    assert [type(a) for a in args] == [np.uint64, np.int64, np.uint64] and [int(a) for a in args] == [0, 5, 16]
    args = _cuda.kernel_args("ce_scale", g=np.uint64(8), n=np.int32(3), s=0)
    assert [int(a) for a in args] == [8, 3, 0]
    with pytest.raises(TypeError, match=r"ce_scale: missing arguments \['s'\], unknown \['x'\]"):
        _cuda.kernel_args("ce_scale", g=0, n=1, x=2)
    with pytest.raises(TypeError, match=r"ce_scale: missing arguments \[\], unknown \['t'\]"):
        _cuda.kernel_args("ce_scale", g=0, n=1, s=2, t=3)
    # A list of parameters (not a kernel's fixed tuple) is typed the same, and not cached.
    params = [("a", "d"), ("b", "i"), ("c", "f")]
    args = _cuda.typed_args("k", params, {"a": 1, "b": 2.7, "c": 0.5})
    assert [type(a) for a in args] == [np.float64, np.int32, np.float32] and [float(a) for a in args] == [1, 2, 0.5]


def test_device_scope_lends_the_logits_operand(monkeypatch):
    """The operand the scope builds is the one the batch uses (built once per call); other
    arrays, and calls outside the scope, build their own; nested scopes restore the outer."""
    entered = []
    fake_engine = types.SimpleNamespace(scope=lambda x: contextlib.nullcontext(entered.append(x)))
    monkeypatch.setattr(_arrays, "device_of", lambda obj: "cuda:0")
    monkeypatch.setattr(_batch, "engine_for", lambda op: fake_engine)
    a, b = torch.zeros(2, 3), torch.zeros(4, 5)
    with _batch.device_scope(a):
        xa = _batch.logits_operand(a)
        assert xa is entered[0]
        with _batch.device_scope(b):
            assert _batch.logits_operand(b) is entered[1]
            assert _batch.logits_operand(a) is not xa  # not the innermost scope's logits
        assert _batch.logits_operand(a) is xa
        assert _batch.logits_operand(b) is not entered[1]
    assert _batch.logits_operand(a) is not xa
    with pytest.raises(RuntimeError, match="inside"):
        with _batch.device_scope(a):
            raise RuntimeError("inside")
    assert _batch.logits_operand(a) is not entered[-1]  # restored after an exception too


def test_eager_torch_calls_skip_the_custom_ops_with_the_same_numbers():
    """Eager calls run the custom ops' implementations in one autograd.Function; under a
    dispatch mode (as under tracing) the ops themselves run: same loss, same gradients."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import ce_fast.torch as cet

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    rng = np.random.default_rng(5)
    x = torch.tensor(rng.standard_normal((6, 11)), requires_grad=True)
    p = torch.tensor(rng.dirichlet(np.ones(11), 6), requires_grad=True)  # soft targets: both grads
    loss = cet.cross_entropy(x, p, label_smoothing=0.1, z_loss=1e-3)
    assert type(loss.grad_fn).__name__ == "_EagerCrossEntropyBackward"
    loss.backward()
    gx, gp = x.grad.clone(), p.grad.clone()
    x.grad = p.grad = None
    mode = Seen()
    with mode:
        loss2 = cet.cross_entropy(x, p, label_smoothing=0.1, z_loss=1e-3)
    assert "ce_fast.cross_entropy.default" in mode.ops
    loss2.backward()
    assert torch.equal(loss, loss2) and torch.equal(x.grad, gx) and torch.equal(p.grad, gp)
    with torch.no_grad():
        assert torch.equal(cet.cross_entropy(x, p, label_smoothing=0.1, z_loss=1e-3), loss)


def test_saved_lse_is_a_view_of_the_statistics():
    """The torch forward saves (max, log-sum) as one view of the CUDA engine's statistics
    (no stack, no kernel) where they are its first two rows; otherwise it stacks them."""
    import ce_fast.torch as cet
    from ce_fast._spec import LossSpec
    from ce_fast._types import Stats

    x, y = _inputs(6, 9)
    with null_engine():
        b = _batch.make_batch(x, y, LossSpec.make())
        s = _cuda.run(b, scale=1.0, softcap=0.0, want_wz=False)
    s.mx[:], s.ls[:] = np.arange(6.0), -np.arange(6.0)
    lse = cet._lse_view(s, torch.zeros(1))
    assert lse is not None and lse.dtype == torch.float64
    assert torch.equal(lse, torch.tensor(np.stack([s.mx, s.ls])))
    assert lse.data_ptr() == s.mx.__array_interface__["data"][0]  # the statistics' own memory
    assert cet._lse_view(Stats(mx=s.ls, ls=s.mx), torch.zeros(1)) is None  # rows swapped
    assert cet._lse_view(Stats(mx=s.mx.copy(), ls=s.ls.copy()), torch.zeros(1)) is None
