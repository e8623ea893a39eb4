// 2-D convolution, CUDA C++: the host side of the three ops (forward, grad-input, grad-weight).
// The kernels are in conv2d_direct.cu, conv2d_igemm.cu and conv2d_wgrad.cu (see conv2d.h).
//
// Each op writes into an output the Python side allocated (cnnkern/ops/conv2d.py: its memory
// format follows PyTorch's conv rule, and the test harness poisons it), so the ops return nothing.
// `algo` picks the forward / grad-input kernel: "auto" (the implicit GEMM on tensor cores where it
// applies: wgmma on sm_90, else mma.sync; else the direct kernel), "direct", "igemm" (mma.sync)
// or "wgmma" (an error where it does not apply): the GPU tests pin each one.
//
// The implicit GEMM applies to fp16/bf16 when the reduced channels per group (C/groups forward,
// K/groups for grad-input) are a multiple of 8, so that 16-byte chunks never straddle a filter
// tap; its source is read as NHWC (a channels_last input is used as it is, anything else is
// converted first) and its filter is repacked, tap-major, into a small contiguous copy.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <type_traits>
#include <vector>

#include "common.h"
#include "conv2d.h"

namespace cnnkern {
namespace {

using conv::DirectParams;
using conv::IgemmParams;
using conv::WgradParams;

constexpr int64_t kMaxRows = (int64_t{1} << 31) - 1;
constexpr size_t kDirectBudget = 48 * 1024;   // staging bytes per block, normally
constexpr size_t kDirectMax = 99 * 1024;      // what every sm_80+ part can opt into

struct ConvGeom {
  int64_t N, C, H, W, K, Cg, Kg, R, S, P, Q, G;
  int sh, sw, ph, pw, dh, dw;
};

ConvGeom geometry(const char* op, const at::Tensor& x, const at::Tensor& w, const at::Tensor& y,
                  at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                  bool y_is_input) {
  TORCH_CHECK(x.dim() == 4 && w.dim() == 4 && y.dim() == 4, "cnnkern ", op, ": expects 4-D tensors, got ", x.sizes(),
              ", ", w.sizes(), ", ", y.sizes());
  TORCH_CHECK(stride.size() == 2 && padding.size() >= 2 && dilation.size() == 2, "cnnkern ", op,
              ": stride, padding, dilation must have 2 entries");
  TORCH_CHECK(groups >= 1, "cnnkern ", op, ": groups must be >= 1, got ", groups);
  ConvGeom g{};
  g.N = x.size(0);
  g.C = x.size(1);
  g.H = x.size(2);
  g.W = x.size(3);
  g.K = w.size(0);
  g.Cg = w.size(1);
  g.R = w.size(2);
  g.S = w.size(3);
  g.G = groups;
  TORCH_CHECK(g.C == g.Cg * groups && g.K % groups == 0, "cnnkern ", op, ": input channels ", g.C, " and weight ",
              w.sizes(), " do not fit groups=", groups);
  g.Kg = g.K / groups;
  g.sh = static_cast<int>(stride[0]);
  g.sw = static_cast<int>(stride[1]);
  g.ph = static_cast<int>(padding[0]);
  g.pw = static_cast<int>(padding[1]);
  g.dh = static_cast<int>(dilation[0]);
  g.dw = static_cast<int>(dilation[1]);
  TORCH_CHECK(g.sh >= 1 && g.sw >= 1 && g.dh >= 1 && g.dw >= 1 && g.ph >= 0 && g.pw >= 0, "cnnkern ", op,
              ": bad stride/dilation/padding ", stride, " ", dilation, " ", padding);
  g.P = y.size(2);
  g.Q = y.size(3);
  // (the output extent itself comes from the Python side, which also handles asymmetric "same"
  // padding; every read below is bounds-checked against H and W whatever P and Q are)
  TORCH_CHECK(y.size(0) == g.N && y.size(1) == g.K,
              "cnnkern ", op, ": ", (y_is_input ? "grad_output " : "output "), y.sizes(), " does not match input ",
              x.sizes(), " and weight ", w.sizes());
  for (int64_t v : {g.N, g.C, g.H, g.W, g.K, g.R, g.S, g.P, g.Q}) {
    TORCH_CHECK(v < kMaxRows, "cnnkern ", op, ": extent ", v, " too large");
  }
  return g;
}

void check_same(const char* op, const at::Tensor& ref, const at::Tensor& t, const char* name) {
  CNNKERN_CHECK_CUDA(t, name);
  TORCH_CHECK(t.device() == ref.device(), "cnnkern ", op, ": ", name, " is on ", t.device(), ", expected ",
              ref.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "cnnkern ", op, ": ", name, " has dtype ", t.scalar_type(),
              ", expected ", ref.scalar_type());
}

// dtypes the implicit GEMM is compiled for (fp32 runs on it only as TF32)
template <typename T>
constexpr bool kTensorCore = std::is_same_v<T, at::Half> || std::is_same_v<T, at::BFloat16> || std::is_same_v<T, float>;

// Which kernel runs. The implicit GEMM applies to fp16/bf16, or fp32 when TF32 is allowed, with
// row indices within int32; channels per group that are not a multiple of one 16-byte chunk (8
// halves, 4 floats) run on zero-padded copies (padded_channels). "auto" takes it where it
// applies, on wgmma (an sm_90 GPU with the sm_90a build) or else on mma.sync, except for a
// grouped layer that would need the padding (a depthwise-like layer would multiply its work by up
// to 8 and fill one column of a 64-wide tile); the direct kernel runs everything else.
// "direct", "igemm" (mma.sync) and "wgmma" pin one kernel and are errors where it does not apply.
enum class Algo { Direct, Igemm, Wgmma };

void check_algo_name(const char* op, const std::string& algo) {
  TORCH_CHECK(algo == "auto" || algo == "direct" || algo == "igemm" || algo == "wgmma", "cnnkern ", op,
              ": algo must be 'auto', 'direct', 'igemm' or 'wgmma', got '", algo, "'");
}

// algo='wgmma' pinned: an error unless the wgmma kernels can run here
void require_wgmma(const char* op) {
  TORCH_CHECK(conv::wgmma_available(), "cnnkern ", op, ": algo='wgmma' needs a compute capability 9.0 GPU and ",
              "cnnkern._C built with sm_90a code");
}

// elements per 16-byte chunk, and whether the tensor cores take dtype T (fp32: only as TF32)
template <typename T>
constexpr int64_t kChunk = 16 / static_cast<int64_t>(sizeof(T));
template <typename T>
bool tensor_core_dtype(bool tf32) {
  return kTensorCore<T> && (!std::is_same_v<T, float> || tf32);
}

template <typename T>
Algo choose_algo(const char* op, const std::string& algo, bool tf32, bool aligned, int64_t groups, int64_t rows) {
  check_algo_name(op, algo);
  if (algo == "direct") return Algo::Direct;
  const bool fits = tensor_core_dtype<T>(tf32) && rows <= kMaxRows;
  if (algo == "igemm" || algo == "wgmma") {
    TORCH_CHECK(fits, "cnnkern ", op, ": algo='", algo, "' needs fp16/bf16 (or fp32 with tf32=True) ",
                "and fewer than 2^31 output rows (got ", rows, ")");
  }
  if (algo == "wgmma") {
    require_wgmma(op);
    return Algo::Wgmma;
  }
  if (algo == "igemm") return Algo::Igemm;  // (a grouped layer off whole chunks too: zero-padded)
  if (!fits || (!aligned && groups > 1)) return Algo::Direct;
  return conv::wgmma_available() ? Algo::Wgmma : Algo::Igemm;
}

// 128x128 tiles when they fill the GPU, 64-row tiles when they would not, 64-column tiles for
// narrow outputs (K/groups <= 64), which would leave half of a 128-column tile idle. `pinned`
// (the ops' tile argument): -1 = that choice, 0 = 128x128, 1 = 64x128, 2 = 128x64 (rows x
// columns) for every launch of the call (the Python side's tuner times each).
int igemm_tile(int64_t rows, int64_t cols, int64_t groups, int64_t pinned) {
  if (pinned >= 0) return static_cast<int>(pinned);
  if (cols <= 64) return 2;
  const int64_t blocks = ((rows + 127) / 128) * ((cols + 127) / 128) * groups;
  return blocks < sm_count() ? 1 : 0;
}

// The tile argument: -1, 0, 1 or 2 (checked before anything else) ...
void check_tile_range(const char* op, int64_t tile) {
  TORCH_CHECK(tile >= -1 && tile <= 2, "cnnkern ", op, ": tile must be -1 (chosen by the layer's size), ",
              "0 (128x128), 1 (64x128) or 2 (128x64), got ", tile);
}

// ... and pinned only for a call that runs a tensor-core kernel (checked once the kernel is chosen).
void check_tile_kernel(const char* op, int64_t tile, Algo kernel) {
  TORCH_CHECK(tile == -1 || kernel != Algo::Direct, "cnnkern ", op, ": tile=", tile, " pins a tile of the ",
              "tensor-core kernels, but this call runs the direct kernel (algo='igemm' or 'wgmma' selects them)");
}

// cp.async moves 16-byte chunks: a view whose data does not start on 16 bytes (an odd storage
// offset) is copied to fresh, aligned memory first.
at::Tensor aligned_copy(const at::Tensor& t) {
  return aligned16(t.const_data_ptr()) ? t : t.clone(t.suggest_memory_format());
}

// Channels per group rounded up to a whole number of 16-byte chunks. The tensor-core kernels
// read channels in such chunks, so a layer whose channels per group are not a multiple of one
// (the 3-channel first layers, 17 or 19 channels) runs on copies whose extra channels are zero:
// a zero channel adds exactly 0 to every product, so the result is the same, for the price of
// ceil(c / chunk) * chunk / c times the multiply-adds (3 -> 8 channels in fp16/bf16, 3 -> 4 in
// TF32).
template <typename T>
int64_t padded_channels(int64_t c) {
  return (c + kChunk<T> - 1) / kChunk<T> * kChunk<T>;
}

// `t` (N x (G*c) x H x W, any strides) as an aligned channels_last tensor with `cp` >= c channels
// per group, the last cp - c of each group zero (one pass when cp == c and t is channels_last
// already: none).
at::Tensor pad_channels_last(const at::Tensor& t, int64_t groups, int64_t cp) {
  const int64_t c = t.size(1) / groups;
  if (cp == c) return aligned_copy(t.contiguous(at::MemoryFormat::ChannelsLast));
  at::Tensor out = at::empty({t.size(0), groups * cp, t.size(2), t.size(3)},
                             t.options().memory_format(at::MemoryFormat::ChannelsLast));
  at::Tensor per_group = out.unflatten(1, {groups, cp});  // a view: N x G x cp x H x W
  per_group.narrow(2, 0, c).copy_(t.unflatten(1, {groups, c}));
  per_group.narrow(2, c, cp - c).zero_();
  return out;
}

// A filter (G*k) x c x R x S with its output channels (dim 0, per group) or input channels
// (dim 1) zero-padded to kp, cp: contiguous, aligned.
at::Tensor pad_filter(const at::Tensor& w, int64_t groups, int64_t kp, int64_t cp) {
  const int64_t k = w.size(0) / groups, c = w.size(1);
  if (kp == k && cp == c) return w;
  at::Tensor out = at::zeros({groups, kp, cp, w.size(2), w.size(3)}, w.options().memory_format(at::MemoryFormat::Contiguous));
  out.narrow(1, 0, k).narrow(2, 0, c).copy_(w.unflatten(0, {groups, k}));
  return out.view({groups * kp, cp, w.size(2), w.size(3)});
}

// Split-K of the implicit GEMM (split_k: 0 = choose, 1 = none, n = n splits, fewer where the
// reduction has fewer 128-byte steps). A GEMM whose tiles fill less than half of the GPU's SMs
// (a small image or batch 1: ResNet-50's last stage at batch 1 has 4 tiles for 132 SMs, each
// reducing over 4,608 values) splits its reduction into up to 32 slices of at least four
// 128-byte steps each, until the blocks fill the SMs once: the partial sums go to an fp32
// workspace and a second kernel adds them in a fixed order (so the result is the same on every
// run), applies bias, residual and ReLU, and takes the BatchNorm statistics from the sums per
// row block of the unsplit tile.
int choose_splits(const char* op, int64_t split_k, int64_t tiles, int64_t kk_steps, int64_t groups) {
  TORCH_CHECK(split_k >= 0, "cnnkern ", op, ": split_k must be >= 0 (0: choose), got ", split_k);
  int64_t splits = split_k;
  if (split_k == 0) {
    const int64_t sms = sm_count();
    splits = 2 * tiles > sms ? 1 : std::min<int64_t>({sms / tiles, kk_steps / 4, 32});
  }
  splits = std::max<int64_t>(1, std::min<int64_t>({splits, kk_steps, 65535 / groups}));
  // slices of whole steps; the last split takes the rest (none is empty)
  const int64_t per = (kk_steps + splits - 1) / splits;
  return static_cast<int>((kk_steps + per - 1) / per);
}

// The implicit GEMM on the chosen tensor-core kernel (both take the same parameters and tiles),
// split as choose_splits says; `like`: a tensor on the device (the workspace's options).
template <typename T>
void launch_tensor_core(IgemmParams<T> p, Algo kernel, bool dgrad, int tile, int64_t split_k,
                        const at::Tensor& like, const char* op, cudaStream_t stream) {
  constexpr int64_t step = 128 / sizeof(T);  // elements of kk per 128 bytes: a whole step of either kernel
  const int64_t kk_steps = (p.KK + step - 1) / step;
  const int64_t bm = conv::igemm_tile_rows(tile), bn = tile == 2 ? 64 : 128;
  const int64_t tiles = ((p.M + bm - 1) / bm) * ((p.NO + bn - 1) / bn) * p.G;
  p.splits = choose_splits(op, split_k, tiles, kk_steps, p.G);
  at::Tensor part;  // (freed after the launches: the allocator orders its reuse after them)
  if (p.splits > 1) {
    p.kk_split = static_cast<int>((kk_steps + p.splits - 1) / p.splits * step);
    p.part_ld = (p.NO + 1) / 2 * 2;
    part = at::empty({static_cast<int64_t>(p.splits) * p.G * p.M * p.part_ld}, like.options().dtype(at::kFloat));
    p.part = part.mutable_data_ptr<float>();
  }
  if (kernel == Algo::Wgmma) {
    conv::launch_wgmma<T>(p, dgrad, tile, stream);
  } else {
    conv::launch_igemm<T>(p, dgrad, tile, stream);
  }
  if (p.splits > 1) conv::launch_igemm_reduce<T>(p, tile, stream);
}

template <typename T>
void run_direct(DirectParams<T> p, int halo_h, int halo_w, int64_t channels, cudaStream_t stream) {
  const size_t per_channel = conv::direct_bytes_per_channel<T>(halo_h, halo_w, p.R, p.S);
  TORCH_CHECK(per_channel <= kDirectMax, "cnnkern conv2d (cuda, direct): a ", p.R, "x", p.S,
              " filter with this stride/dilation needs ", per_channel, " bytes of shared memory per channel (max ",
              kDirectMax, ")");
  p.halo_h = halo_h;
  p.halo_w = halo_w;
  p.cb = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(channels, kDirectBudget / per_channel)));
  conv::launch_direct<T>(p, stream);
}

// The implicit GEMM's parameters for source `src` (logical N x Cs x Hs x Ws, NHWC in memory) and
// output `out` (logical N x (G*NO) x Ho x Wo, any strides); the filter geometry and the
// convolution's stride/padding/dilation come from `g` (the forward convolution's, also for the
// grad-input gather); `res`: a residual with out's strides (forward only), or nullptr.
template <typename T>
IgemmParams<T> igemm_params(const at::Tensor& src, const at::Tensor& wp, const T* bias, const at::Tensor& out,
                            const ConvGeom& g, bool relu, const T* res = nullptr) {
  IgemmParams<T> p{};
  p.src = src.const_data_ptr<T>();
  p.Cs = static_cast<int>(src.size(1));
  p.Hs = static_cast<int>(src.size(2));
  p.Ws = static_cast<int>(src.size(3));
  p.wp = wp.const_data_ptr<T>();
  p.bias = bias;
  p.y = out.mutable_data_ptr<T>();
  p.yn = out.stride(0), p.yc = out.stride(1), p.yh = out.stride(2), p.yw = out.stride(3);
  p.Nimg = static_cast<int>(out.size(0));
  p.Ho = static_cast<int>(out.size(2));
  p.Wo = static_cast<int>(out.size(3));
  p.M = static_cast<int>(out.size(0) * out.size(2) * out.size(3));
  p.G = static_cast<int>(g.G);
  p.NO = static_cast<int>(out.size(1) / g.G);
  p.CK = static_cast<int>(src.size(1) / g.G);
  p.R = static_cast<int>(g.R);
  p.S = static_cast<int>(g.S);
  p.KK = p.R * p.S * p.CK;
  p.sh = g.sh, p.sw = g.sw, p.ph = g.ph, p.pw = g.pw, p.dh = g.dh, p.dw = g.dw;
  p.relu = relu;
  constexpr int64_t epc = 16 / sizeof(T);  // elements per 16-byte chunk
  p.res = res;  // (y's strides)
  p.vec_store = p.yc == 1 && p.yn % epc == 0 && p.yh % epc == 0 && p.yw % epc == 0 && p.NO % epc == 0 &&
                aligned16(p.y) && (res == nullptr || aligned16(res));
  return p;
}

// The direct kernel's source, output and extents (src: N x (G*IC) x Hs x Ws, out: N x (G*OC) x P x Q,
// any strides); the caller sets the filter addressing, upsampling and convolution geometry.
template <typename T>
DirectParams<T> direct_params(const at::Tensor& src, const at::Tensor& out, const ConvGeom& g) {
  DirectParams<T> p{};
  p.src = src.const_data_ptr<T>();
  p.sn = src.stride(0), p.sc = src.stride(1), p.sh_ = src.stride(2), p.sw_ = src.stride(3);
  p.Hs = static_cast<int>(src.size(2));
  p.Ws = static_cast<int>(src.size(3));
  p.y = out.mutable_data_ptr<T>();
  p.yn = out.stride(0), p.yc = out.stride(1), p.yh = out.stride(2), p.yw = out.stride(3);
  p.N = static_cast<int>(out.size(0));
  p.G = static_cast<int>(g.G);
  p.OC = static_cast<int>(out.size(1) / g.G);
  p.IC = static_cast<int>(src.size(1) / g.G);
  p.P = static_cast<int>(out.size(2));
  p.Q = static_cast<int>(out.size(3));
  p.R = static_cast<int>(g.R);
  p.S = static_cast<int>(g.S);
  p.dh = g.dh, p.dw = g.dw;
  return p;
}

// ------------------------------------------------------------------------------------------------
// forward
// ------------------------------------------------------------------------------------------------
// Returns the BatchNorm statistics workspace when `stats` (rows, 3, K) of per-block (count, mean,
// M2), accumulator dtype, rows that no block wrote hold count 0; an empty tensor otherwise.
at::Tensor conv2d_forward_cuda(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                               const at::Tensor& y, at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation, int64_t groups, bool relu, c10::string_view algo_sv,
                               bool stats, bool tf32, const std::optional<at::Tensor>& residual,
                               int64_t split_k, int64_t tile_arg) {
  const char* op = "conv2d (cuda)";
  const std::string algo(algo_sv.data(), algo_sv.size());
  check_tile_range(op, tile_arg);
  CNNKERN_CHECK_CUDA(x, "input");
  check_same(op, x, w, "weight");
  check_same(op, x, y, "output");
  if (residual.has_value()) {  // read through y's strides
    check_same(op, x, *residual, "residual");
    TORCH_CHECK(residual->sizes() == y.sizes() && residual->strides() == y.strides(), "cnnkern ", op, ": residual ",
                residual->sizes(), " with strides ", residual->strides(), " must have the output's shape ", y.sizes(),
                " and strides ", y.strides());
    TORCH_CHECK(!stats, "cnnkern ", op, ": statistics are taken before the residual is added: pass one or the other");
  }
  if (bias.has_value()) {
    check_same(op, x, *bias, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == w.size(0), "cnnkern ", op, ": bias ", bias->sizes(),
                " does not match ", w.size(0), " output channels");
  }
  const ConvGeom g = geometry(op, x, w, y, stride, padding, dilation, groups, false);
  TORCH_CHECK(!(stats && relu), "cnnkern ", op, ": statistics are taken before the activation: relu must be off");
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor st = at::empty({0}, x.options().dtype(acc_type));
  if (y.numel() == 0) return st;
  const c10::cuda::CUDAGuard guard(x.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const int64_t rows = g.N * g.P * g.Q;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "conv2d_forward_cuda", [&] {
    const scalar_t* pb = b.defined() ? b.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* pr = residual.has_value() ? residual->const_data_ptr<scalar_t>() : nullptr;
    const int64_t cp = padded_channels<scalar_t>(g.Cg);
    const Algo kernel = choose_algo<scalar_t>(op, algo, tf32, cp == g.Cg, g.G, rows);
    check_tile_kernel(op, tile_arg, kernel);
    if (kernel != Algo::Direct) {
      if constexpr (kTensorCore<scalar_t>) {
        const at::Tensor xs = pad_channels_last(x, g.G, cp);
        const at::Tensor wp = aligned_copy(pad_filter(w, g.G, g.Kg, cp).permute({0, 2, 3, 1}).contiguous());  // [K][R][S][cp]
        IgemmParams<scalar_t> p = igemm_params<scalar_t>(xs, wp, pb, y, g, relu, pr);
        const int tile = igemm_tile(rows, g.Kg, g.G, tile_arg);
        if (stats) {
          const int bm = conv::igemm_tile_rows(tile);
          st = at::zeros({(rows + bm - 1) / bm, 3, g.K}, x.options().dtype(acc_type));
          p.stats = st.mutable_data_ptr<float>();
        }
        launch_tensor_core<scalar_t>(p, kernel, false, tile, split_k, x, op, stream);
        return;
      }
    }
    DirectParams<scalar_t> p = direct_params<scalar_t>(x, y, g);
    p.uh = p.uw = 1;
    p.w = w.const_data_ptr<scalar_t>();  // filter (g, o, i, r, s) = w[g*Kg + o][i][r][s]
    p.wg = g.Kg * w.stride(0), p.wo = w.stride(0), p.wi = w.stride(1), p.wr = w.stride(2), p.ws = w.stride(3);
    p.bias = pb;
    p.res = pr;
    p.sh = g.sh, p.sw = g.sw, p.ph = g.ph, p.pw = g.pw;
    p.relu = relu;
    if (stats) {
      const int64_t blocks = g.N * ((g.P + conv::kDirectBP - 1) / conv::kDirectBP) *
                             ((g.Q + conv::kDirectBQ - 1) / conv::kDirectBQ);
      st = at::zeros({blocks, 3, g.K}, x.options().dtype(acc_type));
      p.stats = st.mutable_data_ptr<at::opmath_type<scalar_t>>();
    }
    run_direct<scalar_t>(p, (conv::kDirectBP - 1) * g.sh + (g.R - 1) * g.dh + 1,
                         (conv::kDirectBQ - 1) * g.sw + (g.S - 1) * g.dw + 1, g.Cg, stream);
  });
  return st;
}

// ------------------------------------------------------------------------------------------------
// grad-input
// ------------------------------------------------------------------------------------------------
// The implicit GEMM's grad-input of a strided convolution, phase by phase: the input pixels
// (h, w) with h % sh = a and w % sw = b receive gradient only through the filter taps r with
// (a + ph - r) % sh = 0 (r = r0, r0 + sh, ...) and likewise s, so each phase is a stride-1
// grad-input over those taps (c_h = (a + ph - r0) / sh: the shift of tap i = (r - r0) / sh,
// hs = hq + c_h - i for phase row hq = (h - a) / sh) written into the strided view
// gx[:, :, a::sh, b::sw]; a phase that no tap reaches is zero. One phase of the whole geometry
// when the stride is 1 or the dilation is not (then the kernel skips the taps between strides).
struct DgradPhase {
  int64_t a, b, r0, s0;  // the phase's first pixel and first taps
  int64_t step_h, step_w;  // of its pixels and taps: the stride, or 1 for the one whole phase
  ConvGeom g;  // the phase's geometry: H, W, R, S its own, stride 1, padding (c_h, c_w)
};

std::vector<DgradPhase> dgrad_phases(const ConvGeom& g) {
  if ((g.sh == 1 && g.sw == 1) || g.dh != 1 || g.dw != 1) return {DgradPhase{0, 0, 0, 0, 1, 1, g}};
  std::vector<DgradPhase> phases;
  for (int64_t a = 0; a < std::min<int64_t>(g.sh, g.H); ++a) {
    for (int64_t b = 0; b < std::min<int64_t>(g.sw, g.W); ++b) {
      DgradPhase ph{a, b, (a + g.ph) % g.sh, (b + g.pw) % g.sw, g.sh, g.sw, g};
      ph.g.H = (g.H - a + g.sh - 1) / g.sh;
      ph.g.W = (g.W - b + g.sw - 1) / g.sw;
      ph.g.R = ph.r0 < g.R ? (g.R - ph.r0 + g.sh - 1) / g.sh : 0;
      ph.g.S = ph.s0 < g.S ? (g.S - ph.s0 + g.sw - 1) / g.sw : 0;
      ph.g.ph = static_cast<int>((a + g.ph - ph.r0) / g.sh);
      ph.g.pw = static_cast<int>((b + g.pw - ph.s0) / g.sw);
      ph.g.sh = ph.g.sw = 1;
      phases.push_back(ph);
    }
  }
  return phases;
}

void conv2d_backward_input_cuda(const at::Tensor& grad, const at::Tensor& w, const at::Tensor& gx,
                                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                int64_t groups, c10::string_view algo_sv, bool tf32, int64_t split_k,
                                int64_t tile_arg) {
  const char* op = "conv2d_backward_input (cuda)";
  const std::string algo(algo_sv.data(), algo_sv.size());
  check_tile_range(op, tile_arg);
  CNNKERN_CHECK_CUDA(grad, "grad_output");
  check_same(op, grad, w, "weight");
  check_same(op, grad, gx, "grad_input");
  const ConvGeom g = geometry(op, gx, w, grad, stride, padding, dilation, groups, true);
  if (gx.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(grad.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t rows = g.N * g.H * g.W;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "conv2d_backward_input_cuda", [&] {
    const int64_t kp = padded_channels<scalar_t>(g.Kg);
    const Algo kernel = choose_algo<scalar_t>(op, algo, tf32, kp == g.Kg, g.G, rows);
    check_tile_kernel(op, tile_arg, kernel);
    if (kernel != Algo::Direct) {
      if constexpr (kTensorCore<scalar_t>) {
        const at::Tensor gs = pad_channels_last(grad, g.G, kp);
        const at::Tensor wk = pad_filter(w, g.G, kp, g.Cg);  // the reduced channels padded as grad's
        // wp[g*Cg + c][(r*S + s)*kp + k] = wt[g*kp + k][c][r][s] (wt: the filter or a tap subset)
        auto pack = [&](const at::Tensor& wt) {
          return aligned_copy(wt.reshape({g.G, kp, g.Cg, wt.size(2), wt.size(3)})
                                  .permute({0, 2, 3, 4, 1}).contiguous().view({g.G * g.Cg, -1}));
        };
        for (const DgradPhase& ph : dgrad_phases(g)) {
          at::Tensor out = gx.slice(2, ph.a, g.H, ph.step_h).slice(3, ph.b, g.W, ph.step_w);
          if (ph.g.R == 0 || ph.g.S == 0) {  // no filter tap reaches these pixels: their gradient is zero
            out.zero_();
            continue;
          }
          const at::Tensor wt = wk.slice(2, ph.r0, g.R, ph.step_h).slice(3, ph.s0, g.S, ph.step_w);
          const at::Tensor wp = pack(wt);  // (freed after the launch: the allocator orders its reuse after the kernel)
          const IgemmParams<scalar_t> p = igemm_params<scalar_t>(gs, wp, nullptr, out, ph.g, false);
          launch_tensor_core<scalar_t>(p, kernel, true, igemm_tile(p.M, g.Cg, g.G, tile_arg), split_k, grad, op,
                                       stream);
        }
        return;
      }
    }
    // grad_input = conv(grad_output upsampled by the stride, flipped filter with in/out swapped,
    // stride 1, padding d*(R-1) - p): the flip and swap are done with the filter's strides.
    DirectParams<scalar_t> p = direct_params<scalar_t>(grad, gx, g);
    p.uh = g.sh, p.uw = g.sw;
    // filter (g, o=c, i=k, r, s) = w[g*Kg + k][c][R-1-r][S-1-s]
    p.w = w.const_data_ptr<scalar_t>() + (g.R - 1) * w.stride(2) + (g.S - 1) * w.stride(3);
    p.wg = g.Kg * w.stride(0), p.wo = w.stride(1), p.wi = w.stride(0), p.wr = -w.stride(2), p.ws = -w.stride(3);
    p.sh = 1, p.sw = 1;
    p.ph = static_cast<int>(g.dh * (g.R - 1) - g.ph);
    p.pw = static_cast<int>(g.dw * (g.S - 1) - g.pw);
    run_direct<scalar_t>(p, (conv::kDirectBP - 1) + (g.R - 1) * g.dh + 1, (conv::kDirectBQ - 1) + (g.S - 1) * g.dw + 1,
                         g.Kg, stream);
  });
}

// ------------------------------------------------------------------------------------------------
// grad-weight (+ grad-bias when grad_bias has elements)
// ------------------------------------------------------------------------------------------------
// The grad-weight partials: on the tensor cores where the host chose them (wgmma: 16-bit types;
// mma.sync: those and fp32 as TF32), else on the SIMT kernel.
template <typename T, typename A>
void run_wgrad(const WgradParams<T, A>& p, Algo kernel, cudaStream_t stream) {
  constexpr bool k16 = std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>;
  if constexpr (std::is_same_v<A, float> && k16) {
    if (kernel == Algo::Wgmma) {
      conv::launch_wgrad_wgmma<T>(p, stream);
      return;
    }
  }
  if constexpr (std::is_same_v<A, float> && (k16 || std::is_same_v<T, float>)) {
    if (kernel == Algo::Igemm) {
      conv::launch_wgrad_igemm<T>(p, stream);
      return;
    }
  }
  conv::launch_wgrad<T, A>(p, stream);
}

// The grad-weight kernel: the tensor cores take fp16/bf16, or fp32 when TF32 is allowed (mma.sync
// only: wgmma has no transposed tf32 operands, and both operands of the grad-weight are read
// transposed), with channels per group zero-padded to whole 16-byte chunks where they are not
// (as the forward pads them: not under "auto" for a grouped layer); "auto" takes wgmma for
// 16-bit types on an sm_90 GPU (with the sm_90a build), mma.sync otherwise, and the SIMT kernel
// for everything else; "direct", "igemm" and "wgmma" pin one and are errors where it does not
// apply.
Algo choose_wgrad(const char* op, const std::string& algo, bool dtype_ok, bool aligned, int64_t groups, bool tf32) {
  check_algo_name(op, algo);
  if (algo == "direct") return Algo::Direct;
  if (algo != "auto") {
    TORCH_CHECK(dtype_ok, "cnnkern ", op, ": algo='", algo, "' (the tensor-core grad-weight) needs fp16/bf16 inputs ",
                "(or fp32 with tf32=True)");
  }
  if (algo == "wgmma") {
    TORCH_CHECK(!tf32, "cnnkern ", op, ": algo='wgmma' has no TF32 grad-weight (wgmma reads tf32 operands only ",
                "K-major); algo='igemm' runs it on mma.sync");
    require_wgmma(op);
    return Algo::Wgmma;
  }
  if (!dtype_ok || (algo == "auto" && !aligned && groups > 1)) return Algo::Direct;
  if (algo == "auto" && !tf32 && conv::wgmma_available()) return Algo::Wgmma;
  return Algo::Igemm;
}

// How a grad-weight call runs: the kernel, the channels per group it reads (zero-padded to whole
// 16-byte chunks for the tensor cores where they are not), and the split of the N*P*Q pixels of
// its reduction. splits: 0 = chosen (enough blocks for about two waves, at least 256 pixels per
// split), n = n splits; either way at most one per pixel and 65535 / groups, in equal chunks of
// whole pixels (the last takes the rest; none is empty).
struct WgradPlan {
  Algo kernel;
  int64_t kp, cp, J, splits, chunk;
};

void check_wgrad_splits(const char* op, int64_t splits) {
  TORCH_CHECK(splits >= 0, "cnnkern ", op, ": splits must be >= 0 (0: choose), got ", splits);
}

template <typename scalar_t>
WgradPlan plan_wgrad(const char* op, const std::string& algo, bool tf32, const ConvGeom& g, int64_t L, int64_t splits) {
  const bool use_tf32 = std::is_same_v<scalar_t, float> && tf32;
  WgradPlan w{};
  w.kp = padded_channels<scalar_t>(g.Kg), w.cp = padded_channels<scalar_t>(g.Cg);
  w.kernel = choose_wgrad(op, algo, tensor_core_dtype<scalar_t>(tf32), w.kp == g.Kg && w.cp == g.Cg, g.G, use_tf32);
  if (w.kernel == Algo::Direct) w.kp = g.Kg, w.cp = g.Cg;
  w.J = w.cp * g.R * g.S;
  const int64_t tm = w.kernel == Algo::Wgmma   ? conv::wgrad_wgmma_tile_rows()
                     : w.kernel == Algo::Igemm ? conv::wgrad_igemm_tile_rows()
                                               : 64;
  const int64_t tn = w.kernel == Algo::Wgmma   ? conv::wgrad_wgmma_tile_cols()
                     : w.kernel == Algo::Igemm ? conv::wgrad_igemm_tile_cols()
                                               : 64;
  if (splits == 0) {
    const int64_t tiles = ((w.kp + tm - 1) / tm) * ((w.J + tn - 1) / tn) * g.G;
    splits = std::min<int64_t>((2 * sm_count() + tiles - 1) / tiles, (L + 255) / 256);
  }
  splits = std::max<int64_t>(1, std::min<int64_t>({splits, L, 65535 / g.G}));
  w.chunk = (L + splits - 1) / splits;
  w.splits = (L + w.chunk - 1) / w.chunk;
  return w;
}

void conv2d_backward_weight_cuda(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& gw,
                                 const at::Tensor& gb, at::IntArrayRef stride, at::IntArrayRef padding,
                                 at::IntArrayRef dilation, int64_t groups, c10::string_view algo_sv, bool tf32,
                                 int64_t splits_arg) {
  const char* op = "conv2d_backward_weight (cuda)";
  const std::string algo(algo_sv.data(), algo_sv.size());
  check_wgrad_splits(op, splits_arg);
  CNNKERN_CHECK_CUDA(grad, "grad_output");
  check_same(op, grad, x, "input");
  check_same(op, grad, gw, "grad_weight");
  const bool want_bias = gb.numel() > 0;
  if (want_bias) {
    check_same(op, grad, gb, "grad_bias");
    TORCH_CHECK(gb.dim() == 1 && gb.size(0) == gw.size(0) && gb.is_contiguous(), "cnnkern ", op, ": grad_bias ",
                gb.sizes(), " must be a contiguous vector of ", gw.size(0));
  }
  const ConvGeom g = geometry(op, x, gw, grad, stride, padding, dilation, groups, true);
  if (gw.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(grad.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t L = g.N * g.P * g.Q;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "conv2d_backward_weight_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    const auto acc_opts = grad.options().dtype(c10::CppTypeToScalarType<A>::value);
    if (L == 0) {  // empty batch: the gradients are zero
      gw.zero_();
      if (want_bias) gb.zero_();
      return;
    }
    // The tensor-core kernels take 16-bit inputs, or fp32 as TF32; they read both tensors with
    // contiguous channels, every pixel (and group) starting on 16 bytes, in whole 16-byte chunks:
    // other layouts (NCHW) are copied to channels_last for them (one pass over each tensor, as the
    // forward does), channels per group that are not whole chunks zero-padded (then the partials
    // are summed into a padded filter gradient, and its real channels copied out); everything
    // else runs on the SIMT kernel.
    constexpr int64_t epc = kChunk<scalar_t>;
    const WgradPlan plan = plan_wgrad<scalar_t>(op, algo, tf32, g, L, splits_arg);
    const Algo kernel = plan.kernel;
    const int64_t kp = plan.kp, cp = plan.cp, J = plan.J, splits = plan.splits, chunk = plan.chunk;
    const bool padded = kp != g.Kg || cp != g.Cg;
    auto pixels_aligned = [&](const at::Tensor& t) {
      return t.stride(1) == 1 && aligned16(t.const_data_ptr()) && t.stride(0) % epc == 0 && t.stride(2) % epc == 0 &&
             t.stride(3) % epc == 0;
    };
    auto tc_layout = [&](const at::Tensor& t, int64_t c, int64_t c_padded) {
      return kernel == Algo::Direct || (c == c_padded && pixels_aligned(t)) ? t : pad_channels_last(t, g.G, c_padded);
    };
    const at::Tensor gy = tc_layout(grad, g.Kg, kp), xs = tc_layout(x, g.Cg, cp);
    at::Tensor part = at::empty({splits * g.G * kp * J}, acc_opts);
    WgradParams<scalar_t, A> p{};
    p.gy = gy.const_data_ptr<scalar_t>();
    p.gn = gy.stride(0), p.gc = gy.stride(1), p.gh = gy.stride(2), p.gw_ = gy.stride(3);
    p.x = xs.const_data_ptr<scalar_t>();
    p.xn = xs.stride(0), p.xc = xs.stride(1), p.xh = xs.stride(2), p.xw = xs.stride(3);
    p.part = part.mutable_data_ptr<A>();
    p.N = static_cast<int>(g.N);
    p.K = static_cast<int>(kp);
    p.C = static_cast<int>(cp);
    p.G = static_cast<int>(g.G);
    p.H = static_cast<int>(g.H);
    p.W = static_cast<int>(g.W);
    p.P = static_cast<int>(g.P);
    p.Q = static_cast<int>(g.Q);
    p.R = static_cast<int>(g.R);
    p.S = static_cast<int>(g.S);
    p.sh = g.sh, p.sw = g.sw, p.ph = g.ph, p.pw = g.pw, p.dh = g.dh, p.dw = g.dw;
    p.L = L;
    p.chunk = chunk;
    p.splits = static_cast<int>(splits);
    run_wgrad<scalar_t, A>(p, kernel, stream);
    const at::Tensor gwp = padded ? at::empty({g.G * kp, cp, g.R, g.S}, gw.options()) : gw;
    conv::launch_wgrad_reduce<scalar_t, A>(p.part, p.splits, p.G, p.K, p.C, p.R, p.S, gwp.mutable_data_ptr<scalar_t>(),
                                           gwp.stride(0), gwp.stride(1), gwp.stride(2), gwp.stride(3), stream);
    if (padded) gw.unflatten(0, {g.G, g.Kg}).copy_(gwp.view({g.G, kp, cp, g.R, g.S}).narrow(1, 0, g.Kg).narrow(2, 0, g.Cg));
    if (want_bias) {  // (from the unpadded gradient: a padded one has other channel offsets)
      const at::Tensor gyb = padded ? grad : gy;
      const int64_t bsplits = std::max<int64_t>(1, std::min<int64_t>(L / 1024, 256));
      at::Tensor bpart = at::empty({bsplits * g.K}, acc_opts);
      conv::launch_bias_grad<scalar_t, A>(gyb.const_data_ptr<scalar_t>(), gyb.stride(0), gyb.stride(1), gyb.stride(2),
                                          gyb.stride(3), p.N, static_cast<int>(g.K), p.P, p.Q,
                                          bpart.mutable_data_ptr<A>(), static_cast<int>(bsplits),
                                          gb.mutable_data_ptr<scalar_t>(), stream);
    }
  });
}

// The pixel splits conv2d_backward_weight_cuda takes for these arguments (its splits: 0 = its own
// choice, n = n asked for), for the tuner's candidates (cnnkern/ops/conv2d.py).
int64_t conv2d_backward_weight_splits_cuda(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& gw,
                                           at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                           int64_t groups, c10::string_view algo_sv, bool tf32, int64_t splits) {
  const char* op = "conv2d_backward_weight_splits (cuda)";
  const std::string algo(algo_sv.data(), algo_sv.size());
  check_wgrad_splits(op, splits);
  CNNKERN_CHECK_CUDA(grad, "grad_output");
  check_same(op, grad, x, "input");
  check_same(op, grad, gw, "grad_weight");
  const ConvGeom g = geometry(op, x, gw, grad, stride, padding, dilation, groups, true);
  const c10::cuda::CUDAGuard guard(grad.device());
  const int64_t L = g.N * g.P * g.Q;
  int64_t out = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "conv2d_backward_weight_splits_cuda", [&] {
    out = L == 0 || gw.numel() == 0 ? 0 : plan_wgrad<scalar_t>(op, algo, tf32, g, L, splits).splits;
  });
  return out;
}

// Whether algo='wgmma' can run on `like`'s device (the tuner's candidates, cnnkern/ops/conv2d.py).
bool conv2d_wgmma_available_cuda(const at::Tensor& like) {
  CNNKERN_CHECK_CUDA(like, "like");
  const c10::cuda::CUDAGuard guard(like.device());
  return conv::wgmma_available();
}

}  // namespace
}  // namespace cnnkern

TORCH_LIBRARY_IMPL(cnnkern, CUDA, m) {
  m.impl("conv2d_wgmma_available_cuda", &cnnkern::conv2d_wgmma_available_cuda);
  m.impl("conv2d_forward_cuda", &cnnkern::conv2d_forward_cuda);
  m.impl("conv2d_backward_input_cuda", &cnnkern::conv2d_backward_input_cuda);
  m.impl("conv2d_backward_weight_cuda", &cnnkern::conv2d_backward_weight_cuda);
  m.impl("conv2d_backward_weight_splits_cuda", &cnnkern::conv2d_backward_weight_splits_cuda);
}
