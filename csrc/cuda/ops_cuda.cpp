// CUDA host glue: device guards, the current stream, layout handling and
// TORCH_LIBRARY_IMPL(fastblocks, CUDA). Compiled only in CUDA builds (it needs c10/cuda).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../checks.h"
#include "kernels.h"

namespace fastblocks {
namespace {

std::tuple<at::Tensor, at::Tensor> add_relu_fwd_cuda(const at::Tensor& x, const at::Tensor& residual,
                                                     bool channels_last) {
  check_add_relu_fwd(x, residual, channels_last);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto fmt = format_of(channels_last);
  const at::Tensor xc = x.contiguous(fmt);
  const at::Tensor rc = residual.contiguous(fmt);
  at::Tensor out = at::empty_like(xc, fmt);
  at::Tensor mask = at::empty({(xc.numel() + 7) / 8}, x.options().dtype(at::kByte));
  cuda::add_relu_fwd_launch(xc, rc, out, mask, c10::cuda::getCurrentCUDAStream());
  return {out, mask};
}

at::Tensor add_relu_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& mask, bool channels_last) {
  check_add_relu_bwd(grad_out, mask, channels_last);
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const auto fmt = format_of(channels_last);
  const at::Tensor gc = grad_out.contiguous(fmt);
  const at::Tensor mc = mask.contiguous();
  at::Tensor gi = at::empty_like(gc, fmt);
  cuda::add_relu_bwd_launch(gc, mc, gi, c10::cuda::getCurrentCUDAStream());
  return gi;
}

// ----------------------------------------------------------------------------- BatchNorm family
// Argument checks: csrc/checks.h (shared with the CPU kernels).
std::tuple<at::Tensor, at::Tensor> bn_stats_fwd_cuda(const at::Tensor& x, bool channels_last) {
  check_x(x, "bn_stats_fwd", channels_last);
  int64_t per_channel = x.size(0);
  for (int64_t d = 2; d < x.dim(); ++d) per_channel *= x.size(d);
  TORCH_CHECK(per_channel > 0, "fastblocks::bn_stats_fwd: empty batch: x has shape ", x.sizes(),
              ", so there are no values per channel to take statistics of");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous(format_of(channels_last));
  at::Tensor mean = at::empty({x.size(1)}, x.options().dtype(acc_type_of(x)));
  at::Tensor var = at::empty({x.size(1)}, x.options().dtype(acc_type_of(x)));
  cuda::bn_stats_fwd_launch(xc, channels_last, mean, var, c10::cuda::getCurrentCUDAStream());
  return {mean, var};
}

at::Tensor bn_apply_cuda(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                         const std::optional<at::Tensor>& residual, bool relu, bool channels_last) {
  const auto [sc, sh, has_res] = check_bn_apply(x, scale, shift, residual, channels_last);
  const auto fmt = format_of(channels_last);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor rc = has_res ? residual->contiguous(fmt) : at::Tensor();
  const at::Tensor xc = x.contiguous(fmt);
  at::Tensor y = at::empty_like(xc, fmt);
  cuda::bn_apply_launch(xc, sc, sh, rc, relu, channels_last, y, c10::cuda::getCurrentCUDAStream());
  return y;
}

std::tuple<at::Tensor, at::Tensor> bn_bwd_reduce_cuda(const at::Tensor& grad_y, const at::Tensor& x,
                                                      const at::Tensor& mean, const at::Tensor& scale,
                                                      const at::Tensor& shift,
                                                      const std::optional<at::Tensor>& residual, bool relu,
                                                      bool channels_last) {
  const auto [mu, sc, sh, has_res] = check_bn_bwd_reduce(grad_y, x, mean, scale, shift, residual, channels_last);
  const auto fmt = format_of(channels_last);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor rc = has_res ? residual->contiguous(fmt) : at::Tensor();
  // Zero-filled: an empty batch sums to 0 without a launch of ours.
  at::Tensor sum_g = at::zeros({x.size(1)}, x.options().dtype(acc_type_of(x)));
  at::Tensor sum_gx = at::zeros({x.size(1)}, x.options().dtype(acc_type_of(x)));
  if (x.numel() == 0) return {sum_g, sum_gx};
  const at::Tensor xc = x.contiguous(fmt);
  const at::Tensor gc = grad_y.contiguous(fmt);
  cuda::bn_bwd_reduce_launch(gc, xc, mu, sc, sh, rc, relu, channels_last, sum_g, sum_gx,
                             c10::cuda::getCurrentCUDAStream());
  return {sum_g, sum_gx};
}

at::Tensor bn_bwd_apply_cuda(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& scale,
                             const at::Tensor& shift, const std::optional<at::Tensor>& residual, const at::Tensor& a,
                             const at::Tensor& b, const at::Tensor& c, bool relu, bool channels_last) {
  const auto [sc, sh, av, bv, cv, has_res] =
      check_bn_bwd_apply(grad_y, x, scale, shift, residual, a, b, c, channels_last);
  const auto fmt = format_of(channels_last);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor rc = has_res ? residual->contiguous(fmt) : at::Tensor();
  const at::Tensor xc = x.contiguous(fmt);
  const at::Tensor gc = grad_y.contiguous(fmt);
  at::Tensor dx = at::empty_like(xc, fmt);
  cuda::bn_bwd_apply_launch(gc, xc, sc, sh, rc, av, bv, cv, relu, channels_last, dx,
                            c10::cuda::getCurrentCUDAStream());
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastblocks, CUDA, m) {
  m.impl("add_relu_fwd", &add_relu_fwd_cuda);
  m.impl("add_relu_bwd", &add_relu_bwd_cuda);
  m.impl("bn_stats_fwd", &bn_stats_fwd_cuda);
  m.impl("bn_apply", &bn_apply_cuda);
  m.impl("bn_bwd_reduce", &bn_bwd_reduce_cuda);
  m.impl("bn_bwd_apply", &bn_bwd_apply_cuda);
}

}  // namespace fastblocks
