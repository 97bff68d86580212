"""``ce-fast bench``: ce_fast timed against NumPy and PyTorch on the same logits, every
speed reported as bytes per second, as a share of a plain read of the same bytes
measured in the same run, and as ratios to the baselines::

    ce-fast bench                                   # default sizes and dtypes
    ce-fast bench --sizes 4096x128256 --dtype float32 --repeat 5
    ce-fast bench --json results.json --markdown benches/RESULTS.md

From Python::

    from ce_fast import bench
    results = bench.run_bench(bench.Config.create(sizes="256x32000", dtypes="float32"))
    print(bench.format_table(results))

What is timed, per logits shape and dtype (class axis last, C-contiguous):

``fwd``
    ``ce_fast.cross_entropy(z, y)`` (mean). NumPy baseline:
    ``m = z.max(-1, keepdims=True); lse = m[..., 0] + np.log(np.exp(z - m).sum(-1));
    loss = (lse - z[rows, y]).mean()`` in float32 (bfloat16 input is cast to float32
    inside the timed call). PyTorch baseline: ``F.cross_entropy(z, y)`` on CPU.
``fwd+bwd``
    ``ce_fast.cross_entropy_and_grad(z, y)`` into a fresh gradient array. NumPy
    baseline: the forward above plus ``softmax / N`` with ``1 / N`` taken off the
    target entries (cast back to the input dtype). PyTorch baseline:
    ``F.cross_entropy(z, y).backward()`` on a leaf tensor sharing z's memory.
``fwd+bwd in-place``
    ``ce_fast.cross_entropy_and_grad(z, y, out=z)`` on a working copy that is
    restored (untimed) before every run; same baselines as ``fwd+bwd``.

Bytes counted: the logits once for ``fwd`` and the read pass, read + write for
``fwd+bwd`` and the copy. GB is 10**9 bytes. Times are best and median of
``repeat`` runs after ``warmup`` runs. A baseline whose first run takes longer than
``slow_s`` seconds is run once (no warm-up) unless ``baseline_repeat`` is given; the
table marks such numbers with ``*``. Peak memory: see :mod:`ce_fast.bench.timing`.

``--device cuda`` (:mod:`ce_fast.bench.cuda`, imported only then) benches the CUDA
engine on logits generated on the GPU (default sizes 16384 x {32000, 128256,
262144}, ``--repeat 20 --warmup 3``), timed with CUDA events (GB/s from the median):
a read pass and a device copy as yardsticks, ``fwd`` against the read pass, the
fused loss + gradient (fresh and ``out=`` the logits) against the copy, and PyTorch
``F.cross_entropy`` eager (forward; forward + backward) and ``torch.compile``-d
(``--no-compile`` skips it; a failing compile reads ``n/a``). Inputs are torch CUDA
tensors when PyTorch has CUDA (needed for bfloat16), else CuPy arrays (``--arrays``
picks). Without CuPy or a CUDA device :func:`run_bench` raises
:class:`DeviceUnavailable`.

Modules: :mod:`~ce_fast.bench.config` (options), :mod:`~ce_fast.bench.timing`
(timer, memory probes), :mod:`~ce_fast.bench.inputs` (inputs and baselines),
:mod:`~ce_fast.bench.report` (the table model and its renderers),
:mod:`~ce_fast.bench.cpu` and :mod:`~ce_fast.bench.cuda` (backends),
:mod:`~ce_fast.bench.runner` (run and render). Importing this package imports
neither the CUDA backend nor CuPy.
"""

from .base import Backend, DeviceUnavailable
from .config import (
    DEFAULT_DTYPES,
    DEFAULT_OPS,
    DEFAULT_REPEAT,
    DEFAULT_SIZES,
    DEFAULT_WARMUP,
    DTYPE_ALIASES,
    GPU_DEFAULT_SIZES,
    GPU_DTYPES,
    LOSS_RTOL_NUMPY,
    LOSS_RTOL_TORCH,
    OP_ALIASES,
    OPS,
    SCHEMA,
    Config,
    format_size,
    parse_dtypes,
    parse_ops,
    parse_sizes,
)
from .inputs import (
    as_torch,
    clear_grad,
    make_logits,
    np_dtype,
    numpy_forward,
    numpy_forward_backward,
    read_pass_fn,
    torch_forward,
    torch_forward_backward,
)
from .report import Column, Layout, Report, Row, format_json
from .runner import DEVICES, backend_module, build_report, format_markdown, format_table, machine_info, run_bench
from .timing import NoMemory, PeakMemory, Timer, Timing, mem_available

__all__ = [
    "DEFAULT_DTYPES",
    "DEFAULT_OPS",
    "DEFAULT_REPEAT",
    "DEFAULT_SIZES",
    "DEFAULT_WARMUP",
    "DEVICES",
    "DTYPE_ALIASES",
    "GPU_DEFAULT_SIZES",
    "GPU_DTYPES",
    "LOSS_RTOL_NUMPY",
    "LOSS_RTOL_TORCH",
    "OPS",
    "OP_ALIASES",
    "SCHEMA",
    "Backend",
    "Column",
    "Config",
    "DeviceUnavailable",
    "Layout",
    "NoMemory",
    "PeakMemory",
    "Report",
    "Row",
    "Timer",
    "Timing",
    "as_torch",
    "backend_module",
    "build_report",
    "clear_grad",
    "format_json",
    "format_markdown",
    "format_size",
    "format_table",
    "machine_info",
    "make_logits",
    "mem_available",
    "np_dtype",
    "numpy_forward",
    "numpy_forward_backward",
    "parse_dtypes",
    "parse_ops",
    "parse_sizes",
    "read_pass_fn",
    "run_bench",
    "torch_forward",
    "torch_forward_backward",
]
