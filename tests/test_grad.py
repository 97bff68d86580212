"""Gradients of ``ce_fast.cross_entropy_and_grad`` against torch autograd of
``F.cross_entropy`` in float64, for every option and reduction.

The reference (``torch_ref_loss``, also used by test_torch.py) moves nothing: it
flattens the class-last logits to ``(rows, C)``, applies ``logit_scale`` and
``softcap`` with torch ops (so autograd takes the chain rule through tanh), calls
``F.cross_entropy`` for the PyTorch semantics (weights, ignore_index, label smoothing,
soft targets, PyTorch's own weighted mean) and adds ``z_loss * lse**2`` per counted row,
divided for the mean by the mean's denominator (sum of the target weights of counted
rows, or the row count for soft targets).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ce_fast
from ce_fast import _api
from ce_fast._spec import LossSpec

REDUCTIONS = ("mean", "sum", "none")
BF16 = np.dtype(ml_dtypes.bfloat16)

# ---------------------------------------------------------------- the torch reference


def torch_ref_loss(
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
):
    """float64 torch reference of ce_fast's loss (class axis last), differentiable in x
    (and in a soft target)."""
    C = x.shape[-1]
    z = x * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z2 = z.reshape(-1, C)
    soft = target.is_floating_point()
    t2 = target.reshape(-1, C) if soft else target.reshape(-1)
    kw = dict(weight=weight, label_smoothing=label_smoothing)
    if not soft:
        kw["ignore_index"] = ignore_index
    if soft:
        valid = torch.ones(z2.shape[0], dtype=torch.bool)
        den = float(z2.shape[0])
    else:
        valid = t2 != ignore_index
        den = float(weight[t2[valid]].sum()) if weight is not None else float(valid.sum())
    zterm = torch.where(valid, z_loss * torch.logsumexp(z2, -1) ** 2, torch.zeros((), dtype=z2.dtype))
    if reduction == "none":
        return (F.cross_entropy(z2, t2, reduction="none", **kw) + zterm).reshape(x.shape[:-1])
    ce = F.cross_entropy(z2, t2, reduction=reduction, **kw)
    if reduction == "sum":
        return ce + zterm.sum()
    return ce + zterm.sum() / den


def torch_ref_grad(x64, target, grad_output=1.0, **opts):
    """(loss, d(grad_output * loss)/dx) in float64 by torch autograd."""
    x = x64.detach().clone().requires_grad_(True)
    loss = torch_ref_loss(x, target, **opts)
    go = torch.as_tensor(grad_output, dtype=torch.float64)
    (g,) = torch.autograd.grad((loss * go).sum(), x)
    return loss.detach(), g


def t64(a) -> torch.Tensor:
    """float64 torch copy of a NumPy (incl. ml_dtypes bfloat16) or torch array."""
    if isinstance(a, torch.Tensor):
        return a.detach().to(torch.float64).clone()
    return torch.from_numpy(np.asarray(a).astype(np.float64))


def tint(a) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a.detach().long()
    return torch.from_numpy(np.asarray(a).astype(np.int64))


# ---------------------------------------------------------------- option sets

OPTION_SETS = {
    "plain": dict(),
    "weight": dict(weight=True),
    "ignore": dict(ignore=True),
    "ignore_index_7": dict(ignore=True, ignore_index=7),
    "smoothing": dict(label_smoothing=0.2),
    "smoothing_1": dict(label_smoothing=1.0),
    "weight_smoothing_ignore": dict(weight=True, ignore=True, label_smoothing=0.15),
    "z_loss": dict(z_loss=0.01, ignore=True),
    "softcap": dict(softcap=2.0),
    "logit_scale": dict(logit_scale=1.7),
    "negative_scale": dict(logit_scale=-0.6),
    "softcap_scale_z": dict(softcap=1.5, logit_scale=2.5, z_loss=0.1),
    "everything": dict(weight=True, ignore=True, label_smoothing=0.1, z_loss=0.05, softcap=3.0, logit_scale=0.8),
    # softcap well inside tanh's linear-ish range (|scale * x / cap| <~ 2.5 here)
    "moderate_softcap_scale_z": dict(softcap=8.0, logit_scale=1.5, z_loss=0.1),
    "soft": dict(soft=True),
    "soft_weight_smoothing": dict(soft=True, weight=True, label_smoothing=0.3),
    "soft_everything": dict(soft=True, weight=True, label_smoothing=0.1, z_loss=0.05, softcap=3.0, logit_scale=1.3),
}


def make_case(rng, batch, C, spec, dtype=np.float64):
    """(logits as `dtype` NumPy, target NumPy, option kwargs with a NumPy weight, same with a torch weight)."""
    x = (rng.standard_normal(tuple(batch) + (C,)) * 2.5).astype(dtype)
    opts = {}
    if spec.get("soft"):
        t = rng.random(tuple(batch) + (C,)) ** 3
        t = t / t.sum(-1, keepdims=True)
    else:
        t = rng.integers(0, C, size=tuple(batch)).astype(np.int64)
        if spec.get("ignore"):
            ii = spec.get("ignore_index", -100)
            flat = t.reshape(-1)
            flat[::3] = ii  # a third of the rows ignored (the first always)
            if flat.size > 1:
                flat[1] = rng.integers(0, C)  # and never all of them
            opts["ignore_index"] = ii
    for k in ("label_smoothing", "z_loss", "softcap", "logit_scale"):
        if k in spec:
            opts[k] = spec[k]
    if spec.get("weight"):
        opts["weight"] = rng.uniform(0.2, 2.0, C)
    return x, t, opts


def with_torch_weight(opts):
    o = dict(opts)
    if o.get("weight") is not None:
        o["weight"] = torch.as_tensor(o["weight"], dtype=torch.float64)
    return o


def grad_output_for(rng, reduction, batch):
    if reduction == "none":
        return rng.uniform(-2.0, 2.0, tuple(batch))
    return 0.7


def assert_grad_close(got, ref, *, rtol, atol_rel, floor=1.0):
    g = t64(got)
    assert g.shape == ref.shape, f"gradient shape {tuple(g.shape)} != {tuple(ref.shape)}"
    # absolute tolerance relative to the largest gradient entry, at least atol_rel * floor
    # (floor: the size of grad_output * weight): where the gradient is 0 in exact arithmetic
    # (one class) float32 leaves noise of about eps * |z| times that
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    torch.testing.assert_close(g, ref, rtol=rtol, atol=atol_rel * max(scale, floor))


# ---------------------------------------------------------------- every option x reduction, float64


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", list(OPTION_SETS))
def test_grad_float64_every_option(name, reduction):
    rng = np.random.default_rng(abs(hash((name, reduction))) % 2**32)
    batch, C = (3, 5), 11
    x, t, opts = make_case(rng, batch, C, OPTION_SETS[name])
    go = grad_output_for(rng, reduction, batch)
    loss, grad = ce_fast.cross_entropy_and_grad(x, t, reduction=reduction, grad_output=go, **opts)
    ref_loss, ref_grad = torch_ref_grad(
        t64(x), t64(t) if t.dtype.kind == "f" else tint(t), go, reduction=reduction, **with_torch_weight(opts)
    )
    assert grad.dtype == np.float64 and grad.shape == x.shape
    torch.testing.assert_close(t64(loss), ref_loss, rtol=1e-11, atol=1e-12)
    assert_grad_close(grad, ref_grad, rtol=1e-9, atol_rel=1e-12)
    # the loss is exactly what cross_entropy returns
    np.testing.assert_array_equal(loss, ce_fast.cross_entropy(x, t, reduction=reduction, **opts))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", ["plain", "everything", "soft_everything"])
def test_grad_float32(name, reduction):
    rng = np.random.default_rng(7)
    batch, C = (4, 3), 37
    x, t, opts = make_case(rng, batch, C, OPTION_SETS[name], dtype=np.float32)
    go = grad_output_for(rng, reduction, batch)
    loss, grad = ce_fast.cross_entropy_and_grad(x, t, reduction=reduction, grad_output=go, **opts)
    ref_loss, ref_grad = torch_ref_grad(
        t64(x), t64(t) if t.dtype.kind == "f" else tint(t), go, reduction=reduction, **with_torch_weight(opts)
    )
    assert grad.dtype == np.float32 and loss.dtype == np.float32
    torch.testing.assert_close(t64(loss), ref_loss, rtol=2e-6, atol=1e-6)
    assert_grad_close(grad, ref_grad, rtol=1e-4, atol_rel=2e-6)


# ---------------------------------------------------------------- property test


@st.composite
def grad_cases(draw):
    batch = draw(st.lists(st.integers(1, 4), min_size=0, max_size=3))
    C = draw(st.integers(1, 40))
    soft = draw(st.booleans())
    spec = dict(soft=soft)
    spec["weight"] = draw(st.booleans())
    if not soft:
        spec["ignore"] = draw(st.booleans())
    ls = draw(st.sampled_from([0.0, 0.0, 0.05, 0.5, 1.0]))
    if ls:
        spec["label_smoothing"] = ls
    z = draw(st.sampled_from([0.0, 0.0, 1e-4, 0.3]))
    if z:
        spec["z_loss"] = z
    # softcap as a multiple of the largest |logit_scale * x|; 0.05 drives tanh into saturation
    cap = draw(st.sampled_from([None, None, 0.05, 0.35, 1.0, 5.0]))
    if cap is not None:
        spec["softcap_factor"] = cap
    s = draw(st.sampled_from([1.0, 1.0, 0.25, -2.0, 3.0]))
    if s != 1.0:
        spec["logit_scale"] = s
    return dict(
        batch=batch,
        C=C,
        spec=spec,
        reduction=draw(st.sampled_from(REDUCTIONS)),
        dtype=draw(st.sampled_from([np.float64, np.float32])),
        layout=draw(st.sampled_from(["contig", "transposed", "strided"])),
        lib=draw(st.sampled_from(["numpy", "torch"])),
        inplace=draw(st.booleans()),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def relayout(a: np.ndarray, layout: str) -> np.ndarray:
    if layout == "transposed":  # class axis first in memory
        return np.moveaxis(np.ascontiguousarray(np.moveaxis(a, -1, 0)), 0, -1)
    if layout == "strided":
        big = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), dtype=a.dtype)
        big[..., ::2] = a
        return big[..., ::2]
    return np.array(a, order="C", copy=True)  # a copy: in-place runs must not touch `a`


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=grad_cases())
def test_grad_property(case):
    rng = np.random.default_rng(case["seed"])
    batch, C, red = case["batch"], case["C"], case["reduction"]
    x, t, opts = make_case(rng, batch, C, case["spec"], dtype=case["dtype"])
    if "softcap_factor" in case["spec"]:
        zmax = float(np.abs(x.astype(np.float64) * opts.get("logit_scale", 1.0)).max(initial=0.0))
        opts["softcap"] = case["spec"]["softcap_factor"] * max(zmax, 1e-3)
    ref_target = t64(t) if t.dtype.kind == "f" else tint(t)
    go = grad_output_for(rng, red, batch)
    ref_loss, ref_grad = torch_ref_grad(t64(x), ref_target, go, reduction=red, **with_torch_weight(opts))
    # float32 rounds the transformed logits z and z - lse: errors grow with |z|
    zmax = float(np.abs(x.astype(np.float64) * opts.get("logit_scale", 1.0)).max(initial=0.0))
    if opts.get("softcap") is not None:
        zmax = min(zmax, opts["softcap"])
    f32_tol = 3e-7 * (2.0 + zmax)
    floor = float(np.abs(go).max(initial=0.0)) * max(1.0, abs(opts.get("logit_scale", 1.0)))
    if opts.get("weight") is not None:
        floor *= max(1.0, float(np.max(opts["weight"])))
    xl = relayout(x, case["layout"])
    if case["lib"] == "torch":
        xl = torch.from_numpy(xl)
        t = torch.from_numpy(t)
        opts = with_torch_weight(opts)
        go = torch.from_numpy(np.asarray(go)) if red == "none" else go
    out = xl if case["inplace"] else None
    ptr = xl.data_ptr() if case["lib"] == "torch" else xl.ctypes.data
    loss, grad = ce_fast.cross_entropy_and_grad(xl, t, reduction=red, grad_output=go, out=out, **opts)
    assert type(grad) is type(xl) and tuple(grad.shape) == x.shape
    if case["inplace"]:
        assert grad is xl
        assert (grad.data_ptr() if case["lib"] == "torch" else grad.ctypes.data) == ptr
    f64 = case["dtype"] == np.float64
    if red == "mean" and not bool(torch.isfinite(ref_loss)):
        # every row ignored: the mean is NaN (as torch) and nothing gets a gradient
        assert np.isnan(float(loss))
        assert not t64(grad).any()
        return
    # row losses carry float32 noise of ~ f32_tol * weight each; a sum adds them up
    rows = max(1, int(np.prod(batch))) if red == "sum" else 1
    loss_atol = 1e-11 * rows if f64 else 2.0 * f32_tol * rows
    torch.testing.assert_close(t64(loss), ref_loss, rtol=1e-10 if f64 else f32_tol, atol=loss_atol)
    assert_grad_close(
        grad, ref_grad, rtol=1e-8 if f64 else 1e-4, atol_rel=1e-11 if f64 else f32_tol, floor=max(floor, 1.0)
    )


# ---------------------------------------------------------------- in place


@pytest.mark.parametrize("lib", ["numpy", "torch"])
@pytest.mark.parametrize("layout", ["contig", "transposed", "strided"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_inplace_out_shares_memory_and_equals_reference(lib, layout, dtype):
    rng = np.random.default_rng(3)
    x, t, opts = make_case(rng, (6, 2), 19, OPTION_SETS["everything"], dtype=dtype)
    _, ref_grad = torch_ref_grad(t64(x), tint(t), 1.3, reduction="sum", **with_torch_weight(opts))
    _, fresh = ce_fast.cross_entropy_and_grad(x, t, reduction="sum", grad_output=1.3, **opts)
    xl = relayout(x.copy(), layout)
    if lib == "torch":
        xl, t = torch.from_numpy(xl), torch.from_numpy(t)
        opts = with_torch_weight(opts)
        ptr, strides = xl.data_ptr(), xl.stride()
    else:
        ptr, strides = xl.ctypes.data, xl.strides
    loss, grad = ce_fast.cross_entropy_and_grad(xl, t, reduction="sum", grad_output=1.3, out=xl, **opts)
    assert grad is xl
    if lib == "torch":
        assert grad.data_ptr() == ptr and grad.stride() == strides
    else:
        assert grad.ctypes.data == ptr and grad.strides == strides
    np.testing.assert_array_equal(t64(grad).numpy(), t64(fresh).numpy())  # same numbers as out of place
    assert_grad_close(
        grad, ref_grad, rtol=1e-8 if dtype == np.float64 else 1e-4, atol_rel=1e-12 if dtype == np.float64 else 2e-6
    )
    assert float(loss) == pytest.approx(float(ce_fast.cross_entropy(x, t, reduction="sum", **opts)), rel=0, abs=0)


def test_out_buffer_not_logits():
    rng = np.random.default_rng(4)
    x, t, opts = make_case(rng, (5,), 9, OPTION_SETS["smoothing"])
    out = np.full_like(x, np.nan)
    x0 = x.copy()
    loss, grad = ce_fast.cross_entropy_and_grad(x, t, out=out, **opts)
    assert grad is out
    np.testing.assert_array_equal(x, x0)  # logits untouched
    _, ref = torch_ref_grad(t64(x), tint(t), **opts)
    assert_grad_close(grad, ref, rtol=1e-9, atol_rel=1e-12)


def test_out_errors():
    x = np.random.default_rng(0).standard_normal((4, 6))
    t = np.array([0, 1, 2, 3])
    with pytest.raises(TypeError):
        ce_fast.cross_entropy_and_grad(x, t, out=np.empty((4, 6), np.float32))
    with pytest.raises(ValueError):
        ce_fast.cross_entropy_and_grad(x, t, out=np.empty((4, 5)))
    big = np.random.default_rng(1).standard_normal((5, 6))
    with pytest.raises(ValueError, match="overlaps"):
        ce_fast.cross_entropy_and_grad(big[:4], t, out=big[1:])


# ---------------------------------------------------------------- low precision: within 1 ulp


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Units in the last place between two float16 / bfloat16 tensors of the same dtype."""
    assert a.dtype == b.dtype and a.dtype in (torch.float16, torch.bfloat16)

    def ordered(v):
        i = v.contiguous().view(torch.int16).to(torch.int32)
        return torch.where(i < 0, -(i + 32768), i)  # monotone in the float value; -0 == +0

    return (ordered(a) - ordered(b)).abs()


def as_torch_lowp(a: np.ndarray) -> torch.Tensor:
    """A NumPy float16 / ml_dtypes bfloat16 array as the torch tensor of the same bits."""
    if a.dtype == BF16:
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a))


def peaked_logits(rng, rows, C, dtype, p=0.999):
    """Random logits plus rows whose target has probability ~p (in the stored dtype)."""
    x = rng.standard_normal((rows, C)) * 2.0
    t = rng.integers(0, C, rows)
    for r in range(0, rows, 2):
        x[r] = rng.standard_normal(C) * 0.05
        # p_y = e^a / (e^a + sum_others e^z): pick a so that p_y ~= p
        others = np.exp(np.delete(x[r], t[r])).sum()
        x[r, t[r]] = np.log(p / (1 - p) * others)
    return x.astype(dtype), t


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("opt", ["plain", "weight_smoothing_ignore", "moderate_softcap_scale_z", "soft"])
@pytest.mark.parametrize("dtype", [np.float16, BF16], ids=["f16", "bf16"])
def test_low_precision_grad_within_one_ulp(dtype, opt, reduction):
    rng = np.random.default_rng(11)
    rows, C = 12, 50
    x, t = peaked_logits(rng, rows, C, dtype)
    _, tt, opts = make_case(rng, (rows,), C, OPTION_SETS[opt])
    if OPTION_SETS[opt].get("soft"):
        t = tt
    elif OPTION_SETS[opt].get("ignore"):
        t[5] = -100
    go = grad_output_for(rng, reduction, (rows,))
    for inplace in (False, True):
        xx = x.copy()
        loss, grad = ce_fast.cross_entropy_and_grad(
            xx, t, reduction=reduction, grad_output=go, out=xx if inplace else None, **opts
        )
        assert grad.dtype == np.dtype(dtype)
        assert loss.dtype == np.float32  # never rounded to the logits' type
        ref_loss, ref = torch_ref_grad(
            t64(x), t64(t) if t.dtype.kind == "f" else tint(t), go, reduction=reduction, **with_torch_weight(opts)
        )
        torch.testing.assert_close(t64(loss), ref_loss, rtol=2e-6, atol=2e-6)
        got = as_torch_lowp(grad)
        want = ref.to(got.dtype)  # the float64 reference rounded to the stored type
        d = ulp_distance(got, want)
        worst = int(d.argmax())
        assert int(d.max()) <= 1, (
            f"{int(d.max())} ulp at flat {worst}: got {float(got.reshape(-1)[worst])!r}, "
            f"ref {float(ref.reshape(-1)[worst])!r} (inplace={inplace})"
        )


@pytest.mark.parametrize("dtype", [np.float16, BF16], ids=["f16", "bf16"])
def test_true_class_term_at_p_0999(dtype):
    """p_y = 0.999: the true-class gradient p_y - 1 ~ -1e-3 must survive the rounding
    (formed in wide precision, rounded once), in place too."""
    C = 64
    x = np.zeros((3, C))
    x[:, 5] = np.log(0.999 / 0.001 * (C - 1))
    x = x.astype(dtype)
    t = np.array([5, 5, 5])
    x64 = t64(x)
    p = torch.softmax(x64, -1)[:, 5]
    assert torch.allclose(p, torch.full_like(p, 0.999), atol=3e-4)
    _, ref = torch_ref_grad(x64, tint(t), reduction="sum")
    for out in (None, x):
        _, g = ce_fast.cross_entropy_and_grad(x, t, reduction="sum", out=out)
        got = as_torch_lowp(g)
        assert int(ulp_distance(got, ref.to(got.dtype)).max()) <= 1
        assert float(got[0, 5]) == pytest.approx(float(ref[0, 5]), rel=1e-2)
        assert float(got[0, 5]) < 0


@pytest.mark.parametrize("dtype", [np.float32, BF16], ids=["f32", "bf16"])
def test_softcap_saturated_grad_precision(dtype):
    """1 - tanh^2 is formed from exp(-2|a|), so saturated softcap gradients stay exact."""
    rng = np.random.default_rng(12)
    x = (rng.standard_normal((8, 40)) * 6.0).astype(dtype)  # |x / softcap| up to ~10
    t = rng.integers(0, 40, 8)
    _, g = ce_fast.cross_entropy_and_grad(x, t, softcap=2.0, reduction="sum")
    _, ref = torch_ref_grad(t64(x), tint(t), softcap=2.0, reduction="sum")
    if dtype == BF16:
        got = as_torch_lowp(g)
        assert int(ulp_distance(got, ref.to(got.dtype)).max()) <= 1
    else:  # every entry to float32 relative accuracy (what the unsaturated range achieves)
        torch.testing.assert_close(t64(g), ref, rtol=3e-5, atol=1e-30)


# ---------------------------------------------------------------- ignored rows, grad_output


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16, BF16], ids=["f64", "f32", "f16", "bf16"])
def test_ignored_rows_have_zero_gradient(dtype, reduction):
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((4, 3, 10)) * 3).astype(dtype)
    t = rng.integers(0, 10, (4, 3))
    t[1] = -100
    t[3, 2] = -100
    go = rng.uniform(0.5, 2, (4, 3)) if reduction == "none" else 2.0
    loss, g = ce_fast.cross_entropy_and_grad(
        x,
        t,
        weight=rng.uniform(0.5, 2, 10),
        reduction=reduction,
        label_smoothing=0.1,
        z_loss=0.01,
        softcap=4.0,
        grad_output=go,
    )
    g = t64(g)
    assert not g[1].any() and not g[3, 2].any()
    assert g[0].abs().sum() > 0
    if reduction == "none":
        assert float(loss[1].sum()) == 0.0


def test_ignored_rows_zero_gradient_even_when_non_finite():
    x = np.random.default_rng(0).standard_normal((3, 5))
    x[1] = np.nan
    x[2, 0] = np.inf
    t = np.array([0, -100, -100])
    loss, g = ce_fast.cross_entropy_and_grad(x, t)
    assert np.isfinite(loss)
    assert not g[1:].any()


def test_all_rows_ignored_mean():
    x = np.random.default_rng(0).standard_normal((3, 5))
    t = np.full(3, -100)
    loss, g = ce_fast.cross_entropy_and_grad(x, t)
    assert np.isnan(loss)
    ref_loss = torch_ref_loss(t64(x), tint(t))
    assert torch.isnan(ref_loss)
    assert not g.any()


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_grad_output_array_for_none(lib):
    rng = np.random.default_rng(8)
    x, t, opts = make_case(rng, (2, 3, 4), 7, OPTION_SETS["everything"])
    go = rng.uniform(-3, 3, (2, 3, 4))
    go[0, 0, 0] = 0.0
    _, ref = torch_ref_grad(t64(x), tint(t), go, reduction="none", **with_torch_weight(opts))
    xs, ts, gos = x, t, go
    if lib == "torch":
        xs, ts, gos, opts = torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(go), with_torch_weight(opts)
    loss, g = ce_fast.cross_entropy_and_grad(xs, ts, reduction="none", grad_output=gos, **opts)
    assert tuple(loss.shape) == (2, 3, 4)
    assert_grad_close(g, ref, rtol=1e-9, atol_rel=1e-12)
    assert not t64(g)[0, 0, 0].any()
    # a broadcastable scalar is accepted for none, an array is refused for mean / sum
    _, g1 = ce_fast.cross_entropy_and_grad(x, t, reduction="none", grad_output=2.0, **with_torch_weight(opts))
    _, ref1 = torch_ref_grad(t64(x), tint(t), 2.0, reduction="none", **with_torch_weight(opts))
    assert_grad_close(g1, ref1, rtol=1e-9, atol_rel=1e-12)
    with pytest.raises(ValueError):
        ce_fast.cross_entropy_and_grad(x, t, reduction="mean", grad_output=go)
    with pytest.raises(ValueError):
        ce_fast.cross_entropy_and_grad(x, t, reduction="none", grad_output=go[:, :, :2])


def test_zero_rows():
    x = np.zeros((0, 5))
    t = np.zeros((0,), np.int64)
    for red, want in (("mean", np.nan), ("sum", 0.0)):
        loss, g = ce_fast.cross_entropy_and_grad(x, t, reduction=red)
        assert g.shape == (0, 5)
        np.testing.assert_equal(float(loss), want)
    loss, g = ce_fast.cross_entropy_and_grad(x, t, reduction="none", grad_output=np.zeros(0))
    assert loss.shape == (0,) and g.shape == (0, 5)


# ---------------------------------------------------------------- saved statistics (ce_fast.torch's backward)


@pytest.mark.parametrize("name", ["plain", "everything", "soft_everything", "soft"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_grad_with_saved_stats_matches_fused(name, reduction):
    rng = np.random.default_rng(9)
    x, t, opts = make_case(rng, (4, 3), 13, OPTION_SETS[name], dtype=np.float32)
    go = grad_output_for(rng, reduction, (4, 3))
    weight = opts.pop("weight", None)
    loss, grad = ce_fast.cross_entropy_and_grad(x, t, weight=weight, reduction=reduction, grad_output=go, **opts)
    loss2, stats = _api._loss_and_stats(x, t, LossSpec.make(reduction=reduction, **opts), weight)
    np.testing.assert_array_equal(loss2, loss)
    assert stats.lse.shape == (12,)
    assert (stats.swt is not None) == (t.dtype.kind == "f")
    g2 = _api._grad_with_saved(x, t, stats, weight=weight, grad_output=go, reduction=reduction, **opts)
    np.testing.assert_array_equal(g2, grad)
