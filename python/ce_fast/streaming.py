"""Evaluation state: cross-entropy, perplexity and top-1 accuracy over many batches.

:class:`StreamingCrossEntropy` takes batches of logits (class axis last, any batch
shape, NumPy / torch CPU / CUDA / CuPy) one :meth:`~StreamingCrossEntropy.update` at a
time and keeps a few exact numbers: the count of counted rows, of correct top-1
predictions, and the sum of the per-row float64 losses as an exact fixed-point integer
(every finite double is an integer multiple of 2**-1074). Sums of integers do not
depend on their order, so any batching, update order or tree of
:meth:`~StreamingCrossEntropy.merge` / :meth:`~StreamingCrossEntropy.all_reduce` calls
gives a bitwise identical :meth:`~StreamingCrossEntropy.result`, rounded once at the end.

The per-row losses come from the engines' float64 statistics (``(max - z_y) + log sum
exp(z - max)``, :mod:`ce_fast._rules`), and the argmax from the same pass over the
logits. On the GPU the exact sum is kept on the device (kernels/eval.cu), so an update
waits for the device only in the target range check.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _arrays, _batch, _errors, _rules
from ._exact import FIXED_BITS, exact_sum, fold_bins, split_doubles
from ._spec import LossSpec

__all__ = ["EvalResult", "StreamingCrossEntropy", "evaluate", "exact_sum", "fold_bins", "split_doubles"]

#: Logits bytes per row block of a host array (bounded memory for memmaps).
BLOCK_BYTES = 64 << 20
_STATE_KEYS = ("ignore_index", "tokens", "correct", "loss_fixed", "nan", "posinf", "neginf")
_LN2 = math.log(2.0)


@dataclass(frozen=True)
class EvalResult:
    """What an evaluation measured.

    ``loss`` is the mean cross-entropy in nats over the counted rows, ``perplexity`` is
    ``exp(loss)``, ``bits_per_token`` is ``loss / ln 2``, ``accuracy`` the share of
    counted rows whose argmax (first maximum; a row holding NaN is wrong) is the
    target. ``tokens`` and ``correct`` are counts, ``loss_sum`` the summed loss. With no
    counted rows, loss, perplexity, bits_per_token and accuracy are NaN.
    """

    loss: float
    perplexity: float
    bits_per_token: float
    accuracy: float
    tokens: int
    loss_sum: float
    correct: int


def _ratio(num: int, den: int) -> float:
    """num / den correctly rounded (Python's int division), inf past float's range."""
    try:
        return num / den
    except OverflowError:
        return math.inf if (num > 0) == (den > 0) else -math.inf


# ---------------------------------------------------------------- host memory


def _mapped(a: np.ndarray) -> bool:
    """Whether `a` views a shared file mapping whose pages may be dropped after reading
    (np.memmap in mode r / r+; a private copy-on-write mapping would lose writes)."""
    base: Any = a
    while base is not None:
        if isinstance(base, np.memmap):
            return getattr(base, "mode", None) in ("r", "r+", "readonly", "readwrite")
        if isinstance(base, mmap.mmap):
            return False
        base = getattr(base, "base", None)
    return False


_libc: Any = None
_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", 4)


def release_pages(a: np.ndarray) -> None:
    """Drops the whole pages of a file-backed view from this process's resident set (they
    stay in the page cache and are read again if touched): bounded RSS over huge files."""
    global _libc
    if a.size == 0 or not sys.platform.startswith("linux") or not _mapped(a):
        return
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    start = a.__array_interface__["data"][0]
    end = start + a.nbytes
    lo = -(-start // _PAGE) * _PAGE  # pages wholly inside the view only
    hi = end // _PAGE * _PAGE
    if hi > lo:
        _libc.madvise(lo, hi - lo, _MADV_DONTNEED)


def row_blocks(rows: int, block_rows: int) -> Iterator[tuple[int, int]]:
    for start in range(0, rows, block_rows):
        yield start, min(rows, start + block_rows)


def default_block_rows(classes: int, itemsize: int) -> int:
    return max(1, BLOCK_BYTES // max(1, classes * itemsize))


# ---------------------------------------------------------------- the accumulator


def _check_ignore_index(ignore_index: Any) -> int:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, np.integer)):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    return int(ignore_index)


class StreamingCrossEntropy:
    """Mean cross-entropy, perplexity and top-1 accuracy over many batches, exactly.

    ``acc.update(logits, target)`` adds a batch (``(*batch, C)`` logits, class axis last;
    integer ``target`` of shape ``batch``; rows whose target is ``ignore_index`` are left
    out); ``acc.result()`` gives an :class:`EvalResult`. ``update``, ``merge`` and
    ``all_reduce`` return the accumulator, so calls chain.

    The result is bitwise identical whatever the batch boundaries, the order of updates
    and the tree of merges: per-row float64 losses are summed exactly (a fixed-point
    integer), and rounded once in :meth:`result`. The state is a few integers
    (:meth:`state_dict`, JSON-serialisable).

    Host arrays are read in row blocks of about 64 MiB; the pages of an ``np.memmap``
    (mode ``r`` or ``r+``) are released after each block, so files larger than the
    machine's memory work with bounded resident memory. CUDA arrays (torch, CuPy) are
    reduced on their device: an update waits for the device only to check the targets'
    range; :meth:`result`, :meth:`state_dict`, :meth:`merge` and :meth:`all_reduce`
    read the device's partial sums.
    """

    def __init__(self, ignore_index: int = -100):
        self.ignore_index = _check_ignore_index(ignore_index)
        self.reset()

    # -- state

    def reset(self) -> StreamingCrossEntropy:
        """Forgets every update."""
        self._tokens = 0
        self._correct = 0
        self._fixed = 0
        self._nan = self._posinf = self._neginf = 0
        self._device: dict[str, Any] = {}  # device -> on-device partial state (kernels/eval.cu)
        return self

    def _settle(self) -> None:
        """Folds the partial sums kept on CUDA devices into the host state."""
        if not self._device:
            return
        from . import _eval_cuda

        for part in self._device.values():
            tokens, correct, fixed, nan, posinf, neginf = _eval_cuda.fold(part)
            self._tokens += tokens
            self._correct += correct
            self._fixed += fixed
            self._nan += nan
            self._posinf += posinf
            self._neginf += neginf
        self._device = {}

    def state_dict(self) -> dict[str, int]:
        """The whole state as a dict of Python ints (JSON-serialisable); ``loss_fixed`` is
        the exact loss sum times 2**1074."""
        self._settle()
        return {
            "ignore_index": self.ignore_index,
            "tokens": self._tokens,
            "correct": self._correct,
            "loss_fixed": self._fixed,
            "nan": self._nan,
            "posinf": self._posinf,
            "neginf": self._neginf,
        }

    def load_state_dict(self, state: dict[str, Any]) -> StreamingCrossEntropy:
        """Replaces the state with one from :meth:`state_dict` (of this or another process)."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from state_dict(), got {type(state).__name__}")
        missing = [k for k in _STATE_KEYS if k not in state]
        unknown = sorted(set(state) - set(_STATE_KEYS))
        if missing or unknown:
            raise ValueError(f"not a StreamingCrossEntropy state: missing keys {missing}, unknown keys {unknown}")
        vals = {}
        for k in _STATE_KEYS:
            v = state[k]
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise TypeError(f"state[{k!r}] must be an int, got {type(v).__name__}")
            vals[k] = int(v)
        for k in ("tokens", "correct", "nan", "posinf", "neginf"):
            if vals[k] < 0:
                raise ValueError(f"state[{k!r}] must be >= 0, got {vals[k]}")
        if vals["correct"] > vals["tokens"] or vals["nan"] + vals["posinf"] + vals["neginf"] > vals["tokens"]:
            raise ValueError("state counts more correct or non-finite rows than tokens")
        self.reset()
        self.ignore_index = vals["ignore_index"]
        self._tokens, self._correct, self._fixed = vals["tokens"], vals["correct"], vals["loss_fixed"]
        self._nan, self._posinf, self._neginf = vals["nan"], vals["posinf"], vals["neginf"]
        return self

    def merge(self, other: StreamingCrossEntropy) -> StreamingCrossEntropy:
        """Adds the rows `other` has seen to this accumulator (`other` is unchanged)."""
        if not isinstance(other, StreamingCrossEntropy):
            raise TypeError(f"can only merge a StreamingCrossEntropy, got {type(other).__name__}")
        if other.ignore_index != self.ignore_index:
            raise ValueError(f"cannot merge accumulators of ignore_index {self.ignore_index} and {other.ignore_index}")
        s = other.state_dict()
        self._settle()
        self._tokens += s["tokens"]
        self._correct += s["correct"]
        self._fixed += s["loss_fixed"]
        self._nan += s["nan"]
        self._posinf += s["posinf"]
        self._neginf += s["neginf"]
        return self

    def all_reduce(self, group: Any = None) -> StreamingCrossEntropy:
        """Sums the state over a ``torch.distributed`` process group (default: the world):
        afterwards every rank holds the global state. One all-reduce of int64 limbs, on
        the CPU for gloo and on the current CUDA device for NCCL. Every rank must call it."""
        from ._eval_dist import all_reduce_state

        s = self.state_dict()
        total = all_reduce_state([s[k] for k in _STATE_KEYS[1:]], group)
        self._tokens, self._correct, self._fixed, self._nan, self._posinf, self._neginf = total
        return self

    def result(self) -> EvalResult:
        """The mean loss (nats), perplexity, bits per token and accuracy so far."""
        self._settle()
        n = self._tokens
        if self._nan or (self._posinf and self._neginf):
            loss_sum = math.nan
        elif self._posinf:
            loss_sum = math.inf
        elif self._neginf:
            loss_sum = -math.inf
        else:
            loss_sum = _ratio(self._fixed, 1 << FIXED_BITS)
        if n == 0:
            return EvalResult(math.nan, math.nan, math.nan, math.nan, 0, loss_sum, 0)
        loss = loss_sum if not math.isfinite(loss_sum) else _ratio(self._fixed, n << FIXED_BITS)
        try:
            ppl = math.exp(loss)
        except OverflowError:
            ppl = math.inf
        return EvalResult(
            loss=loss,
            perplexity=ppl,
            bits_per_token=loss / _LN2,
            accuracy=self._correct / n,
            tokens=n,
            loss_sum=loss_sum,
            correct=self._correct,
        )

    def __repr__(self) -> str:
        r = self.result()
        return f"StreamingCrossEntropy(tokens={r.tokens}, loss={r.loss:.6g}, accuracy={r.accuracy:.6g})"

    # -- updates

    def update(self, logits: Any, target: Any, *, block_rows: int | None = None) -> StreamingCrossEntropy:
        """Adds a batch: ``(*batch, C)`` logits and integer targets of shape ``batch``.

        Host arrays are read in row blocks (``block_rows`` rows, default about 64 MiB of
        logits), memmapped pages released after each. Raises as ``ce_fast.cross_entropy``
        does (ValueError for shapes, TypeError for dtypes, IndexError for a target out of
        range, naming its position); a failed update leaves the state unchanged.
        """
        for _ in self._blocks(logits, target, block_rows):
            pass
        return self

    def _blocks(self, logits: Any, target: Any, block_rows: int | None = None) -> Iterator[int]:
        """Runs an update block by block, yielding the rows done after each block (for
        progress reports; stopping between blocks keeps what was added)."""
        if block_rows is not None and (
            isinstance(block_rows, bool) or not isinstance(block_rows, (int, np.integer)) or block_rows < 1
        ):
            raise ValueError(f"block_rows must be a positive int, got {block_rows!r}")
        x = _batch.logits_operand(logits)
        t = _arrays.operand(target, "target")
        _batch.same_device(x, t, "target")
        kind = _batch.real_kind(target)
        if kind not in "iu":
            raise TypeError(f"target must hold integer class indices, got dtype {t.dtype_name}")
        if t.shape != x.shape[:-1]:
            raise ValueError(
                f"target shape {t.shape} does not match logits shape {x.shape}: expected {x.shape[:-1]} "
                "(the class axis is the last axis of logits)"
            )
        if x.is_cuda:
            with _batch.device_scope(logits):
                self._update_cuda(logits, target)
            yield x.rows
            return
        C = x.shape[-1]
        xa = _arrays.numpy_of(x)
        ta = np.asarray(_arrays.numpy_of(t))
        if xa.flags.c_contiguous and ta.flags.c_contiguous and xa.ndim > 1:
            xa2, ta1 = xa.reshape(-1, C), ta.reshape(-1)
            rows = xa2.shape[0]
            step = int(block_rows) if block_rows is not None else default_block_rows(C, xa.itemsize)
            for a, b in row_blocks(rows, step):
                self._check_targets(ta1[a:b], a, ta.shape, C)
                release_pages(ta1[a:b])
            for a, b in row_blocks(rows, step):
                self._update_host(xa2[a:b], ta1[a:b])
                release_pages(xa2[a:b])
                release_pages(ta1[a:b])
                yield b
            return
        self._check_targets(ta.reshape(-1), 0, ta.shape, C)
        self._update_host(logits, target)
        yield x.rows

    def _check_targets(self, t: np.ndarray, start: int, shape: tuple, C: int) -> None:
        bad = _errors.first_out_of_range(t, C, self.ignore_index, np)
        if bad is not None:
            flat = start + (bad[0][0] if bad[0] else 0)
            pos = tuple(int(i) for i in np.unravel_index(flat, shape)) if shape else ()
            raise _errors.index_error(pos, bad[1], C, self.ignore_index)

    def _update_host(self, logits: Any, target: Any) -> None:
        spec = LossSpec.make(ignore_index=self.ignore_index, reduction="none")
        b = _batch.make_batch(logits, target, spec)
        if b.rows == 0:
            return
        am = np.empty(b.rows, dtype=np.int64)
        s = b.engine.run(b, scale=1.0, softcap=0.0, want_wz=False, argmax=am)  # type: ignore[call-arg]
        loss = _rules.per_row(b, spec, s)
        valid = np.asarray(b.valid)
        fixed, nan, posinf, neginf = exact_sum(loss[valid])
        self._tokens += int(np.count_nonzero(valid))
        self._correct += int(np.count_nonzero(valid & (am == b.target)))
        self._fixed += fixed
        self._nan += nan
        self._posinf += posinf
        self._neginf += neginf

    def _update_cuda(self, logits: Any, target: Any) -> None:
        from . import _eval_cuda

        dev, part = _eval_cuda.update(logits, target, self.ignore_index, self._device)
        self._device[dev] = part
        if part["rows"] >= 1 << 35:  # an int64 bin could overflow after 2**36 rows: fold early
            self._settle()


def evaluate(logits: Any, target: Any, *, ignore_index: int = -100) -> EvalResult:
    """:class:`EvalResult` of one batch: ``StreamingCrossEntropy(ignore_index).update(logits, target).result()``."""
    return StreamingCrossEntropy(ignore_index).update(logits, target).result()
