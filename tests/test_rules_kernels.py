"""The loss rules on the GPU: ce_fast._rules traced by ce_fast._symbolic into one
generated kernel per option set (ce_fast._engines.cuda_rules), checked without a GPU.

- The generated kernels, compiled for the CPU by the emulator, give what the same
  rules give with NumPy: per-row values bit for bit, reductions to the last bits.
- A call costs a fixed, small number of launches and one host sync (the target check):
  pinned through the emulator's launch log and a NumPy stand-in for CuPy that counts
  every operation that would launch a kernel, and every read of a device value.
- Each generated kernel compiles with NVRTC for sm_80 and sm_90.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ce_fast
from ce_fast import _api, _arrays, _rules, _symbolic
from ce_fast._engines import cpu as _cpu
from ce_fast._engines import cuda as _cuda
from ce_fast._engines import cuda_rules
from ce_fast._spec import LossSpec
from ce_fast._types import Batch, GradCoef, KlStats, Stats

import kernel_emulator

pytestmark = pytest.mark.skipif(kernel_emulator.compiler() is None, reason="no C++ compiler for the kernel emulator")


@pytest.fixture(scope="module")
def emu():
    return kernel_emulator.Emulator()


# Option sets whose traced programs differ in shape (each is one generated kernel per rule).
OPTIONS = {
    "plain": dict(),
    "sum": dict(reduction="sum"),
    "none": dict(reduction="none"),
    "smooth": dict(label_smoothing=0.1),
    "zloss": dict(z_loss=1e-3, reduction="sum"),
    "weights": dict(weight=True, label_smoothing=0.2),
    "weights-none": dict(weight=True, reduction="none"),
    "soft": dict(soft=True),
    "soft-smooth-weights": dict(soft=True, weight=True, label_smoothing=0.3),
    "all-smooth": dict(label_smoothing=1.0, weight=True),
}


# ---------------------------------------------------------------- the rules, traced vs NumPy


def _batch(rows, C, opts, rng, go_rows=False):
    """A CE batch on host arrays as the engines see it, with random per-row statistics
    (non-finite rows included)."""
    x = _arrays.operand(np.zeros((rows, C), np.float32), "logits")
    b = Batch(x=x, engine=_cpu, xp=np, classes=C)
    if opts.get("weight"):
        w = rng.random(C) * 2
        w[rng.random(C) < 0.3] = 0.0
        b.weight, b.weight_total = w, float(w.sum())
    else:
        b.weight_total = float(C)
    spec = LossSpec.make(**{k: v for k, v in opts.items() if k not in ("weight", "soft")})
    mx = rng.standard_normal(rows) * 5
    specials = rng.random(rows)
    mx[specials < 0.1] = np.inf
    mx[(specials >= 0.1) & (specials < 0.15)] = -np.inf
    mx[(specials >= 0.15) & (specials < 0.2)] = np.nan
    s = Stats(mx=mx, ls=rng.random(rows) * 3)
    if opts.get("soft"):
        b.soft = x  # only tested for None by the rules
        b.valid = np.ones(rows, bool)
        s.swt, s.swtz = rng.random(rows), -rng.random(rows) * 4
    else:
        b.valid = rng.random(rows) < 0.8
        b.target = np.where(b.valid, rng.integers(0, C, rows), -1)
        s.zy = mx - rng.random(rows) * 4
    if spec.label_smoothing > 0:
        s.swz = -rng.random(rows) * 50
        s.swz[rng.random(rows) < 0.1] = -np.inf
    b.grad_output = rng.standard_normal(rows) if go_rows else np.asarray(rng.standard_normal())
    return b, spec, s


def _copy(b: Batch) -> Batch:
    return dataclasses.replace(b, wy=None)


@pytest.mark.parametrize("name", OPTIONS)
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.integers(1, 700), C=st.integers(1, 50), seed=st.integers(0, 2**32 - 1))
def test_traced_rules_match_numpy(emu, name, rows, C, seed):
    opts = OPTIONS[name]
    rng = np.random.default_rng(seed)
    b, spec, s = _batch(rows, C, opts, rng, go_rows=spec_none(opts))
    with kernel_emulator.emulated_engine(emu):
        got = _cuda.apply(_rules.loss, _copy(b), spec, s)
        coef = _cuda.apply(_rules.grad_coef, _copy(b), spec)
    with np.errstate(all="ignore"):
        ref = _rules.loss(_copy(b), spec, s)
        ref_coef = _rules.grad_coef(_copy(b), spec)
    got, ref = np.asarray(got), np.asarray(ref)
    assert got.dtype == ref.dtype == np.float32 and got.shape == ref.shape
    if spec.reduction == "none":
        np.testing.assert_array_equal(got, ref)  # the same operations, rounded the same way
    else:
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-30)  # sums in another order
    for f in ("a0", "b", "g"):
        g_, r_ = np.broadcast_to(getattr(coef, f), rows), np.broadcast_to(getattr(ref_coef, f), rows)
        assert g_.dtype == np.float64
        if spec.reduction == "mean" and f == "g":
            np.testing.assert_allclose(g_, r_, rtol=1e-13)  # divided by a sum
        else:
            np.testing.assert_array_equal(g_, r_)
    for f in ("a_lse", "a_swt", "d", "e"):
        assert getattr(coef, f) == getattr(ref_coef, f)


def spec_none(opts) -> bool:
    return opts.get("reduction") == "none"


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("gamma", [0.0, 2.0, 0.5])
def test_traced_focal_and_kl_rules_match_numpy(emu, reduction, gamma):
    """The focal and distillation rules (exp, expm1, powers, counted-row means) traced."""
    rng = np.random.default_rng(int(gamma * 10) + len(reduction))
    b, spec, s = _batch(300, 11, {"reduction": reduction}, rng, go_rows=reduction == "none")
    b.wy = np.where(b.valid, rng.random(300), 0.0)  # alpha_y
    kl = KlStats(*(rng.standard_normal(300) for _ in range(5)))
    kl.ms[:5] = [np.inf, -np.inf, np.nan, 1e308, -1e308]
    cases = [
        (_rules.focal_loss, (s,), dict(gamma=gamma)),
        (_rules.focal_grad_coef, (s,), dict(gamma=gamma)),
        (_rules.kl_loss, (kl,), dict(reverse=gamma > 1.0)),
        (_rules.row_grad_scale, (), {}),
    ]
    for rule, stats, options in cases:
        with kernel_emulator.emulated_engine(emu):
            got = _cuda.apply(rule, _copy_keep_wy(b), spec, *stats, **options)
        with np.errstate(all="ignore"):
            ref = rule(_copy_keep_wy(b), spec, *stats, **options)
        # (value, reference, whether it went through a sum over rows: then to the last bits)
        if isinstance(got, GradCoef):
            pairs = [(got.a0, ref.a0, False), (got.g, ref.g, reduction == "mean")]
        else:
            pairs = [(got, ref, reduction != "none")]
        for g_, r_, summed in pairs:
            g_, r_ = np.broadcast_to(np.asarray(g_), np.shape(r_)), np.asarray(r_)
            if summed:
                np.testing.assert_allclose(g_, r_, rtol=1e-6, err_msg=rule.__name__)
            else:
                np.testing.assert_array_equal(g_, r_, err_msg=rule.__name__)


def _copy_keep_wy(b: Batch) -> Batch:
    return dataclasses.replace(b)


def test_reductions_are_deterministic(emu):
    """One block, a fixed stride per thread and a fixed tree: the same bits every call."""
    rng = np.random.default_rng(5)
    b, spec, s = _batch(5000, 7, {}, rng)
    s.mx = rng.standard_normal(5000)  # finite rows: a sum that is a number
    s.zy = s.mx - rng.random(5000) * 4
    with kernel_emulator.emulated_engine(emu):
        first = [float(_cuda.apply(_rules.loss, _copy(b), spec, s)) for _ in range(3)]
    assert first[0] == first[1] == first[2]
    ref = float(_rules.loss(_copy(b), spec, s))
    assert first[0] == pytest.approx(ref, rel=1e-6)


def test_one_kernel_per_option_set(emu):
    """Traces are cached by options and shape; a new label_smoothing value is a new
    constant of the same kernel, not a new kernel."""
    rng = np.random.default_rng(6)
    b, _, s = _batch(10, 5, {}, rng)
    names = set()
    with kernel_emulator.emulated_engine(emu):
        for eps in (0.1, 0.2, 0.3):
            spec = LossSpec.make(label_smoothing=eps)
            s.swz = -rng.random(10)
            emu.launches.clear()
            _cuda.apply(_rules.loss, _copy(b), spec, s)
            names.update(n for n, _, _ in emu.launches)
    assert len(names) == 1 and next(iter(names)).startswith("ce_rules_")


# ---------------------------------------------------------------- launches and syncs per call


def _count(emu, fn):
    ops = kernel_emulator.DeviceOps()
    with kernel_emulator.emulated_engine(emu, count=ops):
        emu.launches.clear()
        result = fn()
    kernels = [n.split("<")[0] for n, _, _ in emu.launches]
    return result, kernels, ops


@pytest.mark.parametrize("name", ["plain", "sum", "none", "smooth", "zloss"])
def test_forward_is_three_kernels_one_fill_one_sync(emu, name):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((40, 300)).astype(np.float32)
    y = rng.integers(0, 300, 40)
    y[3] = -100
    opts = OPTIONS[name]
    loss, kernels, ops = _count(emu, lambda: ce_fast.cross_entropy(x, y, **opts))
    assert kernels[0] == "ce_targets" and kernels[1] == "ce_stats" and kernels[2].startswith("ce_rules_")
    assert len(kernels) == 3
    assert ops.ops == ["full"]  # the target check's flag
    assert ops.syncs == ["tolist"]  # reading that flag: the one sync of a call
    np.testing.assert_allclose(np.asarray(loss), ce_fast.cross_entropy(x, y, **opts), rtol=1e-6)


@pytest.mark.parametrize("name", ["plain", "none", "smooth"])
def test_fused_call_is_four_kernels_one_fill_one_sync(emu, name):
    rng = np.random.default_rng(8)
    x = rng.standard_normal((40, 300)).astype(np.float32)
    y = rng.integers(0, 300, 40)
    opts = OPTIONS[name]
    (loss, grad), kernels, ops = _count(emu, lambda: ce_fast.cross_entropy_and_grad(x, y, **opts))
    assert kernels[0] == "ce_targets" and kernels[1].startswith("ce_rules_")
    assert kernels[2] == "ce_fused" and kernels[3].startswith("ce_rules_")
    assert len(kernels) == 4
    assert ops.ops == ["full"] and ops.syncs == ["tolist"]
    ref_loss, ref_grad = ce_fast.cross_entropy_and_grad(x, y, **opts)
    np.testing.assert_allclose(np.asarray(loss), ref_loss, rtol=1e-6)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-5, atol=1e-9)


def test_class_weights_are_checked_in_the_same_read_back(emu):
    """Weights: one generated kernel checks and sums them; its values come back with the
    target check's flag (one sync), and a bad weight is still reported first."""
    rng = np.random.default_rng(14)
    x = rng.standard_normal((40, 300)).astype(np.float32)
    y = rng.integers(0, 300, 40)
    w = rng.random(300) * 2
    loss, kernels, ops = _count(emu, lambda: ce_fast.cross_entropy(x, y, weight=w, label_smoothing=0.1))
    assert kernels[0].startswith("ce_rules_") and kernels[1:3] == ["ce_targets", "ce_stats"] and len(kernels) == 4
    assert ops.ops == ["full", "concatenate", "astype"]  # target flag, one read back, float32 weights
    assert ops.syncs == ["tolist"]
    np.testing.assert_allclose(np.asarray(loss), ce_fast.cross_entropy(x, y, weight=w, label_smoothing=0.1), rtol=1e-6)
    p = rng.random((40, 300))
    _, kernels, ops = _count(emu, lambda: ce_fast.cross_entropy(x, p, weight=w))  # soft: no target check
    assert ops.syncs == ["tolist"] and len(kernels) == 3
    y[5] = 301
    for bad, message in (
        (np.nan, "weight must be finite"),
        (-0.5, r"weight must be non-negative; weight\[17\] = -0.5"),
    ):
        w2 = w.copy()
        w2[17] = bad
        with kernel_emulator.emulated_engine(emu), pytest.raises(ValueError, match=message):
            ce_fast.cross_entropy(x, y, weight=w2)  # the out-of-range target comes second
    with kernel_emulator.emulated_engine(emu), pytest.raises(IndexError, match="target value 301"):
        ce_fast.cross_entropy(x, y, weight=w)


def test_backward_from_saved_statistics_syncs_never(emu):
    """ce_fast.torch's backward: the forward checked the targets, so no read back."""
    rng = np.random.default_rng(9)
    x = rng.standard_normal((40, 300)).astype(np.float32)
    y = rng.integers(0, 300, 40)
    with kernel_emulator.emulated_engine(emu):
        _, saved = _api._loss_and_stats(x, y, LossSpec.make())
    grad, kernels, ops = _count(emu, lambda: _api._grad_with_saved(x, y, saved, grad_output=0.5, checked=True))
    assert kernels[0] == "ce_targets" and kernels[1].startswith("ce_rules_") and kernels[2] == "ce_fused"
    assert len(kernels) == 3 and ops.ops == ["full"] and ops.syncs == []
    np.testing.assert_allclose(grad, ce_fast.cross_entropy_and_grad(x, y, grad_output=0.5)[1], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("gamma", [0.0, 2.0])
def test_focal_calls_launch_few_kernels_and_sync_once(emu, gamma):
    rng = np.random.default_rng(12)
    x = rng.standard_normal((40, 300)).astype(np.float32)
    y = rng.integers(0, 300, 40)
    loss, kernels, ops = _count(emu, lambda: ce_fast.focal_loss(x, y, gamma=gamma))
    assert kernels[:2] == ["ce_targets", "ce_stats"] and kernels[2].startswith("ce_rules_") and len(kernels) == 3
    assert ops.ops == ["full"] and ops.syncs == ["tolist"]
    np.testing.assert_allclose(np.asarray(loss), ce_fast.focal_loss(x, y, gamma=gamma), rtol=1e-6)
    (loss, grad), kernels, ops = _count(emu, lambda: ce_fast.focal_loss_and_grad(x, y, gamma=gamma))
    # statistics, the loss, the gradient's coefficients, then the gradient from the statistics
    assert kernels[:2] == ["ce_targets", "ce_stats"] and kernels[4] == "ce_fused" and len(kernels) == 5
    assert ops.ops == ["full"] and ops.syncs == ["tolist"]
    np.testing.assert_allclose(grad, ce_fast.focal_loss_and_grad(x, y, gamma=gamma)[1], rtol=1e-5, atol=1e-9)


def test_nothing_is_read_back_under_graph_capture(emu, monkeypatch):
    """Inside a CUDA graph capture no value check reads back (the target check marks its
    rows NaN instead; weight values are not checked): a captured call never syncs."""
    rng = np.random.default_rng(13)
    x = rng.standard_normal((40, 300)).astype(np.float32)
    y = rng.integers(0, 300, 40)
    y[7] = 300  # out of range: NaN under capture, IndexError otherwise
    w = rng.random(300)
    monkeypatch.setattr(_cuda, "capturing", lambda: True)
    (loss, grad), _, ops = _count(emu, lambda: ce_fast.cross_entropy_and_grad(x, y, weight=w, reduction="none"))
    assert ops.syncs == []
    loss = np.asarray(loss)
    assert np.isnan(loss[7]) and np.isfinite(np.delete(loss, 7)).all()
    assert np.isnan(grad[7]).all() and np.isfinite(np.delete(grad, 7, axis=0)).all()
    y[7] = 3
    np.testing.assert_allclose(
        # The CPU engine's float32 losses: the GPU kernels sum a row in another order (an ulp).
        np.delete(loss, 7),
        np.delete(ce_fast.cross_entropy(x, y, weight=w, reduction="none"), 7),
        rtol=1e-6,
    )
    loss, _, ops = _count(emu, lambda: ce_fast.focal_loss(x, y, alpha=w))
    assert ops.syncs == []


def test_focal_alpha_is_checked_in_the_same_read_back(emu):
    rng = np.random.default_rng(15)
    x = rng.standard_normal((40, 300)).astype(np.float32)
    y = rng.integers(0, 300, 40)
    alpha = rng.random(300)
    loss, kernels, ops = _count(emu, lambda: ce_fast.focal_loss(x, y, alpha=alpha))
    assert kernels[0].startswith("ce_rules_") and kernels[1:3] == ["ce_targets", "ce_stats"] and len(kernels) == 4
    assert ops.ops == ["full", "concatenate"] and ops.syncs == ["tolist"]
    np.testing.assert_allclose(np.asarray(loss), ce_fast.focal_loss(x, y, alpha=alpha), rtol=1e-6)
    alpha[9] = -1.0
    with kernel_emulator.emulated_engine(emu), pytest.raises(ValueError, match=r"alpha\[9\] = -1.0"):
        ce_fast.focal_loss(x, y, alpha=alpha)


def test_counting_sees_what_it_should(emu):
    """The counting stand-in is not vacuous: a rule run with it as the array module
    (the CuPy path before rules were traced) costs a dozen operations."""
    rng = np.random.default_rng(10)
    x = rng.standard_normal((40, 300)).astype(np.float32)
    y = rng.integers(0, 300, 40)
    saved = _cuda.apply
    try:
        _cuda.apply = lambda rule, *args: rule(*args)
        _, kernels, ops = _count(emu, lambda: ce_fast.cross_entropy(x, y))
    finally:
        _cuda.apply = saved
    assert len(kernels) == 2 and len(ops.ops) >= 10


# ---------------------------------------------------------------- the tracer refuses what it cannot record


def test_host_branch_on_traced_value_is_refused():
    v = _symbolic.row_input("mx")
    with pytest.raises(_symbolic.TraceError, match="no truth value"):
        bool(v > 0.0)
    with pytest.raises(_symbolic.TraceError, match="host number"):
        float(v.sum())
    with pytest.raises(_symbolic.TraceError, match="cannot be combined"):
        v + _symbolic.class_input("weight")
    with pytest.raises(_symbolic.TraceError, match="not supported"):
        _symbolic.xp.asarray(v, dtype="complex128")


# ---------------------------------------------------------------- NVRTC


def _programs(emu):
    """The generated programs of every option set (traced here, no GPU needed)."""
    rng = np.random.default_rng(11)
    out = {}
    with kernel_emulator.emulated_engine(emu):
        for opts in OPTIONS.values():
            _trace_all(out, opts, rng)
        for reduction in ("mean", "none"):  # the focal and distillation rules
            b, spec, s = _batch(16, 9, {"reduction": reduction}, rng, go_rows=reduction == "none")
            kl = KlStats(*(rng.standard_normal(16) for _ in range(5)))
            for rule, stats, options in (
                (_rules.focal_loss, (s,), dict(gamma=2.0)),
                (_rules.focal_grad_coef, (s,), dict(gamma=2.0)),
                (_rules.kl_loss, (kl,), dict(reverse=False)),
                (_rules.row_grad_scale, (), {}),
            ):
                program, _, _ = cuda_rules._trace(rule, _copy(b), spec, stats, options, np)
                out[program.name] = program
    return out


def _trace_all(out, opts, rng):
    """Adds the programs of the loss and of the gradient coefficients for `opts`."""
    for go_rows in (False, True) if spec_none(opts) else (False,):
        b, spec, s = _batch(16, 9, opts, rng, go_rows=go_rows)
        for rule, stats in ((_rules.loss, (s,)), (_rules.grad_coef, ())):
            program, _, _ = cuda_rules._trace(rule, _copy(b), spec, stats, {}, np)
            out[program.name] = program


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_generated_kernels_compile(emu, arch):
    from test_kernels_sass import _sass

    from test_kernels_compile import _nvrtc, compile_module

    nvrtc = _nvrtc()
    programs = _programs(emu)
    assert len(programs) >= 20
    for program in programs.values():
        result, log, _, cubin = compile_module(program.source, [], arch, _cuda.RULE_OPTIONS)
        assert result == nvrtc.nvrtcResult.NVRTC_SUCCESS, f"{program.name}:\n{log}\n{program.source}"
        ops = _sass(cubin)
        assert set(ops) == {program.name}, list(ops)
        counts = ops[program.name]
        local = sum(n for op, n in counts.items() if op.startswith(("STL", "LDL")))
        calls = sum(n for op, n in counts.items() if op.startswith("CALL"))
        # No register spills. The one use of local memory allowed: registers saved around
        # the out-of-line slow path of IEEE double division (a CALL), a few words.
        assert local == 0 or (calls > 0 and local <= 8), (program.name, dict(counts))
