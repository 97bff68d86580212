"""StreamingCrossEntropy, EvalResult and evaluate: values against the float64 oracle,
top-1 from the engine's argmax, exactness under any split and merge tree, state."""

from __future__ import annotations

import json
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ce_fast
from ce_fast import _batch, _rules
from ce_fast._spec import LossSpec
from ce_fast.streaming import EvalResult, StreamingCrossEntropy, evaluate, exact_sum

from conftest import ALL_DTYPES, DTYPE_IDS
from oracle import cross_entropy_ref, f64


def _inputs(rng, shape, C, dtype=np.float32, ignore=0.2):
    x = (rng.standard_normal((*shape, C)) * 3).astype(np.float32).astype(dtype)
    y = rng.integers(0, C, size=shape)
    y[rng.random(shape) < ignore] = -100
    return x, y


def _engine_rows(x, y, ignore_index=-100):
    """The engine's float64 per-row losses of the counted rows (not rounded to float32)."""
    spec = LossSpec.make(ignore_index=ignore_index, reduction="none")
    b = _batch.make_batch(x, y, spec)
    s = b.engine.run(b, scale=1.0, softcap=0.0, want_wz=False)
    return _rules.per_row(b, spec, s)[b.valid]


def _top1(x, y, ignore_index=-100):
    z = f64(x).reshape(-1, x.shape[-1])
    t = np.asarray(y).reshape(-1)
    pred = np.argmax(z, -1)
    ok = (pred == t) & ~np.isnan(z).any(-1) & (t != ignore_index)
    return int(ok.sum())


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("shape,C", [((37,), 11), ((3, 5), 2049), ((2, 3, 4), 300), ((64,), 1)])
def test_evaluate_matches_the_oracle(simd_path, dtype, shape, C):
    rng = np.random.default_rng(C)
    x, y = _inputs(rng, shape, C, dtype)
    r = evaluate(x, y)
    counted = int((y != -100).sum())
    ref = cross_entropy_ref(f64(x), y, reduction="mean")
    assert isinstance(r, EvalResult)
    assert r.tokens == counted
    assert r.loss == pytest.approx(float(ref), rel=2e-6, abs=1e-6)
    assert r.loss_sum == pytest.approx(float(cross_entropy_ref(f64(x), y, reduction="sum")), rel=2e-6, abs=1e-6)
    assert r.perplexity == math.exp(r.loss)
    assert r.bits_per_token == r.loss / math.log(2.0)
    assert r.correct == _top1(x, y)
    assert r.accuracy == r.correct / counted
    # The per-row float64 losses of the engine, summed exactly and rounded once.
    rows = _engine_rows(x, y)
    assert r.loss_sum == math.fsum(rows.tolist())
    assert r.loss == float(sum(Fraction(v) for v in rows.tolist()) / counted)


def test_losses_are_not_rounded_to_float32():
    rng = np.random.default_rng(1)
    x, y = _inputs(rng, (500,), 1000, ignore=0.0)
    r = evaluate(x, y)
    rows = _engine_rows(x, y)
    assert r.loss_sum == math.fsum(rows.tolist())
    assert r.loss_sum != math.fsum(rows.astype(np.float32).astype(np.float64).tolist())


def test_torch_input_and_any_batch_shape():
    rng = np.random.default_rng(2)
    x, y = _inputs(rng, (4, 6), 70)
    a = evaluate(x, y)
    assert evaluate(torch.from_numpy(x), torch.from_numpy(y)) == a
    assert evaluate(torch.from_numpy(x).to(torch.bfloat16), torch.from_numpy(y).to(torch.int32)).tokens == a.tokens
    # Strided (non-contiguous) views give the same numbers as their copies.
    big = np.repeat(x, 2, axis=-1)[..., ::2]
    assert evaluate(big, y) == a
    assert evaluate(x.transpose(1, 0, 2), y.T) == a


def test_argmax_ties_nan_and_infinite_rows(simd_path):
    C = 5000  # several chunks of the engine
    x = np.zeros((6, C), np.float32)
    x[0, [7, 4000]] = 3.0  # tie across chunks: the first wins
    x[1, [2100, 2101]] = 3.0  # tie inside a chunk
    x[2, 10] = np.nan  # NaN anywhere: wrong, loss NaN
    x[3, :] = -np.inf  # all -inf: argmax 0 as numpy, loss NaN
    x[4, 4999] = np.inf
    x[5, 0] = 1.0
    y = np.array([7, 2100, 10, 0, 4999, 0])
    acc = StreamingCrossEntropy().update(x[[0, 1, 5]], y[[0, 1, 5]])
    r = acc.result()
    assert (r.tokens, r.correct) == (3, 3)
    r = evaluate(x, y)
    assert (r.tokens, r.correct) == (6, 5)
    assert math.isnan(r.loss) and math.isnan(r.loss_sum) and math.isnan(r.perplexity)
    y2 = np.array([4000, 2101, 10, 1, 0, 1])
    assert evaluate(x, y2).correct == 0


def test_no_tokens_gives_nan():
    x = np.zeros((3, 4), np.float32)
    for r in (
        evaluate(x, np.full(3, -100)),
        evaluate(np.zeros((0, 4), np.float32), np.zeros(0, np.int64)),
        StreamingCrossEntropy().result(),
    ):
        assert r.tokens == 0 and r.correct == 0 and r.loss_sum == 0.0
        assert all(math.isnan(v) for v in (r.loss, r.perplexity, r.bits_per_token, r.accuracy))


def test_eval_result_is_frozen():
    r = evaluate(np.zeros((2, 3), np.float32), np.array([0, 1]))
    with pytest.raises(AttributeError):
        r.loss = 0.0  # type: ignore[misc]
    assert r.loss == math.log(3.0) and r.correct == 1


def test_ignore_index():
    rng = np.random.default_rng(3)
    x, y = _inputs(rng, (40,), 9, ignore=0.0)
    y[::3] = 7
    r = evaluate(x, y, ignore_index=7)
    ref = cross_entropy_ref(f64(x), y, ignore_index=7)
    assert r.tokens == int((y != 7).sum())
    assert r.loss == pytest.approx(float(ref), rel=2e-6)
    assert r.correct == _top1(x, y, ignore_index=7)


# ---------------------------------------------------------------- exactness


def _split_points(draw, n):
    cuts = draw(st.lists(st.integers(0, n), max_size=6))
    return [0, *sorted(cuts), n]


@st.composite
def _splits(draw):
    n = draw(st.integers(1, 60))
    return n, _split_points(draw, n), draw(st.randoms(use_true_random=False))


_RNG = np.random.default_rng(4)
_X, _Y = _inputs(_RNG, (60,), 33)
_X[5] *= 1e4  # losses of very different sizes: float addition would depend on the order
_X[9] *= 1e-3
_WHOLE = {n: evaluate(_X[:n], _Y[:n]) for n in range(61)}


@settings(max_examples=60, deadline=None)
@given(_splits())
def test_any_split_and_merge_tree_is_bitwise_identical(case):
    n, cuts, rnd = case
    parts = [StreamingCrossEntropy().update(_X[a:b], _Y[a:b]) for a, b in zip(cuts, cuts[1:])]
    rnd.shuffle(parts)
    while len(parts) > 1:  # a random binary merge tree
        i = rnd.randrange(len(parts) - 1)
        merged = parts[i].merge(parts[i + 1])
        assert merged is parts[i]
        parts[i : i + 2] = [merged]
    assert parts[0].result() == _WHOLE[n]


@settings(max_examples=40, deadline=None)
@given(_splits())
def test_any_update_order_and_block_size(case):
    n, cuts, rnd = case
    pieces = list(zip(cuts, cuts[1:]))
    rnd.shuffle(pieces)
    acc = StreamingCrossEntropy()
    for a, b in pieces:
        assert acc.update(_X[a:b], _Y[a:b], block_rows=rnd.randint(1, 8)) is acc
    assert acc.result() == _WHOLE[n]
    assert acc.state_dict() == StreamingCrossEntropy().update(_X[:n], _Y[:n]).state_dict()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(allow_nan=False, allow_infinity=False), max_size=30))
def test_exact_sum_is_the_rational_sum(values):
    fixed, nan, pinf, ninf = exact_sum(np.array(values, dtype=np.float64))
    assert Fraction(fixed, 1 << 1074) == sum((Fraction(v) for v in values), Fraction(0))
    assert (nan, pinf, ninf) == (0, 0, 0)


def test_exact_sum_counts_non_finite_values():
    fixed, nan, pinf, ninf = exact_sum(np.array([1.5, np.nan, np.inf, np.inf, -np.inf, 5e-324]))
    assert (fixed, nan, pinf, ninf) == (3 * (1 << 1073) + 1, 1, 2, 1)


# ---------------------------------------------------------------- state


def test_state_dict_round_trip_through_json():
    rng = np.random.default_rng(5)
    x, y = _inputs(rng, (50,), 20)
    a = StreamingCrossEntropy().update(x, y)
    s = json.loads(json.dumps(a.state_dict()))
    b = StreamingCrossEntropy().load_state_dict(s)
    assert b.result() == a.result() and b.state_dict() == a.state_dict()
    assert set(s) >= {"tokens", "correct", "loss_fixed"}
    assert b.reset() is b and b.result().tokens == 0


def test_merge_and_load_errors():
    a = StreamingCrossEntropy()
    with pytest.raises(TypeError, match="can only merge a StreamingCrossEntropy"):
        a.merge({"tokens": 1})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cannot merge accumulators of ignore_index -100 and 0"):
        a.merge(StreamingCrossEntropy(ignore_index=0))
    with pytest.raises(ValueError, match=r"missing keys \['correct'"):
        a.load_state_dict({"ignore_index": -100, "tokens": 1})
    s = a.state_dict()
    with pytest.raises(TypeError, match=r"state\['tokens'\] must be an int, got float"):
        a.load_state_dict({**s, "tokens": 1.0})
    with pytest.raises(ValueError, match="more correct"):
        a.load_state_dict({**s, "correct": 2})
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        StreamingCrossEntropy(ignore_index=1.5)  # type: ignore[arg-type]


def test_bad_inputs():
    x = np.zeros((4, 5), np.float32)
    acc = StreamingCrossEntropy()
    with pytest.raises(ValueError, match=r"target shape \(3,\) does not match logits shape \(4, 5\)"):
        acc.update(x, np.zeros(3, np.int64))
    with pytest.raises(TypeError, match="target must hold integer class indices, got dtype float32"):
        acc.update(x, np.zeros(4, np.float32))
    with pytest.raises(TypeError, match="logits dtype int32 is not supported"):
        acc.update(np.zeros((4, 5), np.int32), np.zeros(4, np.int64))
    with pytest.raises(ValueError, match="block_rows must be a positive int"):
        acc.update(x, np.zeros(4, np.int64), block_rows=0)
    # The position is the one in the whole target, whatever the block; nothing is added.
    y = np.zeros((2, 2), np.int64)
    y[1, 1] = 5
    with pytest.raises(IndexError, match=r"target value 5 at position \(1, 1\) is out of range for 5 classes"):
        acc.update(x.reshape(2, 2, 5), y, block_rows=1)
    assert acc.result().tokens == 0


def test_public_exports():
    assert ce_fast.StreamingCrossEntropy is StreamingCrossEntropy
    assert ce_fast.evaluate is evaluate and ce_fast.EvalResult is EvalResult
