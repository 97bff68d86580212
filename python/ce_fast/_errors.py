"""The exceptions ce_fast raises for bad arguments, built in one place so that every
engine words them the same way."""

from __future__ import annotations

from typing import Any

import numpy as np


def device_mismatch(logits_device: str, name: str, other_device: str) -> ValueError:
    return ValueError(
        f"logits are on {logits_device} but {name} is on {other_device}; "
        "ce_fast never copies between devices, move one of them first"
    )


def first_out_of_range(t: Any, C: int, ignore_index: int, xp: Any) -> tuple[tuple, int] | None:
    """Position and value of the first target outside [0, C) that is not ignore_index, or None."""
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
