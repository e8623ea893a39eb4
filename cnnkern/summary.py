"""Per-layer summary of a network: output shape, parameters, multiply-accumulates, activation memory.

    >>> s = cnnkern.summary(cnnkern.models.vgg16(), (1, 3, 224, 224))
    >>> print(s.table())

The model runs once on the ``meta`` device (no memory, no compute) with the ``"torch"`` backend,
in eval mode, while a torch-function mode records every layer-level call: convolutions, linear
layers, BatchNorm, pooling, LRN, residual adds and channel concatenations. Each row is named
after the module that owns the layer's parameters (``layer1.0.conv1``) or, for parameter-free
layers, the module that was running (``features.4``). MACs count one multiply-add per weight per
output position; activation memory is the number of output elements.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode

from . import _backend

__all__ = ["LayerRow", "Summary", "summary", "conv_layers"]


@dataclass
class LayerRow:
    name: str
    kind: str  # conv | linear | batchnorm | maxpool | avgpool | lrn | residual_add | concat
    input_shape: tuple
    output_shape: tuple
    params: int = 0  # weights + biases of this layer
    weights: int = 0  # weights only (the seed's GoogLeNet and VGG tables count these)
    macs: int = 0
    conv: dict | None = None  # conv rows: stride, padding, dilation, groups, kernel (for benchmarks)
    # conv rows (conv_layers): the name of the first occurrence of this convolution whose output,
    # after its BatchNorm, is added to a shortcut of the same shape (a ResNet block's last
    # convolution, whose fused layer takes the shortcut), or None
    joins_shortcut: str | None = None

    @property
    def activations(self) -> int:
        n = 1
        for d in self.output_shape:
            n *= d
        return n


@dataclass
class Summary:
    rows: list[LayerRow] = field(default_factory=list)
    dtype_bytes: int = 4

    @property
    def params(self) -> int:
        return sum(r.params for r in self.rows)

    @property
    def macs(self) -> int:
        return sum(r.macs for r in self.rows)

    @property
    def activations(self) -> int:
        return sum(r.activations for r in self.rows)

    def group(self, depth: int = 1) -> list[LayerRow]:
        """Rows merged by the first ``depth`` components of their names (e.g. one row per Inception
        module): params, weights and MACs summed, the last row's output shape kept."""
        out: dict[str, LayerRow] = {}
        for r in self.rows:
            key = ".".join(r.name.split(".")[:depth])
            if key not in out:
                out[key] = LayerRow(key, r.kind, r.input_shape, r.output_shape)
            g = out[key]
            g.params += r.params
            g.weights += r.weights
            g.macs += r.macs
            g.output_shape = r.output_shape
            if g.kind != r.kind:
                g.kind = "block"
        return list(out.values())

    def table(self, depth: int | None = None) -> str:
        rows = self.rows if depth is None else self.group(depth)
        w = max([len(r.name) for r in rows] + [5])
        lines = [f"{'layer':{w}}  {'kind':12} {'output':>20} {'params':>12} {'MACs':>15} {'activations':>12}"]
        for r in rows:
            shape = "x".join(map(str, r.output_shape))
            lines.append(f"{r.name:{w}}  {r.kind:12} {shape:>20} {r.params:12,d} {r.macs:15,d} {r.activations:12,d}")
        lines.append(f"{'total':{w}}  {'':12} {'':>20} {self.params:12,d} {self.macs:15,d} {self.activations:12,d}")
        lines.append(
            f"activation memory: {self.activations * self.dtype_bytes / 2**20:.1f} MiB "
            f"({self.dtype_bytes}-byte elements), parameters: {self.params * self.dtype_bytes / 2**20:.1f} MiB, "
            f"{self.macs / 1e9:.2f} GMACs"
        )
        return "\n".join(lines)


def _numel(t) -> int:
    return t.numel() if isinstance(t, torch.Tensor) else 0


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


class _Recorder(TorchFunctionMode):
    def __init__(self, names: dict[int, str], stack: list[str]):
        super().__init__()
        self.names, self.stack, self.rows = names, stack, []

    def _name(self, param=None) -> str:
        if param is not None and id(param) in self.names:
            return self.names[id(param)]
        return self.stack[-1] if self.stack else "?"

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        a = list(args)
        if name == "conv2d":
            x, w = a[0], a[1]
            b = a[2] if len(a) > 2 else kwargs.get("bias")
            get = lambda i, k, d: a[i] if len(a) > i else kwargs.get(k, d)  # noqa: E731
            n, k, p, q = out.shape
            macs = n * k * p * q * w.shape[1] * w.shape[2] * w.shape[3]
            conv = dict(
                stride=_pair(get(3, "stride", 1)),
                padding=get(4, "padding", 0),
                dilation=_pair(get(5, "dilation", 1)),
                groups=get(6, "groups", 1),
                kernel=tuple(w.shape[2:]),
            )
            self.rows.append(
                LayerRow(
                    self._name(w),
                    "conv",
                    tuple(x.shape),
                    tuple(out.shape),
                    w.numel() + _numel(b),
                    w.numel(),
                    macs,
                    conv,
                )
            )
        elif name == "linear":
            x, w = a[0], a[1]
            b = a[2] if len(a) > 2 else kwargs.get("bias")
            macs = (out.numel() // w.shape[0]) * w.numel()
            self.rows.append(
                LayerRow(
                    self._name(w), "linear", tuple(x.shape), tuple(out.shape), w.numel() + _numel(b), w.numel(), macs
                )
            )
        elif name == "batch_norm":
            w = a[3] if len(a) > 3 else kwargs.get("weight")
            b = a[4] if len(a) > 4 else kwargs.get("bias")
            self.rows.append(
                LayerRow(self._name(w), "batchnorm", tuple(a[0].shape), tuple(out.shape), _numel(w) + _numel(b))
            )
        elif name in (
            "max_pool2d",
            "_max_pool2d",
            "max_pool2d_with_indices",
            "avg_pool2d",
            "adaptive_avg_pool2d",
            "local_response_norm",
        ):
            kind = "lrn" if name == "local_response_norm" else "avgpool" if "avg" in name else "maxpool"
            res = out[0] if isinstance(out, tuple) else out
            self.rows.append(LayerRow(self._name(), kind, tuple(a[0].shape), tuple(res.shape)))
        elif (
            name in ("add", "__add__") and len(a) == 2 and all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in a)
        ):
            self.rows.append(LayerRow(self._name(), "residual_add", tuple(a[0].shape), tuple(out.shape)))
        elif name == "cat" and isinstance(a[0], (list, tuple)) and a[0] and a[0][0].dim() == 4:
            self.rows.append(LayerRow(self._name(), "concat", tuple(a[0][0].shape), tuple(out.shape)))
        return out


def summary(model: torch.nn.Module, input_size, dtype_bytes: int = 4) -> Summary:
    """Per-layer rows of ``model`` on an input of ``input_size`` ((N, C, H, W), or (C, H, W) for
    batch 1). The model is copied to the meta device; the original is not touched."""
    size = tuple(input_size)
    if len(size) == 3:
        size = (1, *size)
    net = copy.deepcopy(model).to("meta").eval()
    names = {}
    for mname, mod in net.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            names.setdefault(id(p), mname or pname)
    stack: list[str] = []
    paths = {id(m): n for n, m in net.named_modules()}

    def enter(m, inputs):
        stack.append(paths.get(id(m), stack[-1] if stack else "?"))

    def leave(m, inputs, output):  # a forward hook that returned something would replace the output
        stack.pop()

    pre = torch.nn.modules.module.register_module_forward_pre_hook(enter)
    post = torch.nn.modules.module.register_module_forward_hook(leave)
    rec = _Recorder(names, stack)
    try:
        with torch.no_grad(), _backend.use_backend("torch"), rec:
            net(torch.empty(size, device="meta"))
    finally:
        pre.remove()
        post.remove()
    return Summary(rec.rows, dtype_bytes)


def conv_layers(model: torch.nn.Module, input_size, followed_by_bn: bool = False) -> list[LayerRow]:
    """The distinct convolutions of ``model`` (by input shape, weight shape and conv arguments),
    in the order they first run: the benchmark's layer list, taken from the network itself.
    ``followed_by_bn``: only the convolutions whose output goes straight into a BatchNorm. A
    returned row's ``joins_shortcut`` is set where any of its occurrences ends a block: conv,
    BatchNorm, then a residual add of the conv's output shape (to the name of that occurrence)."""
    seen, out = {}, []
    rows = summary(model, input_size).rows
    for i, r in enumerate(rows):
        if r.kind != "conv":
            continue
        bn = i + 1 < len(rows) and rows[i + 1].kind == "batchnorm"
        if followed_by_bn and not bn:
            continue
        # the add follows the BatchNorm, or the projection shortcut (".downsample."), which a block
        # runs between its last BatchNorm and the add, as torchvision's blocks do
        j = i + 2
        while j < len(rows) and ".downsample." in rows[j].name and ".downsample." not in r.name:
            j += 1
        joins = (
            bn
            and ".downsample." not in r.name
            and j < len(rows)
            and rows[j].kind == "residual_add"
            and rows[j].output_shape == r.output_shape
            and rows[j].input_shape == r.output_shape
        )
        key = (r.input_shape, r.output_shape, tuple(sorted((k, str(v)) for k, v in r.conv.items())))
        if key not in seen:
            seen[key] = r
            out.append(r)
        if joins and seen[key].joins_shortcut is None:
            seen[key].joins_shortcut = r.name
    return out
