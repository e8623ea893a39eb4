"""Drop-in modules backed by cnnkern's ops."""

from __future__ import annotations

import torch
from torch.fx import Proxy as _Proxy  # bound once: torch.fx is a lazily imported attribute of torch

from . import _backend, _checks
from . import functional as F

__all__ = [
    "Conv2d",
    "ConvBNReLU2d",
    "FusedConv2d",
    "ResidualAdd",
    "Sequential",
    "conv_bn_forward",
    "fused_conv",
    "LocalResponseNorm",
]

_mod = torch.nn.modules.module


def hooks_active(*modules) -> bool:
    """Whether any global module hook, or any forward (pre-)hook or backward (pre-)hook of one of
    ``modules`` (None entries skipped), is registered: then a fused chain runs its modules one by one."""
    if (
        _mod._global_forward_hooks
        or _mod._global_forward_pre_hooks
        or _mod._global_backward_hooks
        or _mod._global_backward_pre_hooks
    ):
        return True
    for m in modules:
        if m is not None and (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks):
            return True
    return False


_ABSENT = object()


def _member(module: torch.nn.Module, name: str):
    """``module.<name>`` for a registered parameter, buffer or submodule, read from the dictionary
    where ``Module.__getattr__`` finds it. The plain attribute read reaches ``__getattr__`` only
    after a failed instance lookup, which on Python 3.11 builds an AttributeError (about 7,000
    instructions a read). Any other name (a parametrization's property, a plain attribute) is
    read with getattr."""
    v = module._parameters.get(name, _ABSENT)
    if v is _ABSENT:
        v = module._buffers.get(name, _ABSENT)
        if v is _ABSENT:
            v = module._modules.get(name, _ABSENT)
            if v is _ABSENT:
                return getattr(module, name)
    return v


def _proxy(*args):
    """The first torch.fx Proxy among ``args`` (symbolic tracing), else None."""
    for a in args:
        if isinstance(a, _Proxy):
            return a
    return None


def _trace_as_leaf(module: torch.nn.Module, proxy, args):
    """Under torch.fx symbolic tracing: ``module`` recorded as one call_module node, as the tracer
    records torch.nn's own layers (cnnkern's ops cannot take a Proxy)."""
    tracer = proxy.tracer
    return tracer.create_proxy("call_module", tracer.path_of_module(module), tuple(args), {})


class _NoScript:
    """torch.jit.script cannot compile cnnkern's fusing modules: say so, and what works instead."""

    def __prepare_scriptable__(self):
        raise TypeError(
            f"torch.jit.script does not support {type(self).__name__} (cnnkern's fused layers choose "
            "between a fused kernel and their member modules at run time); use torch.compile(model), "
            "torch.export.export(model, args) or torch.jit.trace(model, example) instead"
        )


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
        p = _proxy(x, shortcut)
        if p is not None:
            return _trace_as_leaf(self, p, (x, shortcut))
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

    def __init__(
        self, size: int, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0, *, backend: str | None = None
    ):
        super().__init__(size, alpha, beta, k)
        self.backend = backend

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if isinstance(input, _Proxy):
            return _trace_as_leaf(self, input, (input,))
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

    def __init__(
        self,
        in_channels,
        out_channels,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups=1,
        bias=True,
        padding_mode="zeros",
        device=None,
        dtype=None,
        *,
        activation=None,
        backend=None,
    ):
        if padding_mode != "zeros":
            raise ValueError(f"cnnkern.nn.Conv2d: padding_mode={padding_mode!r} is not supported, only 'zeros'")
        if activation not in (None, "relu"):
            raise ValueError(f"cnnkern.nn.Conv2d: activation must be None or 'relu', got {activation!r}")
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode, device, dtype
        )
        self.activation = activation
        self.backend = backend

    @classmethod
    def from_torch(cls, conv: torch.nn.Conv2d, *, activation=None, backend=None) -> "Conv2d":
        """A cnnkern Conv2d sharing ``conv``'s parameters (no copy)."""
        new = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            conv.bias is not None,
            conv.padding_mode,
            device="meta",
            activation=activation,
            backend=backend,
        )
        new.weight = conv.weight
        new.bias = conv.bias
        return new

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``activation(conv(input) + residual)``; ``residual`` (None, or the output's shape) is
        added in the convolution's epilogue."""
        return self._conv_forward(input, _member(self, "weight"), _member(self, "bias"), residual)

    def _conv_forward(self, input, weight, bias, residual=None):
        p = _proxy(input, residual)
        if p is not None:
            return _trace_as_leaf(self, p, (input,) if residual is None else (input, residual))
        return F.conv2d(
            input,
            weight,
            bias,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            activation=self.activation,
            residual=residual,
            backend=self.backend,
        )

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

    def __init__(
        self,
        in_channels,
        out_channels,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups=1,
        bias=False,
        eps=1e-5,
        momentum=0.1,
        relu=True,
        *,
        backend=None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.conv = torch.nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, device=device, dtype=dtype
        )
        self.bn = torch.nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum, device=device, dtype=dtype)
        self.relu = relu
        self.backend = backend

    @classmethod
    def from_modules(
        cls, conv: torch.nn.Conv2d, bn: torch.nn.BatchNorm2d, relu: bool = True, *, backend=None
    ) -> "ConvBNReLU2d":
        """A fused layer built on existing modules (their parameters and buffers are shared)."""
        if conv.padding_mode != "zeros":
            raise ValueError(
                f"ConvBNReLU2d.from_modules: conv.padding_mode={conv.padding_mode!r} is not supported, only 'zeros'"
            )
        if bn.num_features != conv.out_channels:
            raise ValueError(
                f"ConvBNReLU2d.from_modules: bn has {bn.num_features} features but conv has "
                f"{conv.out_channels} output channels"
            )
        new = cls.__new__(cls)
        torch.nn.Module.__init__(new)
        new.conv, new.bn, new.relu, new.backend = conv, bn, relu, backend
        return new

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``[relu](bn(conv(x)) + residual)``; ``residual`` (None, or the output's shape) is added
        in the kernel that applies BatchNorm (training) or in the convolution's epilogue (eval).
        With a hook on ``conv`` or ``bn`` (or a global module hook) they run one by one instead."""
        p = _proxy(x, residual)
        if p is not None:
            return _trace_as_leaf(self, p, (x,) if residual is None else (x, residual))
        conv, bn = _member(self, "conv"), _member(self, "bn")
        if hooks_active(conv, bn):
            y = bn(conv(x))
            y = y if residual is None else y + residual
            return torch.relu(y) if self.relu else y
        return conv_bn_forward(conv, bn, x, relu=self.relu, backend=self.backend, residual=residual)

    def extra_repr(self) -> str:
        return f"relu={self.relu}" + (f", backend={self.backend!r}" if self.backend else "")


# ---------------------------------------------------------------------------------------------
# Conv2d [-> BatchNorm2d] [-> ReLU] on existing torch modules: the engine behind ConvBNReLU2d,
# cnnkern.nn.Sequential, the models and cnnkern.convert.
# ---------------------------------------------------------------------------------------------
_FOLD_ATTR = "_cnnkern_folded"  # plain attribute on the BatchNorm module: (key, weight, bias)


def _eval_weights(bn, weight, bias, mean, var, gamma, beta):
    """BatchNorm (``bn``'s tensors given) folded into the conv's ``weight`` and ``bias``. Cached on
    the BatchNorm module while no parameter or statistic changes (any in-place change bumps a
    version counter); recomputed, differentiably, whenever autograd records or torch.compile traces."""
    tensors = (weight, bias, mean, var, gamma, beta)
    args = (*tensors, bn.eps)
    recording = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    if recording or torch.compiler.is_compiling():
        return F.fold_bn(*args)
    key = tuple((t.data_ptr(), t._version, t.dtype, t.device) if t is not None else None for t in tensors), bn.eps
    cached = bn.__dict__.get(_FOLD_ATTR)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, *F.fold_bn(*args))
        bn.__dict__[_FOLD_ATTR] = cached
    return cached[1], cached[2]


def conv_bn_forward(
    conv: torch.nn.Conv2d,
    bn: torch.nn.BatchNorm2d | None,
    x: torch.Tensor,
    relu: bool = True,
    backend: str | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[relu](bn(conv(x)) + residual)`` (``bn`` and ``residual`` may be None) on cnnkern's
    kernels, with exactly the module semantics of ``torch.nn.Conv2d`` and ``torch.nn.BatchNorm2d``
    (training flag, running statistics, ``momentum=None``, ``num_batches_tracked``,
    ``track_running_stats=False``); the residual is added by the kernel that applies the ReLU."""
    if conv.padding_mode != "zeros":
        raise ValueError(f"cnnkern: Conv2d with padding_mode={conv.padding_mode!r} is not supported, only 'zeros'")
    weight, bias = _member(conv, "weight"), _member(conv, "bias")
    if bn is None:
        return F.conv2d(
            x,
            weight,
            bias,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            activation="relu" if relu else None,
            residual=residual,
            backend=backend,
        )
    mean, var = _member(bn, "running_mean"), _member(bn, "running_var")
    gamma, beta = _member(bn, "weight"), _member(bn, "bias")
    if bn.training or mean is None:
        momentum = bn.momentum
        tracked = _member(bn, "num_batches_tracked")
        update = bn.training
        if not (update and bn.track_running_stats):
            tracked = None
        if tracked is not None:  # incremented by the kernel that updates the running statistics
            if momentum is None:  # cumulative moving average, as torch.nn.BatchNorm2d (after the increment)
                momentum = 1.0 / (float(tracked) + 1.0)
            if mean is None:  # (no running statistics to update: counted here, as the module counts)
                tracked.add_(1)
                tracked = None
        return F.conv_bn_relu(
            x,
            weight,
            bias,
            mean if update else None,
            var if update else None,
            gamma,
            beta,
            training=True,
            momentum=0.0 if momentum is None else momentum,
            eps=bn.eps,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            relu=relu,
            residual=residual,
            num_batches_tracked=tracked,
            backend=backend,
        )
    # Without a residual, BatchNorm is folded while its tensors are unchanged (cnnkern/ops/_plan.py:
    # FoldPlan); the torch reference keeps conv and BatchNorm apart (and so does cnnkern.summary's
    # trace). Otherwise the fold is cached here and the residual added in the conv's epilogue.
    if residual is None or _backend.resolve("conv_bn_relu", backend, x.device) == "torch":
        return F.conv_bn_relu(
            x,
            weight,
            bias,
            mean,
            var,
            gamma,
            beta,
            training=False,
            eps=bn.eps,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            relu=relu,
            residual=residual,
            backend=backend,
        )
    w, b = _eval_weights(bn, weight, bias, mean, var, gamma, beta)
    return F.conv2d(
        x,
        w,
        b,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        activation="relu" if relu else None,
        residual=residual,
        backend=backend,
    )


def _conv_out_shape(conv: torch.nn.Conv2d, x: torch.Tensor) -> tuple:
    """The (N, K, P, Q) that ``conv`` gives for a 4-D input ``x``."""
    if conv.padding == "same":
        return (x.shape[0], conv.out_channels, *x.shape[2:])
    pad = (0, 0) if conv.padding == "valid" else conv.padding
    hw = [
        (x.shape[2 + i] + 2 * pad[i] - conv.dilation[i] * (conv.kernel_size[i] - 1) - 1) // conv.stride[i] + 1
        for i in range(2)
    ]
    return (x.shape[0], conv.out_channels, *hw)


def _add_relu(y, identity, relu, backend, where):
    """``[relu](y + identity)`` where the shortcut does not fit the fused kernel: cnnkern's residual
    add (option A: subsampled, zero-padded channels), else PyTorch's sum with a warning."""
    reason = None
    if not (isinstance(y, torch.Tensor) and isinstance(identity, torch.Tensor)):
        reason = "an operand is not a tensor"
    elif y.dim() != 4 or identity.dim() != 4:
        reason = f"operands are {y.dim()}-D and {identity.dim()}-D, not 4-D"
    elif y.dtype != identity.dtype or y.device != identity.device:
        reason = f"operands differ in dtype/device ({y.dtype}, {y.device} vs {identity.dtype}, {identity.device})"
    else:
        try:
            _checks.option_a_stride("residual_add", y, identity)
        except ValueError as exc:
            reason = str(exc)
    if reason is None:
        return F.residual_add(y, identity, relu=relu, backend=backend)
    if where is not None:
        where(reason)
    y = y + identity
    return torch.relu(y) if relu else y


def fused_conv(x, residual, conv, bn=None, act=None, shortcut=None, join=None, relu=False, backend=None, where=None):
    """``[relu](bn(conv(x)) [+ shortcut(residual)])`` on existing modules: one cnnkern kernel, or,
    when a hook watches ``conv``, ``bn`` or ``act`` (or a global module hook is registered), those
    modules called one by one in PyTorch's order with their real intermediate tensors.

    Args:
        x: the convolution's input.
        residual: None, or the input of ``shortcut`` (the shortcut itself where ``shortcut`` is None).
        conv, bn: a zeros-padded ``torch.nn.Conv2d`` and a ``torch.nn.BatchNorm2d`` (or None).
        act: the ``torch.nn.ReLU`` module that applies the ReLU (None: ``torch.relu`` where ``relu``).
        shortcut: a module computing the shortcut from ``residual`` (a projection), or None.
        join: the module that joins a shortcut not of the output's shape (a ``ResidualAdd`` for
            option A), or None (cnnkern's residual add, or PyTorch's sum with a warning).
        relu: apply the ReLU (after the shortcut is added).
        backend: cnnkern backend, None for the current default.
        where: called with a reason when a join falls back to PyTorch (convert's warning).
    """
    relu = relu or act is not None
    if hooks_active(conv, bn, act):
        y = conv(x)
        if bn is not None:
            y = bn(y)
        if residual is not None:
            identity = residual if shortcut is None else shortcut(residual)
            if not (isinstance(identity, torch.Tensor) and identity.shape == y.shape):
                return join(y, identity) if join is not None else _add_relu(y, identity, relu, backend, where)
            y = y + identity
        if not relu:
            return y
        return act(y) if act is not None else torch.relu(y)
    if residual is None:
        return conv_bn_forward(conv, bn, x, relu=relu, backend=backend)
    identity = residual if shortcut is None else shortcut(residual)
    if (
        isinstance(identity, torch.Tensor)
        and isinstance(x, torch.Tensor)
        and x.dim() == 4
        and identity.dtype == x.dtype
        and identity.device == x.device
        and tuple(identity.shape) == _conv_out_shape(conv, x)
    ):
        return conv_bn_forward(conv, bn, x, relu=relu, backend=backend, residual=identity)
    y = conv_bn_forward(conv, bn, x, relu=False, backend=backend)
    return join(y, identity) if join is not None else _add_relu(y, identity, relu, backend, where)


def _trace_fused(proxy, x, residual, members, relu, backend):
    """Under torch.fx symbolic tracing: a ``fused_conv`` call node whose modules are ``get_attr``
    nodes, so the traced module holds them under their own names and still runs cnnkern."""
    tracer = proxy.tracer
    mods = tuple(
        None if m is None else tracer.create_proxy("get_attr", tracer.path_of_module(m), (), {}) for m in members
    )
    return tracer.create_proxy("call_function", fused_conv, (x, residual, *mods), {"relu": relu, "backend": backend})


class FusedConv2d(_NoScript, torch.nn.Module):
    """A fused layer over modules that live elsewhere in the model: ``conv [-> bn] [+ shortcut]
    [-> relu]`` as one cnnkern kernel (:func:`fused_conv`). It holds its members by reference
    (they stay registered, with their parameters and state_dict keys, where the model defines
    them), so its own state_dict is empty. A hook on a member makes it call its members one by one;
    it prints as what it fuses, e.g. ``ConvBNReLU2d(conv=conv1, bn=bn1, relu=relu)``.

    Args:
        conv, bn: the ``torch.nn.Conv2d`` and ``torch.nn.BatchNorm2d`` (or None).
        relu: the ``torch.nn.ReLU`` module, True (``torch.relu``), or False/None (no ReLU).
        shortcut: a module that maps ``forward``'s ``residual`` to the shortcut (a projection), or None.
        join: a module for shortcuts not of the output's shape (``ResidualAdd``), or None.
        residual: whether ``forward`` takes a shortcut (for the printed name).
        backend: cnnkern backend (None: the current default).
        names: the members' names to print, by role ("conv", "bn", "relu", "shortcut", "join").
        where: called with a reason when a join falls back to PyTorch.
    """

    def __init__(
        self,
        conv,
        bn=None,
        relu=None,
        *,
        shortcut=None,
        join=None,
        residual=False,
        backend=None,
        names=None,
        where=None,
    ):
        super().__init__()
        if not isinstance(conv, torch.nn.Conv2d) or conv.padding_mode != "zeros":
            raise ValueError(f"FusedConv2d: conv must be a zeros-padded torch.nn.Conv2d, got {conv!r}")
        if bn is not None and bn.num_features != conv.out_channels:
            raise ValueError(
                f"FusedConv2d: bn has {bn.num_features} features but conv has {conv.out_channels} output channels"
            )
        act = relu if isinstance(relu, torch.nn.Module) else None
        # a tuple, not attributes: Module.__setattr__ would register the members a second time
        self._members = (conv, bn, act, shortcut, join)
        self.relu = bool(relu)
        self.residual = residual or shortcut is not None
        self.backend = backend
        self._names = dict(names or {})
        self._where = where

    conv = property(lambda self: self._members[0])
    bn = property(lambda self: self._members[1])

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        p = _proxy(x, residual)
        if p is not None:
            return _trace_fused(p, x, residual, self._members, self.relu, self.backend)
        return fused_conv(x, residual, *self._members, relu=self.relu, backend=self.backend, where=self._where)

    def _get_name(self):
        return (
            "Conv"
            + ("BN" if self.bn is not None else "")
            + ("Add" if self.residual else "")
            + ("ReLU" if self.relu else "")
            + "2d"
        )

    def extra_repr(self) -> str:
        parts = []
        for role, m in zip(("conv", "bn", "relu", "shortcut", "join"), self._members):
            if m is not None:
                parts.append(f"{role}={self._names.get(role, type(m).__name__)}")
        if self.relu and self._members[2] is None:
            parts.append("relu=True")
        return ", ".join(parts) + (f", backend={self.backend!r}" if self.backend else "")


def _chains(mods):
    """(start, conv, bn, relu module, end) of every ``Conv2d [-> BatchNorm2d] [-> ReLU]`` run in ``mods``."""
    out, i = [], 0
    while i < len(mods):
        m = mods[i]
        if isinstance(m, torch.nn.Conv2d) and m.padding_mode == "zeros" and not getattr(m, "activation", None):
            bn = mods[i + 1] if i + 1 < len(mods) and isinstance(mods[i + 1], torch.nn.BatchNorm2d) else None
            j = i + 1 + (bn is not None)
            act = mods[j] if j < len(mods) and isinstance(mods[j], torch.nn.ReLU) else None
            out.append((i, m, bn, act, j + (act is not None)))
            i = j + (act is not None)
        else:
            i += 1
    return out


class Sequential(_NoScript, torch.nn.Sequential):
    """``torch.nn.Sequential`` that runs every ``Conv2d [-> BatchNorm2d] [-> ReLU]`` run of its
    children as one fused cnnkern layer (the same children, so the same state_dict keys as the
    torch model it mirrors, e.g. torchvision's VGG ``features``). Other children run as usual; a
    run with a hooked child (or under a global module hook) calls its children one by one. It
    prints the runs it fuses above its children."""

    def __init__(self, *args, backend: str | None = None):
        super().__init__(*args)
        self.backend = backend

    def forward(self, x):
        mods = list(self._modules.values())
        i = 0
        for start, conv, bn, act, end in _chains(mods):
            for m in mods[i:start]:
                x = m(x)
            backend = getattr(conv, "backend", None) or self.backend
            if isinstance(x, _Proxy):
                x = _trace_fused(x, x, None, (conv, bn, act, None, None), act is not None, backend)
            else:
                x = fused_conv(x, None, conv, bn, act, backend=backend)
            i = end
        for m in mods[i:]:
            x = m(x)
        return x

    def extra_repr(self) -> str:
        names = list(self._modules)
        runs = []
        for start, _conv, bn, act, end in _chains(list(self._modules.values())):
            kind = "Conv" + ("BN" if bn is not None else "") + ("ReLU" if act is not None else "") + "2d"
            runs.append(f"{kind}({', '.join(names[start:end])})")
        s = ("fused: " + ", ".join(runs)) if runs else ""
        return s + (f"{', ' if s else ''}backend={self.backend!r}" if self.backend else "")
