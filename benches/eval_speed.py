"""ce-fast eval's throughput against a plain read of the same page-cached file.

    python benches/eval_speed.py [--gib 2] [--classes 32000] [--dtype float32] [--repeat 3] [--dir /tmp]

Writes a logits file (random, `--gib` GiB) and targets, reads it once so it sits in the
page cache, then alternates, `--repeat` times: ce_fast._core.read_pass over a fresh
read-only np.memmap of the file (every page faulted in, every byte read once, on the
engine's threads) and `ce-fast eval` on the same file. Prints the best GB/s of each and
their ratio (the goal: eval >= 0.8 of the read). With --keep the files stay for reuse.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import ml_dtypes
import numpy as np

from ce_fast import _core, cli

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def write(path: Path, rows: int, C: int, dtype) -> None:
    rng = np.random.default_rng(0)
    mm = np.memmap(path, dtype=dtype, mode="w+", shape=(rows, C))
    step = max(1, (64 << 20) // (C * np.dtype(dtype).itemsize))
    for a in range(0, rows, step):
        b = min(rows, a + step)
        mm[a:b] = (rng.standard_normal((b - a, C), dtype=np.float32) * 2).astype(dtype)
    mm.flush()
    del mm


def read_gbs(path: Path, nbytes: int) -> float:
    a = np.memmap(path, dtype=np.uint8, mode="r")
    t0 = time.perf_counter()
    _core.read_pass(a)
    dt = time.perf_counter() - t0
    del a
    return nbytes / dt / 1e9


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--gib", type=float, default=2.0)
    p.add_argument("--classes", type=int, default=32000)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--dir", default=tempfile.gettempdir())
    p.add_argument("--keep", action="store_true")
    o = p.parse_args()
    dtype = DTYPES[o.dtype]
    C = o.classes
    rows = int(o.gib * 2**30) // (C * np.dtype(dtype).itemsize)
    path = Path(o.dir) / f"ce_fast_eval_{o.dtype}_{rows}x{C}.bin"
    tpath = Path(o.dir) / f"ce_fast_eval_targets_{rows}.npy"
    if not path.exists():
        write(path, rows, C, dtype)
    np.save(tpath, np.random.default_rng(1).integers(0, C, rows))
    nbytes = rows * C * np.dtype(dtype).itemsize
    read_gbs(path, nbytes)  # into the page cache
    reads, evals = [], []
    out = Path(o.dir) / "ce_fast_eval_result.json"
    for _ in range(o.repeat):
        reads.append(read_gbs(path, nbytes))
        args = ["eval", str(path), str(tpath), "--dtype", o.dtype, "--classes", str(C), "-q", "--json", str(out)]
        rc = cli.main(args)
        assert rc == 0
        evals.append(json.loads(out.read_text())["gb_per_s"])
    load = os.getloadavg()[0]
    print(
        f"{rows}x{C} {o.dtype} ({nbytes / 1e9:.2f} GB), threads {_core.default_threads()}, load avg {load:.1f}: "
        f"read {max(reads):.2f} GB/s, eval {max(evals):.2f} GB/s, ratio {max(evals) / max(reads):.2f} "
        f"(all reads {[round(v, 2) for v in reads]}, evals {[round(v, 2) for v in evals]})"
    )
    if not o.keep:
        path.unlink()
        tpath.unlink()
    out.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
