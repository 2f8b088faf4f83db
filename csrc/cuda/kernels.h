// Launchers of the CUDA kernels in csrc/cuda/*.cu.
//
// The .cu files include only <ATen/ATen.h> and the CUDA runtime (no c10/cuda), so they compile
// with nvcc against the CPU PyTorch wheel in CI. The caller (csrc/cuda/ops_cuda.cpp, built only
// in CUDA builds) owns device guards and passes the current stream. Every launcher expects its
// tensors already dense in the layout it was handed, on one device, with matching dtypes.
#pragma once

#include <ATen/ATen.h>
#include <cuda_runtime.h>

namespace fastblocks {
namespace cuda {

// out = relu(x + r) elementwise over n dense elements; mask[i/8] bit i%8 = !(out[i] <= 0).
void add_relu_fwd_launch(const at::Tensor& x, const at::Tensor& r, at::Tensor& out, at::Tensor& mask,
                         cudaStream_t stream);
// gi = mask ? g : 0.
void add_relu_bwd_launch(const at::Tensor& g, const at::Tensor& mask, at::Tensor& gi, cudaStream_t stream);

// BatchNorm family (csrc/cuda/batchnorm.cu; semantics in csrc/ops.cpp). x-sized tensors (x,
// grad_y, residual, outputs) are dense in one layout: NCHW contiguous [N, C, ...] when
// channels_last is false, 4-D channels_last when true. Per-channel tensors are contiguous [C]
// float32 (float64 for double x). An undefined `residual` means none. Outputs are preallocated;
// reductions allocate their [C, P] partials (P from shapes and the SM count) on x's device.
//
// mean[c], var[c] = per-channel mean and biased variance (Welford + Chan). Needs N*H*W > 0.
void bn_stats_fwd_launch(const at::Tensor& x, bool channels_last, at::Tensor& mean, at::Tensor& var,
                         cudaStream_t stream);
// y = act(x*scale + shift [+ residual]), rounded as eager rounds bn(x) + residual.
void bn_apply_launch(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                     const at::Tensor& residual, bool relu, bool channels_last, at::Tensor& y, cudaStream_t stream);
// sum_g[c] = Σ g', sum_gx[c] = Σ g' (x - mean[c]); g' = grad_y masked by the forward's ReLU.
void bn_bwd_reduce_launch(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& mean,
                          const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& residual, bool relu,
                          bool channels_last, at::Tensor& sum_g, at::Tensor& sum_gx, cudaStream_t stream);
// dx = a[c] g' + b[c] x + c[c].
void bn_bwd_apply_launch(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& scale,
                         const at::Tensor& shift, const at::Tensor& residual, const at::Tensor& a, const at::Tensor& b,
                         const at::Tensor& c, bool relu, bool channels_last, at::Tensor& dx, cudaStream_t stream);

// Raises a c10::Error naming `what` if the last launch failed.
void check_launch(const char* what);

}  // namespace cuda
}  // namespace fastblocks
