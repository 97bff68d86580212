"""Loss options, validated once into one frozen value, and the one text of each
option that every public docstring uses."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable, TypeVar

REDUCTIONS = ("mean", "sum", "none")

#: The one description of each loss option (and its default), shared by the docstrings
#: of ce_fast and ce_fast.torch.
OPTION_DOCS = {
    "weight": "weight : ``(C,)`` non-negative class weights (default None: all 1).",
    "ignore_index": (
        "ignore_index : rows whose target equals it (default -100) contribute 0, get a zero\n"
        "    gradient and leave the mean (integer targets only)."
    ),
    "reduction": (
        'reduction : ``"mean"`` (default; weighted mean over counted rows), ``"sum"`` or ``"none"``\n'
        "    (per-row losses of shape ``batch``, 0 for ignored rows)."
    ),
    "label_smoothing": (
        "label_smoothing : in ``[0, 1]`` (default 0); mixes the target with the uniform\n"
        "    distribution, using the class weights."
    ),
    "z_loss": "z_loss : coefficient ``z`` of ``z * lse**2`` added per counted row (default 0; PaLM's z-loss).",
    "softcap": "softcap : ``c``; logits become ``c * tanh(logits / c)`` after ``logit_scale`` (default None: off).",
    "logit_scale": "logit_scale : logits are multiplied by it first (default 1).",
}

_F = TypeVar("_F", bound=Callable)


def document_options(*names: str) -> Callable[[_F], _F]:
    """Fills ``{options}`` in the decorated function's docstring with the shared text
    of `names` (all options when none are given), indented as the placeholder is."""

    def deco(fn: _F) -> _F:
        doc = fn.__doc__ or ""
        line = next(ln for ln in doc.splitlines() if "{options}" in ln)
        indent = line[: len(line) - len(line.lstrip())]
        text = "\n".join(OPTION_DOCS[n] for n in (names or OPTION_DOCS))
        fn.__doc__ = doc.replace(line, "\n".join(indent + ln for ln in text.splitlines()))
        return fn

    return deco


def _real(value, name: str) -> float:
    plain = type(value) is float or type(value) is int  # skips the ABC checks (bool is neither)
    if not plain and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return v


@dataclass(frozen=True)
class LossSpec:
    """The options of a cross-entropy call, after validation."""

    ignore_index: int = -100
    reduction: str = "mean"
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None
    logit_scale: float = 1.0

    @classmethod
    def make(
        cls,
        *,
        ignore_index=-100,
        reduction="mean",
        label_smoothing=0.0,
        z_loss=0.0,
        softcap=None,
        logit_scale=1.0,
    ) -> LossSpec:
        if type(ignore_index) is not int and (
            isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral)
        ):
            raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
        if not isinstance(reduction, str):
            raise TypeError(f"reduction must be a str, got {type(reduction).__name__}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        ls = _real(label_smoothing, "label_smoothing")
        if not 0.0 <= ls <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")
        z = _real(z_loss, "z_loss")
        if z < 0.0:
            raise ValueError(f"z_loss must be >= 0, got {z_loss!r}")
        cap = None
        if softcap is not None:
            cap = _real(softcap, "softcap")
            if cap <= 0.0:
                raise ValueError(f"softcap must be > 0 (or None for off), got {softcap!r}")
        scale = _real(logit_scale, "logit_scale")
        return cls(int(ignore_index), reduction, ls, z, cap, scale)

    @property
    def softcap_or_zero(self) -> float:
        """The engines' encoding: 0 means no softcap."""
        return 0.0 if self.softcap is None else self.softcap
