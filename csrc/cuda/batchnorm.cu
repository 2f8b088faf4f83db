// CUDA kernels of the BatchNorm family: fastblocks::bn_stats_fwd, bn_apply, bn_bwd_reduce and
// bn_bwd_apply (schemas and semantics in csrc/ops.cpp; CPU twins in csrc/cpu/batchnorm.cpp).
//
// Layout. A dense x-sized tensor is walked as planes [N*C][HW] (NCHW) or rows [M][C] (channels_last,
// or HW == 1 where NCHW is [N, C] rows); the channel of flat element i is (i / inner) % C with
// inner = HW or 1.
//
// Elementwise kernels (apply, bwd_apply): grid-stride loops, one 16-byte vector of elements per
// thread and step (scalar fallback when a pointer is not 16-byte aligned). The channel of each
// element is tracked by a cursor that only adds and compares (two divisions per thread in all).
//
// Reductions (stats, bwd_reduce) run in two deterministic stages, no atomics, no host sync:
//   1. blocks of (channel [group], chunk of the channel's M elements) write one partial state per
//      (channel, chunk) into [C][P]: planes use one 256-thread block per (c, chunk); rows use
//      32 channels x 8 rows per block so a warp reads 32 consecutive channels of a row;
//   2. one warp per channel combines its P partials and writes the result.
// Statistics use Welford per thread and Chan et al.'s pairwise combination across threads, warps,
// blocks: stable for large means (x = 1000 + N(0,1)). P depends only on shapes and the SM count.
//
// Arithmetic in fp32 (fp64 for double). Forward value: t = fma(x, scale, shift) rounded to x's dtype,
// y = round(t + residual) (eager's rounding of bn(x) + residual); ReLU keeps NaN; the backward mask
// is !(y <= 0) on that rounded y (threshold_backward's rule). The fma is explicit so the mask
// rebuilt in backward is bit-identical to the forward's ReLU, and equal to the CPU kernels'.
#include "kernels.h"
#include "../checks.h"

#include <ATen/Dispatch.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

namespace fastblocks {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kRowsPerBlock = 8;  // rows-mode reductions: blocks of 32 channels x 8 rows

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};
template <typename T>
using acc_type = typename AccOf<T>::type;

__device__ __forceinline__ float fma_acc(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double fma_acc(double a, double b, double c) { return fma(a, b, c); }

// The value x's dtype would store: identity for float/double.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t round_to(acc_t v) {
  return static_cast<acc_t>(static_cast<scalar_t>(v));
}

// fma(x, s, b), with a residual round(fma(x, s, b)) + r; unrounded (the caller rounds).
template <typename scalar_t, bool kRes>
__device__ __forceinline__ acc_type<scalar_t> forward_value(scalar_t x, acc_type<scalar_t> s, acc_type<scalar_t> b,
                                                            scalar_t r) {
  using acc_t = acc_type<scalar_t>;
  acc_t y = fma_acc(static_cast<acc_t>(x), s, b);
  if constexpr (kRes) y = round_to<scalar_t>(y) + static_cast<acc_t>(r);
  return y;
}

// g' = g where the forward's ReLU passed (!(y <= 0): NaN passes), else 0.
template <typename scalar_t, bool kRelu, bool kRes>
__device__ __forceinline__ acc_type<scalar_t> masked_grad(scalar_t g, scalar_t x, acc_type<scalar_t> s,
                                                          acc_type<scalar_t> b, scalar_t r) {
  using acc_t = acc_type<scalar_t>;
  const acc_t gv = static_cast<acc_t>(g);
  if constexpr (kRelu) {
    const acc_t y = round_to<scalar_t>(forward_value<scalar_t, kRes>(x, s, b, r));
    return (y <= acc_t(0)) ? acc_t(0) : gv;
  }
  return gv;
}

// ----------------------------------------------------------------------------- elementwise
template <typename scalar_t, int kVec>
struct alignas(sizeof(scalar_t) * kVec) Pack {
  scalar_t v[kVec];
};

// Flat size n, channel of element i = (i / inner) % C; a grid-stride step of `stride` elements
// moves the cursor by (drem, dc) = (stride % inner, (stride / inner) % C).
struct EwGeom {
  int64_t n, inner, C, drem, dc;
};

struct ChannelCursor {
  int64_t rem, c;  // i % inner, (i / inner) % C
  __device__ __forceinline__ void init(int64_t i, const EwGeom& g) {
    const int64_t q = i / g.inner;
    rem = i - q * g.inner;
    c = q % g.C;
  }
  __device__ __forceinline__ void next(const EwGeom& g) {
    if (++rem == g.inner) {
      rem = 0;
      if (++c == g.C) c = 0;
    }
  }
  __device__ __forceinline__ void jump(const EwGeom& g) {
    rem += g.drem;
    c += g.dc;
    if (rem >= g.inner) {
      rem -= g.inner;
      ++c;
    }
    if (c >= g.C) c -= g.C;
  }
};

template <typename scalar_t, int kVec, bool kRelu, bool kRes>
__global__ void bn_apply_kernel(const scalar_t* __restrict__ x, const acc_type<scalar_t>* __restrict__ scale,
                                const acc_type<scalar_t>* __restrict__ shift, const scalar_t* __restrict__ r,
                                scalar_t* __restrict__ y, EwGeom g) {
  using acc_t = acc_type<scalar_t>;
  using P = Pack<scalar_t, kVec>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x * kVec;
  int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * kVec;
  if (i >= g.n) return;
  ChannelCursor cur;
  cur.init(i, g);
  for (; i < g.n; i += stride) {
    ChannelCursor cc = cur;
    const int cnt = static_cast<int>(g.n - i < kVec ? g.n - i : kVec);
    P xp, rp, yp;
    if (cnt == kVec) {
      xp = *reinterpret_cast<const P*>(x + i);
      if constexpr (kRes) rp = *reinterpret_cast<const P*>(r + i);
    } else {  // the last, partial vector; constant indices keep the packs in registers
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        if (j < cnt) {
          xp.v[j] = x[i + j];
          if constexpr (kRes) rp.v[j] = r[i + j];
        }
      }
    }
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      if (j < cnt) {
        acc_t v = forward_value<scalar_t, kRes>(xp.v[j], scale[cc.c], shift[cc.c], kRes ? rp.v[j] : xp.v[j]);
        if constexpr (kRelu) v = (v <= acc_t(0)) ? acc_t(0) : v;  // NaN passes, as torch.relu
        yp.v[j] = static_cast<scalar_t>(v);
        cc.next(g);
      }
    }
    if (cnt == kVec) {
      *reinterpret_cast<P*>(y + i) = yp;
    } else {
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        if (j < cnt) y[i + j] = yp.v[j];
      }
    }
    cur.jump(g);
  }
}

template <typename scalar_t, int kVec, bool kRelu, bool kRes>
__global__ void bn_bwd_apply_kernel(const scalar_t* __restrict__ gy, const scalar_t* __restrict__ x,
                                    const acc_type<scalar_t>* __restrict__ scale,
                                    const acc_type<scalar_t>* __restrict__ shift, const scalar_t* __restrict__ r,
                                    const acc_type<scalar_t>* __restrict__ a, const acc_type<scalar_t>* __restrict__ b,
                                    const acc_type<scalar_t>* __restrict__ c, scalar_t* __restrict__ dx, EwGeom g) {
  using acc_t = acc_type<scalar_t>;
  using P = Pack<scalar_t, kVec>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x * kVec;
  int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * kVec;
  if (i >= g.n) return;
  ChannelCursor cur;
  cur.init(i, g);
  for (; i < g.n; i += stride) {
    ChannelCursor cc = cur;
    const int cnt = static_cast<int>(g.n - i < kVec ? g.n - i : kVec);
    P xp, gp, rp, op;
    if (cnt == kVec) {
      xp = *reinterpret_cast<const P*>(x + i);
      gp = *reinterpret_cast<const P*>(gy + i);
      if constexpr (kRes && kRelu) rp = *reinterpret_cast<const P*>(r + i);
    } else {  // the last, partial vector; constant indices keep the packs in registers
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        if (j < cnt) {
          xp.v[j] = x[i + j];
          gp.v[j] = gy[i + j];
          if constexpr (kRes && kRelu) rp.v[j] = r[i + j];
        }
      }
    }
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      if (j < cnt) {
        const int64_t ch = cc.c;
        const acc_t gv = masked_grad<scalar_t, kRelu, kRes>(gp.v[j], xp.v[j], scale[ch], shift[ch],
                                                            (kRes && kRelu) ? rp.v[j] : xp.v[j]);
        op.v[j] = static_cast<scalar_t>(fma_acc(a[ch], gv, fma_acc(b[ch], static_cast<acc_t>(xp.v[j]), c[ch])));
        cc.next(g);
      }
    }
    if (cnt == kVec) {
      *reinterpret_cast<P*>(dx + i) = op;
    } else {
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        if (j < cnt) dx[i + j] = op.v[j];
      }
    }
    cur.jump(g);
  }
}

// ----------------------------------------------------------------------------- reductions
template <typename acc_t>
struct WelfordState {
  acc_t n, mean, m2;
};

template <typename acc_t>
struct SumState {
  acc_t g, gx;
};

// Per-thread Welford over x; Chan et al. to combine: with delta = mean_b - mean_a,
//   mean = mean_a + delta n_b / n,  M2 = M2_a + M2_b + delta² n_a n_b / n.
template <typename scalar_t>
struct StatsOp {
  using acc_t = acc_type<scalar_t>;
  using State = WelfordState<acc_t>;
  struct Channel {};
  const scalar_t* x;

  __device__ __forceinline__ Channel channel(int64_t) const { return {}; }
  __device__ __forceinline__ void push(State& s, int64_t idx, const Channel&) const {
    const acc_t v = static_cast<acc_t>(x[idx]);
    s.n += acc_t(1);
    const acc_t d = v - s.mean;
    s.mean += d / s.n;
    s.m2 += d * (v - s.mean);
  }
  static __device__ __forceinline__ State identity() { return {acc_t(0), acc_t(0), acc_t(0)}; }
  static __device__ __forceinline__ State combine(const State& a, const State& b) {
    if (b.n == acc_t(0)) return a;
    if (a.n == acc_t(0)) return b;
    const acc_t n = a.n + b.n;
    const acc_t fb = b.n / n;
    const acc_t delta = b.mean - a.mean;
    return {n, a.mean + delta * fb, a.m2 + b.m2 + delta * delta * a.n * fb};
  }
  static __device__ __forceinline__ State shfl_down(const State& s, int offset) {
    return {__shfl_down_sync(0xffffffffu, s.n, offset), __shfl_down_sync(0xffffffffu, s.mean, offset),
            __shfl_down_sync(0xffffffffu, s.m2, offset)};
  }
  static __device__ __forceinline__ void finalize(const State& s, acc_t* mean, acc_t* var) {
    *mean = s.mean;
    *var = s.m2 / s.n;  // n > 0: the host rejects empty batches
  }
};

template <typename scalar_t, bool kRelu, bool kRes>
struct BwdReduceOp {
  using acc_t = acc_type<scalar_t>;
  using State = SumState<acc_t>;
  struct Channel {
    acc_t mean, scale, shift;
  };
  const scalar_t* gy;
  const scalar_t* x;
  const scalar_t* r;
  const acc_t* mean;
  const acc_t* scale;
  const acc_t* shift;

  __device__ __forceinline__ Channel channel(int64_t c) const { return {mean[c], scale[c], shift[c]}; }
  __device__ __forceinline__ void push(State& s, int64_t idx, const Channel& ch) const {
    const scalar_t xv = x[idx];
    scalar_t rv = xv;
    if constexpr (kRes && kRelu) rv = r[idx];
    const acc_t gv = masked_grad<scalar_t, kRelu, kRes>(gy[idx], xv, ch.scale, ch.shift, rv);
    s.g += gv;
    s.gx += gv * (static_cast<acc_t>(xv) - ch.mean);
  }
  static __device__ __forceinline__ State identity() { return {acc_t(0), acc_t(0)}; }
  static __device__ __forceinline__ State combine(const State& a, const State& b) { return {a.g + b.g, a.gx + b.gx}; }
  static __device__ __forceinline__ State shfl_down(const State& s, int offset) {
    return {__shfl_down_sync(0xffffffffu, s.g, offset), __shfl_down_sync(0xffffffffu, s.gx, offset)};
  }
  static __device__ __forceinline__ void finalize(const State& s, acc_t* sum_g, acc_t* sum_gx) {
    *sum_g = s.g;
    *sum_gx = s.gx;
  }
};

template <typename Op>
__device__ __forceinline__ typename Op::State warp_reduce(typename Op::State s) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) s = Op::combine(s, Op::shfl_down(s, offset));
  return s;
}

// Stage 1, planes: block (c = blockIdx.x, chunk p = blockIdx.y of P) over the channel's
// elements m in [M p / P, M (p + 1) / P), m = n * HW + hw; one partial per block into part[c][p].
template <typename Op>
__global__ void __launch_bounds__(kThreads)
    reduce_planes_kernel(Op op, int64_t N, int64_t C, int64_t HW, typename Op::State* __restrict__ part) {
  using State = typename Op::State;
  const int64_t c = blockIdx.x;
  const int64_t p = blockIdx.y, P = gridDim.y;
  const int64_t M = N * HW;
  const int64_t m1 = M * (p + 1) / P;
  int64_t m = M * p / P + threadIdx.x;
  State s = Op::identity();
  if (m < m1) {
    const auto ch = op.channel(c);
    int64_t n = m / HW, hw = m - n * HW;
    const int64_t dn = blockDim.x / HW, dhw = blockDim.x - dn * HW;
    for (; m < m1; m += blockDim.x) {
      op.push(s, (n * C + c) * HW + hw, ch);
      hw += dhw;
      n += dn;
      if (hw >= HW) {
        hw -= HW;
        ++n;
      }
    }
  }
  __shared__ State warp_states[kThreads / 32];
  s = warp_reduce<Op>(s);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_states[warp] = s;
  __syncthreads();
  if (warp == 0) {
    s = lane < static_cast<int>(blockDim.x / 32) ? warp_states[lane] : Op::identity();
    s = warp_reduce<Op>(s);
    if (lane == 0) part[c * P + p] = s;
  }
}

// Stage 1, rows: block (32 channels from 32 * blockIdx.x, chunk p = blockIdx.y of P) over rows
// [M p / P, M (p + 1) / P), 8 rows at a time; one partial per (channel, block) into part[c][p].
template <typename Op>
__global__ void __launch_bounds__(32 * kRowsPerBlock)
    reduce_rows_kernel(Op op, int64_t M, int64_t C, typename Op::State* __restrict__ part) {
  using State = typename Op::State;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  const int64_t p = blockIdx.y, P = gridDim.y;
  const int64_t r1 = M * (p + 1) / P;
  State s = Op::identity();
  if (c < C) {
    const auto ch = op.channel(c);
    for (int64_t r = M * p / P + threadIdx.y; r < r1; r += kRowsPerBlock) op.push(s, r * C + c, ch);
  }
  __shared__ State states[kRowsPerBlock][32];
  states[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
#pragma unroll
    for (int k = 1; k < kRowsPerBlock; ++k) s = Op::combine(s, states[k][threadIdx.x]);
    part[c * P + p] = s;
  }
}

// Stage 2: one warp per channel folds part[c][0..P) and writes the outputs.
template <typename Op>
__global__ void __launch_bounds__(kThreads)
    reduce_finalize_kernel(const typename Op::State* __restrict__ part, int64_t C, int64_t P,
                           typename Op::acc_t* __restrict__ out0, typename Op::acc_t* __restrict__ out1) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (c >= C) return;  // uniform per warp
  typename Op::State s = Op::identity();
  for (int64_t p = lane; p < P; p += 32) s = Op::combine(s, part[c * P + p]);
  s = warp_reduce<Op>(s);
  if (lane == 0) Op::finalize(s, out0 + c, out1 + c);
}

// ----------------------------------------------------------------------------- host side
struct Geometry {
  int64_t N, C, HW;
  bool rows;  // [N*HW][C] rows (channels_last, or HW == 1) instead of [N*C][HW] planes
};

Geometry geometry_of(const at::Tensor& x, bool channels_last) {
  int64_t hw = 1;
  for (int64_t d = 2; d < x.dim(); ++d) hw *= x.size(d);
  return {x.size(0), x.size(1), hw, channels_last || hw == 1};
}

int sm_count() {
  int device = 0;
  cudaGetDevice(&device);
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  return sms > 0 ? sms : 1;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename Op>
void launch_reduction(const Op& op, const Geometry& g, const at::Tensor& x, at::Tensor& out0, at::Tensor& out1,
                      cudaStream_t stream, const char* name) {
  using State = typename Op::State;
  using acc_t = typename Op::acc_t;
  static_assert(sizeof(State) % sizeof(acc_t) == 0);
  const int64_t M = g.N * g.HW;
  const int64_t target = 4 * static_cast<int64_t>(sm_count());  // blocks: a few waves on every SM
  dim3 grid, block;
  if (g.rows) {
    const int64_t groups = ceil_div(g.C, 32);
    const int64_t P = std::clamp<int64_t>(ceil_div(target, groups), 1, std::min<int64_t>(ceil_div(M, 64), 65535));
    grid = dim3(static_cast<unsigned>(groups), static_cast<unsigned>(P));
    block = dim3(32, kRowsPerBlock);
  } else {
    const int64_t P =
        std::clamp<int64_t>(ceil_div(target, g.C), 1, std::min<int64_t>(ceil_div(M, 4 * kThreads), 65535));
    grid = dim3(static_cast<unsigned>(g.C), static_cast<unsigned>(P));
    block = dim3(kThreads);
  }
  const int64_t P = grid.y;
  const int64_t words = g.C * P * static_cast<int64_t>(sizeof(State) / sizeof(acc_t));
  at::Tensor part = at::empty({words}, x.options().dtype(out0.scalar_type()));
  auto* part_ptr = reinterpret_cast<State*>(part.mutable_data_ptr<acc_t>());
  if (g.rows) {
    reduce_rows_kernel<Op><<<grid, block, 0, stream>>>(op, M, g.C, part_ptr);
  } else {
    reduce_planes_kernel<Op><<<grid, block, 0, stream>>>(op, g.N, g.C, g.HW, part_ptr);
  }
  check_launch(name);
  const auto blocks = static_cast<unsigned>(ceil_div(g.C, kThreads / 32));
  reduce_finalize_kernel<Op><<<blocks, kThreads, 0, stream>>>(part_ptr, g.C, P, out0.mutable_data_ptr<acc_t>(),
                                                              out1.mutable_data_ptr<acc_t>());
  check_launch("reduce_finalize_kernel");
}

// Grid, vector width and cursor steps of an elementwise launch over x-sized tensors.
struct EwLaunch {
  EwGeom geom;
  unsigned blocks;
};

EwLaunch ew_launch(const Geometry& g, int64_t n, int vec) {
  const int64_t needed = ceil_div(ceil_div(n, vec), kThreads);
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(needed, 16 * static_cast<int64_t>(sm_count())));
  const int64_t inner = g.rows ? 1 : g.HW;
  const int64_t stride = blocks * kThreads * vec;
  return {{n, inner, g.C, stride % inner, (stride / inner) % g.C}, static_cast<unsigned>(blocks)};
}

bool aligned16(std::initializer_list<const void*> ptrs) {
  for (const void* p : ptrs) {
    if (p != nullptr && reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  }
  return true;
}

template <typename scalar_t>
const scalar_t* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<scalar_t>() : nullptr;
}

}  // namespace

void bn_stats_fwd_launch(const at::Tensor& x, bool channels_last, at::Tensor& mean, at::Tensor& var,
                         cudaStream_t stream) {
  const Geometry g = geometry_of(x, channels_last);
  if (g.C == 0 || g.N * g.HW == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_stats_fwd_cuda", [&] {
    launch_reduction(StatsOp<scalar_t>{x.const_data_ptr<scalar_t>()}, g, x, mean, var, stream, "bn_stats_kernel");
  });
}

void bn_apply_launch(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                     const at::Tensor& residual, bool relu, bool channels_last, at::Tensor& y, cudaStream_t stream) {
  const int64_t n = x.numel();
  if (n == 0) return;
  const Geometry g = geometry_of(x, channels_last);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_apply_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    constexpr int kVec = 16 / sizeof(scalar_t);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* rp = ptr_or_null<scalar_t>(residual);
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    const acc_t* sp = scale.const_data_ptr<acc_t>();
    const acc_t* bp = shift.const_data_ptr<acc_t>();
    const bool vec = aligned16({xp, rp, yp});
    const EwLaunch l = ew_launch(g, n, vec ? kVec : 1);
    dispatch_flags(relu, residual.defined(), [&](auto kRelu, auto kRes) {
      constexpr bool R = decltype(kRelu)::value, Res = decltype(kRes)::value;
      if (vec) {
        bn_apply_kernel<scalar_t, kVec, R, Res><<<l.blocks, kThreads, 0, stream>>>(xp, sp, bp, rp, yp, l.geom);
      } else {
        bn_apply_kernel<scalar_t, 1, R, Res><<<l.blocks, kThreads, 0, stream>>>(xp, sp, bp, rp, yp, l.geom);
      }
    });
  });
  check_launch("bn_apply_kernel");
}

void bn_bwd_reduce_launch(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& mean,
                          const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& residual, bool relu,
                          bool channels_last, at::Tensor& sum_g, at::Tensor& sum_gx, cudaStream_t stream) {
  const Geometry g = geometry_of(x, channels_last);
  if (g.C == 0 || g.N * g.HW == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_bwd_reduce_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    dispatch_flags(relu, residual.defined(), [&](auto kRelu, auto kRes) {
      using Op = BwdReduceOp<scalar_t, decltype(kRelu)::value, decltype(kRes)::value>;
      const Op op{grad_y.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), ptr_or_null<scalar_t>(residual),
                  mean.const_data_ptr<acc_t>(),      scale.const_data_ptr<acc_t>(), shift.const_data_ptr<acc_t>()};
      launch_reduction(op, g, x, sum_g, sum_gx, stream, "bn_bwd_reduce_kernel");
    });
  });
}

void bn_bwd_apply_launch(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& scale,
                         const at::Tensor& shift, const at::Tensor& residual, const at::Tensor& a, const at::Tensor& b,
                         const at::Tensor& c, bool relu, bool channels_last, at::Tensor& dx, cudaStream_t stream) {
  const int64_t n = x.numel();
  if (n == 0) return;
  const Geometry g = geometry_of(x, channels_last);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_bwd_apply_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    constexpr int kVec = 16 / sizeof(scalar_t);
    const scalar_t* gp = grad_y.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* rp = ptr_or_null<scalar_t>(residual);
    scalar_t* dp = dx.mutable_data_ptr<scalar_t>();
    const acc_t* sp = scale.const_data_ptr<acc_t>();
    const acc_t* bp = shift.const_data_ptr<acc_t>();
    const acc_t* ap = a.const_data_ptr<acc_t>();
    const acc_t* bb = b.const_data_ptr<acc_t>();
    const acc_t* cp = c.const_data_ptr<acc_t>();
    const bool vec = aligned16({gp, xp, rp, dp});
    const EwLaunch l = ew_launch(g, n, vec ? kVec : 1);
    dispatch_flags(relu, residual.defined(), [&](auto kRelu, auto kRes) {
      constexpr bool R = decltype(kRelu)::value, Res = decltype(kRes)::value;
      if (vec) {
        bn_bwd_apply_kernel<scalar_t, kVec, R, Res>
            <<<l.blocks, kThreads, 0, stream>>>(gp, xp, sp, bp, rp, ap, bb, cp, dp, l.geom);
      } else {
        bn_bwd_apply_kernel<scalar_t, 1, R, Res>
            <<<l.blocks, kThreads, 0, stream>>>(gp, xp, sp, bp, rp, ap, bb, cp, dp, l.geom);
      }
    });
  });
  check_launch("bn_bwd_apply_kernel");
}

}  // namespace cuda
}  // namespace fastblocks
