"""One checked call of an elementwise loss (ce_fast._binary), as the engines receive it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _arrays
from ._arrays import Operand

BCE, FOCAL = 0, 1  # the loss kinds, as the kernels number them


@dataclass
class BinaryCall:
    """One checked call: operands on one device, options, and what to produce."""

    kind: int
    x: Operand
    t: Operand
    w: Operand | None  # broadcastable to x.shape
    pw: Operand | None  # broadcastable to x.shape
    reduction: str
    alpha: float = 0.25
    gamma: float = 2.0
    grad: bool = False
    gscale: float = 1.0  # grad_output (a scalar), divided by the count for "mean"
    gout: Any = None  # grad_output per element (reduction "none"), float64 on x's device
    out: Operand | None = None  # the gradient's destination
    result: Any = None  # what the caller gets as the gradient

    @property
    def size(self) -> int:
        return math.prod(self.x.shape)

    @property
    def out_dtype(self) -> Any:
        return np.float64 if self.x.code == _arrays.F64 else np.float32
