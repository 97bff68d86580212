"""Cross-entropy over logits split along the class axis: per-shard statistics and
their exact combination, written once for torch.distributed and Dask.

A shard holds the columns ``[start, start + width)`` of every row. The engine gives
its per-row statistics (max ``mx``, ``ls = log sum exp(z - mx)``, the target logit
where the target falls in the shard, ``swz = sum (z - mx)`` for label smoothing). A
*partial* is the same numbers in a form that combines associatively:

- ``m``   the row max, NaN replaced by +inf (so a max-reduction needs no NaN rule)
- ``s``   ``sum exp(z - m)``: NaN for a row holding NaN, 0 for a row of only -inf
- ``zy``  the target logit (0 where the target is in another shard)
- ``swz`` ``sum (z - m)`` (0 without smoothing)
- ``width`` the number of columns the partial covers

Two partials rescale to their common max ``M = max(m1, m2)`` and add; after the last
one, :func:`finish` gives the statistics of the whole row as the engine would (NaN
max for a row holding NaN, log-sum 0 for a non-finite max), so the loss rules and the
gradient pass take them unchanged. All arithmetic is float64; ``xp`` is NumPy, CuPy
or torch (the functions below use only what the three share).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from . import _api, _arrays, _batch, _rules
from ._spec import LossSpec
from ._types import Batch, Stats

#: The options a class-split cross-entropy takes (those of vocab_parallel_cross_entropy).
SPLIT_OPTIONS = ("ignore_index", "label_smoothing", "z_loss", "reduction")

_INF = math.inf


def check_split_options(options: dict) -> None:
    """ValueError for an option a class-split cross-entropy cannot take."""
    for name in ("weight", "softcap"):
        if options.get(name) is not None:
            raise ValueError(
                f"{name} is not supported when the class axis is split (supported: {', '.join(SPLIT_OPTIONS)})"
            )
    if options.get("logit_scale", 1.0) != 1.0:
        raise ValueError(
            f"logit_scale is not supported when the class axis is split (supported: {', '.join(SPLIT_OPTIONS)})"
        )
    unknown = sorted(set(options) - set(SPLIT_OPTIONS) - {"weight", "softcap", "logit_scale"})
    if unknown:
        raise TypeError(f"unexpected option(s) {', '.join(unknown)}; supported: {', '.join(SPLIT_OPTIONS)}")


def soft_target_error() -> ValueError:
    return ValueError(
        "soft (probability) targets are not supported when the class axis is split; "
        "pass integer class indices of the full vocabulary"
    )


def local_spec(spec: LossSpec) -> LossSpec:
    """The spec a shard's engine call runs with: -1 marks rows whose target is elsewhere."""
    return dataclasses.replace(spec, ignore_index=-1, reduction="none")


def local_target(target: Any, start: int, width: int, ignore_index: int) -> Any:
    """int64 indices into the shard, -1 where the row is ignored or its target lies in
    another shard (same library as `target`, flattened)."""
    t = target.reshape(-1)
    # int64 before any arithmetic: unsigned or narrow targets would wrap
    t = t.astype("int64") if hasattr(t, "astype") else t.long()  # NumPy / CuPy, torch
    inside = (t != ignore_index) & (t >= start) & (t < start + width)
    return (t - start) * inside + (-1) * ~inside


def shard_stats(shard: Any, local: Any, spec: LossSpec, argmax: Any = None) -> tuple[Batch, Stats]:
    """The shard's batch and the engine's per-row statistics of it (integer `local`
    targets, -1 for none); `argmax` receives each row's first maximum in the shard."""
    ls = local_spec(spec)
    b = _batch.make_batch(shard, local.reshape(shard.shape[:-1]), ls)
    return b, _api._stats(b, ls, argmax=argmax)


def shard_grad_batch(shard: Any, local: Any, spec: LossSpec, grad_output: Any) -> Batch:
    """The shard's batch for its gradient pass."""
    return _batch.make_batch(shard, local.reshape(shard.shape[:-1]), local_spec(spec), grad_output=grad_output)


def partial(s: Stats, width: int, xp: Any) -> tuple:
    """(m, s, zy, swz) of one shard's statistics (see the module docstring)."""
    mx = s.mx
    nan = xp.isnan(mx)
    m = xp.where(nan, _INF, mx)
    finite = xp.isfinite(mx)
    safe_ls = xp.where(finite, s.ls, 0.0)
    sm = xp.where(finite, xp.exp(safe_ls), xp.where(mx == -_INF, 0.0, 1.0))
    sm = xp.where(nan, math.nan, sm)
    swz = s.swz if s.swz is not None else 0.0 * mx
    swz = xp.where(finite | (mx == -_INF), swz, 0.0)
    return m, sm, s.zy, swz


def rescale(p: tuple, width: Any, big_m: Any, xp: Any) -> tuple:
    """(s, zy, swz) of partial `p` relative to the max `big_m` >= its own."""
    m, sm, zy, swz = p
    mf = xp.where(xp.isfinite(big_m), big_m, 0.0)
    low = m == -_INF
    shift = xp.where(low, 0.0, m - mf)
    s2 = xp.where(low, 0.0 * sm, sm * xp.exp(shift))
    swz2 = xp.where(low, swz, swz + width * shift)
    return s2, zy, swz2


def combine(p1: tuple, w1: Any, p2: tuple, w2: Any, xp: Any) -> tuple:
    """The partial of two partials of the same rows covering disjoint columns."""
    big_m = xp.maximum(p1[0], p2[0])
    a = rescale(p1, w1, big_m, xp)
    b = rescale(p2, w2, big_m, xp)
    return big_m, a[0] + b[0], a[1] + b[1], a[2] + b[2]


def finish(big_m: Any, s: Any, zy: Any, swz: Any, xp: Any) -> Stats:
    """Whole-row statistics, as the engine reports them, from a combined partial."""
    mx = xp.where(xp.isnan(s), math.nan, big_m)
    finite = xp.isfinite(mx)
    ls = xp.where(finite, xp.log(xp.where(finite, s, 1.0)), 0.0)
    return Stats(mx=mx, ls=ls, zy=zy, swz=swz)


def global_batch(b: Batch, classes: int, valid: Any) -> Batch:
    """A shard's batch seen as the whole row by the loss rules: `classes` columns, the
    rows counted by the full-vocabulary targets (no class weights)."""
    xp = b.xp
    return dataclasses.replace(
        b,
        classes=classes,
        valid=valid,
        wy=valid.astype(xp.float64),
        weight_total=float(classes),
    )


def loss_rows(b: Batch, spec: LossSpec, s: Stats) -> Any:
    """float64 loss of every row from whole-row statistics (0 for ignored rows)."""
    return _rules.per_row(b, spec, s)


def reduce(b: Batch, spec: LossSpec, rows: Any) -> Any:
    return _rules.reduce(b, spec, rows)


def gradient(b: Batch, spec: LossSpec, classes: int, valid: Any, whole: Stats) -> Any:
    """The shard's gradient from whole-row statistics (one read and one write of the
    shard); `b` is the shard's batch built with grad_output."""
    coef = _rules.grad_coef(global_batch(b, classes, valid), spec)
    b.engine.run(b, scale=1.0, softcap=0.0, want_wz=False, grad=coef, out=b.out, given=whole)
    _arrays.mark_written(b.out)
    return b.result
