"""The float64 NumPy oracle (tests/oracle.py) checked against PyTorch in float64.

torch is a hard requirement of the test environment: a missing torch fails here.
"""

from __future__ import annotations

import itertools
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from oracle import cross_entropy_ref, grad_ref, log_softmax_ref, logsumexp_ref, mean_denominator

RTOL = 1e-12


def _close(got, want, what=""):
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{what} shape {got.shape} vs torch {want.shape}"
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-13, equal_nan=True, err_msg=what)
    # infinities must match in sign too (assert_allclose checks this, keep explicit)
    assert np.array_equal(np.isposinf(got), np.isposinf(want)), what
    assert np.array_equal(np.isneginf(got), np.isneginf(want)), what


def _torch_input(z: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(z, dtype=np.float64))
    return t.movedim(-1, 1) if t.ndim >= 3 else t


def torch_ce(
    z,
    target,
    *,
    weight=None,
    ignore_index=-100,
    reduction="mean",
    label_smoothing=0.0,
    z_loss=0.0,
    softcap=None,
    logit_scale=1.0,
    requires_grad=False,
):
    """float64 torch: transform, F.cross_entropy (class axis moved to dim 1), + z-loss."""
    zz = torch.from_numpy(np.ascontiguousarray(z, dtype=np.float64)).requires_grad_(requires_grad)
    zt = zz * logit_scale
    if softcap is not None:
        zt = softcap * torch.tanh(zt / softcap)
    inp = zt.movedim(-1, 1) if zt.ndim >= 3 else zt
    soft = np.asarray(target).dtype.kind == "f"
    if soft:
        tt = torch.from_numpy(np.ascontiguousarray(target, dtype=np.float64))
        tt = tt.movedim(-1, 1) if tt.ndim >= 3 else tt
    else:
        tt = torch.from_numpy(np.asarray(target, dtype=np.int64))
    w = None if weight is None else torch.from_numpy(np.asarray(weight, dtype=np.float64))
    kw = dict(weight=w, label_smoothing=label_smoothing)
    if not soft:
        kw["ignore_index"] = ignore_index
    loss = F.cross_entropy(inp, tt, reduction=reduction, **kw)
    if z_loss > 0.0:
        lse = torch.logsumexp(zt, dim=-1)
        if soft:
            valid = torch.ones_like(lse, dtype=torch.bool)
        else:
            valid = tt != ignore_index
        zl = torch.where(valid, z_loss * lse * lse, torch.zeros_like(lse))
        if reduction == "none":
            loss = loss + zl
        elif reduction == "sum":
            loss = loss + zl.sum()
        else:
            if soft:
                den = float(valid.numel())
            else:
                wv = torch.ones(zt.shape[-1], dtype=torch.float64) if w is None else w
                den = wv[tt.clamp(min=0)][valid].sum()
            loss = loss + zl.sum() / den
    return loss, zz


SHAPES = {"1d": (7,), "2d": (6, 5), "3d": (2, 4, 5)}


def _make(rng, shape, ignore, soft):
    z = rng.standard_normal(shape) * 2.0
    C = shape[-1]
    if soft:
        t = rng.random(shape)
        t /= t.sum(-1, keepdims=True)
        return z, t, -100
    y = rng.integers(0, C, size=shape[:-1])
    if ignore == "none":
        return z, y, -100
    if ignore == "default":
        y = np.where(rng.random(y.shape) < 0.4, -100, y)
        if y.ndim:
            y.reshape(-1)[0] = -100
            y.reshape(-1)[-1] = 1
        return z, y, -100
    # ignore_index inside [0, C)
    return z, y, 2


def _combos():
    for shape, red, weighted, ls, kind in itertools.product(
        SHAPES,
        ("mean", "sum", "none"),
        (False, True),
        (0.0, 0.1, 1.0),
        ("int", "int_ignore", "int_ignore_inside", "soft"),
    ):
        yield pytest.param(shape, red, weighted, ls, kind, id=f"{shape}-{red}-w{int(weighted)}-ls{ls}-{kind}")


@pytest.mark.parametrize("shape,reduction,weighted,ls,kind", list(_combos()))
def test_oracle_matches_torch_options(shape, reduction, weighted, ls, kind):
    rng = np.random.default_rng(zlib.crc32(f"{shape}{reduction}{weighted}{ls}{kind}".encode()))
    ignore = {"int": "none", "int_ignore": "default", "int_ignore_inside": "inside", "soft": "none"}[kind]
    z, t, ii = _make(rng, SHAPES[shape], ignore, kind == "soft")
    C = z.shape[-1]
    w = rng.uniform(0.1, 2.0, C) if weighted else None
    want, _ = torch_ce(z, t, weight=w, ignore_index=ii, reduction=reduction, label_smoothing=ls)
    got = cross_entropy_ref(z, t, weight=w, ignore_index=ii, reduction=reduction, label_smoothing=ls)
    _close(got, want.detach().numpy(), f"{shape} {reduction} w={weighted} ls={ls} {kind}")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize(
    "z_loss,softcap,logit_scale",
    [(1e-4, None, 1.0), (0.0, 5.0, 1.0), (0.0, None, 0.37), (0.3, 2.5, -1.7), (1e-2, 30.0, 2.0)],
)
def test_oracle_matches_torch_transforms(reduction, soft, z_loss, softcap, logit_scale):
    rng = np.random.default_rng(7)
    z, t, ii = _make(rng, (3, 4, 6), "none" if soft else "default", soft)
    w = rng.uniform(0.0, 2.0, 6)
    kw = dict(
        weight=w,
        ignore_index=ii,
        reduction=reduction,
        label_smoothing=0.2,
        z_loss=z_loss,
        softcap=softcap,
        logit_scale=logit_scale,
    )
    want, _ = torch_ce(z, t, **kw)
    got = cross_entropy_ref(z, t, **kw)
    _close(got, want.detach().numpy(), str(kw))


def _edge_rows():
    inf, nan = np.inf, np.nan
    return np.array(
        [
            [0.5, -1.0, 2.0, 0.0],
            [-inf, 1.0, 2.0, -inf],  # some -inf
            [-inf, -inf, -inf, -inf],  # only -inf
            [1.0, inf, 0.0, -2.0],  # +inf
            [inf, inf, 0.0, 1.0],  # two +inf
            [0.0, nan, 1.0, 2.0],  # NaN
            [nan, inf, -inf, 0.0],  # NaN with infs
            [1e300, -1e300, 3e38, 0.0],  # huge magnitudes
            [7.0, 7.0, 7.0, 7.0],  # constant
            [1e4, 0.0, 0.0, 0.0],  # peaked
        ]
    )


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("ls", [0.0, 0.25])
@pytest.mark.parametrize("weighted", [False, True])
def test_oracle_edge_values_int_target(reduction, ls, weighted):
    z = _edge_rows()
    n, C = z.shape
    for y in ([0, 1, 2, 3, 2, 3, 1, 2, 0, 1], [1, 0, 2, 1, 2, 0, 3, 2, 0, 0]):
        y = np.array(y)
        w = np.array([0.5, 1.0, 0.0, 2.0]) if weighted else None
        want, _ = torch_ce(z, y, weight=w, reduction=reduction, label_smoothing=ls)
        got = cross_entropy_ref(z, y, weight=w, reduction=reduction, label_smoothing=ls)
        _close(got, want.detach().numpy(), f"y={y.tolist()}")
        # with the non-finite rows ignored, the mean/sum is finite again
        yi = np.where(np.isfinite(z).all(-1), y, -100)
        want, _ = torch_ce(z, yi, weight=w, reduction=reduction, label_smoothing=ls)
        got = cross_entropy_ref(z, yi, weight=w, reduction=reduction, label_smoothing=ls)
        _close(got, want.detach().numpy(), f"ignored y={yi.tolist()}")
        if reduction != "none":
            assert np.isfinite(got)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("ls", [0.0, 0.25])
def test_oracle_edge_values_soft_target(reduction, ls):
    z = _edge_rows()
    rng = np.random.default_rng(3)
    t = rng.random(z.shape)
    t[:, 0] = 0.0  # zero probabilities meet -inf / NaN logits
    want, _ = torch_ce(z, t, reduction=reduction, label_smoothing=ls)
    got = cross_entropy_ref(z, t, reduction=reduction, label_smoothing=ls)
    _close(got, want.detach().numpy())


def test_oracle_logsumexp_and_log_softmax_edges():
    z = _edge_rows()
    tz = torch.from_numpy(z)
    _close(logsumexp_ref(z), torch.logsumexp(tz, dim=-1).numpy(), "logsumexp")
    _close(log_softmax_ref(z), torch.log_softmax(tz, dim=-1).numpy(), "log_softmax")
    # the conventions spelled out
    lse = logsumexp_ref(z)
    assert lse[2] == -np.inf and lse[3] == np.inf and lse[4] == np.inf
    assert np.isnan(lse[5]) and np.isnan(lse[6])
    assert lse[8] == pytest.approx(7.0 + np.log(4.0), rel=1e-15)
    assert np.isnan(log_softmax_ref(z)[2]).all() and np.isnan(log_softmax_ref(z)[3]).all()


def test_oracle_logsumexp_random_3d():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((3, 5, 1000)) * 20
    _close(logsumexp_ref(z), torch.logsumexp(torch.from_numpy(z), -1).numpy())
    _close(logsumexp_ref(z[..., :1]), z[..., 0])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("soft", [False, True])
def test_oracle_zero_rows(reduction, soft):
    z = np.zeros((0, 5))
    t = np.zeros((0, 5)) if soft else np.zeros((0,), dtype=np.int64)
    want, _ = torch_ce(z, t, reduction=reduction)
    got = cross_entropy_ref(z, t, reduction=reduction)
    _close(got, want.detach().numpy())
    if reduction == "mean":
        assert np.isnan(got)
    elif reduction == "sum":
        assert got == 0.0
    else:
        assert got.shape == (0,)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_oracle_all_ignored(reduction):
    z = np.random.default_rng(1).standard_normal((4, 3))
    y = np.full(4, -100)
    want, _ = torch_ce(z, y, reduction=reduction, label_smoothing=0.1, z_loss=0.1)
    got = cross_entropy_ref(z, y, reduction=reduction, label_smoothing=0.1, z_loss=0.1)
    _close(got, want.detach().numpy())
    assert np.isnan(got) if reduction == "mean" else got == 0.0


def test_oracle_mean_denominator():
    y = np.array([0, 2, -100, 2])
    w = np.array([0.5, 1.0, 3.0])
    assert mean_denominator(np.zeros((4, 3)), y, w) == 6.5
    assert mean_denominator(np.zeros((4, 3)), y) == 3.0
    assert mean_denominator(np.zeros((4, 3)), np.zeros((4, 3))) == 4.0


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(
    "opts",
    [
        {},
        {"label_smoothing": 0.3},
        {"weight": True, "label_smoothing": 0.1},
        {"z_loss": 0.05, "softcap": 3.0, "logit_scale": 1.3},
        {"soft": True},
        {"soft": True, "weight": True, "label_smoothing": 0.2, "z_loss": 0.01, "softcap": 4.0},
        {"ignore": True, "weight": True, "z_loss": 0.02},
    ],
    ids=lambda o: "-".join(o) or "plain",
)
def test_oracle_grad_matches_torch_autograd(reduction, opts):
    rng = np.random.default_rng(11)
    opts = dict(opts)
    soft = opts.pop("soft", False)
    ignore = opts.pop("ignore", False)
    z, t, ii = _make(rng, (3, 2, 7), "default" if ignore else "none", soft)
    if opts.pop("weight", False):
        opts["weight"] = rng.uniform(0.1, 2.0, 7)
    go = rng.standard_normal((3, 2)) if reduction == "none" else 0.7
    loss, zz = torch_ce(z, t, ignore_index=ii, reduction=reduction, requires_grad=True, **opts)
    loss.backward(torch.as_tensor(go, dtype=torch.float64))
    got = grad_ref(z, t, ignore_index=ii, reduction=reduction, grad_output=go, **opts)
    _close(got, zz.grad.numpy(), str(opts))
