// cnnkern._C: the operator schemas of every CUDA C++ kernel, in one place, and the Python module.
//
// The kernels themselves live in csrc/cuda/*.cu and register their CUDA implementations with
// TORCH_LIBRARY_IMPL(cnnkern, CUDA, m) at the bottom of each file. Fake (meta) implementations and
// autograd are registered from Python (cnnkern/ops/). This file deliberately avoids
// torch/extension.h and pybind11: the module needs no Python bindings, only the registrations that
// run when the shared library is loaded.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(cnnkern, m) {
  // residual add: out = [relu](x + pad_channels(shortcut[:, :, ::stride, ::stride]))
  m.def("residual_add_cuda(Tensor x, Tensor shortcut, int stride, bool relu) -> Tensor");
  // grad of relu at the output: grad_out where out > 0, else 0 (PyTorch's threshold_backward rule)
  m.def("residual_add_backward_cuda(Tensor grad_out, Tensor out) -> Tensor");
  // adjoint of the option-A mapping: scatter grad (x's shape) back into the shortcut's shape
  m.def("residual_add_shortcut_backward_cuda(Tensor grad, int[] shortcut_size, int stride, bool channels_last) -> Tensor");
  // local response normalization across channels (PyTorch's: alpha divided by size), 4-D x
  m.def("local_response_norm_cuda(Tensor x, int size, float alpha, float beta, float k) -> Tensor");
  // its input gradient, one pass (scale recomputed, not saved)
  // 2-D convolution (csrc/cuda/conv2d*.cu). Outputs are allocated by the caller (Python: layout,
  // poisoning) and written in place. padding = [top, left] (the output extent fixes the rest);
  // algo = "auto" | "direct" | "igemm" (mma.sync) | "wgmma" (sm_90a) picks the forward /
  // grad-input kernel; tf32 lets fp32 run on the tensor cores (the mma.sync implicit GEMM) as
  // PyTorch's TF32 mode does, else fp32 is exact.
  // stats=True (relu off): also returns per-block BatchNorm statistics (rows, 3, K) of
  // (count, mean, M2), fp32 (fp64 for double); otherwise an empty tensor. residual (y's shape and
  // strides) is added in the epilogue before the ReLU: y = [relu](conv + bias + residual).
  // split_k (forward and grad-input, the implicit GEMM only): 0 = chosen by the layer's size,
  // 1 = no split, n = n slices of the reduction summed by a second kernel in a fixed order.
  // tile (the same): -1 = chosen by the layer's size, 0 = 128x128, 1 = 64x128, 2 = 128x64 output
  // rows x columns per block; an error when the call runs the direct kernel
  m.def("conv2d_forward_cuda(Tensor x, Tensor w, Tensor? bias, Tensor(a!) y, int[] stride, int[] padding, "
        "int[] dilation, int groups, bool relu, str algo, bool stats=False, bool tf32=False, "
        "Tensor? residual=None, int split_k=0, int tile=-1) -> Tensor");
  m.def("conv2d_backward_input_cuda(Tensor grad, Tensor w, Tensor(a!) grad_input, int[] stride, int[] padding, "
        "int[] dilation, int groups, str algo, bool tf32=False, int split_k=0, int tile=-1) -> ()");
  // whether algo="wgmma" runs on like's device (an sm_90 GPU and the sm_90a build)
  m.def("conv2d_wgmma_available_cuda(Tensor like) -> bool");
  // grad_bias: an empty tensor when the bias gradient is not wanted; algo: the grad-weight kernel
  // ("auto" | "direct": SIMT | "igemm": mma.sync tensor cores | "wgmma"); tf32: fp32 on the
  // mma.sync tensor cores as TF32; splits: of the N*P*Q pixels summed over, into fp32 partials
  // added by a second kernel in a fixed order (0 = chosen by the layer's size, n = n splits, fewer
  // where the pixels run out)
  m.def("conv2d_backward_weight_cuda(Tensor grad, Tensor x, Tensor(a!) grad_weight, Tensor(b!) grad_bias, "
        "int[] stride, int[] padding, int[] dilation, int groups, str algo=\"auto\", bool tf32=False, "
        "int splits=0) -> ()");
  // the splits conv2d_backward_weight_cuda takes with these arguments (0 when it has nothing to sum)
  m.def("conv2d_backward_weight_splits_cuda(Tensor grad, Tensor x, Tensor grad_weight, int[] stride, "
        "int[] padding, int[] dilation, int groups, str algo=\"auto\", bool tf32=False, int splits=0) -> int");
  // training-mode BatchNorm + ReLU around the convolution (csrc/cuda/conv_bn_relu.cu); y, out,
  // grad, dy: one dense layout; scale, shift, a, b, c: (K,) fp32 (fp64 for double)
  // stats (rows, 3, K) of (count, mean, M2) -> mean, 1/sqrt(var + eps), biased var, and BN folded
  // into scale = gamma * invstd, shift = beta - mean * scale; gamma, beta: the module's dtype
  m.def("bn_finalize_cuda(Tensor stats, Tensor? gamma, Tensor? beta, float eps, Tensor(a!) mean, Tensor(b!) invstd, "
        "Tensor(c!) var, Tensor(d!) scale, Tensor(e!) shift) -> ()");
  // running statistics (K,), any float dtype and stride, updated in place: running += momentum *
  // (batch - running), with the batch variance var * unbias; mean, var: contiguous fp32 or fp64;
  // num_batches_tracked (an int64 scalar), where given, incremented by one
  m.def("bn_update_running_cuda(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor mean, Tensor var, "
        "float unbias, float momentum, Tensor(c!)? num_batches_tracked=None) -> ()");
  // out = [relu](y * scale + shift + residual); residual: y's layout, or None
  m.def("bn_apply_cuda(Tensor y, Tensor(a!) out, Tensor scale, Tensor shift, bool relu, Tensor? residual=None) -> ()");
  // per chunk of rows: (sum g', sum g' * y) with g' = grad masked by out > 0 when out is given
  m.def("bn_backward_reduce_cuda(Tensor grad, Tensor? out, Tensor y) -> Tensor");
  // part (chunks, 2, K) -> dy = a * g' + b * y + c over count values per channel, and the BN bias
  // and weight gradients sg = sum g', sgx = sum g' * xhat in the module's dtype
  m.def("bn_backward_coefficients_cuda(Tensor part, Tensor mean, Tensor invstd, Tensor? gamma, int count, "
        "Tensor(a!) a, Tensor(b!) b, Tensor(c!) c, Tensor(d!) sg, Tensor(e!) sgx) -> ()");
  m.def("bn_backward_dy_cuda(Tensor grad, Tensor? out, Tensor y, Tensor(a!) dy, Tensor a, Tensor b, Tensor c) -> ()");
  m.def("local_response_norm_backward_cuda(Tensor grad_out, Tensor x, int size, float alpha, float beta, float k) -> Tensor");
}

#ifndef CNNKERN_CUDA_ARCHS
#define CNNKERN_CUDA_ARCHS "sm_80,sm_90a,compute_90"
#endif

static struct PyModuleDef cnnkern_module = {
    PyModuleDef_HEAD_INIT, "_C",
    "cnnkern CUDA C++ kernels; the ops are registered under torch.ops.cnnkern when this module is imported.",
    -1, nullptr,
};

extern "C" PyObject* PyInit__C(void) {
  PyObject* mod = PyModule_Create(&cnnkern_module);
  if (mod == nullptr) return nullptr;
  if (PyModule_AddStringConstant(mod, "cuda_archs", CNNKERN_CUDA_ARCHS) < 0) {
    Py_DECREF(mod);
    return nullptr;
  }
  return mod;
}
