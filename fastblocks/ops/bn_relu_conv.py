"""Convolution with a fused BatchNorm-ReLU prologue: ``y = conv2d(relu(x * scale[c] + shift[c]), weight)``.

What is fused. ``scale``/``shift`` are a BatchNorm's per-input-channel affine map
(``scale = gamma * invstd``, ``shift = beta - mean * scale``; the BN layer on top turns their
gradients into gradients for gamma, beta, mean and var). The activation
``a = relu(x * scale + shift)`` is computed in registers by the convolution's A-tile loader
(an implicit GEMM over NHWC output pixels: M = N*Ho*Wo, N_gemm = C_out, K = C_in*kh*kw) and is
never written to memory. Backward recomputes it in the load prologue of the weight-gradient
GEMM, and rebuilds the ReLU mask from x for the input gradient.

Zero padding applies to the *activation*: an out-of-image tap contributes exactly 0, not
``relu(shift)``. The loader zeroes those taps after the activation (a BN with beta > 0 would
otherwise leak ``relu(shift)`` into every border pixel).

Bytes kept for backward, per element of x, against eager ``conv2d(relu(batch_norm(x)))``:
eager keeps BN's input x, the ReLU output (= the conv input; also the BN output when the ReLU is
in place, a third x-sized tensor when the graph holds the BN output too): 8-12 B in fp32,
4-6 B in fp16/bf16. Fused: x only (4 B fp32, 2 B fp16/bf16) plus [C] vectors and the weight.
Forward traffic: eager writes and re-reads the BN output and the ReLU output (4 x-sized
passes) before the conv reads its input; fused reads x once per output-channel tile.
(``tests/ops/test_bn_relu_conv.py::test_saves_only_x_and_vectors`` measures it.)

Optional statistics epilogue (``stats=True``): per-output-channel ``Σy`` and ``Σy²`` of the
stored (rounded) output, in fp32 (fp64 for fp64 x), so the BatchNorm that follows can skip its
statistics pass. Each program writes its tile's partial sums to a ``[grid_m, C_out]`` buffer
and one ``torch.sum`` reduces it: deterministic (no float atomics), no zero-fill, no host
synchronization. The gradients of ``Σy``/``Σy²`` flow back into y (``dy += dΣ + 2 y dΣ²``), so
with ``stats=True`` y is saved too (the BN that consumes it keeps it alive anyway). Note
``var = Σy²/M - mean²`` cancels when ``|mean| >> std``; a consumer that needs more should
combine the per-tile partials with Chan's formula instead.

Backward derivation (z = x*scale + shift, a = relu(z) with zero padding, g_a = dL/da):
    g_a    = conv_transpose(dL/dy, weight)             (dgrad; PyTorch/cuDNN does the GEMM)
    g_z    = g_a * [not z <= 0]                        (threshold_backward's rule, as eager)
    dx     = g_z * scale       dscale = Σ_{n,h,w} g_z * x       dshift = Σ_{n,h,w} g_z
    dW[o, c, i, j] = Σ_{n,p,q} dL/dy[n, o, p, q] * a[n, c, p*s - pad + i, q*s - pad + j]
The dgrad output g_a is x-sized and transient (it is a backward temporary in eager too);
dW is a Triton GEMM ``grad_y^T x a`` whose A operand is recomputed from x in its load prologue.

Backends. ``triton``: the kernels below cover 1x1 (any stride/padding) and 3x3 (any
stride/padding) convolutions with groups=1, dilation=1, in fp16/bf16/fp32 (fp32 accumulation;
fp32 dots use tf32 exactly when ``torch.backends.cudnn.allow_tf32`` lets eager convolutions do
so). Everything else (groups > 1, dilation > 1, other kernel sizes, fp64) runs the ``reference``
path inside the triton backend. ``reference``: PyTorch convolutions with the same memory
contract: the activation is materialized transiently in forward, freed, and recomputed in
backward for ``aten.convolution_backward``. ``cpu``/``cuda`` (the defaults on the CPU and the
second choice on CUDA, ``SPEC`` below): the same scheme with the BatchNorm core's compiled
kernels for the BN-ReLU prologue and its backward, and PyTorch's convolution (oneDNN, cuDNN) for
the GEMMs; there is no compiled convolution kernel of our own.

Layout: y is channels_last when x is, otherwise contiguous. x is read through its strides
(NCHW, channels_last, or a channel-prefix view of a wider dense-block buffer), without a copy.

References: Chetlur et al. 2014, cuDNN (convolution as implicit GEMM); Pleiss et al. 2017,
Memory-Efficient Implementation of DenseNets (recompute BN-ReLU instead of storing it);
Rota Bulo et al. 2018, In-Place Activated BatchNorm; Triton's matrix-multiplication tutorial
(python/tutorials/03-matrix-multiplication.py) for the tiling.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastblocks import _backend
from fastblocks.ops import _bn_relu_conv_triton
from fastblocks.ops._bn_core import COMPILED_KERNELS, Kernels, momentum_factor, update_running_stats
from fastblocks.ops._common import (
    acc_dtype,
    check_tensor,
    eager_function,
    eager_path,
    empty0,
    fake_channel_vectors,
    fake_like,
    is_channels_last,
    memory_format,
    no_autocast,
    to_layout,
)

SPEC = _backend.register_op(
    _backend.OpSpec(
        name="bn_relu_conv2d",
        triton=True,
        compiled=("bn_apply", "bn_bwd_reduce", "bn_bwd_apply"),
        cuda_order=("triton", "cuda", "reference"),
        cpu_order=("cpu", "reference"),
    )
)


def _per_channel(v: torch.Tensor) -> torch.Tensor:
    return v.view(1, -1, 1, 1)


# ----------------------------------------------------------------------------- reference
def bn_relu_conv2d_reference(
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    weight: torch.Tensor,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
) -> torch.Tensor:
    """The specification: ``conv2d(relu(x * scale[c] + shift[c]), weight)``, no bias.

    The affine map and the ReLU run in fp32 (fp64 for fp64 x), the activation is rounded to
    x's dtype, and the convolution runs in x's dtype, as an eager fp16/bf16 model does.
    Plain autograd through this function is what the fused op is tested against.
    """
    cd = acc_dtype(x.dtype)
    z = x.to(cd) * _per_channel(scale.to(cd)) + _per_channel(shift.to(cd))
    return F.conv2d(torch.relu(z).to(x.dtype), weight, None, stride, padding, dilation, groups)


# ----------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class Conv:
    """Convolution hyper-parameters, normalized to pairs."""

    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int

    def out_hw(self, h: int, w: int, kh: int, kw: int) -> tuple[int, int]:
        ho = (h + 2 * self.padding[0] - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
        wo = (w + 2 * self.padding[1] - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
        return ho, wo


def _pair(value: object, name: str, minimum: int) -> tuple[int, int]:
    items = (value, value) if isinstance(value, int) else value
    if (
        not isinstance(items, (tuple, list))
        or len(items) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in items)
    ):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(items) < minimum:
        what = "non-negative" if minimum == 0 else f">= {minimum}"
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return int(items[0]), int(items[1])


def make_conv(stride: object, padding: object, dilation: object, groups: object) -> Conv:
    if not isinstance(groups, int) or isinstance(groups, bool):
        raise TypeError(f"groups must be an int, got {groups!r}")
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    return Conv(_pair(stride, "stride", 1), _pair(padding, "padding", 0), _pair(dilation, "dilation", 1), groups)


def _reduce(t: torch.Tensor) -> torch.Tensor:
    return t.sum(dim=(0, 2, 3))


# ----------------------------------------------------------------------------- reference path
# The reference backend (and the triton backend's fallback) with the fused op's memory
# contract: the activation lives only inside one forward or one backward call.
def _activation(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    cd = acc_dtype(x.dtype)
    return torch.relu(x.to(cd) * _per_channel(scale.to(cd)) + _per_channel(shift.to(cd))).to(x.dtype)


def _fwd_reference(
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    weight: torch.Tensor,
    conv: Conv,
    stats: bool,
    activation: Callable = _activation,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    a = activation(x, scale, shift)
    y = F.conv2d(a, weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
    del a
    y = to_layout(y, is_channels_last(x))
    cd = acc_dtype(x.dtype)
    if not stats:
        return y, empty0(y, cd), empty0(y, cd)
    y_cd = y.to(cd)
    return y, _reduce(y_cd), _reduce(y_cd * y_cd)


def _bwd_reference(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    weight: torch.Tensor,
    conv: Conv,
    need_input: bool,
    need_weight: bool,
    activation: Callable = _activation,
    prologue_bwd: Callable | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    a = activation(x, scale, shift)
    grad_a, dweight, _ = torch.ops.aten.convolution_backward(
        grad_y, a, weight, None, conv.stride, conv.padding, conv.dilation, False, [0, 0], conv.groups,
        [need_input, need_weight, False],
    )  # fmt: skip
    del a
    dweight = to_layout(dweight, False) if need_weight else empty0(weight)
    if not need_input:
        return empty0(x), empty0(scale), empty0(shift), dweight
    dx, dscale, dshift = (prologue_bwd or _prologue_bwd_reference)(grad_a, x, scale, shift)
    return dx, dscale, dshift, dweight


def _prologue_bwd_reference(
    grad_a: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    cd = acc_dtype(x.dtype)
    z = x.to(cd) * _per_channel(scale.to(cd)) + _per_channel(shift.to(cd))
    grad_z = torch.where(z <= 0, torch.zeros((), dtype=cd, device=x.device), grad_a.to(cd))
    del z
    dx = to_layout((grad_z * _per_channel(scale.to(cd))).to(x.dtype), is_channels_last(x))
    return dx, _reduce(grad_z * x.to(cd)).to(scale.dtype), _reduce(grad_z).to(shift.dtype)


# ----------------------------------------------------------------------------- compiled path
# The ``cpu``/``cuda`` backends: the same recomputation scheme as the reference path, with the
# BatchNorm family's compiled kernels for the prologue (one pass to materialize the activation,
# one reduction + one elementwise pass for its backward) and PyTorch's convolution (oneDNN on
# the CPU, cuDNN on GPUs) for the GEMMs.
def _compiled_kernels() -> Kernels:
    return COMPILED_KERNELS


def _compiled_activation(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    return _compiled_kernels().apply(x, scale, shift, None, True, is_channels_last(x))


def _prologue_bwd_compiled(
    grad_a: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # g_z = g_a masked by the ReLU; dscale = Σ g_z x (bwd_reduce with mean 0), dshift = Σ g_z.
    k = _compiled_kernels()
    cl = is_channels_last(x)
    cd = acc_dtype(x.dtype)
    zero = torch.zeros(x.shape[1], dtype=cd, device=x.device)
    sum_g, sum_gx = k.bwd_reduce(grad_a, x, zero, scale, shift, None, True, cl)
    dx = k.bwd_apply(grad_a, x, scale, shift, None, scale.to(cd), zero, zero, True, cl)
    return to_layout(dx, cl), sum_gx.to(scale.dtype), sum_g.to(shift.dtype)


_fwd_compiled = functools.partial(_fwd_reference, activation=_compiled_activation)
_bwd_compiled = functools.partial(_bwd_reference, activation=_compiled_activation, prologue_bwd=_prologue_bwd_compiled)


# ----------------------------------------------------------------------------- triton path
# The Triton kernels and launchers are fastblocks/ops/_bn_relu_conv_triton.py; cases they do not
# cover (groups > 1, dilation > 1, other kernel sizes, fp64) run the reference path.
def _fwd_triton(
    x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, weight: torch.Tensor, conv: Conv, stats: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if not _bn_relu_conv_triton.covers(x, weight, conv):
        return _fwd_reference(x, scale, shift, weight, conv, stats)
    return _bn_relu_conv_triton.fwd(x, scale, shift, weight, conv, stats)


def _bwd_triton(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    weight: torch.Tensor,
    conv: Conv,
    need_input: bool,
    need_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if not _bn_relu_conv_triton.covers(x, weight, conv):
        return _bwd_reference(grad_y, x, scale, shift, weight, conv, need_input, need_weight)
    return _bn_relu_conv_triton.bwd(grad_y, x, scale, shift, weight, conv, need_input, need_weight)


_FWD = {"reference": _fwd_reference, "triton": _fwd_triton, "cpu": _fwd_compiled, "cuda": _fwd_compiled}
_BWD = {"reference": _bwd_reference, "triton": _bwd_triton, "cpu": _bwd_compiled, "cuda": _bwd_compiled}


# ----------------------------------------------------------------------------- registration
def check_conv_inputs(
    x: object, scale: object, shift: object, weight: object, conv: Conv, *, vectors: bool = True
) -> None:
    """Raise naming the argument on a bad call (``vectors=False``: scale and shift not checked)."""
    check_tensor(x, "x", dim=4)
    check_tensor(weight, "weight", dim=4)
    named = (("scale", scale), ("shift", shift)) if vectors else ()
    for name, v in named:
        check_tensor(v, name, dim=1)
    c = x.shape[1]
    for name, v in (("weight", weight), *named):
        if v.device != x.device:
            raise ValueError(f"{name} is on {v.device} but x is on {x.device}")
    if weight.dtype != x.dtype:
        raise TypeError(
            f"weight has dtype {str(weight.dtype).replace('torch.', '')} but x has {str(x.dtype).replace('torch.', '')}"
        )
    for name, v in named:
        if v.shape[0] != c:
            raise ValueError(f"{name} has {v.shape[0]} elements but x has {c} channels")
    if weight.shape[1] * conv.groups != c:
        raise ValueError(
            f"weight of shape {tuple(weight.shape)} expects {weight.shape[1] * conv.groups} input channels "
            f"(groups={conv.groups}) but x has {c}"
        )
    if weight.shape[0] % conv.groups:
        raise ValueError(f"weight has {weight.shape[0]} output channels, not divisible by groups={conv.groups}")
    ho, wo = conv.out_hw(x.shape[2], x.shape[3], weight.shape[2], weight.shape[3])
    if ho <= 0 or wo <= 0:
        raise ValueError(
            f"x of spatial size {tuple(x.shape[2:])} is too small for a {tuple(weight.shape[2:])} kernel "
            f"with padding={conv.padding}, dilation={conv.dilation}"
        )


def _out_shape(x: torch.Tensor, weight: torch.Tensor, conv: Conv) -> tuple[int, int, int, int]:
    ho, wo = conv.out_hw(x.shape[2], x.shape[3], weight.shape[2], weight.shape[3])
    return x.shape[0], weight.shape[0], ho, wo


@torch.library.custom_op("fastblocks::bn_relu_conv2d", mutates_args=())
def _bn_relu_conv2d_op(
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    weight: torch.Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    stats: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Registered op: ``(y, Σy, Σy²)``; the sums are ``[C_out]`` when ``stats`` else empty."""
    conv = make_conv(stride, padding, dilation, groups)
    check_conv_inputs(x, scale, shift, weight, conv)
    backend = _backend.resolve("bn_relu_conv2d", x.device)
    return _FWD[backend](x, scale, shift, weight, conv, stats)


@_bn_relu_conv2d_op.register_fake
def _(x, scale, shift, weight, stride, padding, dilation, groups, stats):
    conv = make_conv(stride, padding, dilation, groups)
    check_conv_inputs(x, scale, shift, weight, conv)
    fmt = memory_format(is_channels_last(x))
    y = torch.empty(_out_shape(x, weight, conv), dtype=x.dtype, device=x.device, memory_format=fmt)
    cd = acc_dtype(x.dtype)
    k = weight.shape[0] if stats else 0
    return y, x.new_empty((k,), dtype=cd), x.new_empty((k,), dtype=cd)


@torch.library.custom_op("fastblocks::bn_relu_conv2d_backward", mutates_args=())
def _bn_relu_conv2d_backward_op(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    weight: torch.Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    need_input: bool,
    need_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Registered op: ``(dx, dscale, dshift, dweight)``; outputs not asked for are empty."""
    conv = make_conv(stride, padding, dilation, groups)
    backend = _backend.resolve("bn_relu_conv2d", x.device)
    return _BWD[backend](grad_y, x, scale, shift, weight, conv, need_input, need_weight)


@_bn_relu_conv2d_backward_op.register_fake
def _(grad_y, x, scale, shift, weight, stride, padding, dilation, groups, need_input, need_weight):
    if need_input:
        dx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=memory_format(is_channels_last(x)))
        dscale, dshift = torch.empty_like(scale), torch.empty_like(shift)
    else:
        dx, dscale, dshift = empty0(x), empty0(scale), empty0(shift)
    dweight = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device) if need_weight else empty0(weight)
    return dx, dscale, dshift, dweight


def _setup_context(ctx, inputs, output) -> None:
    _backend.remember(ctx)
    x, scale, shift, weight, stride, padding, dilation, groups, stats = inputs
    ctx.conv = (list(stride), list(padding), list(dilation), groups)
    # Absent gradients stay None (the stats outputs are usually not differentiated).
    ctx.set_materialize_grads(False)
    # Never the activation: x, the [C] vectors and the weight; y only when the statistics
    # were returned (their gradient needs it; the consumer BN keeps y alive anyway).
    ctx.save_for_backward(x, scale, shift, weight, output[0] if stats else None)


def _stats_grad_into_y(
    grad_y: torch.Tensor | None, y: torch.Tensor | None, grad_sum: torch.Tensor | None, grad_sumsq: torch.Tensor | None
) -> torch.Tensor | None:
    """dL/dy including the paths through ``Σy`` (d/dy = 1) and ``Σy²`` (d/dy = 2y)."""
    if y is None or (grad_sum is None and grad_sumsq is None):
        return grad_y
    cd = acc_dtype(y.dtype)
    g = torch.zeros((), dtype=cd, device=y.device) if grad_y is None else grad_y.to(cd)
    if grad_sum is not None:
        g = g + _per_channel(grad_sum.to(cd))
    if grad_sumsq is not None:
        g = g + 2.0 * y.to(cd) * _per_channel(grad_sumsq.to(cd))
    return g.to(y.dtype)


def _backward_inputs(ctx, grad_y, grad_sum, grad_sumsq):
    """``(g, x, scale, shift, weight, need)`` for either backward below (``g``: the gradient of
    y with the statistics' gradients folded in, at the output's shape), or ``None`` when nothing is needed."""
    x, scale, shift, weight, y = ctx.saved_tensors
    g = _stats_grad_into_y(grad_y, y, grad_sum, grad_sumsq)
    need = ctx.needs_input_grad
    if g is None or not any(need[:4]):
        return None
    return g.expand(_out_shape(x, weight, make_conv(*ctx.conv))), x, scale, shift, weight, need


def _picked(grads: tuple, need: tuple) -> tuple:
    """The 9 input gradients: dx, dscale, dshift, dweight where asked for, None elsewhere."""
    return (*(t if wanted else None for t, wanted in zip(grads, need[:4])), None, None, None, None, None)


@_backend.backward_on_forward_backend
def _backward(ctx, grad_y, grad_sum, grad_sumsq):
    prep = _backward_inputs(ctx, grad_y, grad_sum, grad_sumsq)
    if prep is None:
        return (None,) * 9
    g, x, scale, shift, weight, need = prep
    grads = _bn_relu_conv2d_backward_op(
        g, x, scale, shift, weight, *ctx.conv, need_input=any(need[:3]), need_weight=need[3]
    )
    return _picked(grads, need)


_bn_relu_conv2d_op.register_autograd(_backward, setup_context=_setup_context)


def _forward_direct(x, scale, shift, weight, stride, padding, dilation, groups, stats):
    conv = make_conv(stride, padding, dilation, groups)
    return _FWD[_backend.resolve("bn_relu_conv2d", x.device)](x, scale, shift, weight, conv, stats)


def _backward_direct(ctx, grad_y, grad_sum, grad_sumsq):
    prep = _backward_inputs(ctx, grad_y, grad_sum, grad_sumsq)
    if prep is None:
        return (None,) * 9
    g, x, scale, shift, weight, need = prep
    bwd = _BWD[_backend.resolve("bn_relu_conv2d", x.device)]
    return _picked(bwd(g, x, scale, shift, weight, make_conv(*ctx.conv), any(need[:3]), need[3]), need)


_BNReLUConv2dFunction = eager_function(
    "bn_relu_conv2d",
    _forward_direct,
    _setup_context,
    _backward_direct,
    non_differentiable=lambda inputs, output: () if inputs[-1] else output[1:],  # empty statistics
)


# ----------------------------------------------------------------------------- whole layer, CPU
# conv2d(relu(batch_norm(x))) with the BatchNorm inside, on the compiled CPU backend. Split into
# bn_stats -> scale/shift -> bn_relu_conv2d, the backward is the prologue's reduction and dx pass,
# then the statistics' own x-sized pass, then autograd adding the two dx (and a dozen small
# per-channel nodes). Here it is the BatchNorm-ReLU backward of the convolution's input gradient:
# one reduction and one dx pass (``fastblocks::bn_fused_bwd``). Forward: ``bn_fused_fwd``
# (statistics, the running-buffer update in eager calls, the activation), the convolution, the
# activation freed. Saved: x, the weights and the per-channel statistics. Eager calls run it as
# one autograd node (:class:`_BNReLUConvCPUFunction`), traced calls as the registered op pair
# ``fastblocks::batch_norm_relu_conv2d`` / ``batch_norm_relu_conv2d_backward`` (opaque to
# Inductor, which would otherwise re-lay-out the convolution's operands).
def _whole_forward(
    x: torch.Tensor,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor,
    conv: Conv,
    training: bool,
    factor: float,
    eps: float,
    update: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(conv2d(relu(batch_norm(x)), weight), mean, biased var)``; running buffers updated when ``update``."""
    cl = is_channels_last(x)
    a, mean, var = torch.ops.fastblocks.bn_fused_fwd.default(
        x, gamma, beta, running_mean, running_var, None, training, factor, eps, True, update, cl
    )
    with no_autocast(x.device.type):
        y = F.conv2d(a, weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
    return to_layout(y, cl), mean, var


def _whole_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
    mean: torch.Tensor,
    var: torch.Tensor,
    weight: torch.Tensor,
    conv: Conv,
    training: bool,
    eps: float,
    need: tuple[bool, bool, bool, bool],
) -> tuple[torch.Tensor | None, ...]:
    """``(dx, dgamma, dbeta, dweight)`` of :func:`_whole_forward` (None where ``need`` is false)."""
    cl = is_channels_last(x)
    # The forward's activation, bit for bit: the same kernel normalizing with the saved
    # statistics (eval mode of the same op, the same per-channel arithmetic).
    a = torch.ops.fastblocks.bn_fused_fwd.default(x, gamma, beta, mean, var, None, False, 0.0, eps, True, False, cl)[0]
    need_bn = any(need[:3])
    grad_a, dweight, _ = torch.ops.aten.convolution_backward(
        grad_y, a, weight, None, conv.stride, conv.padding, conv.dilation, False, [0, 0], conv.groups,
        [need_bn, need[3], False],
    )  # fmt: skip
    del a
    dx = dgamma = dbeta = None
    if need_bn:
        dx, dgamma, dbeta, _ = torch.ops.fastblocks.bn_fused_bwd.default(
            grad_a, x, gamma, beta, mean, var, None, training, eps, True, need[0], need[1], need[2], False, cl
        )
    return dx, dgamma, dbeta, dweight if need[3] else None


class _BNReLUConvCPUFunction(torch.autograd.Function):
    """The whole layer for plain eager calls: one autograd node; the running buffers travel in a
    tuple, out of autograd's view, and are updated in place by the forward kernel."""

    @staticmethod
    def forward(ctx, x, gamma, beta, buffers, training, factor, eps, weight, conv):
        running_mean, running_var = buffers
        update = training and running_mean is not None
        y, mean, var = _whole_forward(
            x, gamma, beta, running_mean, running_var, weight, conv, training, factor, eps, update
        )
        ctx.training, ctx.eps, ctx.conv = training, eps, conv
        ctx.save_for_backward(x, gamma, beta, mean, var, weight)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        x, gamma, beta, mean, var, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dgamma, dbeta, dweight = _whole_backward(
            grad_y, x, gamma, beta, mean, var, weight, ctx.conv, ctx.training, ctx.eps,
            (need[0], need[1], need[2], need[7]),
        )  # fmt: skip
        return dx, dgamma, dbeta, None, None, None, None, dweight, None


def _check_whole_layer_device(x: torch.Tensor) -> None:
    if x.device.type != "cpu":
        raise ValueError(f"fastblocks::batch_norm_relu_conv2d runs on the CPU; x is on {x.device}")
    if not _backend.cpu_kernels_built("bn_fused_fwd", "bn_fused_bwd"):
        raise RuntimeError(
            "fastblocks::batch_norm_relu_conv2d needs the compiled extension's bn_fused_fwd/bn_fused_bwd "
            "CPU kernels, which this build lacks (rebuild: pip install --no-build-isolation -e .)"
        )


@torch.library.custom_op("fastblocks::batch_norm_relu_conv2d", mutates_args=())
def _whole_layer_op(
    x: torch.Tensor,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    training: bool,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Registered op: ``(conv2d(relu(batch_norm(x)), weight), mean, biased var)``. The running
    buffers normalize in eval and are never written (the caller folds mean/var into them)."""
    _check_whole_layer_device(x)
    conv = make_conv(stride, padding, dilation, groups)
    return _whole_forward(x, gamma, beta, running_mean, running_var, weight, conv, training, 0.0, eps, False)


@_whole_layer_op.register_fake
def _(x, gamma, beta, running_mean, running_var, weight, stride, padding, dilation, groups, training, eps):
    ho, wo = make_conv(stride, padding, dilation, groups).out_hw(*x.shape[2:], *weight.shape[2:])
    shape = (x.shape[0], weight.shape[0], ho, wo)
    y = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=memory_format(is_channels_last(x)))
    return (y, *fake_channel_vectors(x, 2))


@torch.library.custom_op("fastblocks::batch_norm_relu_conv2d_backward", mutates_args=())
def _whole_layer_backward_op(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
    mean: torch.Tensor,
    var: torch.Tensor,
    weight: torch.Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    training: bool,
    eps: float,
    output_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Registered op: ``(dx, dgamma, dbeta, dweight)`` of ``batch_norm_relu_conv2d`` (empty where
    not asked, or where gamma/beta is None)."""
    _check_whole_layer_device(x)
    conv = make_conv(stride, padding, dilation, groups)
    need = (output_mask[0], output_mask[1], output_mask[2], output_mask[3])
    dx, dgamma, dbeta, dweight = _whole_backward(grad_y, x, gamma, beta, mean, var, weight, conv, training, eps, need)
    if dweight is not None and dweight.stride() != weight.stride():
        dweight = torch.empty_like(weight).copy_(dweight)  # the weight's own strides, as the fake says
    return (
        empty0(x) if dx is None else dx,
        empty0(x) if dgamma is None else dgamma,
        empty0(x) if dbeta is None else dbeta,
        empty0(weight) if dweight is None else dweight,
    )


@_whole_layer_backward_op.register_fake
def _(grad_y, x, gamma, beta, mean, var, weight, stride, padding, dilation, groups, training, eps, output_mask):
    def vector(p: torch.Tensor | None, asked: bool) -> torch.Tensor:
        return torch.empty_like(p, memory_format=torch.contiguous_format) if asked and p is not None else empty0(x)

    return (
        fake_like(x, is_channels_last(x)) if output_mask[0] else empty0(x),
        vector(gamma, output_mask[1]),
        vector(beta, output_mask[2]),
        torch.empty_like(weight) if output_mask[3] else empty0(weight),
    )


def _whole_setup_context(ctx, inputs, output) -> None:
    x, gamma, beta, _rm, _rv, weight, stride, padding, dilation, groups, training, eps = inputs
    _, mean, var = output
    ctx.conv, ctx.training, ctx.eps = (stride, padding, dilation, groups), training, eps
    ctx.has_gamma, ctx.has_beta = gamma is not None, beta is not None
    ctx.save_for_backward(x, gamma, beta, mean, var, weight)


def _whole_backward_registered(ctx, grad_y, _grad_mean, _grad_var):
    x, gamma, beta, mean, var, weight = ctx.saved_tensors
    need = ctx.needs_input_grad
    mask = [need[0], need[1] and ctx.has_gamma, need[2] and ctx.has_beta, need[5]]
    if not any(mask):
        return (None,) * 12
    dx, dgamma, dbeta, dweight = _whole_layer_backward_op(
        grad_y, x, gamma, beta, mean, var, weight, *ctx.conv, ctx.training, ctx.eps, mask
    )
    picked = [t if m else None for t, m in zip((dx, dgamma, dbeta, dweight), mask, strict=True)]
    return picked[0], picked[1], picked[2], None, None, picked[3], None, None, None, None, None, None


_whole_layer_op.register_autograd(_whole_backward_registered, setup_context=_whole_setup_context)


def cpu_whole_layer_available(x: torch.Tensor) -> bool:
    """Whether :func:`bn_relu_conv_with_batch_norm` can run ``x``: a plain eager or traced
    (torch.compile) CPU call with the compiled CPU backend for both the BatchNorm and
    bn_relu_conv2d and its one-call kernels built."""
    return (
        x.numel() > 0
        and (eager_path(x) or torch.compiler.is_compiling())
        and _backend.resolve("bn_relu_conv2d", x.device) == "cpu"
        and _backend.cpu_kernels("batch_norm_act", x.device, "bn_fused_fwd", "bn_fused_bwd", under_compile=True)
    )


def bn_relu_conv_with_batch_norm(
    x: torch.Tensor,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor,
    *,
    training: bool,
    momentum: float | None,
    eps: float,
    num_batches_tracked: torch.Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
) -> torch.Tensor:
    """``conv2d(relu(batch_norm(x)), weight)`` as one node on the CPU (where
    :func:`cpu_whole_layer_available`); the caller has checked the BatchNorm's arguments.

    Args:
        x: ``[N, C_in, H, W]``; gamma, beta: ``[C_in]`` or None; weight ``[C_out, C_in / groups, kh, kw]``.
        running_mean, running_var: ``[C_in]`` buffers (updated in place once when ``training``,
            as ``nn.BatchNorm2d`` with ``momentum``/``num_batches_tracked``; the normalization's
            statistics when not), or None.
        training: normalize with the batch statistics.

    Returns:
        ``[N, C_out, H_out, W_out]`` (channels_last when x is).
    """
    conv = make_conv(stride, padding, dilation, groups)
    check_conv_inputs(x, None, None, weight, conv, vectors=False)
    update = training and running_mean is not None
    if eager_path(x):
        factor = momentum_factor(momentum, num_batches_tracked) if update else 0.0
        return _BNReLUConvCPUFunction.apply(
            x, gamma, beta, (running_mean, running_var), training, factor, eps, weight, conv
        )
    y, mean, var = _whole_layer_op(
        x, gamma, beta, None if training else running_mean, None if training else running_var, weight,
        list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups, training, eps,
    )  # fmt: skip
    if update:
        update_running_stats(
            running_mean, running_var, mean, var, x.numel() // x.shape[1], momentum, num_batches_tracked
        )
    return y


# ----------------------------------------------------------------------------- public functional
def bn_relu_conv2d(
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    weight: torch.Tensor,
    *,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    stats: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``conv2d(relu(x * scale[c] + shift[c]), weight)`` without storing the activation.

    Zero padding applies to the activation (padded taps are 0, not ``relu(shift)``). Backward
    recomputes the activation from x; only x, scale, shift and weight are saved (and y when
    ``stats=True``).

    Args:
        x: ``[N, C_in, H, W]``, fp16/bf16/fp32/fp64, NCHW, channels_last or any strided view.
        scale: ``[C_in]`` floating (typically fp32 ``gamma * invstd``); used in fp32 (fp64 for
            fp64 x).
        shift: ``[C_in]`` floating (typically fp32 ``beta - mean * scale``).
        weight: ``[C_out, C_in / groups, kh, kw]``, x's dtype and device. No bias.
        stride, padding, dilation: int or pair, as :func:`torch.nn.functional.conv2d`
            (padding >= 0; string paddings are not supported).
        groups: as :func:`torch.nn.functional.conv2d`.
        stats: also return the per-output-channel sums the next BatchNorm needs.

    Returns:
        ``y`` of shape ``[N, C_out, H_out, W_out]`` in x's dtype, channels_last when x is,
        else contiguous; with ``stats=True``, ``(y, sum, sumsq)`` where ``sum = y.sum((0, 2, 3))``
        and ``sumsq = (y * y).sum((0, 2, 3))`` are ``[C_out]`` fp32 (fp64 for fp64 x).
        Everything is differentiable (w.r.t. x, scale, shift and weight).

    Raises:
        TypeError / ValueError: naming the argument, on a non-tensor, a wrong dtype or rank,
            a channel or device mismatch, or a bad stride/padding/dilation/groups.
    """
    conv = make_conv(stride, padding, dilation, groups)
    check_conv_inputs(x, scale, shift, weight, conv)
    if not isinstance(stats, bool):
        raise TypeError(f"stats must be a bool, got {stats!r}")
    op = _BNReLUConv2dFunction.apply if eager_path(x) else _bn_relu_conv2d_op
    y, s, ss = op(
        x, scale, shift, weight, list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups, stats
    )
    return (y, s, ss) if stats else y
