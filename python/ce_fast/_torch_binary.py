"""Autograd-aware elementwise losses for PyTorch tensors: binary cross-entropy with
logits and the sigmoid focal loss, as torch custom operators.

The forward op returns the loss only; the backward op reads ``input`` and ``target``
again and writes the gradient in one pass (nothing but references to the inputs is
saved). A floating ``target`` that requires grad gets ``d loss / d target`` from the
closed form in plain torch ops (it materialises temporaries of the input's size, only
when asked for); ``weight`` and ``pos_weight`` get none (PyTorch refuses them too).
Each op has a fake implementation and the formulas are registered with
``torch.library.register_autograd``, so ``torch.compile(fullgraph=True)`` traces them.
Double backward is not supported.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _binary

__all__ = ["binary_cross_entropy_with_logits", "sigmoid_focal_loss", "BCEWithLogitsLoss"]


def _out_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _tensor(a, like: Tensor, dtype: torch.dtype) -> Tensor:
    t = a if isinstance(a, Tensor) else torch.as_tensor(a, device=like.device)
    return t.to(dtype=dtype).contiguous()


def _loss_shape(input: Tensor, reduction: str):
    return input.shape if reduction == "none" else ()


# ------------------------------------------------------------------ BCE with logits


@torch.library.custom_op("ce_fast::binary_cross_entropy_with_logits", mutates_args=())
def _bce(
    input: Tensor, target: Tensor, weight: Optional[Tensor], pos_weight: Optional[Tensor], reduction: str
) -> Tensor:
    loss = _binary.binary_cross_entropy_with_logits(
        input, target, weight=weight, pos_weight=pos_weight, reduction=reduction
    )
    return _tensor(loss, input, _out_dtype(input))


@_bce.register_fake
def _(input, target, weight, pos_weight, reduction):
    return input.new_empty(_loss_shape(input, reduction), dtype=_out_dtype(input))


@torch.library.custom_op("ce_fast::binary_cross_entropy_with_logits_backward", mutates_args=())
def _bce_backward(
    grad: Tensor, input: Tensor, target: Tensor, weight: Optional[Tensor], pos_weight: Optional[Tensor], reduction: str
) -> Tensor:
    _, g = _binary.binary_cross_entropy_with_logits_and_grad(
        input, target, weight=weight, pos_weight=pos_weight, reduction=reduction, grad_output=grad
    )
    return _tensor(g, input, input.dtype)


@_bce_backward.register_fake
def _(grad, input, target, weight, pos_weight, reduction):
    return torch.empty(input.shape, dtype=input.dtype, device=input.device)


def _incoming(grad: Tensor, input: Tensor, reduction: str, dtype: torch.dtype) -> Tensor:
    g = grad.to(dtype)
    return g / input.numel() if reduction == "mean" else g


def _bce_target_grad(grad, input, target, weight, pos_weight, reduction):
    """d loss / d target = w * (-x - (pw - 1) * log sigmoid(x)), times the incoming gradient."""
    dt = _out_dtype(input)
    x = input.to(dt)
    d = -x
    if pos_weight is not None:
        d = d - (pos_weight.to(dt) - 1) * F.logsigmoid(x)
    if weight is not None:
        d = d * weight.to(dt)
    return (d * _incoming(grad, input, reduction, dt)).to(target.dtype)


def _bce_setup(ctx, inputs, output):
    input, target, weight, pos_weight, reduction = inputs
    ctx.reduction = reduction
    ctx.save_for_backward(input, target, weight, pos_weight)


def _bce_grad(ctx, grad):
    input, target, weight, pos_weight = ctx.saved_tensors
    gi = gt = None
    if ctx.needs_input_grad[0]:
        gi = _bce_backward(grad, input, target, weight, pos_weight, ctx.reduction)
    if ctx.needs_input_grad[1]:
        gt = _bce_target_grad(grad, input, target, weight, pos_weight, ctx.reduction)
    return gi, gt, None, None, None


_bce.register_autograd(_bce_grad, setup_context=_bce_setup)


# ------------------------------------------------------------------ sigmoid focal loss


@torch.library.custom_op("ce_fast::sigmoid_focal_loss", mutates_args=())
def _focal(input: Tensor, target: Tensor, alpha: float, gamma: float, reduction: str) -> Tensor:
    loss = _binary.sigmoid_focal_loss(input, target, alpha=alpha, gamma=gamma, reduction=reduction)
    return _tensor(loss, input, _out_dtype(input))


@_focal.register_fake
def _(input, target, alpha, gamma, reduction):
    return input.new_empty(_loss_shape(input, reduction), dtype=_out_dtype(input))


@torch.library.custom_op("ce_fast::sigmoid_focal_loss_backward", mutates_args=())
def _focal_backward(grad: Tensor, input: Tensor, target: Tensor, alpha: float, gamma: float, reduction: str) -> Tensor:
    _, g = _binary.sigmoid_focal_loss_and_grad(
        input, target, alpha=alpha, gamma=gamma, reduction=reduction, grad_output=grad
    )
    return _tensor(g, input, input.dtype)


@_focal_backward.register_fake
def _(grad, input, target, alpha, gamma, reduction):
    return torch.empty(input.shape, dtype=input.dtype, device=input.device)


def _focal_target_grad(grad, input, target, alpha, gamma, reduction):
    """d loss / d target: d(alpha_t) ce m^g + alpha_t (-x) m^g + alpha_t ce g m^(g-1) (q - p),
    m = t q + (1 - t) p, p = sigmoid(x), q = sigmoid(-x) (the m^(g-1) term is 0 at m = 0)."""
    dt = _out_dtype(input)
    x, t = input.to(dt), target.to(dt)
    p, q = torch.sigmoid(x), torch.sigmoid(-x)
    ce = ((1 - t) * x - torch.clamp(x, max=0)) + F.softplus(-x.abs())
    m = t * q + (1 - t) * p
    mg = m**gamma
    if gamma == 0:
        dmg = torch.zeros_like(m)
    else:
        dmg = torch.where(m > 0, gamma * m.clamp(min=torch.finfo(dt).tiny) ** (gamma - 1), torch.zeros_like(m))
    if alpha >= 0:
        at = alpha * t + (1 - alpha) * (1 - t)
        dat = 2 * alpha - 1
    else:
        at, dat = torch.ones_like(t), 0.0
    d = dat * ce * mg + at * (-x * mg + ce * dmg * (q - p))
    return (d * _incoming(grad, input, reduction, dt)).to(target.dtype)


def _focal_setup(ctx, inputs, output):
    input, target, alpha, gamma, reduction = inputs
    ctx.options = (alpha, gamma, reduction)
    ctx.save_for_backward(input, target)


def _focal_grad(ctx, grad):
    input, target = ctx.saved_tensors
    gi = gt = None
    if ctx.needs_input_grad[0]:
        gi = _focal_backward(grad, input, target, *ctx.options)
    if ctx.needs_input_grad[1]:
        gt = _focal_target_grad(grad, input, target, *ctx.options)
    return gi, gt, None, None, None


_focal.register_autograd(_focal_grad, setup_context=_focal_setup)


# ------------------------------------------------------------------ public functions


def binary_cross_entropy_with_logits(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor] = None,
    *,
    pos_weight: Optional[Tensor] = None,
    reduction: str = "mean",
) -> Tensor:
    """Autograd-aware :func:`ce_fast.binary_cross_entropy_with_logits`: the numbers of
    ``torch.nn.functional.binary_cross_entropy_with_logits`` (any shape, ``weight``
    broadcastable to the input, ``pos_weight`` along the last axis), float32 losses
    (float64 for float64 input), CPU and CUDA tensors. ``input`` and a floating ``target``
    get gradients; ``weight`` and ``pos_weight`` must not require grad (as in PyTorch)."""
    for name, w in (("weight", weight), ("pos_weight", pos_weight)):
        if w is not None and isinstance(w, Tensor) and w.requires_grad:
            raise ValueError(f"{name} must not require grad: the loss is not differentiable with respect to it")
    return _bce(input, target, weight, pos_weight, reduction)


def sigmoid_focal_loss(
    input: Tensor, target: Tensor, alpha: float = 0.25, gamma: float = 2.0, reduction: str = "none"
) -> Tensor:
    """Autograd-aware :func:`ce_fast.sigmoid_focal_loss`: the numbers of
    ``torchvision.ops.sigmoid_focal_loss`` (default ``reduction="none"``, a negative
    ``alpha`` turns the alpha weighting off), float32 losses (float64 for float64 input)."""
    return _focal(input, target, float(alpha), float(gamma), reduction)


class BCEWithLogitsLoss(torch.nn.Module):
    """Module form of :func:`binary_cross_entropy_with_logits` (as ``torch.nn.BCEWithLogitsLoss``)."""

    def __init__(
        self, weight: Optional[Tensor] = None, reduction: str = "mean", pos_weight: Optional[Tensor] = None
    ) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("pos_weight", pos_weight)
        self.reduction = reduction

    weight: Optional[Tensor]
    pos_weight: Optional[Tensor]

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return binary_cross_entropy_with_logits(
            input, target, self.weight, pos_weight=self.pos_weight, reduction=self.reduction
        )
