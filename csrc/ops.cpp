// Every schema of the compiled extension, in one place.
//
// These are the kernel-level ops of the compiled backends ("cpu" and "cuda"). The public,
// autograd-aware ops (fastblocks::add_relu, ...) are defined in Python (fastblocks/ops/*.py),
// which also registers a fake kernel for every schema below so FakeTensor, torch.compile and
// torch.library.opcheck work on them. Implementations: csrc/cpu/*.cpp (CPU) and
// csrc/cuda/*.cpp + *.cu (CUDA, only in CUDA builds).
#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY(fastblocks, m) {
  // out = relu(x + residual); mask: 1 bit per element of out in the memory order of the chosen
  // layout (channels_last when true, else contiguous), bit = !(out <= 0) as in threshold_backward.
  m.def("add_relu_fwd(Tensor x, Tensor residual, bool channels_last) -> (Tensor, Tensor)");
  // grad_in = grad_out where the mask bit is set, else 0.
  m.def("add_relu_bwd(Tensor grad_out, Tensor mask, bool channels_last) -> Tensor");
}

namespace {
bool built_with_cuda() {
#ifdef FASTBLOCKS_WITH_CUDA
  return true;
#else
  return false;
#endif
}

std::string cpu_capability() {
#if defined(CPU_CAPABILITY_AVX2)
  return "AVX2";
#else
  return "DEFAULT";
#endif
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastblocks compiled kernels (ops are registered under torch.ops.fastblocks)";
  m.def("built_with_cuda", &built_with_cuda, "Whether the CUDA kernels were compiled in");
  m.def("cpu_capability", &cpu_capability, "Vector ISA the CPU kernels were compiled for");
}
