"""Turning user arrays into engine operands without copying the logits.

An :class:`Operand` remembers which library the array came from (so results go
back as the same library), which device it lives on (which picks the engine),
and the raw layout the engines read: address, dtype code, shape and strides in
elements.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np

# Dtype codes shared with the Rust engine (rust/elem.rs) and the CUDA kernels.
F32, F64, F16, BF16 = 0, 1, 2, 3
_NP_CODES = {
    np.dtype(np.float32): F32,
    np.dtype(np.float64): F64,
    np.dtype(np.float16): F16,
    np.dtype(ml_dtypes.bfloat16): BF16,
}
CODE_NAMES = {F32: "float32", F64: "float64", F16: "float16", BF16: "bfloat16"}
SUPPORTED = "float32, float64, float16 or bfloat16"


def _torch():
    return sys.modules.get("torch")


def _cupy():
    return sys.modules.get("cupy")


def is_torch(obj: Any) -> bool:
    torch = _torch()
    return torch is not None and isinstance(obj, torch.Tensor)


_torch_code_map: dict | None = None


def _torch_codes():
    global _torch_code_map
    if _torch_code_map is None:
        torch = _torch()
        _torch_code_map = {torch.float32: F32, torch.float64: F64, torch.float16: F16, torch.bfloat16: BF16}
    return _torch_code_map


_dtype_names: dict = {}  # NumPy, CuPy and torch dtype -> its name (str() of a dtype costs microseconds)


def _dtype_name(dtype: Any) -> str:
    name = _dtype_names.get(dtype)
    if name is None:
        name = str(dtype).replace("torch.", "")
        if len(_dtype_names) < 256:
            _dtype_names[dtype] = name
    return name


@dataclass(frozen=True)
class Operand:
    """A validated view of one array argument."""

    array: Any  # numpy.ndarray, cupy.ndarray or torch.Tensor: keeps the memory alive
    lib: str  # "numpy", "torch" or "cupy": what results are returned as
    device: str  # "cpu" or "cuda:N"
    shape: tuple
    strides: tuple  # in elements
    dtype_name: str
    code: int | None  # engine dtype code for floating arrays, None otherwise
    ptr: int

    @property
    def is_cuda(self) -> bool:
        return self.device != "cpu"

    @property
    def batch_shape(self) -> tuple:
        return self.shape[:-1]

    @property
    def rows(self) -> int:
        return math.prod(self.batch_shape)  # Python ints: exact, and cheap on every call


class Layout:
    """What the engine reads of an array, as an :class:`Operand` has it, for the lean
    paths that build no Operand: address, dtype code, shape and strides in elements."""

    __slots__ = ("ptr", "code", "shape", "strides")

    def __init__(self, ptr: int, code: int | None, shape: tuple, strides: tuple) -> None:
        self.ptr = ptr
        self.code = code
        self.shape = shape
        self.strides = strides


def _device_of_dlpack(obj: Any) -> str | None:
    try:
        dev_type, dev_id = obj.__dlpack_device__()
    except Exception:
        return None
    # kDLCPU = 1, kDLCUDA = 2, kDLCUDAManaged = 13
    if int(dev_type) == 1:
        return "cpu"
    if int(dev_type) in (2, 13):
        return f"cuda:{int(dev_id)}"
    return f"dlpack-device-{int(dev_type)}"


def _check_torch_layout(t: Any, name: str) -> None:
    torch = _torch()
    if t.is_nested:
        raise TypeError(f"{name} is a nested tensor; ce_fast needs a dense (strided) tensor")
    if t.layout != torch.strided:
        raise TypeError(
            f"{name} is a {str(t.layout).replace('torch.', '')} tensor; ce_fast needs a dense (strided) "
            "tensor: call .to_dense() first"
        )


def device_of(obj: Any) -> str:
    """ "cpu" or "cuda:N" for an array of any supported library; "cpu" for Python and NumPy scalars."""
    if is_torch(obj):
        dev = obj.device
        return f"cuda:{dev.index}" if dev.type == "cuda" else "cpu" if dev.type == "cpu" else str(dev)
    cp = _cupy()
    if cp is not None and isinstance(obj, cp.ndarray):
        return f"cuda:{obj.device.id}"
    if hasattr(obj, "__cuda_array_interface__"):
        return f"cuda:{_require_cupy('array').asarray(obj).device.id}"
    if not isinstance(obj, np.ndarray) and hasattr(obj, "__dlpack_device__"):
        return _device_of_dlpack(obj) or "cpu"
    return "cpu"


def operand(obj: Any, name: str, *, out: bool = False) -> Operand:
    """Describes `obj` without copying it. Raises TypeError for what is not an array.

    With ``out=True`` the operand is a destination: it must be an array object
    (NumPy, torch or CuPy) whose memory can be written as it is, so nothing is ever
    written into a temporary copy that the caller never sees.
    """
    if is_torch(obj):
        _check_torch_layout(obj, name)
        t = obj.detach()
        if t.device.type not in ("cpu", "cuda"):
            raise ValueError(f"{name} is on device {t.device}; ce_fast runs on CPU and CUDA")
        if t.is_neg():
            if out:
                raise ValueError(
                    f"{name} has its negative bit set (a lazily negated view such as z.conj().imag); "
                    "it cannot be written in place: pass a tensor without it (.resolve_neg())"
                )
            # A lazily negated view: its memory holds -value, so it is materialised once.
            t = t.resolve_neg()
        # CUDA tensors are described from torch's own metadata (no CuPy view): bfloat16
        # works although CuPy has no such dtype, and CuPy is needed only by the engine.
        code = _torch_codes().get(t.dtype)
        return Operand(
            array=t,
            lib="torch",
            device="cpu" if t.device.type == "cpu" else f"cuda:{t.device.index}",
            shape=tuple(t.shape),
            strides=tuple(t.stride()),
            dtype_name=_dtype_name(t.dtype),
            code=code,
            ptr=t.data_ptr(),
        )
    cp = _cupy()
    if cp is not None and isinstance(obj, cp.ndarray):
        return _cupy_operand(obj, name, lib="cupy")
    if hasattr(obj, "__cuda_array_interface__"):
        return _cupy_operand(_require_cupy(name).asarray(obj), name, lib="cupy")
    if out and not isinstance(obj, np.ndarray):
        raise TypeError(
            f"{name} must be a NumPy array, torch tensor or CuPy array to write into, got {type(obj).__name__}"
        )
    if not isinstance(obj, np.ndarray) and hasattr(obj, "__dlpack_device__"):
        dev = _device_of_dlpack(obj)
        if dev is not None and dev.startswith("cuda"):
            return _cupy_operand(_require_cupy(name).from_dlpack(obj), name, lib="cupy")
        if dev == "cpu" and hasattr(obj, "__dlpack__"):
            try:
                obj = np.from_dlpack(obj)
            except (TypeError, ValueError, BufferError, RuntimeError) as exc:
                raise TypeError(f"{name} is a DLPack CPU array NumPy cannot read: {exc}") from exc
        elif dev is not None and dev != "cpu":
            raise ValueError(f"{name} is on {dev}; ce_fast runs on CPU and CUDA")
    try:
        a = np.asarray(obj)
    except Exception as exc:  # numpy's own message is kept as the cause
        raise TypeError(f"{name} must be an array, got {type(obj).__name__}") from exc
    if a.dtype == object:
        raise TypeError(f"{name} must be a numeric array, got {type(obj).__name__} of objects")
    item = a.dtype.itemsize
    if any(s % item for s in a.strides):
        if out:
            raise ValueError(
                f"{name} has byte strides {a.strides} that are not whole {a.dtype} elements; "
                "it cannot be written in place (pass a regular array)"
            )
        # Byte strides that are not whole elements (views of packed records) are copied once.
        a = np.ascontiguousarray(a)
    return Operand(
        array=a,
        lib="numpy",
        device="cpu",
        shape=a.shape,
        strides=tuple(s // item for s in a.strides),
        dtype_name=_dtype_name(a.dtype),
        code=_NP_CODES.get(a.dtype),
        ptr=a.__array_interface__["data"][0] if a.size else 0,
    )


def _require_cupy(name: str):
    try:
        import cupy
    except ImportError as exc:
        raise ImportError(f"{name} is a CUDA array; the GPU engine needs CuPy (pip install 'ce_fast[cuda]')") from exc
    return cupy


def _cupy_operand(a, name: str, lib: str, keep: Any = None) -> Operand:
    item = a.dtype.itemsize
    code = _NP_CODES.get(np.dtype(a.dtype)) if a.dtype != object else None
    return Operand(
        array=a if keep is None else (a, keep),
        lib=lib,
        device=f"cuda:{a.device.id}",
        shape=tuple(a.shape),
        strides=tuple(s // item for s in a.strides),
        dtype_name=_dtype_name(a.dtype),
        code=code,
        ptr=int(a.data.ptr),
    )


def mark_written(op: Operand | None) -> None:
    """Tells torch that the engine wrote into `op` behind its back: bumps the tensor's
    version counter, so autograd refuses values saved before the write."""
    if op is not None and op.lib == "torch":
        _torch().autograd.graph.increment_version(op.array)


def numpy_of(op: Operand) -> np.ndarray:
    """A NumPy view of a CPU operand (torch tensors included, bfloat16 as ml_dtypes)."""
    a = op.array
    if op.lib == "torch":
        torch = _torch()
        if a.dtype == torch.bfloat16:
            return a.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return a.numpy()
    return a


def wrap(result: np.ndarray, like: Operand):
    """Returns a NumPy result as the library of `like` (a CPU operand)."""
    if like.lib == "torch":
        # np.ascontiguousarray turns 0-d into shape (1,); keep the result's own shape.
        return _torch().from_numpy(np.ascontiguousarray(result).reshape(np.shape(result)))
    return result
