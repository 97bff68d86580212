"""ce_fast: streaming cross-entropy (log-sum-exp) losses over huge logits arrays.

The class axis is the last axis. NumPy / CPU torch arrays run on a SIMD,
multithreaded Rust engine; CuPy / CUDA torch arrays on CUDA kernels. Results come
back as the input's library, on the input's device.
"""

from ._api import bits_per_token, cross_entropy, cross_entropy_and_grad, logsumexp, perplexity
from ._core import __version__
from ._engines.cpu import get_threads, set_threads
from .streaming import EvalResult, StreamingCrossEntropy, evaluate

__all__ = [
    "logsumexp",
    "cross_entropy",
    "cross_entropy_and_grad",
    "perplexity",
    "bits_per_token",
    "set_threads",
    "get_threads",
    "__version__",
    "StreamingCrossEntropy",
    "EvalResult",
    "evaluate",
]
