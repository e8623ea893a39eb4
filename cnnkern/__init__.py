"""cnnkern: Triton and CUDA C++ kernels for the layers of classic CNNs.

    >>> import torch, cnnkern
    >>> y = cnnkern.functional.residual_add(x, shortcut)           # relu(x + shortcut)
    >>> with cnnkern.use_backend("triton"):
    ...     y = cnnkern.nn.ResidualAdd()(x, shortcut)

Backends: "auto" (default), "triton", "cuda", "torch"; see :func:`available_backends`.
"""

from ._backend import (  # noqa: F401
    BACKENDS,
    BackendUnavailableError,
    available_backends,
    get_backend,
    set_backend,
    use_backend,
)
from . import functional, nn  # noqa: F401,E402
from . import models  # noqa: F401,E402
from .convert import convert  # noqa: E402
from .summary import summary  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "BACKENDS", "BackendUnavailableError", "available_backends", "get_backend", "set_backend",
    "use_backend", "functional", "nn", "models", "convert", "summary",
]
