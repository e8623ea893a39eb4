"""torch.library registration of 2-D convolution: schema, fake implementation, autograd, routing.

Ops (``cnnkern`` namespace); ``padding`` is always ``[top, left, bottom, right]`` (so "same" with
an even kernel, which pads asymmetrically, needs no padded copy of the input) and ``precision`` is
``"tf32"`` or ``"ieee"`` (how fp32 inputs multiply; ignored for other dtypes):

* ``conv2d(x, w, bias?, residual?, stride, padding, dilation, groups, relu, precision, backend) -> y``:
  y = [relu](conv + bias + residual), the residual (the output's shape) added in the epilogue
* ``conv2d_backward_input(grad, w, input_size, stride, padding, dilation, groups,
  channels_last, precision, backend) -> grad_x``
* ``conv2d_backward_weight(grad, x, weight_size, stride, padding, dilation, groups, bias,
  channels_last, precision, backend) -> (grad_w, grad_bias)``; grad_bias is empty when ``bias``
  is false.

Backends: ``"triton"`` (kernels/conv2d.py) and ``"cuda"`` (csrc/cuda/conv2d*.cu, through the
``cnnkern::conv2d_*_cuda`` ops of cnnkern._C, which write into the outputs allocated here).
"""

from __future__ import annotations

import os
import sys

import torch
from torch.library import custom_op

from . import _tune
from ._common import cuda_ops, in_layout, new_output, output_channels_last, register_autograd


def _kernels():
    from cnnkern.kernels import conv2d as k  # on first use: see cnnkern/ops/residual_add.py

    return k


def output_size(x_shape, w_shape, stride, padding, dilation) -> list[int]:
    """(N, K, P, Q) of a convolution; padding = [top, left, bottom, right]."""
    n, _, h, w = x_shape
    k, _, r, s = w_shape
    p = (h + padding[0] + padding[2] - dilation[0] * (r - 1) - 1) // stride[0] + 1
    q = (w + padding[1] + padding[3] - dilation[1] * (s - 1) - 1) // stride[1] + 1
    return [n, k, p, q]


def _y_channels_last(x: torch.Tensor, w: torch.Tensor) -> bool:
    """PyTorch's rule for a convolution's output (cuDNN's on a GPU, oneDNN's and the native one's on
    the CPU): channels_last when the input's or the weight's suggested memory format is, except
    float64 on a GPU, which cuDNN computes in NCHW."""
    if x.dtype == torch.float64 and x.is_cuda:
        return False
    return output_channels_last(x) or output_channels_last(w)


def _check_backend(backend: str) -> None:
    if _ENV_ERRORS:
        raise ValueError("cnnkern::conv2d: " + "; ".join(_ENV_ERRORS))
    if backend not in ("triton", "cuda"):
        raise ValueError(f"cnnkern::conv2d: no {backend!r} kernel (backends: 'triton', 'cuda')")


# The CUDA C++ kernel choice for forward, grad-input and grad-weight: "auto" (the tensor cores
# where they apply, on wgmma on a compute capability 9.0 GPU and on mma.sync elsewhere, else the
# SIMT kernels, with tiles and split-K chosen by the layer's size); the GPU tests pin "direct",
# "igemm" (mma.sync) and "wgmma" through the raw ops. CNNKERN_CUDA_CONV_ALGO pins one for a whole
# process (benchmarks: mma.sync against wgmma on the same GPU); a pinned kernel that cannot run a
# layer is an error, not a fallback. "tune" times every kernel, tile and split setting that can
# run a layer on its first call and keeps the fastest (cnnkern/ops/_tune.py: not under
# deterministic algorithms or during a CUDA graph capture, where "auto" runs).
# A bad value of either variable is an error at the first convolution on a kernel backend (not at
# import: `import cnnkern` never fails on the environment).
CUDA_ALGOS = ("auto", "direct", "igemm", "wgmma", "tune")
CUDA_ALGO = os.environ.get("CNNKERN_CUDA_CONV_ALGO", "auto")
_ENV_ERRORS = []
if CUDA_ALGO not in CUDA_ALGOS:
    _ENV_ERRORS.append(f"CNNKERN_CUDA_CONV_ALGO must be one of {', '.join(CUDA_ALGOS)}, got {CUDA_ALGO!r}")

# Split-K of the forward and grad-input GEMMs of few tiles, both backends: "auto" (the kernels'
# own choice: kernels/conv2d.py gemm_splits, csrc/cuda/conv2d.cu choose_splits) or "off" (never),
# for a whole process through CNNKERN_CONV_SPLIT_K, so that a benchmark can time the same layers
# with and without it. CUDA_SPLIT_K / TRITON_SPLITS: what the launchers take for that choice.
SPLIT_K = os.environ.get("CNNKERN_CONV_SPLIT_K", "auto")
if SPLIT_K not in ("auto", "off"):
    _ENV_ERRORS.append(f"CNNKERN_CONV_SPLIT_K must be 'auto' or 'off', got {SPLIT_K!r}")
CUDA_SPLIT_K = 0 if SPLIT_K == "auto" else 1
TRITON_SPLITS = None if SPLIT_K == "auto" else 1


# ---------------------------------------------------------------------------------------------
# the CUDA C++ launches, with CUDA_ALGO's choice
# ---------------------------------------------------------------------------------------------
def _build_fingerprint() -> dict:
    """What built the CUDA kernels, for CNNKERN_TUNE_CACHE: the digest of the compiled extension
    (its kernels and their launch choices) and the versions of torch and CUDA."""
    ext = getattr(sys.modules.get("cnnkern._C"), "__file__", None)
    return {
        "extension": _tune.file_digest(ext) if ext else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }


TUNER = _tune.Tuner("cnnkern conv2d (cuda)", _tune.cache_from_env(_build_fingerprint))
_TILES = (0, 1, 2)  # 128x128, 64x128, 128x64 (csrc/cuda/conv2d.cu: igemm_tile)
_WGMMA: dict[torch.device, bool] = {}


def _wgmma_available(like: torch.Tensor) -> bool:
    if like.device not in _WGMMA:
        _WGMMA[like.device] = bool(cuda_ops().conv2d_wgmma_available_cuda(like))
    return _WGMMA[like.device]


def _tensor_cores(x: torch.Tensor, tf32: bool, rows: int) -> bool:
    # csrc/cuda/conv2d.cu choose_algo: fp16/bf16, or fp32 as TF32, with row indices within int32
    return (x.dtype in (torch.float16, torch.bfloat16) or (x.dtype == torch.float32 and tf32)) and rows < 2**31


def _gemm_candidates(x: torch.Tensor, tf32: bool, rows: int) -> list[tuple[str, int, int]]:
    """(algo, split_k, tile) of every forward / grad-input configuration that runs the layer: the
    direct kernel, and each tensor-core kernel with each tile, split as the kernels choose and
    unsplit (only unsplit under CNNKERN_CONV_SPLIT_K=off)."""
    out = [("direct", 0, -1)]
    if _tensor_cores(x, tf32, rows):
        algos = ("igemm", "wgmma") if _wgmma_available(x) else ("igemm",)
        splits = (CUDA_SPLIT_K,) if CUDA_SPLIT_K else (0, 1)
        out += [(a, sk, t) for a in algos for t in _TILES for sk in splits]
    return out


def cuda_forward(x, w, bias, y, stride, padding, dilation, groups, relu, stats, tf32, residual) -> torch.Tensor:
    """``conv2d_forward_cuda`` into ``y`` with :data:`CUDA_ALGO`'s kernel choice (the BatchNorm
    statistics when ``stats``, else an empty tensor); padding = [top, left, ...]."""
    args = (x, w, bias, y, stride, padding[:2], dilation, groups, relu)
    if CUDA_ALGO != "tune":
        return cuda_ops().conv2d_forward_cuda(*args, CUDA_ALGO, stats, tf32, residual, CUDA_SPLIT_K)

    def launch(c):
        algo, split_k, tile = c
        return cuda_ops().conv2d_forward_cuda(*args, algo, stats, tf32, residual, split_k, tile)

    key = (
        "fwd",
        *map(_tune.tensor_key, (x, w, bias, y, residual)),
        tuple(stride),
        tuple(padding[:2]),
        tuple(dilation),
        groups,
        relu,
        stats,
        tf32,
    )
    rows = y.shape[0] * y.shape[2] * y.shape[3]
    return TUNER.run(key, lambda: _gemm_candidates(x, tf32, rows), launch, ("auto", CUDA_SPLIT_K, -1), x.device)


def cuda_backward_input(grad, w, gx, stride, padding, dilation, groups, tf32) -> None:
    """``conv2d_backward_input_cuda`` into ``gx`` with :data:`CUDA_ALGO`'s kernel choice."""
    args = (grad, w, gx, stride, padding[:2], dilation, groups)
    if CUDA_ALGO != "tune":
        cuda_ops().conv2d_backward_input_cuda(*args, CUDA_ALGO, tf32, CUDA_SPLIT_K)
        return

    def launch(c):
        algo, split_k, tile = c
        cuda_ops().conv2d_backward_input_cuda(*args, algo, tf32, split_k, tile)

    key = (
        "dgrad",
        *map(_tune.tensor_key, (grad, w, gx)),
        tuple(stride),
        tuple(padding[:2]),
        tuple(dilation),
        groups,
        tf32,
    )
    rows = gx.shape[0] * gx.shape[2] * gx.shape[3]
    TUNER.run(key, lambda: _gemm_candidates(grad, tf32, rows), launch, ("auto", CUDA_SPLIT_K, -1), grad.device)


def _wgrad_candidates(grad, x, gw, stride, padding, dilation, groups, tf32) -> list[tuple[str, int]]:
    """(algo, splits) of every grad-weight configuration that runs the layer: the direct kernel,
    mma.sync, and wgmma where it runs (16-bit inputs on an sm_90 GPU), each with the pixel splits
    it chooses (about two waves of blocks), half and twice as many (one and four waves): as the
    kernels count them, each count once."""
    algos = ["direct"]
    if _tensor_cores(grad, tf32, 0):
        algos.append("igemm")
        if grad.dtype != torch.float32 and _wgmma_available(grad):
            algos.append("wgmma")
    geom = (grad, x, gw, stride, padding[:2], dilation, groups)
    out = []
    for algo in algos:
        chosen = cuda_ops().conv2d_backward_weight_splits_cuda(*geom, algo, tf32)
        counts = {chosen} | {
            cuda_ops().conv2d_backward_weight_splits_cuda(*geom, algo, tf32, n)
            for n in (chosen // 2, 2 * chosen)
            if n > 0
        }
        out += [(algo, n) for n in sorted(counts)]
    return out


def cuda_backward_weight(grad, x, gw, gb, stride, padding, dilation, groups, tf32) -> None:
    """``conv2d_backward_weight_cuda`` into ``gw`` (and ``gb`` when it has elements) with
    :data:`CUDA_ALGO`'s kernel choice (tuned: :func:`_wgrad_candidates`)."""
    args = (grad, x, gw, gb, stride, padding[:2], dilation, groups)
    if CUDA_ALGO != "tune":
        cuda_ops().conv2d_backward_weight_cuda(*args, CUDA_ALGO, tf32)
        return

    def launch(c):
        algo, splits = c
        cuda_ops().conv2d_backward_weight_cuda(*args, algo, tf32, splits)

    key = (
        "wgrad",
        *map(_tune.tensor_key, (grad, x, gw, gb)),
        tuple(stride),
        tuple(padding[:2]),
        tuple(dilation),
        groups,
        tf32,
    )
    TUNER.run(
        key,
        lambda: _wgrad_candidates(grad, x, gw, stride, padding, dilation, groups, tf32),
        launch,
        ("auto", 0),
        grad.device,
    )


# ---------------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------------
@custom_op("cnnkern::conv2d", mutates_args=())
def conv2d(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    relu: bool,
    precision: str,
    backend: str,
) -> torch.Tensor:
    _check_backend(backend)
    cl = _y_channels_last(x, w)
    y = new_output(output_size(x.shape, w.shape, stride, padding, dilation), x, cl)
    if residual is not None:  # the kernels read it through y's strides
        residual = in_layout(residual, cl)
    if backend == "cuda":
        cuda_forward(x, w, bias, y, stride, padding, dilation, groups, relu, False, precision == "tf32", residual)
    else:
        _kernels().conv2d_forward(
            x,
            w,
            bias,
            y,
            stride,
            padding[:2],
            dilation,
            groups,
            relu,
            precision,
            residual=residual,
            splits=TRITON_SPLITS,
        )
    return y


@conv2d.register_fake
def _(x, w, bias, residual, stride, padding, dilation, groups, relu, precision, backend):
    return new_output(output_size(x.shape, w.shape, stride, padding, dilation), x, _y_channels_last(x, w))


# ---------------------------------------------------------------------------------------------
# backward ops
# ---------------------------------------------------------------------------------------------
@custom_op("cnnkern::conv2d_backward_input", mutates_args=())
def conv2d_backward_input(
    grad: torch.Tensor,
    w: torch.Tensor,
    input_size: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    channels_last: bool,
    precision: str,
    backend: str,
) -> torch.Tensor:
    _check_backend(backend)
    gx = new_output(input_size, grad, channels_last)
    if backend == "cuda":
        cuda_backward_input(grad, w, gx, stride, padding, dilation, groups, precision == "tf32")
    else:
        _kernels().conv2d_backward_input(
            grad, w, gx, stride, padding[:2], dilation, groups, precision, splits=TRITON_SPLITS
        )
    return gx


@conv2d_backward_input.register_fake
def _(grad, w, input_size, stride, padding, dilation, groups, channels_last, precision, backend):
    return new_output(input_size, grad, channels_last)


@custom_op("cnnkern::conv2d_backward_weight", mutates_args=())
def conv2d_backward_weight(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight_size: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    bias: bool,
    channels_last: bool,
    precision: str,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_backend(backend)
    gw = new_output(weight_size, grad, channels_last)
    gb = new_output([weight_size[0] if bias else 0], grad, False)
    if backend == "cuda":
        cuda_backward_weight(grad, x, gw, gb, stride, padding, dilation, groups, precision == "tf32")
    else:
        _kernels().conv2d_backward_weight(
            grad, x, gw, gb if bias else None, stride, padding[:2], dilation, groups, precision
        )
    return gw, gb


@conv2d_backward_weight.register_fake
def _(grad, x, weight_size, stride, padding, dilation, groups, bias, channels_last, precision, backend):
    return new_output(weight_size, grad, channels_last), new_output([weight_size[0] if bias else 0], grad, False)


# ---------------------------------------------------------------------------------------------
# autograd
# ---------------------------------------------------------------------------------------------
def _setup_context(ctx, inputs, output):
    x, w, bias, residual, stride, padding, dilation, groups, relu, precision, backend = inputs
    ctx.save_for_backward(x, w, output if relu else None)
    ctx.has_bias = bias is not None
    ctx.args = (stride, padding, dilation, groups)
    ctx.precision, ctx.backend = precision, backend
    ctx.x_cl, ctx.w_cl = output_channels_last(x), output_channels_last(w)


def _backward(ctx, grad):
    x, w, y = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.args
    if y is not None:
        # The fused ReLU's derivative: grad where y > 0. cnnkern::residual_add_backward is exactly
        # that elementwise kernel (PyTorch's threshold_backward), so it is reused here.
        from .residual_add import residual_add_backward

        grad = residual_add_backward(grad, y, ctx.backend)
    g_res = grad if ctx.needs_input_grad[3] else None  # the residual's gradient: the masked one itself
    gx = gw = gb = None
    if ctx.needs_input_grad[0]:
        gx = conv2d_backward_input(
            grad, w, list(x.shape), stride, padding, dilation, groups, ctx.x_cl, ctx.precision, ctx.backend
        )
    if ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[2]):
        gw, gb = conv2d_backward_weight(
            grad,
            x,
            list(w.shape),
            stride,
            padding,
            dilation,
            groups,
            ctx.has_bias,
            ctx.w_cl,
            ctx.precision,
            ctx.backend,
        )
        gw = gw if ctx.needs_input_grad[1] else None
        gb = gb if ctx.has_bias and ctx.needs_input_grad[2] else None
    return gx, gw, gb, g_res, None, None, None, None, None, None, None


register_autograd(conv2d, _backward, _setup_context)


# ---------------------------------------------------------------------------------------------
# double backward: both backward ops are bilinear, so their derivatives are convolutions again
#   gx = dgrad(grad, w):       d/dgrad = conv2d(ggx, w),             d/dw = wgrad(grad, ggx)
#   (gw, gb) = wgrad(grad, x): d/dgrad = conv2d(x, ggw) + ggb,       d/dx = dgrad(grad, ggw)
# (the ops themselves, so a third derivative works the same way)
# ---------------------------------------------------------------------------------------------
def _dgrad_setup(ctx, inputs, output):
    grad, w, input_size, stride, padding, dilation, groups, channels_last, precision, backend = inputs
    ctx.save_for_backward(grad, w)
    ctx.args = (stride, padding, dilation, groups, precision, backend)


def _dgrad_backward(ctx, ggx):
    grad, w = ctx.saved_tensors
    stride, padding, dilation, groups, precision, backend = ctx.args
    d_grad = d_w = None
    if ctx.needs_input_grad[0]:
        d_grad = conv2d(ggx, w, None, None, stride, padding, dilation, groups, False, precision, backend)
    if ctx.needs_input_grad[1]:
        d_w, _ = conv2d_backward_weight(
            grad,
            ggx,
            list(w.shape),
            stride,
            padding,
            dilation,
            groups,
            False,
            output_channels_last(w),
            precision,
            backend,
        )
    return d_grad, d_w, None, None, None, None, None, None, None, None


def _wgrad_setup(ctx, inputs, output):
    grad, x, weight_size, stride, padding, dilation, groups, bias, channels_last, precision, backend = inputs
    ctx.save_for_backward(grad, x)
    ctx.args = (stride, padding, dilation, groups, precision, backend)


def _wgrad_backward(ctx, ggw, ggb):
    grad, x = ctx.saved_tensors
    stride, padding, dilation, groups, precision, backend = ctx.args
    d_grad = d_x = None
    if ctx.needs_input_grad[0]:
        bias = ggb if ggb is not None and ggb.numel() else None
        d_grad = conv2d(x, ggw, bias, None, stride, padding, dilation, groups, False, precision, backend)
    if ctx.needs_input_grad[1]:
        d_x = conv2d_backward_input(
            grad, ggw, list(x.shape), stride, padding, dilation, groups, output_channels_last(x), precision, backend
        )
    return d_grad, d_x, None, None, None, None, None, None, None, None, None


register_autograd(conv2d_backward_input, _dgrad_backward, _dgrad_setup)
register_autograd(conv2d_backward_weight, _wgrad_backward, _wgrad_setup)
