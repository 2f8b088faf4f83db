"""CIFAR-10 ResNets and plain nets (He et al. 2016, Sec. 4.2), on the blocks of :mod:`fastblocks.models.resnet`.

The paper's CIFAR networks: a 3x3 convolution with 16 channels, three stages of ``n`` blocks
on 32x32, 16x16 and 8x8 maps with 16, 32 and 64 channels (the first block of stages 2 and 3
strides by 2), global average pooling and a 10-way fully connected layer: ``6n + 2`` weighted
layers. Each builder is one row: ``resnet20`` (n=3), ``resnet32`` (5), ``resnet44`` (7),
``resnet56`` (9), ``resnet110`` (18); ``plain20`` and ``plain56`` are the same layouts without
shortcuts (the paper's Fig. 6 comparison).

``shortcut="A"`` (the default, as the paper's CIFAR experiments) is parameter-free: identity,
with stride-2 subsampling and zero-padded extra channels where a stage begins
(:class:`fastblocks.models.resnet.ZeroPadShortcut`); ``"B"`` uses a 1x1 projection + BN there.
Parameter counts with option A (exact, and as He et al. 2016 Table 6 rounds them):
resnet20 269,722 (0.27M), resnet32 464,154 (0.46M), resnet44 658,586 (0.66M),
resnet56 853,018 (0.85M), resnet110 1,727,962 (1.7M); option B adds 2,752 (two 1x1
projections with their BNs), the plain nets have option A's counts.

Names follow torchvision's ResNet (``conv1``, ``bn1``, ``layer1..3``, ``fc``); ``fused``,
``block_variant``, ``stride_on_1x1``, ``norm_layer`` and ``zero_init_residual`` behave as in
:class:`fastblocks.models.resnet.ResNet` (``"preact"`` gives He et al. 2016b's pre-activation
CIFAR ResNets: no stem BN, ``bn_final`` before the pooling). No weights are downloaded; load a
checkpoint file you have with ``model.load_state_dict(torch.load(path, map_location="cpu"))``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from fastblocks.models._resnet_blocks import BasicBlock, Block, BlockVariant, NormLayer, ShortcutType, conv3x3
from fastblocks.models.resnet import _block_for, _ovewrite_named_param, _ResNetBase, check_no_weights
from fastblocks.ops.conv2d import conv2d_module

__all__ = [
    "CifarResNet",
    "plain20",
    "plain56",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
]


class CifarResNet(_ResNetBase):
    """ResNet for 32x32 images (He et al. 2016, Sec. 4.2).

    Args:
        block: :class:`~fastblocks.models.resnet.BasicBlock` (the paper's) or
            :class:`~fastblocks.models.resnet.Bottleneck` (He et al. 2016b's ResNet-164 style).
        layers: blocks per stage, three numbers (``[n, n, n]``).
        num_classes: classifier outputs (10 for CIFAR-10).
        zero_init_residual, norm_layer, fused, block_variant, stride_on_1x1: as
            :class:`~fastblocks.models.resnet.ResNet`.
        shortcut: ``"A"`` (default: zero-padded identity), ``"B"`` (projection) or ``None`` (plain).
        widths: channels of the three stages (``planes``; a Bottleneck outputs 4x).

    Shapes: ``[N, 3, H, W] -> [N, num_classes]``, ``H, W >= min_input_size`` (4); 32x32 in the paper.
    """

    def __init__(
        self,
        block: Block,
        layers: list[int],
        num_classes: int = 10,
        zero_init_residual: bool = False,
        norm_layer: NormLayer | None = None,
        *,
        fused: bool = True,
        block_variant: BlockVariant = "original",
        stride_on_1x1: bool = False,
        shortcut: ShortcutType = "A",
        widths: tuple[int, int, int] = (16, 32, 64),
    ) -> None:
        super().__init__()
        if len(layers) != 3 or len(widths) != 3:
            raise ValueError(f"CifarResNet has three stages: layers and widths need 3 entries, got {layers}, {widths}")
        block = _block_for(block, block_variant)
        self._setup(norm_layer, 1, 64, block_variant, stride_on_1x1, shortcut)
        norm_layer = self._norm_layer

        self.inplanes = widths[0]
        self.conv1 = conv3x3(3, self.inplanes)
        if block_variant != "preact":
            self.bn1 = norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, widths[0], layers[0])
        self.layer2 = self._make_layer(block, widths[1], layers[1], stride=2)
        self.layer3 = self._make_layer(block, widths[2], layers[2], stride=2)
        if block_variant == "preact":
            self.bn_final = norm_layer(widths[2] * block.expansion)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[2] * block.expansion, num_classes)

        self._init_weights(zero_init_residual)
        self._finish(fused)

    def _forward_impl(self, x: Tensor) -> Tensor:
        x = conv2d_module(x, self.conv1) if self.fused else self.conv1(x)  # a registered op when traced
        if self.block_variant != "preact" and not self.folded:  # folded: bn1 and the ReLU are inside conv1
            x = self._bn_relu(self.bn1, x)

        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        if self.block_variant == "preact":
            x = self._bn_relu(self.bn_final, x)

        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.fc(x)

        return x

    def forward(self, x: Tensor) -> Tensor:
        """``[N, 3, H, W]`` (float, ``H, W >= min_input_size``) -> logits ``[N, num_classes]``."""
        self._check_input(x)
        return self._forward_impl(x)


def _cifar_resnet(depth: int, weights: object, progress: bool, **kwargs: Any) -> CifarResNet:
    check_no_weights(weights, progress)
    if (depth - 2) % 6:
        raise ValueError(f"a CIFAR ResNet of BasicBlocks has depth 6n + 2, got {depth}")
    n = (depth - 2) // 6
    return CifarResNet(BasicBlock, [n, n, n], **kwargs)


def resnet20(*, weights: object = None, progress: bool = True, **kwargs: Any) -> CifarResNet:
    """ResNet-20 for CIFAR (n=3): 269,722 parameters (option A). ``[N, 3, 32, 32] -> [N, 10]``."""
    return _cifar_resnet(20, weights, progress, **kwargs)


def resnet32(*, weights: object = None, progress: bool = True, **kwargs: Any) -> CifarResNet:
    """ResNet-32 for CIFAR (n=5): 464,154 parameters (option A). ``[N, 3, 32, 32] -> [N, 10]``."""
    return _cifar_resnet(32, weights, progress, **kwargs)


def resnet44(*, weights: object = None, progress: bool = True, **kwargs: Any) -> CifarResNet:
    """ResNet-44 for CIFAR (n=7): 658,586 parameters (option A). ``[N, 3, 32, 32] -> [N, 10]``."""
    return _cifar_resnet(44, weights, progress, **kwargs)


def resnet56(*, weights: object = None, progress: bool = True, **kwargs: Any) -> CifarResNet:
    """ResNet-56 for CIFAR (n=9): 853,018 parameters (option A). ``[N, 3, 32, 32] -> [N, 10]``."""
    return _cifar_resnet(56, weights, progress, **kwargs)


def resnet110(*, weights: object = None, progress: bool = True, **kwargs: Any) -> CifarResNet:
    """ResNet-110 for CIFAR (n=18): 1,727,962 parameters (option A). ``[N, 3, 32, 32] -> [N, 10]``."""
    return _cifar_resnet(110, weights, progress, **kwargs)


def plain20(*, weights: object = None, progress: bool = True, **kwargs: Any) -> CifarResNet:
    """Plain-20 for CIFAR: ResNet-20's layout without shortcuts. ``[N, 3, 32, 32] -> [N, 10]``."""
    _ovewrite_named_param(kwargs, "shortcut", None)
    return _cifar_resnet(20, weights, progress, **kwargs)


def plain56(*, weights: object = None, progress: bool = True, **kwargs: Any) -> CifarResNet:
    """Plain-56 for CIFAR: ResNet-56's layout without shortcuts. ``[N, 3, 32, 32] -> [N, 10]``."""
    _ovewrite_named_param(kwargs, "shortcut", None)
    return _cifar_resnet(56, weights, progress, **kwargs)
