// CUDA host glue: device guards, the current stream, layout handling and
// TORCH_LIBRARY_IMPL(fastblocks, CUDA). Compiled only in CUDA builds (it needs c10/cuda).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
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
  cuda::add_relu_fwd_launch(xc, rc, out, mask, c10::cuda::getCurrentCUDAStream());
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
  cuda::add_relu_bwd_launch(gc, mc, gi, c10::cuda::getCurrentCUDAStream());
  return gi;
}

// ----------------------------------------------------------------------------- BatchNorm family
// Checks mirror csrc/cpu/common.h and batchnorm.cpp: every message names the argument.
at::ScalarType bn_acc_type(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

void bn_check_x(const at::Tensor& x, const char* op, bool channels_last) {
  TORCH_CHECK(x.dim() >= 2, "fastblocks::", op, ": x must be [N, C, ...] (at least 2-D), got shape ", x.sizes());
  TORCH_CHECK(!channels_last || x.dim() == 4, "fastblocks::", op, ": channels_last needs a 4-D x, got shape ",
              x.sizes());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble, "fastblocks::", op,
              ": x must be float16, bfloat16, float32 or float64, got ", dt);
}

void bn_check_like_x(const at::Tensor& t, const char* name, const at::Tensor& x, const char* op) {
  TORCH_CHECK(t.sizes() == x.sizes(), "fastblocks::", op, ": ", name, " has shape ", t.sizes(), " but x has shape ",
              x.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "fastblocks::", op, ": ", name, " has dtype ", t.scalar_type(),
              " but x has dtype ", x.scalar_type());
  TORCH_CHECK(t.device() == x.device(), "fastblocks::", op, ": ", name, " is on ", t.device(), " but x is on ",
              x.device());
}

at::Tensor bn_channel_vector(const at::Tensor& v, const char* name, const at::Tensor& x, const char* op) {
  TORCH_CHECK(v.dim() == 1 && v.size(0) == x.size(1), "fastblocks::", op, ": ", name,
              " must be 1-D with one element per channel of x (", x.size(1), "), got shape ", v.sizes());
  TORCH_CHECK(v.scalar_type() == bn_acc_type(x), "fastblocks::", op, ": ", name, " must have dtype ", bn_acc_type(x),
              " for x of dtype ", x.scalar_type(), ", got ", v.scalar_type());
  TORCH_CHECK(v.device() == x.device(), "fastblocks::", op, ": ", name, " is on ", v.device(), " but x is on ",
              x.device());
  return v.contiguous();
}

// The residual in x's layout, or an undefined tensor (none).
at::Tensor bn_residual(const std::optional<at::Tensor>& residual, const at::Tensor& x, const char* op,
                       at::MemoryFormat fmt) {
  if (!residual.has_value() || !residual->defined()) return at::Tensor();
  bn_check_like_x(*residual, "residual", x, op);
  return residual->contiguous(fmt);
}

std::tuple<at::Tensor, at::Tensor> bn_stats_fwd_cuda(const at::Tensor& x, bool channels_last) {
  bn_check_x(x, "bn_stats_fwd", channels_last);
  int64_t per_channel = x.size(0);
  for (int64_t d = 2; d < x.dim(); ++d) per_channel *= x.size(d);
  TORCH_CHECK(per_channel > 0, "fastblocks::bn_stats_fwd: empty batch: x has shape ", x.sizes(),
              ", so there are no values per channel to take statistics of");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous(format_of(channels_last));
  at::Tensor mean = at::empty({x.size(1)}, x.options().dtype(bn_acc_type(x)));
  at::Tensor var = at::empty({x.size(1)}, x.options().dtype(bn_acc_type(x)));
  cuda::bn_stats_fwd_launch(xc, channels_last, mean, var, c10::cuda::getCurrentCUDAStream());
  return {mean, var};
}

at::Tensor bn_apply_cuda(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                         const std::optional<at::Tensor>& residual, bool relu, bool channels_last) {
  constexpr const char* op = "bn_apply";
  bn_check_x(x, op, channels_last);
  const at::Tensor sc = bn_channel_vector(scale, "scale", x, op);
  const at::Tensor sh = bn_channel_vector(shift, "shift", x, op);
  const auto fmt = format_of(channels_last);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor rc = bn_residual(residual, x, op, fmt);
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
  constexpr const char* op = "bn_bwd_reduce";
  bn_check_x(x, op, channels_last);
  bn_check_like_x(grad_y, "grad_y", x, op);
  const at::Tensor mu = bn_channel_vector(mean, "mean", x, op);
  const at::Tensor sc = bn_channel_vector(scale, "scale", x, op);
  const at::Tensor sh = bn_channel_vector(shift, "shift", x, op);
  const auto fmt = format_of(channels_last);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor rc = bn_residual(residual, x, op, fmt);
  // Zero-filled: an empty batch sums to 0 without a launch of ours.
  at::Tensor sum_g = at::zeros({x.size(1)}, x.options().dtype(bn_acc_type(x)));
  at::Tensor sum_gx = at::zeros({x.size(1)}, x.options().dtype(bn_acc_type(x)));
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
  constexpr const char* op = "bn_bwd_apply";
  bn_check_x(x, op, channels_last);
  bn_check_like_x(grad_y, "grad_y", x, op);
  const at::Tensor sc = bn_channel_vector(scale, "scale", x, op);
  const at::Tensor sh = bn_channel_vector(shift, "shift", x, op);
  const at::Tensor av = bn_channel_vector(a, "a", x, op);
  const at::Tensor bv = bn_channel_vector(b, "b", x, op);
  const at::Tensor cv = bn_channel_vector(c, "c", x, op);
  const auto fmt = format_of(channels_last);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor rc = bn_residual(residual, x, op, fmt);
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
