"""Local Response Normalization across channels, in Triton.

PyTorch's definition (also Caffe's and cuDNN's): for input x of shape (N, C, H, W)

    scale[n, c, h, w] = k + alpha / size * sum_{j in window(c)} x[n, j, h, w]^2
    out[n, c, h, w]   = x[n, c, h, w] * scale[n, c, h, w]^-beta
    window(c)         = [c - P, c + Q] clipped to [0, C),  P = size // 2,  Q = (size - 1) // 2

(for even sizes the window holds one more channel before c than after it, as PyTorch's padding of
size//2 channels in front and (size-1)//2 behind gives).

Tiling. Each program owns BLOCK spatial positions (h, w) of one image n and walks the channels,
keeping a running sum of squares per position: at channel c the square of channel c+Q enters
and that of channel c-P-1 leaves, so the cost per element does not depend on ``size``. In NCHW
the BLOCK positions are contiguous and the walk strides by H*W; in channels_last each position's
channels are contiguous, so a program's loads of one channel stride by C and the following
channels hit the cache lines already fetched. Either way each element comes from DRAM once: the
re-reads of a channel (leaving the window, or as the centre) come a few steps after its first
read, from L1/L2. When the N*H*W walks are too few to keep DRAM busy (AlexNet's NORM2), the
channels are split into chunks, one program per (image, chunk, tile), each first re-entering the
window of its chunk's first channel (_channel_chunk).

Numerics. x^-beta is exp2(-beta * log2(scale)), computed in fp32 (fp64 for fp64 inputs). The
running sum is compensated (Knuth's TwoSum, the rounding error of every add/subtract kept in a
second accumulator), so a large square that has left the window leaves no cancellation error in
the sums after it. Non-finite squares (inf, NaN) are not added to the running sum but counted,
so they affect exactly the windows that contain them (as PyTorch's direct window sums do) and not
every channel after them.

Backward (one kernel, one pass over x and grad_out, one write of grad_in):

    grad_in[i] = g[i] * scale[i]^-beta
                 - (2 * alpha * beta / size) * x[i] * sum_{j : i in window(j)} T[j]
    T[j]       = g[j] * x[j] * scale[j]^(-beta - 1)

``i in window(j)`` <=> j in [i - Q, i + P]: the mirrored window (it differs from the forward one
for even sizes). T's window sum is itself a running sum: T[i+P] enters and T[i-Q-1] leaves at step
i. Save or recompute? ``scale`` is recomputed, not saved by the forward: saving it would add one
write (forward) and one read (backward) of a tensor as large as x, while backward reads x anyway.
Recomputing needs scale at three channels per step (i+P to add T, i to finish grad_in[i], i-Q-1
to remove T), i.e. three running sums of squares ("cursors") and three powers per element: more
arithmetic, no extra memory traffic. (Keeping the last ``size`` values of T instead would need a
dynamically indexed ring buffer, which Triton's registers are not.)

Launchers take preallocated outputs (dense NCHW or channels_last, any strides for the inputs) and
return nothing. Scalars are passed as fp32 (hi, lo) pairs so that fp64 inputs compute with fp64
constants (Triton passes Python floats as fp32).
"""

import math
import struct

import torch
import triton
import triton.language as tl

from . import INTERPRET, acc_type, cdiv, sm_count
from . import _launch as _fast

_INT32_MAX = 2**31 - 1
# The SM count the interpreter assumes: an H100's, so that CPU runs split channels as a GPU run would.
_INTERPRETED_SMS = 132


def _fp32(v: float) -> float:
    try:
        return struct.unpack("f", struct.pack("f", v))[0]
    except OverflowError:  # beyond fp32's range
        return math.copysign(math.inf, v)


def _split(v: float) -> tuple[float, float]:
    """v as an fp32 pair hi + lo (hi = fp32(v)), exact to about 2^-48 relative."""
    hi = _fp32(v)
    lo = _fp32(v - hi) if math.isfinite(hi) else 0.0
    return hi, lo


@triton.jit
def _param(hi, lo, ACC: tl.constexpr):
    return tl.cast(hi, ACC) + tl.cast(lo, ACC)


@triton.jit
def _sq(v):
    # The square of v split into (finite square or 0, is NaN, is inf).
    sq = v * v
    nan = sq != sq
    inf = sq == float("inf")
    return tl.where(nan | inf, 0.0, sq), nan.to(tl.int32), inf.to(tl.int32)


@triton.jit
def _two_sum(s, comp, y):
    # s + y, with the rounding error of the addition (exact, by TwoSum) added to comp.
    t = s + y
    bp = t - s
    return t, comp + ((s - (t - bp)) + (y - bp))


@triton.jit
def _slide(s, comp, n_nan, n_inf, a, b):
    # One step of a window's running sum of squares: a enters, b leaves (0 where absent).
    fa, na, ia = _sq(a)
    fb, nb, ib = _sq(b)
    s, comp = _two_sum(s, comp, fa)
    s, comp = _two_sum(s, comp, -fb)
    return s, comp, n_nan + na - nb, n_inf + ia - ib


@triton.jit
def _window(s, comp, n_nan, n_inf):
    # The window's sum of squares: NaN if it holds a NaN, else inf if it holds an inf.
    w = tl.maximum(s + comp, 0.0)
    w = tl.where(n_inf > 0, float("inf"), w)
    return tl.where(n_nan > 0, float("nan"), w)


@triton.jit
def _spatial_offsets(s, W, sh, sw, FLAT: tl.constexpr):
    # Offset of spatial position s = h*W + w. FLAT: sh == W*sw (NCHW: sw == 1, NHWC: sw == C), so
    # no division is needed and, for sw == 1 (specialised by Triton), the loads vectorise.
    s = s.to(tl.int64)
    if FLAT:
        return s * sw
    return (s // W) * sh + (s % W) * sw


@triton.jit
def _fwd_kernel(
    x_ptr,
    y_ptr,
    C,
    HW,
    W,
    n_tiles,
    n_chunks,
    CH,
    sxn,
    sxc,
    sxh,
    sxw,
    syn,
    syc,
    sys,
    P,
    Q,
    k_hi,
    k_lo,
    an_hi,
    an_lo,
    nb_hi,
    nb_lo,
    X_FLAT: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Program (n, chunk, tile): spatial positions [tile*BLOCK, tile*BLOCK + BLOCK) of image n,
    # output channels [c0, c1) = [chunk*CH, chunk*CH + CH) (see _channel_chunk).
    pid = tl.program_id(0)
    t = pid // n_tiles
    n = t // n_chunks
    c0 = (t - n * n_chunks) * CH
    c1 = tl.minimum(c0 + CH, C)
    s = (pid - t * n_tiles) * BLOCK + tl.arange(0, BLOCK)
    smask = s < HW
    xb = x_ptr + n.to(tl.int64) * sxn + _spatial_offsets(s, W, sxh, sxw, X_FLAT)
    yb = y_ptr + n.to(tl.int64) * syn + s.to(tl.int64) * sys
    kk = _param(k_hi, k_lo, ACC)
    an = _param(an_hi, an_lo, ACC)  # alpha / size
    nb = _param(nb_hi, nb_lo, ACC)  # -beta
    zero = tl.zeros([BLOCK], ACC)
    acc, comp = zero, zero
    n_nan = tl.zeros([BLOCK], tl.int32)
    n_inf = tl.zeros([BLOCK], tl.int32)
    # Window of channel c0 is [lo, c0+Q] with lo = max(0, c0-P) (P, Q already clipped to C - 1):
    # channels lo..c0+Q-1 enter first. A channel leaves only if it entered (>= lo).
    lo = tl.maximum(c0 - P, 0)
    for e in range(lo, c0 + Q):
        a = tl.load(xb + tl.cast(e, tl.int64) * sxc, mask=smask & (e < C), other=0.0).to(ACC)
        acc, comp, n_nan, n_inf = _slide(acc, comp, n_nan, n_inf, a, zero)
    for c in range(c0, c1):
        # channel c+Q enters, channel c-P-1 leaves
        e = c + Q
        lv = c - P - 1
        a = tl.load(xb + tl.cast(e, tl.int64) * sxc, mask=smask & (e < C), other=0.0).to(ACC)
        b = tl.load(xb + tl.cast(lv, tl.int64) * sxc, mask=smask & (lv >= lo), other=0.0).to(ACC)
        acc, comp, n_nan, n_inf = _slide(acc, comp, n_nan, n_inf, a, b)
        scale = kk + an * _window(acc, comp, n_nan, n_inf)
        x = tl.load(xb + tl.cast(c, tl.int64) * sxc, mask=smask, other=0.0).to(ACC)
        y = x * tl.exp2(nb * tl.log2(scale))
        tl.store(yb + tl.cast(c, tl.int64) * syc, y.to(y_ptr.dtype.element_ty), mask=smask)


@triton.jit
def _bwd_kernel(
    x_ptr,
    g_ptr,
    gi_ptr,
    C,
    HW,
    W,
    n_tiles,
    n_chunks,
    CH,
    sxn,
    sxc,
    sxh,
    sxw,
    sgn,
    sgc,
    sgh,
    sgw,
    son,
    soc,
    sos,
    P,
    Q,
    k_hi,
    k_lo,
    an_hi,
    an_lo,
    nb_hi,
    nb_lo,
    nb1_hi,
    nb1_lo,
    cf_hi,
    cf_lo,
    X_FLAT: tl.constexpr,
    G_FLAT: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Step i finishes grad_in[i]. Three running sums of squares ("cursors") give scale at channel
    # i+P (lead: T[i+P] enters T's window sum), i (mid: grad_in[i]'s own term) and i-Q-1 (lag:
    # T[i-Q-1] leaves). With L = P+Q+1 the cursors' windows are [i, i+L-1], [i-P, i+Q] and
    # [i-L, i-1]. The program finishes channels [c0, c1) (its chunk); no window any of them needs
    # reaches below c0 - L, so channels below lo = max(0, c0-L) are treated as absent: starting at
    # i = lo+1-L, all three windows (and T's window [i-Q, i+P]) start empty, and the sums are
    # exact from the first output on. Steps before c0 only warm the sums up.
    pid = tl.program_id(0)
    t = pid // n_tiles
    n = t // n_chunks
    c0 = (t - n * n_chunks) * CH
    c1 = tl.minimum(c0 + CH, C)
    s = (pid - t * n_tiles) * BLOCK + tl.arange(0, BLOCK)
    smask = s < HW
    n64 = n.to(tl.int64)
    xb = x_ptr + n64 * sxn + _spatial_offsets(s, W, sxh, sxw, X_FLAT)
    gb = g_ptr + n64 * sgn + _spatial_offsets(s, W, sgh, sgw, G_FLAT)
    ob = gi_ptr + n64 * son + s.to(tl.int64) * sos
    kk = _param(k_hi, k_lo, ACC)
    an = _param(an_hi, an_lo, ACC)  # alpha / size
    nb = _param(nb_hi, nb_lo, ACC)  # -beta
    nb1 = _param(nb1_hi, nb1_lo, ACC)  # -beta - 1
    cf = _param(cf_hi, cf_lo, ACC)  # 2 * alpha * beta / size
    L = P + Q + 1
    lo = tl.maximum(c0 - L, 0)
    zero = tl.zeros([BLOCK], ACC)
    izero = tl.zeros([BLOCK], tl.int32)
    s_ld, c_ld, nn_ld, ni_ld = zero, zero, izero, izero  # lead cursor, channel i+P
    s_md, c_md, nn_md, ni_md = zero, zero, izero, izero  # mid cursor, channel i
    s_lg, c_lg, nn_lg, ni_lg = zero, zero, izero, izero  # lag cursor, channel i-Q-1
    t_sum, t_comp = zero, zero  # sum of T over [i-Q, i+P]
    for i in range(lo + 1 - L, c1):
        # squares entering / leaving the cursors' windows (absent channels load 0)
        ch = i + L - 1
        x_a = tl.load(xb + tl.cast(ch, tl.int64) * sxc, mask=smask & (ch < C), other=0.0).to(ACC)
        ch = i - 1
        x_b = tl.load(xb + tl.cast(ch, tl.int64) * sxc, mask=smask & (ch >= lo), other=0.0).to(ACC)
        ch = i + Q
        x_c = tl.load(xb + tl.cast(ch, tl.int64) * sxc, mask=smask & (ch >= lo) & (ch < C), other=0.0).to(ACC)
        ch = i - P - 1
        x_d = tl.load(xb + tl.cast(ch, tl.int64) * sxc, mask=smask & (ch >= lo), other=0.0).to(ACC)
        ch = i - L - 1
        x_e = tl.load(xb + tl.cast(ch, tl.int64) * sxc, mask=smask & (ch >= lo), other=0.0).to(ACC)
        s_ld, c_ld, nn_ld, ni_ld = _slide(s_ld, c_ld, nn_ld, ni_ld, x_a, x_b)
        s_md, c_md, nn_md, ni_md = _slide(s_md, c_md, nn_md, ni_md, x_c, x_d)
        s_lg, c_lg, nn_lg, ni_lg = _slide(s_lg, c_lg, nn_lg, ni_lg, x_b, x_e)

        # T[i+P] enters, T[i-Q-1] leaves T's window sum (0 for channels outside [0, C))
        ch = i + P
        ok = (ch >= lo) & (ch < C)
        xv = tl.load(xb + tl.cast(ch, tl.int64) * sxc, mask=smask & ok, other=0.0).to(ACC)
        gv = tl.load(gb + tl.cast(ch, tl.int64) * sgc, mask=smask & ok, other=0.0).to(ACC)
        scale = kk + an * _window(s_ld, c_ld, nn_ld, ni_ld)
        t_in = tl.where(ok, gv * xv * tl.exp2(nb1 * tl.log2(scale)), 0.0)
        ch = i - Q - 1
        ok = ch >= lo
        xv = tl.load(xb + tl.cast(ch, tl.int64) * sxc, mask=smask & ok, other=0.0).to(ACC)
        gv = tl.load(gb + tl.cast(ch, tl.int64) * sgc, mask=smask & ok, other=0.0).to(ACC)
        scale = kk + an * _window(s_lg, c_lg, nn_lg, ni_lg)
        t_out = tl.where(ok, gv * xv * tl.exp2(nb1 * tl.log2(scale)), 0.0)
        t_sum, t_comp = _two_sum(t_sum, t_comp, t_in)
        t_sum, t_comp = _two_sum(t_sum, t_comp, -t_out)

        # grad_in[i]
        ok = i >= c0
        xv = tl.load(xb + tl.cast(i, tl.int64) * sxc, mask=smask & ok, other=0.0).to(ACC)
        gv = tl.load(gb + tl.cast(i, tl.int64) * sgc, mask=smask & ok, other=0.0).to(ACC)
        scale = kk + an * _window(s_md, c_md, nn_md, ni_md)
        gi = gv * tl.exp2(nb * tl.log2(scale)) - cf * xv * (t_sum + t_comp)
        tl.store(ob + tl.cast(i, tl.int64) * soc, gi.to(gi_ptr.dtype.element_ty), mask=smask & ok)


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------
def _window_halves(size: int, channels: int) -> tuple[int, int]:
    """(P, Q) = (size // 2, (size - 1) // 2), each clipped to C - 1: a window reaching further
    than the last channel covers the same channels as one reaching exactly to it."""
    return min(size // 2, channels - 1), min((size - 1) // 2, channels - 1)


def _block(hw: int, channels_last: bool, backward: bool, fp64: bool) -> tuple[int, int]:
    """(BLOCK, num_warps). The interpreter runs numpy over whole blocks: one block per image when
    it fits. On a GPU: positions per thread chosen so the running state stays in registers
    without spills (checked with ptxas for sm_90: forward NCHW 4 positions per thread, ~40
    registers; backward 2, ~56; fp64 half as many; channels_last 1, each thread walking its own
    position's contiguous channels), then the block size that wastes the fewest lanes on the last
    tile, the larger one on ties."""
    if INTERPRET:
        return min(triton.next_power_of_2(max(hw, 1)), 4096), 4
    if channels_last:
        per_thread = 1
    else:
        per_thread = max(1, (2 if backward else 4) // (2 if fp64 else 1))
    cands = [32 * per_thread * w for w in (2, 4, 8)]
    best = min(cands, key=lambda b: (cdiv(hw, b) * b, -b))
    return best, best // (32 * per_thread)


def _channel_chunk(positions: int, channels: int, span: int, sms: int, chunk: int | None) -> int:
    """Channels per program (per thread in the CUDA kernel): a walk over all C channels of a
    position is one long serial chain, and N*H*W positions can be too few chains to keep DRAM
    busy (AlexNet's NORM2 at batch 128: 93k positions for 132 SMs x 2048 threads, each with a
    couple of loads in flight). So the channels are split into chunks when positions are fewer
    than 2 walks per thread slot (2 * SMs * 2048); each chunk first re-enters the window of its
    first channel (span - 1 = P + Q extra steps in the forward, about 2 * span in the backward), so
    chunks are at least 8 * span channels long: at most 1/8 (forward) or 1/4 (backward) extra
    steps, all served from cache. The CUDA kernel applies the same rule (csrc/cuda/
    local_response_norm.cu: channel_chunk). ``chunk`` forces a length (tests)."""
    if chunk is not None:
        return max(1, min(int(chunk), channels))
    target = 2 * sms * 2048
    n_chunks = max(1, min(-(-target // max(positions, 1)), channels // (8 * span)))
    return -(-channels // n_chunks)


def _flat(t: torch.Tensor) -> bool:
    """Whether t's spatial offset is s * stride(3) (H stride == W * W stride)."""
    return t.stride(2) == t.shape[3] * t.stride(3) or t.shape[2] == 1


def _dense_out_strides(out: torch.Tensor, name: str) -> tuple[int, int, int]:
    """(n, c, spatial) strides of a dense NCHW or channels_last output."""
    n, c, h, w = out.shape
    if out.is_contiguous():
        return c * h * w, h * w, 1
    if out.is_contiguous(memory_format=torch.channels_last):
        return h * w * c, 1, c
    raise ValueError(f"{name} must be a dense NCHW or channels_last tensor, got strides {tuple(out.stride())}")


_MAX_BLOCK = 4096  # the largest BLOCK _block returns


def _check_index_range(*tensors: torch.Tensor) -> None:
    """Refuses, before any launch, what the kernels cannot index. Memory offsets are int64
    throughout (a tensor may hold any number of elements); only the spatial index s of a tile
    (< H*W + BLOCK) is int32, and the grid (one program per image, channel chunk and tile) must
    fit CUDA's 2^31 - 1 blocks."""
    for t in tensors:
        hw = t.shape[2] * t.shape[3]
        if hw + _MAX_BLOCK > _INT32_MAX:
            raise ValueError(
                f"local_response_norm: H*W = {t.shape[2]}*{t.shape[3]} = {hw} spatial positions per "
                f"image; the Triton kernels index positions in int32 and take at most "
                f"{_INT32_MAX - _MAX_BLOCK} (input {tuple(t.shape)})"
            )


def _check_grid(programs: int, shape) -> None:
    if programs > _INT32_MAX:
        raise ValueError(
            f"local_response_norm: {programs} programs exceed the 2^31 - 1 a launch can have "
            f"(input {tuple(shape)}); split the batch"
        )


def local_response_norm_forward(
    x: torch.Tensor, out: torch.Tensor, size: int, alpha: float, beta: float, k: float, chunk: int | None = None
) -> None:
    """out = LRN(x) across dim 1. x: (N, C, H, W), any strides; out: x's shape, dense NCHW or
    channels_last, x's dtype. ``chunk``: channels per program (default: :func:`_channel_chunk`)."""
    if out.numel() == 0:
        return
    _check_index_range(x)
    n, c, h, w = x.shape
    syn, syc, sys_ = _dense_out_strides(out, "out")
    cl = syc == 1 and c > 1
    block, warps = _block(h * w, cl, backward=False, fp64=x.dtype == torch.float64)
    n_tiles = cdiv(h * w, block)
    p, q = _window_halves(size, c)
    ch = _channel_chunk(n * h * w, c, p + q + 1, sm_count(x.device, _INTERPRETED_SMS), chunk)
    n_chunks = cdiv(c, ch)
    _check_grid(n * n_chunks * n_tiles, x.shape)
    _fast.launch(
        _fwd_kernel,
        (n * n_chunks * n_tiles,),
        x,
        out,
        c,
        h * w,
        w,
        n_tiles,
        n_chunks,
        ch,
        *x.stride(),
        syn,
        syc,
        sys_,
        p,
        q,
        *_split(k),
        *_split(alpha / size),
        *_split(-beta),
        X_FLAT=_flat(x),
        ACC=acc_type(x.dtype),
        BLOCK=block,
        num_warps=warps,
    )


def local_response_norm_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    grad_in: torch.Tensor,
    size: int,
    alpha: float,
    beta: float,
    k: float,
    chunk: int | None = None,
) -> None:
    """grad_in = d LRN(x) / dx applied to grad_out. grad_out, x: (N, C, H, W), any strides;
    grad_in: dense NCHW or channels_last. ``chunk``: channels per program (default:
    :func:`_channel_chunk`)."""
    if grad_in.numel() == 0:
        return
    _check_index_range(x)
    n, c, h, w = x.shape
    son, soc, sos = _dense_out_strides(grad_in, "grad_in")
    cl = soc == 1 and c > 1
    block, warps = _block(h * w, cl, backward=True, fp64=x.dtype == torch.float64)
    n_tiles = cdiv(h * w, block)
    p, q = _window_halves(size, c)
    ch = _channel_chunk(n * h * w, c, p + q + 1, sm_count(x.device, _INTERPRETED_SMS), chunk)
    n_chunks = cdiv(c, ch)
    _check_grid(n * n_chunks * n_tiles, x.shape)
    _fast.launch(
        _bwd_kernel,
        (n * n_chunks * n_tiles,),
        x,
        grad_out,
        grad_in,
        c,
        h * w,
        w,
        n_tiles,
        n_chunks,
        ch,
        *x.stride(),
        *grad_out.stride(),
        son,
        soc,
        sos,
        p,
        q,
        *_split(k),
        *_split(alpha / size),
        *_split(-beta),
        *_split(-beta - 1.0),
        *_split(2.0 * alpha * beta / size),
        X_FLAT=_flat(x),
        G_FLAT=_flat(grad_out),
        ACC=acc_type(x.dtype),
        BLOCK=block,
        num_warps=warps,
    )


__all__ = ["INTERPRET", "local_response_norm_forward", "local_response_norm_backward"]
