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

#: (address, dtype code, columns, column stride, batch shape, batch strides), strides in elements.
Desc = tuple[int, int, int, int, list[int], list[int]]

class _ArrayDesc(Protocol):
    """What `run` reads of an array argument (ce_fast._arrays.Operand has it): address,
    dtype code, shape and strides in elements, the class axis last."""

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
    x: Desc,
    target: NDArray[np.int64],
    ignore_index: int,
    lse: NDArray[np.float64],
    loss: NDArray[np.float64],
    grad: tuple[float, bool, Desc] | None = None,
    threads: int = 0,
) -> int:
    """The plain cross-entropy (int64 `target`, one per row): row maxima and log-sums
    into the float64 (2, rows) `lse`, per-row losses into `loss`; with `grad = (go, mean,
    out)` also the gradient of go * loss. The counted rows, or -1 - r for the first row r
    whose target is out of range."""

def plain_backward(
    x: Desc,
    target: NDArray[np.int64],
    ignore_index: int,
    lse: NDArray[np.float64],
    go: float,
    go_rows: NDArray[np.float64] | None,
    mean: bool,
    out: Desc,
    threads: int = 0,
) -> None:
    """The plain cross-entropy's gradient from `plain_forward`'s lse into `out`: `go` for
    the batch (over the counted rows when `mean`) or the float64 per-row values `go_rows`."""

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

def read_pass(ptr: int, nbytes: int, threads: int = 0) -> int:
    """Reads `nbytes` at `ptr` once on the engine's threads; an xor checksum."""

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
    x: Desc,
    t: Desc,
    w: Desc | None = None,
    pw: Desc | None = None,
    loss: Desc | None = None,
    grad: Desc | None = None,
    gscale: float = 1.0,
    gout: Desc | None = None,
    alpha: float = 0.25,
    gamma: float = 2.0,
    threads: int = 0,
) -> float:
    """Elementwise BCE-with-logits (kind 0, weights `w`, `pw`) or sigmoid focal loss (kind 1):
    per-element losses into `loss`, the gradient times `gscale` (and `gout`) into `grad`;
    every Desc has the logits' rows and columns. Returns the sum of the losses (f64)."""
