"""Residual add in Triton: ``out = [relu](x + A(shortcut))``.

``A`` is the identity when the shapes match and, otherwise, ResNet's option-A shortcut: subsample
the shortcut by ``stride`` in H and W and zero-pad it in channels (shortcut channels land in
``[0, Cs)``, channels ``[Cs, C)`` get zero). ``A`` is applied while reading; no padded or
subsampled copy is ever made.

Kernels:
    _flat_kernel           x, shortcut (or grad, out) and the output share one dense layout:
                           a pure elementwise pass; also used for the ReLU backward.
    _strided_kernel        anything else: each element of the dense (NCHW or NHWC) output is split
                           into (n, c, h, w) and the inputs are read through their strides.
    _shortcut_bwd_kernel   the adjoint of A: the shortcut's gradient, zero where A did not sample.

Launchers take preallocated outputs (dense NCHW or channels_last) and return nothing.
"""

import torch
import triton
import triton.language as tl

from . import INTERPRET, acc_type, cdiv
from . import _launch as _fast

_INT32_MAX = 2**31 - 1
# Memory-bound kernels: large blocks so each thread moves several 16-byte vectors. The
# interpreter ignores num_warps and runs numpy over whole blocks, where larger is also faster.
_FLAT_BLOCK, _FLAT_WARPS = 4096, 8
_STRIDED_BLOCK, _STRIDED_WARPS = 1024, 4


@triton.jit
def _flat_kernel(
    a_ptr,
    b_ptr,
    out_ptr,
    numel,
    RELU_GRAD: tl.constexpr,
    RELU: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
    INT64: tl.constexpr,
):
    # RELU_GRAD=False: out = [relu](a + b)        (a = x, b = shortcut)
    # RELU_GRAD=True:  out = 0 if b <= 0 else a   (a = grad_out, b = out; threshold_backward)
    pid = tl.program_id(0)
    if INT64:
        start = pid.to(tl.int64) * BLOCK
    else:
        start = pid * BLOCK
    offs = start + tl.arange(0, BLOCK)
    mask = offs < numel
    a = tl.load(a_ptr + offs, mask=mask).to(ACC)
    b = tl.load(b_ptr + offs, mask=mask).to(ACC)
    if RELU_GRAD:
        y = tl.where(b <= 0.0, 0.0, a)
    else:
        y = a + b
        if RELU:
            y = tl.where(y < 0.0, 0.0, y)  # `y < 0` keeps NaN, as torch.relu does
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _decompose(e, C, H, W, CHANNELS_LAST: tl.constexpr):
    # Linear index e of a dense 4-D tensor -> (n, c, h, w).
    if CHANNELS_LAST:  # e = ((n*H + h)*W + w)*C + c
        c = e % C
        t = e // C
        w = t % W
        t = t // W
        h = t % H
        n = t // H
    else:  # e = ((n*C + c)*H + h)*W + w
        w = e % W
        t = e // W
        h = t % H
        t = t // H
        c = t % C
        n = t // C
    return n, c, h, w


@triton.jit
def _strided_kernel(
    x_ptr,
    s_ptr,
    out_ptr,
    numel,
    C,
    H,
    W,
    Cs,
    sxn,
    sxc,
    sxh,
    sxw,
    ssn,
    ssc,
    ssh,
    ssw,
    CHANNELS_LAST: tl.constexpr,
    RELU: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # ssh and ssw are the shortcut's H/W strides premultiplied by the option-A stride, so mapped
    # shortcut element (n, c, h, w) sits at n*ssn + c*ssc + h*ssh + w*ssw (valid for c < Cs).
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    n, c, h, w = _decompose(offs, C, H, W, CHANNELS_LAST)
    x = tl.load(x_ptr + (n * sxn + c * sxc + h * sxh + w * sxw), mask=mask).to(ACC)
    s = tl.load(s_ptr + (n * ssn + c * ssc + h * ssh + w * ssw), mask=mask & (c < Cs), other=0.0).to(ACC)
    y = x + s
    if RELU:
        y = tl.where(y < 0.0, 0.0, y)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _shortcut_bwd_kernel(
    g_ptr, gs_ptr, numel, Cs, Hs, Ws, sgn, sgc, sgh, sgw, stride, CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr
):
    # gs[n, c, hs, ws] = g[n, c, hs/stride, ws/stride] where stride divides hs and ws, else 0.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    n, c, hs, ws = _decompose(offs, Cs, Hs, Ws, CHANNELS_LAST)
    hit = (hs % stride == 0) & (ws % stride == 0)
    g = tl.load(g_ptr + (n * sgn + c * sgc + (hs // stride) * sgh + (ws // stride) * sgw), mask=mask & hit, other=0.0)
    tl.store(gs_ptr + offs, g.to(gs_ptr.dtype.element_ty), mask=mask)


def _dense_channels_last(t: torch.Tensor, name: str) -> bool:
    """True for an NHWC-dense tensor, False for NCHW-contiguous; anything else is a caller bug."""
    if t.is_contiguous():
        return False
    if t.is_contiguous(memory_format=torch.channels_last):
        return True
    raise ValueError(f"{name} must be a dense NCHW or channels_last tensor, got strides {tuple(t.stride())}")


def _same_dense(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.shape == b.shape
        and a.stride() == b.stride()
        and (a.is_contiguous() or a.is_contiguous(memory_format=torch.channels_last))
    )


def _launch_flat(a, b, out, relu_grad: bool, relu: bool) -> None:
    numel = out.numel()
    grid = (cdiv(numel, _FLAT_BLOCK),)
    _fast.launch(
        _flat_kernel,
        grid,
        a,
        b,
        out,
        numel,
        RELU_GRAD=relu_grad,
        RELU=relu,
        ACC=acc_type(out.dtype),
        BLOCK=_FLAT_BLOCK,
        INT64=numel + _FLAT_BLOCK > _INT32_MAX,
        num_warps=_FLAT_WARPS,
    )


def residual_add_forward(x: torch.Tensor, shortcut: torch.Tensor, out: torch.Tensor, stride: int, relu: bool) -> None:
    """out[n, c, h, w] = [relu](x[n, c, h, w] + (shortcut[n, c, h*stride, w*stride] if c < Cs else 0)).

    x: (N, C, H, W) any strides; shortcut: (N, Cs, Hs, Ws) any strides with Cs <= C and
    ceil(Hs/stride) == H, ceil(Ws/stride) == W; out: x's shape, dense NCHW or channels_last.
    """
    if out.numel() == 0:
        return
    if stride == 1 and shortcut.shape == x.shape and _same_dense(x, out) and _same_dense(shortcut, out):
        _launch_flat(x, shortcut, out, relu_grad=False, relu=relu)
        return
    cl = _dense_channels_last(out, "out")
    _, C, H, W = x.shape
    ssn, ssc, ssh, ssw = shortcut.stride()
    numel = out.numel()
    grid = (cdiv(numel, _STRIDED_BLOCK),)
    _fast.launch(
        _strided_kernel,
        grid,
        x,
        shortcut,
        out,
        numel,
        C,
        H,
        W,
        shortcut.shape[1],
        *x.stride(),
        ssn,
        ssc,
        ssh * stride,
        ssw * stride,
        CHANNELS_LAST=cl,
        RELU=relu,
        ACC=acc_type(out.dtype),
        BLOCK=_STRIDED_BLOCK,
        num_warps=_STRIDED_WARPS,
    )


def residual_add_backward(grad_out: torch.Tensor, out: torch.Tensor, grad_x: torch.Tensor) -> None:
    """grad_x = grad_out where out > 0, else 0. All three: one shape, one dense layout."""
    if not (_same_dense(grad_out, out) and _same_dense(grad_x, out)):
        raise ValueError(
            "residual_add_backward needs grad_out, out and grad_x in one dense layout, got strides "
            f"{tuple(grad_out.stride())}, {tuple(out.stride())}, {tuple(grad_x.stride())}"
        )
    if out.numel():
        _launch_flat(grad_out, out, grad_x, relu_grad=True, relu=False)


def residual_add_shortcut_backward(grad: torch.Tensor, grad_shortcut: torch.Tensor, stride: int) -> None:
    """The adjoint of the option-A mapping: grad_shortcut (N, Cs, Hs, Ws), dense NCHW or
    channels_last, from grad (N, C, H, W, any strides)."""
    numel = grad_shortcut.numel()
    if numel == 0:
        return
    cl = _dense_channels_last(grad_shortcut, "grad_shortcut")
    _, Cs, Hs, Ws = grad_shortcut.shape
    grid = (cdiv(numel, _STRIDED_BLOCK),)
    _fast.launch(
        _shortcut_bwd_kernel,
        grid,
        grad,
        grad_shortcut,
        numel,
        Cs,
        Hs,
        Ws,
        *grad.stride(),
        stride,
        CHANNELS_LAST=cl,
        BLOCK=_STRIDED_BLOCK,
        num_warps=_STRIDED_WARPS,
    )


__all__ = ["INTERPRET", "residual_add_forward", "residual_add_backward", "residual_add_shortcut_backward"]
