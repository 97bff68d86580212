"""GPU benchmark of ce_fast's CUDA engine: ``ce-fast bench --device cuda`` as a script.

    python benches/bench_gpu.py
    python benches/bench_gpu.py --sizes 16384x128256 --dtypes bfloat16 --iters 50
    python benches/bench_gpu.py --json gpu.json --markdown benches/RESULTS_GPU.md

The benchmark itself lives in the package (ce_fast.bench.cuda, run by ``ce-fast bench
--device cuda``) so that it ships in the wheel and exists once; this script only
passes its arguments on. For each ROWS x CLASSES (default 16384 x {32000, 128256,
262144}) and dtype (default float32 and bfloat16) it measures with CUDA events
(median of --repeat runs after --warmup runs): a read pass and a device copy of the
logits, ce_fast's forward (GB/s and share of the read pass), the fused loss +
gradient into a fresh buffer and in place (GB/s and share of the copy), and PyTorch
F.cross_entropy eager (forward; forward + backward) and torch.compile-d. Cells that
run out of device memory read "OOM"; a failing torch.compile reads "n/a".

Every ``ce-fast bench`` option is accepted (``--help`` lists them). Kept from this
script's earlier options: ``--iters N`` (= ``--repeat N``) and ``--no-check``
(ignored: the 64-row check against float64 NumPy is untimed and always runs).
Exit codes are ``ce-fast``'s: 3 without CuPy or a CUDA device.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def cli_args(argv: Sequence[str]) -> list[str]:
    """This script's arguments as ``ce-fast`` arguments."""
    out = ["bench", "--device", "cuda"]
    args = list(argv)
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--iters":
            out.append("--repeat")
        elif a.startswith("--iters="):
            out.append("--repeat=" + a.split("=", 1)[1])
        elif a == "--no-check":
            pass
        elif a == "--device" or a.startswith("--device="):
            if a == "--device":
                i += 1  # always cuda here
        else:
            out.append(a)
        i += 1
    return out


def main(argv: Sequence[str] | None = None) -> int:
    from ce_fast import cli

    return cli.main(cli_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
