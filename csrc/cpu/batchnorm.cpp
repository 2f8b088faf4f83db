// CPU kernels of the BatchNorm family: fastblocks::bn_stats_fwd, bn_apply, bn_bwd_reduce and
// bn_bwd_apply (schemas in csrc/ops.cpp; the math and the autograd in fastblocks/ops/batchnorm.py),
// and the CPU-only ops built from them: the one-call bn_fused_fwd/bn_fused_bwd, the ImageNet stem's
// stem_pool_fwd/bwd, DenseNet's transition_pool_fwd/bwd, bn_bwd_reduce_add_, dense_layer_fwd_ and
// dense_layer_bwd_ (fastblocks/ops/dense_block.py).
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
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

namespace fastblocks {
namespace {

using at::vec::Vectorized;

constexpr int64_t kGrain = 16384;      // elements per parallel task, at least: amortizes the fork
constexpr int64_t kPlaneTile = 2048;   // elements per planes-mode reduction tile (8 KB in fp32)
constexpr int64_t kRowRun = 65536;     // elements per rows-mode reduction task (a run of whole rows)
constexpr int64_t kRunRows = 32;       // rows per run, at least: the per-run work over C is amortized
constexpr int64_t kMaxRuns = 256;      // rows-mode runs at most (partials per channel)
constexpr int64_t kRowBlock = 65536;   // rows-mode stats: elements per two-pass block (L2-resident)
constexpr int64_t kSumRows = 64;       // rows-mode sums: rows per fp32 block sum, then added in double

// ----------------------------------------------------------------------------- vector I/O
// One "step" is kStep consecutive elements held as kVecs vectors of the accumulation type.
// Loads and stores of n < kStep elements zero-fill / write only the first n lanes.
template <typename T>
struct PlainIo {  // float, double: computed in their own type
  using scalar_t = T;
  using acc_t = T;
  using AVec = Vectorized<T>;
  static constexpr int kVecs = 1;
  static constexpr int kStep = AVec::size();
  static void load(const T* p, AVec* v, int n) { v[0] = n == kStep ? AVec::loadu(p) : AVec::loadu(p, n); }
  static void store(T* p, const AVec* v, int n) {
    if (n == kStep) {
      v[0].store(p);
    } else {
      v[0].store(p, n);
    }
  }
  static void round(AVec*) {}  // storage type == compute type
};

template <typename T>
struct ReducedIo {  // Half, BFloat16: computed in fp32, two float vectors per step
  using scalar_t = T;
  using acc_t = float;
  using AVec = Vectorized<float>;
  using SVec = Vectorized<T>;
  static constexpr int kVecs = 2;
  static constexpr int kStep = SVec::size();
  static_assert(kStep == 2 * AVec::size());
  static void load(const T* p, AVec* v, int n) {
    const SVec s = n == kStep ? SVec::loadu(p) : SVec::loadu(p, static_cast<int16_t>(n));
    std::tie(v[0], v[1]) = at::vec::convert_to_float<T>(s);
  }
  static void store(T* p, const AVec* v, int n) {
    const SVec s = at::vec::convert_from_float<T>(v[0], v[1]);
    if (n == kStep) {
      s.store(p);
    } else {
      s.store(p, n);
    }
  }
  // Round to the storage type and back: the value eager would have stored.
  static void round(AVec* v) {
    std::tie(v[0], v[1]) = at::vec::convert_to_float<T>(at::vec::convert_from_float<T>(v[0], v[1]));
  }
};

template <typename T>
struct IoOf {
  using type = PlainIo<T>;
};
template <>
struct IoOf<at::Half> {
  using type = ReducedIo<at::Half>;
};
template <>
struct IoOf<at::BFloat16> {
  using type = ReducedIo<at::BFloat16>;
};

// Rows-mode statistics: steps per channel group, four accumulator vectors per sum (with the
// data and the means, 16 vector registers).
template <typename Io>
constexpr int kStatSteps = 4 / Io::kVecs;

// The first n lanes of a per-channel fp32/fp64 vector, zero beyond.
template <typename Io>
inline void load_channels(const typename Io::acc_t* p, int n, typename Io::AVec* v) {
  using AVec = typename Io::AVec;
  if (n == Io::kStep) {
    for (int j = 0; j < Io::kVecs; ++j) v[j] = AVec::loadu(p + j * AVec::size());
    return;
  }
  for (int j = 0; j < Io::kVecs; ++j) {
    const int m = n - j * AVec::size();
    v[j] = m >= AVec::size() ? AVec::loadu(p + j * AVec::size())
           : m > 0           ? AVec::loadu(p + j * AVec::size(), m)
                             : AVec(typename Io::acc_t(0));
  }
}

// Store the first n lanes of a step into a per-channel array.
template <typename Io>
inline void store_channels(typename Io::acc_t* p, int n, const typename Io::AVec* v) {
  using AVec = typename Io::AVec;
  if (n == Io::kStep) {
    for (int j = 0; j < Io::kVecs; ++j) v[j].store(p + j * AVec::size());
    return;
  }
  for (int j = 0; j < Io::kVecs; ++j) {
    const int m = std::min<int>(n - j * AVec::size(), AVec::size());
    if (m > 0) v[j].store(p + j * AVec::size(), m);
  }
}

template <typename Io>
inline typename Io::acc_t hsum(const typename Io::AVec* v) {
  using AVec = typename Io::AVec;
  __at_align__ typename Io::acc_t tmp[AVec::size()];
  typename Io::acc_t s = 0;
  for (int j = 0; j < Io::kVecs; ++j) {
    v[j].store(tmp);
    for (int l = 0; l < AVec::size(); ++l) s += tmp[l];
  }
  return s;
}

// Lanes [n, kStep) of a step set to zero.
template <typename Io>
inline void zero_tail(typename Io::AVec* v, int n) {
  using AVec = typename Io::AVec;
  using acc_t = typename Io::acc_t;
  for (int j = 0; j < Io::kVecs; ++j) {
    const AVec lane = AVec::arange(acc_t(j * AVec::size()), acc_t(1));
    v[j] = AVec::blendv(AVec(acc_t(0)), v[j], lane < AVec(acc_t(n)));
  }
}

// y = fma(x, s, b), and with a residual round(fma(x, s, b)) + r (rounded last by the caller or the store).
template <typename Io, bool kRes>
inline void forward_value(const typename Io::AVec* x, const typename Io::AVec* s, const typename Io::AVec* b,
                          const typename Io::scalar_t* r, int64_t off, int n, typename Io::AVec* y) {
  for (int j = 0; j < Io::kVecs; ++j) y[j] = at::vec::fmadd(x[j], s[j], b[j]);
  if constexpr (kRes) {
    typename Io::AVec rv[Io::kVecs];
    Io::load(r + off, rv, n);
    Io::round(y);
    for (int j = 0; j < Io::kVecs; ++j) y[j] = y[j] + rv[j];
  }
}

// g' = grad_y where the forward's ReLU passed (!(y <= 0) on the stored y), else 0.
template <typename Io, bool kRelu, bool kRes>
inline void masked_grad(const typename Io::scalar_t* g, const typename Io::AVec* x, const typename Io::AVec* s,
                        const typename Io::AVec* b, const typename Io::scalar_t* r, int64_t off, int n,
                        typename Io::AVec* gv) {
  using AVec = typename Io::AVec;
  Io::load(g + off, gv, n);
  if constexpr (kRelu) {
    AVec y[Io::kVecs];
    forward_value<Io, kRes>(x, s, b, r, off, n, y);
    Io::round(y);
    const AVec zero(typename Io::acc_t(0));
    for (int j = 0; j < Io::kVecs; ++j) gv[j] = AVec::blendv(gv[j], zero, y[j] <= zero);
  }
}

// ----------------------------------------------------------------------------- geometry
struct Geometry {
  int64_t N, C, HW;
  bool rows;  // walk as rows [N*HW][C] (see the header comment), else planes [N*C][HW]
  // Planes mode: the stride between images of x (the input read through strides), C * HW when
  // x is dense; larger for a channel prefix x[:, :C] of a wider NCHW tensor (a dense block's
  // buffer), which the kernels read in place instead of copying. Every other x-sized tensor is
  // dense. Rows mode: x is dense.
  int64_t xsn = 0;
  int64_t M() const { return N * HW; }
  // x's offset of the dense offset off (planes mode; off in plane `plane` = n * C + c).
  int64_t x_delta(int64_t plane) const { return (plane / C) * (xsn - C * HW); }
};

Geometry geometry_of(const at::Tensor& x, bool channels_last) {
  int64_t hw = 1;
  for (int64_t d = 2; d < x.dim(); ++d) hw *= x.size(d);
  return {x.size(0), x.size(1), hw, channels_last || hw == 1, x.size(1) * hw};
}

at::MemoryFormat format_of(bool channels_last) {
  return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// x as the kernels read it: itself when it is a channel prefix of a wider NCHW tensor (planes
// mode; g.xsn set to its image stride), else dense in the chosen layout (a copy if it is not).
at::Tensor x_operand(const at::Tensor& x, bool channels_last, Geometry& g) {
  if (!g.rows && x.dim() == 4 && x.size(0) > 1 && x.stride(3) == 1 && x.stride(2) == x.size(3) &&
      x.stride(1) == g.HW && x.stride(0) > g.C * g.HW) {
    g.xsn = x.stride(0);
    return x;
  }
  g.xsn = g.C * g.HW;
  return x.contiguous(format_of(channels_last));
}


// Calls f(c, n) for the steps of one row of C channels: n == kStep but for the last.
template <typename Io, typename F>
inline void for_each_channel_step(int64_t C, const F& f) {
  int64_t c = 0;
  for (; c + Io::kStep <= C; c += Io::kStep) f(c, Io::kStep);
  if (c < C) f(c, static_cast<int>(C - c));
}

// ----------------------------------------------------------------------------- elementwise driver
// Calls op(offset, x_offset, n, p) on every step of a dense x-sized tensor: n <= kStep
// consecutive elements (one channel in planes mode, consecutive channels in rows mode) at
// `offset` in the dense tensors and `x_offset` in x (see Geometry::xsn), and p[k] the
// per-channel vectors params[k] for those lanes.
template <typename Io, size_t kP, typename Op>
void for_each_step(const Geometry& g, const std::array<const typename Io::acc_t*, kP>& params, const Op& op) {
  using AVec = typename Io::AVec;
  constexpr int S = Io::kStep;
  if (!g.rows) {
    at::parallel_for(0, g.N * g.C * g.HW, kGrain, [&](int64_t begin, int64_t end) {
      // Local copies: vector stores may alias anything the compiler cannot see is private, and it
      // would reload every captured pointer after each one.
      const Op fn = op;
      const std::array<const typename Io::acc_t*, kP> prm = params;
      AVec p[kP][Io::kVecs];
      int64_t i = begin;
      int64_t plane = begin / g.HW;  // divisions once per task: planes can be 7x7
      int64_t c = plane % g.C;
      while (i < end) {
        const int64_t stop = std::min(end, (plane + 1) * g.HW);
        const int64_t xd = g.x_delta(plane);
        for (size_t k = 0; k < kP; ++k) {
          for (int j = 0; j < Io::kVecs; ++j) p[k][j] = AVec(prm[k][c]);
        }
        for (; i + S <= stop; i += S) fn(i, i + xd, S, p);
        if (i < stop) {
          fn(i, i + xd, static_cast<int>(stop - i), p);
          i = stop;
        }
        ++plane;
        if (++c == g.C) c = 0;
      }
    });
  } else {
    const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, g.C));
    at::parallel_for(0, g.M(), grain, [&](int64_t r0, int64_t r1) {
      const Op fn = op;
      const std::array<const typename Io::acc_t*, kP> prm = params;
      const int64_t C = g.C;
      AVec p[kP][Io::kVecs];
      for (int64_t r = r0; r < r1; ++r) {
        // Full steps with a constant width (the compiler folds the partial-vector paths away).
        for_each_channel_step<Io>(C, [&](int64_t c, int n) {
          for (size_t k = 0; k < kP; ++k) load_channels<Io>(prm[k] + c, n, p[k]);
          fn(r * C + c, r * C + c, n, p);
        });
      }
    });
  }
}

// ----------------------------------------------------------------------------- reduction tiling
// Planes mode: a tile is channel c, a group of G planes (images n in [n0, n0 + G)) and a chunk of
// each plane's HW; G > 1 when planes are small (7x7) so tiles stay a few thousand elements.
// Rows mode: a tile is a run of whole rows [M q / P, M (q + 1) / P). Partials are [P][C].
struct Tiling {
  Geometry g;
  int64_t G = 1, groups = 1, kp = 1, L = 1;  // planes mode
  int64_t runs = 1;                          // rows mode

  int64_t parts() const { return g.rows ? runs : groups * kp; }
  int64_t tiles() const { return g.rows ? runs : groups * g.C * kp; }
  int64_t grain() const { return g.rows ? 1 : std::max<int64_t>(1, kGrain / (G * L)); }
  int64_t run_begin(int64_t q) const { return g.M() * q / runs; }
  // Elements behind partial q of any channel.
  int64_t count(int64_t q) const {
    if (g.rows) return run_begin(q + 1) - run_begin(q);
    const int64_t gi = q / kp, k = q % kp;
    return std::min(G, g.N - gi * G) * std::min(L, g.HW - k * L);
  }
};

Tiling tiling_of(const Geometry& g) {
  Tiling t;
  t.g = g;
  if (g.rows) {
    const int64_t by_size = (g.M() * g.C + kRowRun - 1) / kRowRun;
    t.runs = std::clamp<int64_t>(std::min(by_size, (g.M() + kRunRows - 1) / kRunRows), 1, kMaxRuns);
  } else {
    t.kp = std::max<int64_t>(1, (g.HW + kPlaneTile - 1) / kPlaneTile);
    t.L = (g.HW + t.kp - 1) / t.kp;
    t.G = std::max<int64_t>(1, kPlaneTile / std::max<int64_t>(1, g.HW));
    t.groups = std::max<int64_t>(1, (g.N + t.G - 1) / t.G);
  }
  return t;
}

// Planes-mode tile index -> (c, group, chunk), ordered so consecutive tiles are adjacent planes.
struct PlaneTile {
  int64_t c, gi, k;
};
inline PlaneTile plane_tile(const Tiling& t, int64_t tile) {
  const int64_t k = tile % t.kp;
  const int64_t rest = tile / t.kp;
  return {rest % t.g.C, rest / t.g.C, k};
}

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
void rows_group_mean_m2(const typename Io::scalar_t* x, int64_t C, int64_t b0, int64_t b1, int64_t c0, int cw,
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
    const auto* xr = x + row * C + c0;
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
    const auto* xr = x + row * C + c0;
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

template <typename Io>
void rows_run_mean_m2(const typename Io::scalar_t* x, int64_t C, int64_t r0, int64_t r1, double* mean_out,
                      double* m2_out) {
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
        rows_group_mean_m2<Io, true>(x, C, b0, b1, c0, cw, mb, qb, db);
      } else {
        rows_group_mean_m2<Io, false>(x, C, b0, b1, c0, cw, mb, qb, db);
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
        rows_run_mean_m2<Io>(x, g.C, t.run_begin(tile), t.run_begin(tile + 1), pmean.data() + tile * g.C,
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
template <typename Io, bool kRelu, bool kRes, bool kAcc = false>
void rows_run_bwd_sums(const typename Io::scalar_t* gy, const typename Io::scalar_t* x,
                       const typename Io::scalar_t* r, int64_t C, int64_t r0, int64_t r1,
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
        const int64_t off = row * C + c;
        Io::load(x + off, xv, m);
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
          Io::load(acc + off, a, m);
          for (int j = 0; j < V; ++j) a[j] = a[j] + sv[j] * gv[j];
          Io::store(acc + off, a, m);
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
        rows_run_bwd_sums<Io, kRelu, kRes, kAcc>(gy, x, r, g.C, t.run_begin(tile), t.run_begin(tile + 1), mean,
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

// ----------------------------------------------------------------------------- checks and ops
at::ScalarType acc_type_of(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_x(const at::Tensor& x, const char* op, bool channels_last) {
  TORCH_CHECK(x.dim() >= 2, "fastblocks::", op, ": x must be [N, C, ...] (at least 2-D), got shape ", x.sizes());
  TORCH_CHECK(!channels_last || x.dim() == 4, "fastblocks::", op, ": channels_last needs a 4-D x, got shape ",
              x.sizes());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble, "fastblocks::", op,
              ": x must be float16, bfloat16, float32 or float64, got ", dt);
}

void check_like_x(const at::Tensor& t, const char* name, const at::Tensor& x, const char* op) {
  TORCH_CHECK(t.sizes() == x.sizes(), "fastblocks::", op, ": ", name, " has shape ", t.sizes(),
              " but x has shape ", x.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "fastblocks::", op, ": ", name, " has dtype ", t.scalar_type(),
              " but x has dtype ", x.scalar_type());
  TORCH_CHECK(t.device() == x.device(), "fastblocks::", op, ": ", name, " is on ", t.device(), " but x is on ",
              x.device());
}

// A per-channel vector: 1-D [C], float32 (float64 for double x), on x's device; made contiguous.
at::Tensor channel_vector(const at::Tensor& v, const char* name, const at::Tensor& x, const char* op) {
  TORCH_CHECK(v.dim() == 1 && v.size(0) == x.size(1), "fastblocks::", op, ": ", name,
              " must be 1-D with one element per channel of x (", x.size(1), "), got shape ", v.sizes());
  TORCH_CHECK(v.scalar_type() == acc_type_of(x), "fastblocks::", op, ": ", name, " must have dtype ",
              acc_type_of(x), " for x of dtype ", x.scalar_type(), ", got ", v.scalar_type());
  TORCH_CHECK(v.device() == x.device(), "fastblocks::", op, ": ", name, " is on ", v.device(), " but x is on ",
              x.device());
  return v.contiguous();
}

// Calls f(std::bool_constant<relu>, std::bool_constant<residual>).
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
  constexpr const char* op = "bn_apply";
  check_x(x, op, channels_last);
  const at::Tensor sc = channel_vector(scale, "scale", x, op);
  const at::Tensor sh = channel_vector(shift, "shift", x, op);
  const bool has_res = residual.has_value() && residual->defined();
  if (has_res) check_like_x(*residual, "residual", x, op);
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
  constexpr const char* op = "bn_bwd_reduce";
  check_x(x, op, channels_last);
  check_like_x(grad_y, "grad_y", x, op);
  const at::Tensor mu = channel_vector(mean, "mean", x, op);
  const at::Tensor sc = channel_vector(scale, "scale", x, op);
  const at::Tensor sh = channel_vector(shift, "shift", x, op);
  const bool has_res = residual.has_value() && residual->defined();
  if (has_res) check_like_x(*residual, "residual", x, op);
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
  constexpr const char* op = "bn_bwd_apply";
  check_x(x, op, channels_last);
  check_like_x(grad_y, "grad_y", x, op);
  const at::Tensor sc = channel_vector(scale, "scale", x, op);
  const at::Tensor sh = channel_vector(shift, "shift", x, op);
  const at::Tensor av = channel_vector(a, "a", x, op);
  const at::Tensor bv = channel_vector(b, "b", x, op);
  const at::Tensor cv = channel_vector(c, "c", x, op);
  const bool has_res = residual.has_value() && residual->defined();
  if (has_res) check_like_x(*residual, "residual", x, op);
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

// Whether t (x-sized) is laid out as the kernels read x: NCHW with x's image stride g.xsn (a
// channel prefix of a wider tensor, see x_operand), or dense in the chosen layout.
bool reads_like_x(const at::Tensor& t, const Geometry& g, bool channels_last) {
  if (!g.rows && t.dim() == 4 && g.xsn != g.C * g.HW) {
    return t.stride(3) == 1 && t.stride(2) == t.size(3) && t.stride(1) == g.HW && t.stride(0) == g.xsn;
  }
  return g.xsn == g.C * g.HW && t.is_contiguous(format_of(channels_last));
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
    if (g.xsn != g.C * g.HW) {
      xc = x.contiguous(fmt);
      g.xsn = g.C * g.HW;
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
// the forward's ReLU mask. The values match the Python path's (_scale_shift) to an ulp or so
// (shift is one fused multiply-add here).

bool has(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

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

// ----------------------------------------------------------------------------- stem: BN-ReLU-maxpool
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

constexpr int kPoolK = 3, kPoolS = 2, kPoolP = 1;

inline int64_t pool_out(int64_t n) { return (n + 2 * kPoolP - kPoolK) / kPoolS + 1; }

// Transform n consecutive elements of x (params: one per element when p_step == 1, else one for
// all) into a = relu(round(fma(x, s, b))) in the accumulation type: bn_apply's arithmetic.
template <typename Io>
inline void stem_transform(const typename Io::scalar_t* x, const typename Io::acc_t* s, const typename Io::acc_t* b,
                           bool per_element, int64_t n, typename Io::acc_t* out) {
  using AVec = typename Io::AVec;
  using acc_t = typename Io::acc_t;
  constexpr int S = Io::kStep, V = Io::kVecs;
  AVec sv[V], bv[V], xv[V], y[V];
  if (!per_element) {
    for (int j = 0; j < V; ++j) {
      sv[j] = AVec(s[0]);
      bv[j] = AVec(b[0]);
    }
  }
  for (int64_t i = 0; i < n; i += S) {
    const int m = static_cast<int>(std::min<int64_t>(S, n - i));
    if (per_element) {
      load_channels<Io>(s + i, m, sv);
      load_channels<Io>(b + i, m, bv);
    }
    Io::load(x + i, xv, m);
    forward_value<Io, false>(xv, sv, bv, nullptr, 0, m, y);
    Io::round(y);
    for (int j = 0; j < V; ++j) y[j] = at::vec::maximum(y[j], AVec(acc_t(0)));
    store_channels<Io>(out + i, m, y);
  }
}

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
              stem_transform<Io>(xp + ih * W, scale + p % C, shift + p % C, false, W, row.data());
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
            stem_transform<Io>(x + ((n * H + ih) * W + iw) * C, scale, shift, true, C, slot + iw * C);
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

// ----------------------------------------------------------------------------- dense layer backward
// dense_layer_bwd_: one layer of the dense block's backward (fastblocks/ops/dense_block.py,
// _DenseBlockFunction.backward, whose derivation and names this follows), for eager calls on the
// CPU without dropout or synchronized statistics: a dozen kernels and two convolution backwards
// around two dozen per-channel steps, which from Python cost microseconds each per layer
// (DenseNet-201 has 98). Scale and shift are computed with the same ATen operations as the
// forward's Python (_scale_shift), so the recomputed ReLU masks are the forward's, bit for bit.

// (scale, shift, invstd) as fastblocks.ops.batchnorm._scale_shift computes them.
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
    // Both NCHW channel slices with the buffer's image stride: updated in place.
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
// and the same operations (scale and shift as _scale_shift, so the backward's recomputation
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

// ----------------------------------------------------------------------------- transition: BN-ReLU-avgpool
// transition_pool_fwd / transition_pool_bwd: DenseNet's transition pools before its 1x1 conv
// (fastblocks/ops/dense_block.py), out = avgpool2x2/2 of a = relu(x * scale + shift) (bn_apply's
// value), without storing a; the backward takes the pool's gradient through the BN-ReLU in two
// passes over x (the sums, then dx) instead of materializing a's and the pool's gradients.
// Windows never overlap and have no padding (floor: an odd last row or column is in no window and
// gets g' = 0). Each window's four values are added in row-major order and divided by 4, as
// F.avg_pool2d does.

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
          stem_transform<Io>(xp + 2 * oh * W, scale + p % C, shift + p % C, false, W, r0.data());
          stem_transform<Io>(xp + (2 * oh + 1) * W, scale + p % C, shift + p % C, false, W, r1.data());
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
          stem_transform<Io>(row + iw * C, scale, shift, true, C, buf.data() + (kh * W + iw) * C);
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

}  // namespace

TORCH_LIBRARY_IMPL(fastblocks, CPU, m) {
  m.impl("bn_stats_fwd", &bn_stats_fwd_cpu);
  m.impl("bn_apply", &bn_apply_cpu);
  m.impl("bn_bwd_reduce", &bn_bwd_reduce_cpu);
  m.impl("bn_bwd_apply", &bn_bwd_apply_cpu);
  m.impl("bn_bwd_reduce_add_", &bn_bwd_reduce_add_cpu);
  m.impl("bn_fused_fwd", &bn_fused_fwd_cpu);
  m.impl("bn_fused_bwd", &bn_fused_bwd_cpu);
  m.impl("stem_pool_fwd", &stem_pool_fwd_cpu);
  m.impl("stem_pool_bwd", &stem_pool_bwd_cpu);
  m.impl("transition_pool_fwd", &transition_pool_fwd_cpu);
  m.impl("dense_layer_bwd_", &dense_layer_bwd_cpu);
  m.impl("dense_layer_fwd_", &dense_layer_fwd_cpu);
  m.impl("transition_pool_bwd", &transition_pool_bwd_cpu);
}

}  // namespace fastblocks
