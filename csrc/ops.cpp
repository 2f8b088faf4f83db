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

  // BatchNorm family (fastblocks/ops/batchnorm.py). x-sized tensors are [N, C, ...] (channels_last:
  // 4-D, read and written in NHWC order); per-channel tensors are 1-D [C] float32 (float64 for
  // double x); arithmetic in fp32 (fp64), x-sized outputs in x's dtype and the chosen layout.
  // Per-channel (mean, biased var) over N*H*W; raises on an empty batch.
  m.def("bn_stats_fwd(Tensor x, bool channels_last) -> (Tensor mean, Tensor var)");
  // y = act(x*scale + shift [+ residual]); with a residual, round(round(x*scale + shift) + residual)
  // as eager rounds bn(x) + residual; act = ReLU (NaN passes) when relu.
  m.def("bn_apply(Tensor x, Tensor scale, Tensor shift, Tensor? residual, bool relu, bool channels_last) -> Tensor");
  // Per-channel (Σ g', Σ g' (x - mean)), g' = grad_y where the forward's ReLU passed (bn_apply's y
  // recomputed, bit = !(y <= 0) as in threshold_backward), else 0; g' = grad_y when !relu.
  m.def(
      "bn_bwd_reduce(Tensor grad_y, Tensor x, Tensor mean, Tensor scale, Tensor shift, Tensor? residual, "
      "bool relu, bool channels_last) -> (Tensor sum_g, Tensor sum_gx)");
  // dx = a*g' + b*x + c per channel (g' as in bn_bwd_reduce): the training and eval BN backward.
  m.def(
      "bn_bwd_apply(Tensor grad_y, Tensor x, Tensor scale, Tensor shift, Tensor? residual, Tensor a, Tensor b, "
      "Tensor c, bool relu, bool channels_last) -> Tensor dx");
  // bn_bwd_reduce's sums (no residual) and, in the same pass, acc += scale * g' in place (CPU only;
  // the dense block's norm1 backward). acc has x's shape and dtype; it is written in place when laid
  // out as x is read (dense, or an NCHW channel prefix with x's image stride), else through a copy.
  m.def(
      "bn_bwd_reduce_add_(Tensor(a!) acc, Tensor grad_y, Tensor x, Tensor mean, Tensor scale, Tensor shift, "
      "bool relu, bool channels_last) -> (Tensor sum_g, Tensor sum_gx)");
  // The whole BatchNorm (+ residual) (+ ReLU) in one call per direction (CPU only; plain eager calls
  // of fastblocks.ops.batchnorm.batch_norm_act): the four kernels above plus the per-channel
  // arithmetic around them (as loops over C; a shift may differ from the Python formula's by an
  // ulp, and the backward uses the same arithmetic as the forward). Training: batch statistics, and with update_running the running
  // buffers (both given) become (1 - momentum) * running + momentum * batch (unbiased variance).
  // Eval: the running statistics. Returns (y, mean, biased var) as batch_norm_act.
  m.def(
      "bn_fused_fwd(Tensor x, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
      "Tensor? residual, bool training, float momentum, float eps, bool relu, bool update_running, "
      "bool channels_last) -> (Tensor y, Tensor mean, Tensor var)");
  // Its backward from the saved x (and residual, with relu) and statistics: (dx, dweight, dbias,
  // dres); each is None (undefined) unless asked for and applicable (dres: with a residual and
  // relu; without relu it is grad_y itself).
  m.def(
      "bn_fused_bwd(Tensor grad_y, Tensor x, Tensor? weight, Tensor? bias, Tensor mean, Tensor var, "
      "Tensor? residual, bool training, float eps, bool relu, bool need_dx, bool need_dweight, bool need_dbias, "
      "bool need_dres, bool channels_last) -> (Tensor dx, Tensor dweight, Tensor dbias, Tensor dres)");
  // The ImageNet stem's tail (CPU only): out = maxpool3x3/2 pad 1 of relu(x*scale + shift) (bn_apply's
  // value), idx = the winning position kh*3 + kw of each window (int8, out's shape and layout;
  // first maximum in row-major order wins, NaN wins, as F.max_pool2d). bwd: the gradient of that
  // pool's input [N, C, H, W], each output's gradient routed to its window's winner.
  m.def("stem_pool_fwd(Tensor x, Tensor scale, Tensor shift, bool channels_last) -> (Tensor out, Tensor idx)");
  m.def("stem_pool_bwd(Tensor grad_out, Tensor idx, SymInt H, SymInt W, bool channels_last) -> Tensor");
  // DenseNet's transition tail (CPU only): out = avgpool2x2/2 (floor, no padding) of relu(x*scale + shift)
  // (bn_apply's value). bwd: the gradient of x through that pool and a BatchNorm-ReLU with the given
  // statistics (training: batch statistics, whose dependence on x is included; else fixed), with
  // Σ g' and Σ g' (x - mean) (g' the gradient at the ReLU's output) for the parameter gradients.
  m.def("transition_pool_fwd(Tensor x, Tensor scale, Tensor shift, bool channels_last) -> Tensor");
  // One layer of the dense block's forward (CPU only; fastblocks/ops/dense_block.py, without dropout or
  // synchronized statistics): writes buf[:, ci:ci+k]. Training: the bottleneck's batch statistics
  // into mean2/var2 ([B]) and, with chunk_stats, the new chunk's into mean1/var1[ci:ci+k]; norm1
  // uses mean1/var1[:ci]. Eval: all four hold the running statistics (read only). Returns the
  // bottleneck (conv1 output) when keep, else undefined.
  m.def(
      "dense_layer_fwd_(Tensor(a!) buf, Tensor(b!) mean1, Tensor(c!) var1, Tensor(d!) mean2, Tensor(e!) var2, "
      "Tensor? weight1, Tensor? bias1, Tensor conv1_weight, Tensor? weight2, Tensor? bias2, Tensor conv2_weight, "
      "float eps1, float eps2, SymInt ci, SymInt k, bool training, bool chunk_stats, bool keep, "
      "bool channels_last) -> Tensor bottleneck");
  // One layer of the dense block's backward (CPU only; fastblocks/ops/dense_block.py, without
  // dropout or synchronized statistics): with fold (training), first finishes the gradient of the
  // layer's output chunk g[:, ci:ci+k] from gmu/gvar; then adds the layer's share into g[:, :ci] and
  // gmu/gvar[:ci] in place. mean1/var1: the statistics behind norm1 (first ci used; in training the
  // chunk statistics, whose [ci, ci+k) the fold reads); bottleneck: the kept conv1 output, else
  // recomputed. Returns the gradients of norm1's weight and bias, conv1, norm2's, conv2 (undefined
  // for an absent weight or bias).
  m.def(
      "dense_layer_bwd_(Tensor(a!) g, Tensor(b!) gmu, Tensor(c!) gvar, Tensor buf, Tensor mean1, Tensor var1, "
      "Tensor mean2, Tensor var2, Tensor? weight1, Tensor? bias1, Tensor conv1_weight, Tensor? weight2, "
      "Tensor? bias2, Tensor conv2_weight, Tensor? bottleneck, float eps1, float eps2, SymInt ci, SymInt k, "
      "bool training, bool fold, bool channels_last) -> (Tensor dweight1, Tensor dbias1, Tensor dconv1, "
      "Tensor dweight2, Tensor dbias2, Tensor dconv2)");
  m.def(
      "transition_pool_bwd(Tensor grad_out, Tensor x, Tensor mean, Tensor scale, Tensor shift, Tensor invstd, "
      "bool training, bool channels_last) -> (Tensor dx, Tensor sum_g, Tensor sum_gx)");
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
