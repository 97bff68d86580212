"""The distillation KL pass on CUDA devices: the kernels of ``kernels/kl.cu`` (embedded in
``_core`` like ce.cu, or read from $CE_FAST_KERNELS_DIR) through CuPy.

One block per row streams both rows once (``kl_stats``); the gradient kernel
(``kl_grad``) reads them again and writes the student's gradient. Nothing is
synchronised: the statistics stay on the device for the rules.
"""

from __future__ import annotations

from typing import Any

from .._arrays import BF16, F16, F32, Operand
from .._types import KlStats
from . import cuda

KERNEL_NAME = "kl.cu"
TYPES = {F32: "float", F16: "ce_half", BF16: "ce_bf16"}
BLOCK = 256  # threads per row: a multiple of 32, at most 1024

_PARAMS_IN = (
    ("x", "p"),
    ("t", "p"),
    ("rows", "q"),
    ("C", "q"),
    ("x_cs", "q"),
    ("x_rs", "q"),
    ("x_tab", "p"),
    ("t_cs", "q"),
    ("t_rs", "q"),
    ("t_tab", "p"),
    ("inv_t", "d"),
    ("reverse", "i"),
)
#: The kernels' parameters in order with their kinds (as ``cuda.KERNEL_PARAMS``).
KERNEL_PARAMS = {
    "kl_stats": _PARAMS_IN + (("o_ms", "p"), ("o_ls", "p"), ("o_mt", "p"), ("o_lt", "p"), ("o_cross", "p")),
    "kl_grad": _PARAMS_IN
    + (
        ("ms", "p"),
        ("ls", "p"),
        ("mt", "p"),
        ("lt", "p"),
        ("cross", "p"),
        ("g", "p"),
        ("out", "p"),
        ("o_cs", "q"),
        ("o_rs", "q"),
        ("o_tab", "p"),
    ),
}


def kernel_names(x_code: int, t_code: int) -> tuple[str, str]:
    tx, tt = TYPES[x_code], TYPES[t_code]
    return f"kl_stats<{tx}, {tt}>", f"kl_grad<{tx}, {tt}>"


def modules() -> dict[Any, list[str]]:
    """Every module the KL pass may build: (student code, teacher code) -> name expressions."""
    return {(a, b): list(kernel_names(a, b)) for a in TYPES for b in TYPES}


_kernel_file = cuda.KernelFile(KERNEL_NAME, modules)


def _function(key, name: str):
    """The kernel `name` of module `key`, compiled by NVRTC on first use."""
    return _kernel_file.function(key, name)


def kernel_args(kernel: str, **values) -> tuple:
    """Launch arguments typed as the C++ parameters of `kernel` (see ``cuda.kernel_args``)."""
    return cuda.typed_args(kernel, KERNEL_PARAMS[kernel], values)


def kl_pass(
    x: Operand,
    teacher: Operand,
    *,
    inv_temp: float,
    reverse: bool,
    g=None,
    out: Operand | None = None,
    given: KlStats | None = None,
) -> KlStats:
    """As ``kl_cpu.kl_pass``, on the device: statistics (CuPy float64 arrays), and the
    gradient into `out` when `g` is given."""
    cp = cuda.xp()
    f64 = cp.float64
    rows, C = x.rows, x.shape[-1]
    if x.code not in TYPES or teacher.code not in TYPES:
        bad = x if x.code not in TYPES else teacher
        raise TypeError(f"logits dtype {bad.dtype_name} is not supported on the GPU")
    if given is not None:
        s = KlStats(
            *(
                cp.ascontiguousarray(cp.asarray(a, dtype=f64))
                for a in (given.ms, given.ls, given.mt, given.lt, given.cross)
            )
        )
    else:
        s = KlStats(*(cp.empty(rows, dtype=f64) for _ in range(5)))
    if rows == 0:
        return s
    sms, _ = cuda._device_info(cuda._device_id(x))
    grid = max(1, min(rows, sms * max(1, 2048 // BLOCK)))
    x_rs, x_tab = cuda._layout(x.batch_shape, x.strides[:-1])
    t_rs, t_tab = cuda._layout(teacher.batch_shape, teacher.strides[:-1])
    kw = dict(
        x=x.ptr,
        t=teacher.ptr,
        rows=rows,
        C=C,
        x_cs=x.strides[-1],
        x_rs=x_rs,
        x_tab=x_tab,
        t_cs=teacher.strides[-1],
        t_rs=t_rs,
        t_tab=t_tab,
        inv_t=inv_temp,
        reverse=int(bool(reverse)),
    )
    key = (x.code, teacher.code)
    stats_kernel, grad_kernel = kernel_names(*key)
    if given is None:
        args = kernel_args("kl_stats", o_ms=s.ms, o_ls=s.ls, o_mt=s.mt, o_lt=s.lt, o_cross=s.cross, **kw)
        _function(key, stats_kernel)((grid,), (BLOCK,), args)
    if g is not None:
        assert out is not None
        o_rs, o_tab = cuda._layout(out.batch_shape, out.strides[:-1])
        gk = cp.ascontiguousarray(cp.broadcast_to(cp.asarray(g, dtype=f64), (rows,)))
        args = kernel_args(
            "kl_grad",
            ms=s.ms,
            ls=s.ls,
            mt=s.mt,
            lt=s.lt,
            cross=s.cross,
            g=gk,
            out=out.ptr,
            o_cs=out.strides[-1],
            o_rs=o_rs,
            o_tab=o_tab,
            **kw,
        )
        _function(key, grad_kernel)((grid,), (BLOCK,), args)
    return s
