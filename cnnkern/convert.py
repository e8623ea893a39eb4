"""Rewrite an existing PyTorch model onto cnnkern's kernels: ``cnnkern.convert(model)``.

What it rewrites (parameters and buffers stay the same objects, state_dict keys stay the same):

* every ``Conv2d [-> BatchNorm2d] [-> ReLU]`` chain whose intermediate results have no other use
  becomes one fused layer, a ``cnnkern.nn.FusedConv2d`` registered next to its conv as
  ``<conv>_fused`` (e.g. ``layer1.0.conv1_fused``; folded BatchNorm in eval, statistics from the
  convolution's epilogue in training, exactly BatchNorm2d's module semantics);
* ``relu(a + b)`` on two tensors becomes cnnkern's residual add (``ResidualReLU``: when both are
  4-D and b is a's shape or an option-A shortcut of it; anything else runs as ``relu(a + b)`` with
  a warning naming the layer); where ``a`` (or ``b``) is a fused ``Conv2d [-> BatchNorm2d]`` used
  only there, a shortcut of its output's shape is added by that layer's own kernel instead (a
  ResNet block's end: no separate add; a projection shortcut is run by that layer);
* every ``LocalResponseNorm`` becomes cnnkern's.

The fused layers hold the original modules by reference (they stay where they were, with their
state_dict keys) and, when one of those modules has a hook (or a global module hook is
registered), call them one by one in the original order instead of the fused kernel.

How: ``torch.fx.symbolic_trace`` sees through opaque ``forward`` methods (ResNet blocks,
Inception branches), so chains and residual adds inside them are found. Tracing fixes Python
control flow at conversion time: a forward that branches on ``self.training`` (torchvision's
GoogLeNet with aux_logits) keeps the branch of the mode it was converted in. Where tracing fails
(data-dependent control flow), ``convert`` falls back to swapping modules without tracing: every
``nn.Sequential`` becomes a fusing ``cnnkern.nn.Sequential``, every other Conv2d and
LocalResponseNorm a cnnkern layer; residual adds inside opaque forwards then stay PyTorch's.
Convolutions with a ``padding_mode`` other than "zeros" are left alone, with a warning.
"""

from __future__ import annotations

import copy
import operator
import warnings

import torch
from torch import fx
from torch import nn as tnn

from . import nn as cnn

__all__ = ["convert", "ResidualReLU"]

_RELU_FUNCS = (torch.relu, tnn.functional.relu, torch.relu_)


class _Fallback:
    """Warns, once, that the join ``name`` runs in PyTorch and why (a picklable callable)."""

    def __init__(self, name: str):
        self.name, self.warned = name, False

    def __call__(self, reason: str) -> None:
        if not self.warned:
            self.warned = True
            warnings.warn(
                f"cnnkern.convert: {self.name} runs relu(a + b) in PyTorch, not cnnkern's residual add: {reason}",
                stacklevel=3,
            )


class ResidualReLU(cnn._NoScript, tnn.Module):
    """``relu(a + b)`` of a converted model: cnnkern's residual add (identity or option-A shortcut),
    PyTorch's sum with a warning where it cannot apply. A hook on its ReLU module (or a global
    module hook) makes it run ``relu(a + b)`` in PyTorch with that module."""

    def __init__(self, relu=None, backend=None, name="residual_add", relu_name=None):
        super().__init__()
        self._members = (relu if isinstance(relu, tnn.Module) else None,)  # held, not registered
        self.backend = backend
        self._where = _Fallback(name)
        self._relu_name = relu_name

    def forward(self, a, b):
        p = cnn._proxy(a, b)
        if p is not None:
            return cnn._trace_as_leaf(self, p, (a, b))
        act = self._members[0]
        if cnn.hooks_active(act):
            y = a + b
            return act(y) if act is not None else torch.relu(y)
        return cnn._add_relu(a, b, True, self.backend, self._where)

    def _get_name(self):
        return "ResidualAdd"

    def extra_repr(self) -> str:
        return f"relu={self._relu_name or True}" + (f", backend={self.backend!r}" if self.backend else "")


def _is_relu(node: fx.Node, modules) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(node.target), tnn.ReLU)
    if node.op == "call_function":
        return node.target in _RELU_FUNCS
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _only_user(node: fx.Node):
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _unique(gm: fx.GraphModule, path: str) -> str:
    """``path``, or ``path_2``, ``path_3``...: the first that names no submodule of ``gm``."""
    target, k = path, 1
    while True:
        try:
            gm.get_submodule(target)
        except AttributeError:
            break
        k += 1
        target = f"{path}_{k}"
    return target


def _fuse(gm: fx.GraphModule, backend) -> int:
    """Rewrite conv[-BN][-ReLU] chains and relu(a + b) joins of ``gm`` into cnnkern layers
    (FusedConv2d / ResidualReLU modules registered next to the modules they run); their number."""
    modules = dict(gm.named_modules())
    graph = gm.graph
    count = 0
    plain = {}  # fused conv[-BN] nodes without a ReLU -> (conv node target, view): a join may absorb them
    skipped = []
    for node in list(graph.nodes):
        if node.op != "call_module" or node.graph is None:
            continue
        conv = modules.get(node.target)
        if not isinstance(conv, tnn.Conv2d) or getattr(conv, "activation", None):
            continue
        if conv.padding_mode != "zeros":
            skipped.append(f"{node.target} (padding_mode={conv.padding_mode!r})")
            continue
        chain, bn, relu = [node], None, False
        nxt = _only_user(node)
        if nxt is not None and nxt.op == "call_module" and isinstance(modules.get(nxt.target), tnn.BatchNorm2d):
            bn = modules[nxt.target]
            chain.append(nxt)
            nxt = _only_user(nxt)
        if nxt is not None and _is_relu(nxt, modules) and len(nxt.args) >= 1 and nxt.args[0] is chain[-1]:
            relu = modules[nxt.target] if nxt.op == "call_module" else True
            chain.append(nxt)
        names = {"conv": node.target}
        if bn is not None:
            names["bn"] = chain[1].target
        if isinstance(relu, tnn.Module):
            names["relu"] = chain[-1].target
        view = cnn.FusedConv2d(conv, bn, relu, backend=backend, names=names)
        target = _unique(gm, f"{node.target}_fused")
        gm.add_submodule(target, view)
        with graph.inserting_after(chain[-1]):
            fused = graph.call_module(target, (node.args[0],))
        chain[-1].replace_all_uses_with(fused)
        for old in reversed(chain):
            graph.erase_node(old)
        if not relu:
            plain[fused] = view
        count += 1
    if skipped:
        warnings.warn(
            "cnnkern.convert: left in PyTorch: " + ", ".join(skipped) + "; cnnkern's convolution "
            "supports padding_mode='zeros' only",
            stacklevel=3,
        )
    for node in list(graph.nodes):  # relu(a + b)
        if (
            node.op == "call_function"
            and node.target in (operator.add, torch.add)
            and len(node.args) == 2
            and not node.kwargs
            and all(isinstance(a, fx.Node) for a in node.args)
        ):
            relu = _only_user(node)
            if relu is None or not _is_relu(relu, modules) or relu.args[0] is not node:
                continue
            act = modules[relu.target] if relu.op == "call_module" else None
            # a conv[-BN] branch used only here takes the shortcut into its own kernel, where that
            # keeps the order the modules run in: nothing between the branch and the add but (at
            # most) a fused conv[-BN] projection of the shortcut, which the join then runs itself
            branch = next((a for a in node.args if a in plain and _only_user(a) is node), None)
            shortcut_view = None
            if branch is not None:
                other = node.args[1] if node.args[0] is branch else node.args[0]
                between, n = [], branch.next
                while n is not node and n.op != "root":
                    between.append(n)
                    n = n.next
                if between == [other] and other in plain and _only_user(other) is node:
                    shortcut_view = other
                elif between:
                    branch = None
            with graph.inserting_after(relu):
                if branch is not None:
                    view = plain[branch]
                    shortcut = other if shortcut_view is None else shortcut_view.args[0]
                    names = dict(view._names)
                    if act is not None:
                        names["relu"] = relu.target
                    if shortcut_view is not None:
                        names["shortcut"] = shortcut_view.target
                    join = cnn.FusedConv2d(
                        view.conv,
                        view.bn,
                        act if act is not None else True,
                        shortcut=plain[shortcut_view] if shortcut_view is not None else None,
                        residual=True,
                        backend=backend,
                        names=names,
                    )
                    target = branch.target
                    join._where = _Fallback(target)
                    gm.add_submodule(target, join)  # replaces the branch's view
                    joined = graph.call_module(target, (branch.args[0], shortcut))
                else:
                    path = f"{relu.target}_add" if relu.op == "call_module" else f"{node.name}_relu"
                    target = _unique(gm, path)
                    view = ResidualReLU(act, backend, target, relu.target if act is not None else None)
                    gm.add_submodule(target, view)
                    joined = graph.call_module(target, node.args)
            relu.replace_all_uses_with(joined)
            graph.erase_node(relu)
            graph.erase_node(node)
            if branch is not None:
                graph.erase_node(branch)
                if shortcut_view is not None:
                    graph.erase_node(shortcut_view)
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
            warnings.warn(
                f"cnnkern.convert: torch.fx could not trace {type(model).__name__} ({exc}); falling back to "
                "module swaps (residual adds inside opaque forwards stay PyTorch's)",
                stacklevel=2,
            )
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
