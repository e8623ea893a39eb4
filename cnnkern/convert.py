"""Rewrite an existing PyTorch model onto cnnkern's kernels: ``cnnkern.convert(model)``.

What it rewrites (parameters and buffers stay the same objects, state_dict keys stay the same):

* every ``Conv2d [-> BatchNorm2d] [-> ReLU]`` chain whose intermediate results have no other use
  becomes one fused call (cnnkern.nn.conv_bn_forward: folded BatchNorm in eval, statistics from the
  convolution's epilogue in training, exactly BatchNorm2d's module semantics);
* ``relu(a + b)`` on two tensors becomes cnnkern's residual add (when both are 4-D and b is a's
  shape or an option-A shortcut of it; anything else still runs as ``relu(a + b)``); where ``a``
  (or ``b``) is a fused ``Conv2d [-> BatchNorm2d]`` used only there, a shortcut of its output's
  shape is added by that layer's own kernel instead (a ResNet block's end: no separate add);
* every ``LocalResponseNorm`` becomes cnnkern's.

How: ``torch.fx.symbolic_trace`` sees through opaque ``forward`` methods (ResNet blocks,
Inception branches), so chains and residual adds inside them are found. Tracing fixes Python
control flow at conversion time: a forward that branches on ``self.training`` (torchvision's
GoogLeNet with aux_logits) keeps the branch of the mode it was converted in. Where tracing fails
(data-dependent control flow), ``convert`` falls back to swapping modules without tracing: every
``nn.Sequential`` becomes a fusing ``cnnkern.nn.Sequential``, every other Conv2d and
LocalResponseNorm a cnnkern layer; residual adds inside opaque forwards then stay PyTorch's.
Convolutions with a ``padding_mode`` other than "zeros" are left alone.
"""

from __future__ import annotations

import copy
import operator
import warnings

import torch
from torch import fx
from torch import nn as tnn

from . import _checks
from . import functional as F
from . import nn as cnn
from .ops.conv2d import output_size

__all__ = ["convert"]

_RELU_FUNCS = (torch.relu, tnn.functional.relu, torch.relu_)


def _residual_add_or_sum(a, b, backend=None):
    """cnnkern's residual add where it applies; PyTorch's relu(a + b) for anything else."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dim() == 4 and b.dim() == 4 \
            and a.dtype == b.dtype and a.device == b.device and b.shape[1] <= a.shape[1] and b.shape[0] == a.shape[0] \
            and (b.shape == a.shape or all(hb >= ha for ha, hb in zip(a.shape[2:], b.shape[2:]))):
        try:
            return F.residual_add(a, b, relu=True, backend=backend)
        except ValueError:  # no option-A mapping fits: not a residual join after all
            pass
    return torch.relu(a + b)


# fx names graph nodes and generated-code globals after a target's __name__, so the rewritten
# calls are plain closures rather than functools.partial objects.
def _fused_layer(conv, bn, relu, backend):
    def conv_bn_relu(x):
        return cnn.conv_bn_forward(conv, bn, x, relu=relu, backend=backend)
    return conv_bn_relu


def _conv_out_shape(conv, x):
    """The (N, K, P, Q) that ``conv`` (a zeros-padded torch Conv2d) gives for input x, by the
    ops' own rule (an invalid call is left to the fused layer, which raises for it)."""
    try:
        stride, pad, dilation = _checks.conv_args("conv2d", x, conv.weight, conv.bias, conv.stride, conv.padding,
                                                  conv.dilation, conv.groups)
    except (TypeError, ValueError):
        return None
    return tuple(output_size(x.shape, conv.weight.shape, stride, pad, dilation))


def _fused_join(conv, bn, backend):
    """relu(bn(conv(x)) + shortcut) as one fused layer whose kernel adds the shortcut; an
    option-A (or otherwise mismatched) shortcut goes through the residual add instead."""
    def conv_bn_add_relu(x, shortcut):
        if isinstance(shortcut, torch.Tensor) and isinstance(x, torch.Tensor) and x.dim() == 4 \
                and shortcut.dtype == x.dtype and shortcut.device == x.device \
                and tuple(shortcut.shape) == _conv_out_shape(conv, x):  # else option A, or an error below
            return cnn.conv_bn_forward(conv, bn, x, relu=True, backend=backend, residual=shortcut)
        return _residual_add_or_sum(cnn.conv_bn_forward(conv, bn, x, relu=False, backend=backend), shortcut, backend)
    return conv_bn_add_relu


def _residual_join(backend):
    def residual_add(a, b):
        return _residual_add_or_sum(a, b, backend)
    return residual_add


def _is_relu(node: fx.Node, modules) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(node.target), tnn.ReLU)
    if node.op == "call_function":
        return node.target in _RELU_FUNCS
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _only_user(node: fx.Node):
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _fuse(gm: fx.GraphModule, backend) -> int:
    modules = dict(gm.named_modules())
    graph = gm.graph
    count = 0
    plain = {}  # fused conv[-BN] nodes without a ReLU -> (conv, bn): a residual join may absorb them
    for node in list(graph.nodes):
        if node.op != "call_module" or node.graph is None:
            continue
        conv = modules.get(node.target)
        if not isinstance(conv, tnn.Conv2d) or conv.padding_mode != "zeros" or getattr(conv, "activation", None):
            continue
        chain, bn, relu = [node], None, False
        nxt = _only_user(node)
        if nxt is not None and nxt.op == "call_module" and isinstance(modules.get(nxt.target), tnn.BatchNorm2d):
            bn = modules[nxt.target]
            chain.append(nxt)
            nxt = _only_user(nxt)
        if nxt is not None and _is_relu(nxt, modules) and len(nxt.args) >= 1 and nxt.args[0] is chain[-1]:
            relu = True
            chain.append(nxt)
        fn = _fused_layer(conv, bn, relu, backend)
        with graph.inserting_after(chain[-1]):
            fused = graph.call_function(fn, (node.args[0],))
        chain[-1].replace_all_uses_with(fused)
        for old in reversed(chain):
            graph.erase_node(old)
        if not relu:
            plain[fused] = (conv, bn)
        count += 1
    for node in list(graph.nodes):  # relu(a + b)
        if node.op == "call_function" and node.target in (operator.add, torch.add) and len(node.args) == 2 \
                and not node.kwargs and all(isinstance(a, fx.Node) for a in node.args):
            relu = _only_user(node)
            if relu is None or not _is_relu(relu, modules) or relu.args[0] is not node:
                continue
            # a conv[-BN] branch used only here takes the shortcut into its own kernel
            branch = next((a for a in node.args if a in plain and _only_user(a) is node), None)
            with graph.inserting_after(relu):
                if branch is not None:
                    shortcut = node.args[1] if node.args[0] is branch else node.args[0]
                    joined = graph.call_function(_fused_join(*plain[branch], backend), (branch.args[0], shortcut))
                else:
                    joined = graph.call_function(_residual_join(backend), node.args)
            relu.replace_all_uses_with(joined)
            graph.erase_node(relu)
            graph.erase_node(node)
            if branch is not None:
                graph.erase_node(branch)
            count += 1
    graph.lint()
    gm.recompile()
    return count


def _swap_modules(module: tnn.Module, backend) -> None:
    for name, child in list(module.named_children()):
        if isinstance(child, tnn.Sequential) and not isinstance(child, cnn.Sequential):
            new = cnn.Sequential(backend=backend)
            for n, m in child.named_children():
                new.add_module(n, m)
            setattr(module, name, new)
            child = new
        elif isinstance(child, tnn.Conv2d) and not isinstance(child, cnn.Conv2d) and child.padding_mode == "zeros":
            setattr(module, name, cnn.Conv2d.from_torch(child, backend=backend))
            continue
        elif isinstance(child, tnn.LocalResponseNorm) and not isinstance(child, cnn.LocalResponseNorm):
            setattr(module, name, cnn.LocalResponseNorm(child.size, child.alpha, child.beta, child.k, backend=backend))
            continue
        _swap_modules(child, backend)


def _swap_lrn(gm: tnn.Module, backend) -> None:
    for name, mod in list(gm.named_modules()):
        if isinstance(mod, tnn.LocalResponseNorm) and not isinstance(mod, cnn.LocalResponseNorm):
            parent_name, _, leaf = name.rpartition(".")
            parent = gm.get_submodule(parent_name) if parent_name else gm
            setattr(parent, leaf, cnn.LocalResponseNorm(mod.size, mod.alpha, mod.beta, mod.k, backend=backend))


def convert(model: tnn.Module, inplace: bool = False, backend: str | None = None, trace: bool = True) -> tnn.Module:
    """``model`` on cnnkern's kernels, with the same parameters (shared, not copied), the same
    state_dict keys, the same outputs in eval and the same training behaviour.

    Args:
        model: any ``torch.nn.Module`` (e.g. a torchvision resnet50, vgg16_bn, googlenet, alexnet).
        inplace: without tracing, rewrite ``model`` itself; with tracing the result is always a new
            ``torch.fx.GraphModule`` that shares ``model``'s submodules and leaves ``model`` as it was.
        backend: pin every rewritten layer to a backend (None: the current default).
        trace: try ``torch.fx.symbolic_trace`` first (see the module docstring); False: module swaps only.

    Returns:
        The converted model.
    """
    if trace:
        try:
            gm = fx.symbolic_trace(model)
        except Exception as exc:  # data-dependent control flow and the like
            warnings.warn(f"cnnkern.convert: torch.fx could not trace {type(model).__name__} ({exc}); falling back to "
                          "module swaps (residual adds inside opaque forwards stay PyTorch's)", stacklevel=2)
        else:
            _fuse(gm, backend)
            _swap_lrn(gm, backend)
            return gm
    if not inplace:
        # a new module tree over the same parameters and buffers
        memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
        model = copy.deepcopy(model, memo)
    _swap_modules(model, backend)
    return model
