"""StreamingCrossEntropy over a logits file larger than this machine's memory.

    python benches/eval_larger_than_ram.py [--gib 24] [--classes 32000] [--dir /tmp]

Writes `--gib` GiB of float32 logits (one random 64 MiB block of rows repeated, so it is
quick to write), then streams the np.memmap through one ``update`` with the peak
resident set reset beforehand (/proc/self/clear_refs) and read afterwards (VmHWM).
The file holds the block k times, so the exact result must equal the block's own,
bit for bit. The file is deleted at the end.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from ce_fast import StreamingCrossEntropy, evaluate


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--gib", type=float, default=24.0)
    p.add_argument("--classes", type=int, default=32000)
    p.add_argument("--dir", default=tempfile.gettempdir())
    o = p.parse_args()
    C = o.classes
    block_rows = (64 << 20) // (C * 4)
    k = int(o.gib * 2**30) // (block_rows * C * 4)
    rows = k * block_rows
    rng = np.random.default_rng(0)
    block = (rng.standard_normal((block_rows, C), dtype=np.float32) * 2).astype(np.float32)
    yb = rng.integers(0, C, block_rows)
    yb[::10] = -100
    path = Path(o.dir) / "ce_fast_larger_than_ram.f32"
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    size = rows * C * 4 / 2**30
    print(f"machine memory {mem / 2**30:.1f} GiB; writing {rows}x{C} float32 = {size:.1f} GiB to {path}")
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(k):
            f.write(block.tobytes())
    print(f"written in {time.perf_counter() - t0:.0f} s")
    try:
        x = np.memmap(path, dtype=np.float32, mode="r", shape=(rows, C))
        y = np.tile(yb, k)
        Path("/proc/self/clear_refs").write_text("5")
        before = _status("VmRSS")
        t0 = time.perf_counter()
        r = StreamingCrossEntropy().update(x, y).result()
        dt = time.perf_counter() - t0
        growth = _status("VmHWM") - before
        ref = evaluate(block, yb)
        print(f"eval {rows * C * 4 / dt / 1e9:.2f} GB/s over {dt:.0f} s; peak RSS growth {growth / 2**20:.0f} MiB")
        print(f"result {r}")
        print(f"equals the one block's result bit for bit: {r.loss == ref.loss and r.accuracy == ref.accuracy}")
        del x
    finally:
        path.unlink()


if __name__ == "__main__":
    main()
