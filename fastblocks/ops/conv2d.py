"""A plain convolution as one registered op, for the fused networks' graphs under torch.compile.

What it is: ``F.conv2d`` (and its backward, ``aten.convolution_backward``) as the registered ops
``fastblocks::conv2d`` / ``fastblocks::conv2d_backward``. Nothing is fused; it saves x and the
weight, as ``aten.convolution`` does.

Why it exists. Inductor's layout optimization (on the CPU whenever oneDNN is available; on CUDA by
a FLOP heuristic) turns a graph that holds any ``aten.convolution`` channels_last: every tensor
upstream of a convolution "prefers" channels_last, including the weights and activations that
fastblocks' ops take. Those ops are fallback kernels with a fixed stride order, so on an NCHW
model Inductor copies each such weight to channels_last and back at every step, copies
activations at the op boundaries, and saves the channels_last weight copies for backward.
Measured with ``python benchmarks/compiled_saved_bytes.py --model resnet50 --batch 2 --size 64``
before this op: 8.38 MB saved by the fused model eager, 44.25 MB compiled, the difference being
the copies of every 3x3 and stem weight. A fused network's remaining plain convolutions (a
bottleneck's first 1x1, a projection shortcut) go through this op when traced
(:func:`conv2d_module`), so its graph holds no ``aten.convolution``, Inductor keeps the model's own
layout, and nothing is copied. Eager calls run the module itself.

Autocast: as eager ``F.conv2d`` under autocast, x, the weight and the bias are cast to the autocast
dtype first (float64 is left alone); the op itself runs with autocast off, so its fake and real
outputs agree. Output layout: channels_last when x is, else contiguous (the fake says the same,
and the real output is brought to it if the convolution chose otherwise).

Double backward (``create_graph=True`` through a traced graph) is not supported; eager calls,
which run ``nn.Conv2d`` itself, support it.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from fastblocks.ops._common import (
    compute_dtype_of,
    eager_path,
    empty0,
    is_channels_last,
    memory_format,
    no_autocast,
    to_layout,
)
from fastblocks.ops.bn_relu_conv import make_conv


@torch.library.custom_op("fastblocks::conv2d", mutates_args=())
def _conv2d_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
) -> torch.Tensor:
    """Registered op: ``F.conv2d(x, weight, bias, ...)``, channels_last when x is."""
    with no_autocast(x.device.type):
        y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    return to_layout(y, is_channels_last(x))


@_conv2d_op.register_fake
def _(x, weight, bias, stride, padding, dilation, groups):
    ho, wo = make_conv(stride, padding, dilation, groups).out_hw(*x.shape[2:], *weight.shape[2:])
    shape = (x.shape[0], weight.shape[0], ho, wo)
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=memory_format(is_channels_last(x)))


@torch.library.custom_op("fastblocks::conv2d_backward", mutates_args=())
def _conv2d_backward_op(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    has_bias: bool,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    output_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Registered op: ``(dx, dweight, dbias)`` of :func:`_conv2d_op` (empty where not asked)."""
    bias_sizes = [weight.shape[0]] if has_bias else None
    dx, dw, db = torch.ops.aten.convolution_backward(
        grad_out, x, weight, bias_sizes, stride, padding, dilation, False, [0, 0], groups, output_mask
    )
    dx = to_layout(dx, is_channels_last(x)) if output_mask[0] else empty0(x)
    if output_mask[1] and dw.stride() != weight.stride():
        dw = torch.empty_like(weight).copy_(dw)  # the weight's own strides, as the fake says
    return dx, dw if output_mask[1] else empty0(weight), db if output_mask[2] else empty0(weight)


@_conv2d_backward_op.register_fake
def _(grad_out, x, weight, has_bias, stride, padding, dilation, groups, output_mask):
    fmt = memory_format(is_channels_last(x))
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt) if output_mask[0] else empty0(x)
    dw = torch.empty_like(weight) if output_mask[1] else empty0(weight)
    db = weight.new_empty((weight.shape[0],)) if output_mask[2] else empty0(weight)
    return dx, dw, db


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, ctx.stride, ctx.padding, ctx.dilation, ctx.groups = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight)


def _backward(ctx, grad_out):
    x, weight = ctx.saved_tensors
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
    dx, dw, db = _conv2d_backward_op(
        grad_out, x, weight, ctx.has_bias, ctx.stride, ctx.padding, ctx.dilation, ctx.groups, mask
    )
    return dx if mask[0] else None, dw if mask[1] else None, db if mask[2] else None, None, None, None, None


_conv2d_op.register_autograd(_backward, setup_context=_setup_context)


def conv2d_module(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``conv(x)``: the module itself on eager calls, the registered op ``fastblocks::conv2d`` when
    traced (torch.compile, export; see the module docstring for why).

    Args:
        x: ``[N, C_in, H, W]``, NCHW or channels_last.
        conv: an ``nn.Conv2d`` with ``padding_mode="zeros"`` and numeric padding (any other
            convolution runs as itself, traced or not).

    Returns:
        ``[N, C_out, H_out, W_out]``, in the autocast dtype under autocast, else x's dtype;
        channels_last when x is (traced).
    """
    if eager_path(x) or type(conv) is not nn.Conv2d or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return conv(x)
    cd = compute_dtype_of(x)
    bias = None if conv.bias is None else conv.bias.to(cd)
    return _conv2d_op(
        x.to(cd), conv.weight.to(cd), bias, list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups
    )
