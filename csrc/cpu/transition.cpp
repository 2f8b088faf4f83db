// transition_pool_fwd / transition_pool_bwd: DenseNet's transition pools before its 1x1 conv
// (fastblocks/ops/dense_block.py), out = avgpool2x2/2 of a = relu(x * scale + shift) (bn_apply's
// value), without storing a; the backward takes the pool's gradient through the BN-ReLU in two
// passes over x (the sums, then dx) instead of materializing a's and the pool's gradients.
// Windows never overlap and have no padding (floor: an odd last row or column is in no window and
// gets g' = 0). Each window's four values are added in row-major order and divided by 4, as
// F.avg_pool2d does.
#include "common.h"

namespace fastblocks {
namespace cpu {

inline int64_t half_floor(int64_t n) { return n / 2; }

template <typename scalar_t>
void transition_pool_fwd_kernel(const Geometry& g, int64_t H, int64_t W, const scalar_t* x,
                                const at::opmath_type<scalar_t>* scale, const at::opmath_type<scalar_t>* shift,
                                scalar_t* out) {
  using Io = typename IoOf<scalar_t>::type;
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t OH = half_floor(H), OW = half_floor(W), C = g.C;
  if (!g.rows) {
    at::parallel_for(0, g.N * C, std::max<int64_t>(1, kGrain / (H * W)), [&](int64_t p0, int64_t p1) {
      std::vector<acc_t> r0(W), r1(W);
      for (int64_t p = p0; p < p1; ++p) {
        const scalar_t* xp = x + p * H * W;
        scalar_t* op = out + p * OH * OW;
        for (int64_t oh = 0; oh < OH; ++oh) {
          bn_relu_transform<Io>(xp + 2 * oh * W, scale + p % C, shift + p % C, false, W, r0.data());
          bn_relu_transform<Io>(xp + (2 * oh + 1) * W, scale + p % C, shift + p % C, false, W, r1.data());
          for (int64_t j = 0; j < OW; ++j) {
            op[oh * OW + j] = static_cast<scalar_t>((r0[2 * j] + r0[2 * j + 1] + r1[2 * j] + r1[2 * j + 1]) / acc_t(4));
          }
        }
      }
    });
    return;
  }
  // channels_last: output row (n, oh) from input rows 2 oh and 2 oh + 1; lanes are channels.
  at::parallel_for(0, g.N * OH, std::max<int64_t>(1, kGrain / (2 * W * C)), [&](int64_t r0, int64_t r1) {
    std::vector<acc_t> buf(2 * W * C);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / OH, oh = r % OH;
      for (int kh = 0; kh < 2; ++kh) {
        const scalar_t* row = x + (n * H + 2 * oh + kh) * W * C;
        for (int64_t iw = 0; iw < 2 * OW; ++iw) {
          bn_relu_transform<Io>(row + iw * C, scale, shift, true, C, buf.data() + (kh * W + iw) * C);
        }
      }
      for (int64_t ow = 0; ow < OW; ++ow) {
        const acc_t* a00 = buf.data() + 2 * ow * C;
        const acc_t* a01 = a00 + C;
        const acc_t* a10 = a00 + W * C;
        const acc_t* a11 = a10 + C;
        scalar_t* o = out + (r * OW + ow) * C;
        for (int64_t c = 0; c < C; ++c) o[c] = static_cast<scalar_t>((a00[c] + a01[c] + a10[c] + a11[c]) / acc_t(4));
      }
    }
  });
}

// Planes mode: the pool-gradient row go (OW values) divided by 4 and spread over the W columns of
// its window rows (up[2j] = up[2j + 1] = go[j] / 4; 0 in an odd last column, which no window holds).
template <typename scalar_t>
inline void transition_grad_row(const scalar_t* go, int64_t W, at::opmath_type<scalar_t>* up) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t OW = half_floor(W);
  for (int64_t j = 0; j < OW; ++j) up[2 * j] = up[2 * j + 1] = static_cast<acc_t>(go[j]) / acc_t(4);
  if (W % 2 != 0) up[W - 1] = acc_t(0);
}

// g' = gv where the ReLU passed (!(y <= 0), y = round(x * scale + shift): bn_apply's value), else 0.
template <typename Io>
inline void relu_gate(const typename Io::AVec* xv, const typename Io::AVec* s, const typename Io::AVec* b,
                      typename Io::AVec* gv) {
  using AVec = typename Io::AVec;
  AVec y[Io::kVecs];
  forward_value<Io, false>(xv, s, b, nullptr, 0, Io::kStep, y);
  Io::round(y);
  const AVec zero(typename Io::acc_t(0));
  for (int j = 0; j < Io::kVecs; ++j) gv[j] = AVec::blendv(gv[j], zero, y[j] <= zero);
}

template <typename scalar_t>
void transition_pool_bwd_kernel(const Geometry& g, int64_t H, int64_t W, const scalar_t* gout, const scalar_t* x,
                                const at::opmath_type<scalar_t>* mean, const at::opmath_type<scalar_t>* scale,
                                const at::opmath_type<scalar_t>* shift, const at::opmath_type<scalar_t>* invstd,
                                bool training, scalar_t* dx, at::opmath_type<scalar_t>* sum_g,
                                at::opmath_type<scalar_t>* sum_gx) {
  using Io = typename IoOf<scalar_t>::type;
  using AVec = typename Io::AVec;
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int S = Io::kStep, V = Io::kVecs;
  const int64_t OH = half_floor(H), OW = half_floor(W), C = g.C, N = g.N;
  const AVec zero(acc_t(0)), quarter(acc_t(0.25));
  // Pass 1: Σ g' and Σ g' (x - mean) per channel (vector sums per plane / per row, added in double).
  std::vector<double> sg(C, 0.0), sgx(C, 0.0);
  if (!g.rows) {
    at::parallel_for(0, C, std::max<int64_t>(1, kGrain / std::max<int64_t>(1, N * H * W)), [&](int64_t c0, int64_t c1) {
      std::vector<acc_t> up(W + S);
      for (int64_t c = c0; c < c1; ++c) {
        AVec sv[V], bv[V], mu[V];
        for (int j = 0; j < V; ++j) {
          sv[j] = AVec(scale[c]);
          bv[j] = AVec(shift[c]);
          mu[j] = AVec(mean[c]);
        }
        double s = 0.0, sx = 0.0;
        for (int64_t n = 0; n < N; ++n) {
          const int64_t p = n * C + c;
          AVec a[V], b[V];
          for (int j = 0; j < V; ++j) a[j] = b[j] = zero;
          for (int64_t ih = 0; ih < 2 * OH; ++ih) {
            if (ih % 2 == 0) transition_grad_row<scalar_t>(gout + (p * OH + ih / 2) * OW, W, up.data());
            const scalar_t* xr = x + (p * H + ih) * W;
            for (int64_t w = 0; w < W; w += S) {
              const int m = static_cast<int>(std::min<int64_t>(S, W - w));
              AVec xv[V], gv[V];
              Io::load(xr + w, xv, m);
              load_channels<Io>(up.data() + w, m, gv);  // lanes past m: 0
              relu_gate<Io>(xv, sv, bv, gv);
              for (int j = 0; j < V; ++j) {
                a[j] = a[j] + gv[j];
                b[j] = b[j] + gv[j] * (xv[j] - mu[j]);
              }
            }
          }
          s += hsum<Io>(a);
          sx += hsum<Io>(b);
        }
        sg[c] = s;
        sgx[c] = sx;
      }
    });
  } else {
    // Partials over a fixed split of the N * 2 OH window rows (the shape fixes it, not the
    // thread count), combined in order.
    const int64_t rows = N * 2 * OH;
    const int64_t P = std::clamp<int64_t>(rows, 1, 64);
    std::vector<double> pg(P * C, 0.0), pgx(P * C, 0.0);
    at::parallel_for(0, P, 1, [&](int64_t q0, int64_t q1) {
      std::vector<acc_t> bs_buf(C), bsx_buf(C);
      acc_t* const bs = bs_buf.data();
      acc_t* const bsx = bsx_buf.data();
      for (int64_t q = q0; q < q1; ++q) {
        double* dg = pg.data() + q * C;
        double* dgx = pgx.data() + q * C;
        for (int64_t r = rows * q / P; r < rows * (q + 1) / P; ++r) {
          const int64_t n = r / (2 * OH), ih = r % (2 * OH);
          std::fill(bs, bs + C, acc_t(0));
          std::fill(bsx, bsx + C, acc_t(0));
          for (int64_t iw = 0; iw < 2 * OW; ++iw) {
            const scalar_t* xp = x + ((n * H + ih) * W + iw) * C;
            const scalar_t* go = gout + ((n * OH + ih / 2) * OW + iw / 2) * C;
            for_each_channel_step<Io>(C, [=](int64_t c, int m) {
              AVec xv[V], gv[V], sv[V], bv[V], mu[V], a[V], b[V];
              Io::load(xp + c, xv, m);
              Io::load(go + c, gv, m);
              for (int j = 0; j < V; ++j) gv[j] = gv[j] * quarter;
              load_channels<Io>(scale + c, m, sv);
              load_channels<Io>(shift + c, m, bv);
              relu_gate<Io>(xv, sv, bv, gv);
              load_channels<Io>(mean + c, m, mu);
              load_channels<Io>(bs + c, m, a);
              load_channels<Io>(bsx + c, m, b);
              for (int j = 0; j < V; ++j) {
                a[j] = a[j] + gv[j];
                b[j] = b[j] + gv[j] * (xv[j] - mu[j]);
              }
              store_channels<Io>(bs + c, m, a);
              store_channels<Io>(bsx + c, m, b);
            });
          }
          for (int64_t c = 0; c < C; ++c) {
            dg[c] += bs[c];
            dgx[c] += bsx[c];
          }
        }
      }
    });
    for (int64_t q = 0; q < P; ++q) {
      for (int64_t c = 0; c < C; ++c) {
        sg[c] += pg[q * C + c];
        sgx[c] += pgx[q * C + c];
      }
    }
  }
  // dx = a g' + b x + c (fastblocks/ops/batchnorm.py), coefficients in double.
  std::vector<acc_t> ca(C), cb(C), cc(C);
  const double count = static_cast<double>(N * H * W);
  for (int64_t c = 0; c < C; ++c) {
    sum_g[c] = static_cast<acc_t>(sg[c]);
    sum_gx[c] = static_cast<acc_t>(sgx[c]);
    const double sc = scale[c], is = invstd[c];
    const double b = training ? -sc * is * is * static_cast<double>(sum_gx[c]) / count : 0.0;
    ca[c] = static_cast<acc_t>(sc);
    cb[c] = static_cast<acc_t>(b);
    cc[c] = static_cast<acc_t>(training ? -sc * static_cast<double>(sum_g[c]) / count - b * mean[c] : 0.0);
  }
  const acc_t* const pa = ca.data();
  const acc_t* const pb = cb.data();
  const acc_t* const pc = cc.data();
  // Pass 2: dx.
  if (!g.rows) {
    at::parallel_for(0, N * C, std::max<int64_t>(1, kGrain / (H * W)), [&](int64_t p0, int64_t p1) {
      std::vector<acc_t> up(W + S);
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t c = p % C;
        AVec sv[V], bv[V], av[V], bbv[V], ccv[V];
        for (int j = 0; j < V; ++j) {
          sv[j] = AVec(scale[c]);
          bv[j] = AVec(shift[c]);
          av[j] = AVec(pa[c]);
          bbv[j] = AVec(pb[c]);
          ccv[j] = AVec(pc[c]);
        }
        for (int64_t ih = 0; ih < H; ++ih) {
          const bool in_window = ih < 2 * OH;
          if (in_window && ih % 2 == 0) transition_grad_row<scalar_t>(gout + (p * OH + ih / 2) * OW, W, up.data());
          const scalar_t* xr = x + (p * H + ih) * W;
          scalar_t* d = dx + (p * H + ih) * W;
          for (int64_t w = 0; w < W; w += S) {
            const int m = static_cast<int>(std::min<int64_t>(S, W - w));
            AVec xv[V], gv[V], out[V];
            Io::load(xr + w, xv, m);
            if (in_window) {
              load_channels<Io>(up.data() + w, m, gv);
              relu_gate<Io>(xv, sv, bv, gv);
            } else {
              for (int j = 0; j < V; ++j) gv[j] = zero;
            }
            for (int j = 0; j < V; ++j) out[j] = av[j] * gv[j] + bbv[j] * xv[j] + ccv[j];
            Io::store(d + w, out, m);
          }
        }
      }
    });
    return;
  }
  at::parallel_for(0, N * H, std::max<int64_t>(1, kGrain / (W * C)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / H, ih = r % H;
      for (int64_t iw = 0; iw < W; ++iw) {
        const int64_t off = ((n * H + ih) * W + iw) * C;
        const scalar_t* xp = x + off;
        scalar_t* d = dx + off;
        const bool in_window = ih < 2 * OH && iw < 2 * OW;
        const scalar_t* go = in_window ? gout + ((n * OH + ih / 2) * OW + iw / 2) * C : nullptr;
        for_each_channel_step<Io>(C, [=](int64_t c, int m) {
          AVec xv[V], gv[V], av[V], bbv[V], ccv[V], out[V];
          Io::load(xp + c, xv, m);
          if (go != nullptr) {
            AVec sv[V], bv[V];
            Io::load(go + c, gv, m);
            for (int j = 0; j < V; ++j) gv[j] = gv[j] * quarter;
            load_channels<Io>(scale + c, m, sv);
            load_channels<Io>(shift + c, m, bv);
            relu_gate<Io>(xv, sv, bv, gv);
          } else {
            for (int j = 0; j < V; ++j) gv[j] = zero;
          }
          load_channels<Io>(pa + c, m, av);
          load_channels<Io>(pb + c, m, bbv);
          load_channels<Io>(pc + c, m, ccv);
          for (int j = 0; j < V; ++j) out[j] = av[j] * gv[j] + bbv[j] * xv[j] + ccv[j];
          Io::store(d + c, out, m);
        });
      }
    }
  });
}

void check_transition_x(const at::Tensor& x, const char* op, bool channels_last) {
  check_x(x, op, channels_last);
  TORCH_CHECK(x.dim() == 4, "fastblocks::", op, ": x must be 4-D [N, C, H, W], got shape ", x.sizes());
  TORCH_CHECK(x.size(2) >= 2 && x.size(3) >= 2, "fastblocks::", op, ": x must be at least 2x2 for the 2x2 pool, got ",
              x.size(2), "x", x.size(3));
}

at::Tensor transition_pool_fwd_cpu(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                                   bool channels_last) {
  constexpr const char* op = "transition_pool_fwd";
  check_transition_x(x, op, channels_last);
  const at::Tensor sc = channel_vector(scale, "scale", x, op);
  const at::Tensor sh = channel_vector(shift, "shift", x, op);
  const auto fmt = format_of(channels_last);
  const at::Tensor xc = x.contiguous(fmt);
  const int64_t H = x.size(2), W = x.size(3);
  at::Tensor out = at::empty({x.size(0), x.size(1), half_floor(H), half_floor(W)}, x.options(), fmt);
  if (out.numel() == 0) return out;
  const Geometry g = geometry_of(xc, channels_last);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "transition_pool_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    transition_pool_fwd_kernel<scalar_t>(g, H, W, xc.const_data_ptr<scalar_t>(), sc.const_data_ptr<acc_t>(),
                                         sh.const_data_ptr<acc_t>(), out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> transition_pool_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& scale,
    const at::Tensor& shift, const at::Tensor& invstd, bool training, bool channels_last) {
  constexpr const char* op = "transition_pool_bwd";
  check_transition_x(x, op, channels_last);
  const int64_t H = x.size(2), W = x.size(3);
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) == x.size(0) && grad_out.size(1) == x.size(1) &&
                  grad_out.size(2) == half_floor(H) && grad_out.size(3) == half_floor(W),
              "fastblocks::", op, ": grad_out has shape ", grad_out.sizes(), ", which is not the 2x2/2 pool of x ",
              x.sizes());
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type(), "fastblocks::", op, ": grad_out has dtype ",
              grad_out.scalar_type(), " but x has dtype ", x.scalar_type());
  TORCH_CHECK(grad_out.device() == x.device(), "fastblocks::", op, ": grad_out is on ", grad_out.device(),
              " but x is on ", x.device());
  const at::Tensor mu = channel_vector(mean, "mean", x, op);
  const at::Tensor sc = channel_vector(scale, "scale", x, op);
  const at::Tensor sh = channel_vector(shift, "shift", x, op);
  const at::Tensor is = channel_vector(invstd, "invstd", x, op);
  const auto fmt = format_of(channels_last);
  const at::Tensor xc = x.contiguous(fmt);
  const at::Tensor gc = grad_out.contiguous(fmt);
  at::Tensor dx = at::empty(x.sizes(), x.options(), fmt);
  at::Tensor sum_g = at::zeros({x.size(1)}, x.options().dtype(acc_type_of(x)));
  at::Tensor sum_gx = at::zeros({x.size(1)}, x.options().dtype(acc_type_of(x)));
  if (x.numel() == 0) return {dx, sum_g, sum_gx};
  const Geometry g = geometry_of(xc, channels_last);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "transition_pool_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    transition_pool_bwd_kernel<scalar_t>(g, H, W, gc.const_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(),
                                         mu.const_data_ptr<acc_t>(), sc.const_data_ptr<acc_t>(),
                                         sh.const_data_ptr<acc_t>(), is.const_data_ptr<acc_t>(), training,
                                         dx.mutable_data_ptr<scalar_t>(), sum_g.mutable_data_ptr<acc_t>(),
                                         sum_gx.mutable_data_ptr<acc_t>());
  });
  return {dx, sum_g, sum_gx};
}


}  // namespace cpu

TORCH_LIBRARY_IMPL(fastblocks, CPU, m) {
  m.impl("transition_pool_fwd", &cpu::transition_pool_fwd_cpu);
  m.impl("transition_pool_bwd", &cpu::transition_pool_bwd_cpu);
}

}  // namespace fastblocks
