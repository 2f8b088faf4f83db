// dense_layer_fwd_ / dense_layer_bwd_: one layer of the dense block each way, one C++ call.
// dense_layer_bwd_: one layer of the dense block's backward (fastblocks/ops/dense_block.py,
// _DenseBlockFunction.backward, whose derivation and names this follows), for eager calls on the
// CPU without dropout or synchronized statistics: a dozen kernels and two convolution backwards
// around two dozen per-channel steps, which from Python cost microseconds each per layer
// (DenseNet-201 has 98). Scale and shift are computed with the same ATen operations as the
// forward's Python (_bn_core.scale_shift), so the recomputed ReLU masks are the forward's, bit for bit.
#include "bn_kernels.h"

namespace fastblocks {
namespace cpu {

// (scale, shift, invstd) as fastblocks.ops._bn_core.scale_shift computes them.
std::tuple<at::Tensor, at::Tensor, at::Tensor> scale_shift_tensors(const at::Tensor& mean, const at::Tensor& var,
                                                                   const std::optional<at::Tensor>& weight,
                                                                   const std::optional<at::Tensor>& bias,
                                                                   double eps) {
  at::Tensor invstd = (var + eps).rsqrt_();
  at::Tensor scale = has(weight) ? weight->to(var.scalar_type()) * invstd : invstd;
  at::Tensor shift = has(bias) ? at::addcmul(bias->to(var.scalar_type()), mean, scale, -1) : -mean * scale;
  return {scale, shift, invstd};
}

// g[:, ci:ci+k] += b x + c with b = 2 gvar / M, c = gmu / M - b mean (the chunk's statistics
// gradient, see _fold_stats_grad), x = buf[:, ci:ci+k].
void fold_chunk(at::Tensor& g, const at::Tensor& buf, const at::Tensor& mean, const at::Tensor& gmu,
                const at::Tensor& gvar, int64_t ci, int64_t k, double count, bool channels_last) {
  const at::Tensor bv = gvar.narrow(0, ci, k) * (2.0 / count);
  const at::Tensor cv = gmu.narrow(0, ci, k) / count - bv * mean.narrow(0, ci, k);
  at::Tensor gs = g.narrow(1, ci, k);
  const at::Tensor xs = buf.narrow(1, ci, k);
  Geometry geo = geometry_of(xs, channels_last);
  const at::Tensor xc = x_operand(xs, channels_last, geo);
  if (xc.is_same(xs) && reads_like_x(gs, geo, channels_last)) {
    // Both channel slices laid out as the buffer (NCHW image stride, channels_last row stride): in place.
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, buf.scalar_type(), "dense_fold_cpu", [&] {
      using Io = typename IoOf<scalar_t>::type;
      using AVec = typename Io::AVec;
      using acc_t = at::opmath_type<scalar_t>;
      scalar_t* gp = gs.mutable_data_ptr<scalar_t>();
      const scalar_t* xp = xs.const_data_ptr<scalar_t>();
      for_each_step<Io, 2>(geo, {bv.const_data_ptr<acc_t>(), cv.const_data_ptr<acc_t>()},
                           [=](int64_t, int64_t xoff, int n, const AVec (&p)[2][Io::kVecs]) {
                             AVec xv[Io::kVecs], gv[Io::kVecs];
                             Io::load(xp + xoff, xv, n);
                             Io::load(gp + xoff, gv, n);
                             for (int j = 0; j < Io::kVecs; ++j) gv[j] = gv[j] + p[0][j] * xv[j] + p[1][j];
                             Io::store(gp + xoff, gv, n);
                           });
    });
    return;
  }
  const at::Tensor one = at::ones_like(bv);
  const at::Tensor next = bn_bwd_apply_cpu(gs, xs, one, one, std::nullopt, one, bv, cv, false, channels_last);
  gs.copy_(next);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dense_layer_bwd_cpu(
    at::Tensor& g, at::Tensor& gmu, at::Tensor& gvar, const at::Tensor& buf, const at::Tensor& mean1,
    const at::Tensor& var1, const at::Tensor& mean2, const at::Tensor& var2, const std::optional<at::Tensor>& weight1,
    const std::optional<at::Tensor>& bias1, const at::Tensor& conv1_weight, const std::optional<at::Tensor>& weight2,
    const std::optional<at::Tensor>& bias2, const at::Tensor& conv2_weight, const std::optional<at::Tensor>& bottleneck,
    double eps1, double eps2, int64_t ci, int64_t k, bool training, bool fold, bool channels_last) {
  constexpr const char* op = "dense_layer_bwd_";
  check_x(buf, op, channels_last);
  TORCH_CHECK(buf.dim() == 4, "fastblocks::", op, ": buf must be 4-D [N, C, H, W], got shape ", buf.sizes());
  check_like_x(g, "g", buf, op);
  const int64_t C = buf.size(1), B = conv1_weight.size(0);
  TORCH_CHECK(ci > 0 && k > 0 && ci + k <= C, "fastblocks::", op, ": channels [", ci, ", ", ci + k,
              ") are not inside buf's ", C);
  TORCH_CHECK(conv1_weight.dim() == 4 && conv1_weight.size(1) == ci && conv1_weight.size(2) == 1 &&
                  conv1_weight.size(3) == 1,
              "fastblocks::", op, ": conv1_weight must be [B, ", ci, ", 1, 1], got ", conv1_weight.sizes());
  TORCH_CHECK(conv2_weight.dim() == 4 && conv2_weight.size(0) == k && conv2_weight.size(1) == B &&
                  conv2_weight.size(2) == 3 && conv2_weight.size(3) == 3,
              "fastblocks::", op, ": conv2_weight must be [", k, ", ", B, ", 3, 3], got ", conv2_weight.sizes());
  const auto acc = acc_type_of(buf);
  for (const auto& [v, name, len] : {std::tuple{&mean1, "mean1", ci}, std::tuple{&var1, "var1", ci},
                                     std::tuple{&mean2, "mean2", B}, std::tuple{&var2, "var2", B}}) {
    TORCH_CHECK(v->dim() == 1 && v->size(0) >= len && v->scalar_type() == acc, "fastblocks::", op, ": ", name,
                " must be 1-D ", acc, " with at least ", len, " elements, got ", v->scalar_type(), " ", v->sizes());
  }
  if (training && fold) {
    using Named = std::pair<const at::Tensor*, const char*>;
    for (const auto& [v, name] : {Named{&gmu, "gmu"}, Named{&gvar, "gvar"}, Named{&mean1, "mean1"}}) {
      TORCH_CHECK(v->dim() == 1 && v->size(0) >= ci + k && v->scalar_type() == acc && v->is_contiguous(),
                  "fastblocks::", op, ": ", name, " must be contiguous 1-D ", acc, " with at least ", ci + k,
                  " elements to fold chunk [", ci, ", ", ci + k, ")");
    }
  }
  if (training) {
    TORCH_CHECK(gmu.dim() == 1 && gvar.dim() == 1 && gmu.size(0) >= ci && gvar.size(0) >= ci &&
                    gmu.scalar_type() == acc && gvar.scalar_type() == acc,
                "fastblocks::", op, ": gmu and gvar must be 1-D ", acc, " with at least ", ci, " elements");
  }
  const double count = static_cast<double>(buf.size(0) * buf.size(2) * buf.size(3));
  if (training && fold) fold_chunk(g, buf, mean1, gmu, gvar, ci, k, count, channels_last);
  const at::Tensor dy = g.narrow(1, ci, k);
  const at::Tensor m1 = mean1.narrow(0, 0, ci), v1 = var1.narrow(0, 0, ci);
  const at::Tensor m2 = mean2.narrow(0, 0, B), v2 = var2.narrow(0, 0, B);
  const auto [s1, t1, inv1] = scale_shift_tensors(m1, v1, weight1, bias1, eps1);
  const auto [s2, t2, inv2] = scale_shift_tensors(m2, v2, weight2, bias2, eps2);
  const at::Tensor x_pre = buf.narrow(1, 0, ci);
  at::Tensor a1 = bn_apply_cpu(x_pre, s1, t1, std::nullopt, true, channels_last);
  at::Tensor bott = has(bottleneck) ? *bottleneck : at::conv2d(a1, conv1_weight);
  at::Tensor a2 = bn_apply_cpu(bott, s2, t2, std::nullopt, true, channels_last);
  auto [da2, dw2, unused2] = at::convolution_backward(dy, a2, conv2_weight, std::nullopt, {1, 1}, {1, 1}, {1, 1},
                                                      false, {0, 0}, 1, {true, true, false});
  a2.reset();
  // norm2 + relu2: training-mode BN backward (its statistics depend on bott only).
  const auto [sg2, sgx2] = bn_bwd_reduce_cpu(da2, bott, m2, s2, t2, std::nullopt, true, channels_last);
  at::Tensor ca = s2, cb, cc;
  if (training) {
    cb = -s2 * inv2 * inv2 * sgx2 / count;
    cc = -s2 * sg2 / count - cb * m2;
  } else {
    cb = at::zeros_like(s2);
    cc = at::zeros_like(s2);
  }
  at::Tensor dbott = bn_bwd_apply_cpu(da2, bott, s2, t2, std::nullopt, ca, cb, cc, true, channels_last);
  da2.reset();
  bott.reset();
  auto [da1, dw1, unused1] = at::convolution_backward(dbott, a1, conv1_weight, std::nullopt, {1, 1}, {0, 0},
                                                      {1, 1}, false, {0, 0}, 1, {true, true, false});
  dbott.reset();
  a1.reset();
  // norm1 + relu1 with the statistics held fixed: G[:, :ci] += s1 g1'; their share to gmu/gvar.
  at::Tensor g_pre = g.narrow(1, 0, ci);
  const auto [sg1, sgx1] = bn_bwd_reduce_add_cpu(g_pre, da1, x_pre, m1, s1, t1, true, channels_last);
  da1.reset();
  if (training) {
    gmu.narrow(0, 0, ci).sub_(s1 * sg1);
    gvar.narrow(0, 0, ci).sub_(s1 * inv1 * inv1 * sgx1 * 0.5);
  }
  const auto grad_of = [](const std::optional<at::Tensor>& p, const at::Tensor& v) {
    return has(p) ? v.to(p->scalar_type()) : at::Tensor();
  };
  // Weight gradients contiguous whatever layout the convolution picked (a well-defined output; they are small).
  return {grad_of(weight1, inv1 * sgx1), grad_of(bias1, sg1), dw1.contiguous(),
          grad_of(weight2, inv2 * sgx2), grad_of(bias2, sg2), dw2.contiguous()};
}

// dense_layer_fwd_: one layer of the dense block's forward (_block_forward), the same conditions
// and the same operations (scale and shift as _bn_core.scale_shift, so the backward's recomputation
// rebuilds the same ReLU masks). Training: writes the bottleneck's batch statistics into
// mean2/var2 and, with chunk_stats, the new chunk's into mean1/var1[ci:ci+k]; eval: reads the
// (running) statistics from them. Writes the layer's k new channels into buf[:, ci:ci+k].
at::Tensor dense_layer_fwd_cpu(at::Tensor& buf, at::Tensor& mean1, at::Tensor& var1, at::Tensor& mean2,
                               at::Tensor& var2, const std::optional<at::Tensor>& weight1,
                               const std::optional<at::Tensor>& bias1, const at::Tensor& conv1_weight,
                               const std::optional<at::Tensor>& weight2, const std::optional<at::Tensor>& bias2,
                               const at::Tensor& conv2_weight, double eps1, double eps2, int64_t ci, int64_t k,
                               bool training, bool chunk_stats, bool keep, bool channels_last) {
  constexpr const char* op = "dense_layer_fwd_";
  check_x(buf, op, channels_last);
  TORCH_CHECK(buf.dim() == 4, "fastblocks::", op, ": buf must be 4-D [N, C, H, W], got shape ", buf.sizes());
  const int64_t N = buf.size(0), C = buf.size(1), H = buf.size(2), W = buf.size(3);
  TORCH_CHECK(ci > 0 && k > 0 && ci + k <= C, "fastblocks::", op, ": channels [", ci, ", ", ci + k,
              ") are not inside buf's ", C);
  TORCH_CHECK(conv1_weight.dim() == 4 && conv1_weight.size(1) == ci && conv1_weight.size(2) == 1 &&
                  conv1_weight.size(3) == 1,
              "fastblocks::", op, ": conv1_weight must be [B, ", ci, ", 1, 1], got ", conv1_weight.sizes());
  const int64_t B = conv1_weight.size(0);
  TORCH_CHECK(conv2_weight.dim() == 4 && conv2_weight.size(0) == k && conv2_weight.size(1) == B &&
                  conv2_weight.size(2) == 3 && conv2_weight.size(3) == 3,
              "fastblocks::", op, ": conv2_weight must be [", k, ", ", B, ", 3, 3], got ", conv2_weight.sizes());
  const auto acc = acc_type_of(buf);
  const int64_t len1 = training && chunk_stats ? ci + k : ci;
  for (const auto& [v, name, len] : {std::tuple{&mean1, "mean1", len1}, std::tuple{&var1, "var1", len1},
                                     std::tuple{&mean2, "mean2", B}, std::tuple{&var2, "var2", B}}) {
    TORCH_CHECK(v->dim() == 1 && v->size(0) >= len && v->scalar_type() == acc, "fastblocks::", op, ": ", name,
                " must be 1-D ", acc, " with at least ", len, " elements, got ", v->scalar_type(), " ", v->sizes());
  }
  TORCH_CHECK(!training || N * H * W > 1, "fastblocks::", op,
              ": Expected more than 1 value per channel when training, got input size ", buf.sizes());
  const at::Tensor m1 = mean1.narrow(0, 0, ci), v1 = var1.narrow(0, 0, ci);
  const auto [s1, t1, inv1] = scale_shift_tensors(m1, v1, weight1, bias1, eps1);
  at::Tensor bott = at::conv2d(bn_apply_cpu(buf.narrow(1, 0, ci), s1, t1, std::nullopt, true, channels_last),
                               conv1_weight);
  at::Tensor m2 = mean2.narrow(0, 0, B), v2 = var2.narrow(0, 0, B);
  if (training) {
    const auto [bm, bv] = bn_stats_fwd_cpu(bott, channels_last);
    m2.copy_(bm);
    v2.copy_(bv);
  }
  const auto [s2, t2, inv2] = scale_shift_tensors(m2, v2, weight2, bias2, eps2);
  const at::Tensor y = at::conv2d(bn_apply_cpu(bott, s2, t2, std::nullopt, true, channels_last), conv2_weight,
                                  std::nullopt, 1, 1);
  if (training && chunk_stats) {
    const auto [ym, yv] = bn_stats_fwd_cpu(y, channels_last);
    mean1.narrow(0, ci, k).copy_(ym);
    var1.narrow(0, ci, k).copy_(yv);
  }
  // The chunk through 2-D views: a copy into a 4-D channel slice takes a slow strided path.
  if (channels_last) {
    buf.permute({0, 2, 3, 1}).view({N * H * W, C}).narrow(1, ci, k).copy_(y.permute({0, 2, 3, 1}).reshape({N * H * W, k}));
  } else {
    buf.view({N, C * H * W}).narrow(1, ci * H * W, k * H * W).copy_(y.reshape({N, k * H * W}));
  }
  return keep ? bott : at::Tensor();
}


}  // namespace cpu

TORCH_LIBRARY_IMPL(fastblocks, CPU, m) {
  m.impl("dense_layer_fwd_", &cpu::dense_layer_fwd_cpu);
  m.impl("dense_layer_bwd_", &cpu::dense_layer_bwd_cpu);
}

}  // namespace fastblocks
