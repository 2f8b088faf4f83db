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

namespace fastblocks {
namespace {

using at::vec::Vectorized;

constexpr int64_t kGrainBytes = 2048;  // 16K elements per task: amortizes the fork cost

at::MemoryFormat format_of(bool channels_last) {
  return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

void check_layout(const at::Tensor& t, const char* name, bool channels_last) {
  TORCH_CHECK(!channels_last || t.dim() == 4, "fastblocks::add_relu: channels_last needs a 4-D ",
              name, ", got ", t.dim(), " dimensions");
}

template <typename scalar_t>
void add_relu_fwd_impl(const scalar_t* x, const scalar_t* r, scalar_t* out, uint8_t* mask,
                       int64_t n) {
  const int64_t nbytes = (n + 7) / 8;
  at::parallel_for(0, nbytes, kGrainBytes, [&](int64_t b0, int64_t b1) {
    const int64_t e0 = b0 * 8;
    const int64_t e1 = std::min(n, b1 * 8);
    if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
      using Vec = Vectorized<scalar_t>;
      const Vec zero(scalar_t(0));
      int64_t i = e0;
      for (; i + Vec::size() <= e1; i += Vec::size()) {
        Vec s = Vec::loadu(x + i) + Vec::loadu(r + i);
        at::vec::maximum(s, zero).store(out + i);  // maximum propagates NaN, like torch.relu
      }
      for (; i < e1; ++i) {
        scalar_t s = x[i] + r[i];
        out[i] = (s <= scalar_t(0)) ? scalar_t(0) : s;
      }
    } else {
      // fp16/bf16: add in fp32, round once, as eager's add does.
      using Vec = Vectorized<scalar_t>;
      using FVec = Vectorized<float>;
      const FVec zero(0.f);
      int64_t i = e0;
      for (; i + Vec::size() <= e1; i += Vec::size()) {
        auto [x0, x1] = at::vec::convert_to_float<scalar_t>(Vec::loadu(x + i));
        auto [r0, r1] = at::vec::convert_to_float<scalar_t>(Vec::loadu(r + i));
        FVec s0 = at::vec::maximum(x0 + r0, zero);
        FVec s1 = at::vec::maximum(x1 + r1, zero);
        at::vec::convert_from_float<scalar_t>(s0, s1).store(out + i);
      }
      for (; i < e1; ++i) {
        float s = static_cast<float>(x[i]) + static_cast<float>(r[i]);
        out[i] = static_cast<scalar_t>((s <= 0.f) ? 0.f : s);
      }
    }
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t base = b * 8;
      const int lim = static_cast<int>(std::min<int64_t>(8, n - base));
      uint8_t bits = 0;
      for (int j = 0; j < lim; ++j) {
        bits |= static_cast<uint8_t>(!(static_cast<float>(out[base + j]) <= 0.f)) << j;
      }
      mask[b] = bits;
    }
  });
}

template <typename scalar_t>
void add_relu_bwd_impl(const scalar_t* g, const uint8_t* mask, scalar_t* gi, int64_t n) {
  const int64_t nbytes = (n + 7) / 8;
  at::parallel_for(0, nbytes, kGrainBytes, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t base = b * 8;
      const uint8_t bits = mask[b];
      if (base + 8 <= n) {
        for (int j = 0; j < 8; ++j) {
          gi[base + j] = ((bits >> j) & 1) ? g[base + j] : scalar_t(0);
        }
      } else {
        for (int64_t j = 0; base + j < n; ++j) {
          gi[base + j] = ((bits >> j) & 1) ? g[base + j] : scalar_t(0);
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> add_relu_fwd_cpu(const at::Tensor& x, const at::Tensor& residual,
                                                    bool channels_last) {
  TORCH_CHECK(x.sizes() == residual.sizes(), "fastblocks::add_relu: residual shape ",
              residual.sizes(), " differs from x shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == residual.scalar_type(), "fastblocks::add_relu: residual dtype ",
              residual.scalar_type(), " differs from x dtype ", x.scalar_type());
  check_layout(x, "x", channels_last);
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
  TORCH_CHECK(mask.scalar_type() == at::kByte && mask.dim() == 1,
              "fastblocks::add_relu_bwd: mask must be a 1-D uint8 tensor");
  check_layout(grad_out, "grad_out", channels_last);
  const int64_t n = grad_out.numel();
  TORCH_CHECK(mask.numel() == (n + 7) / 8, "fastblocks::add_relu_bwd: mask has ", mask.numel(),
              " bytes, grad_out needs ", (n + 7) / 8);
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
