// CPU kernels of fastblocks::add_relu_fwd / add_relu_bwd (see fastblocks/ops/add_relu.py).
//
// One pass over memory: out = relu(x + residual) with at::vec, and the ReLU mask packed to one
// bit per element from the stored (rounded) output, so fp16/bf16 masks agree with eager's
// threshold_backward on the rounded result. Work is split on whole mask bytes (8 elements),
// so threads never share a byte.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <tuple>

#include "../checks.h"

// The AVX2 mask paths need at::vec's AVX2 Vectorized<float> (8 lanes, convertible to __m256).
#if defined(CPU_CAPABILITY_AVX2) && defined(__AVX2__)
#define FASTBLOCKS_AVX2 1
#include <immintrin.h>
#else
#define FASTBLOCKS_AVX2 0
#endif

namespace fastblocks {
namespace {

using at::vec::Vectorized;

constexpr int64_t kGrainBytes = 2048;  // 16K elements per task: amortizes the fork cost

// ReLU as eager computes it: NaN propagates and -0.0 stays -0.0 (at::vec::maximum(zero, s)
// returns its second operand when both are zero). The mask bit of an element is !(out <= 0):
// set for positive outputs and for NaN, clear for zeros, as eager's threshold_backward decides
// on the stored output.
template <typename scalar_t>
inline uint8_t pack_bits_scalar(const scalar_t* out, int lim) {
  uint8_t bits = 0;
  for (int j = 0; j < lim; ++j) {
    bits |= static_cast<uint8_t>(!(static_cast<float>(out[j]) <= 0.f)) << j;
  }
  return bits;
}

#if FASTBLOCKS_AVX2
// Eight float lanes -> one mask byte: compare "not less-or-equal, unordered" (NaN -> 1).
inline uint8_t pack_bits_avx2(__m256 v) {
  return static_cast<uint8_t>(_mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_NLE_UQ)));
}

// One mask byte -> eight 32-bit lanes of all-ones (bit set) or zero.
inline __m256i unpack_bits_avx2(uint8_t bits) {
  const __m256i sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(bits), sel), sel);
}
#endif

template <typename scalar_t>
void add_relu_fwd_impl(const scalar_t* x, const scalar_t* r, scalar_t* out, uint8_t* mask,
                       int64_t n) {
  const int64_t nbytes = (n + 7) / 8;
  at::parallel_for(0, nbytes, kGrainBytes, [&](int64_t b0, int64_t b1) {
    const int64_t e0 = b0 * 8;
    const int64_t e1 = std::min(n, b1 * 8);
    int64_t i = e0;            // e0 is a multiple of 8, and so is every vector boundary below
    int64_t packed = b0;       // mask bytes [b0, packed) are written by the vector loop
    if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
      using Vec = Vectorized<scalar_t>;
      const Vec zero(scalar_t(0));
      for (; i + Vec::size() <= e1; i += Vec::size()) {
        Vec s = at::vec::maximum(zero, Vec::loadu(x + i) + Vec::loadu(r + i));
        s.store(out + i);
#if FASTBLOCKS_AVX2
        if constexpr (std::is_same_v<scalar_t, float> && Vec::size() == 8) {
          mask[i / 8] = pack_bits_avx2(__m256(s));
          packed = i / 8 + 1;
        }
#endif
      }
      for (int64_t k = i; k < e1; ++k) {
        scalar_t s = x[k] + r[k];
        out[k] = (s < scalar_t(0)) ? scalar_t(0) : s;
      }
    } else {
      // fp16/bf16: add in fp32, round once, as eager's add does; the mask is taken from the
      // rounded output (a tiny positive sum can round to zero).
      using Vec = Vectorized<scalar_t>;
      using FVec = Vectorized<float>;
      const FVec zero(0.f);
      for (; i + Vec::size() <= e1; i += Vec::size()) {
        auto [x0, x1] = at::vec::convert_to_float<scalar_t>(Vec::loadu(x + i));
        auto [r0, r1] = at::vec::convert_to_float<scalar_t>(Vec::loadu(r + i));
        const Vec o = at::vec::convert_from_float<scalar_t>(at::vec::maximum(zero, x0 + r0),
                                                            at::vec::maximum(zero, x1 + r1));
        o.store(out + i);
#if FASTBLOCKS_AVX2
        if constexpr (FVec::size() == 8) {
          auto [o0, o1] = at::vec::convert_to_float<scalar_t>(o);
          mask[i / 8] = pack_bits_avx2(__m256(o0));
          mask[i / 8 + 1] = pack_bits_avx2(__m256(o1));
          packed = i / 8 + 2;
        }
#endif
      }
      for (int64_t k = i; k < e1; ++k) {
        float s = static_cast<float>(x[k]) + static_cast<float>(r[k]);
        out[k] = static_cast<scalar_t>((s < 0.f) ? 0.f : s);
      }
    }
    // Bytes the vector loop did not pack (all of them without AVX2; else the range's tail).
    for (int64_t b = packed; b < b1; ++b) {
      const int64_t base = b * 8;
      mask[b] = pack_bits_scalar(out + base, static_cast<int>(std::min<int64_t>(8, n - base)));
    }
  });
}

template <typename scalar_t>
void add_relu_bwd_impl(const scalar_t* g, const uint8_t* mask, scalar_t* gi, int64_t n) {
  const int64_t nbytes = (n + 7) / 8;
  at::parallel_for(0, nbytes, kGrainBytes, [&](int64_t b0, int64_t b1) {
    int64_t b = b0;
#if FASTBLOCKS_AVX2
    // Masked-out lanes become +0 whatever the gradient holds (NaN included), as threshold_backward.
    const int64_t full = std::min(b1, n / 8);  // bytes whose 8 elements all exist
    if constexpr (sizeof(scalar_t) == 4) {
      for (; b < full; ++b) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(g + b * 8));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(gi + b * 8),
                            _mm256_and_si256(v, unpack_bits_avx2(mask[b])));
      }
    } else if constexpr (sizeof(scalar_t) == 2) {
      const __m256i sel = _mm256_setr_epi16(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096,
                                            8192, 16384, static_cast<int16_t>(0x8000));
      for (; b + 1 < full; b += 2) {
        const int16_t bits = static_cast<int16_t>(mask[b] | (mask[b + 1] << 8));
        const __m256i keep = _mm256_cmpeq_epi16(_mm256_and_si256(_mm256_set1_epi16(bits), sel), sel);
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(g + b * 8));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(gi + b * 8), _mm256_and_si256(v, keep));
      }
    }
#endif
    for (; b < b1; ++b) {
      const int64_t base = b * 8;
      const uint8_t bits = mask[b];
      const int64_t lim = std::min<int64_t>(8, n - base);
      for (int64_t j = 0; j < lim; ++j) {
        gi[base + j] = ((bits >> j) & 1) ? g[base + j] : scalar_t(0);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> add_relu_fwd_cpu(const at::Tensor& x, const at::Tensor& residual,
                                                    bool channels_last) {
  check_add_relu_fwd(x, residual, channels_last);
  const auto fmt = format_of(channels_last);
  const at::Tensor xc = x.contiguous(fmt);
  const at::Tensor rc = residual.contiguous(fmt);
  at::Tensor out = at::empty_like(xc, fmt);
  const int64_t n = xc.numel();
  at::Tensor mask = at::empty({(n + 7) / 8}, x.options().dtype(at::kByte));
  if (n == 0) return {out, mask};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "add_relu_fwd_cpu", [&] {
    add_relu_fwd_impl<scalar_t>(xc.const_data_ptr<scalar_t>(), rc.const_data_ptr<scalar_t>(),
                                out.mutable_data_ptr<scalar_t>(), mask.mutable_data_ptr<uint8_t>(), n);
  });
  return {out, mask};
}

at::Tensor add_relu_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& mask, bool channels_last) {
  check_add_relu_bwd(grad_out, mask, channels_last);
  const int64_t n = grad_out.numel();
  const auto fmt = format_of(channels_last);
  const at::Tensor gc = grad_out.contiguous(fmt);
  const at::Tensor mc = mask.contiguous();
  at::Tensor gi = at::empty_like(gc, fmt);
  if (n == 0) return gi;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gc.scalar_type(), "add_relu_bwd_cpu", [&] {
    add_relu_bwd_impl<scalar_t>(gc.const_data_ptr<scalar_t>(), mc.const_data_ptr<uint8_t>(),
                                gi.mutable_data_ptr<scalar_t>(), n);
  });
  return gi;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastblocks, CPU, m) {
  m.impl("add_relu_fwd", &add_relu_fwd_cpu);
  m.impl("add_relu_bwd", &add_relu_bwd_cpu);
}

}  // namespace fastblocks
