"""From user arguments to one engine-ready batch: operands, target indices,
weights and the per-row masks the loss rules need. Shapes, dtypes, devices and
target ranges are checked here, once, for every engine."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from . import _arrays
from ._arrays import Operand
from ._spec import LossSpec


@dataclass
class Batch:
    x: Operand
    engine: Any  # ce_fast._cpu or ce_fast._cuda
    xp: Any  # numpy or cupy
    classes: int
    target: Any = None  # int64 (rows,), -1 for ignored rows; None for soft targets
    soft: Optional[Operand] = None
    weight: Any = None  # float64 (C,) or None
    valid: Any = None  # bool (rows,): rows that count
    wy: Any = None  # float64 (rows,): weight of each row's target, 0 for ignored rows
    weight_total: float = 0.0  # sum of class weights (C without weights)

    @property
    def rows(self) -> int:
        return self.x.rows

    @property
    def out_dtype(self):
        return self.xp.float64 if self.x.code == _arrays.F64 else self.xp.float32


def engine_for(op: Operand):
    if op.is_cuda:
        from . import _cuda

        return _cuda
    from . import _cpu

    return _cpu


def device_scope(logits: Any):
    """Context for one public call on `logits`: for CUDA arrays the engine makes their
    device current and, for torch tensors, torch's current stream CuPy's current stream,
    so every kernel and CuPy operation of the call (rules included) is ordered with
    the caller's torch work. A no-op on the CPU."""
    if isinstance(logits, np.ndarray):
        cuda = False
    elif _arrays.is_torch(logits):
        cuda = logits.device.type == "cuda"
    else:
        cp = _arrays._cupy()
        cuda = (
            (cp is not None and isinstance(logits, cp.ndarray))
            or hasattr(logits, "__cuda_array_interface__")
            or str(_arrays._device_of_dlpack(logits)).startswith("cuda")
        )
    if not cuda:
        return contextlib.nullcontext()
    from . import _cuda

    return _cuda.scope(_arrays.operand(logits, "logits"))


def logits_operand(logits: Any) -> Operand:
    x = _arrays.operand(logits, "logits")
    if x.code is None:
        raise TypeError(f"logits dtype {x.dtype_name} is not supported; expected {_arrays.SUPPORTED}")
    if len(x.shape) == 0:
        raise ValueError("logits must have at least one dimension (the class axis, last); got a 0-d array")
    if x.shape[-1] == 0:
        raise ValueError(f"logits have zero classes: shape {x.shape} (the class axis is the last)")
    if x.is_cuda and x.code == _arrays.F64:
        raise TypeError("float64 logits are supported on the CPU only; use float32, float16 or bfloat16 on the GPU")
    return x


def same_device(x: Operand, other: Operand, name: str) -> None:
    if other.device != x.device:
        raise ValueError(
            f"logits are on {x.device} but {name} is on {other.device}; "
            "ce_fast never copies between devices, move one of them first"
        )


def _kind(op: Operand) -> str:
    """NumPy's dtype kind letter ('f', 'i', 'u', ...) of any operand, torch dtypes included."""
    if op.code is not None:
        return "f"
    try:
        return np.dtype(op.dtype_name).kind
    except TypeError:
        return "?"


def make_batch(logits: Any, target: Any, spec: LossSpec, weight: Any = None) -> Batch:
    x = logits_operand(logits)
    engine = engine_for(x)
    xp = engine.xp()
    C = x.shape[-1]
    t = _arrays.operand(target, "target")
    same_device(x, t, "target")
    b = Batch(x=x, engine=engine, xp=xp, classes=C)

    if weight is not None:
        w = _arrays.operand(weight, "weight")
        same_device(x, w, "weight")
        if len(w.shape) != 1 or w.shape[0] != C:
            raise ValueError(f"weight must have shape ({C},) (one per class), got {w.shape}")
        wa = engine.to_float64(w)
        if not bool(xp.all(xp.isfinite(wa))):
            raise ValueError("weight must be finite")
        if bool(xp.any(wa < 0)):
            bad = int(xp.argmax(wa < 0))
            raise ValueError(f"weight must be non-negative; weight[{bad}] = {float(wa[bad])}")
        b.weight = wa
        b.weight_total = float(wa.sum())
    else:
        b.weight_total = float(C)

    if _kind(t) == "f":
        if t.shape != x.shape:
            raise ValueError(
                f"soft (probability) target must have the logits' shape {x.shape}, got {t.shape}; "
                f"class-index targets have shape {x.shape[:-1]} and an integer dtype"
            )
        if t.code is None:
            raise TypeError(f"soft target dtype {t.dtype_name} is not supported; expected {_arrays.SUPPORTED}")
        if spec.ignore_index != -100:
            raise ValueError("ignore_index is not supported with soft (probability) targets")
        b.soft = t
        b.valid = xp.ones(x.rows, dtype=bool)
        return b

    if _kind(t) not in "iu":
        raise TypeError(
            f"target dtype {t.dtype_name} is not supported; expected an integer dtype "
            "(class indices) or a floating dtype of the logits' shape (probabilities)"
        )
    if t.shape != x.shape[:-1]:
        raise ValueError(
            f"target shape {t.shape} does not match logits shape {x.shape}: expected {x.shape[:-1]} "
            "(the class axis is the last axis of logits)"
        )
    b.target, b.valid = engine.index_targets(t, C, spec.ignore_index)
    if b.weight is not None:
        b.wy = xp.where(b.valid, b.weight[xp.maximum(b.target, 0)], 0.0)
    else:
        b.wy = b.valid.astype(xp.float64)
    return b


def out_of_range(t, C: int, ignore_index: int, xp):
    """Index and value of the first target outside [0, C) that is not ignore_index, or None."""
    bad = (t != ignore_index) & ((t < 0) | (t >= C))
    if not bool(bad.any()):
        return None
    flat = int(xp.argmax(bad.reshape(-1)))
    pos = tuple(int(i) for i in np.unravel_index(flat, t.shape)) if t.ndim else ()
    return pos, int(t.reshape(-1)[flat])


def index_error(pos: tuple, value: int, C: int, ignore_index: int) -> IndexError:
    return IndexError(
        f"target value {value} at position {pos} is out of range for {C} classes "
        f"(expected 0 <= target < {C}, or ignore_index={ignore_index})"
    )
