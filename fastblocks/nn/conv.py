"""Convolution blocks with BatchNorm-ReLU fused into them.

Models keep their BatchNorm and Conv2d as separate attributes (so the state_dict keys are
torchvision's: ``norm1``/``conv1``, ``bn1``/``conv2``, ...) and call the functional
:func:`bn_relu_conv` on the pair.
"""

from __future__ import annotations

import torch
from torch import nn

from fastblocks.ops.batchnorm import bn_stats, update_running_stats
from fastblocks.ops.bn_relu_conv import bn_relu_conv2d


def _autocast_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a convolution runs in here: autocast's when it is on, else x's."""
    device = x.device.type
    if device not in ("cpu", "cuda"):  # autocast state is undefined for meta tensors
        return x.dtype
    if torch.is_autocast_enabled(device) and x.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return torch.get_autocast_dtype(device)
    return x.dtype


def bn_relu_conv(x: torch.Tensor, bn: nn.BatchNorm2d, conv: nn.Conv2d) -> torch.Tensor:
    """``conv(relu(bn(x)))`` without keeping the activation: only x is saved for backward.

    BatchNorm statistics come from ``bn_stats`` (training; running buffers of ``bn`` updated
    once, exactly as ``nn.BatchNorm2d`` would) or from the running buffers (eval); the
    normalization and ReLU are the prologue of :func:`fastblocks.ops.bn_relu_conv.bn_relu_conv2d`,
    which recomputes the activation in backward.

    Args:
        x: ``[N, C_in, H, W]`` (NCHW or channels_last).
        bn: a BatchNorm2d over ``C_in`` channels (``torch.nn`` or fastblocks).
        conv: a Conv2d ``C_in -> C_out`` with zero padding.

    Returns:
        ``[N, C_out, H_out, W_out]`` (channels_last when x is).
    """
    if x.dim() != 4:
        raise ValueError(f"bn_relu_conv expects a 4-D input [N, C, H, W], got shape {tuple(x.shape)}")
    if x.shape[1] != bn.num_features:
        raise ValueError(f"input has {x.shape[1]} channels but the BatchNorm expects {bn.num_features}")
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise ValueError("bn_relu_conv supports zero padding given as integers")
    dtype = _autocast_dtype(x)
    x = x.to(dtype)
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
    use_batch = bn.training or (bn.running_mean is None and bn.running_var is None)
    if use_batch:
        if x.numel() // max(x.shape[1], 1) <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}")
        mean, var = bn_stats(x)
        if bn.training and bn.track_running_stats:
            update_running_stats(
                bn.running_mean, bn.running_var, mean.detach(), var.detach(), x.numel() // x.shape[1],
                bn.momentum, bn.num_batches_tracked,
            )  # fmt: skip
    else:
        cd = torch.float64 if x.dtype == torch.float64 else torch.float32
        mean, var = bn.running_mean.to(cd), bn.running_var.to(cd)
    invstd = torch.rsqrt(var + bn.eps)
    scale = invstd if bn.weight is None else bn.weight.to(invstd.dtype) * invstd
    shift = -mean * scale if bn.bias is None else bn.bias.to(invstd.dtype) - mean * scale
    y = bn_relu_conv2d(
        x, scale, shift, conv.weight.to(dtype),
        stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
    )  # fmt: skip
    if conv.bias is not None:
        y = y + conv.bias.to(dtype).view(1, -1, 1, 1)
    return y


class BNReLUConv2d(nn.Module):
    """Pre-activation ``conv(relu(bn(x)))`` (DenseNet layers, pre-activation ResNets).

    State dict: ``norm.*`` (a BatchNorm2d's entries) and ``conv.*`` (a Conv2d's).
    Shapes: ``[N, C_in, H, W] -> [N, C_out, H_out, W_out]``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = False,
        *,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
    ) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels, eps=eps, momentum=momentum)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bn_relu_conv(x, self.norm, self.conv)
