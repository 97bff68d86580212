"""Every error case of API.md: exact exception type and a clear message."""

from __future__ import annotations

import re

import ml_dtypes
import numpy as np
import pytest
import torch

import ce_fast

Z = np.zeros((4, 5), dtype=np.float32)
Y = np.array([0, 1, 2, 3])


def esc(s: str) -> str:
    return re.escape(s)


# ---------------------------------------------------------------- logits: dtype, rank, classes

BAD_LOGIT_DTYPES = [np.int64, np.int32, np.uint8, np.complex64, np.complex128, np.bool_, np.longdouble]


@pytest.mark.parametrize("dt", BAD_LOGIT_DTYPES, ids=lambda d: np.dtype(d).name)
def test_unsupported_logits_dtype_is_type_error(dt):
    z = np.zeros((4, 5), dtype=dt)
    name = np.dtype(dt).name
    with pytest.raises(
        TypeError, match=rf"logits dtype {name} is not supported.*float32, float64, float16 or bfloat16"
    ):
        ce_fast.cross_entropy(z, Y)
    with pytest.raises(TypeError, match=rf"logits dtype {name} is not supported"):
        ce_fast.logsumexp(z)
    with pytest.raises(TypeError, match=rf"logits dtype {name} is not supported"):
        ce_fast.cross_entropy_and_grad(z, Y)
    with pytest.raises(TypeError, match=rf"logits dtype {name} is not supported"):
        ce_fast.perplexity(z, Y)


@pytest.mark.parametrize("t", [torch.int64, torch.int32, torch.complex64, torch.bool])
def test_unsupported_torch_logits_dtype_is_type_error(t):
    z = torch.zeros(4, 5, dtype=t)
    with pytest.raises(TypeError, match=r"logits dtype \w+ is not supported"):
        ce_fast.cross_entropy(z, torch.from_numpy(Y))
    with pytest.raises(TypeError, match=r"logits dtype \w+ is not supported"):
        ce_fast.logsumexp(z)


def test_non_numeric_logits_are_type_errors():
    with pytest.raises(TypeError, match=r"logits dtype <U3 is not supported"):
        ce_fast.logsumexp(np.array(["abc", "def"]))
    with pytest.raises(TypeError, match=r"logits must be (an|a numeric) array"):
        ce_fast.logsumexp(np.array([object(), object()], dtype=object))
    with pytest.raises(TypeError, match=r"logits must be an array"):
        ce_fast.cross_entropy([[1.0, 2.0], [3.0]], [0, 1])  # ragged


@pytest.mark.parametrize("z", [np.float32(3.0), np.array(2.0), 1.5], ids=["np-scalar", "0d", "python-float"])
def test_zero_dim_logits_is_value_error(z):
    with pytest.raises(ValueError, match=r"logits must have at least one dimension"):
        ce_fast.logsumexp(z)
    with pytest.raises(ValueError, match=r"logits must have at least one dimension"):
        ce_fast.cross_entropy(z, np.array(0))


@pytest.mark.parametrize("shape", [(4, 0), (0,), (2, 3, 0), (0, 0)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, ml_dtypes.bfloat16])
def test_zero_classes_is_value_error(shape, dtype):
    z = np.zeros(shape, dtype=dtype)
    with pytest.raises(ValueError, match=rf"logits have zero classes: shape {esc(str(shape))}"):
        ce_fast.logsumexp(z)
    with pytest.raises(ValueError, match=r"zero classes"):
        ce_fast.cross_entropy(z, np.zeros(shape[:-1], dtype=np.int64))
    with pytest.raises(ValueError, match=r"zero classes"):
        ce_fast.cross_entropy(z, np.zeros(shape, dtype=np.float32))
    with pytest.raises(ValueError, match=r"zero classes"):
        ce_fast.cross_entropy_and_grad(z, np.zeros(shape[:-1], dtype=np.int64))


def test_zero_classes_torch():
    with pytest.raises(ValueError, match=r"zero classes"):
        ce_fast.cross_entropy(torch.zeros(3, 0), torch.zeros(3, dtype=torch.long))


def test_unsupported_device_is_value_error():
    z = torch.empty(3, 4, device="meta")
    with pytest.raises(ValueError, match=r"logits is on device meta"):
        ce_fast.logsumexp(z)


# ---------------------------------------------------------------- target: dtype and shape


@pytest.mark.parametrize("dt", [np.bool_, np.complex64, np.complex128], ids=lambda d: np.dtype(d).name)
def test_unsupported_target_dtype_is_type_error(dt):
    name = np.dtype(dt).name
    with pytest.raises(TypeError, match=rf"target dtype {name} is not supported.*integer dtype"):
        ce_fast.cross_entropy(Z, np.zeros(4, dtype=dt))
    with pytest.raises(TypeError, match=rf"target dtype {name} is not supported"):
        ce_fast.perplexity(Z, np.zeros(4, dtype=dt))


def test_torch_bool_target_is_type_error():
    with pytest.raises(TypeError, match=r"target dtype bool is not supported"):
        ce_fast.cross_entropy(torch.zeros(4, 5), torch.zeros(4, dtype=torch.bool))


def test_soft_target_of_unsupported_float_dtype_is_type_error():
    with pytest.raises(
        TypeError, match=r"soft target dtype float128 is not supported.*float32, float64, float16 or bfloat16"
    ):
        ce_fast.cross_entropy(Z, np.zeros((4, 5), dtype=np.longdouble))


@pytest.mark.parametrize(
    "target,shape_text",
    [
        (np.zeros(3, dtype=np.int64), "(3,)"),
        (np.zeros((4, 1), dtype=np.int64), "(4, 1)"),
        (np.zeros((1, 4), dtype=np.int32), "(1, 4)"),
        (np.array(1), "()"),
        (np.zeros((4, 5), dtype=np.int64), "(4, 5)"),
    ],
    ids=["short", "column", "row", "0d", "logits-shaped-int"],
)
def test_integer_target_of_wrong_shape_is_value_error(target, shape_text):
    msg = rf"target shape {esc(shape_text)} does not match logits shape \(4, 5\): expected \(4,\)"
    with pytest.raises(ValueError, match=msg):
        ce_fast.cross_entropy(Z, target)
    with pytest.raises(ValueError, match=msg):
        ce_fast.cross_entropy_and_grad(Z, target)
    with pytest.raises(ValueError, match=msg):
        ce_fast.perplexity(Z, target)


def test_target_shape_error_3d_and_1d():
    z = np.zeros((2, 3, 7), dtype=np.float32)
    with pytest.raises(
        ValueError, match=r"target shape \(3, 2\) does not match logits shape \(2, 3, 7\): expected \(2, 3\)"
    ):
        ce_fast.cross_entropy(z, np.zeros((3, 2), dtype=np.int64))
    with pytest.raises(ValueError, match=r"target shape \(1,\) does not match logits shape \(7,\): expected \(\)"):
        ce_fast.cross_entropy(np.zeros(7, dtype=np.float32), np.array([1]))


@pytest.mark.parametrize(
    "soft_dtype", [np.float16, np.float32, np.float64, ml_dtypes.bfloat16], ids=["f16", "f32", "f64", "bf16"]
)
@pytest.mark.parametrize("shape", [(4,), (4, 4), (4, 6), (1, 4, 5), (5, 4)])
def test_soft_target_of_wrong_shape_is_value_error(soft_dtype, shape):
    """A floating target is a probability array: it must have the logits' shape; the
    message quotes both shapes and the class-index alternative."""
    t = np.zeros(shape, dtype=soft_dtype)
    msg = rf"soft \(probability\) target must have the logits' shape \(4, 5\), got {esc(str(shape))}.*\(4,\)"
    with pytest.raises(ValueError, match=msg):
        ce_fast.cross_entropy(Z, t)


def test_soft_target_of_wrong_shape_torch():
    with pytest.raises(
        ValueError, match=r"soft \(probability\) target must have the logits' shape \(4, 5\), got \(4,\)"
    ):
        ce_fast.cross_entropy(torch.zeros(4, 5), torch.zeros(4, dtype=torch.float16))


# ---------------------------------------------------------------- target values


@pytest.mark.parametrize(
    "target,value,pos",
    [
        ([0, 1, 5, 3], 5, "(2,)"),
        ([0, 1, 2, 99], 99, "(3,)"),
        ([-1, 1, 2, 3], -1, "(0,)"),
        ([0, -100, 2, -7], -7, "(3,)"),
        ([0, 1, 2, 2**40], 2**40, "(3,)"),
    ],
)
@pytest.mark.parametrize("tdtype", [np.int64, np.int32])
def test_target_out_of_range_is_index_error(target, value, pos, tdtype):
    if np.dtype(tdtype) == np.int32 and abs(value) > 2**31:
        value, target = 2**30, [0, 1, 2, 2**30]
    t = np.array(target, dtype=tdtype)
    msg = rf"target value {value} at position {esc(pos)} is out of range for 5 classes"
    for fn in (ce_fast.cross_entropy, ce_fast.cross_entropy_and_grad, ce_fast.perplexity, ce_fast.bits_per_token):
        with pytest.raises(IndexError, match=msg):
            fn(Z, t)


def test_target_out_of_range_reports_first_bad_position_nd():
    z = np.zeros((2, 3, 4), dtype=np.float32)
    y = np.zeros((2, 3), dtype=np.int64)
    y[1, 2] = 4
    y[1, 1] = -3
    with pytest.raises(IndexError, match=r"target value -3 at position \(1, 1\) is out of range for 4 classes"):
        ce_fast.cross_entropy(z, y)
    with pytest.raises(IndexError, match=r"target value 9 at position \(\) is out of range for 4 classes"):
        ce_fast.cross_entropy(np.zeros(4, dtype=np.float32), np.array(9))


def test_target_out_of_range_unsigned_and_torch():
    with pytest.raises(IndexError, match=r"target value 18446744073709551615 at position \(1,\)"):
        ce_fast.cross_entropy(Z[:2], np.array([0, 2**64 - 1], dtype=np.uint64))
    with pytest.raises(IndexError, match=r"target value 200 at position \(3,\)"):
        ce_fast.cross_entropy(Z, np.array([0, 1, 2, 200], dtype=np.uint8))
    with pytest.raises(IndexError, match=r"target value 5 at position \(0, 1\)"):
        ce_fast.cross_entropy(torch.zeros(2, 2, 5), torch.tensor([[0, 5], [1, 1]]))


def test_default_ignore_index_is_out_of_range_when_another_is_chosen():
    y = np.array([0, -100, 2, 3])
    assert np.isfinite(ce_fast.cross_entropy(Z, y))  # -100 is the default ignore_index
    with pytest.raises(IndexError, match=r"target value -100 at position \(1,\).*ignore_index=3"):
        ce_fast.cross_entropy(Z, y, ignore_index=3)


def test_target_equal_to_class_count_with_ignore_index_equal_to_it_is_ignored():
    y = np.array([0, 5, 2, 3])
    res = ce_fast.cross_entropy(Z, y, ignore_index=5, reduction="none")
    np.testing.assert_allclose(res, [np.log(5), 0.0, np.log(5), np.log(5)], rtol=1e-6)


# ---------------------------------------------------------------- options


@pytest.mark.parametrize("reduction", ["avg", "MEAN", "", "elementwise_mean", "batchmean"])
def test_unknown_reduction_is_value_error(reduction):
    with pytest.raises(
        ValueError, match=rf"reduction must be one of \('mean', 'sum', 'none'\), got {esc(repr(reduction))}"
    ):
        ce_fast.cross_entropy(Z, Y, reduction=reduction)
    with pytest.raises(ValueError, match=r"reduction must be one of"):
        ce_fast.cross_entropy_and_grad(Z, Y, reduction=reduction)


@pytest.mark.parametrize("ls", [-0.1, 1.0000001, 2.0, -1e-300])
def test_label_smoothing_outside_unit_interval_is_value_error(ls):
    with pytest.raises(ValueError, match=rf"label_smoothing must be in \[0, 1\], got {esc(repr(ls))}"):
        ce_fast.cross_entropy(Z, Y, label_smoothing=ls)
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\]"):
        ce_fast.cross_entropy(Z, np.full((4, 5), 0.2), label_smoothing=ls)


@pytest.mark.parametrize("name", ["label_smoothing", "z_loss", "softcap", "logit_scale"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_options_are_value_errors(name, value):
    with pytest.raises(ValueError, match=rf"{name} must be finite"):
        ce_fast.cross_entropy(Z, Y, **{name: value})


@pytest.mark.parametrize("w,pos,val", [([1.0, 1.0, -1.0, 1.0, 1.0], 2, -1.0), ([-0.5, 1, 1, 1, -2], 0, -0.5)])
def test_negative_weight_is_value_error(w, pos, val):
    with pytest.raises(ValueError, match=rf"weight must be non-negative; weight\[{pos}\] = {esc(str(val))}"):
        ce_fast.cross_entropy(Z, Y, weight=np.array(w))
    with pytest.raises(ValueError, match=r"weight must be non-negative"):
        ce_fast.cross_entropy(Z, np.full((4, 5), 0.2), weight=torch.tensor(w))


@pytest.mark.parametrize(
    "w,shape_text",
    [
        (np.ones(4), "(4,)"),
        (np.ones(6), "(6,)"),
        (np.ones((1, 5)), "(1, 5)"),
        (np.array(1.0), "()"),
        (np.ones(0), "(0,)"),
    ],
)
def test_weight_of_wrong_length_is_value_error(w, shape_text):
    msg = rf"weight must have shape \(5,\) \(one per class\), got {esc(shape_text)}"
    with pytest.raises(ValueError, match=msg):
        ce_fast.cross_entropy(Z, Y, weight=w)
    with pytest.raises(ValueError, match=msg):
        ce_fast.cross_entropy_and_grad(Z, Y, weight=w)


def test_non_finite_weight_is_value_error():
    for bad in (np.nan, np.inf):
        with pytest.raises(ValueError, match=r"weight must be finite"):
            ce_fast.cross_entropy(Z, Y, weight=np.array([1.0, bad, 1.0, 1.0, 1.0]))


@pytest.mark.parametrize("cap", [0.0, -1.0, -1e-9, 0])
def test_non_positive_softcap_is_value_error(cap):
    with pytest.raises(ValueError, match=rf"softcap must be > 0 \(or None for off\), got {esc(repr(cap))}"):
        ce_fast.cross_entropy(Z, Y, softcap=cap)


@pytest.mark.parametrize("zl", [-1e-6, -1.0])
def test_negative_z_loss_is_value_error(zl):
    with pytest.raises(ValueError, match=rf"z_loss must be >= 0, got {esc(repr(zl))}"):
        ce_fast.cross_entropy(Z, Y, z_loss=zl)


@pytest.mark.parametrize("ii", [0, 3, -1, -101])
def test_ignore_index_with_soft_targets_is_value_error(ii):
    with pytest.raises(ValueError, match=r"ignore_index is not supported with soft \(probability\) targets"):
        ce_fast.cross_entropy(Z, np.full((4, 5), 0.2, dtype=np.float32), ignore_index=ii)


@pytest.mark.parametrize(
    "kw,exc,msg",
    [
        ({"ignore_index": 1.5}, TypeError, r"ignore_index must be an int"),
        ({"ignore_index": True}, TypeError, r"ignore_index must be an int"),
        ({"label_smoothing": "0.1"}, TypeError, r"label_smoothing must be a real number"),
        ({"z_loss": None}, TypeError, r"z_loss must be a real number"),
        ({"logit_scale": "2"}, TypeError, r"logit_scale must be a real number"),
        ({"reduction": 1}, TypeError, r"reduction must be a str"),
    ],
)
def test_option_types(kw, exc, msg):
    with pytest.raises(exc, match=msg):
        ce_fast.cross_entropy(Z, Y, **kw)


def test_perplexity_bad_base_is_value_error():
    with pytest.raises(ValueError, match=r"base must be 'e' or '2', got '10'"):
        ce_fast.perplexity(Z, Y, base="10")
    with pytest.raises(ValueError, match=r"base must be 'e' or '2', got 2"):
        ce_fast.perplexity(Z, Y, base=2)


def test_logsumexp_out_errors():
    z = np.zeros((3, 4), dtype=np.float32)
    with pytest.raises(
        ValueError, match=r"out must have shape \(3,\) \(logits shape \(3, 4\) without its last axis\), got \(4,\)"
    ):
        ce_fast.logsumexp(z, out=np.zeros(4, dtype=np.float32))
    with pytest.raises(TypeError, match=r"out must be float32 or float64, got int64"):
        ce_fast.logsumexp(z, out=np.zeros(3, dtype=np.int64))
    with pytest.raises(TypeError, match=r"out must be float32 or float64, got float16"):
        ce_fast.logsumexp(z, out=np.zeros(3, dtype=np.float16))


def test_set_threads_errors():
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match=r"threads must be an int >= 0"):
            ce_fast.set_threads(bad)
    ce_fast.set_threads(0)
    assert ce_fast.get_threads() >= 1


def test_errors_do_not_modify_inputs():
    z = np.random.default_rng(0).standard_normal((4, 5)).astype(np.float32)
    zc = z.copy()
    with pytest.raises(IndexError):
        ce_fast.cross_entropy_and_grad(z, np.array([0, 1, 2, 7]), out=z)
    with pytest.raises(ValueError):
        ce_fast.cross_entropy_and_grad(z, Y, weight=np.ones(3), out=z)
    np.testing.assert_array_equal(z, zc)
