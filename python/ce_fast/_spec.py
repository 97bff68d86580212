"""Loss options, validated once into one frozen value."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional

REDUCTIONS = ("mean", "sum", "none")


def _real(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
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
    softcap: Optional[float] = None
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
    ) -> "LossSpec":
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
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
