"""``ce-fast eval LOGITS TARGETS``: cross-entropy, perplexity and accuracy of logits on disk.

Files are data, never code: ``.npy`` is memory-mapped with ``allow_pickle=False``
(object arrays are refused), ``.safetensors`` is memory-mapped at the tensor's byte
range after the ``safetensors`` package has checked the file, and anything else is
raw little-endian binary (``--dtype`` and ``--classes`` for logits, ``--target-dtype``
for targets). The logits stream through :class:`ce_fast.StreamingCrossEntropy` in row
blocks whose pages are released, so files larger than memory work.

Exit status: 0 done, 2 bad input (one line on stderr naming the file and what is wrong;
nothing written to ``--json``), 130 interrupted (Ctrl-C between blocks; the partial
result goes to stderr).
"""

from __future__ import annotations

import json
import math
import os
import signal
import struct
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np

from ._engines import cpu as _cpu
from .streaming import EvalResult, StreamingCrossEntropy, default_block_rows

LOGIT_DTYPES = {
    "float32": np.dtype(np.float32),
    "float64": np.dtype(np.float64),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
}
TARGET_DTYPES = {n: np.dtype(n) for n in ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")}
# safetensors dtype names -> NumPy dtypes (little-endian, as the format stores them).
_ST_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}


class BadInput(Exception):
    """A file that cannot be evaluated: the message is the one line the user sees."""


@dataclass
class Options:
    logits: str
    targets: str
    key: str | None = None
    target_key: str | None = None
    dtype: str | None = None
    classes: int | None = None
    target_dtype: str = "int64"
    ignore_index: int = -100
    json: str | None = None
    block_rows: int | None = None
    threads: int | None = None
    quiet: bool = False


# ---------------------------------------------------------------- opening files


def _size(path: str) -> int:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise BadInput(f"{path}: no such file") from None
    except OSError as e:
        raise BadInput(f"{path}: cannot read ({e.strerror})") from None
    if not os.path.isfile(path):
        raise BadInput(f"{path}: not a regular file")
    return st.st_size


def _open_npy(path: str, want: np.dtype | None) -> np.ndarray:
    """A read-only memmap of a .npy file; pickled object arrays are refused."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    except OSError as e:
        raise BadInput(f"{path}: cannot read ({e.strerror})") from None
    except ValueError as e:
        raise BadInput(f"{path}: not a .npy file ({e})") from None
    if dtype.hasobject:
        raise BadInput(f"{path}: dtype {dtype} holds Python objects; only numeric .npy files are read (no pickles)")
    try:
        a = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise BadInput(f"{path}: cannot memory-map shape {tuple(shape)} dtype {dtype} ({e})") from None
    if want is not None and a.dtype != want:
        if a.dtype.kind == "V" and a.dtype.itemsize == want.itemsize:
            return a.view(want)  # bfloat16 saved from ml_dtypes reads back as raw 2-byte records
        raise BadInput(f"{path}: dtype {a.dtype} but --dtype {want.name} was given")
    if a.dtype.kind == "V" and a.dtype.itemsize == 2:
        raise BadInput(
            f"{path}: dtype {a.dtype} (raw 2-byte records; for bfloat16 saved by ml_dtypes pass --dtype bfloat16)"
        )
    return a


def _safetensors_header(path: str) -> tuple[dict, int]:
    """The JSON header of a safetensors file and where its data starts, once the
    ``safetensors`` package has opened (and so checked) the file."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="np"):
            pass
    except FileNotFoundError:
        raise BadInput(f"{path}: no such file") from None
    except Exception as e:
        raise BadInput(f"{path}: not a valid safetensors file ({e})") from None
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return header, 8 + n


def _open_safetensors(path: str, key: str | None, what: str) -> np.ndarray:
    header, start = _safetensors_header(path)
    keys = sorted(k for k in header if k != "__metadata__")
    if key is None:
        if len(keys) != 1:
            raise BadInput(f"{path}: holds tensors {keys}; choose one with {what}")
        key = keys[0]
    if key not in header or key == "__metadata__":
        raise BadInput(f"{path}: no tensor {key!r}; it holds {keys}")
    info = header[key]
    dtype = _ST_DTYPES.get(info["dtype"])
    if dtype is None:
        raise BadInput(f"{path}: tensor {key!r} has dtype {info['dtype']}, which ce_fast does not read")
    shape = tuple(int(n) for n in info["shape"])
    begin, end = (int(v) for v in info["data_offsets"])
    if end == begin:
        return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=start + begin, shape=shape)


def _open_raw(path: str, dtype: np.dtype, classes: int | None) -> np.ndarray:
    n = _size(path)
    item = dtype.itemsize
    if classes is not None:
        row = classes * item
        if n % row:
            raise BadInput(
                f"{path}: {n} bytes is not a whole number of rows of {classes} {dtype.name} classes ({row} bytes each)"
            )
        shape: tuple = (n // row, classes)
    else:
        if n % item:
            raise BadInput(f"{path}: {n} bytes is not a whole number of {dtype.name} values ({item} bytes each)")
        shape = (n // item,)
    if n == 0:
        return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=shape)


def open_logits(o: Options) -> np.ndarray:
    path = o.logits
    want = LOGIT_DTYPES[o.dtype] if o.dtype else None
    _size(path)
    if path.endswith(".npy"):
        a = _open_npy(path, want)
    elif path.endswith(".safetensors"):
        a = _open_safetensors(path, o.key, "--key")
        if want is not None and a.dtype != want:
            raise BadInput(f"{path}: dtype {a.dtype} but --dtype {want.name} was given")
    else:
        if want is None or o.classes is None:
            raise BadInput(f"{path}: a raw logits file needs --dtype and --classes (or use .npy / .safetensors)")
        a = _open_raw(path, want, o.classes)
    if a.dtype not in LOGIT_DTYPES.values():
        raise BadInput(f"{path}: logits dtype {a.dtype} is not supported; expected {', '.join(LOGIT_DTYPES)}")
    if a.ndim == 0:
        raise BadInput(f"{path}: logits are a 0-d array; expected (*batch, classes) with the class axis last")
    if a.shape[-1] == 0:
        raise BadInput(f"{path}: logits shape {a.shape} has zero classes (the class axis is the last)")
    if o.classes is not None and a.shape[-1] != o.classes:
        raise BadInput(f"{path}: logits shape {a.shape} has {a.shape[-1]} classes but --classes {o.classes} was given")
    return a


def open_targets(o: Options, logits: np.ndarray) -> np.ndarray:
    path = o.targets
    _size(path)
    if path.endswith(".npy"):
        t = _open_npy(path, None)
    elif path.endswith(".safetensors"):
        t = _open_safetensors(path, o.target_key, "--target-key")
    else:
        t = _open_raw(path, TARGET_DTYPES[o.target_dtype], None)
    if t.dtype.kind not in "iu":
        raise BadInput(f"{path}: targets dtype {t.dtype} is not an integer dtype (class indices)")
    batch = logits.shape[:-1]
    rows = int(np.prod(batch, dtype=np.int64))
    if t.shape == batch:
        return t
    if t.size != rows:
        shorter = "shorter than" if t.size < rows else "longer than"
        raise BadInput(
            f"{path}: {t.size} targets (shape {t.shape}) is {shorter} the {rows} rows of logits shape {logits.shape}"
        )
    if t.ndim != 1 or not t.flags.c_contiguous:
        raise BadInput(f"{path}: targets shape {t.shape} does not match the logits' batch shape {batch}")
    return t.reshape(batch)


# ---------------------------------------------------------------- running


def _fmt(v: float, spec: str = ".6f") -> str:
    return "nan" if math.isnan(v) else format(v, spec)


def report(r: EvalResult, seconds: float, nbytes: int) -> str:
    gbs = nbytes / seconds / 1e9 if seconds > 0 else math.inf
    acc = "nan" if math.isnan(r.accuracy) else f"{r.accuracy:.6f} ({r.correct}/{r.tokens})"
    lines = [
        f"tokens          {r.tokens}",
        f"loss            {_fmt(r.loss)} nats",
        f"perplexity      {_fmt(r.perplexity, '.6g')}",
        f"bits/token      {_fmt(r.bits_per_token)}",
        f"accuracy        {acc}",
        f"time            {seconds:.3f} s",
        f"throughput      {gbs:.2f} GB/s ({nbytes / 1e9:.3f} GB of logits)",
    ]
    return "\n".join(lines)


def _progress(total: int, quiet: bool) -> Any:
    if quiet:
        return None
    from tqdm import tqdm  # type: ignore[import-untyped]

    return tqdm(
        total=total, unit="rows", unit_scale=True, file=sys.stderr, dynamic_ncols=True, mininterval=0.5, leave=False
    )


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def run(o: Options) -> int:
    try:
        if o.json and not os.path.isdir(os.path.dirname(os.path.abspath(o.json))):
            raise BadInput(f"{o.json}: the --json file's folder does not exist")
        x = open_logits(o)
        t = open_targets(o, x)
    except BadInput as e:
        print(f"ce-fast eval: error: {e}", file=sys.stderr)
        return 2
    rows = int(np.prod(x.shape[:-1], dtype=np.int64))
    row_bytes = x.shape[-1] * x.dtype.itemsize
    block = o.block_rows or default_block_rows(x.shape[-1], x.dtype.itemsize)
    acc = StreamingCrossEntropy(o.ignore_index)
    threads = _cpu._threads
    if o.threads is not None:
        _cpu.set_threads(o.threads)
    bar = _progress(rows, o.quiet)
    done = 0
    stop = threading.Event()
    # Ctrl-C only sets a flag, so a block is never cut in half: the loop stops after it.
    old = signal.signal(signal.SIGINT, lambda *_: stop.set()) if _main_thread() else None
    t0 = time.perf_counter()
    try:
        for done_now in acc._blocks(x, t, block):
            if bar is not None:
                bar.update(done_now - done)
                el = time.perf_counter() - t0
                bar.set_postfix_str(f"{done_now * row_bytes / max(el, 1e-9) / 1e9:.2f} GB/s", refresh=False)
            done = done_now
            if stop.is_set() and done < rows:
                raise KeyboardInterrupt
        if bar is not None:
            bar.refresh()  # the last rate and count, also for runs shorter than the refresh interval
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        r = acc.result()
        print(
            f"ce-fast eval: interrupted after {done} of {rows} rows; partial result over {r.tokens} tokens: "
            f"loss {_fmt(r.loss)} nats, perplexity {_fmt(r.perplexity, '.6g')}, accuracy {_fmt(r.accuracy)}",
            file=sys.stderr,
        )
        return 130
    except IndexError as e:
        print(f"ce-fast eval: error: {o.targets}: {e}", file=sys.stderr)
        return 2
    except (ValueError, TypeError) as e:
        print(f"ce-fast eval: error: {o.logits}: {e}", file=sys.stderr)
        return 2
    finally:
        if old is not None:
            signal.signal(signal.SIGINT, old)
        if bar is not None:
            bar.close()
        _cpu.set_threads(threads)
    seconds = time.perf_counter() - t0
    r = acc.result()
    nbytes = rows * row_bytes
    print(report(r, seconds, nbytes))
    if o.json:
        record = {
            "tokens": r.tokens,
            "loss": r.loss,
            "perplexity": r.perplexity,
            "bits_per_token": r.bits_per_token,
            "accuracy": r.accuracy,
            "correct": r.correct,
            "loss_sum": r.loss_sum,
            "rows": rows,
            "seconds": seconds,
            "gb_per_s": nbytes / seconds / 1e9 if seconds > 0 else None,
            "logits": {"path": o.logits, "shape": list(x.shape), "dtype": x.dtype.name},
            "targets": {"path": o.targets, "shape": list(t.shape), "dtype": t.dtype.name},
            "ignore_index": o.ignore_index,
            "state": acc.state_dict(),
        }
        with open(o.json, "w") as f:
            json.dump(record, f, indent=2)
            f.write("\n")
    return 0
