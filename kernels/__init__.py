"""Triton kernels of cnnkern (installed as ``cnnkern.kernels``).

One module per op, each holding its ``@triton.jit`` kernels and their launchers. Launchers take
preallocated outputs and know nothing of autograd or torch.library (that is ``cnnkern.ops``).

Triton decides at kernel definition time whether kernels run compiled on a GPU or under its CPU
interpreter (``TRITON_INTERPRET=1``); ``INTERPRET`` records what was in force when this package
was imported.
"""

import os

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")

from . import conv2d, conv_bn_relu, residual_add  # noqa: E402,F401
from . import local_response_norm  # noqa: E402,F401
