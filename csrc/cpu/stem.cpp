// stem_pool_fwd / stem_pool_bwd: the tail of the ImageNet stem, maxpool3x3/2 pad 1 of
// a = relu(x * scale + shift), without storing a. The forward records, per output, which of the
// nine window positions won (int8 kh * 3 + kw); the backward routes each output gradient to that
// input, so the backward never recomputes a or the max-pool (on a CPU, PyTorch's NCHW max-pool
// with indices over ResNet's 8x64x112x112 takes longer than the stem's 7x7 convolution).
//
// Rules, as F.max_pool2d(relu(bn(x)), 3, 2, 1) on the CPU: windows are scanned row by row, and a
// value wins when it is greater than the best so far or NaN (so the first maximum wins, and a
// NaN wins over numbers); padding never wins. a is bn_apply's value (fma, rounded to x's dtype,
// then ReLU propagating NaN). The backward sums, for each input, the gradients of the windows it
// won in output order (row-major), the order of PyTorch's scatter, so fp32 sums are identical.
#include "common.h"

namespace fastblocks {
namespace cpu {

constexpr int kPoolK = 3, kPoolS = 2, kPoolP = 1;

inline int64_t pool_out(int64_t n) { return (n + 2 * kPoolP - kPoolK) / kPoolS + 1; }

// The pool over `lanes` contiguous lanes: cand[k] (k = kh * 3 + kw, nullptr where the window
// position is padding) point at the candidates' values; writes the winner and its k per lane.
template <typename scalar_t>
inline void stem_pool_lanes(const std::array<const at::opmath_type<scalar_t>*, 9>& cand, int64_t lanes,
                            scalar_t* out, int8_t* idx) {
  using acc_t = at::opmath_type<scalar_t>;
  using AVec = Vectorized<acc_t>;
  constexpr int L = AVec::size();
  __at_align__ acc_t best_buf[L], k_buf[L];
  for (int64_t l = 0; l < lanes; l += L) {
    const int m = static_cast<int>(std::min<int64_t>(L, lanes - l));
    AVec best(-std::numeric_limits<acc_t>::infinity()), kv(acc_t(0));
    for (int k = 0; k < 9; ++k) {
      if (cand[k] == nullptr) continue;
      const AVec v = m == L ? AVec::loadu(cand[k] + l) : AVec::loadu(cand[k] + l, m);
      const AVec win = (v > best) | v.isnan();  // greater, or NaN: F.max_pool2d's rule
      best = AVec::blendv(best, v, win);
      kv = AVec::blendv(kv, AVec(acc_t(k)), win);
    }
    best.store(best_buf);
    kv.store(k_buf);
    for (int i = 0; i < m; ++i) {
      out[l + i] = static_cast<scalar_t>(best_buf[i]);
      idx[l + i] = static_cast<int8_t>(k_buf[i]);
    }
  }
}

template <typename scalar_t>
void stem_pool_fwd_kernel(const Geometry& g, int64_t H, int64_t W, const scalar_t* x,
                          const at::opmath_type<scalar_t>* scale, const at::opmath_type<scalar_t>* shift,
                          scalar_t* out, int8_t* idx) {
  using Io = typename IoOf<scalar_t>::type;
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t OH = pool_out(H), OW = pool_out(W), C = g.C;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  // Each input row is transformed once, into slot ih % 3 (a window's three rows never collide).
  if (!g.rows) {
    // Planes: a row is split into its odd columns shifted by one, its even and its odd columns,
    // so the three candidates of output column j, columns 2j - 1, 2j, 2j + 1, are element j
    // of the three arrays (-inf where a column is padding).
    at::parallel_for(0, g.N * C, 1, [&](int64_t p0, int64_t p1) {
      std::vector<acc_t> row(W), buf(3 * 3 * OW);
      for (int64_t p = p0; p < p1; ++p) {
        const scalar_t* xp = x + p * H * W;
        std::array<int64_t, 3> held{-1, -1, -1};
        for (int64_t oh = 0; oh < OH; ++oh) {
          std::array<const acc_t*, 9> cand{};
          for (int kh = 0; kh < 3; ++kh) {
            const int64_t ih = oh * kPoolS - kPoolP + kh;
            if (ih < 0 || ih >= H) continue;
            acc_t* slot = buf.data() + (ih % 3) * 3 * OW;
            if (held[ih % 3] != ih) {
              bn_relu_transform<Io>(xp + ih * W, scale + p % C, shift + p % C, false, W, row.data());
              for (int64_t j = 0; j < OW; ++j) {
                slot[j] = j > 0 ? row[2 * j - 1] : kNegInf;
                slot[OW + j] = row[2 * j];
                slot[2 * OW + j] = 2 * j + 1 < W ? row[2 * j + 1] : kNegInf;
              }
              held[ih % 3] = ih;
            }
            for (int kw = 0; kw < 3; ++kw) cand[kh * 3 + kw] = slot + kw * OW;
          }
          stem_pool_lanes<scalar_t>(cand, OW, out + (p * OH + oh) * OW, idx + (p * OH + oh) * OW);
        }
      }
    });
    return;
  }
  // channels_last: rows of W pixels x C channels; lanes are channels.
  at::parallel_for(0, g.N * OH, 1, [&](int64_t r0, int64_t r1) {
    std::vector<acc_t> buf(3 * W * C);
    std::array<int64_t, 3> held{-1, -1, -1};
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / OH, oh = r % OH;
      std::array<const acc_t*, 3> rows{};
      for (int kh = 0; kh < 3; ++kh) {
        const int64_t ih = oh * kPoolS - kPoolP + kh;
        if (ih < 0 || ih >= H) continue;
        acc_t* slot = buf.data() + (ih % 3) * W * C;
        const int64_t tag = n * H + ih;
        if (held[ih % 3] != tag) {
          for (int64_t iw = 0; iw < W; ++iw) {
            bn_relu_transform<Io>(x + ((n * H + ih) * W + iw) * C, scale, shift, true, C, slot + iw * C);
          }
          held[ih % 3] = tag;
        }
        rows[kh] = slot;
      }
      for (int64_t ow = 0; ow < OW; ++ow) {
        std::array<const acc_t*, 9> cand{};
        for (int kh = 0; kh < 3; ++kh) {
          if (rows[kh] == nullptr) continue;
          for (int kw = 0; kw < 3; ++kw) {
            const int64_t iw = ow * kPoolS - kPoolP + kw;
            if (iw >= 0 && iw < W) cand[kh * 3 + kw] = rows[kh] + iw * C;
          }
        }
        const int64_t o = ((n * OH + oh) * OW + ow) * C;
        stem_pool_lanes<scalar_t>(cand, C, out + o, idx + o);
      }
    }
  });
}

// grad_a[ih, iw] = sum, over the windows (oh, ow) holding (ih, iw) in row-major order, of
// grad_out[oh, ow] where the window's winner is (ih, iw).
template <typename scalar_t>
void stem_pool_bwd_kernel(const Geometry& g, int64_t H, int64_t W, const scalar_t* gout, const int8_t* idx,
                          scalar_t* gin) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t OH = pool_out(H), OW = pool_out(W), C = g.C;
  if (!g.rows) {
    // Planes: scatter each output's gradient to its winner, outputs in row-major order (PyTorch's
    // order, so every input's sum is added up identically), into an L2-resident plane buffer.
    at::parallel_for(0, g.N * C, 1, [&](int64_t p0, int64_t p1) {
      std::vector<acc_t> plane(H * W);
      for (int64_t p = p0; p < p1; ++p) {
        const scalar_t* go = gout + p * OH * OW;
        const int8_t* ix = idx + p * OH * OW;
        std::fill(plane.begin(), plane.end(), acc_t(0));
        for (int64_t oh = 0; oh < OH; ++oh) {
          for (int64_t ow = 0; ow < OW; ++ow) {
            const int k = ix[oh * OW + ow];
            const int64_t ih = 2 * oh - 1 + k / 3, iw = 2 * ow - 1 + k % 3;
            TORCH_CHECK(k >= 0 && k < 9 && ih >= 0 && ih < H && iw >= 0 && iw < W,
                        "fastblocks::stem_pool_bwd: idx holds ", k, " at output (", oh, ", ", ow,
                        "), which is not a window position inside the input (not stem_pool_fwd's idx?)");
            plane[ih * W + iw] += static_cast<acc_t>(go[oh * OW + ow]);
          }
        }
        scalar_t* gi = gin + p * H * W;
        for (int64_t i = 0; i < H * W; ++i) gi[i] = static_cast<scalar_t>(plane[i]);
      }
    });
    return;
  }
  // channels_last: input row ih lies in the windows oh = ih / 2 .. (ih + 1) / 2 (one or two), at
  // window row kh = ih - 2 oh + 1; each input gathers its windows' gradients in row-major order.
  at::parallel_for(0, g.N * H, 1, [&](int64_t r0, int64_t r1) {
    std::vector<acc_t> acc(C);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / H, ih = r % H;
      const int64_t oh0 = ih / 2, oh1 = std::min(OH - 1, (ih + 1) / 2);
      for (int64_t iw = 0; iw < W; ++iw) {
        const int64_t ow0 = iw / 2, ow1 = std::min(OW - 1, (iw + 1) / 2);
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t oh = oh0; oh <= oh1; ++oh) {
          for (int64_t ow = ow0; ow <= ow1; ++ow) {
            const auto k = static_cast<int8_t>((ih - 2 * oh + 1) * 3 + (iw - 2 * ow + 1));
            const int64_t o = ((n * OH + oh) * OW + ow) * C;
            const scalar_t* go = gout + o;
            const int8_t* ix = idx + o;
            for (int64_t c = 0; c < C; ++c) acc[c] += ix[c] == k ? static_cast<acc_t>(go[c]) : acc_t(0);
          }
        }
        scalar_t* gi = gin + ((n * H + ih) * W + iw) * C;
        for (int64_t c = 0; c < C; ++c) gi[c] = static_cast<scalar_t>(acc[c]);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> stem_pool_fwd_cpu(const at::Tensor& x, const at::Tensor& scale,
                                                     const at::Tensor& shift, bool channels_last) {
  constexpr const char* op = "stem_pool_fwd";
  check_x(x, op, channels_last);
  TORCH_CHECK(x.dim() == 4, "fastblocks::", op, ": x must be 4-D [N, C, H, W], got shape ", x.sizes());
  const at::Tensor sc = channel_vector(scale, "scale", x, op);
  const at::Tensor sh = channel_vector(shift, "shift", x, op);
  const auto fmt = format_of(channels_last);
  const at::Tensor xc = x.contiguous(fmt);
  const int64_t H = x.size(2), W = x.size(3);
  at::Tensor out = at::empty({x.size(0), x.size(1), pool_out(H), pool_out(W)}, x.options(), fmt);
  at::Tensor idx = at::empty(out.sizes(), x.options().dtype(at::kChar), fmt);
  if (out.numel() == 0) return {out, idx};
  const Geometry g = geometry_of(xc, channels_last);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "stem_pool_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    stem_pool_fwd_kernel<scalar_t>(g, H, W, xc.const_data_ptr<scalar_t>(), sc.const_data_ptr<acc_t>(),
                                   sh.const_data_ptr<acc_t>(), out.mutable_data_ptr<scalar_t>(),
                                   idx.mutable_data_ptr<int8_t>());
  });
  return {out, idx};
}

at::Tensor stem_pool_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& idx, int64_t H, int64_t W,
                             bool channels_last) {
  constexpr const char* op = "stem_pool_bwd";
  check_x(grad_out, op, channels_last);
  TORCH_CHECK(grad_out.dim() == 4, "fastblocks::", op, ": grad_out must be 4-D, got shape ", grad_out.sizes());
  TORCH_CHECK(H > 0 && W > 0 && pool_out(H) == grad_out.size(2) && pool_out(W) == grad_out.size(3), "fastblocks::",
              op, ": grad_out has shape ", grad_out.sizes(), ", which is not the 3x3/2 pool of a ", H, "x", W,
              " input");
  TORCH_CHECK(idx.scalar_type() == at::kChar && idx.sizes() == grad_out.sizes(), "fastblocks::", op,
              ": idx must be int8 with grad_out's shape ", grad_out.sizes(), ", got ", idx.scalar_type(), " ",
              idx.sizes());
  const auto fmt = format_of(channels_last);
  const at::Tensor gc = grad_out.contiguous(fmt);
  const at::Tensor ic = idx.contiguous(fmt);
  at::Tensor gin = at::empty({grad_out.size(0), grad_out.size(1), H, W}, grad_out.options(), fmt);
  if (gin.numel() == 0) return gin;
  const Geometry g = geometry_of(gin, channels_last);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "stem_pool_bwd_cpu", [&] {
    stem_pool_bwd_kernel<scalar_t>(g, H, W, gc.const_data_ptr<scalar_t>(), ic.const_data_ptr<int8_t>(),
                                   gin.mutable_data_ptr<scalar_t>());
  });
  return gin;
}


}  // namespace cpu

TORCH_LIBRARY_IMPL(fastblocks, CPU, m) {
  m.impl("stem_pool_fwd", &cpu::stem_pool_fwd_cpu);
  m.impl("stem_pool_bwd", &cpu::stem_pool_bwd_cpu);
}

}  // namespace fastblocks
