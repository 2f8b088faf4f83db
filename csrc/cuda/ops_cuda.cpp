// CUDA host glue: device guards, the current stream, layout handling and
// TORCH_LIBRARY_IMPL(fastblocks, CUDA). Compiled only in CUDA builds (it needs c10/cuda).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "kernels.h"

namespace fastblocks {
namespace {

at::MemoryFormat format_of(bool channels_last) {
  return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

std::tuple<at::Tensor, at::Tensor> add_relu_fwd_cuda(const at::Tensor& x, const at::Tensor& residual,
                                                     bool channels_last) {
  TORCH_CHECK(x.sizes() == residual.sizes(), "fastblocks::add_relu: residual shape ", residual.sizes(),
              " differs from x shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == residual.scalar_type(), "fastblocks::add_relu: dtype mismatch");
  TORCH_CHECK(residual.device() == x.device(), "fastblocks::add_relu: residual is on ", residual.device(),
              ", x on ", x.device());
  TORCH_CHECK(!channels_last || x.dim() == 4, "fastblocks::add_relu: channels_last needs a 4-D x");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto fmt = format_of(channels_last);
  const at::Tensor xc = x.contiguous(fmt);
  const at::Tensor rc = residual.contiguous(fmt);
  at::Tensor out = at::empty_like(xc, fmt);
  at::Tensor mask = at::empty({(xc.numel() + 7) / 8}, x.options().dtype(at::kByte));
  cuda::add_relu_fwd_launch(xc, rc, out, mask, at::cuda::getCurrentCUDAStream());
  return {out, mask};
}

at::Tensor add_relu_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& mask, bool channels_last) {
  TORCH_CHECK(mask.scalar_type() == at::kByte && mask.dim() == 1,
              "fastblocks::add_relu_bwd: mask must be a 1-D uint8 tensor");
  TORCH_CHECK(mask.numel() == (grad_out.numel() + 7) / 8, "fastblocks::add_relu_bwd: mask size mismatch");
  TORCH_CHECK(!channels_last || grad_out.dim() == 4, "fastblocks::add_relu_bwd: channels_last needs 4-D");
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const auto fmt = format_of(channels_last);
  const at::Tensor gc = grad_out.contiguous(fmt);
  const at::Tensor mc = mask.contiguous();
  at::Tensor gi = at::empty_like(gc, fmt);
  cuda::add_relu_bwd_launch(gc, mc, gi, at::cuda::getCurrentCUDAStream());
  return gi;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastblocks, CUDA, m) {
  m.impl("add_relu_fwd", &add_relu_fwd_cuda);
  m.impl("add_relu_bwd", &add_relu_bwd_cuda);
}

}  // namespace fastblocks
