"""The distillation KL pass on the CPU: a thin adapter to ``_core.kl_run`` (rust/engine/kl.rs)."""

from __future__ import annotations

import numpy as np

from .._arrays import Operand
from .._core import kl_run
from .._types import KlStats
from . import cpu


def kl_pass(
    x: Operand,
    teacher: Operand,
    *,
    inv_temp: float,
    reverse: bool,
    g=None,
    out: Operand | None = None,
    given: KlStats | None = None,
) -> KlStats:
    """Per-row KL statistics of the student logits `x` against `teacher`; with `g` (per-row
    gradient factors), the gradient with respect to `x` is written into `out`. With `given`
    statistics (from an earlier call) only the gradient pass runs."""
    rows = x.rows
    if given is not None:
        s = KlStats(
            *(np.ascontiguousarray(a, dtype=np.float64) for a in (given.ms, given.ls, given.mt, given.lt, given.cross))
        )
    else:
        s = KlStats(*(np.empty(rows) for _ in range(5)))
    if rows == 0:
        return s
    gk = None if g is None or out is None else np.ascontiguousarray(g, dtype=np.float64)
    kl_run(
        x,
        teacher,
        float(inv_temp),
        bool(reverse),
        s,
        g=gk,
        out=None if gk is None else out,
        given=given is not None,
        threads=cpu._threads,
    )
    return s
