"""Type stubs of ce_fast._core, the Rust engine (rust/lib.rs). Private: the Python
package validates every argument before it reaches these functions."""

__version__: str
#: Elements per chunk of a row (stays in L1).
CHUNK: int
#: Below this many elements a call stays on the calling thread.
PAR_MIN_ELEMS: int
#: The largest thread count the engine accepts.
MAX_THREADS: int

#: (address, dtype code, columns, column stride, batch shape, batch strides), strides in elements.
Desc = tuple[int, int, int, int, list[int], list[int]]

def run(
    x: Desc,
    target: int,
    weight: int,
    soft: Desc | None,
    scale: float,
    softcap: float,
    want_wz: bool,
    stats: tuple[int, int, int, int, int, int],
    grad: tuple[int, int, int, float, float, float, float, Desc] | None = None,
    threads: int = 0,
    given: tuple[int, int, int] | None = None,
    argmax: int = 0,
) -> None:
    """Per-row statistics of the logits `x` into the f64 buffers at `stats` (mx, ls, zy,
    swz, swtz, swt; 0 = not wanted), and with `grad` the gradient into its last Desc.
    `argmax`: an i64 buffer (0 = not wanted) for each row's first maximum, -1 for NaN rows."""

def kl_run(
    x: Desc,
    teacher: Desc,
    inv_temp: float,
    reverse: bool,
    stats: tuple[int, int, int, int, int],
    grad: tuple[int, Desc] | None = None,
    given: bool = False,
    threads: int = 0,
) -> None:
    """Distillation KL of student `x` against `teacher` over T = 1/inv_temp: per-row f64
    statistics (ms, ls, mt, lt, cross) written at `stats` (read when `given`), and with
    `grad` = (per-row factor pointer, out Desc) the student's gradient."""

def read_pass(ptr: int, nbytes: int, threads: int = 0) -> int:
    """Reads `nbytes` at `ptr` once on the engine's threads; an xor checksum."""

def set_simd(name: str) -> None:
    """Forces the kernel set: "scalar", "auto" or "avx2" (any case)."""

def simd_level() -> str:
    """The kernel set float32-lane calls use now: "avx2" or "scalar"."""

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
