// Argument checks and host helpers shared by the CPU kernels (csrc/cpu/) and the CUDA side
// (csrc/cuda/ops_cuda.cpp, batchnorm.cu): one definition, so both devices reject the same inputs
// with the same message, which names the op and the argument. Host code only (ATen), no kernels.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <type_traits>

namespace fastblocks {

inline at::MemoryFormat format_of(bool channels_last) {
  return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// The dtype of per-channel statistics and kernel arithmetic: double for double x, else float.
inline at::ScalarType acc_type_of(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline bool has(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// ----------------------------------------------------------------------------- add_relu
inline void check_layout(const at::Tensor& t, const char* name, bool channels_last) {
  TORCH_CHECK(!channels_last || t.dim() == 4, "fastblocks::add_relu: channels_last needs a 4-D ", name, ", got ",
              t.dim(), " dimensions");
}

inline void check_add_relu_fwd(const at::Tensor& x, const at::Tensor& residual, bool channels_last) {
  TORCH_CHECK(x.sizes() == residual.sizes(), "fastblocks::add_relu: residual shape ", residual.sizes(),
              " differs from x shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == residual.scalar_type(), "fastblocks::add_relu: residual dtype ",
              residual.scalar_type(), " differs from x dtype ", x.scalar_type());
  TORCH_CHECK(residual.device() == x.device(), "fastblocks::add_relu: residual is on ", residual.device(),
              ", x on ", x.device());
  check_layout(x, "x", channels_last);
}

inline void check_add_relu_bwd(const at::Tensor& grad_out, const at::Tensor& mask, bool channels_last) {
  TORCH_CHECK(mask.scalar_type() == at::kByte && mask.dim() == 1,
              "fastblocks::add_relu_bwd: mask must be a 1-D uint8 tensor");
  check_layout(grad_out, "grad_out", channels_last);
  const int64_t n = grad_out.numel();
  TORCH_CHECK(mask.numel() == (n + 7) / 8, "fastblocks::add_relu_bwd: mask has ", mask.numel(),
              " bytes, grad_out needs ", (n + 7) / 8);
  TORCH_CHECK(mask.device() == grad_out.device(), "fastblocks::add_relu_bwd: mask is on ", mask.device(),
              ", grad_out on ", grad_out.device());
}

// ----------------------------------------------------------------------------- BatchNorm family
inline void check_x(const at::Tensor& x, const char* op, bool channels_last) {
  TORCH_CHECK(x.dim() >= 2, "fastblocks::", op, ": x must be [N, C, ...] (at least 2-D), got shape ", x.sizes());
  TORCH_CHECK(!channels_last || x.dim() == 4, "fastblocks::", op, ": channels_last needs a 4-D x, got shape ",
              x.sizes());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble, "fastblocks::", op,
              ": x must be float16, bfloat16, float32 or float64, got ", dt);
}

inline void check_like_x(const at::Tensor& t, const char* name, const at::Tensor& x, const char* op) {
  TORCH_CHECK(t.sizes() == x.sizes(), "fastblocks::", op, ": ", name, " has shape ", t.sizes(), " but x has shape ",
              x.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "fastblocks::", op, ": ", name, " has dtype ", t.scalar_type(),
              " but x has dtype ", x.scalar_type());
  TORCH_CHECK(t.device() == x.device(), "fastblocks::", op, ": ", name, " is on ", t.device(), " but x is on ",
              x.device());
}

// A per-channel vector: 1-D [C], float32 (float64 for double x), on x's device; made contiguous.
inline at::Tensor channel_vector(const at::Tensor& v, const char* name, const at::Tensor& x, const char* op) {
  TORCH_CHECK(v.dim() == 1 && v.size(0) == x.size(1), "fastblocks::", op, ": ", name,
              " must be 1-D with one element per channel of x (", x.size(1), "), got shape ", v.sizes());
  TORCH_CHECK(v.scalar_type() == acc_type_of(x), "fastblocks::", op, ": ", name, " must have dtype ", acc_type_of(x),
              " for x of dtype ", x.scalar_type(), ", got ", v.scalar_type());
  TORCH_CHECK(v.device() == x.device(), "fastblocks::", op, ": ", name, " is on ", v.device(), " but x is on ",
              x.device());
  return v.contiguous();
}

// The argument checks of the four BatchNorm kernel schemas (csrc/ops.cpp), one function per
// schema for both devices: the per-channel operands come back checked and contiguous.
struct BnApplyArgs {
  at::Tensor scale, shift;
  bool has_res;
};

inline BnApplyArgs check_bn_apply(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                                  const std::optional<at::Tensor>& residual, bool channels_last) {
  constexpr const char* op = "bn_apply";
  check_x(x, op, channels_last);
  BnApplyArgs out{channel_vector(scale, "scale", x, op), channel_vector(shift, "shift", x, op), has(residual)};
  if (out.has_res) check_like_x(*residual, "residual", x, op);
  return out;
}

struct BnBwdReduceArgs {
  at::Tensor mean, scale, shift;
  bool has_res;
};

inline BnBwdReduceArgs check_bn_bwd_reduce(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& mean,
                                           const at::Tensor& scale, const at::Tensor& shift,
                                           const std::optional<at::Tensor>& residual, bool channels_last,
                                           const char* op = "bn_bwd_reduce") {
  check_x(x, op, channels_last);
  check_like_x(grad_y, "grad_y", x, op);
  BnBwdReduceArgs out{channel_vector(mean, "mean", x, op), channel_vector(scale, "scale", x, op),
                      channel_vector(shift, "shift", x, op), has(residual)};
  if (out.has_res) check_like_x(*residual, "residual", x, op);
  return out;
}

struct BnBwdApplyArgs {
  at::Tensor scale, shift, a, b, c;
  bool has_res;
};

inline BnBwdApplyArgs check_bn_bwd_apply(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& scale,
                                         const at::Tensor& shift, const std::optional<at::Tensor>& residual,
                                         const at::Tensor& a, const at::Tensor& b, const at::Tensor& c,
                                         bool channels_last) {
  constexpr const char* op = "bn_bwd_apply";
  check_x(x, op, channels_last);
  check_like_x(grad_y, "grad_y", x, op);
  BnBwdApplyArgs out{channel_vector(scale, "scale", x, op), channel_vector(shift, "shift", x, op),
                     channel_vector(a, "a", x, op),         channel_vector(b, "b", x, op),
                     channel_vector(c, "c", x, op),         has(residual)};
  if (out.has_res) check_like_x(*residual, "residual", x, op);
  return out;
}

// Calls f(std::bool_constant<relu>, std::bool_constant<residual>): the four kernel instances.
template <typename F>
void dispatch_flags(bool relu, bool res, const F& f) {
  if (relu) {
    if (res) {
      f(std::true_type{}, std::true_type{});
    } else {
      f(std::true_type{}, std::false_type{});
    }
  } else {
    if (res) {
      f(std::false_type{}, std::true_type{});
    } else {
      f(std::false_type{}, std::false_type{});
    }
  }
}


}  // namespace fastblocks
