"""Autograd-aware distillation KL and focal loss for PyTorch tensors (class axis last),
re-exported by :mod:`ce_fast.torch`.

Each loss runs in two custom operators, ``ce_fast::kl_divergence`` /
``ce_fast::kl_divergence_backward`` and ``ce_fast::focal_loss`` /
``ce_fast::focal_loss_backward``, with fake (meta) implementations and autograd formulas
registered with ``torch.library.register_autograd``, so ``torch.compile(fullgraph=True)``
traces them. The forward saves O(rows) float64 statistics; the backward reads the logits
once more and writes the gradient. The teacher logits of the KL get a gradient too when
they require one (plain torch ops: one ``rows x C`` temporary, only when asked for).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Tuple

import torch
from torch import Tensor

from . import _focal, _kl
from ._types import KlStats, Stats

__all__ = ["kl_divergence", "focal_loss"]


def _out_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _as_tensor(a, like: Tensor, dtype: torch.dtype) -> Tensor:
    t = a if isinstance(a, Tensor) else torch.as_tensor(a, device=like.device)
    return t.to(dtype=dtype).contiguous()


def _engine_array(t: Tensor) -> Any:
    t = t.detach()
    if t.device.type == "cpu":
        return t.numpy()
    from ._engines import cuda

    return cuda.from_torch(t)


def _rows(x: Tensor) -> int:
    return math.prod(x.shape[:-1])


def _stack(arrays, like: Tensor) -> Tensor:
    return torch.stack([_as_tensor(a, like, torch.float64).reshape(-1) for a in arrays])


# ------------------------------------------------------------------ KL divergence


def _kl_spec(temperature, reverse, ignore_index, reduction) -> _kl.KlSpec:
    return _kl.KlSpec.make(temperature=temperature, reverse=reverse, ignore_index=ignore_index, reduction=reduction)


@torch.library.custom_op("ce_fast::kl_divergence", mutates_args=())
def _kl_forward(
    input: Tensor,
    teacher: Tensor,
    target: Optional[Tensor],
    temperature: float,
    reverse: bool,
    ignore_index: int,
    reduction: str,
) -> Tuple[Tensor, Tensor]:
    """(loss, stats): the loss as ce_fast.kl_divergence returns it and the per-row
    statistics (ms, ls, mt, lt, cross) as a float64 (5, rows) tensor."""
    spec = _kl_spec(temperature, reverse, ignore_index, reduction)
    loss, s = _kl._kl_loss_and_stats(input, teacher, target, spec)
    return _as_tensor(loss, input, _out_dtype(input)), _stack((s.ms, s.ls, s.mt, s.lt, s.cross), input)


@_kl_forward.register_fake
def _(input, teacher, target, temperature, reverse, ignore_index, reduction):
    loss = input.new_empty(input.shape[:-1] if reduction == "none" else (), dtype=_out_dtype(input))
    return loss, input.new_empty((5, _rows(input)), dtype=torch.float64)


@torch.library.custom_op("ce_fast::kl_divergence_backward", mutates_args=())
def _kl_backward_op(
    grad: Tensor,
    input: Tensor,
    teacher: Tensor,
    target: Optional[Tensor],
    stats: Tensor,
    temperature: float,
    reverse: bool,
    ignore_index: int,
    reduction: str,
) -> Tensor:
    """d(grad * loss)/d input from the saved statistics."""
    spec = _kl_spec(temperature, reverse, ignore_index, reduction)
    saved = KlStats(*(_engine_array(stats[i]) for i in range(5)))
    g = _kl._kl_grad_with_saved(input, teacher, target, saved, spec, grad_output=grad)
    return _as_tensor(g, input, input.dtype)


@_kl_backward_op.register_fake
def _(grad, input, teacher, target, stats, temperature, reverse, ignore_index, reduction):
    return torch.empty(input.shape, dtype=input.dtype, device=input.device)


def _kl_setup(ctx, inputs, output):
    input, teacher, target = inputs[:3]
    ctx.options = inputs[3:]
    ctx.save_for_backward(input, teacher, target, output[1])


def _teacher_grad(ctx, grad, input, teacher, target, stats):
    """d(grad * loss)/d teacher with torch ops: p (log p - log q - KL) / T (forward) or
    (p - q) / T (reverse), per counted row, times the row's incoming gradient."""
    temperature, reverse, ignore_index, reduction = ctx.options
    dt = _out_dtype(input)
    lq = torch.log_softmax(input.to(dt) / temperature, -1)
    lp = torch.log_softmax(teacher.to(dt) / temperature, -1)
    p, q = lp.exp(), lq.exp()
    if reverse:
        d = p - q
    else:
        kl = torch.where(p == 0, 0.0, p * (lp - lq)).sum(-1, keepdim=True)
        d = torch.where(p == 0, 0.0, p * (lp - lq - kl))
    valid = torch.ones(input.shape[:-1], dtype=torch.bool, device=input.device)
    if target is not None:
        valid = target != ignore_index
    if reduction == "none":
        g = grad.to(dt)
    else:
        g = grad.to(dt).expand(input.shape[:-1])
        if reduction == "mean":
            g = g / valid.sum()
    g = torch.where(valid, g, 0.0).unsqueeze(-1)
    return (d * g / temperature).to(teacher.dtype)


def _kl_backward(ctx, grad, _grad_stats):
    input, teacher, target, stats = ctx.saved_tensors
    gi = gt = None
    if ctx.needs_input_grad[0]:
        gi = _kl_backward_op(grad, input, teacher, target, stats, *ctx.options)
    if ctx.needs_input_grad[1]:
        gt = _teacher_grad(ctx, grad, input, teacher, target, stats)
    return gi, gt, None, None, None, None, None


_kl_forward.register_autograd(_kl_backward, setup_context=_kl_setup)


def kl_divergence(
    input: Tensor,
    teacher: Tensor,
    *,
    temperature: float = 1.0,
    reverse: bool = False,
    target: Optional[Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    """:func:`ce_fast.kl_divergence` with autograd: per row ``KL(p || q)`` with
    ``p = softmax(teacher / T)``, ``q = softmax(input / T)`` (class axis last), or
    ``KL(q || p)`` with ``reverse=True``. Not multiplied by ``T**2``: Hinton-style
    distillation multiplies the loss by it itself. ``target`` (optional, the CE labels)
    masks rows equal to ``ignore_index``; ``mean`` averages over counted rows.

    ``input`` gets its gradient ``(q - p) / T`` (forward KL); ``teacher`` gets one too if it
    requires grad (usually it is detached).
    """
    if not isinstance(input, Tensor) or not isinstance(teacher, Tensor):
        raise TypeError(
            f"input and teacher must be torch tensors, got {type(input).__name__} and {type(teacher).__name__}"
        )
    if target is not None and not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch tensor or None, got {type(target).__name__}")
    if torch.compiler.is_compiling():
        # Validated when the ops run (Dynamo cannot trace the checks on symbolic floats).
        options = (float(temperature), bool(reverse), int(ignore_index), reduction)
    else:
        s = _kl_spec(temperature, reverse, ignore_index, reduction)
        options = (s.temperature, s.reverse, s.ignore_index, s.reduction)
    return _kl_forward(input, teacher, target, *options)[0]


# ------------------------------------------------------------------ focal loss


@torch.library.custom_op("ce_fast::focal_loss", mutates_args=())
def _focal_forward(
    input: Tensor,
    target: Tensor,
    alpha: Optional[Tensor],
    gamma: float,
    ignore_index: int,
    reduction: str,
) -> Tuple[Tensor, Tensor]:
    """(loss, stats): the loss as ce_fast.focal_loss returns it and the per-row (mx, ls, zy)
    as a float64 (3, rows) tensor."""
    loss, s = _focal._focal_loss_and_stats(
        input, target, gamma=gamma, alpha=alpha, ignore_index=ignore_index, reduction=reduction
    )
    zy = s.zy if s.zy is not None else s.mx * 0.0
    return _as_tensor(loss, input, _out_dtype(input)), _stack((s.mx, s.ls, zy), input)


@_focal_forward.register_fake
def _(input, target, alpha, gamma, ignore_index, reduction):
    loss = input.new_empty(input.shape[:-1] if reduction == "none" else (), dtype=_out_dtype(input))
    return loss, input.new_empty((3, _rows(input)), dtype=torch.float64)


@torch.library.custom_op("ce_fast::focal_loss_backward", mutates_args=())
def _focal_backward_op(
    grad: Tensor,
    input: Tensor,
    target: Tensor,
    alpha: Optional[Tensor],
    stats: Tensor,
    gamma: float,
    ignore_index: int,
    reduction: str,
) -> Tensor:
    saved = Stats(mx=_engine_array(stats[0]), ls=_engine_array(stats[1]), zy=_engine_array(stats[2]))
    g = _focal._focal_grad_with_saved(
        input, target, saved, gamma=gamma, alpha=alpha, ignore_index=ignore_index, reduction=reduction, grad_output=grad
    )
    return _as_tensor(g, input, input.dtype)


@_focal_backward_op.register_fake
def _(grad, input, target, alpha, stats, gamma, ignore_index, reduction):
    return torch.empty(input.shape, dtype=input.dtype, device=input.device)


def _focal_setup(ctx, inputs, output):
    input, target, alpha = inputs[:3]
    ctx.options = inputs[3:]
    ctx.save_for_backward(input, target, alpha, output[1])


def _focal_backward(ctx, grad, _grad_stats):
    input, target, alpha, stats = ctx.saved_tensors
    gi = None
    if ctx.needs_input_grad[0]:
        gi = _focal_backward_op(grad, input, target, alpha, stats, *ctx.options)
    return gi, None, None, None, None, None


_focal_forward.register_autograd(_focal_backward, setup_context=_focal_setup)


def focal_loss(
    input: Tensor,
    target: Tensor,
    *,
    gamma: float = 2.0,
    alpha: Optional[Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    """:func:`ce_fast.focal_loss` with autograd: per row ``-alpha_y (1 - p_y)**gamma log p_y``,
    ``p = softmax(input)`` over the last axis; ``mean`` divides by the counted rows.
    ``gamma=0, alpha=None`` equals :func:`ce_fast.torch.cross_entropy`. ``alpha`` gets no
    gradient (as ``weight`` in cross-entropy)."""
    if not isinstance(input, Tensor) or not isinstance(target, Tensor):
        raise TypeError(
            f"input and target must be torch tensors, got {type(input).__name__} and {type(target).__name__}"
        )
    if alpha is not None and not isinstance(alpha, Tensor):
        raise TypeError(f"alpha must be a torch tensor or None, got {type(alpha).__name__}")
    if torch.compiler.is_compiling():
        options = (float(gamma), int(ignore_index), reduction)
    else:
        g = _focal._gamma(gamma)
        spec = _focal.LossSpec.make(ignore_index=ignore_index, reduction=reduction)
        options = (g, spec.ignore_index, spec.reduction)
    return _focal_forward(input, target, alpha, *options)[0]
