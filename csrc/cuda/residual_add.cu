// Residual add, CUDA C++: out = [relu](x + A(shortcut)), where A is the identity when the shapes
// match and, otherwise, ResNet's option-A shortcut: subsample the shortcut by `stride` in H and W
// and zero-pad it in channels (shortcut channels land in [0, Cs), channels [Cs, C) get zero). A is
// applied on the fly while reading: no padded or subsampled copy is ever materialised.
//
// Kernels
//   flat_kernel       x, shortcut and out share one dense layout: a pure elementwise pass with
//                     16-byte vector loads/stores (the identity case, the common one).
//   strided_kernel    anything else (option A, mixed layouts, non-contiguous inputs): each output
//                     element (dense NCHW or NHWC) is decomposed into (n, c, h, w) and the inputs
//                     are read through their strides. When the innermost output dimension is unit-
//                     stride in both inputs (channels_last option A), VEC elements move at once.
//   shortcut_backward_kernel   the adjoint of A: grad of the shortcut, zero where A did not sample.
// All index arithmetic is int64: tensors beyond 2^31 elements are handled.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "common.h"

namespace cnnkern {
namespace {

constexpr int kThreads = 256;

// Elementwise ops compute in A = at::opmath_type<T>: float for half/bf16/float, double for double.
struct AddOp {
  bool relu;
  template <typename A>
  __device__ __forceinline__ A operator()(A a, A b) const {
    const A y = a + b;
    return (relu && y < A(0)) ? A(0) : y;  // `y < 0` keeps NaN, as torch.relu does
  }
};

struct ReluGradOp {  // a = grad_out, b = out
  template <typename A>
  __device__ __forceinline__ A operator()(A g, A out) const {
    return out <= A(0) ? A(0) : g;  // threshold_backward(grad, out, 0)
  }
};

// out[i] = op(a[i], b[i]) over `n` elements of one dense layout; VEC elements per access.
template <typename T, int VEC, typename Op>
__global__ void flat_kernel(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ out,
                            int64_t n, Op op) {
  using V = Vec<T, VEC>;
  using A = at::opmath_type<T>;
  const int64_t nvec = n / VEC;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t i = tid; i < nvec; i += step) {
    const V va = reinterpret_cast<const V*>(a)[i];
    const V vb = reinterpret_cast<const V*>(b)[i];
    V vo;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      vo.v[k] = static_cast<T>(op(static_cast<A>(va.v[k]), static_cast<A>(vb.v[k])));
    }
    reinterpret_cast<V*>(out)[i] = vo;
  }
  for (int64_t i = nvec * VEC + tid; i < n; i += step) {  // tail (< VEC elements)
    out[i] = static_cast<T>(op(static_cast<A>(a[i]), static_cast<A>(b[i])));
  }
}

// Shape of x/out and the strides of both inputs. The shortcut's H and W strides are premultiplied
// by the option-A stride, so shortcut element (n, c, h, w) of the *mapped* tensor sits at
// n*ss[0] + c*ss[1] + h*ss[2] + w*ss[3], valid for c < Cs.
struct Geometry {
  int64_t C, H, W, Cs;
  int64_t sx[4];
  int64_t ss[4];
};

// Decomposes the linear index e of a dense output into (n, c, h, w).
template <bool CHANNELS_LAST>
__device__ __forceinline__ void decompose(int64_t e, const Geometry& g, int64_t& n, int64_t& c,
                                          int64_t& h, int64_t& w) {
  if (CHANNELS_LAST) {  // e = ((n*H + h)*W + w)*C + c
    c = e % g.C; e /= g.C;
    w = e % g.W; e /= g.W;
    h = e % g.H; n = e / g.H;
  } else {              // e = ((n*C + c)*H + h)*W + w
    w = e % g.W; e /= g.W;
    h = e % g.H; e /= g.H;
    c = e % g.C; n = e / g.C;
  }
}

// VEC > 1 only when the innermost output dimension (C for NHWC, W for NCHW) is a multiple of VEC,
// has unit stride in x and in the shortcut, and every base address is 16-byte aligned; for NHWC
// the host also requires Cs % VEC == 0 so a vector is either wholly inside [0, Cs) or wholly out.
template <typename T, int VEC, bool CHANNELS_LAST, bool RELU>
__global__ void strided_kernel(const T* __restrict__ x, const T* __restrict__ s, T* __restrict__ out,
                               int64_t numel, Geometry g) {
  using V = Vec<T, VEC>;
  using A = at::opmath_type<T>;
  const int64_t nvec = numel / VEC;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < nvec; i += step) {
    int64_t n, c, h, w;
    decompose<CHANNELS_LAST>(i * VEC, g, n, c, h, w);
    const int64_t xo = n * g.sx[0] + c * g.sx[1] + h * g.sx[2] + w * g.sx[3];
    V vx, vs, vo;
    if (VEC == 1) {
      vx.v[0] = x[xo];
    } else {
      vx = *reinterpret_cast<const V*>(x + xo);
    }
    if (c < g.Cs) {
      const int64_t so = n * g.ss[0] + c * g.ss[1] + h * g.ss[2] + w * g.ss[3];
      if (VEC == 1) {
        vs.v[0] = s[so];
      } else {
        vs = *reinterpret_cast<const V*>(s + so);
      }
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) vs.v[k] = static_cast<T>(A(0));
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const A y = static_cast<A>(vx.v[k]) + static_cast<A>(vs.v[k]);
      vo.v[k] = static_cast<T>((RELU && y < A(0)) ? A(0) : y);
    }
    reinterpret_cast<V*>(out)[i] = vo;
  }
}

// grad_s (dense NCHW or NHWC, shape N x Cs x Hs x Ws): grad[n, c, hs/stride, ws/stride] where both
// hs and ws are multiples of stride (the positions option A sampled), zero elsewhere.
template <typename T, bool CHANNELS_LAST>
__global__ void shortcut_backward_kernel(const T* __restrict__ grad, T* __restrict__ grad_s,
                                         int64_t numel, Geometry g /* C,H,W = Cs,Hs,Ws */,
                                         int64_t stride) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += step) {
    int64_t n, c, h, w;
    decompose<CHANNELS_LAST>(i, g, n, c, h, w);
    T v = static_cast<T>(at::opmath_type<T>(0));
    if (h % stride == 0 && w % stride == 0) {
      v = grad[n * g.sx[0] + c * g.sx[1] + (h / stride) * g.sx[2] + (w / stride) * g.sx[3]];
    }
    grad_s[i] = v;
  }
}

template <typename T, typename Op>
void launch_flat(const at::Tensor& a, const at::Tensor& b, at::Tensor& out, Op op) {
  const int64_t n = out.numel();
  const T* pa = a.const_data_ptr<T>();
  const T* pb = b.const_data_ptr<T>();
  T* po = out.mutable_data_ptr<T>();
  auto stream = c10::cuda::getCurrentCUDAStream();
  constexpr int V = vec16<T>();
  if (aligned16(pa) && aligned16(pb) && aligned16(po)) {
    flat_kernel<T, V, Op><<<grid_for(n / V + 1, kThreads), kThreads, 0, stream>>>(pa, pb, po, n, op);
  } else {
    flat_kernel<T, 1, Op><<<grid_for(n, kThreads), kThreads, 0, stream>>>(pa, pb, po, n, op);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int VEC>
void launch_strided(const T* x, const T* s, T* out, int64_t numel, const Geometry& g, bool cl, bool relu) {
  const unsigned int grid = grid_for(numel / VEC, kThreads);
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (cl) {
    if (relu) strided_kernel<T, VEC, true, true><<<grid, kThreads, 0, stream>>>(x, s, out, numel, g);
    else      strided_kernel<T, VEC, true, false><<<grid, kThreads, 0, stream>>>(x, s, out, numel, g);
  } else {
    if (relu) strided_kernel<T, VEC, false, true><<<grid, kThreads, 0, stream>>>(x, s, out, numel, g);
    else      strided_kernel<T, VEC, false, false><<<grid, kThreads, 0, stream>>>(x, s, out, numel, g);
  }
}

bool same_dense_layout(const at::Tensor& a, const at::Tensor& b) {
  return a.sizes() == b.sizes() && a.strides() == b.strides() && a.is_non_overlapping_and_dense();
}

at::Tensor residual_add_cuda(const at::Tensor& x, const at::Tensor& shortcut, int64_t stride, bool relu) {
  CNNKERN_CHECK_CUDA(x, "x");
  CNNKERN_CHECK_CUDA(shortcut, "shortcut");
  TORCH_CHECK(x.dim() == 4 && shortcut.dim() == 4, "cnnkern: residual_add expects 4-D x and shortcut, got x ",
              x.sizes(), " and shortcut ", shortcut.sizes());
  TORCH_CHECK(x.scalar_type() == shortcut.scalar_type(), "cnnkern: residual_add: x has dtype ", x.scalar_type(),
              " but shortcut has dtype ", shortcut.scalar_type());
  TORCH_CHECK(x.device() == shortcut.device(), "cnnkern: residual_add: x is on ", x.device(),
              " but shortcut is on ", shortcut.device());
  TORCH_CHECK(stride >= 1, "cnnkern: residual_add: stride must be >= 1, got ", stride);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Cs = shortcut.size(1), Hs = shortcut.size(2), Ws = shortcut.size(3);
  TORCH_CHECK(shortcut.size(0) == N && Cs <= C && (Hs + stride - 1) / stride == H && (Ws + stride - 1) / stride == W,
              "cnnkern: residual_add: shortcut of shape ", shortcut.sizes(), " does not map onto x of shape ",
              x.sizes(), " with stride ", stride);

  const c10::cuda::CUDAGuard guard(x.device());
  // PyTorch's layout for [relu](x + shortcut): the sum's (x's alone for option A), then the ReLU's
  at::MemoryFormat fmt = shortcut.sizes() == x.sizes() ? elementwise_memory_format(x.sizes(), {x.strides(), shortcut.strides()})
                                                       : elementwise_memory_format(x.sizes(), {x.strides()});
  if (relu) fmt = unary_memory_format(x.sizes(), fmt);
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(fmt));
  const int64_t numel = out.numel();
  if (numel == 0) return out;

  if (stride == 1 && Cs == C && same_dense_layout(x, out) && same_dense_layout(shortcut, out)) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "residual_add_cuda", [&] {
      launch_flat<scalar_t>(x, shortcut, out, AddOp{relu});
    });
    return out;
  }

  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  Geometry g{C, H, W, Cs, {}, {}};
  for (int d = 0; d < 4; ++d) {
    g.sx[d] = x.stride(d);
    g.ss[d] = shortcut.stride(d) * (d >= 2 ? stride : 1);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "residual_add_cuda", [&] {
    constexpr int V = vec16<scalar_t>();
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    const scalar_t* ps = shortcut.const_data_ptr<scalar_t>();
    scalar_t* po = out.mutable_data_ptr<scalar_t>();
    const int inner = cl ? 1 : 3;  // the unit-stride dimension of the output
    bool vec = out.size(inner) % V == 0 && x.stride(inner) == 1 && g.ss[inner] == 1 &&
               aligned16(px) && aligned16(ps) && aligned16(po) && (!cl || Cs % V == 0);
    for (int d = 0; d < 4 && vec; ++d) {  // every other stride keeps vectors aligned
      if (d != inner) vec = x.stride(d) % V == 0 && g.ss[d] % V == 0;
    }
    if (vec) {
      launch_strided<scalar_t, V>(px, ps, po, numel, g, cl, relu);
    } else {
      launch_strided<scalar_t, 1>(px, ps, po, numel, g, cl, relu);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor residual_add_backward_cuda(const at::Tensor& grad_out, const at::Tensor& out) {
  CNNKERN_CHECK_CUDA(grad_out, "grad_out");
  CNNKERN_CHECK_CUDA(out, "out");
  TORCH_CHECK(grad_out.sizes() == out.sizes(), "cnnkern: residual_add_backward: grad_out ", grad_out.sizes(),
              " and out ", out.sizes(), " differ in shape");
  TORCH_CHECK(grad_out.scalar_type() == out.scalar_type(), "cnnkern: residual_add_backward: grad_out has dtype ",
              grad_out.scalar_type(), " but out has dtype ", out.scalar_type());
  const c10::cuda::CUDAGuard guard(out.device());
  const at::MemoryFormat fmt = output_memory_format(out);
  // The flat kernel needs all three tensors in one dense layout; anything else (an expanded or
  // sliced gradient, a layout mismatch) is copied into that layout first, never read wrongly.
  const at::Tensor o = out.contiguous(fmt);
  const at::Tensor g = same_dense_layout(grad_out, o) ? grad_out : grad_out.contiguous(fmt);
  at::Tensor gx = at::empty(o.sizes(), o.options().memory_format(fmt));
  if (gx.numel() == 0) return gx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, o.scalar_type(), "residual_add_backward_cuda", [&] {
    launch_flat<scalar_t>(g, o, gx, ReluGradOp{});
  });
  return gx;
}

at::Tensor residual_add_shortcut_backward_cuda(const at::Tensor& grad, at::IntArrayRef shortcut_size, int64_t stride,
                                               bool channels_last) {
  CNNKERN_CHECK_CUDA(grad, "grad");
  TORCH_CHECK(grad.dim() == 4 && shortcut_size.size() == 4, "cnnkern: residual_add_shortcut_backward expects a 4-D grad "
              "and a 4-element shortcut_size, got ", grad.sizes(), " and ", shortcut_size);
  TORCH_CHECK(stride >= 1, "cnnkern: residual_add_shortcut_backward: stride must be >= 1, got ", stride);
  const int64_t Cs = shortcut_size[1], Hs = shortcut_size[2], Ws = shortcut_size[3];
  TORCH_CHECK(shortcut_size[0] == grad.size(0) && Cs <= grad.size(1) && (Hs + stride - 1) / stride == grad.size(2) &&
              (Ws + stride - 1) / stride == grad.size(3),
              "cnnkern: residual_add_shortcut_backward: shortcut_size ", shortcut_size, " does not map onto grad ",
              grad.sizes(), " with stride ", stride);
  const c10::cuda::CUDAGuard guard(grad.device());
  const at::MemoryFormat fmt = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor gs = at::empty(shortcut_size, grad.options().memory_format(fmt));
  const int64_t numel = gs.numel();
  if (numel == 0) return gs;
  Geometry g{Cs, Hs, Ws, Cs, {grad.stride(0), grad.stride(1), grad.stride(2), grad.stride(3)}, {}};
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "residual_add_shortcut_backward_cuda", [&] {
    const scalar_t* pg = grad.const_data_ptr<scalar_t>();
    scalar_t* ps = gs.mutable_data_ptr<scalar_t>();
    if (channels_last) {
      shortcut_backward_kernel<scalar_t, true><<<grid_for(numel, kThreads), kThreads, 0, stream>>>(pg, ps, numel, g, stride);
    } else {
      shortcut_backward_kernel<scalar_t, false><<<grid_for(numel, kThreads), kThreads, 0, stream>>>(pg, ps, numel, g, stride);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return gs;
}

}  // namespace
}  // namespace cnnkern

TORCH_LIBRARY_IMPL(cnnkern, CUDA, m) {
  m.impl("residual_add_cuda", &cnnkern::residual_add_cuda);
  m.impl("residual_add_backward_cuda", &cnnkern::residual_add_backward_cuda);
  m.impl("residual_add_shortcut_backward_cuda", &cnnkern::residual_add_shortcut_backward_cuda);
}
