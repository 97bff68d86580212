"""The GPU side of :class:`ce_fast.StreamingCrossEntropy`: kernels/eval.cu reads each
row once (max, sum of exponentials, target logit, argmax) and adds the row's float64
loss exactly into int64 bins on the device, so an update launches one kernel after the
target range check (the one wait for the device) and :meth:`fold` reads the bins back
when the host needs the state."""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _arrays, _batch
from ._engines import cuda as _cuda
from ._exact import fold_bins

KERNEL_FILE = "eval.cu"
LOGIT_TYPES = {_arrays.F32: "float", _arrays.F16: "ce_half", _arrays.BF16: "ce_bf16"}
BINS = 2048  # EV_BINS in eval.cu: hi parts at [0, 2048), lo parts at [2048, 4096)
COUNTS = 5  # tokens, correct, NaN, +inf, -inf
BLOCK = 256  # eight warps, one row each at a time
# Parameters of ce_eval in eval.cu, in order, with their kinds (as ce_fast._engines.cuda.KERNEL_PARAMS).
PARAMS = (
    ("x", "p"),
    ("rows", "q"),
    ("C", "q"),
    ("x_cs", "q"),
    ("x_rs", "q"),
    ("x_tab", "p"),
    ("target", "p"),
    ("bins", "p"),
    ("counts", "p"),
    ("o_loss", "p"),
)


def kernel_name(code: int) -> str:
    return f"ce_eval<{LOGIT_TYPES[code]}>"


def names() -> list[str]:
    return [kernel_name(c) for c in LOGIT_TYPES]


def kernel_args(**values: Any) -> tuple:
    return _cuda.typed_args("ce_eval", PARAMS, values)


_kernel_file = _cuda.KernelFile(KERNEL_FILE, lambda: {"eval": names()})


def _function(name: str) -> Any:
    return _kernel_file.function("eval", name)


def new_part() -> dict[str, Any]:
    cp = _cuda.xp()
    return {"bins": cp.zeros(2 * BINS, dtype=cp.int64), "counts": cp.zeros(COUNTS, dtype=cp.int64), "rows": 0}


def launch(x: _arrays.Operand, idx: Any, part: dict[str, Any], o_loss: Any = None) -> None:
    """Adds the rows of `x` (targets `idx`: int64, -1 for ignored rows) to `part`."""
    rows, C = x.rows, x.shape[-1]
    if rows == 0:
        return
    if x.code not in LOGIT_TYPES:
        raise TypeError(f"logits dtype {x.dtype_name} is not supported on the GPU")
    x_rs, x_tab = _cuda._layout(x.batch_shape, x.strides[:-1])
    sms, _ = _cuda._device_info(_cuda._device_id(x))
    warps = BLOCK // 32
    grid = max(1, min(-(-rows // warps), sms * 8))
    args = kernel_args(
        x=x.ptr,
        rows=rows,
        C=C,
        x_cs=x.strides[-1],
        x_rs=x_rs,
        x_tab=x_tab,
        target=idx,
        bins=part["bins"],
        counts=part["counts"],
        o_loss=o_loss,
    )
    _function(kernel_name(x.code))((grid,), (BLOCK,), args)
    part["rows"] += rows


def update(logits: Any, target: Any, ignore_index: int, parts: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Adds a CUDA batch to the device's partial state in `parts`; returns (device, part)."""
    x = _batch.logits_operand(logits)
    t = _arrays.operand(target, "target")
    idx, _ = _cuda.index_targets(t, x.shape[-1], ignore_index)  # the one wait: the range check
    part = parts.get(x.device)
    if part is None:
        part = new_part()
    launch(x, _cuda.xp().ascontiguousarray(idx), part)
    return x.device, part


def fold(part: dict[str, Any]) -> tuple[int, int, int, int, int, int]:
    """(tokens, correct, exact loss sum * 2**1074, NaN, +inf, -inf) of a device part."""
    bins = np.asarray(_to_host(part["bins"]), dtype=np.int64)
    c = [int(v) for v in np.asarray(_to_host(part["counts"]), dtype=np.int64)]
    return c[0], c[1], fold_bins(bins[:BINS], bins[BINS:]), c[2], c[3], c[4]


def _to_host(a: Any) -> Any:
    get = getattr(a, "get", None)
    return get() if callable(get) else a
