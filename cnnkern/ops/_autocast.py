"""Automatic mixed precision (``torch.autocast``) for cnnkern's ops, in one place.

Inside ``torch.autocast(device_type, dtype=...)`` each op casts its floating-point inputs the way
PyTorch's autocast treats the PyTorch op it replaces:

================  ========  =====================================================================
op                policy    why
================  ========  =====================================================================
conv2d            lower     ``conv2d`` is on autocast's lower-precision list (CUDA and CPU): input,
                            weight and bias run in the autocast dtype (fp16 or bf16).
conv_bn_relu      lower     its convolution as above; the BatchNorm tensors keep their dtype (fp32
                            parameters and running statistics with fp16/bf16 activations, as
                            PyTorch's ``batch_norm``, which autocast leaves alone, accepts).
local_response    fp32      ``F.local_response_norm`` is built from ``pow``, which is on CUDA
_norm                       autocast's fp32 list, so PyTorch's own LRN returns fp32 under autocast;
                            cnnkern's computes from fp32 inputs and returns fp32 too.
residual_add      promote   ``relu(x + shortcut)`` is an elementwise add, which autocast does not
                            cast: mixed inputs promote to the widest dtype (fp16 + fp32 -> fp32).
================  ========  =====================================================================

As in PyTorch, only tensors on the autocast device type are cast, float64 tensors are never cast
("lower"/"fp32"), and the casts are ordinary differentiable ``Tensor.to`` calls, so gradients come
back in each parameter's own dtype.

Two ways in, one policy (:data:`POLICY`):

* :func:`cast` is called by cnnkern/functional.py before validation, for every backend (the
  pure-PyTorch one included), so the ops receive inputs that are already cast (their Autocast
  kernels then have nothing to do).
* :func:`register` puts an Autocast kernel (``AutocastCUDA``, ``AutocastCPU``) on each forward
  ``torch.library`` op, so calling ``torch.ops.cnnkern.*`` directly, or through torch.compile,
  casts the same way. ``torch.library.register_autocast`` is not used: it casts to one dtype
  fixed at registration, while autocast's lower-precision dtype (fp16 or bf16) is chosen by the
  ``torch.autocast`` context at run time.
"""

from __future__ import annotations

import torch

# op name -> (policy, positions of the tensor arguments the policy applies to, in the
# torch.library op's schema order; functional.py passes its tensors in the same order)
POLICY: dict[str, tuple[str, tuple[int, ...]]] = {
    "conv2d": ("lower", (0, 1, 2, 3)),  # input, weight, bias, residual
    "conv_bn_relu": ("lower", (0, 1, 2, 3)),  # the same; the BatchNorm tensors keep their dtypes
    "local_response_norm": ("fp32", (0,)),
    "residual_add": ("promote", (0, 1)),
}

# the torch.library forward op of each public op (cnnkern namespace)
_OPS = {
    "conv2d": "conv2d",
    "conv_bn_relu": "conv_bn_relu_train",
    "local_response_norm": "local_response_norm",
    "residual_add": "residual_add",
}

DEVICE_TYPES = ("cuda", "cpu")


def enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` in this thread."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # very old torch: no device argument
        return device_type == "cuda" and torch.is_autocast_enabled()
    except RuntimeError:  # a device type autocast does not know (e.g. "meta"): never autocast there
        return False


def _eligible(t, device_type: str) -> bool:
    # autocast's rule: floating tensors on the autocast device, never float64
    return (
        isinstance(t, torch.Tensor)
        and t.is_floating_point()
        and t.device.type == device_type
        and t.dtype != torch.float64
    )


def target_dtype(op: str, device_type: str, tensors) -> torch.dtype | None:
    """The dtype ``op``'s policy casts ``tensors`` (those it applies to, None allowed) to under
    autocast on ``device_type``, or None where it casts nothing (autocast off, no eligible tensor)."""
    if not enabled(device_type):
        return None
    policy, _ = POLICY[op]
    floats = [t for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if policy == "promote":
        if len({t.dtype for t in floats}) < 2:
            return None
        out = floats[0].dtype
        for t in floats[1:]:
            out = torch.promote_types(out, t.dtype)
        return out
    if not any(_eligible(t, device_type) for t in floats):
        return None
    return torch.get_autocast_dtype(device_type) if policy == "lower" else torch.float32


def cast(op: str, device_type: str, *tensors):
    """``tensors`` (the ones ``op``'s policy applies to, in :data:`POLICY`'s order; None passes
    through) cast as autocast would, or unchanged when autocast is off. Returns a tuple."""
    dtype = target_dtype(op, device_type, tensors)
    if dtype is None:
        return tensors
    policy, _ = POLICY[op]
    out = []
    for t in tensors:
        if (
            isinstance(t, torch.Tensor)
            and t.dtype != dtype
            and (_eligible(t, device_type) if policy != "promote" else t.is_floating_point())
        ):
            t = t.to(dtype)
        out.append(t)
    return tuple(out)


_LIB = None
_REGISTERED: list[tuple[str, str]] = []


def _autocast_key(device_type: str) -> str:
    try:
        return "Autocast" + torch._C._dispatch_key_for_device(device_type)
    except AttributeError:
        return {"cuda": "AutocastCUDA", "cpu": "AutocastCPU"}[device_type]


def _make_kernel(name: str, overload, device_type: str, key):
    positions = POLICY[name][1]

    def impl(*args):
        args = list(args)
        tensors = [args[i] for i in positions]
        for i, t in zip(positions, cast(name, device_type, *tensors)):
            args[i] = t
        # run the op below the Autocast key (as torch.library.register_autocast does)
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
            return overload(*args)

    return impl


def register() -> None:
    """Puts an Autocast kernel on each forward op for every device type that supports autocast.
    Idempotent."""
    global _LIB
    if _LIB is not None:
        return
    _LIB = torch.library.Library("cnnkern", "IMPL")
    for name, fwd in _OPS.items():
        overload = getattr(torch.ops.cnnkern, fwd).default
        for dev in DEVICE_TYPES:
            if not torch._C._is_autocast_available(dev):
                continue
            key_name = _autocast_key(dev)
            key = getattr(torch._C.DispatchKey, key_name)
            impl = _make_kernel(name, overload, dev, key)
            # the Python dispatcher (torch.compile's tracing) looks here first
            overload.py_kernels.pop(key, None)
            overload.py_impl(key)(impl)
            _LIB.impl(fwd, lambda _keyset, *a, _impl=impl: _impl(*a), key_name, with_keyset=True)
            _REGISTERED.append((f"cnnkern::{fwd}", key_name))


def registered() -> list[tuple[str, str]]:
    """(op, dispatch key) pairs registered by :func:`register`."""
    return list(_REGISTERED)


__all__ = ["POLICY", "cast", "enabled", "target_dtype", "register", "registered"]
