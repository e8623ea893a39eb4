"""Drop-in modules backed by cnnkern's ops."""

from __future__ import annotations

import torch

from . import _backend
from . import functional as F

__all__ = ["Conv2d", "ConvBNReLU2d", "ResidualAdd", "Sequential", "conv_bn_forward", "LocalResponseNorm"]


class ResidualAdd(torch.nn.Module):
    """``relu(x + shortcut)`` (or the plain sum): the join at the end of a ResNet block.

    ``shortcut`` may be the identity (x's shape) or an option-A shortcut (fewer channels and/or a
    larger spatial size), see :func:`cnnkern.functional.residual_add`. Parameter-free.

    Args:
        relu: apply ReLU to the sum.
        backend: pin this module to a backend (``None``: the current default).
    """

    def __init__(self, relu: bool = True, backend: str | None = None):
        super().__init__()
        self.relu = relu
        self.backend = backend

    def forward(self, x: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
        return F.residual_add(x, shortcut, relu=self.relu, backend=self.backend)

    def extra_repr(self) -> str:
        s = f"relu={self.relu}"
        return s + (f", backend={self.backend!r}" if self.backend else "")


class LocalResponseNorm(torch.nn.LocalResponseNorm):
    """Drop-in ``torch.nn.LocalResponseNorm`` on cnnkern's kernels: same constructor, attributes
    and semantics (alpha divided by ``size``; see :func:`cnnkern.functional.local_response_norm`
    for the AlexNet paper's constants: ``LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0)``),
    plus one keyword-only option.

    Args:
        backend: pin this layer to a backend (None: the current default).
    """

    def __init__(self, size: int, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0, *,
                 backend: str | None = None):
        super().__init__(size, alpha, beta, k)
        self.backend = backend

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.local_response_norm(input, self.size, self.alpha, self.beta, self.k, backend=self.backend)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s + (f", backend={self.backend!r}" if self.backend else "")


class Conv2d(torch.nn.Conv2d):
    """Drop-in ``torch.nn.Conv2d`` running on cnnkern's convolution kernels.

    Same constructor, parameters and state_dict as ``torch.nn.Conv2d`` (a model's weights load
    unchanged), plus two keyword-only options:

    Args:
        activation: None or "relu": fuse a ReLU into the convolution's epilogue.
        backend: pin this layer to a backend (None: the current default).

    Only ``padding_mode="zeros"`` is supported; other modes raise ``ValueError``.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, padding_mode="zeros", device=None, dtype=None, *, activation=None, backend=None):
        if padding_mode != "zeros":
            raise ValueError(f"cnnkern.nn.Conv2d: padding_mode={padding_mode!r} is not supported, only 'zeros'")
        if activation not in (None, "relu"):
            raise ValueError(f"cnnkern.nn.Conv2d: activation must be None or 'relu', got {activation!r}")
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype)
        self.activation = activation
        self.backend = backend

    @classmethod
    def from_torch(cls, conv: torch.nn.Conv2d, *, activation=None, backend=None) -> "Conv2d":
        """A cnnkern Conv2d sharing ``conv``'s parameters (no copy)."""
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                  conv.groups, conv.bias is not None, conv.padding_mode, device="meta",
                  activation=activation, backend=backend)
        new.weight = conv.weight
        new.bias = conv.bias
        return new

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``activation(conv(input) + residual)``; ``residual`` (None, or the output's shape) is
        added in the convolution's epilogue."""
        return self._conv_forward(input, self.weight, self.bias, residual)

    def _conv_forward(self, input, weight, bias, residual=None):
        return F.conv2d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups,
                        activation=self.activation, residual=residual, backend=self.backend)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        if self.activation:
            s += f", activation={self.activation!r}"
        return s + (f", backend={self.backend!r}" if self.backend else "")


class ConvBNReLU2d(torch.nn.Module):
    """Convolution -> BatchNorm2d -> ReLU as one fused layer.

    Submodules ``conv`` (a ``torch.nn.Conv2d``) and ``bn`` (a ``torch.nn.BatchNorm2d``), so the
    state_dict keys are those of torchvision's ``BasicConv2d`` (``conv.weight``, ``bn.weight``,
    ``bn.bias``, ``bn.running_mean``, ``bn.running_var``, ``bn.num_batches_tracked``) and its
    weights load unchanged.

    Training: batch statistics from the convolution's epilogue, running statistics updated as
    ``torch.nn.BatchNorm2d`` does (``momentum=None``: cumulative average over
    ``num_batches_tracked``). Eval: BatchNorm folded into the convolution's weights and bias (cached
    while no parameter or statistic changes; recomputed, differentiably, when autograd records),
    one kernel with the ReLU in its epilogue.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=False, eps=1e-5, momentum=0.1, relu=True, *, backend=None, device=None, dtype=None):
        super().__init__()
        self.conv = torch.nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                                    device=device, dtype=dtype)
        self.bn = torch.nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum, device=device, dtype=dtype)
        self.relu = relu
        self.backend = backend

    @classmethod
    def from_modules(cls, conv: torch.nn.Conv2d, bn: torch.nn.BatchNorm2d, relu: bool = True, *,
                     backend=None) -> "ConvBNReLU2d":
        """A fused layer built on existing modules (their parameters and buffers are shared)."""
        if conv.padding_mode != "zeros":
            raise ValueError(f"ConvBNReLU2d.from_modules: conv.padding_mode={conv.padding_mode!r} is not supported, "
                             "only 'zeros'")
        if bn.num_features != conv.out_channels:
            raise ValueError(f"ConvBNReLU2d.from_modules: bn has {bn.num_features} features but conv has "
                             f"{conv.out_channels} output channels")
        new = cls.__new__(cls)
        torch.nn.Module.__init__(new)
        new.conv, new.bn, new.relu, new.backend = conv, bn, relu, backend
        return new

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``[relu](bn(conv(x)) + residual)``; ``residual`` (None, or the output's shape) is added
        in the kernel that applies BatchNorm (training) or in the convolution's epilogue (eval)."""
        return conv_bn_forward(self.conv, self.bn, x, relu=self.relu, backend=self.backend, residual=residual)

    def extra_repr(self) -> str:
        return f"relu={self.relu}" + (f", backend={self.backend!r}" if self.backend else "")


# ---------------------------------------------------------------------------------------------
# Conv2d [-> BatchNorm2d] [-> ReLU] on existing torch modules: the engine behind ConvBNReLU2d,
# cnnkern.nn.Sequential, the models and cnnkern.convert.
# ---------------------------------------------------------------------------------------------
_FOLD_ATTR = "_cnnkern_folded"  # plain attribute on the BatchNorm module: (key, weight, bias)


def _fold_key(conv, bn):
    ts = [conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var]
    return tuple((t.data_ptr(), t._version, t.dtype, t.device) if t is not None else None for t in ts), bn.eps


def _eval_weights(conv, bn):
    """BatchNorm folded into conv's weight and bias. Cached on the BatchNorm module while no
    parameter or statistic changes (any in-place change bumps a version counter); recomputed,
    differentiably, whenever autograd records or torch.compile traces."""
    args = (conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    recording = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args[:6])
    if recording or torch.compiler.is_compiling():
        return F.fold_bn(*args)
    key = _fold_key(conv, bn)
    cached = bn.__dict__.get(_FOLD_ATTR)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, *F.fold_bn(*args))
        bn.__dict__[_FOLD_ATTR] = cached
    return cached[1], cached[2]


def conv_bn_forward(conv: torch.nn.Conv2d, bn: torch.nn.BatchNorm2d | None, x: torch.Tensor, relu: bool = True,
                    backend: str | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """``[relu](bn(conv(x)) + residual)`` (``bn`` and ``residual`` may be None) on cnnkern's
    kernels, with exactly the module semantics of ``torch.nn.Conv2d`` and ``torch.nn.BatchNorm2d``
    (training flag, running statistics, ``momentum=None``, ``num_batches_tracked``,
    ``track_running_stats=False``); the residual is added by the kernel that applies the ReLU."""
    if conv.padding_mode != "zeros":
        raise ValueError(f"cnnkern: Conv2d with padding_mode={conv.padding_mode!r} is not supported, only 'zeros'")
    if bn is None:
        return F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups,
                        activation="relu" if relu else None, residual=residual, backend=backend)
    if bn.training or bn.running_mean is None:
        momentum = bn.momentum
        if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            if momentum is None:  # cumulative moving average, as torch.nn.BatchNorm2d
                momentum = 1.0 / float(bn.num_batches_tracked)
        update = bn.training
        return F.conv_bn_relu(x, conv.weight, conv.bias, bn.running_mean if update else None,
                              bn.running_var if update else None, bn.weight, bn.bias, training=True,
                              momentum=0.0 if momentum is None else momentum, eps=bn.eps, stride=conv.stride,
                              padding=conv.padding, dilation=conv.dilation, groups=conv.groups, relu=relu,
                              residual=residual, backend=backend)
    if _backend.resolve("conv_bn_relu", backend, x.device) == "torch":
        # the reference keeps conv and BatchNorm apart (and so does cnnkern.summary's trace)
        return F.conv_bn_relu(x, conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                              training=False, eps=bn.eps, stride=conv.stride, padding=conv.padding,
                              dilation=conv.dilation, groups=conv.groups, relu=relu, residual=residual,
                              backend="torch")
    w, b = _eval_weights(conv, bn)
    return F.conv2d(x, w, b, conv.stride, conv.padding, conv.dilation, conv.groups,
                    activation="relu" if relu else None, residual=residual, backend=backend)


class Sequential(torch.nn.Sequential):
    """``torch.nn.Sequential`` that runs every ``Conv2d [-> BatchNorm2d] [-> ReLU]`` run of its
    children as one fused cnnkern layer (the same children, so the same state_dict keys as the
    torch model it mirrors, e.g. torchvision's VGG ``features``). Other children run as usual."""

    def __init__(self, *args, backend: str | None = None):
        super().__init__(*args)
        self.backend = backend

    def forward(self, x):
        mods = list(self._modules.values())
        i = 0
        while i < len(mods):
            m = mods[i]
            if isinstance(m, torch.nn.Conv2d) and m.padding_mode == "zeros" and not getattr(m, "activation", None):
                bn = mods[i + 1] if i + 1 < len(mods) and isinstance(mods[i + 1], torch.nn.BatchNorm2d) else None
                j = i + 1 + (bn is not None)
                relu = j < len(mods) and isinstance(mods[j], torch.nn.ReLU)
                x = conv_bn_forward(m, bn, x, relu=relu, backend=getattr(m, "backend", None) or self.backend)
                i = j + relu
            else:
                x = m(x)
                i += 1
        return x
