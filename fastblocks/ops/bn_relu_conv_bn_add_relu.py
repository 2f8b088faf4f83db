"""The tail of a ResNet bottleneck as one autograd node:
``y = relu(BN3(conv(relu(x * scale[c] + shift[c]), weight)) + identity)``.

What is fused. In a post-activation bottleneck (conv1-BN1-ReLU-conv2-BN2-ReLU-conv3-BN3,
add, ReLU) the last three steps each keep an x-sized tensor for backward in eager PyTorch: BN2's
input, the ReLU output that conv3 reads, conv3's output that BN3 reads, and the block output
the final ReLU keeps. :func:`fastblocks.ops.bn_relu_conv.bn_relu_conv2d` already removes the
ReLU output; this op also removes conv3's output ``c`` (4x wider than x in a bottleneck): the
forward materializes the activation ``a`` and ``c`` transiently, and the backward recomputes
both from x — one extra pass for ``a`` and one extra convolution (conv3's forward, about a
quarter of a bottleneck's forward FLOPs: +8% of a training step's) in exchange for the largest
tensor of the block.

Saved for backward: x, the weight, [C] vectors, and the output y (whose ReLU mask is the BN3
backward's mask; y is the next block's input, which that block keeps anyway, so it costs
nothing once storages are de-duplicated). Per bottleneck of width w (output 4w), in units of
w-channel maps: eager keeps the block input (4), BN1 input (1), ReLU1 output (1), BN2 input
(1), ReLU2 output (1), conv3 output (4) = 12; fused with this op: block input (4), BN1 input
(1), BN2 input (1) = 6.

BN3 is a full BatchNorm (training: batch statistics, returned so the caller updates the
running buffers once; eval: running statistics). Backward derivation, with
``g' = dL/dy * [not y <= 0]`` (threshold_backward's rule on the stored output):
    d identity = g'
    dc         = BN backward of g' at c (see fastblocks/ops/batchnorm.py: a g' + b c + k)
    dgamma3    = invstd3 Σ g'(c - μ3)          dbeta3 = Σ g'
    da, dW     = convolution_backward(dc, a, W)       (a recomputed from x)
    g_z        = da * [not z <= 0],  z = x * scale + shift
    dx         = g_z * scale      dscale = Σ g_z x      dshift = Σ g_z
The BatchNorm arithmetic runs on the BatchNorm family's kernels of the current backend
(reference, Triton, CPU or CUDA); the convolutions are PyTorch's (oneDNN, cuDNN).

References: He et al. 2016 (bottleneck blocks); Chen et al. 2016, Training Deep Nets with
Sublinear Memory Cost (recompute cheap layers instead of storing them); Rota Bulo et al. 2018,
In-Place Activated BatchNorm (recover what backward needs from the output).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastblocks import _backend
from fastblocks.ops._bn_core import check_train_batch, dx_coefficients, kernels_for, scale_shift, update_running_stats
from fastblocks.ops._common import (
    acc_dtype,
    check_like,
    check_tensor,
    eager_function,
    eager_path,
    empty0,
    is_channels_last,
    memory_format,
    to_layout,
)
from fastblocks.ops.batchnorm import batch_norm_act, batch_norm_act_reference
from fastblocks.ops.bn_relu_conv import (
    Conv,
    bn_relu_conv2d,
    bn_relu_conv2d_reference,
    check_conv_inputs,
    make_conv,
)


# ----------------------------------------------------------------------------- reference
def bn_relu_conv_bn_add_relu2d_reference(
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    weight: torch.Tensor,
    identity: torch.Tensor,
    bn_weight: torch.Tensor | None,
    bn_bias: torch.Tensor | None,
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    *,
    training: bool = True,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
) -> torch.Tensor:
    """The specification: ``relu(batch_norm(conv2d(relu(x * scale + shift), weight)) + identity)``
    in plain PyTorch (running buffers, when given, updated in place as ``F.batch_norm`` does)."""
    c = bn_relu_conv2d_reference(x, scale, shift, weight, stride, padding, dilation, groups)
    return batch_norm_act_reference(
        c, bn_weight, bn_bias, running_mean, running_var,
        training=training, momentum=momentum, eps=eps, residual=identity, relu=True,
    )  # fmt: skip


# ----------------------------------------------------------------------------- autograd node
def _activation(k, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    return k.apply(x, scale, shift, None, True, is_channels_last(x))


def _conv(a: torch.Tensor, weight: torch.Tensor, conv: Conv) -> torch.Tensor:
    # In x's dtype whatever autocast says: the backward's recomputation must see the same values.
    with torch.autocast(a.device.type, enabled=False):
        c = F.conv2d(a, weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
    return to_layout(c, is_channels_last(a))


# The tail is a registered op (opaque to torch.compile): Inductor's joint-graph CSE would merge the
# backward's recomputation of the activation and the convolution with the forward's identical
# nodes, and its partitioner would then save them (the bytes this op exists not to keep).
def _tail_forward(
    x, scale, shift, weight, identity, bn_weight, bn_bias, running_mean, running_var,
    stride, padding, dilation, groups, training, eps,
):  # fmt: skip
    """(y, mean, var): the tail's output and the second BatchNorm's statistics ``[C_out]``."""
    conv = make_conv(stride, padding, dilation, groups)
    k = kernels_for("batch_norm_act", x.device)
    c = _conv(_activation(k, x, scale, shift), weight, conv)  # a is freed here
    cl = is_channels_last(c)
    cd = acc_dtype(c.dtype)
    if training:
        mean, var = k.stats(c, cl)
    else:
        mean, var = running_mean.to(cd).clone(), running_var.to(cd).clone()
    s3, t3, _ = scale_shift(mean, var, bn_weight, bn_bias, eps)
    return k.apply(c, s3, t3, identity, True, cl), mean, var


def _tail_backward(
    grad_y, x, scale, shift, weight, bn_weight, bn_bias, mean, var, y,
    stride, padding, dilation, groups, training, eps, need,
):  # fmt: skip
    """(dx, dscale, dshift, dweight, didentity, dbn_weight, dbn_bias); ``need`` says which are
    wanted (the others are empty placeholders)."""
    conv = make_conv(stride, padding, dilation, groups)
    k = kernels_for("batch_norm_act", x.device)
    cd = acc_dtype(x.dtype)
    a = _activation(k, x, scale, shift)
    c = _conv(a, weight, conv)
    cl_c = is_channels_last(c)
    # g' = grad_y where the final ReLU passed; it is also the identity's gradient.
    g = torch.ops.aten.threshold_backward(grad_y, y, 0)  # eager ReLU's backward: 0 where y <= 0
    s3, t3, invstd = scale_shift(mean, var, bn_weight, bn_bias, eps)
    sum_g, sum_gc = k.bwd_reduce(g, c, mean, s3, t3, None, False, cl_c)
    a3, b3, k3 = dx_coefficients(bn_weight, mean, invstd, sum_g, sum_gc, c.numel() // c.shape[1], training)
    dc = k.bwd_apply(g, c, s3, t3, None, a3, b3, k3, False, cl_c)
    del c
    dbn_weight = (sum_gc * invstd).to(bn_weight.dtype) if bn_weight is not None and need[5] else empty0(x)
    dbn_bias = sum_g.to(bn_bias.dtype) if bn_bias is not None and need[6] else empty0(x)
    need_a = any(need[:3])
    da, dweight, _ = torch.ops.aten.convolution_backward(
        dc, a, weight, None, conv.stride, conv.padding, conv.dilation, False, [0, 0], conv.groups,
        [need_a, need[3], False],
    )  # fmt: skip
    del a, dc
    dx, dscale, dshift = empty0(x), empty0(scale), empty0(shift)
    if need_a:
        # Through a = relu(x * scale + shift): Σ g_z and Σ g_z x (bwd_reduce with mean 0), dx = scale g_z.
        cl_x = is_channels_last(x)
        zero = torch.zeros(x.shape[1], dtype=cd, device=x.device)
        sum_gz, sum_gzx = k.bwd_reduce(da, x, zero, scale, shift, None, True, cl_x)
        dx = to_layout(k.bwd_apply(da, x, scale, shift, None, scale.to(cd), zero, zero, True, cl_x), cl_x)
        dscale, dshift = sum_gzx.to(scale.dtype), sum_gz.to(shift.dtype)
    return dx, dscale, dshift, dweight if need[3] else empty0(weight), g if need[4] else empty0(x), dbn_weight, dbn_bias


@torch.library.custom_op("fastblocks::bn_relu_conv_bn_add_relu2d", mutates_args=())
def _tail_op(
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    weight: torch.Tensor,
    identity: torch.Tensor,
    bn_weight: torch.Tensor | None,
    bn_bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    training: bool,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Registered op: ``(relu(BN(conv(relu(x * scale + shift))) + identity), mean, biased var)``."""
    return _tail_forward(
        x, scale, shift, weight, identity, bn_weight, bn_bias, running_mean, running_var,
        stride, padding, dilation, groups, training, eps,
    )  # fmt: skip


@_tail_op.register_fake
def _(x, scale, shift, weight, identity, bn_weight, bn_bias, running_mean, running_var, stride, padding,
      dilation, groups, training, eps):  # fmt: skip
    conv = make_conv(stride, padding, dilation, groups)
    ho, wo = conv.out_hw(x.shape[2], x.shape[3], weight.shape[2], weight.shape[3])
    fmt = memory_format(is_channels_last(x))
    y = x.new_empty((x.shape[0], weight.shape[0], ho, wo)).contiguous(memory_format=fmt)
    cd = acc_dtype(x.dtype)
    return y, x.new_empty(weight.shape[0], dtype=cd), x.new_empty(weight.shape[0], dtype=cd)


@torch.library.custom_op("fastblocks::bn_relu_conv_bn_add_relu2d_backward", mutates_args=())
def _tail_backward_op(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    weight: torch.Tensor,
    bn_weight: torch.Tensor | None,
    bn_bias: torch.Tensor | None,
    mean: torch.Tensor,
    var: torch.Tensor,
    y: torch.Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    training: bool,
    eps: float,
    need: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Registered op: the tail's input gradients (empty where ``need`` is false)."""
    return _tail_backward(
        grad_y, x, scale, shift, weight, bn_weight, bn_bias, mean, var, y,
        stride, padding, dilation, groups, training, eps, need,
    )  # fmt: skip


@_tail_backward_op.register_fake
def _(grad_y, x, scale, shift, weight, bn_weight, bn_bias, mean, var, y, stride, padding, dilation, groups,
      training, eps, need):  # fmt: skip
    def like(t, wanted):
        if t is None or not wanted:
            return empty0(x)
        return torch.empty_like(t, memory_format=memory_format(is_channels_last(t)))

    dx = like(x, any(need[:3]))
    dscale = torch.empty_like(scale) if any(need[:3]) else empty0(scale)
    dshift = torch.empty_like(shift) if any(need[:3]) else empty0(shift)
    dweight = torch.empty_like(weight) if need[3] else empty0(weight)
    return dx, dscale, dshift, dweight, like(y, need[4]), like(bn_weight, need[5]), like(bn_bias, need[6])


def _tail_setup_context(ctx, inputs, output) -> None:
    _backend.remember(ctx)
    x, scale, shift, weight, _identity, bn_weight, bn_bias, _rm, _rv, stride, padding, dilation, groups = inputs[:13]
    ctx.cfg = (list(stride), list(padding), list(dilation), groups, inputs[13], inputs[14])
    ctx.has_bn = (bn_weight is not None, bn_bias is not None)
    y, mean, var = output
    ctx.save_for_backward(x, scale, shift, weight, bn_weight, bn_bias, mean, var, y)


def _tail_grads(ctx, grad_y, backward) -> tuple:
    x, scale, shift, weight, bn_weight, bn_bias, mean, var, y = ctx.saved_tensors
    need = [bool(n) for n in ctx.needs_input_grad[:7]]
    need[5] = need[5] and ctx.has_bn[0]
    need[6] = need[6] and ctx.has_bn[1]
    grads = backward(grad_y, x, scale, shift, weight, bn_weight, bn_bias, mean, var, y, *ctx.cfg, need)
    return (*(g if wanted else None for g, wanted in zip(grads, need)), None, None, None, None, None, None, None, None)


@_backend.backward_on_forward_backend
def _tail_autograd(ctx, grad_y, _grad_mean, _grad_var):
    return _tail_grads(ctx, grad_y, _tail_backward_op)


_tail_op.register_autograd(_tail_autograd, setup_context=_tail_setup_context)

_TailFunction = eager_function(
    "bn_relu_conv_bn_add_relu2d",
    _tail_forward,
    _tail_setup_context,
    lambda ctx, grad_y, _grad_mean, _grad_var: _tail_grads(ctx, grad_y, _tail_backward),
    non_differentiable=lambda inputs, output: output[1:],  # the statistics
)


# ----------------------------------------------------------------------------- public functional
def _check_second_bn(
    bn_weight: torch.Tensor | None,
    bn_bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    x: torch.Tensor,
    out_shape: tuple[int, int, int, int],
    training: bool,
) -> None:
    c_out = out_shape[1]
    named = (
        ("bn_weight", bn_weight),
        ("bn_bias", bn_bias),
        ("running_mean", running_mean),
        ("running_var", running_var),
    )
    for name, v in named:
        if v is None:
            continue
        check_tensor(v, name, dim=1)
        if v.numel() != c_out:
            raise ValueError(f"{name} has {v.numel()} elements but the convolution has {c_out} output channels")
        if v.device != x.device:
            raise ValueError(f"{name} is on {v.device} but x is on {x.device}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be given or both be None")
    if not training and running_mean is None:
        raise ValueError("eval mode needs running_mean and running_var (or use training=True)")
    check_train_batch(out_shape, training, allow_empty=True)


def bn_relu_conv_bn_add_relu2d(
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    weight: torch.Tensor,
    identity: torch.Tensor,
    bn_weight: torch.Tensor | None,
    bn_bias: torch.Tensor | None,
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    *,
    training: bool = True,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    num_batches_tracked: torch.Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
) -> torch.Tensor:
    """``relu(BN(conv2d(relu(x * scale[c] + shift[c]), weight)) + identity)``, keeping neither
    the activation nor the convolution's output for backward (both are recomputed from x).

    ``scale``/``shift`` are the preceding BatchNorm's per-channel affine map (differentiable:
    pass ``gamma * invstd`` and ``beta - mean * scale`` built from ``bn_stats`` and gradients
    reach that BatchNorm's parameters and statistics). The second BatchNorm (``bn_weight``,
    ``bn_bias``, running buffers) follows ``nn.BatchNorm2d``: batch statistics in training, with
    the running buffers updated once (``momentum=None``: cumulative average over
    ``num_batches_tracked``, which the caller increments); running statistics in eval.

    Args:
        x: ``[N, C_in, H, W]`` (NCHW or channels_last), fp16/bf16/fp32/fp64.
        scale, shift: ``[C_in]`` floating.
        weight: ``[C_out, C_in / groups, kh, kw]`` in x's dtype; no bias.
        identity: ``[N, C_out, H_out, W_out]``, x's dtype: the shortcut.
        bn_weight, bn_bias: ``[C_out]`` or ``None``; running_mean, running_var: ``[C_out]`` or ``None``.
        stride, padding, dilation, groups: the convolution's, as :func:`torch.nn.functional.conv2d`.

    Returns:
        ``[N, C_out, H_out, W_out]`` in x's dtype, channels_last when x is; differentiable
        w.r.t. x, scale, shift, weight, identity, bn_weight and bn_bias.
    """
    conv = make_conv(stride, padding, dilation, groups)
    check_conv_inputs(x, scale, shift, weight, conv)
    check_tensor(identity, "identity", dim=4)
    check_like(identity, "identity", x, "x", shape=False)
    ho, wo = conv.out_hw(x.shape[2], x.shape[3], weight.shape[2], weight.shape[3])
    want = (x.shape[0], weight.shape[0], ho, wo)
    if tuple(identity.shape) != want:
        raise ValueError(f"identity has shape {tuple(identity.shape)} but the convolution's output has shape {want}")
    _check_second_bn(bn_weight, bn_bias, running_mean, running_var, x, want, training)
    if x.shape[0] == 0:  # an empty batch: the unfused ops handle it as nn.BatchNorm2d does
        c = bn_relu_conv2d(x, scale, shift, weight, stride=stride, padding=padding, dilation=dilation, groups=groups)
        return batch_norm_act(
            c, bn_weight, bn_bias, running_mean, running_var, training=training, momentum=momentum, eps=eps,
            residual=identity, relu=True, num_batches_tracked=num_batches_tracked,
        )  # fmt: skip
    op = _TailFunction.apply if eager_path(x) else _tail_op
    y, mean, var = op(
        x, scale, shift, weight, identity, bn_weight, bn_bias, running_mean, running_var,
        list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups, training, float(eps),
    )  # fmt: skip
    if training and running_mean is not None and y.numel():
        count = y.numel() // y.shape[1]
        update_running_stats(running_mean, running_var, mean, var, count, momentum, num_batches_tracked)
    return y
