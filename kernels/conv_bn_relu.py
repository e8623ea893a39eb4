"""Training-mode BatchNorm + ReLU around cnnkern's convolution, in Triton.

The forward convolution (kernels/conv2d.py, ``stats=``) writes y = conv(x) and, from its
epilogue, per-tile (count, mean, M2) of every output channel; nothing re-reads y for statistics.
This module holds the rest:

* ``_finalize_kernel``: one launch from the tile statistics to everything per channel: Chan et
  al.'s merge into the batch mean and biased variance, the inverse std, and BatchNorm folded into
  scale = gamma * invstd and shift = beta - mean * scale (tiny tensors: rows x K; one launch
  instead of a dozen small PyTorch ops, whose host time would dominate a 20-100 us layer).
* ``_running_stats_kernel``: the running mean and variance updated in place from the batch
  statistics, and the batch count incremented, one launch (instead of six PyTorch ops) with the
  momentum a runtime argument.
* ``_apply_kernel``: out = [relu](y * scale[c] + shift[c] [+ residual]), one read of y (and of
  the residual), one write.
* ``_reduce_kernel``: the two BatchNorm-backward reductions in one pass over (grad, y):
  per channel sum(g') and sum(g' * y), with g' = grad masked by the ReLU (out > 0).
* ``_coefficients_kernel``: one launch from those partial sums to the per-channel coefficients
  of the input gradient and the gradients of the BatchNorm weight and bias.
* ``_dy_kernel``: dy = A[c] * g' + B[c] * y + C[c], the BatchNorm input gradient.

y, out, grad and dy share one dense layout (NCHW or channels_last): the channel of linear
element e is (e // (P*Q)) % K for NCHW and e % K for NHWC.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import INTERPRET, acc_type, cdiv, check_like
from . import _launch as _fast

_BLOCK, _WARPS = (1024, 4) if INTERPRET else (2048, 8)


@triton.jit
def _channel(offs, K, PQ, CHANNELS_LAST: tl.constexpr):
    if CHANNELS_LAST:
        return offs % K
    else:
        return (offs // PQ) % K


@triton.jit
def _apply_kernel(
    y_ptr,
    r_ptr,
    out_ptr,
    scale_ptr,
    shift_ptr,
    numel,
    K,
    PQ,
    CHANNELS_LAST: tl.constexpr,
    HAS_RES: tl.constexpr,
    RELU: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    c = _channel(offs, K, PQ, CHANNELS_LAST)
    y = tl.load(y_ptr + offs, mask=mask).to(ACC)
    a = tl.load(scale_ptr + c, mask=mask)
    b = tl.load(shift_ptr + c, mask=mask)
    o = y * a + b
    if HAS_RES:
        o = o + tl.load(r_ptr + offs, mask=mask).to(ACC)
    if RELU:
        o = tl.where(o < 0.0, 0.0, o)
    tl.store(out_ptr + offs, o.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _reduce_kernel(
    g_ptr,
    out_ptr,
    y_ptr,
    part_ptr,
    M,
    K,
    PQ,
    rows_per_prog,
    CHANNELS_LAST: tl.constexpr,
    RELU: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
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
def _finalize_kernel(
    st_ptr,
    gamma_ptr,
    beta_ptr,
    mean_ptr,
    invstd_ptr,
    var_ptr,
    scale_ptr,
    shift_ptr,
    R,
    K,
    eps,
    HAS_GAMMA: tl.constexpr,
    HAS_BETA: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # stats: (R, 3, K) rows of (count, mean, M2). Two passes over the rows: the global mean, then
    # M2 = sum(M2_t + n_t (mean_t - mean)^2); a program owns BLOCK_K channels.
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    n = tl.zeros((BLOCK_K,), dtype=ACC)
    s = tl.zeros((BLOCK_K,), dtype=ACC)
    for r in range(0, R, BLOCK_R):
        rows = r + tl.arange(0, BLOCK_R)
        m = (rows < R)[:, None] & mask_k[None, :]
        base = rows.to(tl.int64)[:, None] * 3 * K + offs_k[None, :]
        cnt = tl.load(st_ptr + base, mask=m, other=0.0)
        n += tl.sum(cnt, axis=0)
        s += tl.sum(cnt * tl.load(st_ptr + base + K, mask=m, other=0.0), axis=0)
    n = tl.where(n > 0.0, n, 1.0)  # channels past K (masked out below)
    mean = s / n
    m2 = tl.zeros((BLOCK_K,), dtype=ACC)
    for r in range(0, R, BLOCK_R):
        rows = r + tl.arange(0, BLOCK_R)
        m = (rows < R)[:, None] & mask_k[None, :]
        base = rows.to(tl.int64)[:, None] * 3 * K + offs_k[None, :]
        cnt = tl.load(st_ptr + base, mask=m, other=0.0)
        d = tl.load(st_ptr + base + K, mask=m, other=0.0) - mean[None, :]
        m2 += tl.sum(tl.load(st_ptr + base + 2 * K, mask=m, other=0.0) + cnt * d * d, axis=0)
    var = m2 / n
    if ACC == tl.float64:
        invstd = 1.0 / tl.sqrt(var + eps)  # IEEE in fp64
    else:
        invstd = 1.0 / tl.sqrt_rn(var + eps)  # tl.sqrt may be approximate in fp32
    if HAS_GAMMA:
        scale = tl.load(gamma_ptr + offs_k, mask=mask_k, other=1.0).to(ACC) * invstd
    else:
        scale = invstd
    if HAS_BETA:
        shift = tl.load(beta_ptr + offs_k, mask=mask_k, other=0.0).to(ACC) - mean * scale
    else:
        shift = -mean * scale
    tl.store(mean_ptr + offs_k, mean, mask=mask_k)
    tl.store(invstd_ptr + offs_k, invstd, mask=mask_k)
    tl.store(var_ptr + offs_k, var, mask=mask_k)
    tl.store(scale_ptr + offs_k, scale, mask=mask_k)
    tl.store(shift_ptr + offs_k, shift, mask=mask_k)


@triton.jit
def _running_stats_kernel(
    rmean_ptr,
    rvar_ptr,
    mean_ptr,
    var_ptr,
    tracked_ptr,
    momentum: tl.float64,
    unbias: tl.float64,
    K,
    stride_rm,
    stride_rv,
    HAS_TRACKED: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # running = running + momentum * (batch - running), the variance's batch value unbiased
    # (var * count / (count - 1)); computed in ACC, rounded once to the running statistics' dtype;
    # the batch count (int64), where given, incremented by the first program
    if HAS_TRACKED:
        if tl.program_id(0) == 0:
            tl.store(tracked_ptr, tl.load(tracked_ptr) + 1)
    offs = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = offs < K
    w = tl.full((), momentum, ACC)  # (a Python float under the interpreter: exact in fp64 either way)
    rm = tl.load(rmean_ptr + offs * stride_rm, mask=mask, other=0.0)
    rv = tl.load(rvar_ptr + offs * stride_rv, mask=mask, other=0.0)
    m = tl.load(mean_ptr + offs, mask=mask, other=0.0).to(ACC)
    v = tl.load(var_ptr + offs, mask=mask, other=0.0).to(ACC) * tl.full((), unbias, ACC)
    new_m = rm.to(ACC) + w * (m - rm.to(ACC))
    new_v = rv.to(ACC) + w * (v - rv.to(ACC))
    tl.store(rmean_ptr + offs * stride_rm, new_m.to(rm.dtype), mask=mask)
    tl.store(rvar_ptr + offs * stride_rv, new_v.to(rv.dtype), mask=mask)


@triton.jit(do_not_specialize=["M"])  # M.to() below needs M as a runtime value, also when it is 1
def _coefficients_kernel(
    part_ptr,
    mean_ptr,
    invstd_ptr,
    gamma_ptr,
    a_ptr,
    b_ptr,
    c_ptr,
    sg_ptr,
    sgx_ptr,
    R,
    K,
    M,
    HAS_GAMMA: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # part: (R, 2, K) rows of (sum g', sum g' y). With xhat = (y - mean) * invstd:
    #   sum g' xhat = invstd (sum g' y - mean sum g'),  dy = a g' + b y + c with
    #   a = gamma invstd, b = -a invstd sgx / M, c = a (mean invstd sgx - sg) / M.
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    sg = tl.zeros((BLOCK_K,), dtype=ACC)
    sgy = tl.zeros((BLOCK_K,), dtype=ACC)
    for r in range(0, R, BLOCK_R):
        rows = r + tl.arange(0, BLOCK_R)
        m = (rows < R)[:, None] & mask_k[None, :]
        base = rows.to(tl.int64)[:, None] * 2 * K + offs_k[None, :]
        sg += tl.sum(tl.load(part_ptr + base, mask=m, other=0.0), axis=0)
        sgy += tl.sum(tl.load(part_ptr + base + K, mask=m, other=0.0), axis=0)
    mean = tl.load(mean_ptr + offs_k, mask=mask_k, other=0.0)
    invstd = tl.load(invstd_ptr + offs_k, mask=mask_k, other=0.0)
    sgx = invstd * (sgy - mean * sg)
    a = invstd
    if HAS_GAMMA:
        a = tl.load(gamma_ptr + offs_k, mask=mask_k, other=1.0).to(ACC) * invstd
    inv_m = 1.0 / M.to(ACC)
    tl.store(a_ptr + offs_k, a, mask=mask_k)
    tl.store(b_ptr + offs_k, -a * invstd * sgx * inv_m, mask=mask_k)
    tl.store(c_ptr + offs_k, a * (mean * invstd * sgx - sg) * inv_m, mask=mask_k)
    tl.store(sg_ptr + offs_k, sg.to(sg_ptr.dtype.element_ty), mask=mask_k)
    tl.store(sgx_ptr + offs_k, sgx.to(sgx_ptr.dtype.element_ty), mask=mask_k)


@triton.jit
def _dy_kernel(
    g_ptr,
    out_ptr,
    y_ptr,
    dy_ptr,
    a_ptr,
    b_ptr,
    c_ptr,
    numel,
    K,
    PQ,
    CHANNELS_LAST: tl.constexpr,
    RELU: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
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
def _layout(t: torch.Tensor) -> bool:
    if t.is_contiguous():
        return False
    if t.is_contiguous(memory_format=torch.channels_last):
        return True
    raise ValueError(f"expected a dense NCHW or channels_last tensor, got strides {tuple(t.stride())}")


def bn_finalize(stats: torch.Tensor, gamma: torch.Tensor | None, beta: torch.Tensor | None, eps: float):
    """(mean, invstd, var, scale, shift), each (K,) in the statistics' dtype, from tile statistics
    ``stats`` (rows, 3, K) of (count, mean, M2) (rows with count 0 are ignored): the batch mean,
    1/sqrt(var + eps), the biased variance M2/n with M2 = sum M2_t + sum n_t (mean_t - mean)^2
    (Chan et al.; the global mean first, so no E[y^2] - E[y]^2 cancellation), scale = gamma *
    invstd, shift = beta - mean * scale (gamma 1 and beta 0 when None; any float dtype). One
    launch; fixed summation order, so bitwise reproducible."""
    rows, _, K = stats.shape
    outs = [_fast.alloc(K, stats.dtype, stats.device) for _ in range(5)]
    if K:
        block_k = 64
        _fast.launch(
            _finalize_kernel,
            (cdiv(K, block_k),),
            stats,
            gamma if gamma is not None else stats,
            beta if beta is not None else stats,
            *outs,
            rows,
            K,
            eps,
            HAS_GAMMA=gamma is not None,
            HAS_BETA=beta is not None,
            ACC=acc_type(stats.dtype),
            BLOCK_R=32,
            BLOCK_K=block_k,
            num_warps=4,
        )
    return tuple(outs)


def bn_update_running(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    momentum: float,
    unbias: float,
    num_batches_tracked: torch.Tensor | None = None,
) -> None:
    """The running statistics updated in place, PyTorch's rule: running = (1 - momentum) * running
    + momentum * batch, with the unbiased batch variance var * unbias (count / (count - 1)), and
    ``num_batches_tracked`` (an int64 scalar tensor), where given, incremented by one.
    ``mean`` and ``var`` (K,) contiguous in the accumulation dtype; the running statistics (K,)
    of any float dtype and stride. One launch; ``momentum`` and ``unbias`` are runtime arguments
    (fp64), passed on as given, so a changing momentum (a cumulative average) reuses the
    compiled kernel and a planned call passes its own."""
    K = mean.shape[0]
    if K == 0:
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        return
    sm, sv = running_mean.stride(0), running_var.stride(0)
    if K > 1 and not (sm and sv):
        raise RuntimeError(
            f"bn_update_running: running_{'mean' if not sm else 'var'} has stride 0: more than one of its "
            "elements refers to a single memory location (clone() it first)"
        )
    tracked = num_batches_tracked is not None
    if tracked and (num_batches_tracked.dtype != torch.int64 or num_batches_tracked.numel() != 1):
        raise ValueError(
            "bn_update_running: num_batches_tracked must be an int64 tensor of one element, got "
            f"{num_batches_tracked.dtype} of shape {tuple(num_batches_tracked.shape)}"
        )
    dtypes = (running_mean.dtype, running_var.dtype, mean.dtype)
    _fast.launch(
        _running_stats_kernel,
        (cdiv(K, 128),),
        running_mean,
        running_var,
        mean,
        var,
        num_batches_tracked if tracked else running_mean,
        momentum,
        unbias,
        K,
        sm,
        sv,
        HAS_TRACKED=tracked,
        ACC=tl.float64 if torch.float64 in dtypes else tl.float32,
        BLOCK_K=128,
        num_warps=4,
    )


def bn_apply(
    y: torch.Tensor,
    out: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    relu: bool,
    residual: torch.Tensor | None = None,
) -> None:
    """out = [relu](y * scale[c] + shift[c] + residual); y, out and residual (or None) (N, K, P, Q)
    in one dense layout; scale and shift (K,) in the accumulation dtype (fp32, fp64 for fp64)."""
    numel = y.numel()
    if numel == 0:
        return
    if residual is not None:
        check_like("bn_apply", "residual", residual, y, "y")
    N, K, P, Q = y.shape
    _fast.launch(
        _apply_kernel,
        (cdiv(numel, _BLOCK),),
        y,
        residual if residual is not None else y,
        out,
        scale,
        shift,
        numel,
        K,
        P * Q,
        CHANNELS_LAST=_layout(y),
        HAS_RES=residual is not None,
        RELU=relu,
        ACC=acc_type(scale.dtype),
        BLOCK=_BLOCK,
        num_warps=_WARPS,
    )


def bn_backward_coefficients(
    part: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    gamma: torch.Tensor | None,
    M: int,
    param_dtype: torch.dtype,
):
    """BatchNorm backward folded into per-channel coefficients, dy = a * g' + b * y + c, from the
    partial sums ``part`` (chunks, 2, K) of (sum g', sum g' * y) over the M values of each channel
    (added in chunk order: deterministic). Returns (a, b, c) in the accumulation dtype and
    (sum g', sum g' * xhat), the BatchNorm bias and weight gradients, in ``param_dtype``. One launch."""
    chunks, _, K = part.shape
    a, b, c = (_fast.alloc(K, part.dtype, part.device) for _ in range(3))
    sg, sgx = (_fast.alloc(K, param_dtype, part.device) for _ in range(2))
    if K:
        block_k = 64
        _fast.launch(
            _coefficients_kernel,
            (cdiv(K, block_k),),
            part,
            mean,
            invstd,
            gamma if gamma is not None else mean,
            a,
            b,
            c,
            sg,
            sgx,
            chunks,
            K,
            M,
            HAS_GAMMA=gamma is not None,
            ACC=acc_type(part.dtype),
            BLOCK_R=32,
            BLOCK_K=block_k,
            num_warps=4,
        )
    return a, b, c, sg, sgx


def bn_backward(
    grad: torch.Tensor,
    out: torch.Tensor | None,
    y: torch.Tensor,
    dy: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    gamma: torch.Tensor | None,
    param_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchNorm (+ ReLU when ``out`` is given) backward in training mode.

    grad, out, y, dy: (N, K, P, Q) in one dense layout. mean, invstd: (K,) in the accumulation
    dtype; gamma: (K,) any float dtype, or None (1). Writes dy and returns (sum_g', sum_g'*xhat)
    per channel in ``param_dtype``: the gradients of the BatchNorm bias and weight.
    """
    N, K, P, Q = y.shape
    M, PQ = N * P * Q, P * Q
    acc_t = mean.dtype
    cl = _layout(y)
    acc = acc_type(acc_t)
    block_k = 32 if cl else 16
    block_r = 64 if cl else 256
    if cl:
        rows_per_prog = block_r * (4 if INTERPRET else 16)
        progs = cdiv(max(M, 1), rows_per_prog)
    else:
        rows_per_prog, progs = PQ, N
    part = _fast.alloc((progs, 2, K), acc_t, y.device, zero=not M)  # every entry written when M > 0
    if M:
        _fast.launch(
            _reduce_kernel,
            (progs, cdiv(K, block_k)),
            grad,
            out if out is not None else y,
            y,
            part,
            M,
            K,
            PQ,
            rows_per_prog,
            CHANNELS_LAST=cl,
            RELU=out is not None,
            ACC=acc,
            BLOCK_R=block_r,
            BLOCK_K=block_k,
            num_warps=4,
        )
    a, b, c, sg, sgx = bn_backward_coefficients(part, mean, invstd, gamma, M, param_dtype)
    if M:
        _fast.launch(
            _dy_kernel,
            (cdiv(dy.numel(), _BLOCK),),
            grad,
            out if out is not None else y,
            y,
            dy,
            a,
            b,
            c,
            dy.numel(),
            K,
            PQ,
            CHANNELS_LAST=cl,
            RELU=out is not None,
            ACC=acc,
            BLOCK=_BLOCK,
            num_warps=_WARPS,
        )
    return sg, sgx


__all__ = ["bn_finalize", "bn_update_running", "bn_apply", "bn_backward", "bn_backward_coefficients"]
