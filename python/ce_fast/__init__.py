"""ce_fast: streaming cross-entropy (log-sum-exp) losses over huge logits arrays.

The class axis is the last axis. NumPy / CPU torch arrays run on a SIMD,
multithreaded Rust engine; CuPy / CUDA torch arrays on CUDA kernels. Results come
back as the input's library, on the input's device.
"""

from ._api import bits_per_token, cross_entropy, cross_entropy_and_grad, logsumexp, perplexity
from ._binary import (
    binary_cross_entropy_with_logits,
    binary_cross_entropy_with_logits_and_grad,
    sigmoid_focal_loss,
    sigmoid_focal_loss_and_grad,
)
from ._core import __version__
from ._engines.cpu import get_threads, set_threads
from ._focal import focal_loss, focal_loss_and_grad
from ._kl import kl_divergence, kl_divergence_and_grad
from .streaming import EvalResult, StreamingCrossEntropy, evaluate

__all__ = [
    "logsumexp",
    "cross_entropy",
    "cross_entropy_and_grad",
    "perplexity",
    "bits_per_token",
    "binary_cross_entropy_with_logits",
    "binary_cross_entropy_with_logits_and_grad",
    "sigmoid_focal_loss",
    "sigmoid_focal_loss_and_grad",
    "kl_divergence",
    "kl_divergence_and_grad",
    "focal_loss",
    "focal_loss_and_grad",
    "set_threads",
    "get_threads",
    "__version__",
    "StreamingCrossEntropy",
    "EvalResult",
    "evaluate",
]
