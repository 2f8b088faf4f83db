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

// Raises a c10::Error naming `what` if the last launch failed.
void check_launch(const char* what);

}  // namespace cuda
}  // namespace fastblocks
