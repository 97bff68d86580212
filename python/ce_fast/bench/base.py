"""What every benchmark backend provides, and the small helpers their case runners share."""

from __future__ import annotations

import math
import sys
from typing import Any, Protocol

from .config import Config, Shape
from .timing import MemoryProbe, Timer


class DeviceUnavailable(RuntimeError):
    """The requested device cannot be benched here (``ce-fast`` exits with code 3)."""


class Backend(Protocol):
    """One device's benchmark: its timer and memory probe, what it reports about the
    machine, and the measurement of one logits shape and dtype."""

    name: str
    threads: int | None
    memory: MemoryProbe
    timer: Timer

    def info(self) -> dict:
        """Machine facts this backend adds to the results' ``machine``."""
        ...

    def bench_case(self, shape: Shape, dtype: str, cfg: Config, torch_mod: Any, quiet: bool) -> dict:
        """Times everything ``cfg`` asks for on one shape and dtype; returns the case record
        (``shape``, ``dtype``, ``rows``, ``classes``, ``bytes``, ``yardsticks``, ``ops``, ``notes``)."""
        ...


def say(quiet: bool, *msg: object) -> None:
    """A progress message on stderr unless ``quiet``."""
    if not quiet:
        print(*msg, file=sys.stderr, flush=True)


def rel_diff(a: float | None, b: float | None) -> float | None:
    """``|a - b| / |b|``, or ``None`` when either is missing or not finite."""
    if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)):
        return None
    return abs(a - b) / max(abs(b), 1e-30)


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``, or ``None`` when either is missing or not finite, or ``b <= 0``."""
    if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)) or b <= 0:
        return None
    return a / b


def first_loss(result: Any) -> float:
    """The loss of a ``(loss, gradient)`` result as a float (``keep`` for the timer)."""
    return float(result[0])


def new_case(shape: Shape, dtype: str, nbytes: int, **extra: Any) -> dict:
    """An empty case record for ``shape`` and ``dtype`` of ``nbytes`` logits bytes."""
    rows = 1
    for d in shape[:-1]:
        rows *= int(d)
    case: dict[str, Any] = {
        "shape": list(shape),
        "dtype": dtype,
        "rows": rows,
        "classes": int(shape[-1]),
        "bytes": int(nbytes),
    }
    case.update(extra)
    case.update({"yardsticks": {}, "ops": {}, "notes": []})
    return case
