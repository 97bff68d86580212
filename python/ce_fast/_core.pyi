"""Type stubs of ce_fast._core, the Rust engine (rust/lib.rs). Private: the Python
package validates every argument before it reaches these functions."""

from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

__version__: str
#: Elements per chunk of a row (stays in L1).
CHUNK: int
#: Below this many elements a call stays on the calling thread.
PAR_MIN_ELEMS: int
#: The largest thread count the engine accepts.
MAX_THREADS: int

class _ArrayDesc(Protocol):
    """What the engine reads of an array argument, by attribute (ce_fast._arrays.Operand
    and ce_fast._arrays.Layout have it): address, dtype code, shape and strides in
    elements, the class axis last. An object without them is an AttributeError, one of
    the wrong type (a negative size, a float code) a TypeError; a code other than
    float32 / float64 / float16 / bfloat16's, a 0-d shape, zero classes, shape and
    strides of different lengths or a null address of a non-empty array a ValueError. The
    address itself is the caller's word: the Python package derives it from a live array."""

    # Read-only, so the frozen Operand dataclass satisfies it.
    @property
    def ptr(self) -> int: ...
    @property
    def code(self) -> int | None: ...
    @property
    def shape(self) -> tuple[int, ...]: ...
    @property
    def strides(self) -> tuple[int, ...]: ...

class _Stats(Protocol):
    """Per-row float64 vectors (ce_fast._types.Stats); None where not wanted."""

    mx: Any
    ls: Any
    zy: Any
    swz: Any
    swtz: Any
    swt: Any

class _GradCoef(Protocol):
    """The gradient's coefficients (ce_fast._types.GradCoef): float64 vectors a0, b, g."""

    a0: Any
    b: Any
    g: Any
    a_lse: float
    a_swt: float
    d: float
    e: float

def run(
    x: _ArrayDesc,
    *,
    target: NDArray[np.int64] | None = None,
    weight: NDArray[np.float64] | None = None,
    soft: _ArrayDesc | None = None,
    scale: float = 1.0,
    softcap: float = 0.0,
    want_wz: bool = False,
    stats: _Stats | None = None,
    grad: _GradCoef | None = None,
    out: _ArrayDesc | None = None,
    given: _Stats | None = None,
    threads: int = 0,
    argmax: NDArray[np.int64] | None = None,
) -> None:
    """Per-row statistics of the logits `x` into `stats`'s float64 vectors (one per row,
    contiguous, None = not wanted); with `grad` the gradient into `out`; with `given`
    (saved mx, ls, swt) only the gradient pass. Every vector's dtype and length is
    checked: a mismatch is a ValueError (a TypeError for a non-array). `argmax`: each row's
    first maximum, -1 for a row holding NaN, from the same pass."""

def plain_forward(
    x: _ArrayDesc,
    target: NDArray[np.int64],
    ignore_index: int,
    lse: NDArray[np.float64],
    loss: NDArray[np.float64],
    threads: int = 0,
    *,
    go: float | None = None,
    mean: bool = False,
    out: _ArrayDesc | None = None,
) -> int:
    """The plain cross-entropy (int64 `target`, one per row, contiguous): row maxima and
    log-sums into the contiguous float64 (2, rows) `lse`, per-row losses into the float64
    (rows,) `loss`; with `go` and `out` (the logits' shape) also the gradient of go * loss
    (go over the counted rows when `mean`) into `out`. The counted rows, or -1 - r for the
    first row r whose target is out of range (then nothing is written). A vector of the
    wrong dtype is a TypeError; of the wrong length or layout, `go` without `out` (or the
    reverse), `mean` without `go`, or an `out` of another shape a ValueError."""

def plain_backward(
    x: _ArrayDesc,
    target: NDArray[np.int64],
    ignore_index: int,
    lse: NDArray[np.float64],
    out: _ArrayDesc,
    threads: int = 0,
    *,
    go: float | None = None,
    go_rows: NDArray[np.float64] | None = None,
    mean: bool = False,
) -> None:
    """The plain cross-entropy's gradient from `plain_forward`'s lse into `out` (the
    logits' shape): exactly one of `go` for the batch (over the counted rows when `mean`)
    and `go_rows`, float64 values one per row. Checked as `plain_forward`; a target out of
    range is a ValueError naming its row."""

class _KlStats(Protocol):
    """ce_fast._types.KlStats: float64 vectors, one value per row."""

    ms: np.ndarray
    ls: np.ndarray
    mt: np.ndarray
    lt: np.ndarray
    cross: np.ndarray

def kl_run(
    x: _ArrayDesc,
    teacher: _ArrayDesc,
    inv_temp: float,
    reverse: bool,
    stats: _KlStats,
    *,
    g: np.ndarray | None = None,
    out: _ArrayDesc | None = None,
    given: bool = False,
    threads: int = 0,
) -> None:
    """Distillation KL of student `x` against `teacher` over T = 1/inv_temp: the per-row
    float64 statistics (ms, ls, mt, lt, cross) written into `stats` (read when `given`),
    and with `g` (float64 per-row factors) and `out` the student's gradient. Vectors of
    the wrong dtype, length or layout raise ValueError (or TypeError)."""

def read_pass(a: np.ndarray, threads: int = 0) -> int:
    """Reads every byte of the C-contiguous NumPy array `a` once on the engine's threads;
    an xor checksum. A non-array or an array of Python objects is a TypeError, a
    non-contiguous array a ValueError."""

def set_simd(name: str) -> None:
    """Forces the kernel set: "scalar", "auto", "avx2" or "avx512" (any case); a set the
    CPU lacks raises ValueError."""

def simd_level() -> str:
    """The kernel set float32-lane calls use now: "avx512", "avx2" or "scalar"."""

def simd_available() -> list[str]:
    """The kernel sets this CPU runs, "scalar" first and the best last."""

def cpu_features() -> list[str]:
    """The CPU features the kernel sets look for that this CPU has (e.g. "avx2", "avx512bf16")."""

def default_threads() -> int:
    """The engine's default thread count (RAYON_NUM_THREADS, else the CPUs available)."""

def kernel_source(name: str) -> str:
    """The embedded text of kernels/`name` (e.g. "ce.cu")."""

def kernel_names() -> list[str]:
    """Names of the embedded CUDA source files."""

def run_binary(
    kind: int,
    x: _ArrayDesc,
    t: _ArrayDesc,
    *,
    w: _ArrayDesc | None = None,
    pw: _ArrayDesc | None = None,
    loss: _ArrayDesc | None = None,
    grad: _ArrayDesc | None = None,
    gscale: float = 1.0,
    gout: _ArrayDesc | None = None,
    alpha: float = 0.25,
    gamma: float = 2.0,
    threads: int = 0,
) -> float:
    """Elementwise BCE-with-logits (kind 0, weights `w`, `pw`) or sigmoid focal loss (kind 1):
    per-element losses into `loss` (float32 or float64), the gradient times `gscale` (and
    `gout` per element) into `grad` (the logits' dtype). Every operand has the logits'
    shape (broadcast ones with stride 0), else a ValueError naming it; `gout` needs `grad`.
    Returns the sum of the losses (f64)."""
