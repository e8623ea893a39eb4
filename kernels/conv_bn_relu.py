"""Training-mode BatchNorm + ReLU around cnnkern's convolution, in Triton.

The forward convolution (kernels/conv2d.py, ``stats=``) writes y = conv(x) and, from its
epilogue, per-tile (count, mean, M2) of every output channel; nothing re-reads y for statistics.
This module holds the rest:

* ``merge_stats``: Chan et al.'s pairwise merge of the tile statistics into the batch mean and
  biased variance (tiny tensors: rows x K).
* ``_apply_kernel``: out = [relu](y * scale[c] + shift[c]), one read of y, one write.
* ``_reduce_kernel``: the two BatchNorm-backward reductions in one pass over (grad, y):
  per channel sum(g') and sum(g' * y), with g' = grad masked by the ReLU (out > 0).
* ``_dy_kernel``: dy = A[c] * g' + B[c] * y + C[c], the BatchNorm input gradient with its
  per-channel coefficients folded on the host.

y, out, grad and dy share one dense layout (NCHW or channels_last): the channel of linear
element e is (e // (P*Q)) % K for NCHW and e % K for NHWC.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import INTERPRET

_BLOCK, _WARPS = (1024, 4) if INTERPRET else (2048, 8)


@triton.jit
def _channel(offs, K, PQ, CHANNELS_LAST: tl.constexpr):
    if CHANNELS_LAST:
        return offs % K
    else:
        return (offs // PQ) % K


@triton.jit
def _apply_kernel(y_ptr, out_ptr, scale_ptr, shift_ptr, numel, K, PQ,
                  CHANNELS_LAST: tl.constexpr, RELU: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    c = _channel(offs, K, PQ, CHANNELS_LAST)
    y = tl.load(y_ptr + offs, mask=mask).to(ACC)
    a = tl.load(scale_ptr + c, mask=mask)
    b = tl.load(shift_ptr + c, mask=mask)
    o = y * a + b
    if RELU:
        o = tl.where(o < 0.0, 0.0, o)
    tl.store(out_ptr + offs, o.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _reduce_kernel(g_ptr, out_ptr, y_ptr, part_ptr, M, K, PQ, rows_per_prog,
                   CHANNELS_LAST: tl.constexpr, RELU: tl.constexpr, ACC: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    # Partial sums of g' and g'*y for a block of channels over a range of rows. NHWC: the tensor is
    # an (M, K) matrix, a program reduces rows [j*rows_per_prog, ...) of BLOCK_K columns. NCHW: it
    # is (N, K, PQ); program (j, kb) reduces image j's PQ pixels of BLOCK_K channels.
    # part[j, 0:2, k] = (sum g', sum g' y).
    j = tl.program_id(0)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    sg = tl.zeros((BLOCK_K,), dtype=ACC)
    sgy = tl.zeros((BLOCK_K,), dtype=ACC)
    if CHANNELS_LAST:
        r0 = j.to(tl.int64) * rows_per_prog  # int64: M = N*P*Q rows may pass 2^31
        r_end = tl.minimum(r0 + rows_per_prog, M)
        for r in range(r0, r_end, BLOCK_R):
            rows = r + tl.arange(0, BLOCK_R)
            m = (rows < r_end)[:, None] & mask_k[None, :]
            offs = rows.to(tl.int64)[:, None] * K + offs_k[None, :]
            g = tl.load(g_ptr + offs, mask=m, other=0.0).to(ACC)
            y = tl.load(y_ptr + offs, mask=m, other=0.0).to(ACC)
            if RELU:
                o = tl.load(out_ptr + offs, mask=m, other=0.0)
                g = tl.where(o <= 0.0, 0.0, g)
            sg += tl.sum(g, axis=0)
            sgy += tl.sum(g * y, axis=0)
    else:
        base = j.to(tl.int64) * K * PQ + offs_k.to(tl.int64) * PQ  # [BLOCK_K] channel planes of image j
        for r in range(0, PQ, BLOCK_R):
            pix = r + tl.arange(0, BLOCK_R)
            m = mask_k[:, None] & (pix < PQ)[None, :]
            offs = base[:, None] + pix[None, :]
            g = tl.load(g_ptr + offs, mask=m, other=0.0).to(ACC)
            y = tl.load(y_ptr + offs, mask=m, other=0.0).to(ACC)
            if RELU:
                o = tl.load(out_ptr + offs, mask=m, other=0.0)
                g = tl.where(o <= 0.0, 0.0, g)
            sg += tl.sum(g, axis=1)
            sgy += tl.sum(g * y, axis=1)
    dst = part_ptr + j.to(tl.int64) * 2 * K + offs_k
    tl.store(dst, sg, mask=mask_k)
    tl.store(dst + K, sgy, mask=mask_k)


@triton.jit
def _dy_kernel(g_ptr, out_ptr, y_ptr, dy_ptr, a_ptr, b_ptr, c_ptr, numel, K, PQ,
               CHANNELS_LAST: tl.constexpr, RELU: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    ch = _channel(offs, K, PQ, CHANNELS_LAST)
    g = tl.load(g_ptr + offs, mask=mask).to(ACC)
    if RELU:
        o = tl.load(out_ptr + offs, mask=mask)
        g = tl.where(o <= 0.0, 0.0, g)
    y = tl.load(y_ptr + offs, mask=mask).to(ACC)
    dy = tl.load(a_ptr + ch, mask=mask) * g + tl.load(b_ptr + ch, mask=mask) * y + tl.load(c_ptr + ch, mask=mask)
    tl.store(dy_ptr + offs, dy.to(dy_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------
def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _layout(t: torch.Tensor) -> bool:
    if t.is_contiguous():
        return False
    if t.is_contiguous(memory_format=torch.channels_last):
        return True
    raise ValueError(f"expected a dense NCHW or channels_last tensor, got strides {tuple(t.stride())}")


def merge_stats(stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(count, mean, biased variance) per channel from tile statistics (rows, 3, K) of
    (count, mean, M2): M2 = sum M2_t + sum n_t (mean_t - mean)^2 (Chan et al.)."""
    cnt, mean_t, m2_t = stats[:, 0], stats[:, 1], stats[:, 2]
    n = cnt.sum(0)
    mean = (cnt * mean_t).sum(0) / n
    m2 = m2_t.sum(0) + (cnt * (mean_t - mean) ** 2).sum(0)
    return n, mean, m2 / n


def bn_apply(y: torch.Tensor, out: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, relu: bool) -> None:
    """out = [relu](y * scale[c] + shift[c]); y and out (N, K, P, Q) in one dense layout; scale and
    shift (K,) in the accumulation dtype (fp32, fp64 for fp64)."""
    numel = y.numel()
    if numel == 0:
        return
    N, K, P, Q = y.shape
    _apply_kernel[(triton.cdiv(numel, _BLOCK),)](y, out, scale, shift, numel, K, P * Q, CHANNELS_LAST=_layout(y),
                                                 RELU=relu, ACC=_acc(scale.dtype), BLOCK=_BLOCK, num_warps=_WARPS)


def bn_backward_coefficients(sg, sgy, mean, invstd, gamma, M: int):
    """BatchNorm backward folded into per-channel coefficients (any backend's kernels use them):
    dy = a * g' + b * y + c, from the reductions sg = sum g' and sgy = sum g' * y over the M
    values of each channel. Also returns sum g' * xhat (the BatchNorm weight's gradient)."""
    sgx = invstd * (sgy - mean * sg)
    scale = gamma * invstd
    return scale, -scale * invstd * sgx / M, scale * (mean * invstd * sgx - sg) / M, sgx


def bn_backward(grad: torch.Tensor, out: torch.Tensor | None, y: torch.Tensor, dy: torch.Tensor,
                mean: torch.Tensor, invstd: torch.Tensor, gamma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchNorm (+ ReLU when ``out`` is given) backward in training mode.

    grad, out, y, dy: (N, K, P, Q) in one dense layout. mean, invstd, gamma: (K,) in the
    accumulation dtype. Writes dy and returns (sum_g', sum_g'*xhat) per channel, which are the
    gradients of the BatchNorm bias and weight.
    """
    N, K, P, Q = y.shape
    M, PQ = N * P * Q, P * Q
    acc_t = mean.dtype
    cl = _layout(y)
    acc = _acc(acc_t)
    block_k = 32 if cl else 16
    block_r = 64 if cl else 256
    if cl:
        rows_per_prog = block_r * (4 if INTERPRET else 16)
        progs = triton.cdiv(max(M, 1), rows_per_prog)
    else:
        rows_per_prog, progs = PQ, N
    part = torch.zeros((progs, 2, K), dtype=acc_t, device=y.device)
    if M:
        _reduce_kernel[(progs, triton.cdiv(K, block_k))](grad, out if out is not None else y, y, part, M, K, PQ,
                                                         rows_per_prog, CHANNELS_LAST=cl, RELU=out is not None,
                                                         ACC=acc, BLOCK_R=block_r, BLOCK_K=block_k, num_warps=4)
    sg, sgy = part.sum(0).unbind(0)  # fixed-order sums: deterministic
    a, b, c, sgx = bn_backward_coefficients(sg, sgy, mean, invstd, gamma, M)
    if M:
        _dy_kernel[(triton.cdiv(dy.numel(), _BLOCK),)](grad, out if out is not None else y, y, dy, a, b, c, dy.numel(),
                                                      K, PQ, CHANNELS_LAST=cl, RELU=out is not None, ACC=acc,
                                                      BLOCK=_BLOCK, num_warps=_WARPS)
    return sg, sgx


__all__ = ["merge_stats", "bn_apply", "bn_backward", "bn_backward_coefficients"]
