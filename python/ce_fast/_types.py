"""Types shared by the batch builder, the engines and the loss rules.

Nothing here imports another ce_fast module but :mod:`ce_fast._arrays`, so every
layer can depend on it without a cycle: public functions -> ``_batch`` -> engines ->
per-row :class:`Stats` -> ``_rules``.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from . import _arrays
from ._arrays import Operand


@dataclass
class Stats:
    """Per-row statistics of the transformed logits z, float64 arrays of the engine's
    array module (see :mod:`ce_fast._rules` for how the losses use them)."""

    mx: Any
    ls: Any
    zy: Any = None  # None where not computed
    swz: Any = None
    swtz: Any = None
    swt: Any = None

    @property
    def lse(self) -> Any:
        """log-sum-exp of each row (NaN / +inf / -inf as torch.logsumexp)."""
        return self.mx + self.ls


@dataclass
class KlStats:
    """Per-row statistics of the distillation KL, float64 arrays of the engine's array
    module, all over T: the student's max ``ms`` and log-sum ``ls`` (lse = ms + ls), the
    teacher's ``mt`` and ``lt``, and ``cross = E_r[r - o]``, the expectation under the
    reference distribution (the teacher's, or the student's for the reverse KL) of its
    logits minus the other's."""

    ms: Any
    ls: Any
    mt: Any
    lt: Any
    cross: Any


@dataclass
class GradCoef:
    """``grad_c = g * chain_c * ((a0 + a_lse*lse + a_swt*swt) p_c - d w_c - e w_c t_c - b [c == y])``
    with ``p_c = exp(z_c - lse)``: the rules give the coefficients, engines apply them."""

    a0: Any
    b: Any
    g: Any
    a_lse: float
    a_swt: float
    d: float
    e: float


class Engine(Protocol):
    """What the batch builder, the rules and the public functions need from an engine
    (``ce_fast._engines.cpu`` for host arrays, ``ce_fast._engines.cuda`` for CUDA arrays). Engines are
    modules; each function below is a module-level function."""

    def xp(self) -> Any:
        """The array module results and statistics live in (NumPy or CuPy)."""

    def scope(self, x: Operand) -> AbstractContextManager[Any]:
        """Context of one call on the logits `x` (device and stream)."""

    def apply(self, rule: Any, *args: Any, **options: Any) -> Any:
        """``rule(*args, **options)`` for a rule of :mod:`ce_fast._rules` taking (batch,
        spec, statistics...), run where the statistics are (the GPU engine traces it into
        one kernel)."""

    def capturing(self) -> bool:
        """Whether the current stream is capturing a CUDA graph (then nothing may wait for
        the device: value checks that read back are skipped)."""

    def to_float64(self, op: Operand) -> Any:
        """A contiguous float64 copy of `op` in the engine's array module."""

    def settle(self, checks: Any) -> None:
        """Runs pending value checks, each (values in the engine's array module, a function
        raising for their host values), reading them back at once (on a device: one sync;
        none under CUDA-graph capture)."""

    def index_targets(
        self, t: Operand, C: int, ignore_index: int, checked: bool = False, checks: Any = ()
    ) -> tuple[Any, Any]:
        """(int64 indices with -1 for ignored rows, bool mask of counted rows); IndexError
        for a target outside [0, C) that is not ignore_index. `checks` are settled first,
        read back together with the target check. `checked`: an earlier call checked these
        targets (an engine may skip what that costs, e.g. a host sync)."""

    def grad_output(self, value: Any, x: Operand) -> Any:
        """A validated real grad_output as a float64 0-d host array or an engine array."""

    def run(
        self,
        b: Batch,
        *,
        scale: float,
        softcap: float,
        want_wz: bool,
        grad: GradCoef | None = None,
        out: Operand | None = None,
        given: Stats | None = None,
    ) -> Stats:
        """Per-row statistics of the batch; with `grad`, the gradient written into `out`."""

    def wrap(self, value: Any, like: Operand) -> Any:
        """An engine array as the library of `like`."""

    def copy_into(self, o: Operand, value: Any) -> None:
        """Copies an engine array into the destination `o`."""

    def empty_like(self, x: Operand) -> Any:
        """A fresh C-contiguous array of `x`'s shape, dtype, library and device."""

    def writable(self, o: Operand) -> bool:
        """Whether `o`'s memory may be written."""


@dataclass
class Batch:
    """One call's validated arguments, ready for an engine."""

    x: Operand
    engine: Engine
    xp: Any  # numpy or cupy
    classes: int
    target: Any = None  # int64 (rows,), -1 for ignored rows; None for soft targets
    soft: Operand | None = None
    weight: Any = None  # float64 (C,) or None
    alpha: Any = None  # float64 (C,): the focal loss's class factors (the rules' alpha_y), or None
    valid: Any = None  # bool (rows,): rows that count
    wy: Any = None  # float64 (rows,): weight of each row's target, 0 for ignored rows
    weight_total: Any = 0.0  # sum of class weights (C without weights): a float, or 0-d on a device
    grad_output: Any = None  # float64: a 0-d host array, or an engine array of the batch shape
    out: Operand | None = None  # where the gradient (or logsumexp) is written
    result: Any = None  # what the caller gets back for `out`: their array, or a fresh one

    @property
    def rows(self) -> int:
        return self.x.rows

    @property
    def out_dtype(self) -> Any:
        return self.xp.float64 if self.x.code == _arrays.F64 else self.xp.float32
