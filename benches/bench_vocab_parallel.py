"""Vocab-parallel cross-entropy: bytes communicated and time per call, split over
processes (gloo on localhost) against one process holding the whole logits.

    python benches/bench_vocab_parallel.py                      # 4096 x 128256 float32, 2 ranks
    python benches/bench_vocab_parallel.py --rows 1024 --classes 32000 --ranks 3 --repeat 5

Each rank holds an equal slice of the class axis and runs with --threads engine
threads (default: the machine's cores divided among the ranks, so both set-ups use
the same cores). Bytes are counted at torch.distributed.all_reduce (the payload each
rank contributes; a ring all-reduce moves about twice that). Times are medians of
--repeat calls after one warm-up, every rank starting together (a barrier).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time
from datetime import timedelta


def _timed(fn, repeat):
    import torch.distributed as dist

    out = []
    for _ in range(repeat + 1):
        if dist.is_initialized():
            dist.barrier()
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out[1:])


def _inputs(rows, classes, start, width):
    import torch

    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, classes, (rows,), generator=g)
    shard = torch.randn(rows, width, generator=torch.Generator().manual_seed(start + 1))
    return shard, target


def _rank(rank, world, port, args, q):
    import torch
    import torch.distributed as dist

    import ce_fast
    import ce_fast.torch as cet

    ce_fast.set_threads(args.threads or max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=600)
    )
    width = args.classes // world + (1 if rank < args.classes % world else 0)
    start = sum(args.classes // world + (1 if r < args.classes % world else 0) for r in range(rank))
    shard, target = _inputs(args.rows, args.classes, start, width)
    sent = [0, 0]
    all_reduce = dist.all_reduce

    def counting(tensor, *a, **k):
        sent[0] += tensor.numel() * tensor.element_size()
        sent[1] += 1
        return all_reduce(tensor, *a, **k)

    dist.all_reduce = counting
    with torch.no_grad():
        cet.vocab_parallel_cross_entropy(shard, target, vocab_start=start)
    per_call = list(sent)
    leaf = shard.clone().requires_grad_()

    def fwd():
        with torch.no_grad():
            cet.vocab_parallel_cross_entropy(shard, target, vocab_start=start)

    def fwd_bwd():
        leaf.grad = None
        cet.vocab_parallel_cross_entropy(leaf, target, vocab_start=start).backward()

    res = dict(
        rank=rank,
        bytes=per_call[0],
        all_reduces=per_call[1],
        forward_s=_timed(fwd, args.repeat),
        forward_backward_s=_timed(fwd_bwd, args.repeat),
        threads=ce_fast.get_threads(),
    )
    dist.all_reduce = all_reduce
    dist.destroy_process_group()
    q.put(res)


def _single(args):
    import torch

    import ce_fast
    import ce_fast.torch as cet

    ce_fast.set_threads(args.threads_single or 0)
    logits, target = _inputs(args.rows, args.classes, 0, args.classes)
    leaf = logits.clone().requires_grad_()

    def fwd():
        with torch.no_grad():
            cet.cross_entropy(logits, target)

    def fwd_bwd():
        leaf.grad = None
        cet.cross_entropy(leaf, target).backward()

    return dict(
        forward_s=_timed(fwd, args.repeat),
        forward_backward_s=_timed(fwd_bwd, args.repeat),
        threads=ce_fast.get_threads(),
    )


def machine_info():
    """CPU model (with family and model numbers), cores and library versions."""
    import platform

    import torch

    import ce_fast

    fields = {}
    with open("/proc/cpuinfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
            if not line.strip():
                break
    cpu = f"{fields.get('model name')} (family {fields.get('cpu family')}, model {fields.get('model')})"
    return dict(
        cpu_model=cpu,
        cores=os.cpu_count(),
        torch=torch.__version__,
        ce_fast=ce_fast.__version__,
        platform=platform.platform(),
    )


def main(argv=None):
    import torch.multiprocessing as mp

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--classes", type=int, default=128256)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="engine threads per rank (0: cores / ranks)")
    p.add_argument("--threads-single", type=int, default=0, help="engine threads of the one process (0: all)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)

    single = _single(args)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, args.ranks, port, args, q)) for r in range(args.ranks)]
    for pr in procs:
        pr.start()
    ranks = sorted((q.get(timeout=1800) for _ in procs), key=lambda r: r["rank"])
    for pr in procs:
        pr.join()
    logits_bytes = args.rows * args.classes * 4
    out = dict(
        rows=args.rows,
        classes=args.classes,
        ranks=args.ranks,
        single=single,
        split=ranks,
        logits_bytes=logits_bytes,
        machine=machine_info(),
    )
    print(out["machine"])
    print(f"{args.rows} x {args.classes} float32 ({logits_bytes / 2**30:.2f} GiB of logits)")
    print(
        f"one process, {single['threads']} threads: forward {single['forward_s'] * 1e3:.1f} ms, "
        f"forward+backward {single['forward_backward_s'] * 1e3:.1f} ms"
    )
    for r in ranks:
        print(
            f"rank {r['rank']} of {args.ranks}, {r['threads']} threads: {r['all_reduces']} all-reduces, "
            f"{r['bytes']} bytes sent per call ({r['bytes'] / args.rows:.1f} per row); forward "
            f"{r['forward_s'] * 1e3:.1f} ms, forward+backward {r['forward_backward_s'] * 1e3:.1f} ms"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2, default=str)
    return out


if __name__ == "__main__":
    main()
