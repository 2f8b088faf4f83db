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
from fastblocks.ops._common import acc_dtype, check_like, check_tensor, is_channels_last
from fastblocks.ops.batchnorm import batch_norm_act, batch_norm_act_reference
from fastblocks.ops.bn_relu_conv import (
    Conv,
    bn_relu_conv2d,
    bn_relu_conv2d_reference,
    check_conv_inputs,
    make_conv,
    to_layout,
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


class _TailFunction(torch.autograd.Function):
    """Forward and backward of the bottleneck tail (module docstring); returns (y, mean, var)."""

    @staticmethod
    def forward(ctx, x, scale, shift, weight, identity, bn_weight, bn_bias, running_mean, running_var, cfg):
        conv, training, eps = cfg
        k = kernels_for("batch_norm_act", x.device)
        c = _conv(_activation(k, x, scale, shift), weight, conv)  # a is freed here
        cl = is_channels_last(c)
        cd = acc_dtype(c.dtype)
        if training:
            mean, var = k.stats(c, cl)
        else:
            mean, var = running_mean.to(cd).clone(), running_var.to(cd).clone()
        s3, t3, _ = scale_shift(mean, var, bn_weight, bn_bias, eps)
        y = k.apply(c, s3, t3, identity, True, cl)
        _backend.remember(ctx)
        ctx.cfg = cfg
        ctx.has_bn_weight, ctx.has_bn_bias = bn_weight is not None, bn_bias is not None
        ctx.save_for_backward(x, scale, shift, weight, bn_weight, bn_bias, mean, var, y)
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    @torch.autograd.function.once_differentiable
    @_backend.backward_on_forward_backend
    def backward(ctx, grad_y, _grad_mean, _grad_var):
        x, scale, shift, weight, bn_weight, bn_bias, mean, var, y = ctx.saved_tensors
        conv, training, eps = ctx.cfg
        need = ctx.needs_input_grad
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
        dbn_weight = (sum_gc * invstd).to(bn_weight.dtype) if ctx.has_bn_weight and need[5] else None
        dbn_bias = sum_g.to(bn_bias.dtype) if ctx.has_bn_bias and need[6] else None
        need_a = any(need[:3])
        da, dweight, _ = torch.ops.aten.convolution_backward(
            dc, a, weight, None, conv.stride, conv.padding, conv.dilation, False, [0, 0], conv.groups,
            [need_a, need[3], False],
        )  # fmt: skip
        del a, dc
        dx = dscale = dshift = None
        if need_a:
            # Through a = relu(x * scale + shift): Σ g_z and Σ g_z x (bwd_reduce with mean 0), dx = scale g_z.
            cl_x = is_channels_last(x)
            zero = torch.zeros(x.shape[1], dtype=cd, device=x.device)
            sum_gz, sum_gzx = k.bwd_reduce(da, x, zero, scale, shift, None, True, cl_x)
            dx = to_layout(k.bwd_apply(da, x, scale, shift, None, scale.to(cd), zero, zero, True, cl_x), cl_x)
            dscale, dshift = sum_gzx.to(scale.dtype), sum_gz.to(shift.dtype)
        return (
            dx if need[0] else None,
            dscale if need[1] else None,
            dshift if need[2] else None,
            dweight if need[3] else None,
            g if need[4] else None,
            dbn_weight,
            dbn_bias,
            None,
            None,
            None,
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
    y, mean, var = _TailFunction.apply(
        x, scale, shift, weight, identity, bn_weight, bn_bias, running_mean, running_var, (conv, training, eps)
    )
    if training and running_mean is not None and y.numel():
        count = y.numel() // y.shape[1]
        update_running_stats(running_mean, running_var, mean, var, count, momentum, num_batches_tracked)
    return y
