// What the two tensor-core implicit GEMMs of the convolution's forward and grad-input share
// (conv2d_igemm.cu: mma.sync, sm_80+; conv2d_wgmma.cu: wgmma, sm_90a): the gather of the A rows
// (output pixels) and B rows (packed filter) in 16-byte chunks, and the epilogue (BatchNorm
// statistics of the tile, bias, ReLU, stores through the output's strides).
#pragma once

#include <cstdint>
#include <type_traits>

#include "conv2d.h"
#include "tensor_core.cuh"

namespace cnnkern {
namespace conv {

// The filter tap and source channel of reduction index kk = (r*S + s)*CK + c; ok: kk < KK. Every
// 16-byte chunk of a row lies inside one tap (CK is a multiple of the elements per chunk).
struct Tap {
  int r, s, c;
  bool ok;
};

template <typename T>
__device__ __forceinline__ Tap tap_of(const IgemmParams<T>& p, int kk) {
  Tap t{0, 0, 0, kk < p.KK};
  if (t.ok) {
    const int rs = kk / p.CK;
    t.c = kk - rs * p.CK;
    t.r = rs / p.S;
    t.s = rs - t.r * p.S;
  }
  return t;
}

// The k steps (of BK elements) a block reduces: all KT of them, or its split's share
// (IgemmParams::splits); blockIdx.z = split * G + g.
struct StepRange {
  int first, count;
};
template <typename T>
__device__ __forceinline__ StepRange step_range(const IgemmParams<T>& p, int BK) {
  const int KT = (p.KK + BK - 1) / BK;
  if (p.splits <= 1) return {0, KT};
  const int per = p.kk_split / BK, first = static_cast<int>(blockIdx.z / p.G) * per;
  return {first, max(0, min(KT - first, per))};
}

// One thread's ITERS A rows, m = m0 + row(i) with row(i) = first + i*step: their image base and
// the top-left source coordinate (forward) or the shifted output coordinate (grad-input), fixed
// across the reduction loop.
template <typename T, int ITERS, bool DGRAD>
struct GatherA {
  int64_t base[ITERS];
  int h[ITERS], w[ITERS];
  bool ok[ITERS];

  __device__ __forceinline__ GatherA(const IgemmParams<T>& p, int m0, int g, int first, int step) {
    const int HoWo = p.Ho * p.Wo;
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
      const int m = m0 + first + i * step;
      ok[i] = m < p.M;
      const int mm = ok[i] ? m : 0;
      const int n = mm / HoWo, rem = mm % HoWo;
      const int ho = rem / p.Wo, wo = rem % p.Wo;
      base[i] = static_cast<int64_t>(n) * p.Hs * p.Ws * p.Cs + static_cast<int64_t>(g) * p.CK;
      h[i] = DGRAD ? ho + p.ph : ho * p.sh - p.ph;
      w[i] = DGRAD ? wo + p.pw : wo * p.sw - p.pw;
    }
  }

  // cp.async of row i's 16-byte chunk at tap `t` to shared address `dst`: from the source pixel,
  // or a zero fill (padding, a grad-input tap between strides, a row or reduction index past the
  // end; the source base is then named but not read).
  __device__ __forceinline__ void copy(const IgemmParams<T>& p, int i, const Tap& t, uint32_t dst) const {
    int hs, ws;
    bool valid = ok[i] && t.ok;
    if (DGRAD) {
      const int th = h[i] - t.r * p.dh, tw = w[i] - t.s * p.dw;
      valid = valid && th >= 0 && tw >= 0 && th % p.sh == 0 && tw % p.sw == 0;
      hs = th / p.sh;
      ws = tw / p.sw;
    } else {
      hs = h[i] + t.r * p.dh;
      ws = w[i] + t.s * p.dw;
      valid = valid && hs >= 0 && ws >= 0;
    }
    valid = valid && hs < p.Hs && ws < p.Ws;
    const T* src = valid ? p.src + base[i] + (static_cast<int64_t>(hs) * p.Ws + ws) * p.Cs + t.c : p.src;
    ptx::cp_async16(dst, src, valid ? 16 : 0);
  }
};

// One thread's ITERS B rows (output channels o = n0 + first + i*step of group g) of the packed filter.
template <typename T, int ITERS>
struct GatherB {
  const T* row[ITERS];
  bool ok[ITERS];

  __device__ __forceinline__ GatherB(const IgemmParams<T>& p, int n0, int g, int first, int step) {
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
      const int o = n0 + first + i * step;
      ok[i] = o < p.NO;
      row[i] = p.wp + static_cast<int64_t>(g * p.NO + (ok[i] ? o : 0)) * p.KK;
    }
  }
  // cp.async of row i's 16-byte chunk at reduction index kk (k_ok: kk < KK), or a zero fill
  __device__ __forceinline__ void copy(const IgemmParams<T>& p, int i, int kk, bool k_ok, uint32_t dst) const {
    const bool valid = ok[i] && k_ok;
    ptx::cp_async16(dst, valid ? row[i] + kk : p.wp, valid ? 16 : 0);
  }
};

// Bias, residual and ReLU on an accumulator pair: output channel o of group g (oc = g*NO + o) and
// its right neighbour, which exists only where o + 1 < NO. `res`: the pair's first residual
// element (its neighbour p.yc further on: y's strides), or nullptr for none; `act`: apply the
// ReLU here (false where a later step adds the residual first).
template <typename T>
__device__ __forceinline__ void epilogue_pair(const IgemmParams<T>& p, int oc, int o, float& v0, float& v1,
                                              const T* res, bool act) {
  if (p.bias != nullptr) {
    v0 += static_cast<float>(p.bias[oc]);
    if (o + 1 < p.NO) v1 += static_cast<float>(p.bias[oc + 1]);
  }
  if (res != nullptr) {
    v0 += static_cast<float>(res[0]);
    if (o + 1 < p.NO) v1 += static_cast<float>(res[p.yc]);
  }
  if (act && p.relu) {
    v0 = v0 < 0.f ? 0.f : v0;
    v1 = v1 < 0.f ? 0.f : v1;
  }
}

// fn(lr, lc, a0, a1) for each accumulator pair of the warp's MT x NT fragments: tile row lr,
// tile columns lc and lc + 1 (the fragment layout of igemm_epilogue below).
template <int MT, int NT, typename Fn>
__device__ __forceinline__ void for_each_pair(const float (&acc)[MT][NT][4], int row0, int col0, Fn&& fn) {
  const int lane = threadIdx.x % 32, gid = lane / 4, tig = lane % 4;
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        fn(row0 + i * 16 + gid + 8 * h, col0 + j * 8 + 2 * tig, acc[i][j][2 * h], acc[i][j][2 * h + 1]);
      }
}

// A 16-byte chunk of T as its four 32-bit words (one float, or two 16-bit values low half first),
// element by element through their bits, so that chunks move as uint4 without type punning.
__device__ __forceinline__ uint32_t chunk_word(const uint4& c, int i) {
  return i == 0 ? c.x : i == 1 ? c.y : i == 2 ? c.z : c.w;
}
template <typename T>
__device__ __forceinline__ float value_of_bits(uint32_t bits) {  // the element in the low bits
  if constexpr (std::is_same_v<T, float>) {
    return __uint_as_float(bits);
  } else {
    return static_cast<float>(T(static_cast<uint16_t>(bits & 0xFFFFu), T::from_bits()));
  }
}
template <typename T>
__device__ __forceinline__ uint32_t bits_of_value(float v) {  // v rounded to T, in the low bits
  if constexpr (std::is_same_v<T, float>) {
    return __float_as_uint(v);
  } else {
    return static_cast<uint32_t>(static_cast<T>(v).x);
  }
}

// The stores of the tile when p.vec_store: the output values go to shared memory as a BM x BN
// tile, then each thread stores whole 16-byte chunks of its rows (a warp writes 512 contiguous
// bytes of a row pair instead of 8 rows x 16 bytes). Without a residual (RES false) the tile is
// staged as T, bias and ReLU applied; with one it is staged in fp32 with the bias only, and each
// output chunk adds the matching 16-byte chunk of the residual (y's strides, 16-byte aligned:
// conv2d.cu checks) before the ReLU, so the sum is rounded once. Staged chunk c of tile row r
// sits at chunk c ^ (r % 8) of its row (CPR, the staged chunks per row, is a multiple of 8): a
// fragment column's 8 rows are written without a bank conflict.
template <typename T, bool RES, int BM, int BN, int MT, int NT>
__device__ __forceinline__ void igemm_store_staged(const IgemmParams<T>& p, const float (&acc)[MT][NT][4], int m0,
                                                   int n0, int g, int row0, int col0, unsigned char* smem) {
  using S = std::conditional_t<RES, float, T>;    // the staged element
  constexpr int EPC = 16 / sizeof(T), OCPR = BN / EPC;  // output elements per chunk, output chunks per row
  constexpr int EPS = 16 / sizeof(S), CPR = BN / EPS;   // the same for the staged tile
  static_assert(CPR % 8 == 0, "the swizzle takes rows of a multiple of 8 chunks");
  const int t = threadIdx.x;
  auto staged = [&](int r, int col) {  // element (r, col) of the staged tile
    return reinterpret_cast<S*>(smem + (r * CPR + ((col / EPS) ^ (r & 7))) * 16) + col % EPS;
  };
  __syncthreads();  // every warp is done with the pipeline's buffers (and the statistics' tile)
  for_each_pair(acc, row0, col0, [&](int lr, int lc, float v0, float v1) {
    const int o = n0 + lc;
    if (o >= p.NO) return;  // NO is a multiple of EPC: the pair is inside the output or outside
    epilogue_pair(p, g * p.NO + o, o, v0, v1, static_cast<const T*>(nullptr), !RES);
    if constexpr (RES) {
      *reinterpret_cast<float2*>(staged(lr, lc)) = make_float2(v0, v1);
    } else {
      Mma<T>::store_pair(staged(lr, lc), v0, v1);
    }
  });
  __syncthreads();
  const int HoWo = p.Ho * p.Wo;
  for (int idx = t; idx < BM * OCPR; idx += blockDim.x) {
    const int r = idx / OCPR, c = idx % OCPR;
    const int m = m0 + r, o = n0 + c * EPC;
    if (m >= p.M || o >= p.NO) continue;
    const int n = m / HoWo, rem = m % HoWo;
    const int64_t off = static_cast<int64_t>(n) * p.yn + static_cast<int64_t>(rem / p.Wo) * p.yh +
                        static_cast<int64_t>(rem % p.Wo) * p.yw + g * p.NO + o;
    if constexpr (RES) {
      constexpr int PER = 4 / sizeof(T);  // elements per 32-bit word
      const uint4 rv = *reinterpret_cast<const uint4*>(p.res + off);
      uint32_t out[4];
#pragma unroll
      for (int wd = 0; wd < 4; ++wd) {
        const uint32_t in = chunk_word(rv, wd);
        out[wd] = 0;
#pragma unroll
        for (int h = 0; h < PER; ++h) {
          float v = *staged(r, c * EPC + wd * PER + h) + value_of_bits<T>(in >> (16 * h));
          if (p.relu) v = v < 0.f ? 0.f : v;
          out[wd] |= bits_of_value<T>(v) << (16 * h);
        }
      }
      *reinterpret_cast<uint4*>(p.y + off) = make_uint4(out[0], out[1], out[2], out[3]);
    } else {
      *reinterpret_cast<uint4*>(p.y + off) = *reinterpret_cast<const uint4*>(staged(r, c * EPC));
    }
  }
}

// The BatchNorm statistics of one output channel over `rows` rows of a row block: its fp32 values
// (bias added) at col[r * ld], r < rows, in shared memory; count, mean and M2 in two passes (no
// E[y^2] - E[y]^2), stored at st[0], st[K], st[2K]. The unsplit epilogue and the split-K reduction
// take them alike, one thread per channel.
__device__ __forceinline__ void store_column_stats(const float* col, int ld, int rows, float* st, int64_t K) {
  float sum = 0.f;
  for (int r = 0; r < rows; ++r) sum += col[r * ld];
  const float mean = sum / static_cast<float>(rows);
  float m2 = 0.f;
  for (int r = 0; r < rows; ++r) {
    const float d = col[r * ld] - mean;
    m2 += d * d;
  }
  st[0] = static_cast<float>(rows);
  st[K] = mean;
  st[2 * K] = m2;
}

// The epilogue of a BM x BN block tile (group g, first row m0, first column n0) whose warp holds
// MT x NT m16n8 fragments: fragment (i, j) covers tile rows row0 + 16i .. +15 and columns
// col0 + 8j .. +7, element e at row gid (+8 for e >= 2), column 2*tig + (e & 1) (the mma.sync
// and the wgmma accumulator layouts alike). `smem`: the pipeline's buffers, free once every warp
// has passed the last stage, at least BM*BN floats; the block has at least BN threads.
template <typename T, int BM, int BN, int MT, int NT>
__device__ __forceinline__ void igemm_epilogue(const IgemmParams<T>& p, const float (&acc)[MT][NT][4], int m0, int n0,
                                               int g, int row0, int col0, unsigned char* smem) {
  const int t = threadIdx.x, lane = t % 32;
  const int gid = lane / 4, tig = lane % 4;
  const int HoWo = p.Ho * p.Wo;
  if (p.splits > 1) {  // split-K: this split's raw accumulators (o is even, part_ld too: float2)
    float* part = p.part + static_cast<int64_t>(blockIdx.z) * p.M * p.part_ld;
    for_each_pair(acc, row0, col0, [&](int lr, int lc, float a0, float a1) {
      const int m = m0 + lr, o = n0 + lc;
      if (m >= p.M || o >= p.NO) return;
      float* dst = part + static_cast<int64_t>(m) * p.part_ld + o;
      if (o + 1 < p.NO) {
        *reinterpret_cast<float2*>(dst) = make_float2(a0, a1);
      } else {
        dst[0] = a0;
      }
    });
    return;
  }
  if (p.stats != nullptr) {
    // BatchNorm statistics of this tile: the fp32 tile (bias added) goes to shared memory, then
    // one thread per column takes count, mean and M2 over the valid rows in two passes (no
    // E[y^2] - E[y]^2).
    float* sC = reinterpret_cast<float*>(smem);
    __syncthreads();  // every warp is done with the last stage
    for_each_pair(acc, row0, col0, [&](int lr, int lc, float a0, float a1) {
      const int o = n0 + lc;
      const float b0 = (p.bias != nullptr && o < p.NO) ? static_cast<float>(p.bias[g * p.NO + o]) : 0.f;
      const float b1 = (p.bias != nullptr && o + 1 < p.NO) ? static_cast<float>(p.bias[g * p.NO + o + 1]) : 0.f;
      sC[lr * BN + lc] = a0 + b0;
      sC[lr * BN + lc + 1] = a1 + b1;
    });
    __syncthreads();
    const int o = n0 + t;
    if (t < BN && o < p.NO) {
      const int64_t K = static_cast<int64_t>(p.G) * p.NO;
      store_column_stats(sC + t, BN, min(BM, p.M - m0), p.stats + static_cast<int64_t>(blockIdx.x) * 3 * K + g * p.NO + o, K);
    }
  }
  if (p.vec_store) {
    if (p.res != nullptr) {
      igemm_store_staged<T, true, BM, BN>(p, acc, m0, n0, g, row0, col0, smem);
    } else {
      igemm_store_staged<T, false, BM, BN>(p, acc, m0, n0, g, row0, col0, smem);
    }
    return;
  }
  const bool pair_store = p.yc == 1;
#pragma unroll
  for (int i = 0; i < MT; ++i) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int m = m0 + row0 + i * 16 + gid + 8 * h;
      if (m >= p.M) continue;
      const int n = m / HoWo, rem = m % HoWo;
      const int64_t off = static_cast<int64_t>(n) * p.yn + static_cast<int64_t>(rem / p.Wo) * p.yh +
                          static_cast<int64_t>(rem % p.Wo) * p.yw;
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const int o = n0 + col0 + j * 8 + 2 * tig;
        if (o >= p.NO) continue;
        const int oc = g * p.NO + o;
        float v0 = acc[i][j][2 * h], v1 = acc[i][j][2 * h + 1];
        const int64_t at = off + static_cast<int64_t>(oc) * p.yc;
        epilogue_pair(p, oc, o, v0, v1, p.res != nullptr ? p.res + at : nullptr, true);
        T* dst = p.y + at;
        if (pair_store && o + 1 < p.NO && (reinterpret_cast<uintptr_t>(dst) % (2 * sizeof(T))) == 0) {
          Mma<T>::store_pair(dst, v0, v1);
        } else {
          dst[0] = static_cast<T>(v0);
          if (o + 1 < p.NO) dst[p.yc] = static_cast<T>(v1);
        }
      }
    }
  }
}

}  // namespace conv
}  // namespace cnnkern
