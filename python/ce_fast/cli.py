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
from ._core import MAX_THREADS, simd_level
from .bench.losses import DEFAULT_LOSS_SIZES, LOSSES, bench_loss, format_loss_table
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
        "--loss",
        choices=sorted({*LOSSES, "bce"}),
        default="ce",
        help="the loss to bench (default: %(default)s, the full cross-entropy bench); another name times that "
        "loss against the PyTorch way of computing it and a read pass of its inputs (CPU; default size "
        f"{DEFAULT_LOSS_SIZES}; bce: binary_cross_entropy_with_logits at 16384x4096)",
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
    add(
        "--plot",
        metavar="PATH",
        default=None,
        help="also draw GB/s against vocabulary size (ce_fast, NumPy, PyTorch, the read pass as the roof) into "
        "this PNG; without --sizes the sizes are 1024 rows x 8k..256k classes (needs ce_fast[plot])",
    )
    add("-q", "--quiet", action="store_true", help="no progress messages on stderr")
    _eval_parser(sub)
    return p


def _eval_parser(sub: Any) -> None:
    """``ce-fast eval LOGITS TARGETS`` (the work is in ce_fast._eval_cli)."""
    e = sub.add_parser(
        "eval",
        help="cross-entropy, perplexity and top-1 accuracy of logits stored in a file",
        description="Stream LOGITS (.npy memory-mapped, .safetensors, or raw binary with --dtype and --classes; "
        "class axis last, any size) against integer TARGETS (.npy, .safetensors or raw) and print tokens, loss, "
        "perplexity, bits/token, accuracy, time and GB/s. Progress (rows, GB/s, ETA) goes to stderr. Exit "
        "status 2 for bad input (one line naming the file), 130 when interrupted (partial result on stderr).",
    )
    add = e.add_argument
    add("logits", metavar="LOGITS", help="logits file: .npy, .safetensors, or raw binary (needs --dtype, --classes)")
    add("targets", metavar="TARGETS", help="integer targets: .npy, .safetensors, or raw binary (--target-dtype)")
    add("--key", default=None, help="tensor name in a .safetensors LOGITS file (default: its only tensor)")
    add("--target-key", default=None, help="tensor name in a .safetensors TARGETS file (default: its only tensor)")
    add("--dtype", choices=["float32", "float16", "bfloat16", "float64"], default=None, help="dtype of raw logits")
    add("--classes", type=_int_at_least(1), default=None, help="classes per row of raw logits")
    add(
        "--target-dtype",
        choices=["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"],
        default="int64",
        help="dtype of raw targets (default: %(default)s)",
    )
    add("--ignore-index", type=int, default=-100, help="target value of rows left out (default: %(default)s)")
    add("--json", metavar="PATH", default=None, help="also write the result as one JSON object here")
    add("--block-rows", type=_int_at_least(1), default=None, help="rows per block (default: about 64 MiB of logits)")
    add("--threads", type=_int_at_least(0, MAX_THREADS), default=None, help="CPU threads (default: all)")
    add("-q", "--quiet", action="store_true", help="no progress bar on stderr")


def _eval(ns: argparse.Namespace) -> int:
    from ._eval_cli import Options, run

    return run(
        Options(
            logits=ns.logits,
            targets=ns.targets,
            key=ns.key,
            target_key=ns.target_key,
            dtype=ns.dtype,
            classes=ns.classes,
            target_dtype=ns.target_dtype,
            ignore_index=ns.ignore_index,
            json=ns.json,
            block_rows=ns.block_rows,
            threads=ns.threads,
            quiet=ns.quiet,
        )
    )


def _to_config(ns: argparse.Namespace, argv: Sequence[str]) -> bench.Config:
    """The ``bench`` options with their device-dependent defaults filled in."""
    sizes = ns.sizes
    if sizes is None and getattr(ns, "plot", None):
        from .bench.plot import PLOT_SIZES

        sizes = PLOT_SIZES
    return bench.Config.create(
        device=ns.device,
        sizes=sizes,
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


def _bench_bce(ns: argparse.Namespace) -> int:
    """``--loss bce``: ce_fast.bench.binary, on the CPU."""
    from .bench import binary

    if ns.device != "cpu":
        print("ce-fast bench: error: --loss bce benches the CPU engine only", file=sys.stderr)
        return 2
    sizes = ns.sizes or bench.parse_sizes(binary.DEFAULT_SIZES)
    rows = binary.run_bce(
        sizes,
        ns.dtypes,
        repeat=ns.repeat or 3,
        warmup=1 if ns.warmup is None else ns.warmup,
        threads=ns.threads,
        seed=ns.seed,
        quiet=ns.quiet,
    )
    print(binary.format_bce(rows))
    if ns.json:
        import json

        with open(ns.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


def _bench_loss(ns: argparse.Namespace) -> int:
    """``--loss NAME`` (not ce): that loss against PyTorch and the read pass, on the CPU."""
    if ns.device != "cpu":
        print(f"ce-fast bench: error: --loss {ns.loss} benches the CPU engine only", file=sys.stderr)
        return 2
    import json

    records = bench_loss(
        ns.loss,
        ns.sizes or bench.parse_sizes(DEFAULT_LOSS_SIZES),
        ns.dtypes,
        repeat=ns.repeat or 3,
        warmup=1 if ns.warmup is None else ns.warmup,
        threads=ns.threads or 0,
        torch=ns.torch,
        seed=ns.seed,
        quiet=ns.quiet,
    )
    print(format_loss_table(records))
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump({"machine": {"simd": simd_level()}, "losses": records}, f, indent=1)
    return 0


def _training_sizes(text: str) -> list:
    """The training-step table's sizes; "none" for no table."""
    return [] if text.strip().lower() == "none" else bench.parse_sizes(text)


def _bench(ns: argparse.Namespace, argv: Sequence[str]) -> int:
    if ns.loss == "bce":
        return _bench_bce(ns)
    if getattr(ns, "loss", "ce") != "ce":
        return _bench_loss(ns)
    cfg = _to_config(ns, argv)
    bad = cfg.problem()
    if bad:
        print(f"ce-fast bench: error: {bad}", file=sys.stderr)
        return 2
    if ns.plot:
        from .bench import plot

        try:
            plot.require_matplotlib()  # before the bench runs, not after
        except plot.PlotUnavailable as e:
            print(f"ce-fast bench: error: {e}", file=sys.stderr)
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
    if ns.plot:
        plot.plot(results, ns.plot)
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
    if ns.command == "eval":
        return _eval(ns)
    parser.error(f"unknown command {ns.command}")  # pragma: no cover
    return 2


if __name__ == "__main__":
    sys.exit(main())
