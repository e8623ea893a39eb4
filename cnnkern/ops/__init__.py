"""torch.library registrations of cnnkern's ops (one module per op).

``cnnkern._backend`` is imported first: it loads ``cnnkern._C``, whose schemas the Python fake
implementations below attach to.
"""

from .. import _backend  # noqa: F401  (loads cnnkern._C before any registration)
from . import _autocast, conv2d, conv_bn_relu, local_response_norm, residual_add  # noqa: F401

_autocast.register()  # Autocast kernels on the forward ops (after they exist)
