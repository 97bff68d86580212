"""Cross-entropy on Dask arrays: lazy, chunk by chunk, on any Dask scheduler (the
distributed one included). Needs the optional extra: ``pip install 'ce_fast[dask]'``.

``logits`` is a Dask array ``(*batch, C)`` (class axis last) chunked along the rows
and/or the class axis; ``target`` a Dask (or NumPy) array of the batch shape.

- **Rows only** (one chunk along the class axis): each chunk runs the ce_fast engine
  on its rows and gives float64 per-row losses; every option of
  :func:`ce_fast.cross_entropy` works (class weights, soft targets, softcap, ...).
- **Class axis split**: each chunk gives a few per-row statistics of its columns
  (max, log-sum relative to it, the target logit where the target falls in the chunk,
  the smoothing sum); a tree reduction (``da.reduction``) combines them exactly, as
  :func:`ce_fast.torch.vocab_parallel_cross_entropy` combines its shards. Logits are
  never concatenated into full rows. The options are those of
  ``vocab_parallel_cross_entropy``: ``ignore_index``, ``label_smoothing``, ``z_loss``,
  ``reduction``; class weights and soft targets raise ``ValueError``.

Options are checked when the graph is built; targets out of range raise ``IndexError``
(naming the value and its position in ``target``) when it is computed. The mean and
sum add per-chunk float64 sums, so they may differ from the single-array result in
the last bits; :func:`evaluate` is exact under any chunking.
"""

from __future__ import annotations

import importlib
import math
from typing import Any

import numpy as np

from . import _errors, _rules, _shards
from ._spec import LossSpec
from ._types import Batch

__all__ = ["cross_entropy", "evaluate", "open_npy"]

_SPEC_OPTIONS = ("ignore_index", "reduction", "label_smoothing", "z_loss", "softcap", "logit_scale")
_P = 5  # a partial per row: m, s, zy, swz, width


def _da() -> Any:
    try:
        import dask.array as da
    except ImportError as exc:  # pragma: no cover - the extra is installed with the tests
        raise ImportError("ce_fast.dask needs Dask: pip install 'ce_fast[dask]'") from exc
    return da


def _inputs(logits: Any, target: Any) -> tuple[Any, Any, tuple, int, int]:
    """(logits as (rows, C), target as (rows,) or (rows, C) with the logits' row chunks,
    batch shape, rows, C)."""
    da = _da()
    x = logits if isinstance(logits, da.Array) else da.asarray(logits)
    t = target if isinstance(target, da.Array) else da.asarray(target)
    if x.ndim == 0:
        raise ValueError("logits must have at least one dimension (the class axis, last); got a 0-d array")
    C = int(x.shape[-1])
    if C == 0:
        raise ValueError(f"logits have zero classes: shape {tuple(x.shape)} (the class axis is the last)")
    batch = tuple(int(d) for d in x.shape[:-1])
    rows = math.prod(batch)
    soft = np.dtype(t.dtype).kind == "f"
    if soft and tuple(t.shape) != tuple(x.shape):
        raise ValueError(
            f"soft (probability) target must have the logits' shape {tuple(x.shape)}, got {tuple(t.shape)}; "
            f"class-index targets have shape {batch} and an integer dtype"
        )
    if not soft and np.dtype(t.dtype).kind not in "iu":
        raise TypeError(
            f"target dtype {t.dtype} is not supported; expected an integer dtype "
            "(class indices) or a floating dtype of the logits' shape (probabilities)"
        )
    if not soft and tuple(t.shape) != batch:
        raise ValueError(
            f"target shape {tuple(t.shape)} does not match logits shape {tuple(x.shape)}: expected {batch} "
            "(the class axis is the last axis of logits)"
        )
    x2 = x.reshape(rows, C)
    t2 = t.reshape((rows, C) if soft else (rows,))
    t2 = t2.rechunk({0: x2.chunks[0], 1: x2.chunks[1]} if soft else {0: x2.chunks[0]})
    return x2, t2, batch, rows, C


class _NpyFile:
    """A ``.npy`` file as an array-like Dask reads chunk by chunk: it pickles as its path
    (a NumPy memmap would pickle as all of its data), and each chunk is read through a
    memory map opened where the chunk is computed."""

    def __init__(self, path: str):
        self.path = str(path)
        a = np.load(self.path, mmap_mode="r", allow_pickle=False)
        self.shape, self.dtype, self.ndim = a.shape, a.dtype, a.ndim

    def __getitem__(self, index: Any) -> np.ndarray:
        return np.array(np.load(self.path, mmap_mode="r", allow_pickle=False)[index])


def open_npy(path: str, chunks: Any = "auto") -> Any:
    """A lazy Dask array of the ``.npy`` file at `path`, in `chunks` (as ``da.from_array``).

    Workers read their chunks from the file themselves (a shared filesystem on a real
    cluster); only the path travels in the task graph. Files are data, never code: the
    file is opened with ``allow_pickle=False`` and object arrays raise ``ValueError``.
    """
    return _da().from_array(_NpyFile(path), chunks=chunks)


def _start(block_info: Any, axis: int) -> int:
    """The first index along `axis` of the block of the first input."""
    return int(block_info[0]["array-location"][axis][0])


def cross_entropy(logits: Any, target: Any, **options: Any) -> Any:
    """Lazy :func:`ce_fast.cross_entropy` of a Dask array of logits (class axis last).

    Returns a lazy 0-d Dask array (``mean`` / ``sum``) or the per-row losses of the batch
    shape (``none``): float32 (float64 for float64 logits). See the module docstring for
    chunking and options; ``.compute()`` runs it on the current scheduler.
    """
    da = _da()
    weight = options.pop("weight", None)
    unknown = sorted(set(options) - set(_SPEC_OPTIONS))
    if unknown:
        raise TypeError(f"unexpected option(s) {', '.join(unknown)}; expected weight or {', '.join(_SPEC_OPTIONS)}")
    spec = LossSpec.make(**options)
    x2, t2, batch, rows, C = _inputs(logits, target)
    soft = t2.ndim == 2
    out_dtype = np.float64 if x2.dtype == np.float64 else np.float32
    if len(x2.chunks[1]) > 1:
        _shards.check_split_options(dict(options, weight=weight))
        if soft:
            raise _shards.soft_target_error()
        per = _split_rows(x2, t2, spec, C, batch)
    else:
        w = None if weight is None else np.asarray(weight)
        per = da.map_blocks(
            _rows_block, x2, t2 if soft else t2[:, None],
            chunks=(x2.chunks[0], (2,)), dtype=np.float64, spec=spec, weight=w, batch=batch,
        )  # fmt: skip
    loss, wy = per[:, 0], per[:, 1]
    if spec.reduction == "none":
        return loss.astype(out_dtype).reshape(batch)
    total = loss.sum()
    if spec.reduction == "sum":
        return total.astype(out_dtype)
    den = da.asarray(np.float64(rows)) if soft else wy.sum()
    return da.map_blocks(_mean, total, den, dtype=out_dtype, chunks=(), out_dtype=out_dtype)


def _mean(total: np.ndarray, den: np.ndarray, out_dtype: Any) -> np.ndarray:
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        t, d = float(total), float(den)
        return np.asarray(t / d if d != 0.0 else math.nan, dtype=out_dtype)


def _check_targets(t: np.ndarray, C: int, ignore_index: int, row0: int, batch: tuple) -> None:
    """IndexError naming the first bad target and its position in the whole target array."""
    bad = _errors.first_out_of_range(t, C, ignore_index, np)
    if bad is not None:
        (flat,), value = bad
        pos = tuple(int(i) for i in np.unravel_index(row0 + flat, batch))
        raise _errors.index_error(pos, value, C, ignore_index)


def _rows_block(x: np.ndarray, t: np.ndarray, spec: LossSpec, weight: Any, batch: tuple, block_info: Any = None):
    """(rows, 2): float64 loss and target weight (the mean's share) of each row of a chunk
    holding whole rows."""
    from . import _api, _batch

    if t.shape != x.shape:
        t = t[:, 0]
        _check_targets(t, x.shape[-1], spec.ignore_index, _start(block_info, 0), batch)
    b = _batch.make_batch(x, t, spec, weight)
    s = _api._stats(b, spec)
    out = np.empty((x.shape[0], 2))
    out[:, 0] = _rules.per_row(b, spec, s)
    out[:, 1] = 1.0 if b.soft is not None else _rules.target_weight(b)
    return out


# ------------------------------------------------------------------ class axis split


def _split_rows(x2: Any, t2: Any, spec: LossSpec, C: int, batch: tuple) -> Any:
    """(rows, 2) per-row float64 loss and counted flag, from per-chunk partials combined
    along the class axis by a tree reduction."""
    da = _da()
    t_col = t2[:, None]
    parts = da.map_blocks(
        _partial_block, x2, t_col, new_axis=2, chunks=(x2.chunks[0], (1,) * len(x2.chunks[1]), (_P,)),
        dtype=np.float64, spec=spec,
    )  # fmt: skip
    whole = da.reduction(
        parts,
        chunk=_keep,
        combine=_merge,
        aggregate=_merge_last,
        axis=1,
        dtype=np.float64,
        concatenate=True,
        meta=np.empty((0, 0)),
    )
    return da.map_blocks(
        _finish_block, whole, t_col, chunks=(x2.chunks[0], (2,)), dtype=np.float64, spec=spec, classes=C, batch=batch
    )


def _partial_block(
    x: np.ndarray, t: np.ndarray, spec: LossSpec, block_info: Any = None, argmax: Any = None
) -> np.ndarray:
    """(rows, 1, 5): the partial of one chunk of columns; `argmax` (int64, one per row)
    receives each row's first maximum in the chunk from the same pass."""
    width = x.shape[-1]
    local = _shards.local_target(np.asarray(t)[:, 0], _start(block_info, 1), width, spec.ignore_index)
    # a target outside [0, C) is reported by _finish_block, which sees the whole row
    _, st = _shards.shard_stats(x, local, spec, argmax=argmax)
    with np.errstate(invalid="ignore", over="ignore"):
        m, s, zy, swz = _shards.partial(st, width, np)
    return np.stack([m, s, zy, swz, np.full(m.shape, float(width))], axis=-1)[:, None, :]


def _keep(p: np.ndarray, axis: Any = None, keepdims: bool = True) -> np.ndarray:
    return p


def _merge(p: np.ndarray, axis: Any = None, keepdims: bool = True) -> np.ndarray:
    """(rows, n, 5) partials of disjoint columns -> (rows, 1, 5)."""
    m, s, zy, swz, w = (p[..., k] for k in range(_P))
    with np.errstate(invalid="ignore", over="ignore"):
        big_m = m.max(axis=1, keepdims=True)
        s2, zy2, swz2 = _shards.rescale((m, s, zy, swz), w, big_m, np)
        out = np.stack([big_m[:, 0], s2.sum(1), zy2.sum(1), swz2.sum(1), w.sum(1)], axis=-1)
    return out[:, None, :]


def _merge_last(p: np.ndarray, axis: Any = None, keepdims: bool = False) -> np.ndarray:
    out = _merge(p)
    return out if keepdims else out[:, 0, :]


def _finish_block(
    whole: np.ndarray, t: np.ndarray, spec: LossSpec, classes: int, batch: tuple, block_info: Any = None
) -> np.ndarray:
    """(rows, 2) float64 loss and counted flag from a row block's combined partial."""
    t = np.asarray(t)[:, 0]
    _check_targets(t, classes, spec.ignore_index, _start(block_info, 0), batch)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        st = _shards.finish(whole[:, 0], whole[:, 1], whole[:, 2], whole[:, 3], np)
    valid = t != spec.ignore_index
    b = rules_batch(classes, valid)
    out = np.empty((t.shape[0], 2))
    out[:, 0] = _rules.per_row(b, spec, st)
    out[:, 1] = b.wy
    return out


def rules_batch(classes: int, valid: np.ndarray) -> Batch:
    """What the loss rules read of a batch, for whole rows known only by their statistics."""
    from ._engines import cpu

    b = Batch(x=None, engine=cpu, xp=np, classes=classes)  # type: ignore[arg-type]
    b.valid = valid
    b.wy = valid.astype(np.float64)
    b.weight_total = float(classes)
    return b


# ------------------------------------------------------------------ evaluate


def evaluate(logits: Any, target: Any, *, ignore_index: int = -100) -> Any:
    """:func:`ce_fast.evaluate` of Dask arrays: an :class:`ce_fast.EvalResult` (computed now,
    on the current Dask scheduler).

    With whole rows in every chunk (one chunk along the class axis) each row chunk is
    evaluated by a :class:`ce_fast.StreamingCrossEntropy`, and the chunks' states
    (``state_dict``) are merged in a tree: the result is bitwise identical to
    ``ce_fast.evaluate`` on the whole array, whatever the chunking. With a split class
    axis each chunk gives per-row statistics and its first maximum, combined in a tree
    reduction as in :func:`cross_entropy`; the per-row float64 losses are then summed
    exactly (the combined statistics may differ from a one-pass row in the last bit).
    """
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, np.integer)):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    import dask

    x2, t2, batch, rows, C = _inputs(logits, target)
    if t2.ndim == 2:
        raise ValueError("evaluate takes integer class-index targets, not probabilities")
    ii = int(ignore_index)
    tb = t2.to_delayed()
    if len(x2.chunks[1]) == 1:
        xb = x2.to_delayed()[:, 0]
        starts = np.cumsum((0,) + x2.chunks[0][:-1])
        states = [dask.delayed(_chunk_state)(xi, ti, ii, int(r0), batch) for xi, ti, r0 in zip(xb, tb, starts)]
        (state,) = dask.compute(_tree(states, dask.delayed(_merge_states)))
        return _streaming(ii).load_state_dict(state).result()
    spec = LossSpec.make(ignore_index=ii)
    parts = _da().map_blocks(
        _partial_argmax_block, x2, t2[:, None], new_axis=2,
        chunks=(x2.chunks[0], (1,) * len(x2.chunks[1]), (_P + 1,)), dtype=np.float64, spec=spec,
    )  # fmt: skip
    whole = _da().reduction(
        parts,
        chunk=_keep,
        combine=_merge_argmax,
        aggregate=_merge_argmax_last,
        axis=1,
        dtype=np.float64,
        concatenate=True,
        meta=np.empty((0, 0)),
    )
    wb = whole.to_delayed()[:, 0]
    starts = np.cumsum((0,) + x2.chunks[0][:-1])
    sums = [dask.delayed(_exact_rows)(wi, ti, spec, C, int(r0), batch) for wi, ti, r0 in zip(wb, tb, starts)]
    (total,) = dask.compute(_tree(sums, dask.delayed(_add_sums)))
    return _result(*total)


def _evaluation() -> Any:
    """ce_fast.streaming (StreamingCrossEntropy, EvalResult), imported when evaluate runs."""
    return importlib.import_module(f"{__package__}.streaming")


def _streaming(ignore_index: int) -> Any:
    return _evaluation().StreamingCrossEntropy(ignore_index=ignore_index)


def _chunk_state(x: np.ndarray, t: np.ndarray, ignore_index: int, row0: int, batch: tuple) -> dict:
    """The StreamingCrossEntropy state of one chunk of whole rows."""
    _check_targets(np.asarray(t), x.shape[-1], ignore_index, row0, batch)
    return _streaming(ignore_index).update(x, t).state_dict()


def _merge_states(a: dict, b: dict) -> dict:
    ii = a["ignore_index"]
    return _streaming(ii).load_state_dict(a).merge(_streaming(ii).load_state_dict(b)).state_dict()


def _tree(items: list, pair: Any) -> Any:
    """A balanced binary tree of `pair` over `items` (at least one)."""
    while len(items) > 1:
        items = [pair(items[i], items[i + 1]) if i + 1 < len(items) else items[i] for i in range(0, len(items), 2)]
    return items[0]


def _partial_argmax_block(x: np.ndarray, t: np.ndarray, spec: LossSpec, block_info: Any = None) -> np.ndarray:
    """(rows, 1, 6): the partial of one chunk of columns and its first maximum's column
    (found by the statistics pass itself: the chunk is read once)."""
    first = np.zeros(x.shape[0], dtype=np.int64)
    p = _partial_block(x, t, spec, block_info, argmax=first)
    first += _start(block_info, 1)
    return np.concatenate([p, first.astype(np.float64).reshape(-1, 1, 1)], axis=-1)


def _merge_argmax(p: np.ndarray, axis: Any = None, keepdims: bool = True) -> np.ndarray:
    """(rows, n, 6) -> (rows, 1, 6): statistics combined, and the first column holding the
    row's maximum (the chunks are in column order, each with its own first maximum)."""
    merged = _merge(p[..., :_P])
    m = p[..., 0]
    first_chunk = np.argmax(m == m.max(axis=1, keepdims=True), axis=1)
    col = np.take_along_axis(p[..., _P], first_chunk[:, None], axis=1)
    return np.concatenate([merged, col[:, :, None]], axis=-1)


def _merge_argmax_last(p: np.ndarray, axis: Any = None, keepdims: bool = False) -> np.ndarray:
    out = _merge_argmax(p)
    return out if keepdims else out[:, 0, :]


def _exact_rows(whole: np.ndarray, t: np.ndarray, spec: LossSpec, classes: int, row0: int, batch: tuple) -> tuple:
    """(tokens, correct, exact loss sum * 2**1074, NaN, +inf, -inf counts) of a row block."""
    t = np.asarray(t)
    per = _finish_block(whole[:, :_P], t[:, None], spec, classes, batch, {0: {"array-location": [(row0, None)]}})
    valid = t != spec.ignore_index
    nan_row = np.isnan(whole[:, 1])
    correct = valid & ~nan_row & (whole[:, _P].astype(np.int64) == t)
    loss = per[valid, 0]
    finite = np.isfinite(loss)
    fixed = sum(_fixed(v) for v in loss[finite].tolist())
    return (
        int(valid.sum()),
        int(correct.sum()),
        fixed,
        int(np.isnan(loss).sum()),
        int((loss == np.inf).sum()),
        int((loss == -np.inf).sum()),
    )


def _fixed(v: float) -> int:
    """v * 2**1074 as an exact int (every finite double is a multiple of 2**-1074)."""
    num, den = v.as_integer_ratio()
    return num * ((1 << 1074) // den)


def _add_sums(a: tuple, b: tuple) -> tuple:
    return tuple(x + y for x, y in zip(a, b))


def _result(tokens: int, correct: int, fixed: int, nan: int, posinf: int, neginf: int) -> Any:
    """The EvalResult of exact sums: every float rounded once from the exact value."""
    EvalResult = _evaluation().EvalResult
    if nan or (posinf and neginf):
        loss_sum = math.nan
    elif posinf or neginf:
        loss_sum = math.inf if posinf else -math.inf
    else:
        loss_sum = _div(fixed, 1 << 1074)
    if tokens == 0:
        return EvalResult(math.nan, math.nan, math.nan, math.nan, 0, loss_sum, 0)
    loss = loss_sum if not math.isfinite(loss_sum) else _div(fixed, tokens << 1074)
    try:
        ppl = math.exp(loss)
    except OverflowError:
        ppl = math.inf
    return EvalResult(
        loss=loss,
        perplexity=ppl,
        bits_per_token=loss / math.log(2.0),
        accuracy=correct / tokens,
        tokens=tokens,
        loss_sum=loss_sum,
        correct=correct,
    )


def _div(num: int, den: int) -> float:
    """num / den correctly rounded (Python's int division), inf past float's range."""
    try:
        return num / den
    except OverflowError:
        return math.inf if num > 0 else -math.inf
