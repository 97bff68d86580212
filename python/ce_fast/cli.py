"""The ``ce-fast`` command line: its options and ``main``. The benchmark itself is
:mod:`ce_fast.bench` (what is timed, how, and how it is reported).

``main(argv)`` returns the exit code: 0 on success, 2 for bad options, 3 when the
requested device cannot be benched here (no CuPy / no CUDA device).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from . import bench
from ._core import MAX_THREADS
from .bench.training import TRAINING_SIZES


def _option(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parse`` as an argparse type: its ValueError message becomes the option's error."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = parse.__name__
    return convert


def _int_at_least(low: int, high: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {v}")
        if high is not None and v > high:
            raise argparse.ArgumentTypeError(f"expected an integer <= {high}, got {v}")
        return v

    return parse


def build_parser() -> argparse.ArgumentParser:
    """The ``ce-fast`` argument parser (sub-command ``bench``)."""
    p = argparse.ArgumentParser(
        prog="ce-fast", description="ce_fast: streaming cross-entropy over huge logits arrays (class axis last)."
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    b = sub.add_parser(
        "bench",
        help="time ce_fast against NumPy and PyTorch; table of time, GB/s, share of a read pass, speed-ups",
        description="Time ce_fast.cross_entropy (fwd) and cross_entropy_and_grad (fwd+bwd, fresh gradient and "
        "in place) against NumPy and PyTorch on random logits; report time, GB/s, share of a plain read pass "
        "of the same bytes, speed-ups and peak memory growth. With no options: sizes "
        f"{bench.DEFAULT_SIZES}, dtypes {bench.DEFAULT_DTYPES} (a few minutes). With --device cuda: logits made "
        f"on the GPU (sizes {bench.GPU_DEFAULT_SIZES}), CUDA-event timing, a read pass and a device copy as "
        "yardsticks, PyTorch F.cross_entropy eager and torch.compile as baselines. Progress goes to stderr, "
        "the table to stdout.",
    )
    positive, nonneg = _int_at_least(1), _int_at_least(0)
    add = b.add_argument
    add(
        "--sizes",
        type=_option(bench.parse_sizes),
        default=None,
        help=f"comma-separated logits shapes ROWSxCLASSES (or AxBxCLASSES) (default: {bench.DEFAULT_SIZES}; "
        f"with --device cuda: {bench.GPU_DEFAULT_SIZES})",
    )
    add(
        "--dtype",
        "--dtypes",
        dest="dtypes",
        type=_option(bench.parse_dtypes),
        default=bench.DEFAULT_DTYPES,
        help="comma-separated: float32, bfloat16, float16, float64 (default: %(default)s)",
    )
    add(
        "--ops",
        type=_option(bench.parse_ops),
        default=bench.DEFAULT_OPS,
        help="comma-separated: fwd, fwd+bwd, inplace (default: %(default)s)",
    )
    add(
        "--threads",
        type=_int_at_least(0, MAX_THREADS),
        default=None,
        help="threads for ce_fast, its read pass and PyTorch (default: each library's default)",
    )
    add(
        "--repeat",
        type=positive,
        default=None,
        help="timed runs per measurement (after --warmup) (default: 3; with --device cuda: 20)",
    )
    add("--warmup", type=nonneg, default=None, help="untimed warm-up runs (default: 1; with --device cuda: 3)")
    add(
        "--baseline-repeat",
        type=positive,
        default=None,
        help="timed runs of the NumPy / PyTorch baselines (default: --repeat, but once when slow)",
    )
    add(
        "--slow",
        type=float,
        default=1.0,
        help="a baseline whose first run takes longer (seconds) is timed once (default: %(default)s)",
    )
    add("--no-numpy", dest="numpy", action="store_false", help="skip the NumPy baseline")
    add("--no-torch", dest="torch", action="store_false", help="skip the PyTorch baseline")
    add("--no-copy", dest="copy", action="store_false", help="skip the copy yardstick")
    add("--no-compile", dest="compile", action="store_false", help="skip the torch.compile baseline (--device cuda)")
    add("--device", choices=sorted(bench.DEVICES), default="cpu", help="where the logits live (default: %(default)s)")
    add(
        "--arrays",
        choices=["torch", "cupy"],
        default=None,
        help="--device cuda inputs: torch CUDA tensors or CuPy arrays (default: torch when PyTorch has "
        "CUDA, else cupy; bfloat16 needs torch)",
    )
    add(
        "--training",
        type=_option(_training_sizes),
        default=None,
        help="sizes of the training-step table (ce_fast.torch fwd+bwd vs F.cross_entropy, CPU), 'none' to "
        f"skip it (default: {TRAINING_SIZES} when --sizes is not given, else none)",
    )
    add("--seed", type=int, default=0, help="random seed of the logits and targets (default: %(default)s)")
    add("--json", metavar="PATH", default=None, help="also write machine-readable results here")
    add("--markdown", metavar="PATH", default=None, help="also write the table as Markdown here")
    add("-q", "--quiet", action="store_true", help="no progress messages on stderr")
    return p


def _to_config(ns: argparse.Namespace, argv: Sequence[str]) -> bench.Config:
    """The ``bench`` options with their device-dependent defaults filled in."""
    return bench.Config.create(
        device=ns.device,
        sizes=ns.sizes,
        dtypes=ns.dtypes,
        ops=ns.ops,
        repeat=ns.repeat,
        warmup=ns.warmup,
        argv=argv,
        threads=ns.threads,
        numpy=ns.numpy,
        torch=ns.torch,
        copy=ns.copy,
        slow_s=ns.slow,
        baseline_repeat=ns.baseline_repeat,
        seed=ns.seed,
        compile=ns.compile,
        arrays=ns.arrays,
        training=_training_sizes(TRAINING_SIZES) if ns.training is None and ns.sizes is None else ns.training or [],
    )


def _training_sizes(text: str) -> list:
    """The training-step table's sizes; "none" for no table."""
    return [] if text.strip().lower() == "none" else bench.parse_sizes(text)


def _bench(ns: argparse.Namespace, argv: Sequence[str]) -> int:
    cfg = _to_config(ns, argv)
    bad = cfg.problem()
    if bad:
        print(f"ce-fast bench: error: {bad}", file=sys.stderr)
        return 2
    try:
        results = bench.run_bench(cfg, quiet=ns.quiet)
    except bench.DeviceUnavailable as e:
        print(f"ce-fast: {e}", file=sys.stderr)
        return 3
    print(bench.format_table(results))
    if ns.json:
        with open(ns.json, "w") as f:
            f.write(bench.format_json(results))
    if ns.markdown:
        with open(ns.markdown, "w") as f:
            f.write(bench.format_markdown(results))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``ce-fast``; returns the exit code (2 for bad options)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        ns = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a bad option (2)
        return int(e.code or 0)
    if ns.command is None:
        parser.print_help()
        return 2
    if ns.command == "bench":
        return _bench(ns, argv)
    parser.error(f"unknown command {ns.command}")  # pragma: no cover
    return 2


if __name__ == "__main__":
    sys.exit(main())
