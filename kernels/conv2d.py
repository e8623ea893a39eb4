"""2-D convolution in Triton: implicit-GEMM forward, grad-input (dgrad) and grad-weight (wgrad).

Notation (per group g of ``groups``): input x (N, C, H, W), weight w (K, Cg, R, S), output
y (N, K, P, Q), Cg = C / groups, Kg = K / groups. Every tensor is addressed through its four
strides, so NCHW, channels_last (NHWC) and other strided layouts all work; channels_last makes the
channel reduction unit-stride (contiguous vector loads), which is the fast path.

Forward, as a GEMM: rows m = (n, p, q) (M = N*P*Q output pixels), columns k (Kg), reduction
over (r, s, c). The A tile is gathered on the fly from x (implicit im2col: row m, reduction index
(r, s, c) reads x[n, c, p*sh - ph + r*dh, q*sw - pw + s*dw], zero outside the image), B is the
weight. Two kernels:

* ``_fwd_kernel``: the reduction loop walks (r, s) and, inside, channel blocks of BLOCK_C; the
  loop is flattened into one so Triton can pipeline it.
* ``_fwd_1x1_kernel``: an unpadded 1x1 convolution (bottlenecks, Inception reductions, stride-2
  projections) is a plain GEMM over channels; no tap loop, no boundary masks.
* ``_fwd_small_c_kernel``: for small Cg (the first layers, C = 3), a BLOCK_C of 16 would waste
  most of each tensor-core step on padding; this kernel flattens (r, s, c) into one reduction
  index and gathers BLOCK_K of them per step (11x11x3 = 363 -> 12 steps of 32).

dgrad (grad_x = conv_transpose(grad_y, w)) is the same implicit GEMM with rows = input pixels
(n, h, w) and reduction over (r, s, k): grad_y[n, k, p, q] contributes where
h = p*sh - ph + r*dh, i.e. p = (h + ph - r*dh) / sh when that divides exactly. For stride > 1
(dilation 1) the launcher runs it phase by phase (dgrad_phases): the pixels of one stride phase
take only the taps that divide exactly, as a stride-1 GEMM over strided views of w and grad_x;
with dilation the non-dividing taps are masked. No zero-inserted grad_y is ever materialised.

wgrad (grad_w[k, c, r, s] = sum over (n, p, q) of grad_y * x) reduces over all M output pixels:
the M range is split into SPLIT chunks (split-K) written as fp32 partials to a workspace that
the launcher sums in a fixed order, so the result is deterministic (no atomics). The bias
gradient (sum of grad_y over n, p, q) is folded into the same pass.

All launchers take preallocated outputs. Offsets that scale with the batch index are int64, so
a tensor may exceed 2^31 elements as long as one image (C*H*W) and the weight stay below it.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import INTERPRET, acc_type, cdiv, check_like, sm_count
from . import _launch as _fast
from .residual_add import _decompose  # linear index of a dense 4-D tensor -> its 4 indices

_INT32_MAX = 2**31 - 1

# The SM count the interpreter assumes: few, so that the tests' small layers take the split-K paths.
_INTERPRETED_SMS = 4


def _configs(space, k_name="BLOCK_C", interpret=INTERPRET):
    """Autotuning space on a GPU: (BLOCK_M, BLOCK_N, reduction block, warps, stages) tuples.

    Under the interpreter (which ignores warps and stages and pays per program and per loop step,
    not per element) two fixed tiles, of which ``_prune`` keeps exactly one, so
    nothing is ever benchmarked: a small one that gives the tests' small layers several tiles and
    reduction steps, and a wide one for full-width networks (hundreds of channels)."""
    if interpret:
        space = [(32, 32, 32 if k_name == "BLOCK_K" else 16, 4, 1), (32, 128, 128, 4, 1)]
    return [
        triton.Config(
            {"BLOCK_M": bm, "BLOCK_N": bn, k_name: bk, "GROUP_M": 8 if not interpret else 4}, num_warps=w, num_stages=st
        )
        for (bm, bn, bk, w, st) in space
    ]


# Tiles that one Triton release compiles with register spills for one GPU (compute capability
# major * 10 + minor), by kernel: the autotuner does not time them there. `cnnkern inspect` on
# Triton 3.6, the GPU machine's (requirements-device.txt, scripts/dev device-test), found these;
# Triton 3.8 compiles every tile of the spaces below without spills.
# A name with "+STATS" holds the tiles spilled in only with the BatchNorm statistics epilogue.
_SPILLS = {
    (3, 6): {
        "_fwd_kernel": {80: {(128, 64, 64, 4, 4), (128, 256, 64, 8, 3)}},
        "_fwd_kernel+STATS": {90: {(128, 128, 32, 4, 4)}},
        "_fwd_small_c_kernel": {90: {(64, 64, 64, 4, 4)}},
    },
}
_TRITON_VERSION = tuple(int(v) for v in triton.__version__.split(".")[:2])


def _tile(c):
    """(BLOCK_M, BLOCK_N, reduction block, warps, stages) of a triton.Config, as _configs takes it."""
    return (
        c.kwargs["BLOCK_M"],
        c.kwargs["BLOCK_N"],
        c.kwargs.get("BLOCK_C", c.kwargs.get("BLOCK_K")),
        c.num_warps,
        c.num_stages,
    )


def smem_bound(c, elem_bytes: int) -> int:
    """Bytes of shared memory a configuration's operand pipeline takes at most: ``num_stages``
    buffers of the A (BLOCK_M x reduction block) and B (reduction block x BLOCK_N) tiles. Triton
    keeps that many on sm_90's wgmma path and one fewer on mma and FMA paths; the epilogue reuses
    them (what ``cnnkern inspect`` reads back from the compiled kernels)."""
    m, n, k, _, stages = _tile(c)
    return stages * (m * k + k * n) * elem_bytes


def gpu_configs(configs, kernel=None, arch=None, elem_bytes=None, smem_limit=None, **constexprs):
    """The configurations the autotuner times on a GPU for a call with these constexpr arguments:
    all of them, but the 128x256 tiles of a forward with a residual or the BatchNorm statistics,
    whose epilogue then holds a second 128x256 tile and spills, and, for a split forward or
    grad-input, also the 128x128 tiles of 4 warps: their fp32 partial stores take a stack frame
    on sm_80 (a split runs only on layers of a few tiles, where the smaller tiles serve; ``cnnkern
    inspect`` checks what remains); for ``kernel`` (its name) on compute capability ``arch``
    (e.g. 90), the tiles this Triton release spills in (:data:`_SPILLS`); and, given the operands'
    element size and the device's shared memory per block, the tiles whose pipeline cannot fit
    (:func:`smem_bound`: fp32's 128x256 tiles on any GPU, most of fp64's); where none fits, the
    smallest with fewer pipeline stages. Without that, the autotuner would compile them only to
    see the launch fail, and the deterministic mode's shape-based choice could pick one."""
    if constexprs.get("HAS_RES") or constexprs.get("SPLIT") or constexprs.get("STATS"):
        configs = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 128 * 128]
    if constexprs.get("SPLIT"):
        configs = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] < 128 * 128 or c.num_warps > 4]
    spilling = _SPILLS.get(_TRITON_VERSION, {})
    for name in (kernel, f"{kernel}+STATS" if constexprs.get("STATS") else None):
        spills = spilling.get(name, {}).get(arch, ())
        configs = [c for c in configs if _tile(c) not in spills]
    if elem_bytes and smem_limit and configs:
        fits = [c for c in configs if smem_bound(c, elem_bytes) <= smem_limit]
        if not fits:  # the smallest tile, with as many pipeline stages as fit (at least one)
            c = min(configs, key=lambda c: smem_bound(c, elem_bytes))
            stages = max(1, smem_limit // (smem_bound(c, elem_bytes) // c.num_stages))
            fits = [triton.Config(dict(c.kwargs), num_warps=c.num_warps, num_stages=min(stages, c.num_stages))]
        configs = fits
    return configs


@functools.lru_cache(maxsize=None)
def _device_limits(index: int) -> tuple[int, int]:
    """(compute capability as major * 10 + minor, opt-in shared memory per block) of a GPU."""
    props = torch.cuda.get_device_properties(index)
    return props.major * 10 + props.minor, props.shared_memory_per_block_optin


def _prune(configs, named_args, kernel=None, **kwargs):
    # early_config_prune: gpu_configs on a GPU; under the interpreter one fixed tile, the wide one
    # for layers with >= 64 channels on both sides. The first tensor argument is the GEMM's A
    # operand (the input, or the output gradient), whose dtype the B operand shares.
    if INTERPRET:
        wide = min(named_args["Cg"], named_args["Kg"]) >= 64
        return [configs[1] if wide else configs[0]]
    a = next(v for v in named_args.values() if isinstance(v, torch.Tensor))
    arch, smem = _device_limits(a.device.index if a.device.index is not None else torch.cuda.current_device())
    return gpu_configs(configs, kernel=kernel, arch=arch, elem_bytes=a.element_size(), smem_limit=smem, **kwargs)


def _untimed(kernel_call, quantiles=None):
    # Under the interpreter _prune leaves one configuration, which Triton >= 3.7 runs without
    # timing it; Triton 3.6 (the GPU machine's) times it even so, through a GPU driver that the
    # interpreter does not have. With one candidate there is nothing to time.
    return [0.0] * len(quantiles) if quantiles else 0.0


def _tune(kernel: str) -> dict:
    """The autotuner's arguments of the convolution kernel named ``kernel``."""
    return {
        "prune_configs_by": {"early_config_prune": functools.partial(_prune, kernel=kernel)},
        **({"do_bench": _untimed} if INTERPRET else {}),
    }


# The spaces below keep only tiles that compile without spills for both sm_80 and sm_90 with
# bf16/fp16 NHWC inputs and use wgmma on sm_90 (checked by `cnnkern inspect` and
# tests/test_inspect.py). 128x128 and 128x64 tiles with 3-4 stages are the tensor-core sweet spot;
# the 64-wide ones serve small-K and small-M layers (late ResNet stages, batch 1).
_FWD_SPACE = [
    (128, 128, 64, 8, 3),
    (128, 128, 32, 4, 4),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (64, 64, 64, 4, 4),
    (128, 256, 64, 8, 3),
]
_GEMM_SPACE = [
    (128, 128, 64, 8, 3),
    (128, 128, 64, 8, 4),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 8, 4),
    (64, 64, 64, 4, 4),
    (128, 256, 64, 8, 3),
]
_SMALL_C_SPACE = [(64, 64, 64, 4, 4), (64, 64, 32, 4, 4), (128, 64, 32, 8, 3)]
_DGRAD_SPACE = [(128, 128, 64, 8, 3), (128, 128, 32, 4, 4), (64, 128, 64, 4, 4), (64, 64, 32, 4, 4)]
_FWD_CONFIGS = _configs(_FWD_SPACE)
_GEMM_CONFIGS = _configs(_GEMM_SPACE)
_SMALL_C_CONFIGS = _configs(_SMALL_C_SPACE, k_name="BLOCK_K")
_DGRAD_CONFIGS = _configs(_DGRAD_SPACE)
_CONV_KEY = ["M", "Kg", "Cg", "R", "S", "IS_CL_X"]
_FWD_KEY = _CONV_KEY + ["HAS_RES", "STATS", "splits"]  # a residual or the statistics prune the configurations
_DGRAD_KEY = _CONV_KEY + ["splits"]


@triton.jit
def _tile_ids(M, Ncols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # Grouped ordering: GROUP_M row tiles share each column tile while it is hot in L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(Ncols, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows
    pid_n = (pid % per_group) // rows
    return pid_m, pid_n


@triton.jit
def _mma(a, b, acc, ACC: tl.constexpr, PREC: tl.constexpr):
    # fp32 inputs: TF32 or IEEE as PyTorch's conv would (PREC); 16-bit: fp32 accumulation;
    # fp64: fp64 accumulation.
    if a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision=PREC)
    else:
        return tl.dot(a, b, acc, out_dtype=ACC)


@triton.jit
def _epilogue(
    acc,
    b_ptr,
    y_ptr,
    r_ptr,
    st_ptr,
    pid_m,
    K,
    n,
    p,
    q,
    offs_k,
    mask_m,
    mask_k,
    syn,
    syk,
    syp,
    syq,
    HAS_BIAS: tl.constexpr,
    HAS_RES: tl.constexpr,
    RELU: tl.constexpr,
    STATS: tl.constexpr,
):
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_k, mask=mask_k, other=0.0).to(acc.dtype)
        acc = acc + bias[None, :]
    if STATS:
        # BatchNorm statistics of this tile, per output channel: count, mean and M2 (sum of squared
        # deviations from the tile's own mean). The host merges the tiles with Chan et al.'s
        # pairwise formula, which, unlike E[y^2] - E[y]^2, loses nothing to cancellation when the
        # batch is large or the mean is far from zero. st[pid_m, 0:3, k] = (count, mean, M2).
        rows = tl.where(mask_m, 1.0, 0.0).to(acc.dtype)
        cnt = tl.sum(rows, axis=0)
        mean = tl.sum(acc * rows[:, None], axis=0) / cnt
        dev = (acc - mean[None, :]) * rows[:, None]
        m2 = tl.sum(dev * dev, axis=0)
        st = st_ptr + pid_m.to(tl.int64) * 3 * K + offs_k
        tl.store(st, tl.zeros_like(mean) + cnt, mask=mask_k)
        tl.store(st + K, mean, mask=mask_k)
        tl.store(st + 2 * K, m2, mask=mask_k)
    row = n.to(tl.int64) * syn + p * syp + q * syq
    offs = row[:, None] + offs_k.to(tl.int64)[None, :] * syk
    mask = mask_m[:, None] & mask_k[None, :]
    if HAS_RES:  # the residual has y's strides (the launcher's contract); added before the activation
        acc = acc + tl.load(r_ptr + offs, mask=mask, other=0.0).to(acc.dtype)
    if RELU:
        acc = tl.where(acc < 0.0, 0.0, acc)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _out_tile(M, P, Q, Kg, splits, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # The forward kernels' output tile: rows m = output pixels (n, p, q), columns = output
    # channels of group g, split j of the reduction (program axis 1 = g * splits + j); k_glob
    # indexes the full K.
    g = tl.program_id(1) // splits
    j = tl.program_id(1) % splits
    pid_m, pid_n = _tile_ids(M, Kg, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n = offs_m // (P * Q)
    pq = offs_m % (P * Q)
    return g, j, pid_m, offs_m, n, pq // Q, pq % Q, offs_m < M, offs_n < Kg, g * Kg + offs_n


@triton.jit
def _fwd_end(
    acc,
    b_ptr,
    y_ptr,
    r_ptr,
    st_ptr,
    ws_ptr,
    j,
    splits,
    pid_m,
    M,
    Kg,
    offs_m,
    n,
    p,
    q,
    k_glob,
    mask_m,
    mask_n,
    syn,
    syk,
    syp,
    syq,
    HAS_BIAS: tl.constexpr,
    HAS_RES: tl.constexpr,
    RELU: tl.constexpr,
    STATS: tl.constexpr,
    SPLIT: tl.constexpr,
):
    # the forward kernels' last step: the split's partial sums, or the epilogue
    K = Kg * (tl.num_programs(1) // splits)
    if SPLIT:
        _store_partial(acc, ws_ptr, j, M, K, offs_m, k_glob, mask_m, mask_n)
    else:
        _epilogue(
            acc,
            b_ptr,
            y_ptr,
            r_ptr,
            st_ptr,
            pid_m,
            K,
            n,
            p,
            q,
            k_glob,
            mask_m,
            mask_n,
            syn,
            syk,
            syp,
            syq,
            HAS_BIAS,
            HAS_RES,
            RELU,
            STATS,
        )


@triton.jit
def _split_range(steps, j, splits):
    # split j of a reduction of `steps` loop steps: [first, last)
    per = tl.cdiv(steps, splits)
    first = j * per
    return first, tl.minimum(first + per, steps)


@triton.jit
def _store_partial(acc, ws_ptr, j, M, K, offs_m, k_glob, mask_m, mask_k):
    # split-K: split j's raw accumulators at ws[j, m, k] (an (splits, M, K) workspace of the
    # accumulator dtype); _fwd_split_sum_kernel adds the splits and applies the epilogue
    offs = (j * M + offs_m).to(tl.int64)[:, None] * K + k_glob[None, :]
    tl.store(ws_ptr + offs, acc, mask=mask_m[:, None] & mask_k[None, :])


@triton.autotune(configs=_FWD_CONFIGS, key=_FWD_KEY, **_tune("_fwd_kernel"))
@triton.jit
def _fwd_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    r_ptr,
    st_ptr,
    ws_ptr,
    M,
    H,
    W,
    P,
    Q,
    Cg,
    Kg,
    splits,
    sxn,
    sxc,
    sxh,
    sxw,
    swk,
    swc,
    swr,
    sws,
    syn,
    syk,
    syp,
    syq,
    sh,
    sw,
    ph,
    pw,
    dh,
    dw,
    R: tl.constexpr,
    S: tl.constexpr,
    IS_CL_X: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RES: tl.constexpr,
    RELU: tl.constexpr,
    STATS: tl.constexpr,
    SPLIT: tl.constexpr,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    g, j, pid_m, offs_m, n, p, q, mask_m, mask_n, k_glob = _out_tile(M, P, Q, Kg, splits, BLOCK_M, BLOCK_N, GROUP_M)
    # the receptive field of row (n, p, q) starts at (ih0, iw0)
    ih0 = p * sh - ph
    iw0 = q * sw - pw
    x_row = x_ptr + n.to(tl.int64) * sxn + (g * Cg).to(tl.int64) * sxc  # [BLOCK_M] pointers
    w_col = w_ptr + k_glob.to(tl.int64) * swk  # [BLOCK_N] pointers

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    c_blocks = tl.cdiv(Cg, BLOCK_C)
    first, last = _split_range(R * S * c_blocks, j, splits)
    for it in range(first, last):
        rs = it // c_blocks
        c0 = (it % c_blocks) * BLOCK_C
        r = rs // S
        s = rs % S
        ih = ih0 + r * dh
        iw = iw0 + s * dw
        inside = mask_m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < Cg
        a = tl.load(
            x_row[:, None] + (ih * sxh + iw * sxw)[:, None] + offs_c[None, :] * sxc,
            mask=inside[:, None] & mask_c[None, :],
            other=0.0,
        )
        b = tl.load(
            w_col[None, :] + (offs_c * swc)[:, None] + (r * swr + s * sws),
            mask=mask_c[:, None] & mask_n[None, :],
            other=0.0,
        )
        acc = _mma(a, b, acc, ACC, PREC)
    _fwd_end(
        acc,
        b_ptr,
        y_ptr,
        r_ptr,
        st_ptr,
        ws_ptr,
        j,
        splits,
        pid_m,
        M,
        Kg,
        offs_m,
        n,
        p,
        q,
        k_glob,
        mask_m,
        mask_n,
        syn,
        syk,
        syp,
        syq,
        HAS_BIAS,
        HAS_RES,
        RELU,
        STATS,
        SPLIT,
    )


@triton.autotune(configs=_GEMM_CONFIGS, key=_FWD_KEY, **_tune("_fwd_1x1_kernel"))
@triton.jit
def _fwd_1x1_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    r_ptr,
    st_ptr,
    ws_ptr,
    M,
    H,
    W,
    P,
    Q,
    Cg,
    Kg,
    splits,
    sxn,
    sxc,
    sxh,
    sxw,
    swk,
    swc,
    swr,
    sws,
    syn,
    syk,
    syp,
    syq,
    sh,
    sw,
    ph,
    pw,
    dh,
    dw,
    R: tl.constexpr,
    S: tl.constexpr,
    IS_CL_X: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RES: tl.constexpr,
    RELU: tl.constexpr,
    STATS: tl.constexpr,
    SPLIT: tl.constexpr,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # A 1x1 convolution without padding is a plain GEMM: row m = (n, p, q) reads the C channels
    # of input pixel (p*sh, q*sw), always inside the image. The launcher folds the stride into
    # sxh/sxw (sh = sw = 1 here), so the A and B tiles just advance by BLOCK_C channels per step.
    g, j, pid_m, offs_m, n, p, q, mask_m, mask_n, k_glob = _out_tile(M, P, Q, Kg, splits, BLOCK_M, BLOCK_N, GROUP_M)
    first, last = _split_range(tl.cdiv(Cg, BLOCK_C), j, splits)
    offs_c = tl.arange(0, BLOCK_C)
    a_ptrs = (
        x_ptr
        + (n.to(tl.int64) * sxn + p * sxh + q * sxw + (g * Cg).to(tl.int64) * sxc)[:, None]
        + ((first * BLOCK_C + offs_c) * sxc)[None, :]
    )
    b_ptrs = w_ptr + (k_glob.to(tl.int64) * swk)[None, :] + ((first * BLOCK_C + offs_c) * swc)[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for c0 in range(first * BLOCK_C, tl.minimum(last * BLOCK_C, Cg), BLOCK_C):
        mask_c = (c0 + offs_c) < Cg
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_c[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=mask_c[:, None] & mask_n[None, :], other=0.0)
        acc = _mma(a, b, acc, ACC, PREC)
        a_ptrs += BLOCK_C * sxc
        b_ptrs += BLOCK_C * swc
    _fwd_end(
        acc,
        b_ptr,
        y_ptr,
        r_ptr,
        st_ptr,
        ws_ptr,
        j,
        splits,
        pid_m,
        M,
        Kg,
        offs_m,
        n,
        p,
        q,
        k_glob,
        mask_m,
        mask_n,
        syn,
        syk,
        syp,
        syq,
        HAS_BIAS,
        HAS_RES,
        RELU,
        STATS,
        SPLIT,
    )


@triton.autotune(configs=_SMALL_C_CONFIGS, key=_FWD_KEY, **_tune("_fwd_small_c_kernel"))
@triton.jit
def _fwd_small_c_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    r_ptr,
    st_ptr,
    ws_ptr,
    M,
    H,
    W,
    P,
    Q,
    Cg,
    Kg,
    splits,
    sxn,
    sxc,
    sxh,
    sxw,
    swk,
    swc,
    swr,
    sws,
    syn,
    syk,
    syp,
    syq,
    sh,
    sw,
    ph,
    pw,
    dh,
    dw,
    R: tl.constexpr,
    S: tl.constexpr,
    IS_CL_X: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RES: tl.constexpr,
    RELU: tl.constexpr,
    STATS: tl.constexpr,
    SPLIT: tl.constexpr,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    g, j, pid_m, offs_m, n, p, q, mask_m, mask_n, k_glob = _out_tile(M, P, Q, Kg, splits, BLOCK_M, BLOCK_N, GROUP_M)
    ih0 = p * sh - ph
    iw0 = q * sw - pw
    x_row = x_ptr + n.to(tl.int64) * sxn + (g * Cg).to(tl.int64) * sxc
    w_col = w_ptr + k_glob.to(tl.int64) * swk

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    RSC = R * S * Cg
    first, last = _split_range(tl.cdiv(RSC, BLOCK_K), j, splits)
    for k0 in range(first * BLOCK_K, tl.minimum(last * BLOCK_K, RSC), BLOCK_K):
        # reduction index t = (r*S + s)*Cg + c, channel fastest
        t = k0 + tl.arange(0, BLOCK_K)
        mask_t = t < RSC
        c = t % Cg
        rs = t // Cg
        r = rs // S
        s = rs % S
        ih = ih0[:, None] + (r * dh)[None, :]
        iw = iw0[:, None] + (s * dw)[None, :]
        inside = mask_m[:, None] & mask_t[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        a = tl.load(x_row[:, None] + ih * sxh + iw * sxw + (c * sxc)[None, :], mask=inside, other=0.0)
        b = tl.load(
            w_col[None, :] + (c * swc + r * swr + s * sws)[:, None], mask=mask_t[:, None] & mask_n[None, :], other=0.0
        )
        acc = _mma(a, b, acc, ACC, PREC)
    _fwd_end(
        acc,
        b_ptr,
        y_ptr,
        r_ptr,
        st_ptr,
        ws_ptr,
        j,
        splits,
        pid_m,
        M,
        Kg,
        offs_m,
        n,
        p,
        q,
        k_glob,
        mask_m,
        mask_n,
        syn,
        syk,
        syp,
        syq,
        HAS_BIAS,
        HAS_RES,
        RELU,
        STATS,
        SPLIT,
    )


@triton.autotune(configs=_DGRAD_CONFIGS, key=_DGRAD_KEY, **_tune("_dgrad_kernel"))
@triton.jit
def _dgrad_kernel(
    gy_ptr,
    w_ptr,
    gx_ptr,
    ws_ptr,
    M,
    H,
    W,
    P,
    Q,
    Cg,
    Kg,
    splits,
    sgn,
    sgk,
    sgp,
    sgq,
    swk,
    swc,
    swr,
    sws,
    sxn,
    sxc,
    sxh,
    sxw,
    sh,
    sw,
    ph,
    pw,
    dh,
    dw,
    R: tl.constexpr,
    S: tl.constexpr,
    IS_CL_X: tl.constexpr,
    SPLIT: tl.constexpr,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # GEMM: rows m = input pixels (n, h, w) (M = N*H*W), columns c (Cg), reduction over (r, s, k)
    # in blocks of BLOCK_C output channels (the name is shared with the forward's configs); split
    # j of `splits` (program axis 1 = g * splits + j) takes its share of the reduction and stores
    # raw partials (SPLIT), which _fwd_split_sum_kernel adds into gx.
    g = tl.program_id(1) // splits
    j = tl.program_id(1) % splits
    pid_m, pid_n = _tile_ids(M, Cg, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_c = offs_c < Cg
    n = offs_m // (H * W)
    hw = offs_m % (H * W)
    h = hw // W
    w = hw % W
    gy_row = gy_ptr + n.to(tl.int64) * sgn + (g * Kg).to(tl.int64) * sgk
    c_glob = g * Cg + offs_c
    w_col = w_ptr + (g * Kg).to(tl.int64) * swk + offs_c * swc

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    k_blocks = tl.cdiv(Kg, BLOCK_C)
    if SPLIT:
        first, last = _split_range(R * S * k_blocks, j, splits)
    else:  # (the plain bounds: with _split_range's the sm_80 build takes a stack frame)
        first, last = 0, R * S * k_blocks
    for it in range(first, last):
        rs = it // k_blocks
        k0 = (it % k_blocks) * BLOCK_C
        r = rs // S
        s = rs % S
        # tap (r, s) of output pixel (p, q) reads input (h, w) iff h = p*sh - ph + r*dh
        hp = h + ph - r * dh
        wq = w + pw - s * dw
        p = hp // sh
        q = wq // sw
        hit = mask_m & (hp >= 0) & (wq >= 0) & (hp % sh == 0) & (wq % sw == 0) & (p < P) & (q < Q)
        offs_k = k0 + tl.arange(0, BLOCK_C)
        mask_k = offs_k < Kg
        a = tl.load(
            gy_row[:, None] + (p * sgp + q * sgq)[:, None] + offs_k[None, :] * sgk,
            mask=hit[:, None] & mask_k[None, :],
            other=0.0,
        )
        b = tl.load(
            w_col[None, :] + (offs_k.to(tl.int64) * swk)[:, None] + (r * swr + s * sws),
            mask=mask_k[:, None] & mask_c[None, :],
            other=0.0,
        )
        acc = _mma(a, b, acc, ACC, PREC)
    if SPLIT:
        _store_partial(acc, ws_ptr, j, M, Cg * (tl.num_programs(1) // splits), offs_m, c_glob, mask_m, mask_c)
    else:
        row = n.to(tl.int64) * sxn + h * sxh + w * sxw
        ptrs = gx_ptr + row[:, None] + c_glob.to(tl.int64)[None, :] * sxc
        tl.store(ptrs, acc.to(gx_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_c[None, :])


@triton.jit
def _wgrad_kernel(
    gy_ptr,
    x_ptr,
    ws_ptr,
    wsb_ptr,
    M,
    H,
    W,
    P,
    Q,
    Cg,
    Kg,
    K,
    m_per_split,
    split_stride,
    sgn,
    sgk,
    sgp,
    sgq,
    sxn,
    sxc,
    sxh,
    sxw,
    sh,
    sw,
    ph,
    pw,
    dh,
    dw,
    R: tl.constexpr,
    S: tl.constexpr,
    WITH_BIAS: tl.constexpr,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    # Program (tile of Kg x Cg, tap (r, s) of group g, split j) reduces output pixels
    # [j*m_per_split, (j+1)*m_per_split): acc[k, c] += sum_m gy[m, k] * x_at_tap[m, c].
    # Workspace: ws[j, g*Kg + k, c, r, s] (fp32/fp64, contiguous per split); wsb[j, g*Kg + k] for
    # the bias; split j starts split_stride elements after split j-1 in both.
    pid_kc = tl.program_id(0)
    grs = tl.program_id(1)
    j = tl.program_id(2)
    num_c = tl.cdiv(Cg, BLOCK_C)
    pid_k = pid_kc // num_c
    pid_c = pid_kc % num_c
    g = grs // (R * S)
    rs = grs % (R * S)
    r = rs // S
    s = rs % S
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_k = offs_k < Kg
    mask_c = offs_c < Cg
    # one program per (k tile, split) also sums grad_y for the bias: the one at tap 0, c tile 0
    do_bias = (rs == 0) & (pid_c == 0)

    acc = tl.zeros((BLOCK_K, BLOCK_C), dtype=ACC)
    bacc = tl.zeros((BLOCK_K,), dtype=ACC)
    m_start = j * m_per_split
    m_end = tl.minimum(m_start + m_per_split, M)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < m_end
        n = offs_m // (P * Q)
        pq = offs_m % (P * Q)
        p = pq // Q
        q = pq % Q
        ih = p * sh - ph + r * dh
        iw = q * sw - pw + s * dw
        inside = mask_m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        gy = tl.load(
            gy_ptr
            + (n.to(tl.int64) * sgn + p * sgp + q * sgq)[:, None]
            + ((g * Kg + offs_k).to(tl.int64) * sgk)[None, :],
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )  # [BLOCK_M, BLOCK_K]
        xv = tl.load(
            x_ptr
            + (n.to(tl.int64) * sxn + ih * sxh + iw * sxw)[:, None]
            + ((g * Cg + offs_c).to(tl.int64) * sxc)[None, :],
            mask=inside[:, None] & mask_c[None, :],
            other=0.0,
        )  # [BLOCK_M, BLOCK_C]
        acc = _mma(tl.trans(gy), xv, acc, ACC, PREC)
        if WITH_BIAS:
            if do_bias:
                bacc += tl.sum(gy.to(ACC), axis=0)
    k_glob = (g * Kg + offs_k).to(tl.int64)
    base = j.to(tl.int64) * split_stride
    ptrs = ws_ptr + base + (k_glob * (Cg * R * S))[:, None] + (offs_c * (R * S) + rs)[None, :]
    tl.store(ptrs, acc, mask=mask_k[:, None] & mask_c[None, :])
    if WITH_BIAS:
        tl.store(wsb_ptr + base + k_glob, bacc, mask=mask_k & do_bias)


@triton.jit
def _split_sum_kernel(
    ws_ptr,
    gw_ptr,
    gb_ptr,
    splits,
    split_stride,
    NW,
    K,
    Cg,
    R,
    S,
    s0,
    s1,
    s2,
    s3,
    WITH_BIAS: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # gw[k, c, r, s] (any strides) = sum_j ws[j, e] for e = ((k*Cg + c)*R + r)*S + s < NW, and
    # gb[k] = sum_j ws[j, NW + k]; the splits are added in order j = 0, 1, ...: deterministic.
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    total = NW + K if WITH_BIAS else NW
    mask = e < total
    acc = tl.zeros((BLOCK,), dtype=ACC)
    ptrs = ws_ptr + e
    for _ in range(0, splits):
        acc += tl.load(ptrs, mask=mask, other=0.0)
        ptrs += split_stride  # 64-bit pointer arithmetic
    in_w = e < NW
    k_, c_, r_, s_ = _decompose(e, Cg, R, S, False)  # gw's logical (K, Cg, R, S) order, dense
    tl.store(gw_ptr + k_ * s0 + c_ * s1 + r_ * s2 + s_ * s3, acc.to(gw_ptr.dtype.element_ty), mask=mask & in_w)
    if WITH_BIAS:
        tl.store(gb_ptr + (e - NW), acc.to(gb_ptr.dtype.element_ty), mask=mask & (e >= NW))


@triton.jit
def _fwd_split_sum_kernel(
    ws_ptr,
    b_ptr,
    y_ptr,
    r_ptr,
    st_ptr,
    M,
    K,
    P,
    Q,
    splits,
    syn,
    syk,
    syp,
    syq,
    HAS_BIAS: tl.constexpr,
    HAS_RES: tl.constexpr,
    RELU: tl.constexpr,
    STATS: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # The end of a split-K forward, one BLOCK_M x BLOCK_N tile of the (M, K) output per program:
    # the splits' partials ws[j, m, k] added in order j = 0, 1, ... (deterministic), then the
    # unsplit kernels' own epilogue (bias; the BatchNorm statistics of the tile, row block pid_m;
    # residual; ReLU; one rounding).
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_k = offs_k < K
    ptrs = ws_ptr + offs_m.to(tl.int64)[:, None] * K + offs_k[None, :]
    mask = mask_m[:, None] & mask_k[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for _ in range(0, splits):
        acc += tl.load(ptrs, mask=mask, other=0.0)
        ptrs += M * K  # 64-bit pointer arithmetic
    n = offs_m // (P * Q)
    pq = offs_m % (P * Q)
    _epilogue(
        acc,
        b_ptr,
        y_ptr,
        r_ptr,
        st_ptr,
        pid_m,
        K,
        n,
        pq // Q,
        pq % Q,
        offs_k,
        mask_m,
        mask_k,
        syn,
        syk,
        syp,
        syq,
        HAS_BIAS,
        HAS_RES,
        RELU,
        STATS,
    )


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------
# the argument holding each autotuned kernel's GEMM width (output columns per group)
_GEMM_N = {_fwd_kernel: "Kg", _fwd_1x1_kernel: "Kg", _fwd_small_c_kernel: "Kg", _dgrad_kernel: "Cg"}
_TUNED: dict = {}  # (kernel, autotune key) -> the launch arguments of the triton.Config its autotuner chose


def deterministic_config(configs, M: int, N: int, sms: int):
    """The tile used under ``torch.use_deterministic_algorithms(True)``, chosen from the shape
    alone (the autotuner's timing-based pick may differ between processes, and a different tile
    sums the reduction in a different order): the largest BLOCK_M x BLOCK_N tile that still gives
    every SM a tile (``sms``, the device's SM count), else the smallest tile; ties go to the
    earlier configuration in the list. The same shape on the same GPU model always gets the same
    tile, so results are bitwise equal across processes too."""

    def area(c):
        return c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"]

    def tiles(c):
        return cdiv(M, c.kwargs["BLOCK_M"]) * cdiv(N, c.kwargs["BLOCK_N"])

    filling = [c for c in configs if tiles(c) >= sms]
    if filling:
        best = max(area(c) for c in filling)
        return next(c for c in filling if area(c) == best)
    least = min(area(c) for c in configs)
    return next(c for c in configs if area(c) == least)


def _launch(kernel, grid, key, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)`` for an autotuned kernel. The configuration is chosen once
    per ``key`` (the autotune key's values and the tensor arguments' dtypes, as Triton's own cache
    keys it): by the autotuner, or under ``torch.use_deterministic_algorithms(True)`` by
    :func:`deterministic_config` for the GEMM's M and N (the kernel's ``M`` and its per-group
    output width, :data:`_GEMM_N`), without timing. Then the compiled kernel is launched
    directly for every later call of the same signature (kernels/_launch.py): a warm call never
    reaches the autotuner or Triton's argument binding."""
    det = torch.are_deterministic_algorithms_enabled()
    fast = _fast.direct_ok()
    if fast:
        sig = (kernel, det, _fast.signature(args, kwargs))
        if _fast.launch_planned(sig, args):
            return
    cfg = _TUNED.get((kernel, key, det))
    if cfg is None:
        if det:
            named = dict(zip(kernel.fn.arg_names, args))
            configs = kernel.configs
            prune = getattr(kernel, "early_config_prune", None)
            if prune is not None:
                configs = prune(configs, named, **kwargs)
            sms = sm_count(args[0].device, _INTERPRETED_SMS)
            cfg = deterministic_config(configs, named["M"], named[_GEMM_N[kernel]], sms)
            cfg = _TUNED[(kernel, key, det)] = cfg.all_kwargs()
        else:
            _fast.record_miss(again=True)
            kernel[grid](*args, **kwargs)  # times the configurations; the next call makes the plan
            _TUNED[(kernel, key, det)] = kernel.best_config.all_kwargs()
            return
    if fast:
        _fast.run_and_keep(sig, kernel.fn, grid, args, {**kwargs, **cfg})
    else:
        _fast.record_miss(again=True)
        kernel.fn[grid](*args, **kwargs, **cfg)


def _check_int32_extent(name: str, t: torch.Tensor) -> None:
    # Offsets within one image (or the weight) are int32; only the batch stride is scaled in int64.
    if t.numel() <= _INT32_MAX and (t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)):
        return  # dense: one item spans numel / N elements (the quick test, on every call's host path)
    per_item = sum((s - 1) * abs(st) for s, st in zip(t.shape[1:], t.stride()[1:])) + 1
    if per_item > _INT32_MAX:
        raise ValueError(
            f"conv2d: one item of {name} spans {per_item} elements, more than 2^31-1; "
            "the Triton conv kernels index within an item in int32"
        )


def _is_cl(t: torch.Tensor) -> bool:
    return t.dim() == 4 and t.stride(1) == 1 and t.shape[1] > 1


def stats_rows(M: int) -> int:
    """Rows of the statistics workspace for a forward pass with ``stats``: one per M-tile of the
    smallest BLOCK_M any configuration uses (rows a larger tile leaves unwritten stay zero: count 0)."""
    return cdiv(M, 32)


def gemm_splits(M: int, Kg: int, groups: int, reduction: int, device: torch.device) -> int:
    """Split-K of a forward or grad-input GEMM of M rows, Kg columns per group and a reduction of
    ``reduction`` values (as csrc/cuda/conv2d.cu's choose_splits does it): a layer whose
    output would fill less than half of the SMs even in the smallest tiles the autotuner can pick,
    64x64 (a small image, batch 1: ResNet-50's last stage at batch 1 makes 8 of them for 132 SMs,
    each reducing over 4,608 values), splits its reduction into up to 32 slices of at least four
    64-element steps, until the programs fill the SMs once; 1 otherwise."""
    sms = sm_count(device, _INTERPRETED_SMS)
    tiles = cdiv(M, 64) * cdiv(Kg, 64) * groups
    if 2 * tiles > sms:
        return 1
    return max(1, min(sms // tiles, cdiv(reduction, 64) // 4, 32))


def _split_workspace(splits: int, M: int, K: int, like: torch.Tensor):
    """(splits, ws) for a split-K GEMM of an (M, K) output: the (splits, M, K) fp32 (fp64 for
    fp64) partials, or (1, None) unsplit, also where the workspace would pass int32 offsets
    (never for the few-tile layers the heuristic splits)."""
    if splits <= 1 or splits * M * K > _INT32_MAX:
        return 1, None
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    return splits, _fast.alloc((splits, M, K), dtype, like.device)


def _split_sum(ws, bias, y, residual, stats, relu: bool) -> None:
    """y (rows m = (n, p, q) of its own grid, through its strides) = the epilogue of the sum of the
    partials ws (splits, M, K), in 32-row tiles (the rows of ``stats``: stats_rows)."""
    splits, M, K = ws.shape
    bm, bn = 32, 64
    _fast.launch(
        _fwd_split_sum_kernel,
        (cdiv(M, bm), cdiv(K, bn)),
        ws,
        bias if bias is not None else y,
        y,
        residual if residual is not None else y,
        stats if stats is not None else y,
        M,
        K,
        y.shape[2],
        y.shape[3],
        splits,
        *y.stride(),
        HAS_BIAS=bias is not None,
        HAS_RES=residual is not None,
        RELU=relu,
        STATS=stats is not None,
        ACC=acc_type(ws.dtype),
        BLOCK_M=bm,
        BLOCK_N=bn,
        num_warps=4,
    )


def conv2d_forward(
    x,
    w,
    bias,
    y,
    stride,
    padding,
    dilation,
    groups,
    relu: bool,
    precision: str,
    kernel: str | None = None,
    stats: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    splits: int | None = None,
) -> None:
    """y = [relu](conv2d(x, w, bias) + residual) with ``padding = (top, left)`` (y's shape fixes
    the rest).

    x: (N, C, H, W), w: (K, C/groups, R, S), bias: (K,) or None, y: (N, K, P, Q) preallocated;
    all any strides, one dtype. ``precision``: "tf32" or "ieee" for fp32 inputs.
    ``kernel``: force "main", "small_c" or "1x1" (tests); None picks: "1x1" for an unpadded 1x1
    convolution, "small_c" for C/groups < 16, "main" otherwise.
    ``stats``: a zeroed (stats_rows(M), 3, K) fp32 (fp64 for fp64) workspace that receives, per
    M-tile and output channel, the (count, mean, M2) of y before the activation (BatchNorm).
    ``residual``: None or a tensor of y's shape and strides, added before the activation.
    ``splits``: split-K of the reduction (None: :func:`gemm_splits` chooses; 1: none): each
    split stores its partial sums in an fp32 (fp64) workspace and ``_fwd_split_sum_kernel`` adds
    them in a fixed order, in 32-row tiles, and applies the same epilogue (bias, ``stats``,
    residual, ReLU).
    """
    N, C, H, W = x.shape
    K, Cg, R, S = w.shape
    _, _, P, Q = y.shape
    M = N * P * Q
    if M == 0 or K == 0:
        return
    if residual is not None:
        check_like("conv2d", "residual", residual, y, "the output")
    for name, t in (("input", x), ("weight", w), ("output", y)):
        _check_int32_extent(name, t)
    Kg = K // groups
    if kernel is None:
        kernel = "1x1" if (R, S) == (1, 1) and tuple(padding) == (0, 0) else "small_c" if Cg < 16 else "main"
    sxn, sxc, sxh, sxw = x.stride()
    if kernel == "1x1":  # fold the stride into the input strides: row (n, p, q) reads pixel (p*sh, q*sw)
        fn, sxh, sxw, stride = _fwd_1x1_kernel, sxh * stride[0], sxw * stride[1], (1, 1)
    else:
        fn = {"main": _fwd_kernel, "small_c": _fwd_small_c_kernel}[kernel]
    if splits is None:
        splits = gemm_splits(M, Kg, groups, R * S * Cg, x.device)
    if splits < 1:
        raise ValueError(f"conv2d: splits must be >= 1, got {splits}")
    splits, ws = _split_workspace(splits, M, K, x)

    def grid(meta):
        return (cdiv(M, meta["BLOCK_M"]) * cdiv(Kg, meta["BLOCK_N"]), groups * splits)

    st = stats if stats is not None else y
    cl = _is_cl(x)
    key = (M, Kg, Cg, R, S, cl, residual is not None, stats is not None, splits, x.dtype, st.dtype)
    res = residual if residual is not None else y
    _launch(
        fn,
        grid,
        key,
        x,
        w,
        bias if bias is not None else w,
        y,
        res,
        st,
        ws if ws is not None else y,
        M,
        H,
        W,
        P,
        Q,
        Cg,
        Kg,
        splits,
        sxn,
        sxc,
        sxh,
        sxw,
        *w.stride(),
        *y.stride(),
        stride[0],
        stride[1],
        padding[0],
        padding[1],
        dilation[0],
        dilation[1],
        R=R,
        S=S,
        IS_CL_X=cl,
        HAS_BIAS=bias is not None,
        HAS_RES=residual is not None,
        RELU=relu,
        STATS=stats is not None,
        SPLIT=splits > 1,
        ACC=acc_type(x.dtype),
        PREC=precision,
    )
    if ws is not None:
        _split_sum(ws, bias, y, residual, stats, relu)


def dgrad_phases(stride, padding, dilation):
    """The grad-input of a strided convolution (dilation 1) phase by phase, as csrc/cuda/conv2d.cu
    does it: the input pixels (h, w) with h % sh = a, w % sw = b receive gradient only through
    the taps r = r0, r0 + sh, ... with r0 = (a + ph) % sh (likewise s), so each phase is a
    stride-1 grad-input over those taps, with padding ((a + ph - r0) / sh, (b + pw - s0) / sw),
    written into gx[:, :, a::sh, b::sw]. Yields, per phase, ``(a, b, r0, s0, step, stride,
    padding, dilation)``: where its pixels and taps start, the step between them, and the
    geometry of its GEMM. Stride 1, or a dilated filter (whose kernel skips the taps between
    strides itself), is one phase: the whole tensors, step 1, the convolution's own geometry."""
    (sh, sw), (ph, pw) = stride, padding[:2]
    if (sh, sw) == (1, 1) or tuple(dilation) != (1, 1):
        yield 0, 0, 0, 0, (1, 1), tuple(stride), (ph, pw), tuple(dilation)
        return
    for a in range(sh):
        for b in range(sw):
            r0, s0 = (a + ph) % sh, (b + pw) % sw
            yield a, b, r0, s0, (sh, sw), (1, 1), ((a + ph - r0) // sh, (b + pw - s0) // sw), (1, 1)


def conv2d_backward_input(
    gy, w, gx, stride, padding, dilation, groups, precision: str, splits: int | None = None
) -> None:
    """grad_x (N, C, H, W, preallocated, any strides) from grad_y (N, K, P, Q) and w; a strided
    convolution's phase by phase (:func:`dgrad_phases`), each over only the taps that reach it.
    ``splits``: split-K of each phase's reduction (None: :func:`gemm_splits` chooses per phase;
    1: none), the partials summed in a fixed order by ``_fwd_split_sum_kernel``."""
    if splits is not None and splits < 1:
        raise ValueError(f"conv2d: splits must be >= 1, got {splits}")
    N, C, H, W = gx.shape
    K, Cg = w.shape[:2]
    _, _, P, Q = gy.shape
    if N * H * W == 0 or C == 0:
        return
    if K == 0 or P == 0 or Q == 0:
        _fast.record_miss(again=False)
        gx.zero_()
        return
    for name, t in (("grad_output", gy), ("weight", w), ("grad_input", gx)):
        _check_int32_extent(name, t)
    cl = _is_cl(gx)
    for a, b, r0, s0, (step_h, step_w), st, pad, dil in dgrad_phases(stride, padding, dilation):
        if (step_h, step_w) == (1, 1):  # one phase: the whole tensors
            gxv, wv = gx, w
        else:
            gxv, wv = gx[:, :, a::step_h, b::step_w], w[:, :, r0::step_h, s0::step_w]
        _, _, Hv, Wv = gxv.shape
        Rv, Sv = wv.shape[2], wv.shape[3]
        M = N * Hv * Wv
        if M == 0:
            continue
        if Rv == 0 or Sv == 0:  # no filter tap reaches this phase: its gradient is zero
            _fast.record_miss(again=False)
            gxv.zero_()
            continue
        n_split, ws = _split_workspace(
            gemm_splits(M, Cg, groups, Rv * Sv * (K // groups), gx.device) if splits is None else splits, M, C, gx
        )
        grid = lambda meta, M=M, n_split=n_split: (  # noqa: E731
            cdiv(M, meta["BLOCK_M"]) * cdiv(Cg, meta["BLOCK_N"]),
            groups * n_split,
        )
        _launch(
            _dgrad_kernel,
            grid,
            (M, K // groups, Cg, Rv, Sv, cl, n_split, gy.dtype),
            gy,
            wv,
            gxv,
            ws if ws is not None else gxv,
            M,
            Hv,
            Wv,
            P,
            Q,
            Cg,
            K // groups,
            n_split,
            *gy.stride(),
            *wv.stride(),
            *gxv.stride(),
            st[0],
            st[1],
            pad[0],
            pad[1],
            dil[0],
            dil[1],
            R=Rv,
            S=Sv,
            IS_CL_X=cl,
            SPLIT=n_split > 1,
            ACC=acc_type(gx.dtype),
            PREC=precision,
        )
        if ws is not None:  # rows (n, h, w) of the phase's view, written through its strides
            _split_sum(ws, None, gxv, None, None, False)


def _wgrad_tile(Kg: int, Cg: int) -> tuple[int, int, int]:
    """(BLOCK_K, BLOCK_C, BLOCK_M) of the wgrad kernel (see _prune for the interpreter)."""
    if not INTERPRET:
        return 64, 64, 64
    return (128, 128, 32) if min(Kg, Cg) >= 64 else (32, 32, 32)


def _num_splits(M: int, tiles: int, block_m: int, device: torch.device) -> int:
    """How many chunks the N*P*Q reduction of wgrad is split into: enough programs to fill the GPU
    about twice, no chunk shorter than 4 M-blocks. Depends only on the shape and the device, so
    the summation order (and the result) is the same run to run."""
    if INTERPRET:
        target = 4  # exercise the split path in tests, cheaply
    else:
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    want = max(1, cdiv(target, max(tiles, 1)))
    return max(1, min(want, cdiv(M, 4 * block_m)))


def conv2d_backward_weight(gy, x, gw, gb, stride, padding, dilation, groups, precision: str) -> None:
    """grad_w (K, C/groups, R, S) and, when ``gb`` is given, grad_bias (K,), both preallocated,
    from grad_y (N, K, P, Q) and x (N, C, H, W). Deterministic: split-K partials are summed in a
    fixed order (a second small kernel, which also casts and writes through gw's strides)."""
    N, C, H, W = x.shape
    K, Cg, R, S = gw.shape
    _, _, P, Q = gy.shape
    M = N * P * Q
    if gw.numel() == 0 and (gb is None or gb.numel() == 0):
        return
    for name, t in (("grad_output", gy), ("input", x)):
        _check_int32_extent(name, t)
    Kg = K // groups
    acc_dtype = torch.float64 if gw.dtype == torch.float64 else torch.float32
    BK, BC, BM = _wgrad_tile(Kg, Cg)
    tiles = cdiv(Kg, BK) * cdiv(Cg, BC) * R * S * groups
    splits = _num_splits(M, tiles, BM, x.device) if M else 1
    m_per_split = cdiv(max(M, 1), splits)
    nw = K * Cg * R * S
    with_bias = gb is not None
    split_stride = nw + K if with_bias else nw
    # one workspace: per split, the weight partials then the bias partials; the kernel writes every
    # element when M > 0 (each tile, tap and split stores its block, zeros for an empty range)
    ws = _fast.alloc((splits, split_stride), acc_dtype, x.device, zero=not M)
    if M:
        grid = (cdiv(Kg, BK) * cdiv(Cg, BC), groups * R * S, splits)
        _fast.launch(
            _wgrad_kernel,
            grid,
            gy,
            x,
            ws,
            ws[:, nw:] if with_bias else ws,
            M,
            H,
            W,
            P,
            Q,
            Cg,
            Kg,
            K,
            m_per_split,
            split_stride,
            *gy.stride(),
            *x.stride(),
            stride[0],
            stride[1],
            padding[0],
            padding[1],
            dilation[0],
            dilation[1],
            R=R,
            S=S,
            WITH_BIAS=with_bias,
            ACC=acc_type(gw.dtype),
            PREC=precision,
            BLOCK_K=BK,
            BLOCK_C=BC,
            BLOCK_M=BM,
            num_warps=4,
            num_stages=1 if INTERPRET else 3,
        )
    total = split_stride
    if total:
        block = 1024
        _fast.launch(
            _split_sum_kernel,
            (cdiv(total, block),),
            ws,
            gw,
            gb if with_bias else gw,
            splits,
            split_stride,
            nw,
            K,
            Cg,
            R,
            S,
            *gw.stride(),
            WITH_BIAS=with_bias,
            ACC=acc_type(gw.dtype),
            BLOCK=block,
            num_warps=4,
        )


__all__ = ["conv2d_forward", "conv2d_backward_input", "conv2d_backward_weight"]
