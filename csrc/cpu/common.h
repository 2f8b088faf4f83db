// The CPU kernels' shared machinery (csrc/cpu/*.cpp): vector I/O per dtype, the geometry of an
// x-sized tensor (planes [N*C][HW] or rows [M][C]), the elementwise driver, the reduction tiling,
// the argument checks and bn_apply's BN-ReLU value. The templated BatchNorm kernels are in
// bn_kernels.h; the ops live in batchnorm.cpp (the BatchNorm family), stem.cpp (BN-ReLU-maxpool),
// transition.cpp (BN-ReLU-avgpool) and dense_layer.cpp (one dense layer each way). The layout,
// the two-level statistics and the rounding rules are described in batchnorm.cpp's header.
//
// Everything here is in fastblocks::cpu; functions defined here are inline (or templates).
#pragma once

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

#include "../checks.h"

namespace fastblocks {
namespace cpu {

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
  // Rows mode: the stride between rows of x, C when x is dense; larger for a channel prefix
  // x[:, :C] of a wider channels_last tensor (rows [N*H*W][C_total]), read in place likewise.
  // Every other x-sized tensor is dense (or, where a kernel says so, laid out as x).
  int64_t xsr = 0;
  int64_t M() const { return N * HW; }
  bool x_dense() const { return rows ? xsr == C : xsn == C * HW; }
  // x's offset of the dense offset off (planes mode; off in plane `plane` = n * C + c).
  int64_t x_delta(int64_t plane) const { return (plane / C) * (xsn - C * HW); }
};

inline Geometry geometry_of(const at::Tensor& x, bool channels_last) {
  int64_t hw = 1;
  for (int64_t d = 2; d < x.dim(); ++d) hw *= x.size(d);
  return {x.size(0), x.size(1), hw, channels_last || hw == 1, x.size(1) * hw, x.size(1)};
}

// The spacing of x's rows when x reads as rows [N*H*W][C] with channels innermost and evenly
// spaced rows (a channels_last tensor, or a channel slice of one; NCHW with H = W = 1), else 0.
inline int64_t row_stride(const at::Tensor& x) {
  if (x.dim() != 4 || (x.size(1) > 1 && x.stride(1) != 1)) return 0;
  const int64_t H = x.size(2), W = x.size(3);
  const int64_t ld = W > 1 ? x.stride(3) : H > 1 ? x.stride(2) : x.stride(0) / std::max<int64_t>(1, H * W);
  if ((W > 1 && x.stride(3) != ld) || (H > 1 && x.stride(2) != W * ld) || (x.size(0) > 1 && x.stride(0) != H * W * ld)) {
    return 0;
  }
  return ld;
}


// x as the kernels read it: itself when it is a channel prefix of a wider tensor (planes mode:
// NCHW, g.xsn set to its image stride; rows mode: channels_last, g.xsr set to its row stride),
// else dense in the chosen layout (a copy if it is not).
inline at::Tensor x_operand(const at::Tensor& x, bool channels_last, Geometry& g) {
  g.xsn = g.C * g.HW;
  g.xsr = g.C;
  if (!g.rows && x.dim() == 4 && x.size(0) > 1 && x.stride(3) == 1 && x.stride(2) == x.size(3) &&
      x.stride(1) == g.HW && x.stride(0) > g.C * g.HW) {
    g.xsn = x.stride(0);
    return x;
  }
  if (g.rows && g.M() > 1) {
    const int64_t ld = row_stride(x);
    if (ld > g.C) {
      g.xsr = ld;
      return x;
    }
  }
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
      const int64_t C = g.C, ldx = g.xsr;
      AVec p[kP][Io::kVecs];
      for (int64_t r = r0; r < r1; ++r) {
        // Full steps with a constant width (the compiler folds the partial-vector paths away).
        for_each_channel_step<Io>(C, [&](int64_t c, int n) {
          for (size_t k = 0; k < kP; ++k) load_channels<Io>(prm[k] + c, n, p[k]);
          fn(r * C + c, r * ldx + c, n, p);
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

inline Tiling tiling_of(const Geometry& g) {
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

// ----------------------------------------------------------------------------- checks and ops
// The argument checks (check_x, check_like_x, channel_vector, ...) are csrc/checks.h, shared
// with the CUDA host glue.

// ----------------------------------------------------------------------------- BN-ReLU values
// Transform n consecutive elements of x (params: one per element when p_step == 1, else one for
// all) into a = relu(round(fma(x, s, b))) in the accumulation type: bn_apply's arithmetic.
template <typename Io>
inline void bn_relu_transform(const typename Io::scalar_t* x, const typename Io::acc_t* s,
                              const typename Io::acc_t* b, bool per_element, int64_t n, typename Io::acc_t* out) {
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


}  // namespace cpu
}  // namespace fastblocks
