"""Vocab-parallel cross-entropy over torch.distributed: each rank holds a slice of the
class axis, the ranks exchange a few numbers per row, never the logits.

Per call: one all-reduce of the shard bounds (``4 * world_size`` int64: every rank
checks the tiling, so a bad one raises on every rank instead of hanging), one max
all-reduce of one float64 per row and one sum all-reduce of two float64 per row (three
with label smoothing). Backward needs no communication: each rank's gradient follows
from the combined per-row statistics saved by the forward pass.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from . import _batch, _errors, _shards
from ._spec import LossSpec
from ._types import Stats

__all__ = ["vocab_parallel_cross_entropy", "comm_bytes"]

_SLOT = 4  # per rank in the bounds all-reduce: start, end, rows, refused


def comm_bytes(rows: int, world_size: int, label_smoothing: float = 0.0) -> int:
    """Bytes each rank contributes to the all-reduces of one forward call (the payloads;
    a ring all-reduce moves about twice that over the wire)."""
    per_row = 1 + (3 if label_smoothing > 0.0 else 2)
    return 8 * (_SLOT * world_size) + 8 * per_row * rows


@torch.compiler.disable  # collectives and host checks: Dynamo calls it eagerly, one graph break
def vocab_parallel_cross_entropy(
    logits_shard: Tensor,
    target: Tensor,
    *,
    vocab_start: int,
    group: Any | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    reduction: str = "mean",
    weight: Tensor | None = None,
) -> Tensor:
    """Cross-entropy of logits split along the class axis over a torch.distributed group.

    Each rank of ``group`` (default: the world) holds the columns
    ``[vocab_start, vocab_start + C_local)`` of the full ``(*batch, V)`` logits as
    ``logits_shard`` of shape ``(*batch, C_local)``; shards may differ in width and must
    tile ``[0, V)`` exactly (checked on every call: otherwise ``ValueError`` on every
    rank). ``target`` holds full-vocabulary class indices of shape ``batch``, the same on
    every rank. Every rank returns the loss :func:`ce_fast.torch.cross_entropy` gives on
    the gathered logits, and backward gives each rank the gradient of its own shard.

    Each rank computes per-row statistics of its shard with the ce_fast engine (max,
    log-sum relative to it, the target logit where the target falls in the shard, the
    smoothing sum); three all-reduces of O(rows) numbers combine them (see
    :func:`comm_bytes`); no logits cross the wire. Backward is local: one read and one
    write of the shard, no communication. Use gloo for CPU tensors and NCCL for CUDA
    tensors.

    Parameters
    ----------
    logits_shard : ``(*batch, C_local)`` float32 / float16 / bfloat16 / float64 tensor.
    target : integer tensor of shape ``batch`` (indices into the full vocabulary).
    vocab_start : the first vocabulary index this rank holds.
    group : the ``torch.distributed`` process group (default: the world).
    ignore_index, label_smoothing, z_loss, reduction : as :func:`ce_fast.torch.cross_entropy`.
    weight : class weights are not supported: anything but None raises ``ValueError``.
        Soft (probability) targets raise ``ValueError`` as well.

    Returns
    -------
    The loss, as ``cross_entropy`` on the gathered logits: 0-d for mean / sum, shape
    ``batch`` for none; float32 (float64 for float64 logits); on the shard's device.

    Raises
    ------
    ValueError on every rank when any rank's arguments are refused (its own exception is
    raised there), when the shards do not tile the vocabulary or when the row counts
    differ; IndexError (on every rank) for a target outside ``[0, V)`` that is not
    ``ignore_index``.

    torch.compile: the function is ``torch.compiler.disable``-d, so a compiled model calls
    it eagerly with one graph break and compiles the code around it, forward and backward
    (checked: same loss and gradients as eager); ``fullgraph=True`` raises Dynamo's
    ``Unsupported``. Traced as it stands Dynamo breaks the graph 13 times: the tiling check
    reads the all-reduced bounds on the host to raise on every rank, and the engine's
    statistics come back as NumPy / CuPy arrays. The functional collectives
    (``torch.distributed._functional_collectives``) would trace the two per-row
    all-reduces, but not that host check.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("vocab_parallel_cross_entropy needs torch.distributed: call init_process_group first")
    err: Exception | None = None
    spec = None
    try:
        spec = _check_local(logits_shard, target, vocab_start, weight, ignore_index, label_smoothing, z_loss, reduction)
    except (TypeError, ValueError) as exc:
        err = exc
    classes = _check_tiling(logits_shard, target, vocab_start, group, err)
    assert spec is not None  # _check_tiling raised otherwise
    t = target.reshape(-1)
    bad = (t != spec.ignore_index) & ((t < 0) | (t >= classes))
    if bool(bad.any()):
        flat = int(torch.nonzero(bad)[0, 0])
        pos = (
            tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), tuple(target.shape))) if target.dim() else ()
        )
        raise _errors.index_error(pos, int(t[flat]), classes, spec.ignore_index)
    return _VocabParallel.apply(logits_shard, target, int(vocab_start), classes, group, spec)


def _check_local(shard, target, vocab_start, weight, ignore_index, label_smoothing, z_loss, reduction) -> LossSpec:
    """Everything one rank can check alone."""
    spec = LossSpec.make(ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss)
    if weight is not None:
        raise ValueError("class weights are not supported by vocab_parallel_cross_entropy")
    if not isinstance(shard, Tensor) or not isinstance(target, Tensor):
        raise TypeError(
            f"logits_shard and target must be torch tensors, got {type(shard).__name__} and {type(target).__name__}"
        )
    if isinstance(vocab_start, bool) or not isinstance(vocab_start, numbers.Integral) or vocab_start < 0:
        raise ValueError(f"vocab_start must be an int >= 0, got {vocab_start!r}")
    if target.is_floating_point():
        raise _shards.soft_target_error()
    if target.dtype == torch.bool or target.is_complex():
        raise TypeError(f"target dtype {target.dtype} is not supported; expected an integer dtype (class indices)")
    _batch.logits_operand(shard)  # dtype and at least one class column
    if tuple(target.shape) != tuple(shard.shape[:-1]):
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match logits_shard shape {tuple(shard.shape)}: "
            f"expected {tuple(shard.shape[:-1])} (the class axis is the last axis)"
        )
    if target.device != shard.device:
        raise ValueError(f"logits_shard is on {shard.device} but target is on {target.device}")
    return spec


def _comm_device(shard: Any, group: Any) -> torch.device:
    if "nccl" in str(dist.get_backend(group)):
        if isinstance(shard, Tensor) and shard.device.type == "cuda":
            return shard.device
        return torch.device("cuda", torch.cuda.current_device())
    return shard.device if isinstance(shard, Tensor) else torch.device("cpu")


def _check_tiling(shard: Any, target: Any, vocab_start: Any, group: Any, err: Exception | None) -> int:
    """All-reduces every rank's (start, end, rows, refused) and checks them on every
    rank alike; returns the vocabulary size."""
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    info = torch.zeros(_SLOT * world, dtype=torch.int64, device=_comm_device(shard, group))
    if err is None:
        rows = target.numel()
        info[_SLOT * rank : _SLOT * rank + 3] = torch.tensor([vocab_start, vocab_start + shard.shape[-1], rows])
    else:
        info[_SLOT * rank + 3] = 1
    dist.all_reduce(info, op=dist.ReduceOp.SUM, group=group)
    slots = info.cpu().reshape(world, _SLOT).tolist()
    refused = [r for r, s in enumerate(slots) if s[3]]
    if err is not None:
        raise err
    if refused:
        raise ValueError(f"vocab_parallel_cross_entropy: rank(s) {refused} refused their arguments (see their error)")
    rows = {s[2] for s in slots}
    if len(rows) != 1:
        raise ValueError(f"every rank must hold the same rows; row counts by rank: {[s[2] for s in slots]}")
    bounds = sorted((s[0], s[1], r) for r, s in enumerate(slots))
    edge = 0
    for start, end, r in bounds:
        if start != edge:
            what = "a gap" if start > edge else "an overlap"
            raise ValueError(
                f"the shards do not tile the vocabulary: {what} at column {min(start, edge)} "
                f"(rank {r} holds [{start}, {end})); shards by rank: {[(s[0], s[1]) for s in slots]}"
            )
        edge = end
    return edge


def _engine_array(t: Tensor) -> Any:
    t = t.detach().contiguous()
    if t.device.type == "cpu":
        return t.numpy()
    from ._engines import cuda

    return cuda.from_torch(t)


def _as_tensor(a: Any, like: Tensor) -> Tensor:
    return a if isinstance(a, Tensor) else torch.as_tensor(a, device=like.device)


class _VocabParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, shard, target, start, classes, group, spec):
        width = shard.shape[-1]
        local = _shards.local_target(target, start, width, spec.ignore_index)
        b, st = _shards.shard_stats(shard.detach(), local, spec)
        dev = shard.device
        stats = Stats(
            mx=_as_tensor(st.mx, shard),
            ls=_as_tensor(st.ls, shard),
            zy=_as_tensor(st.zy, shard),
            swz=None if st.swz is None else _as_tensor(st.swz, shard),
        )
        p = _shards.partial(stats, width, torch)
        big_m = p[0].clone()
        dist.all_reduce(big_m, op=dist.ReduceOp.MAX, group=group)
        s, zy, swz = _shards.rescale(p, width, big_m, torch)
        smoothing = spec.label_smoothing > 0.0
        sums = torch.stack([s, zy, swz] if smoothing else [s, zy])
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
        whole = _shards.finish(big_m, sums[0], sums[1], sums[2] if smoothing else torch.zeros_like(s), torch)
        valid = target.reshape(-1) != spec.ignore_index
        engine_whole = Stats(
            mx=_engine_array(whole.mx),
            ls=_engine_array(whole.ls),
            zy=_engine_array(whole.zy),
            swz=_engine_array(whole.swz),
        )
        bg = _shards.global_batch(b, classes, _engine_array(valid))
        loss = b.engine.wrap(_shards.reduce(bg, spec, _shards.loss_rows(bg, spec, engine_whole)), b.x)
        ctx.spec = spec
        ctx.classes = classes
        ctx.save_for_backward(shard, local, valid, whole.mx, whole.ls)
        out_dtype = torch.float64 if shard.dtype == torch.float64 else torch.float32
        return _as_tensor(loss, shard).to(device=dev, dtype=out_dtype)

    @staticmethod
    def backward(ctx, grad):
        shard, local, valid, mx, ls = ctx.saved_tensors
        b = _shards.shard_grad_batch(shard.detach(), local, ctx.spec, grad)
        whole = Stats(mx=_engine_array(mx), ls=_engine_array(ls))
        g = _shards.gradient(b, ctx.spec, ctx.classes, _engine_array(valid), whole)
        return _as_tensor(g, shard), None, None, None, None, None
