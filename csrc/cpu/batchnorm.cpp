// CPU kernels of the BatchNorm family: fastblocks::bn_stats_fwd, bn_apply, bn_bwd_reduce and
// bn_bwd_apply (schemas in csrc/ops.cpp; the math and the autograd in fastblocks/ops/batchnorm.py),
// bn_bwd_reduce_add_ (norm1's backward in the dense block) and the one-call bn_fused_fwd /
// bn_fused_bwd. The machinery they share with stem.cpp, transition.cpp and dense_layer.cpp
// (vector I/O, geometry, drivers, the templated kernels) is in common.h.
//
// Layout. A dense x-sized tensor is walked as one of two shapes:
//   planes [N*C][HW]  NCHW contiguous with HW > 1: one channel per plane, vectors run along HW;
//   rows   [M][C]     channels_last (M = N*H*W), or HW == 1 where NCHW is [N, C] rows: vectors
//                     run across channels and the per-channel vectors are loaded with them.
// Reductions split the work in tasks, write one partial per (task, channel) into [P][C] and
// combine the P partials of each channel afterwards (in double), so both cores work whatever N, C
// and HW are (ResNet's 8x64x56x56 and 8x2048x7x7 alike). Planes mode: a task is a few thousand
// elements of one channel. Rows mode: a task is a run of whole rows; the statistics take it in
// L2-sized blocks of rows, each read in strips of four vectors of channels (32 fp32 channels
// with AVX2) whose accumulators stay in registers (the sums of bn_bwd_reduce stream rows in
// memory order into per-channel arrays).
// P depends on the shape only, not the thread count: results are the same with any number of
// threads.
//
// Statistics are two-level: each tile/block takes its own mean, then the sum of squared
// deviations from it in a second pass over the (cached) data, with the corrected two-pass term
// (Chan, Golub & LeVeque 1983) -(Σd)²/n; pieces are combined with Chan's parallel formula. Sums of
// squares around a large mean (x = 1000 + N(0,1): mean² / var = 1e6) never cancel.
//
// Arithmetic is fp32 (fp64 for double x). The forward value rounds like eager:
// t = round(x*scale + shift), y = round(t + residual); the ReLU mask of the backward is
// !(y <= 0) on that rounded y (threshold_backward's rule: NaN passes its gradient).
// x*scale + shift is one explicit fused multiply-add (the CUDA kernels use fma too): left to
// itself GCC contracts some multiply-adds and not others, and the backward's ReLU mask must be
// rebuilt from bit-identical values. It differs from eager's two roundings by <= 1 ulp of fp32.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include "bn_kernels.h"

namespace fastblocks {
namespace cpu {

std::tuple<at::Tensor, at::Tensor> bn_stats_fwd_cpu(const at::Tensor& x, bool channels_last) {
  constexpr const char* op = "bn_stats_fwd";
  check_x(x, op, channels_last);
  Geometry g = geometry_of(x, channels_last);
  TORCH_CHECK(g.M() > 0, "fastblocks::bn_stats_fwd: empty batch: x has shape ", x.sizes(),
              ", so there are no values per channel to take statistics of");
  const at::Tensor xc = x_operand(x, channels_last, g);
  at::Tensor mean = at::empty({g.C}, x.options().dtype(acc_type_of(x)));
  at::Tensor var = at::empty({g.C}, x.options().dtype(acc_type_of(x)));
  if (g.C == 0) return {mean, var};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_stats_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    stats_kernel<scalar_t>(g, xc.const_data_ptr<scalar_t>(), mean.mutable_data_ptr<acc_t>(),
                           var.mutable_data_ptr<acc_t>());
  });
  return {mean, var};
}

at::Tensor bn_apply_cpu(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                        const std::optional<at::Tensor>& residual, bool relu, bool channels_last) {
  const auto [sc, sh, has_res] = check_bn_apply(x, scale, shift, residual, channels_last);
  const auto fmt = format_of(channels_last);
  at::Tensor y = at::empty(x.sizes(), x.options(), fmt);
  if (x.numel() == 0) return y;
  Geometry g = geometry_of(x, channels_last);
  const at::Tensor xc = x_operand(x, channels_last, g);
  const at::Tensor rc = has_res ? residual->contiguous(fmt) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_apply_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_flags(relu, has_res, [&](auto kRelu, auto kRes) {
      apply_kernel<scalar_t, decltype(kRelu)::value, decltype(kRes)::value>(
          g, xc.const_data_ptr<scalar_t>(), sc.const_data_ptr<acc_t>(), sh.const_data_ptr<acc_t>(),
          has_res ? rc.const_data_ptr<scalar_t>() : nullptr, y.mutable_data_ptr<scalar_t>());
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> bn_bwd_reduce_cpu(const at::Tensor& grad_y, const at::Tensor& x,
                                                     const at::Tensor& mean, const at::Tensor& scale,
                                                     const at::Tensor& shift, const std::optional<at::Tensor>& residual,
                                                     bool relu, bool channels_last) {
  const auto [mu, sc, sh, has_res] = check_bn_bwd_reduce(grad_y, x, mean, scale, shift, residual, channels_last);
  const auto fmt = format_of(channels_last);
  Geometry g = geometry_of(x, channels_last);
  at::Tensor sum_g = at::zeros({g.C}, x.options().dtype(acc_type_of(x)));
  at::Tensor sum_gx = at::zeros({g.C}, x.options().dtype(acc_type_of(x)));
  if (x.numel() == 0) return {sum_g, sum_gx};  // sums over no elements
  const at::Tensor xc = x_operand(x, channels_last, g);
  const at::Tensor gc = grad_y.contiguous(fmt);
  const at::Tensor rc = has_res ? residual->contiguous(fmt) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_bwd_reduce_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_flags(relu, has_res, [&](auto kRelu, auto kRes) {
      bwd_reduce_kernel<scalar_t, decltype(kRelu)::value, decltype(kRes)::value>(
          g, gc.const_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(),
          has_res ? rc.const_data_ptr<scalar_t>() : nullptr, mu.const_data_ptr<acc_t>(), sc.const_data_ptr<acc_t>(),
          sh.const_data_ptr<acc_t>(), sum_g.mutable_data_ptr<acc_t>(), sum_gx.mutable_data_ptr<acc_t>());
    });
  });
  return {sum_g, sum_gx};
}

at::Tensor bn_bwd_apply_cpu(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& scale,
                            const at::Tensor& shift, const std::optional<at::Tensor>& residual, const at::Tensor& a,
                            const at::Tensor& b, const at::Tensor& c, bool relu, bool channels_last) {
  const auto [sc, sh, av, bv, cv, has_res] =
      check_bn_bwd_apply(grad_y, x, scale, shift, residual, a, b, c, channels_last);
  const auto fmt = format_of(channels_last);
  at::Tensor dx = at::empty(x.sizes(), x.options(), fmt);
  if (x.numel() == 0) return dx;
  Geometry g = geometry_of(x, channels_last);
  const at::Tensor xc = x_operand(x, channels_last, g);
  const at::Tensor gc = grad_y.contiguous(fmt);
  const at::Tensor rc = has_res ? residual->contiguous(fmt) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_bwd_apply_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_flags(relu, has_res, [&](auto kRelu, auto kRes) {
      bwd_apply_kernel<scalar_t, decltype(kRelu)::value, decltype(kRes)::value>(
          g, gc.const_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(),
          has_res ? rc.const_data_ptr<scalar_t>() : nullptr, sc.const_data_ptr<acc_t>(), sh.const_data_ptr<acc_t>(),
          av.const_data_ptr<acc_t>(), bv.const_data_ptr<acc_t>(), cv.const_data_ptr<acc_t>(),
          dx.mutable_data_ptr<scalar_t>());
    });
  });
  return dx;
}

// Whether t (x-sized) is laid out as the kernels read x: NCHW with x's image stride g.xsn or
// channels_last with x's row stride g.xsr (a channel prefix of a wider tensor, see x_operand),
// or dense in the chosen layout.
bool reads_like_x(const at::Tensor& t, const Geometry& g, bool channels_last) {
  if (!g.rows && t.dim() == 4 && g.xsn != g.C * g.HW) {
    return t.stride(3) == 1 && t.stride(2) == t.size(3) && t.stride(1) == g.HW && t.stride(0) == g.xsn;
  }
  if (g.rows && g.xsr != g.C) return row_stride(t) == g.xsr;
  return g.x_dense() && t.is_contiguous(format_of(channels_last));
}

// bn_bwd_reduce's sums and, in the same pass, acc += scale * g' (the dense block's norm1 backward
// with its statistics held fixed: the "direct" part of dx added into the gradient buffer).
std::tuple<at::Tensor, at::Tensor> bn_bwd_reduce_add_cpu(at::Tensor& acc, const at::Tensor& grad_y,
                                                         const at::Tensor& x, const at::Tensor& mean,
                                                         const at::Tensor& scale, const at::Tensor& shift, bool relu,
                                                         bool channels_last) {
  constexpr const char* op = "bn_bwd_reduce_add_";
  check_x(x, op, channels_last);
  check_like_x(grad_y, "grad_y", x, op);
  check_like_x(acc, "acc", x, op);
  const at::Tensor mu = channel_vector(mean, "mean", x, op);
  const at::Tensor sc = channel_vector(scale, "scale", x, op);
  const at::Tensor sh = channel_vector(shift, "shift", x, op);
  const auto fmt = format_of(channels_last);
  Geometry g = geometry_of(x, channels_last);
  at::Tensor sum_g = at::zeros({g.C}, x.options().dtype(acc_type_of(x)));
  at::Tensor sum_gx = at::zeros({g.C}, x.options().dtype(acc_type_of(x)));
  if (x.numel() == 0) return {sum_g, sum_gx};
  at::Tensor xc = x_operand(x, channels_last, g);
  at::Tensor ac = acc;
  if (!reads_like_x(acc, g, channels_last)) {
    // acc is read and written at x's offsets: make both dense (acc is copied back below).
    if (!g.x_dense()) {
      xc = x.contiguous(fmt);
      g.xsn = g.C * g.HW;
      g.xsr = g.C;
    }
    ac = acc.contiguous(fmt);
  }
  const at::Tensor gc = grad_y.contiguous(fmt);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_bwd_reduce_add_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_flags(relu, false, [&](auto kRelu, auto) {
      bwd_reduce_kernel<scalar_t, decltype(kRelu)::value, false, true>(
          g, gc.const_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(), nullptr, mu.const_data_ptr<acc_t>(),
          sc.const_data_ptr<acc_t>(), sh.const_data_ptr<acc_t>(), sum_g.mutable_data_ptr<acc_t>(),
          sum_gx.mutable_data_ptr<acc_t>(), ac.mutable_data_ptr<scalar_t>());
    });
  });
  if (!ac.is_same(acc)) acc.copy_(ac);
  return {sum_g, sum_gx};
}

// ----------------------------------------------------------------------------- whole forward and backward
// bn_fused_fwd / bn_fused_bwd: the CPU BatchNorm of fastblocks.ops.batchnorm in one call per
// direction, for plain eager calls. Around its two passes over x, a BatchNorm call has a dozen
// per-channel steps (scale and shift, the running-statistics update, the dx coefficients); as
// tensor operations each costs microseconds of dispatch (from Python or C++ alike), which on a
// small activation (8x2048x7x7) adds up to as much as a pass over x. Here they are loops over C.
//
// Both directions take scale and shift from scale_shift_loop, so the backward rebuilds exactly
// the forward's ReLU mask. The outputs equal the Python path's (_bn_core.scale_shift, then
// bn_apply) bit for bit: tests/ops/test_batchnorm_kernels.py::test_one_call_scale_shift_is_the_python_one_bit_for_bit.


// A 1-D [C] per-channel parameter or buffer of x (dtype free: it is converted where used).
void check_param(const std::optional<at::Tensor>& v, const char* name, const at::Tensor& x, const char* op) {
  if (!has(v)) return;
  TORCH_CHECK(v->dim() == 1 && v->size(0) == x.size(1), "fastblocks::", op, ": ", name,
              " must be 1-D with one element per channel of x (", x.size(1), "), got shape ", v->sizes());
  TORCH_CHECK(v->device() == x.device(), "fastblocks::", op, ": ", name, " is on ", v->device(), " but x is on ",
              x.device());
}

// v in the accumulation type and contiguous (no copy when it already is), or undefined.
at::Tensor acc_vector(const std::optional<at::Tensor>& v, at::ScalarType acc) {
  return has(v) ? v->to(acc).contiguous() : at::Tensor();
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

// scale = weight * invstd, shift = bias - mean * scale (one fma), invstd = 1 / sqrt(var + eps).
template <typename acc_t>
void scale_shift_loop(int64_t C, const acc_t* mean, const acc_t* var, const acc_t* w, const acc_t* b, double eps,
                      acc_t* scale, acc_t* shift, acc_t* invstd) {
  const auto e = static_cast<acc_t>(eps);
  for (int64_t c = 0; c < C; ++c) {
    const acc_t is = acc_t(1) / std::sqrt(var[c] + e);
    const acc_t sc = w != nullptr ? w[c] * is : is;
    scale[c] = sc;
    shift[c] = std::fma(-mean[c], sc, b != nullptr ? b[c] : acc_t(0));
    invstd[c] = is;
  }
}

template <typename buf_t, typename stat_t>
void update_running_loop(int64_t C, buf_t* rm, buf_t* rv, const stat_t* mean, const stat_t* var, double unbias,
                         double f) {
  for (int64_t c = 0; c < C; ++c) {
    rm[c] = static_cast<buf_t>((1.0 - f) * static_cast<double>(rm[c]) + f * static_cast<double>(mean[c]));
    rv[c] = static_cast<buf_t>((1.0 - f) * static_cast<double>(rv[c]) + f * static_cast<double>(var[c]) * unbias);
  }
}

// running = (1 - momentum) running + momentum batch, with the unbiased variance, as
// nn.BatchNorm2d's CPU kernel: in double, rounded once to the buffer's dtype.
void update_running(at::Tensor& rm, at::Tensor& rv, const at::Tensor& mean, const at::Tensor& var, int64_t count,
                    double momentum) {
  const double unbias = static_cast<double>(count) / static_cast<double>(std::max<int64_t>(count - 1, 1));
  if (!rm.is_contiguous() || !rv.is_contiguous() || rm.scalar_type() != rv.scalar_type()) {
    rm.mul_(1.0 - momentum).add_(mean.to(rm.scalar_type()), momentum);  // unusual buffers: tensor ops
    rv.mul_(1.0 - momentum).add_(at::mul(var, unbias).to(rv.scalar_type()), momentum);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rm.scalar_type(), "bn_update_running", [&] {
    using buf_t = scalar_t;
    buf_t* pm = rm.mutable_data_ptr<buf_t>();
    buf_t* pv = rv.mutable_data_ptr<buf_t>();
    if (mean.scalar_type() == at::kDouble) {
      update_running_loop<buf_t, double>(rm.numel(), pm, pv, mean.const_data_ptr<double>(),
                                         var.const_data_ptr<double>(), unbias, momentum);
    } else {
      update_running_loop<buf_t, float>(rm.numel(), pm, pv, mean.const_data_ptr<float>(),
                                        var.const_data_ptr<float>(), unbias, momentum);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_fused_fwd_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& residual, bool training, double momentum, double eps, bool relu,
    bool update_running_stats, bool channels_last) {
  constexpr const char* op = "bn_fused_fwd";
  check_x(x, op, channels_last);
  check_param(weight, "weight", x, op);
  check_param(bias, "bias", x, op);
  check_param(running_mean, "running_mean", x, op);
  check_param(running_var, "running_var", x, op);
  TORCH_CHECK(has(running_mean) == has(running_var), "fastblocks::", op,
              ": running_mean and running_var must both be given or both be None");
  TORCH_CHECK(training || has(running_mean), "fastblocks::", op, ": eval mode needs running_mean and running_var");
  TORCH_CHECK(!update_running_stats || (training && has(running_mean)), "fastblocks::", op,
              ": update_running needs training=True and running buffers");
  const bool has_res = has(residual);
  if (has_res) check_like_x(*residual, "residual", x, op);
  Geometry g = geometry_of(x, channels_last);
  TORCH_CHECK(g.M() > 0, "fastblocks::", op, ": empty batch: x has shape ", x.sizes(),
              ", so there are no values per channel to normalize with");
  const auto fmt = format_of(channels_last);
  const auto acc = acc_type_of(x);
  const at::Tensor xc = x_operand(x, channels_last, g);
  const at::Tensor rc = has_res ? residual->contiguous(fmt) : at::Tensor();
  const at::Tensor w = acc_vector(weight, acc), b = acc_vector(bias, acc);
  at::Tensor mean, var;
  if (training) {
    mean = at::empty({g.C}, x.options().dtype(acc));
    var = at::empty({g.C}, x.options().dtype(acc));
  } else {
    mean = running_mean->to(acc).clone();
    var = running_var->to(acc).clone();
  }
  at::Tensor y = at::empty(x.sizes(), x.options(), fmt);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_fused_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (training) stats_kernel<scalar_t>(g, xc.const_data_ptr<scalar_t>(), mean.data_ptr<acc_t>(), var.data_ptr<acc_t>());
    std::vector<acc_t> scale(g.C), shift(g.C), invstd(g.C);
    scale_shift_loop<acc_t>(g.C, mean.const_data_ptr<acc_t>(), var.const_data_ptr<acc_t>(), ptr_or_null<acc_t>(w),
                            ptr_or_null<acc_t>(b), eps, scale.data(), shift.data(), invstd.data());
    dispatch_flags(relu, has_res, [&](auto kRelu, auto kRes) {
      apply_kernel<scalar_t, decltype(kRelu)::value, decltype(kRes)::value>(
          g, xc.const_data_ptr<scalar_t>(), scale.data(), shift.data(),
          has_res ? rc.const_data_ptr<scalar_t>() : nullptr, y.mutable_data_ptr<scalar_t>());
    });
  });
  if (update_running_stats) {
    at::Tensor rm = *running_mean, rv = *running_var;
    update_running(rm, rv, mean, var, g.M(), momentum);
  }
  return {y, mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_fused_bwd_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& var,
    const std::optional<at::Tensor>& residual, bool training, double eps, bool relu, bool need_dx,
    bool need_dweight, bool need_dbias, bool need_dres, bool channels_last) {
  constexpr const char* op = "bn_fused_bwd";
  check_x(x, op, channels_last);
  check_like_x(grad_y, "grad_y", x, op);
  check_param(weight, "weight", x, op);
  check_param(bias, "bias", x, op);
  const at::Tensor mu = channel_vector(mean, "mean", x, op);
  const at::Tensor sig = channel_vector(var, "var", x, op);
  const bool has_res = has(residual);
  if (has_res) check_like_x(*residual, "residual", x, op);
  Geometry g = geometry_of(x, channels_last);
  TORCH_CHECK(g.M() > 0, "fastblocks::", op, ": empty batch: x has shape ", x.sizes());
  const auto fmt = format_of(channels_last);
  const auto acc = acc_type_of(x);
  const at::Tensor xc = x_operand(x, channels_last, g);
  const at::Tensor gc = grad_y.contiguous(fmt);
  const at::Tensor rc = has_res ? residual->contiguous(fmt) : at::Tensor();
  const at::Tensor w = acc_vector(weight, acc), b = acc_vector(bias, acc);
  // dres = g' (the masked gradient); the passes after it then read g' and x instead of grad_y, x
  // and the residual (as _bn_backward_impl).
  const bool make_dres = has_res && relu && need_dres;
  at::Tensor dres = make_dres ? at::empty(x.sizes(), x.options(), fmt) : at::Tensor();
  at::Tensor dx = need_dx ? at::empty(x.sizes(), x.options(), fmt) : at::Tensor();
  const bool want_sums = training || need_dweight || need_dbias;
  at::Tensor sums = at::zeros({3, g.C}, x.options().dtype(acc));  // Σ g', Σ g' (x - mean), invstd
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_fused_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t C = g.C;
    acc_t* sum_g = sums.mutable_data_ptr<acc_t>();
    acc_t* sum_gx = sum_g + C;
    acc_t* invstd = sum_g + 2 * C;
    std::vector<acc_t> scale(C), shift(C);
    const acc_t* m = mu.const_data_ptr<acc_t>();
    const acc_t* wp = ptr_or_null<acc_t>(w);
    scale_shift_loop<acc_t>(C, m, sig.const_data_ptr<acc_t>(), wp, ptr_or_null<acc_t>(b), eps, scale.data(),
                            shift.data(), invstd);
    const scalar_t* gp = gc.const_data_ptr<scalar_t>();
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    const scalar_t* rp = has_res ? rc.const_data_ptr<scalar_t>() : nullptr;
    bool masked = relu;
    if (make_dres) {
      const std::vector<acc_t> one(C, acc_t(1)), zero(C, acc_t(0));
      bwd_apply_kernel<scalar_t, true, true>(g, gp, xp, rp, scale.data(), shift.data(), one.data(), zero.data(),
                                             zero.data(), dres.mutable_data_ptr<scalar_t>());
      gp = dres.const_data_ptr<scalar_t>();
      rp = nullptr;
      masked = false;
    }
    if (want_sums) {
      dispatch_flags(masked, rp != nullptr, [&](auto kRelu, auto kRes) {
        bwd_reduce_kernel<scalar_t, decltype(kRelu)::value, decltype(kRes)::value>(
            g, gp, xp, rp, m, scale.data(), shift.data(), sum_g, sum_gx);
      });
    }
    if (need_dx) {
      // dx = a g' + b x + c (the derivation is in fastblocks/ops/batchnorm.py), in double.
      std::vector<acc_t> a(C), bb(C), cc(C);
      const double count = static_cast<double>(g.M());
      for (int64_t c = 0; c < C; ++c) {
        const double is = invstd[c], gamma = wp != nullptr ? static_cast<double>(wp[c]) : 1.0;
        const double ac = gamma * is;
        const double bc = training ? -gamma * is * is * is * static_cast<double>(sum_gx[c]) / count : 0.0;
        const double c0 = training ? -ac * static_cast<double>(sum_g[c]) / count - bc * static_cast<double>(m[c]) : 0.0;
        a[c] = static_cast<acc_t>(ac);
        bb[c] = static_cast<acc_t>(bc);
        cc[c] = static_cast<acc_t>(c0);
      }
      dispatch_flags(masked, rp != nullptr, [&](auto kRelu, auto kRes) {
        bwd_apply_kernel<scalar_t, decltype(kRelu)::value, decltype(kRes)::value>(
            g, gp, xp, rp, scale.data(), shift.data(), a.data(), bb.data(), cc.data(),
            dx.mutable_data_ptr<scalar_t>());
      });
    }
  });
  at::Tensor dweight, dbias;
  if (has(weight) && need_dweight) dweight = (sums[1] * sums[2]).to(weight->scalar_type());
  if (has(bias) && need_dbias) dbias = sums[0].to(bias->scalar_type(), /*non_blocking=*/false, /*copy=*/true);
  return {dx, dweight, dbias, dres};
}


}  // namespace cpu

TORCH_LIBRARY_IMPL(fastblocks, CPU, m) {
  m.impl("bn_stats_fwd", &cpu::bn_stats_fwd_cpu);
  m.impl("bn_apply", &cpu::bn_apply_cpu);
  m.impl("bn_bwd_reduce", &cpu::bn_bwd_reduce_cpu);
  m.impl("bn_bwd_apply", &cpu::bn_bwd_apply_cpu);
  m.impl("bn_bwd_reduce_add_", &cpu::bn_bwd_reduce_add_cpu);
  m.impl("bn_fused_fwd", &cpu::bn_fused_fwd_cpu);
  m.impl("bn_fused_bwd", &cpu::bn_fused_bwd_cpu);
}

}  // namespace fastblocks
