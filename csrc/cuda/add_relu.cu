// CUDA kernels of fastblocks::add_relu_fwd / add_relu_bwd (see fastblocks/ops/add_relu.py).
//
// One thread owns one mask byte, i.e. 8 consecutive elements: it reads x and r once, writes out
// once, and writes its byte, so no atomics are needed. Grid-stride loop, fp32 arithmetic.
#include "kernels.h"

#include <ATen/Dispatch.h>

namespace fastblocks {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t>
__global__ void add_relu_fwd_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ r,
                                    scalar_t* __restrict__ out, uint8_t* __restrict__ mask, int64_t n) {
  const int64_t nbytes = (n + 7) / 8;
  for (int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; b < nbytes;
       b += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t base = b * 8;
    uint8_t bits = 0;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int64_t i = base + j;
      if (i < n) {
        const float s = static_cast<float>(x[i]) + static_cast<float>(r[i]);
        const scalar_t o = static_cast<scalar_t>(s < 0.f ? 0.f : s);  // NaN and -0 pass, as torch.relu
        out[i] = o;
        bits |= static_cast<uint8_t>(!(static_cast<float>(o) <= 0.f)) << j;
      }
    }
    mask[b] = bits;
  }
}

template <>
__global__ void add_relu_fwd_kernel<double>(const double* __restrict__ x, const double* __restrict__ r,
                                            double* __restrict__ out, uint8_t* __restrict__ mask, int64_t n) {
  const int64_t nbytes = (n + 7) / 8;
  for (int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; b < nbytes;
       b += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t base = b * 8;
    uint8_t bits = 0;
    for (int j = 0; j < 8; ++j) {
      const int64_t i = base + j;
      if (i < n) {
        const double s = x[i] + r[i];
        const double o = s < 0.0 ? 0.0 : s;
        out[i] = o;
        bits |= static_cast<uint8_t>(!(o <= 0.0)) << j;
      }
    }
    mask[b] = bits;
  }
}

template <typename scalar_t>
__global__ void add_relu_bwd_kernel(const scalar_t* __restrict__ g, const uint8_t* __restrict__ mask,
                                    scalar_t* __restrict__ gi, int64_t n) {
  const int64_t nbytes = (n + 7) / 8;
  for (int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; b < nbytes;
       b += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t base = b * 8;
    const uint8_t bits = mask[b];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int64_t i = base + j;
      if (i < n) gi[i] = ((bits >> j) & 1) ? g[i] : static_cast<scalar_t>(0.f);
    }
  }
}

int blocks_for(int64_t nbytes) {
  int device = 0;
  cudaGetDevice(&device);
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  const int64_t needed = (nbytes + kThreads - 1) / kThreads;
  const int64_t cap = static_cast<int64_t>(sms > 0 ? sms : 1) * 16;  // enough to fill every SM
  return static_cast<int>(std::max<int64_t>(1, std::min(needed, cap)));
}

}  // namespace

void add_relu_fwd_launch(const at::Tensor& x, const at::Tensor& r, at::Tensor& out, at::Tensor& mask,
                         cudaStream_t stream) {
  const int64_t n = x.numel();
  if (n == 0) return;
  const int blocks = blocks_for((n + 7) / 8);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "add_relu_fwd_cuda", [&] {
    add_relu_fwd_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), r.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
        mask.mutable_data_ptr<uint8_t>(), n);
  });
  check_launch("add_relu_fwd_kernel");
}

void add_relu_bwd_launch(const at::Tensor& g, const at::Tensor& mask, at::Tensor& gi, cudaStream_t stream) {
  const int64_t n = g.numel();
  if (n == 0) return;
  const int blocks = blocks_for((n + 7) / 8);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "add_relu_bwd_cuda", [&] {
    add_relu_bwd_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        g.const_data_ptr<scalar_t>(), mask.const_data_ptr<uint8_t>(), gi.mutable_data_ptr<scalar_t>(), n);
  });
  check_launch("add_relu_bwd_kernel");
}

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, "fastblocks: CUDA launch of ", what, " failed: ", cudaGetErrorString(err));
}

}  // namespace cuda
}  // namespace fastblocks
