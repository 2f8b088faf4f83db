// The templated BatchNorm kernels of the CPU backend (statistics, apply, backward sums, backward
// apply), instantiated by batchnorm.cpp, and the BatchNorm ops that dense_layer.cpp calls
// directly. The machinery they run on is in common.h; the method is in batchnorm.cpp's header.
#pragma once

#include "common.h"

namespace fastblocks {
namespace cpu {


// ----------------------------------------------------------------------------- bn_stats_fwd
template <typename Io>
struct MeanM2 {
  typename Io::acc_t mean, m2;
};

// Two-pass (count, mean, M2) over `planes` runs of `len` elements at p, p + stride, ...
template <typename Io>
MeanM2<Io> runs_mean_m2(const typename Io::scalar_t* p, int64_t stride, int64_t planes, int64_t len) {
  using AVec = typename Io::AVec;
  using acc_t = typename Io::acc_t;
  constexpr int S = Io::kStep, V = Io::kVecs;
  const AVec zero(acc_t(0));
  AVec s0[V], s1[V], v[V], w[V];
  for (int j = 0; j < V; ++j) s0[j] = s1[j] = zero;
  for (int64_t pl = 0; pl < planes; ++pl) {
    const auto* q = p + pl * stride;
    int64_t i = 0;
    for (; i + 2 * S <= len; i += 2 * S) {  // two chains: the adds' latency, not their rate, bounds one
      Io::load(q + i, v, S);
      Io::load(q + i + S, w, S);
      for (int j = 0; j < V; ++j) {
        s0[j] = s0[j] + v[j];
        s1[j] = s1[j] + w[j];
      }
    }
    for (; i < len; i += S) {
      Io::load(q + i, v, static_cast<int>(std::min<int64_t>(S, len - i)));  // zero-filled tail
      for (int j = 0; j < V; ++j) s0[j] = s0[j] + v[j];
    }
  }
  for (int j = 0; j < V; ++j) s0[j] = s0[j] + s1[j];
  const acc_t n = static_cast<acc_t>(planes * len);
  const acc_t mu = hsum<Io>(s0) / n;
  const AVec muv(mu);
  AVec q0[V], q1[V], d0[V], d1[V];
  for (int j = 0; j < V; ++j) q0[j] = q1[j] = d0[j] = d1[j] = zero;
  for (int64_t pl = 0; pl < planes; ++pl) {
    const auto* q = p + pl * stride;
    int64_t i = 0;
    for (; i + 2 * S <= len; i += 2 * S) {
      Io::load(q + i, v, S);
      Io::load(q + i + S, w, S);
      for (int j = 0; j < V; ++j) {
        const AVec a = v[j] - muv, b = w[j] - muv;
        q0[j] = q0[j] + a * a;
        q1[j] = q1[j] + b * b;
        d0[j] = d0[j] + a;
        d1[j] = d1[j] + b;
      }
    }
    for (; i < len; i += S) {
      const int m = static_cast<int>(std::min<int64_t>(S, len - i));
      Io::load(q + i, v, m);
      for (int j = 0; j < V; ++j) v[j] = v[j] - muv;
      if (m < S) zero_tail<Io>(v, m);
      for (int j = 0; j < V; ++j) {
        q0[j] = q0[j] + v[j] * v[j];
        d0[j] = d0[j] + v[j];
      }
    }
  }
  for (int j = 0; j < V; ++j) {
    q0[j] = q0[j] + q1[j];
    d0[j] = d0[j] + d1[j];
  }
  const acc_t sd = hsum<Io>(d0);
  return {mu + sd / n, std::max(acc_t(0), hsum<Io>(q0) - sd * sd / n)};
}

// (mean, M2) per channel of rows [r0, r1) of a [M][C] tensor: blocks of B rows (B*C ~ kRowBlock
// elements, still in L2 for the second pass), each two-pass around its own mean, folded into the
// run's (mean, M2) with Chan's formula in double. Within a block, channels go in groups of
// kStatSteps steps whose accumulators stay in registers while the group's segment of every row
// is read: a narrow tensor is read in row order, a wide one in a few column strips of the
// L2-resident block. (Accumulating into per-channel arrays row after row instead costs a load
// and a store of each accumulator per element read.)
template <typename Io, bool kFull>
void rows_group_mean_m2(const typename Io::scalar_t* x, int64_t ldx, int64_t b0, int64_t b1, int64_t c0, int cw,
                        typename Io::acc_t* mb, typename Io::acc_t* qb, typename Io::acc_t* db) {
  using AVec = typename Io::AVec;
  using acc_t = typename Io::acc_t;
  constexpr int V = Io::kVecs, S = Io::kStep, G = kStatSteps<Io>;
  const AVec zero(acc_t(0));
  int m[G];
  for (int g = 0; g < G; ++g) m[g] = kFull ? S : static_cast<int>(std::clamp<int64_t>(cw - g * S, 0, S));
  AVec acc[G][V], v[V];
  for (int g = 0; g < G; ++g) {
    for (int j = 0; j < V; ++j) acc[g][j] = zero;
  }
  for (int64_t row = b0; row < b1; ++row) {
    const auto* xr = x + row * ldx + c0;
    for (int g = 0; g < G; ++g) {
      if (!kFull && m[g] == 0) break;
      Io::load(xr + g * S, v, m[g]);
      for (int j = 0; j < V; ++j) acc[g][j] = acc[g][j] + v[j];
    }
  }
  const AVec nb(static_cast<acc_t>(b1 - b0));
  AVec mu[G][V], q[G][V];
  for (int g = 0; g < G; ++g) {
    for (int j = 0; j < V; ++j) {
      mu[g][j] = acc[g][j] / nb;
      acc[g][j] = q[g][j] = zero;  // acc now sums the deviations
    }
  }
  for (int64_t row = b0; row < b1; ++row) {
    const auto* xr = x + row * ldx + c0;
    for (int g = 0; g < G; ++g) {
      if (!kFull && m[g] == 0) break;
      Io::load(xr + g * S, v, m[g]);  // lanes past m: zero, their sums are never stored
      for (int j = 0; j < V; ++j) {
        const AVec e = v[j] - mu[g][j];
        q[g][j] = q[g][j] + e * e;
        acc[g][j] = acc[g][j] + e;
      }
    }
  }
  for (int g = 0; g < G; ++g) {
    for (int j = 0; j < V; ++j) {
      const int o = g * S + j * AVec::size();
      mu[g][j].store(mb + o);
      q[g][j].store(qb + o);
      acc[g][j].store(db + o);
    }
  }
}

// x: rows ldx elements apart (ldx >= C: a channel prefix of a wider channels_last tensor).
template <typename Io>
void rows_run_mean_m2(const typename Io::scalar_t* x, int64_t C, int64_t ldx, int64_t r0, int64_t r1,
                      double* mean_out, double* m2_out) {
  using acc_t = typename Io::acc_t;
  constexpr int W = kStatSteps<Io> * Io::kStep;  // channels per group
  const int64_t B = std::clamp<int64_t>(kRowBlock / std::max<int64_t>(C, 1), 8, 256);
  __at_align__ acc_t mb[W], qb[W], db[W];
  std::fill(mean_out, mean_out + C, 0.0);
  std::fill(m2_out, m2_out + C, 0.0);
  double n = 0;
  for (int64_t b0 = r0; b0 < r1; b0 += B) {
    const int64_t b1 = std::min(r1, b0 + B);
    const double nbd = static_cast<double>(b1 - b0), tot = n + nbd, fb = nbd / tot;
    for (int64_t c0 = 0; c0 < C; c0 += W) {
      const int cw = static_cast<int>(std::min<int64_t>(W, C - c0));
      if (cw == W) {
        rows_group_mean_m2<Io, true>(x, ldx, b0, b1, c0, cw, mb, qb, db);
      } else {
        rows_group_mean_m2<Io, false>(x, ldx, b0, b1, c0, cw, mb, qb, db);
      }
      for (int i = 0; i < cw; ++i) {
        const double dc = db[i];
        const double mean_b = static_cast<double>(mb[i]) + dc / nbd;
        const double m2b = std::max(0.0, static_cast<double>(qb[i]) - dc * dc / nbd);
        const double delta = mean_b - mean_out[c0 + i];
        mean_out[c0 + i] += delta * fb;
        m2_out[c0 + i] += m2b + delta * delta * n * fb;
      }
    }
    n = tot;
  }
}

template <typename scalar_t>
void stats_kernel(const Geometry& g, const scalar_t* x, at::opmath_type<scalar_t>* mean_out,
                  at::opmath_type<scalar_t>* var_out) {
  using Io = typename IoOf<scalar_t>::type;
  using acc_t = typename Io::acc_t;
  const Tiling t = tiling_of(g);
  const int64_t P = t.parts();
  std::vector<double> pmean(P * g.C), pm2(P * g.C);
  at::parallel_for(0, t.tiles(), t.grain(), [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) {
      if (g.rows) {
        rows_run_mean_m2<Io>(x, g.C, g.xsr, t.run_begin(tile), t.run_begin(tile + 1), pmean.data() + tile * g.C,
                             pm2.data() + tile * g.C);
      } else {
        const PlaneTile pt = plane_tile(t, tile);
        const int64_t n0 = pt.gi * t.G, start = pt.k * t.L;
        const auto r = runs_mean_m2<Io>(x + n0 * g.xsn + pt.c * g.HW + start, g.xsn, std::min(t.G, g.N - n0),
                                        std::min(t.L, g.HW - start));
        const int64_t q = pt.gi * t.kp + pt.k;
        pmean[q * g.C + pt.c] = r.mean;
        pm2[q * g.C + pt.c] = r.m2;
      }
    }
  });
  // Chan et al.: (n_a, mean_a, M2_a) + (n_b, mean_b, M2_b), with delta = mean_b - mean_a:
  //   mean = mean_a + delta n_b / n,  M2 = M2_a + M2_b + delta² n_a n_b / n.
  // In double (keeps the mean within 0.5 ulp of fp32). Counts are the same for every channel, so
  // n_a and n_b / n are per part; the loop runs over contiguous channels (vectorized, streamed).
  std::vector<double> na(P), fb(P);
  double total = 0;
  for (int64_t q = 0; q < P; ++q) {
    const double nb = static_cast<double>(t.count(q));
    na[q] = total;
    total += nb;
    fb[q] = nb / total;
  }
  at::parallel_for(0, g.C, std::max<int64_t>(1, kGrain / P), [&](int64_t c0, int64_t c1) {
    std::vector<double> mean(pmean.begin() + c0, pmean.begin() + c1), m2(pm2.begin() + c0, pm2.begin() + c1);
    for (int64_t q = 1; q < P; ++q) {
      const double* pm = pmean.data() + q * g.C + c0;
      const double* pq = pm2.data() + q * g.C + c0;
      for (int64_t i = 0; i < c1 - c0; ++i) {
        const double delta = pm[i] - mean[i];
        mean[i] += delta * fb[q];
        m2[i] += pq[i] + delta * delta * na[q] * fb[q];
      }
    }
    for (int64_t i = 0; i < c1 - c0; ++i) {
      mean_out[c0 + i] = static_cast<acc_t>(mean[i]);
      var_out[c0 + i] = static_cast<acc_t>(m2[i] / total);
    }
  });
}

// ----------------------------------------------------------------------------- bn_apply
template <typename scalar_t, bool kRelu, bool kRes>
void apply_kernel(const Geometry& g, const scalar_t* x, const at::opmath_type<scalar_t>* scale,
                  const at::opmath_type<scalar_t>* shift, const scalar_t* r, scalar_t* y) {
  using Io = typename IoOf<scalar_t>::type;
  using AVec = typename Io::AVec;
  for_each_step<Io, 2>(g, {scale, shift}, [=](int64_t off, int64_t xoff, int n, const AVec (&p)[2][Io::kVecs]) {
    AVec xv[Io::kVecs], yv[Io::kVecs];
    Io::load(x + xoff, xv, n);
    forward_value<Io, kRes>(xv, p[0], p[1], r, off, n, yv);
    if constexpr (kRelu) {
      // maximum propagates NaN, as torch.relu; relu(round(v)) == round(relu(v)), so the store's
      // rounding gives eager's value.
      for (int j = 0; j < Io::kVecs; ++j) yv[j] = at::vec::maximum(yv[j], AVec(typename Io::acc_t(0)));
    }
    Io::store(y + off, yv, n);
  });
}

// ----------------------------------------------------------------------------- bn_bwd_reduce
// kAcc: also acc += scale * g' (acc read and written through x's offsets; bn_bwd_reduce_add_).
template <typename Io, bool kRelu, bool kRes, bool kAcc = false>
void runs_bwd_sums(const typename Io::scalar_t* gy, const typename Io::scalar_t* x, const typename Io::scalar_t* r,
                   int64_t base, int64_t stride, int64_t x_base, int64_t x_stride, int64_t planes, int64_t len,
                   typename Io::acc_t mean,
                   typename Io::acc_t scale, typename Io::acc_t shift, typename Io::acc_t* sg_out,
                   typename Io::acc_t* sgx_out, typename Io::scalar_t* acc = nullptr) {
  using AVec = typename Io::AVec;
  using acc_t = typename Io::acc_t;
  constexpr int S = Io::kStep, V = Io::kVecs;
  const AVec zero(acc_t(0)), mu(mean);
  AVec sv[V], bv[V], sg[V], sgx[V], xv[V], gv[V];
  for (int j = 0; j < V; ++j) {
    sv[j] = AVec(scale);
    bv[j] = AVec(shift);
    sg[j] = sgx[j] = zero;
  }
  for (int64_t pl = 0; pl < planes; ++pl) {
    const int64_t off0 = base + pl * stride, xoff0 = x_base + pl * x_stride;
    for (int64_t i = 0; i < len; i += S) {
      const int m = static_cast<int>(std::min<int64_t>(S, len - i));
      // Lanes past m load g = 0 (so g' = 0) and add nothing to either sum.
      Io::load(x + xoff0 + i, xv, m);
      masked_grad<Io, kRelu, kRes>(gy, xv, sv, bv, r, off0 + i, m, gv);
      for (int j = 0; j < V; ++j) {
        sg[j] = sg[j] + gv[j];
        sgx[j] = sgx[j] + gv[j] * (xv[j] - mu);
      }
      if constexpr (kAcc) {
        AVec av[V];
        Io::load(acc + xoff0 + i, av, m);
        for (int j = 0; j < V; ++j) av[j] = av[j] + sv[j] * gv[j];
        Io::store(acc + xoff0 + i, av, m);
      }
    }
  }
  *sg_out = hsum<Io>(sg);
  *sgx_out = hsum<Io>(sgx);
}

// Σ g' and Σ g' (x - mean) per channel over rows [r0, r1) of [M][C] tensors: fp32 (fp64) sums of
// kSumRows rows at a time in small per-channel arrays, added into the run's sums in double.
// x (and acc, laid out as x) has rows ldx elements apart; gy and r are dense.
template <typename Io, bool kRelu, bool kRes, bool kAcc = false>
void rows_run_bwd_sums(const typename Io::scalar_t* gy, const typename Io::scalar_t* x,
                       const typename Io::scalar_t* r, int64_t C, int64_t ldx, int64_t r0, int64_t r1,
                       const typename Io::acc_t* mean, const typename Io::acc_t* scale,
                       const typename Io::acc_t* shift, double* sg_out, double* sgx_out,
                       typename Io::scalar_t* acc = nullptr) {
  using AVec = typename Io::AVec;
  using acc_t = typename Io::acc_t;
  constexpr int V = Io::kVecs;
  std::vector<acc_t> bg_buf(C), bgx_buf(C);
  acc_t* const bg = bg_buf.data();  // raw pointers, captured by value: see for_each_step
  acc_t* const bgx = bgx_buf.data();
  std::fill(sg_out, sg_out + C, 0.0);
  std::fill(sgx_out, sgx_out + C, 0.0);
  for (int64_t b0 = r0; b0 < r1; b0 += kSumRows) {
    const int64_t b1 = std::min(r1, b0 + kSumRows);
    std::fill(bg, bg + C, acc_t(0));
    std::fill(bgx, bgx + C, acc_t(0));
    for (int64_t row = b0; row < b1; ++row) {
      for_each_channel_step<Io>(C, [=](int64_t c, int m) {
        AVec xv[V], gv[V], mu[V], sv[V], bv[V], a[V], b[V];
        const int64_t off = row * C + c, xoff = row * ldx + c;
        Io::load(x + xoff, xv, m);
        load_channels<Io>(scale + c, m, sv);
        load_channels<Io>(shift + c, m, bv);
        masked_grad<Io, kRelu, kRes>(gy, xv, sv, bv, r, off, m, gv);
        load_channels<Io>(mean + c, m, mu);
        load_channels<Io>(bg + c, m, a);
        load_channels<Io>(bgx + c, m, b);
        for (int j = 0; j < V; ++j) {
          a[j] = a[j] + gv[j];
          b[j] = b[j] + gv[j] * (xv[j] - mu[j]);
        }
        store_channels<Io>(bg + c, m, a);
        store_channels<Io>(bgx + c, m, b);
        if constexpr (kAcc) {
          Io::load(acc + xoff, a, m);
          for (int j = 0; j < V; ++j) a[j] = a[j] + sv[j] * gv[j];
          Io::store(acc + xoff, a, m);
        }
      });
    }
    for (int64_t c = 0; c < C; ++c) {
      sg_out[c] += bg[c];
      sgx_out[c] += bgx[c];
    }
  }
}

template <typename scalar_t, bool kRelu, bool kRes, bool kAcc = false>
void bwd_reduce_kernel(const Geometry& g, const scalar_t* gy, const scalar_t* x, const scalar_t* r,
                       const at::opmath_type<scalar_t>* mean, const at::opmath_type<scalar_t>* scale,
                       const at::opmath_type<scalar_t>* shift, at::opmath_type<scalar_t>* sum_g,
                       at::opmath_type<scalar_t>* sum_gx, scalar_t* acc = nullptr) {
  using Io = typename IoOf<scalar_t>::type;
  using acc_t = typename Io::acc_t;
  const Tiling t = tiling_of(g);
  const int64_t P = t.parts();
  std::vector<double> pg(P * g.C), pgx(P * g.C);
  at::parallel_for(0, t.tiles(), t.grain(), [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) {
      if (g.rows) {
        rows_run_bwd_sums<Io, kRelu, kRes, kAcc>(gy, x, r, g.C, g.xsr, t.run_begin(tile), t.run_begin(tile + 1), mean,
                                                 scale, shift, pg.data() + tile * g.C, pgx.data() + tile * g.C, acc);
      } else {
        const PlaneTile pt = plane_tile(t, tile);
        const int64_t n0 = pt.gi * t.G, start = pt.k * t.L;
        const int64_t q = pt.gi * t.kp + pt.k;
        acc_t sg, sgx;
        runs_bwd_sums<Io, kRelu, kRes, kAcc>(gy, x, r, (n0 * g.C + pt.c) * g.HW + start, g.C * g.HW,
                                             n0 * g.xsn + pt.c * g.HW + start, g.xsn, std::min(t.G, g.N - n0),
                                             std::min(t.L, g.HW - start), mean[pt.c],
                                             scale[pt.c], shift[pt.c], &sg, &sgx, acc);
        pg[q * g.C + pt.c] = sg;
        pgx[q * g.C + pt.c] = sgx;
      }
    }
  });
  at::parallel_for(0, g.C, std::max<int64_t>(1, kGrain / P), [&](int64_t c0, int64_t c1) {
    // Parts' sums added in double, over contiguous channels.
    std::vector<double> a(pg.begin() + c0, pg.begin() + c1), b(pgx.begin() + c0, pgx.begin() + c1);
    for (int64_t q = 1; q < P; ++q) {
      for (int64_t i = 0; i < c1 - c0; ++i) {
        a[i] += pg[q * g.C + c0 + i];
        b[i] += pgx[q * g.C + c0 + i];
      }
    }
    for (int64_t i = 0; i < c1 - c0; ++i) {
      sum_g[c0 + i] = static_cast<acc_t>(a[i]);
      sum_gx[c0 + i] = static_cast<acc_t>(b[i]);
    }
  });
}

// ----------------------------------------------------------------------------- bn_bwd_apply
template <typename scalar_t, bool kRelu, bool kRes>
void bwd_apply_kernel(const Geometry& g, const scalar_t* gy, const scalar_t* x, const scalar_t* r,
                      const at::opmath_type<scalar_t>* scale, const at::opmath_type<scalar_t>* shift,
                      const at::opmath_type<scalar_t>* a, const at::opmath_type<scalar_t>* b,
                      const at::opmath_type<scalar_t>* c, scalar_t* dx) {
  using Io = typename IoOf<scalar_t>::type;
  using AVec = typename Io::AVec;
  for_each_step<Io, 5>(g, {scale, shift, a, b, c}, [=](int64_t off, int64_t xoff, int n,
                                                       const AVec (&p)[5][Io::kVecs]) {
    AVec xv[Io::kVecs], gv[Io::kVecs], out[Io::kVecs];
    Io::load(x + xoff, xv, n);
    masked_grad<Io, kRelu, kRes>(gy, xv, p[0], p[1], r, off, n, gv);
    for (int j = 0; j < Io::kVecs; ++j) out[j] = p[2][j] * gv[j] + p[3][j] * xv[j] + p[4][j];
    Io::store(dx + off, out, n);
  });
}

// ----------------------------------------------------------------------------- ops used across files
// Defined in batchnorm.cpp (schemas in csrc/ops.cpp); dense_layer.cpp calls them directly.
std::tuple<at::Tensor, at::Tensor> bn_stats_fwd_cpu(const at::Tensor& x, bool channels_last);
at::Tensor bn_apply_cpu(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                        const std::optional<at::Tensor>& residual, bool relu, bool channels_last);
std::tuple<at::Tensor, at::Tensor> bn_bwd_reduce_cpu(const at::Tensor& grad_y, const at::Tensor& x,
                                                     const at::Tensor& mean, const at::Tensor& scale,
                                                     const at::Tensor& shift, const std::optional<at::Tensor>& residual,
                                                     bool relu, bool channels_last);
at::Tensor bn_bwd_apply_cpu(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& scale,
                            const at::Tensor& shift, const std::optional<at::Tensor>& residual, const at::Tensor& a,
                            const at::Tensor& b, const at::Tensor& c, bool relu, bool channels_last);
bool reads_like_x(const at::Tensor& t, const Geometry& g, bool channels_last);
std::tuple<at::Tensor, at::Tensor> bn_bwd_reduce_add_cpu(at::Tensor& acc, const at::Tensor& grad_y,
                                                         const at::Tensor& x, const at::Tensor& mean,
                                                         const at::Tensor& scale, const at::Tensor& shift, bool relu,
                                                         bool channels_last);

}  // namespace cpu
}  // namespace fastblocks
