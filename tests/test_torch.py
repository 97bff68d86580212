"""ce_fast.torch: the autograd-aware cross_entropy / CrossEntropyLoss (class axis last),
against torch autograd of F.cross_entropy in float64 (reference in test_grad.py), gradcheck,
low-precision gradients, the in-place path, the custom ops and torch.compile."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_grad import (
    OPTION_SETS,
    REDUCTIONS,
    assert_grad_close,
    make_case,
    peaked_logits,
    torch_ref_grad,
    torch_ref_loss,
    ulp_distance,
    with_torch_weight,
)

import ce_fast.torch as ct

PATHS = ("saved_lse", "inplace")


def torch_case(seed, batch, C, spec, dtype=torch.float64):
    """(x leaf tensor of `dtype`, target tensor, options with a torch weight)."""
    rng = np.random.default_rng(seed)
    x, t, opts = make_case(rng, batch, C, spec)
    x = torch.from_numpy(x).to(dtype)
    t = torch.from_numpy(t)
    return x, t, with_torch_weight(opts)


def upstream(reduction, batch, seed=0):
    if reduction == "none":
        g = torch.Generator().manual_seed(seed)
        return torch.rand(batch, generator=g, dtype=torch.float64) * 3 - 1
    return torch.tensor(0.7, dtype=torch.float64)


def run_ce(x, t, path, reduction, go, **opts):
    """Forward + backward through ce_fast.torch; returns (loss, x.grad). The in-place path
    gets a copy of the leaf (the buffer it overwrites is the copy's)."""
    leaf = x.detach().clone().requires_grad_(True)
    inp = leaf.clone() if path == "inplace" else leaf
    loss = ct.cross_entropy(inp, t, reduction=reduction, inplace_backward=(path == "inplace"), **opts)
    loss.backward(go.to(loss.dtype))
    return loss.detach(), leaf.grad


# ---------------------------------------------------------------- float64 vs torch autograd


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", list(OPTION_SETS))
def test_matches_torch_autograd_float64(name, reduction, path):
    batch = (2, 3, 2)
    x, t, opts = torch_case(hash((name, reduction)) % 2**32, batch, 9, OPTION_SETS[name])
    go = upstream(reduction, batch)
    loss, grad = run_ce(x, t, path, reduction, go, **opts)
    ref_loss, ref_grad = torch_ref_grad(x, t, go, reduction=reduction, **opts)
    assert loss.dtype == torch.float64 and grad.dtype == torch.float64
    assert loss.shape == (batch if reduction == "none" else ())
    torch.testing.assert_close(loss, ref_loss, rtol=1e-11, atol=1e-12)
    assert_grad_close(grad, ref_grad, rtol=1e-9, atol_rel=1e-12)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_plain_nc_input_equals_f_cross_entropy(reduction):
    """(N, C) input: no axis move; identical call signature to F.cross_entropy."""
    x, t, _ = torch_case(1, (17,), 6, OPTION_SETS["ignore"])
    w = torch.rand(6, dtype=torch.float64) + 0.1
    a = x.clone().requires_grad_()
    b = x.clone().requires_grad_()
    la = ct.cross_entropy(a, t, w, -100, reduction, 0.1)
    lb = F.cross_entropy(b, t, w, ignore_index=-100, reduction=reduction, label_smoothing=0.1)
    torch.testing.assert_close(la, lb, rtol=1e-12, atol=1e-13)
    la.sum().backward()
    lb.sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-13)


def test_kdim_input_equals_f_cross_entropy_with_class_axis_moved():
    x, t, _ = torch_case(2, (2, 3, 4), 5, OPTION_SETS["ignore"])
    a = x.clone().requires_grad_()
    b = x.clone().requires_grad_()
    la = ct.cross_entropy(a, t, label_smoothing=0.2)
    lb = F.cross_entropy(b.movedim(-1, 1), t, label_smoothing=0.2)
    torch.testing.assert_close(la, lb, rtol=1e-12, atol=1e-13)
    la.backward()
    lb.backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", ["soft", "soft_weight_smoothing", "soft_everything"])
def test_soft_target_gradient(name, reduction):
    """A soft target that requires grad gets d loss / d target (as in PyTorch)."""
    batch = (3, 2)
    x, t, opts = torch_case(5, batch, 7, OPTION_SETS[name])
    go = upstream(reduction, batch)
    xa, ta = x.clone().requires_grad_(), t.clone().requires_grad_()
    (go * ct.cross_entropy(xa, ta, reduction=reduction, **opts)).sum().backward()
    xb, tb = x.clone().requires_grad_(), t.clone().requires_grad_()
    (go * torch_ref_loss(xb, tb, reduction=reduction, **opts)).sum().backward()
    assert_grad_close(xa.grad, xb.grad, rtol=1e-9, atol_rel=1e-12)
    assert_grad_close(ta.grad, tb.grad, rtol=1e-9, atol_rel=1e-12)


def test_inplace_refuses_soft_target_needing_grad():
    x, t, _ = torch_case(5, (3,), 4, OPTION_SETS["soft"])
    with pytest.raises(ValueError, match="inplace_backward"):
        ct.cross_entropy(x.requires_grad_(), t.requires_grad_(), inplace_backward=True)


# ---------------------------------------------------------------- gradcheck


GRADCHECK_OPTS = ["plain", "weight_smoothing_ignore", "softcap_scale_z", "everything", "soft_everything"]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", GRADCHECK_OPTS)
def test_gradcheck(name, reduction):
    """Finite differences against the backward (default path; the in-place path's backward
    is one-shot by design, gradcheck runs each backward twice; it is compared with the
    reference above instead)."""
    x, t, opts = torch_case(6, (2, 3), 5, OPTION_SETS[name])
    x.requires_grad_(True)
    if t.is_floating_point():
        t.requires_grad_(True)
        assert torch.autograd.gradcheck(lambda x, t: ct.cross_entropy(x, t, reduction=reduction, **opts), (x, t))
    else:
        assert torch.autograd.gradcheck(lambda x: ct.cross_entropy(x, t, reduction=reduction, **opts), (x,))


# ---------------------------------------------------------------- dtypes, low precision


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_low_precision_gradients_within_one_ulp(dtype, reduction, path):
    """Gradients are the float64 reference rounded to the logits' dtype (<= 1 ulp),
    including rows with p_y = 0.999; the loss is float32."""
    rng = np.random.default_rng(13)
    xn, tn = peaked_logits(rng, 10, 40, np.float32)
    x = torch.from_numpy(xn).to(dtype)
    t = torch.from_numpy(tn)
    t[3] = -100
    w = torch.rand(40, dtype=torch.float64) + 0.5
    opts = dict(weight=w, label_smoothing=0.05, z_loss=1e-3)
    go = torch.ones(10, dtype=torch.float64) if reduction == "none" else torch.tensor(1.0, dtype=torch.float64)
    loss, grad = run_ce(x, t, path, reduction, go, **opts)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    ref_loss, ref = torch_ref_grad(x.double(), t, go, reduction=reduction, **opts)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=2e-6, atol=2e-6)
    d = ulp_distance(grad, ref.to(dtype))
    assert int(d.max()) <= 1, f"{int(d.max())} ulp"
    assert not grad[3].any()  # ignored row


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_dtypes(dtype, path):
    x, t, opts = torch_case(14, (4, 5), 33, OPTION_SETS["everything"])
    x = x.to(dtype)
    loss, grad = run_ce(x, t, path, "mean", torch.tensor(1.0), **opts)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert grad.dtype == dtype
    ref_loss, ref = torch_ref_grad(x.double(), t, reduction="mean", **opts)
    tol = {torch.float64: 1e-10, torch.float32: 1e-5}.get(dtype, 1e-2)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=tol, atol=tol)
    torch.testing.assert_close(grad.double(), ref, rtol=tol, atol=tol * float(ref.abs().max()))


# ---------------------------------------------------------------- layouts and shapes


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("layout", ["contig", "transposed", "sliced"])
def test_non_contiguous_input(layout, path):
    """Views with other layouts are read (and, in place, written) where they are."""
    x, t, opts = torch_case(15, (6,), 11, OPTION_SETS["everything"], dtype=torch.float32)
    ref_loss, ref = torch_ref_grad(x.double(), t, 1.0, reduction="sum", **opts)
    if layout == "contig":
        base, view = x.clone(), lambda b: b
    elif layout == "transposed":  # class axis first in memory
        base, view = x.t().contiguous(), lambda b: b.t()
    else:
        base = torch.zeros(12, 33)
        base[::2, ::3] = x
        view = lambda b: b[::2, ::3]  # noqa: E731
    base.requires_grad_(True)
    # the in-place path needs a buffer of its own: a view of an intermediate
    inp = view(base * 1.0) if path == "inplace" else view(base)
    assert inp.is_contiguous() == (layout == "contig")
    ptr, strides = inp.data_ptr(), inp.stride()
    loss = ct.cross_entropy(inp, t, reduction="sum", inplace_backward=(path == "inplace"), **opts)
    loss.backward()
    assert inp.data_ptr() == ptr and inp.stride() == strides
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(view(base.grad).double(), ref, rtol=1e-4, atol=1e-6)
    if layout == "sliced":
        mask = torch.ones_like(base.grad, dtype=torch.bool)
        mask[::2, ::3] = False
        assert not base.grad[mask].any()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("batch", [(), (1,), (7,), (2, 3), (2, 1, 3), (0,), (3, 0)])
def test_leading_dims(batch, path):
    x, t, opts = torch_case(16, batch, 5, OPTION_SETS["z_loss"] if batch != () else {})
    for reduction in REDUCTIONS:
        go = upstream(reduction, batch)
        loss, grad = run_ce(x, t, path, reduction, go, **opts)
        assert grad.shape == x.shape
        assert loss.shape == (batch if reduction == "none" else ())
        if x.shape[:-1].numel() == 0:
            if reduction == "mean":
                assert torch.isnan(loss)
            elif reduction == "sum":
                assert loss == 0
            continue
        ref_loss, ref = torch_ref_grad(x, t, go, reduction=reduction, **opts)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-11, atol=1e-12, equal_nan=True)  # (1,): all ignored
        assert_grad_close(grad, ref, rtol=1e-9, atol_rel=1e-12)


# ---------------------------------------------------------------- the in-place path


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_inplace_writes_gradient_into_logits_buffer(reduction):
    x, t, opts = torch_case(17, (5, 4), 12, OPTION_SETS["everything"])
    go = upstream(reduction, (5, 4))
    leaf = x.clone().requires_grad_()
    logits = leaf * 1.0  # an intermediate, as lm_head's output would be
    ptr = logits.data_ptr()
    loss = ct.cross_entropy(logits, t, reduction=reduction, inplace_backward=True, **opts)
    assert logits.data_ptr() == ptr
    assert not torch.equal(logits.detach(), x)  # the buffer now holds the gradient
    (g,) = torch.autograd.grad(loss, logits, go)
    assert g.data_ptr() == ptr  # the gradient handed back is that same buffer
    _, ref = torch_ref_grad(x, t, go, reduction=reduction, **opts)
    assert_grad_close(g, ref, rtol=1e-9, atol_rel=1e-12)


def test_inplace_errors_when_logits_are_saved_elsewhere():
    """The version counter is bumped: a node that saved the logits refuses to backward."""
    x, t, _ = torch_case(18, (4,), 6, {})
    leaf = x.clone().requires_grad_()
    logits = leaf.exp()  # exp saves its output
    loss = ct.cross_entropy(logits, t, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_inplace_backward_twice_raises():
    x, t, _ = torch_case(18, (4,), 6, {})
    logits = x.clone().requires_grad_() * 1.0
    loss = ct.cross_entropy(logits, t, inplace_backward=True)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_inplace_leaves_input_alone_without_grad():
    x, t, _ = torch_case(19, (4, 3), 6, OPTION_SETS["ignore"])
    ref = ct.cross_entropy(x, t)
    a = x.clone()
    assert torch.equal(ct.cross_entropy(a, t, inplace_backward=True), ref)  # requires_grad False
    assert torch.equal(a, x)
    b = x.clone().requires_grad_()
    with torch.no_grad():
        assert torch.equal(ct.cross_entropy(b, t, inplace_backward=True), ref)
    assert torch.equal(b.detach(), x)


def test_default_path_never_modifies_inputs():
    x, t, opts = torch_case(20, (3, 4), 8, OPTION_SETS["soft_everything"])
    xs, ts, ws = x.clone(), t.clone(), opts["weight"].clone()
    a = x.clone().requires_grad_()
    ct.cross_entropy(a, t, **opts).backward()
    assert torch.equal(a.detach(), xs) and torch.equal(t, ts) and torch.equal(opts["weight"], ws)


# ---------------------------------------------------------------- module


def test_module_matches_torch_module():
    x, t, _ = torch_case(21, (12,), 7, OPTION_SETS["ignore"])
    t[t == -100] = 3  # ignored by the third option set, counted by the others
    w = torch.rand(7, dtype=torch.float64) + 0.1
    for kw in (
        dict(),
        dict(weight=w),
        dict(weight=w, ignore_index=3, label_smoothing=0.3, reduction="sum"),
        dict(reduction="none"),
    ):
        ours, theirs = ct.CrossEntropyLoss(**kw), torch.nn.CrossEntropyLoss(**kw)
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        la, lb = ours(a, t), theirs(b, t)
        torch.testing.assert_close(la, lb, rtol=1e-12, atol=1e-13)
        la.sum().backward()
        lb.sum().backward()
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-13)


def test_module_attributes_buffer_and_legacy_args():
    w = torch.rand(5)
    m = ct.CrossEntropyLoss(
        w, ignore_index=2, label_smoothing=0.1, z_loss=1e-4, softcap=30.0, logit_scale=0.5, inplace_backward=True
    )
    assert isinstance(m, torch.nn.Module)
    assert m.ignore_index == 2 and m.reduction == "mean" and m.label_smoothing == 0.1
    assert m.z_loss == 1e-4 and m.softcap == 30.0 and m.logit_scale == 0.5 and m.inplace_backward
    assert torch.equal(m.state_dict()["weight"], w)
    assert m.double().weight.dtype == torch.float64  # a buffer follows the module
    assert "softcap=30.0" in repr(m) and "inplace_backward=True" in repr(m)
    with pytest.warns(UserWarning, match="deprecated"):
        assert ct.CrossEntropyLoss(size_average=False).reduction == "sum"
    with pytest.warns(UserWarning, match="deprecated"):
        assert ct.CrossEntropyLoss(reduce=False).reduction == "none"
    assert ct.CrossEntropyLoss().weight is None
    x, t, _ = torch_case(22, (3, 2), 5, {})
    leaf = x.clone().requires_grad_()
    m(leaf * 1.0, t).backward()
    ref = torch_ref_grad(
        x, t, weight=w.double(), ignore_index=2, label_smoothing=0.1, z_loss=1e-4, softcap=30.0, logit_scale=0.5
    )[1]
    assert_grad_close(leaf.grad, ref, rtol=1e-9, atol_rel=1e-12)


@pytest.mark.parametrize(
    "kw, exc",
    [
        (dict(reduction="avg"), ValueError),
        (dict(label_smoothing=1.5), ValueError),
        (dict(z_loss=-1.0), ValueError),
        (dict(softcap=0.0), ValueError),
        (dict(ignore_index=1.5), TypeError),
    ],
)
def test_bad_options(kw, exc):
    with pytest.raises(exc):
        ct.CrossEntropyLoss(**kw)
    x, t, _ = torch_case(23, (3,), 4, {})
    with pytest.raises(exc):
        ct.cross_entropy(x, t, **kw)


def test_bad_inputs():
    x, t, _ = torch_case(24, (3,), 4, {})
    with pytest.raises(TypeError):
        ct.cross_entropy(x.numpy(), t)
    with pytest.raises(TypeError):
        ct.cross_entropy(x, t, weight=[1.0, 1.0, 1.0, 1.0])
    with pytest.raises(IndexError, match="out of range"):
        ct.cross_entropy(x.clone().requires_grad_(), torch.tensor([0, 4, 1]))
    logits = x.clone().requires_grad_() * 1.0
    with pytest.raises(IndexError, match="out of range"):  # checked before anything is written
        ct.cross_entropy(logits, torch.tensor([0, 4, 1]), inplace_backward=True)
    assert torch.equal(logits.detach(), x)
    with pytest.raises(ValueError):
        ct.cross_entropy(x, t[:2])
    with pytest.raises(ValueError):
        ct.cross_entropy(x, t, weight=torch.ones(3))
    with pytest.raises(ValueError, match="ignore_index"):
        ct.cross_entropy(x, torch.softmax(x, -1), ignore_index=0)
    with pytest.raises(TypeError):
        ct.cross_entropy(x.to(torch.int32), t)


def test_target_dtypes():
    x, t, _ = torch_case(25, (6,), 9, {})
    ref = ct.cross_entropy(x, t)
    ref_grad = torch_ref_grad(x, t)[1]
    for dt in (torch.int32, torch.int16, torch.uint8, torch.int64):
        a = x.clone().requires_grad_()
        loss = ct.cross_entropy(a, t.to(dt))
        torch.testing.assert_close(loss, ref, rtol=0, atol=0)
        loss.backward()
        assert_grad_close(a.grad, ref_grad, rtol=1e-9, atol_rel=1e-12)


def test_bad_options_under_torch_compile():
    """Compiled, the options are checked when the op runs: the same clear errors."""
    x, t, _ = torch_case(23, (3,), 4, {})
    for kw in (dict(reduction="avg"), dict(label_smoothing=2.0)):
        torch._dynamo.reset()
        fn = torch.compile(lambda x, t: ct.cross_entropy(x, t, **kw), fullgraph=True, backend="aot_eager")
        with pytest.raises(ValueError):
            fn(x.clone().requires_grad_(), t)


# ---------------------------------------------------------------- custom ops and torch.compile


def _op_samples():
    x, t, opts = torch_case(26, (2, 3), 5, OPTION_SETS["everything"])
    w = opts["weight"]
    ts, _, _ = torch_case(27, (2, 3), 5, {})
    soft = torch.softmax(torch.randn(2, 3, 5, dtype=torch.float64), -1)
    for red in REDUCTIONS:
        yield (x.clone().requires_grad_(), t, w, -100, red, 0.1, 0.01, 3.0, 1.5)
        yield (x.clone().requires_grad_(), soft, None, -100, red, 0.0, 0.0, None, 1.0)


def test_opcheck_custom_ops():
    for args in _op_samples():
        torch.library.opcheck(torch.ops.ce_fast.cross_entropy.default, args)
        x = args[0].detach().clone()
        torch.library.opcheck(torch.ops.ce_fast.cross_entropy_inplace.default, (x,) + args[1:])
        loss, lse, swt = torch.ops.ce_fast.cross_entropy(*args)
        grad = torch.rand(loss.shape, dtype=loss.dtype)
        torch.library.opcheck(
            torch.ops.ce_fast.cross_entropy_backward.default,
            (grad, args[0].detach(), args[1], args[2], lse.detach(), swt.detach()) + args[3:],
        )


class TinyLM(torch.nn.Module):
    def __init__(self, vocab=23, dim=16):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 32), torch.nn.GELU(), torch.nn.Linear(32, vocab))

    def forward(self, ids):
        return self.mlp(self.emb(ids))  # (B, T, V): class axis last


def _grads(model):
    return [p.grad.detach().clone() for p in model.parameters()]


def _compile_case(loss_fn, backend, ids, tgt):
    torch.manual_seed(0)
    model = TinyLM()
    out = []
    for compiled in (False, True):
        model.zero_grad()
        fn = torch.compile(loss_fn, fullgraph=True, backend=backend) if compiled else loss_fn
        loss = fn(model, ids, tgt)
        loss.backward()
        out.append((loss.detach(), _grads(model)))
    (l0, g0), (l1, g1) = out
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=1e-6)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    return l0, g0


@pytest.fixture
def lm_batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 23, (3, 8), generator=g)
    tgt = torch.randint(0, 23, (3, 8), generator=g)
    tgt[0, :3] = -100
    return ids, tgt


@pytest.mark.parametrize("inplace", [False, True], ids=["saved_lse", "inplace"])
def test_torch_compile_fullgraph_inductor(lm_batch, inplace):
    """torch.compile(fullgraph=True) with Inductor: no graph break, same loss and grads as
    eager, which equal F.cross_entropy's."""
    ids, tgt = lm_batch
    w = torch.rand(23) + 0.5

    def loss_fn(model, ids, tgt):
        return ct.cross_entropy(
            model(ids), tgt, w, label_smoothing=0.1, z_loss=1e-3, softcap=15.0, inplace_backward=inplace
        )

    torch._dynamo.reset()
    l0, g0 = _compile_case(loss_fn, "inductor", ids, tgt)

    torch.manual_seed(0)
    model = TinyLM()
    ref = torch_ref_loss(model(ids).double(), tgt, weight=w.double(), label_smoothing=0.1, z_loss=1e-3, softcap=15.0)
    ref.backward()
    torch.testing.assert_close(l0.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    for a, p in zip(g0, model.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("case", ["none", "soft_target", "module", "dynamic"])
def test_torch_compile_fullgraph_variants(lm_batch, case):
    """Other options through the op schema (Tensor? weight, soft target, none), traced by
    Dynamo + AOTAutograd with fullgraph=True (aot_eager backend: fast)."""
    ids, tgt = lm_batch
    if case == "none":

        def loss_fn(model, ids, tgt):
            per_tok = ct.cross_entropy(model(ids), tgt, reduction="none", logit_scale=0.7)
            return (per_tok * torch.linspace(0.5, 1.5, per_tok.shape[-1])).sum()
    elif case == "soft_target":
        soft = torch.softmax(torch.randn(3, 8, 23, generator=torch.Generator().manual_seed(2)), -1)

        def loss_fn(model, ids, tgt):
            return ct.cross_entropy(model(ids), soft, label_smoothing=0.05, z_loss=1e-2)
    elif case == "module":
        crit = ct.CrossEntropyLoss(torch.rand(23) + 0.5, ignore_index=-100, reduction="sum", inplace_backward=True)

        def loss_fn(model, ids, tgt):
            return crit(model(ids), tgt)
    else:

        def loss_fn(model, ids, tgt):
            return ct.cross_entropy(model(ids), tgt)

    torch._dynamo.reset()
    _compile_case(loss_fn, "aot_eager", ids, tgt)
    if case == "dynamic":  # other shapes, symbolic: still one graph, same numbers
        torch.manual_seed(0)
        model = TinyLM()
        fn = torch.compile(loss_fn, fullgraph=True, backend="aot_eager", dynamic=True)
        for T in (5, 11):
            ids2, tgt2 = torch.randint(0, 23, (2, T)), torch.randint(0, 23, (2, T))
            torch.testing.assert_close(fn(model, ids2, tgt2), loss_fn(model, ids2, tgt2))


# ---------------------------------------------------------------- CUDA (when there is one)


@pytest.mark.gpu
def test_cuda_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    pytest.importorskip("cupy")
    x, t, opts = torch_case(28, (4, 6), 50, OPTION_SETS["everything"], dtype=torch.float32)
    for path in PATHS:
        lc, gc = run_ce(x, t, path, "mean", torch.tensor(1.0), **opts)
        opts_cuda = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in opts.items()}
        lg, gg = run_ce(x.cuda(), t.cuda(), path, "mean", torch.tensor(1.0, device="cuda"), **opts_cuda)
        assert lg.device.type == "cuda" and gg.device.type == "cuda"
        torch.testing.assert_close(lg.cpu(), lc, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gg.cpu(), gc, rtol=1e-4, atol=1e-6)
