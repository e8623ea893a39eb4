// What the two tensor-core grad-weight kernels (conv2d_wgrad_igemm.cu: mma.sync,
// conv2d_wgrad_wgmma.cu: wgmma) share: the 16-byte chunks a thread copies per output pixel l
// (8 output channels of grad_out; 8 input channels of one filter tap of the input, zero where the
// tap falls in the padding) and the layout of the fp32 partial tile that the SIMT kernel's
// reduce finishes.
#pragma once

#include "conv2d.h"

namespace cnnkern {
namespace conv {

template <typename T>
struct WgradGather {
  const T* a_src;  // grad_out at channel o of group g, pixel 0
  const T* b_src;  // x at channel c of group g, pixel 0
  bool a_ok, b_ok;
  int r, s;        // the tap of the B chunk

  // the chunks of output channel a_o (A) and of column b_j = (r*S + s)*C + c (B), group g; K and C
  // are multiples of the chunk's elements, so a chunk is all in or all out and has one tap
  __device__ WgradGather(const WgradParams<T, float>& p, int g, int a_o, int b_j) {
    a_ok = a_o < p.K;
    a_src = p.gy + static_cast<int64_t>(g) * p.K + (a_ok ? a_o : 0);
    b_ok = b_j < p.C * p.R * p.S;
    const int rs = b_ok ? b_j / p.C : 0, c = b_ok ? b_j % p.C : 0;
    r = rs / p.S, s = rs % p.S;
    b_src = p.x + static_cast<int64_t>(g) * p.C + c;
  }

  // A's chunk of pixel l (< l_end): true and `src` set, or false (a zero fill)
  __device__ __forceinline__ bool a(const WgradParams<T, float>& p, int64_t l, int64_t l_end, const T*& src) const {
    src = a_src;
    if (!(a_ok && l < l_end)) return false;
    const int PQ = p.P * p.Q, n = static_cast<int>(l / PQ), rem = static_cast<int>(l % PQ);
    src += static_cast<int64_t>(n) * p.gn + static_cast<int64_t>(rem / p.Q) * p.gh +
           static_cast<int64_t>(rem % p.Q) * p.gw_;
    return true;
  }

  // B's chunk of pixel l: the input pixel under tap (r, s) of output pixel l, false in the padding
  __device__ __forceinline__ bool b(const WgradParams<T, float>& p, int64_t l, int64_t l_end, const T*& src) const {
    src = b_src;
    if (!(b_ok && l < l_end)) return false;
    const int PQ = p.P * p.Q, n = static_cast<int>(l / PQ), rem = static_cast<int>(l % PQ);
    const int h = (rem / p.Q) * p.sh - p.ph + r * p.dh, w = (rem % p.Q) * p.sw - p.pw + s * p.dw;
    if (h < 0 || h >= p.H || w < 0 || w >= p.W) return false;
    src += static_cast<int64_t>(n) * p.xn + static_cast<int64_t>(h) * p.xh + static_cast<int64_t>(w) * p.xw;
    return true;
  }
};

// Where value (o, jj) of split `split`, group g goes in the partials: part[split][g][o][c*R*S + r*S
// + s] for column jj = (r*S + s)*C + c.
template <typename T>
__device__ __forceinline__ int64_t wgrad_partial_at(const WgradParams<T, float>& p, int split, int g, int o, int jj) {
  const int RS = p.R * p.S, J = p.C * RS;
  return ((static_cast<int64_t>(split) * p.G + g) * p.K + o) * J + (jj % p.C) * RS + jj / p.C;
}

}  // namespace conv
}  // namespace cnnkern
