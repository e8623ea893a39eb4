"""cnnkern: Triton and CUDA C++ kernels for the layers of classic CNNs.

    >>> import torch, cnnkern
    >>> y = cnnkern.functional.residual_add(x, shortcut)           # relu(x + shortcut)
    >>> with cnnkern.use_backend("triton"):
    ...     y = cnnkern.nn.ResidualAdd()(x, shortcut)

Backends: "auto" (default), "triton", "cuda", "torch"; see :func:`available_backends`.
"""

from . import functional, models, nn
from ._backend import (
    BACKENDS,
    BackendUnavailableError,
    available_backends,
    get_backend,
    set_backend,
    use_backend,
)
from .convert import convert
from .summary import summary

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "available_backends",
    "get_backend",
    "set_backend",
    "use_backend",
    "functional",
    "nn",
    "models",
    "convert",
    "summary",
]
