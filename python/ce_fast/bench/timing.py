"""Timing and memory probes: wall-clock samples of a callable, and the peak resident
memory growth of its first call.

Peak memory: on Linux the high-water mark is reset by writing ``5`` to
``/proc/self/clear_refs`` and ``VmHWM`` is read after the call; without that, the
growth of ``getrusage().ru_maxrss`` is used, which only sees growth above the
process's earlier peak (a lower bound).
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


@dataclass
class Timing:
    """Wall-clock samples of one callable."""

    times_s: list[float]
    warmup: int
    single_run: bool = False  # a slow baseline timed once, without warm-up
    peak_rss_bytes: int | None = None  # peak memory growth of the first call

    @property
    def best_s(self) -> float:
        """The fastest sample."""
        return min(self.times_s)

    @property
    def median_s(self) -> float:
        """The median sample."""
        return statistics.median(self.times_s)

    def to_json(self) -> dict:
        """The samples and their summary as a JSON-ready dict."""
        return {
            "times_s": self.times_s,
            "best_s": self.best_s,
            "median_s": self.median_s,
            "repeat": len(self.times_s),
            "warmup": self.warmup,
            "single_run": self.single_run,
            "peak_rss_bytes": self.peak_rss_bytes,
        }


class MemoryProbe(Protocol):
    """Measures the peak memory growth between :meth:`reset` and :meth:`peak_growth`."""

    @property
    def description(self) -> str:
        """How the peak is measured, for the report."""
        ...

    def reset(self) -> None:
        """Starts a measurement at the current memory use."""
        ...

    def peak_growth(self) -> int | None:
        """Bytes the peak grew by since :meth:`reset` (``None`` when not measured)."""
        ...


def _keep_all(result: Any) -> Any:
    return result


class Timer:
    """Times callables; ``sync`` is called before starting and before stopping the
    clock (a no-op on the CPU, a device synchronisation on a GPU backend)."""

    def __init__(self, sync: Callable[[], None], memory: MemoryProbe):
        self.sync = sync
        self.memory = memory

    def _once(self, fn: Callable[[], Any], setup: Callable[[], None] | None) -> tuple[float, Any]:
        """One sample: ``setup`` (untimed), then the seconds ``fn`` took and its result."""
        if setup is not None:
            setup()
        self.sync()
        t0 = time.perf_counter()
        out = fn()
        self.sync()
        return time.perf_counter() - t0, out

    def time(
        self,
        fn: Callable[[], Any],
        repeat: int,
        warmup: int = 1,
        setup: Callable[[], None] | None = None,
        slow_s: float | None = None,
        keep: Callable[[Any], Any] = _keep_all,
    ) -> tuple[Timing, Any]:
        """Runs ``fn`` ``warmup + repeat`` times; returns the timing and ``keep`` of the
        first result (results are dropped after the clock stops, so freeing them is not timed).

        ``setup`` runs untimed before every call. The first call is the measured one for
        peak memory. With ``slow_s``, a first call slower than ``slow_s`` seconds is the
        only sample (``single_run``).
        """
        if setup is not None:
            setup()
        self.sync()
        self.memory.reset()
        try:
            t_first, first = self._once(fn, None)
        finally:
            peak = self.memory.peak_growth()
        first = keep(first)
        if slow_s is not None and t_first > slow_s:
            return Timing([t_first], warmup=0, single_run=True, peak_rss_bytes=peak), first
        times: list[float] = []
        if warmup <= 0:
            times.append(t_first)
        for _ in range(max(warmup - 1, 0)):
            self._once(fn, setup)
        while len(times) < repeat:
            times.append(self._once(fn, setup)[0])  # the result is dropped here, untimed
        return Timing(times, warmup=max(warmup, 0), peak_rss_bytes=peak), first


# ---------------------------------------------------------------------------
# host memory


def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) if sys.platform == "darwin" else int(r) * 1024  # bytes on macOS, KiB on Linux


def _clear_refs() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak resident-set growth of a call, measured as well as the OS allows
    (``method``: ``"vmhwm"``, ``"ru_maxrss"`` or ``"none"``)."""

    def __init__(self, method: str | None = None):
        self.method = method or self._detect()
        self._base = 0

    @staticmethod
    def _detect() -> str:
        if _status_kb("VmHWM") is not None and _status_kb("VmRSS") is not None and _clear_refs():
            # Check that the reset really lowers the mark to the current RSS.
            big = np.ones(8 << 20, dtype=np.uint8)  # 8 MiB, touched
            del big
            if _clear_refs():
                hwm, rss = _status_kb("VmHWM"), _status_kb("VmRSS")
                if hwm is not None and rss is not None and hwm - rss < 4096:
                    return "vmhwm"
        try:
            _maxrss_bytes()
            return "ru_maxrss"
        except Exception:  # pragma: no cover - no resource accounting at all
            return "none"

    @property
    def description(self) -> str:
        """How the peak is measured, for the report."""
        return {
            "vmhwm": "VmHWM after resetting it via /proc/self/clear_refs (exact peak growth of the call)",
            "ru_maxrss": "growth of getrusage ru_maxrss (lower bound: only growth above the process's earlier peak)",
            "none": "not measured",
        }[self.method]

    def reset(self) -> None:
        """Starts a measurement at the current memory use."""
        if self.method == "vmhwm":
            _clear_refs()
            self._base = (_status_kb("VmRSS") or 0) * 1024
        elif self.method == "ru_maxrss":
            self._base = _maxrss_bytes()

    def peak_growth(self) -> int | None:
        """Bytes the peak grew by since :meth:`reset` (``None`` when not measured)."""
        if self.method == "vmhwm":
            return max(0, (_status_kb("VmHWM") or 0) * 1024 - self._base)
        if self.method == "ru_maxrss":
            return max(0, _maxrss_bytes() - self._base)
        return None


class NoMemory(PeakMemory):
    """A probe that measures nothing (for stand-in devices and tests)."""

    def __init__(self) -> None:
        self.method = "none"
        self._base = 0


def mem_available() -> int | None:
    """Bytes of host memory available for new allocations (``MemAvailable``), or
    ``None`` where the OS does not say."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None
