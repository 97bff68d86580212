"""Autograd-aware cross-entropy for PyTorch tensors, class axis LAST.

``ce_fast.torch.cross_entropy`` and ``ce_fast.torch.CrossEntropyLoss`` are drop-in
replacements for ``torch.nn.functional.cross_entropy`` / ``torch.nn.CrossEntropyLoss``
(same options, same numbers) with two differences:

- **The class axis is the last axis.** ``input`` has shape ``(*batch, C)`` and an
  integer ``target`` has shape ``batch``; ``(B, T, V)`` language-model logits need no
  transpose. PyTorch puts C at dim 1 for k-dimensional input: ``cross_entropy(z, y)``
  here equals ``F.cross_entropy(z.movedim(-1, 1), y)``. For ``(N, C)`` or ``(C,)`` input
  the two agree as they are.
- Three more keyword options of the ce_fast engine: ``z_loss``, ``softcap`` and
  ``logit_scale`` (see :func:`ce_fast.cross_entropy`), and ``inplace_backward``.

Tensors may be float32, float16, bfloat16 or float64 (CPU), of any layout (non-contiguous
views work without a copy of the logits) and any number of leading dims. The work is done
by the public ce_fast functions, which pick the engine from the tensor's device (the Rust
engine for CPU tensors, the CUDA kernels for CUDA tensors); nothing here is CPU-specific.

Memory. The forward pass saves, besides references to ``input``/``target``/``weight``,
only O(rows) statistics: the per-row log-sum-exp as (row max, log-sum relative to it),
float64, plus the per-row sum of the weighted soft target for soft targets. The backward
pass recomputes the softmax from the logits and those statistics: one read and one write
of ``rows x C``. No softmax or log-softmax is ever materialised.

``inplace_backward=True`` computes the gradient already in the forward pass and writes
it into the logits' own buffer (no ``rows x C`` allocation at all; the backward only
scales it by the incoming gradient). This is only safe when **nothing else needs the
values of the logits after the loss is computed**: e.g. ``logits = hidden @ W.T`` feeding
only the loss (a matmul's backward needs its inputs, not its output). After the call the
tensor ``input`` holds the gradient, not the logits. PyTorch's version counter of
``input`` is bumped, so if another autograd node saved the logits (``torch.tanh``,
``softmax``, ...), backward fails with PyTorch's "modified by an inplace operation" error
instead of giving wrong gradients. The in-place path is taken only when a gradient will
be computed (grad mode on and ``input.requires_grad``); otherwise the ordinary forward
runs and ``input`` is left alone. The backward of the in-place path can run once
(``retain_graph`` reruns raise). With an incoming gradient other than 1 the gradient is
rounded twice for float16/bfloat16 logits (once at the forward's store, once after the
scaling); with the default path it is rounded once.

Gradients. ``input`` gets its gradient; a floating (soft) ``target`` that requires grad
gets ``d loss / d target`` too (computed with ordinary torch ops: materialises one
``rows x C`` temporary, only when asked for; not with ``inplace_backward``). ``weight``
gets none (as in PyTorch). Double backward is not supported.

torch.compile. The work runs in three custom operators, ``ce_fast::cross_entropy``
(returns the loss and the saved statistics), ``ce_fast::cross_entropy_backward`` and
``ce_fast::cross_entropy_inplace`` (mutates ``input``), each with a fake (meta)
implementation. The default path's autograd formula is registered with
``torch.library.register_autograd``; PyTorch refuses that for a mutating op, so the
in-place path's formula is a ``torch.autograd.Function`` around its op, which Dynamo
traces too. ``torch.compile(model, fullgraph=True)`` therefore traces a model that calls
:func:`cross_entropy` (either path, static or dynamic shapes) without graph breaks,
forward and backward. Under compilation the options are validated when the ops run
rather than at trace time (Dynamo cannot trace the validation on symbolic floats).
Functionalization may give the compiled in-place path a copy where eager has none.

Small calls. In eager mode, CPU tensors with int64 targets and no option but
``ignore_index`` and ``reduction`` (a training loop's call) skip the custom-op dispatch:
an ``autograd.Function`` runs one Rust call for the forward (targets checked once, per-row
losses formed there) and one for the backward, which reuses the forward's checks
(``ce_fast._plain``). Up to 65536 logits with a mean or sum reduction, the forward's call
also writes the gradient for an incoming gradient of 1 (what ``loss.backward()`` passes),
and the backward hands it over instead of calling again. The numbers are the custom ops'
bit for bit. Other eager calls of the default path (CUDA tensors, other options) run the
custom ops' implementations in one ``autograd.Function``, without the ops' dispatch; the
ops themselves run under torch.compile, dispatch or torch-function modes, functorch
transforms and tracing.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from . import _api, _plain
from ._rules import Stats
from ._spec import LossSpec, document_options
from ._torch_binary import BCEWithLogitsLoss, binary_cross_entropy_with_logits, sigmoid_focal_loss
from ._torch_kl_focal import focal_loss, kl_divergence
from ._vocab_parallel import vocab_parallel_cross_entropy

__all__ = ["cross_entropy", "CrossEntropyLoss", "vocab_parallel_cross_entropy"]
__all__ += ["kl_divergence", "focal_loss"]
__all__ += ["binary_cross_entropy_with_logits", "sigmoid_focal_loss", "BCEWithLogitsLoss"]


# --------------------------------------------------------------------------- helpers


def _out_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _as_tensor(a, like: Tensor, dtype: torch.dtype) -> Tensor:
    """A fresh contiguous torch tensor on ``like``'s device from an engine result
    (torch tensor, NumPy array for CPU, CuPy array for CUDA)."""
    t = a if isinstance(a, Tensor) else torch.as_tensor(a, device=like.device)
    return t.to(dtype=dtype).contiguous()


def _engine_array(t: Tensor) -> Any:
    """A saved statistic, as the array type of the engine that reads it back."""
    t = t.detach()
    if t.device.type == "cpu":
        return t.numpy()
    from ._engines import cuda

    return cuda.from_torch(t)  # the CUDA engine works on CuPy views (zero copy, DLPack)


def _rows(x: Tensor) -> int:
    return math.prod(x.shape[:-1])


def _options(ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale) -> dict:
    return dict(
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
        logit_scale=logit_scale,
    )


# ------------------------------------------------------------------ the custom ops


@torch.library.custom_op("ce_fast::cross_entropy", mutates_args=())
def _ce_forward(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: Optional[float],
    logit_scale: float,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(loss, lse, swt): the loss as ce_fast.cross_entropy returns it, the per-row
    (max, log-sum-exp relative to the max) as a float64 (2, rows) tensor (lse = sum of
    the two, kept apart for precision at huge magnitudes) and, for soft targets, the
    per-row sum_c w_c t_c (else empty)."""
    return _forward_impl(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale)


def _forward_impl(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale):
    """What ce_fast::cross_entropy computes (also called directly by the eager path)."""
    spec = LossSpec.make(**_options(ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale))
    loss, s = _api._loss_and_stats(input, target, spec, weight)
    lse = _lse_view(s, input) if input.is_cuda else None
    if lse is None:
        lse = torch.stack([_as_tensor(a, input, torch.float64).reshape(-1) for a in (s.mx, s.ls)])
    if target.is_floating_point():
        swt = _as_tensor(s.swt, input, torch.float64).reshape(-1)
    else:
        swt = input.new_empty((0,), dtype=torch.float64)
    return _as_tensor(loss, input, _out_dtype(input)), lse, swt


def _lse_view(s: Stats, like: Tensor) -> Optional[Tensor]:
    """The (max, log-sum) rows as one (2, rows) float64 tensor without a copy or a kernel,
    where the CUDA engine made them the first two rows of one array (its statistics);
    else None."""
    from ._engines import cuda

    base: Any = getattr(s.mx, "base", None)
    if base is None or id(getattr(s.ls, "base", None)) != id(base) or base.ndim != 2 or base.shape[0] < 2:
        return None
    at = cuda._ptr(base)
    if cuda._ptr(s.mx) != at or cuda._ptr(s.ls) != at + base.strides[0] or s.mx.shape != (base.shape[1],):
        return None
    if base.dtype != s.mx.dtype or s.mx.dtype != np.float64:
        return None
    return _as_tensor(base[:2], like, torch.float64)


@_ce_forward.register_fake
def _(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale):
    batch = input.shape[:-1]
    rows = _rows(input)
    loss = input.new_empty(batch if reduction == "none" else (), dtype=_out_dtype(input))
    lse = input.new_empty((2, rows), dtype=torch.float64)
    swt = input.new_empty((rows,) if target.is_floating_point() else (0,), dtype=torch.float64)
    return loss, lse, swt


@torch.library.custom_op("ce_fast::cross_entropy_backward", mutates_args=())
def _ce_backward(
    grad: Tensor,
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    lse: Tensor,
    swt: Tensor,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: Optional[float],
    logit_scale: float,
) -> Tensor:
    """d(grad * loss)/d input from the saved statistics: one read and one write of the
    logits. ``grad`` is 0-d (mean/sum) or of the loss's shape (none)."""
    return _backward_impl(
        grad, input, target, weight, lse, swt, ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale
    )


def _backward_impl(
    grad, input, target, weight, lse, swt, ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale
):
    """What ce_fast::cross_entropy_backward computes (also called directly by the eager path)."""
    both = _engine_array(lse)  # (max, log-sum) rows: one view (one DLPack export on CUDA)
    saved = Stats(mx=both[0], ls=both[1], swt=_engine_array(swt) if target.is_floating_point() else None)
    opts = _options(ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale)
    # The forward checked target and weight (autograd's version counters keep them as
    # they were): no second check, and no second host sync on CUDA.
    g = _api._grad_with_saved(input, target, saved, weight=weight, grad_output=grad, checked=True, **opts)
    return _as_tensor(g, input, input.dtype)


@_ce_backward.register_fake
def _(grad, input, target, weight, lse, swt, ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale):
    return torch.empty(input.shape, dtype=input.dtype, device=input.device)


@torch.library.custom_op("ce_fast::cross_entropy_inplace", mutates_args=("input",))
def _ce_inplace(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: Optional[float],
    logit_scale: float,
) -> Tensor:
    """The loss; ``input`` is overwritten with d loss / d input (grad_output 1)."""
    opts = _options(ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale)
    loss, _ = _api.cross_entropy_and_grad(input, target, weight=weight, grad_output=1.0, out=input, **opts)
    return _as_tensor(loss, input, _out_dtype(input))


@_ce_inplace.register_fake
def _(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale):
    return input.new_empty(input.shape[:-1] if reduction == "none" else (), dtype=_out_dtype(input))


# ------------------------------------------------------------- autograd formulas

_N_OPTIONS = 6  # ignore_index .. logit_scale: no gradients


def _setup_forward(ctx, inputs, output):
    input, target, weight = inputs[:3]
    _, lse, swt = output
    ctx.options = inputs[3:]
    ctx.save_for_backward(input, target, weight, lse, swt)


def _soft_target_grad(ctx, grad, input, target, weight, lse):
    """d(grad * loss)/d target for soft targets: (1 - eps) w_c (lse - z_c) per row, times
    the row's incoming gradient (1/rows of it for mean). Plain torch ops."""
    ignore_index, reduction, eps, z_loss, softcap, scale = ctx.options
    z = input.to(_out_dtype(input)) * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    batch = input.shape[:-1]
    # lse - z as (mx - z) + ls: keeps ls when |mx| is huge
    d = (lse[0].reshape(batch).unsqueeze(-1) - z) + lse[1].reshape(batch).unsqueeze(-1)
    if weight is not None:
        d = d * weight.to(d.dtype)
    if reduction == "none":
        g = grad.to(d.dtype).unsqueeze(-1)
    elif reduction == "mean":
        g = grad.to(d.dtype) / _rows(input)
    else:
        g = grad.to(d.dtype)
    return (d * ((1.0 - eps) * g)).to(target.dtype)


def _grads(ctx, grad, backward_op):
    input, target, weight, lse, swt = ctx.saved_tensors
    grad_input = grad_target = None
    if ctx.needs_input_grad[0]:
        grad_input = backward_op(grad, input, target, weight, lse, swt, *ctx.options)
    if ctx.needs_input_grad[1] and target.is_floating_point():
        grad_target = _soft_target_grad(ctx, grad, input, target, weight, lse)
    return (grad_input, grad_target, None) + (None,) * _N_OPTIONS


def _backward(ctx, grad, _grad_lse, _grad_swt):
    return _grads(ctx, grad, _ce_backward)


_ce_forward.register_autograd(_backward, setup_context=_setup_forward)


class _EagerCrossEntropy(torch.autograd.Function):
    """The default path in eager mode: ce_fast::cross_entropy and its backward as one
    autograd.Function calling their implementations directly, without the custom ops'
    dispatch (tens of microseconds per op, as much as a small call's work). Same
    implementations, same saved tensors, same formula; see :func:`_eager`."""

    @staticmethod
    def forward(ctx, input, target, weight, *options):
        loss, lse, swt = _forward_impl(input, target, weight, *options)
        ctx.options = options
        ctx.save_for_backward(input, target, weight, lse, swt)
        return loss

    @staticmethod
    def backward(ctx, grad):
        return _grads(ctx, grad, _backward_impl)


def _eager(*tensors) -> bool:
    """Whether a call may take :class:`_EagerCrossEntropy`: plain tensors, and nothing that
    needs to see the custom ops (a dispatch or torch-function mode, a functorch transform,
    a tracer); the caller has checked that nothing is being compiled."""
    return (
        all(t is None or type(t) is Tensor for t in tensors)
        and torch._C._len_torch_dispatch_stack() == 0
        and not torch._C._is_torch_function_mode_enabled()
        and torch._C._functorch.peek_interpreter_stack() is None
        and not torch.jit.is_tracing()
    )


class _InplaceCrossEntropy(torch.autograd.Function):
    """The in-place path. PyTorch registers no autograd formula on a mutating custom op,
    so the formula lives in an autograd.Function around it (torch.compile traces both)."""

    @staticmethod
    def forward(ctx, input, target, weight, *options):
        loss = _ce_inplace(input, target, weight, *options)
        ctx.reduction = options[1]
        ctx.save_for_backward(input)  # after the op, the logits' buffer holds the gradient
        return loss

    @staticmethod
    def backward(ctx, grad):
        (g,) = ctx.saved_tensors
        # Scale in place. A 0-d grad is given dims so that the product is formed in the
        # grad's (wider) dtype and rounded once into float16/bfloat16, not the other way round.
        return (_scale_inplace(g, grad, ctx.reduction), None, None) + (None,) * _N_OPTIONS


def _scale_inplace(g: Tensor, grad: Tensor, reduction: str) -> Tensor:
    """The in-place gradient `g` times the incoming gradient, in place. An incoming 1
    (the usual `loss.backward()`) costs no pass over `g` and no second rounding: on the
    CPU read here, on CUDA by the scaling kernel itself (no host sync). The version is
    bumped all the same, so a second backward fails as with the multiply."""
    eager = not torch.compiler.is_compiling()  # traced graphs cannot branch on the value
    if eager and grad.dim() == 0 and grad.device.type == "cpu" and grad.item() == 1.0:
        torch.autograd.graph.increment_version(g)
        return g
    if eager and grad.dim() == 0 and g.device.type == "cuda" and _scale_on_device(g, grad.detach()):
        torch.autograd.graph.increment_version(g)
        return g
    if reduction == "none":
        scale = grad.unsqueeze(-1)
    else:
        scale = grad.reshape((1,) * g.dim())
    return g.mul_(scale)


def _scale_on_device(g: Tensor, grad: Tensor) -> bool:
    """g *= grad by the CUDA engine's scaling kernel (which skips g when grad is 1);
    False where it does not apply."""
    if grad.device != g.device or grad.dtype is not torch.float32:
        return False
    from ._engines import cuda

    return cuda.scale_inplace(g, grad)


# Up to this many logits (256 KiB of float32), the lean path computes the gradient with the
# forward pass; above it the gradient waits for backward, so a forward costs no extra memory.
_EAGER_GRAD_ELEMS = 1 << 16


class _PlainCrossEntropy(torch.autograd.Function):
    """The lean eager path (CPU, int64 targets, no option but ignore_index and reduction):
    no custom-op dispatch, options and targets checked once in the forward, the backward
    reusing them (see ce_fast._plain)."""

    @staticmethod
    def forward(ctx, input, target, d, ignore_index, reduction):
        # A small call's gradient for an incoming gradient of 1 (loss.backward()) comes out
        # of the forward's own pass: one native call and one read of the logits fewer.
        g1 = None
        if reduction != "none" and input.numel() <= _EAGER_GRAD_ELEMS:
            g1 = torch.empty(input.shape, dtype=input.dtype)
        loss, lse, _ = _plain.torch_forward(input, d, target, ignore_index, reduction, grad_out=g1)
        ctx.plain = (d, ignore_index, reduction, lse)  # lse: a NumPy array of this call's own
        ctx.g1 = g1
        ctx.save_for_backward(input, target)  # the version check guards `d`'s memory
        return loss

    @staticmethod
    def backward(ctx, grad):
        input, target = ctx.saved_tensors
        # Handed over once: autograd may keep it as .grad and add into it on a second backward.
        g1, ctx.g1 = ctx.g1, None
        if g1 is not None and float(grad) == 1.0:
            return g1, None, None, None, None
        d, ignore_index, reduction, lse = ctx.plain
        g = _plain.torch_backward(grad, input, d, target, ignore_index, reduction, lse)
        return g, None, None, None, None


class _PlainInplace(torch.autograd.Function):
    """The lean eager path of ``inplace_backward=True``: as _InplaceCrossEntropy."""

    @staticmethod
    def forward(ctx, input, target, d, ignore_index, reduction):
        loss, _, _ = _plain.torch_forward(input, d, target, ignore_index, reduction, inplace=True)
        torch.autograd.graph.increment_version(input)  # as the general path's mark_written
        ctx.reduction = reduction
        ctx.save_for_backward(input)  # after the pass, the logits' buffer holds the gradient
        return loss

    @staticmethod
    def backward(ctx, grad):
        (g,) = ctx.saved_tensors
        return _scale_inplace(g, grad, ctx.reduction), None, None, None, None


def _plain_call(input: Tensor, target: Tensor, ignore_index: int, reduction: str, inplace: bool) -> Optional[Tensor]:
    """The lean path's loss, or None where it does not apply."""
    needs_grad = input.requires_grad and torch.is_grad_enabled()
    inplace = inplace and needs_grad
    prep = _plain.torch_prepare(input, target, inplace)
    if prep is None:
        return None
    d, t = prep
    if not needs_grad:
        return _plain.torch_forward(input, d, t, ignore_index, reduction)[0]
    fn = _PlainInplace if inplace else _PlainCrossEntropy
    return fn.apply(input, t, d, ignore_index, reduction)


# ------------------------------------------------------------------ public API


@document_options()
def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    logit_scale: float = 1.0,
    inplace_backward: bool = False,
) -> Tensor:
    """Cross-entropy of ``input`` logits (class axis **last**) against ``target``, with autograd.

    ``torch.nn.functional.cross_entropy`` semantics with the class axis moved last:
    equals ``F.cross_entropy(input.movedim(-1, 1), target, weight, ...)`` for k-dim input.

    Parameters
    ----------
    input : ``(*batch, C)`` float32 / float16 / bfloat16 / float64 tensor (any strides).
    target : integer tensor of shape ``batch`` (class indices), or a floating tensor of
        ``input``'s shape holding class probabilities (soft targets).
    {options}
    inplace_backward : compute the gradient during the forward pass into ``input``'s own
        buffer (see the module docstring for when this is safe: the logits must not be
        needed by anything else afterwards).

    Returns
    -------
    0-d tensor for mean / sum, the per-row losses of shape ``batch`` for none; float32
    (float64 for float64 input), on ``input``'s device.
    """
    if not isinstance(input, Tensor) or not isinstance(target, Tensor):
        raise TypeError(
            f"input and target must be torch tensors, got {type(input).__name__} and {type(target).__name__}"
        )
    if weight is not None and not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a torch tensor or None, got {type(weight).__name__}")
    compiling = torch.compiler.is_compiling()
    if compiling:
        # Dynamo cannot trace the validation's math.isfinite on symbolic floats (dynamic=True);
        # the ops validate the same options when they run (LossSpec.make in the kernels).
        options = (
            int(ignore_index),
            reduction,
            float(label_smoothing),
            float(z_loss),
            None if softcap is None else float(softcap),
            float(logit_scale),
        )
    else:
        if _plain.plain_options(weight, ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale):
            loss = _plain_call(input, target, ignore_index, reduction, inplace_backward)
            if loss is not None:
                return loss
        spec = LossSpec.make(**_options(ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale))
        options = (spec.ignore_index, spec.reduction, spec.label_smoothing, spec.z_loss, spec.softcap, spec.logit_scale)
    args = (input, target, weight) + options
    if inplace_backward and torch.is_grad_enabled() and input.requires_grad:
        if target.requires_grad:
            raise ValueError("inplace_backward=True does not give a gradient for the target; detach it")
        return _InplaceCrossEntropy.apply(*args)
    if not compiling and _eager(input, target, weight):
        return _EagerCrossEntropy.apply(*args)
    return _ce_forward(*args)[0]


class CrossEntropyLoss(torch.nn.Module):
    """``torch.nn.CrossEntropyLoss`` with the class axis **last**, on the ce_fast engines.

    Same signature and semantics as PyTorch's module (``size_average`` / ``reduce`` are
    the deprecated legacy arguments, mapped the same way), plus the keyword-only
    ``z_loss``, ``softcap``, ``logit_scale`` and ``inplace_backward`` of
    :func:`cross_entropy`. ``weight`` is registered as a buffer, as in PyTorch.
    """

    __constants__ = ["ignore_index", "reduction", "label_smoothing"]

    def __init__(
        self,
        weight: Optional[Tensor] = None,
        size_average=None,
        ignore_index: int = -100,
        reduce=None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        z_loss: float = 0.0,
        softcap: Optional[float] = None,
        logit_scale: float = 1.0,
        inplace_backward: bool = False,
    ) -> None:
        super().__init__()
        if size_average is not None or reduce is not None:
            reduction = torch.nn._reduction.legacy_get_string(size_average, reduce)
        spec = LossSpec.make(
            **_options(ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale)
        )  # bad options fail here, not at the first call
        self.register_buffer("weight", weight)
        self.weight: Optional[Tensor]
        self.ignore_index = spec.ignore_index
        self.reduction = spec.reduction
        self.label_smoothing = spec.label_smoothing
        self.z_loss = spec.z_loss
        self.softcap = spec.softcap
        self.logit_scale = spec.logit_scale
        self.inplace_backward = bool(inplace_backward)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return cross_entropy(
            input,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            softcap=self.softcap,
            logit_scale=self.logit_scale,
            inplace_backward=self.inplace_backward,
        )

    def extra_repr(self) -> str:
        parts = [f"reduction={self.reduction!r}"]
        if self.ignore_index != -100:
            parts.append(f"ignore_index={self.ignore_index}")
        if self.label_smoothing:
            parts.append(f"label_smoothing={self.label_smoothing}")
        if self.z_loss:
            parts.append(f"z_loss={self.z_loss}")
        if self.softcap is not None:
            parts.append(f"softcap={self.softcap}")
        if self.logit_scale != 1.0:
            parts.append(f"logit_scale={self.logit_scale}")
        if self.inplace_backward:
            parts.append("inplace_backward=True")
        return ", ".join(parts)
