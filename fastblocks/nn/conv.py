"""Convolution blocks with BatchNorm-ReLU fused into them.

Models keep their BatchNorm and Conv2d as separate attributes (so the state_dict keys are
torchvision's: ``norm1``/``conv1``, ``bn1``/``conv2``, ...) and call the functional
:func:`bn_relu_conv` on the pair.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from fastblocks.ops.batchnorm import batch_norm_act


def _conv(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    return F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def bn_relu_conv(x: torch.Tensor, bn: nn.BatchNorm2d, conv: nn.Conv2d) -> torch.Tensor:
    """``conv(relu(bn(x)))`` with ``bn``'s parameters and buffers (updated once in training).

    Args:
        x: ``[N, C_in, H, W]``.
        bn: a BatchNorm2d over ``C_in`` channels (``torch.nn`` or fastblocks).
        conv: a Conv2d ``C_in -> C_out``.

    Returns:
        ``[N, C_out, H_out, W_out]``.
    """
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
    training = bn.training or (bn.running_mean is None and bn.running_var is None)
    track = not bn.training or bn.track_running_stats
    a = batch_norm_act(
        x, bn.weight, bn.bias,
        bn.running_mean if track else None, bn.running_var if track else None,
        training=training, momentum=bn.momentum, eps=bn.eps, relu=True,
        num_batches_tracked=bn.num_batches_tracked,
    )  # fmt: skip
    return _conv(a, conv)


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
