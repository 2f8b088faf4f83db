"""The ResNet family's blocks as torchvision writes them (their eager form), and their folded form.

:class:`BasicBlock` and :class:`Bottleneck` (He et al. 2016) and their full pre-activation
forms :class:`PreActBasicBlock` and :class:`PreActBottleneck` (He et al. 2016b) have
torchvision's constructor arguments, attribute names (so state_dict keys) and eager forward.
They share one constructor (:class:`_Block`): each class only builds its layers
(``_make_layers``), in torchvision's order.

Each block has three forms, each a class holding the same modules (an instance switches form by
switching its class in place, :func:`fastblocks.models._fusion.register_form`):

- eager: the classes below (``nn.BatchNorm2d``, ``nn.ReLU(inplace=True)``, torchvision's forward);
- fused: their subclasses in :mod:`fastblocks.models._resnet_fused`, which override ``forward``
  only (DenseNet's pattern, :mod:`fastblocks.models.densenet`); :func:`~fastblocks.models._fusion.set_fused`
  and ``ResNet(fused=True)`` switch to them;
- folded (inference): the ``_Folded*`` subclasses below, whose forward is
  :mod:`fastblocks.nn.fold`'s for the block's ``fold_layout``; ``fold_bn_()`` /
  :func:`fastblocks.fold_bn` fold the modules there and switch to them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple

from torch import Tensor, nn
from torch.nn import functional as F

from fastblocks.models._fusion import Fusable, register_form
from fastblocks.nn.batchnorm import BatchNorm2d as FastBatchNorm2d
from fastblocks.nn.batchnorm import BatchNormReLU2d, BNAddReLU
from fastblocks.nn.fold import forward_folded_preact, forward_folded_residual

BlockVariant = Literal["original", "bn_after_add", "relu_before_add", "preact"]
ShortcutType = Literal["A", "B"] | None
NormLayer = Callable[[int], nn.Module]

BLOCK_VARIANTS: tuple[str, ...] = ("original", "bn_after_add", "relu_before_add", "preact")


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding (torchvision's helper): ``[N, in, H, W] -> [N, out, H/stride, W/stride]``."""
    return nn.Conv2d(
        in_planes,
        out_planes,
        kernel_size=3,
        stride=stride,
        padding=dilation,
        groups=groups,
        bias=False,
        dilation=dilation,
    )


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution (torchvision's helper): ``[N, in, H, W] -> [N, out, H/stride, W/stride]``."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class ZeroPadShortcut(nn.Module):
    """Option A shortcut (He et al. 2016, Sec. 3.3): identity, subsampled, with zero channels appended.

    Parameter-free. ``[N, C_in, H, W] -> [N, C_out, ceil(H/stride), ceil(W/stride)]``; channels
    ``C_in..C_out-1`` are zero (as the authors' Torch code: ``concat(x, 0 * x)``).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"option A shortcut cannot reduce channels ({in_channels} -> {out_channels})")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"

    def forward(self, x: Tensor) -> Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        extra = self.out_channels - self.in_channels
        if extra:
            x = F.pad(x, (0, 0, 0, 0, 0, extra))
        return x


# ----------------------------------------------------------------------------- the shared constructor
class _BlockArgs(NamedTuple):
    """A block's layer arguments, as its ``_make_layers`` reads them (torchvision's names)."""

    inplanes: int
    planes: int
    stride: int
    groups: int
    base_width: int
    dilation: int
    norm_layer: NormLayer
    stride_on_1x1: bool

    @property
    def width(self) -> int:
        """A bottleneck's inner width, torchvision's ``int(planes * base_width / 64) * groups``."""
        return int(self.planes * (self.base_width / 64.0)) * self.groups

    @property
    def strides(self) -> tuple[int, int]:
        """A bottleneck's (1x1, 3x3) strides: v1.5 strides the 3x3, ``stride_on_1x1`` (v1) the first 1x1."""
        return (self.stride, 1) if self.stride_on_1x1 else (1, self.stride)

    def check_basic(self) -> None:
        """torchvision's limits for a block of two 3x3 convolutions."""
        if self.groups != 1 or self.base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        if self.dilation > 1:
            raise NotImplementedError("Dilation > 1 not supported in BasicBlock")


class _Block(Fusable, nn.Module):
    """What every block shares: torchvision's constructor arguments plus the block options.

    Args: torchvision's (``inplanes, planes, stride, downsample, groups, base_width, dilation,
    norm_layer``), plus keyword-only ``variant`` (one of the class's ``_variants``; ``None``: the
    first, ``"original"`` or ``"preact"``), ``residual`` (``False``: no shortcut, a block of a plain
    network) and ``stride_on_1x1`` (a bottleneck's stride on its first 1x1 convolution).
    The block starts eager (``fused=False``); :class:`~fastblocks.models.resnet.ResNet` switches it.
    """

    expansion: int = 1
    _variants: tuple[str, ...] = BLOCK_VARIANTS[:3]
    _last_bn: str = "bn2"  # the BN closing the residual branch (zero_init_residual sets its gamma)
    _class_per_form = True

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm_layer: NormLayer | None = None,
        *,
        variant: str | None = None,
        residual: bool = True,
        stride_on_1x1: bool = False,
    ) -> None:
        super().__init__()
        variant = self._variants[0] if variant is None else variant
        if variant not in self._variants:
            raise ValueError(f"{type(self).__name__} variant must be one of {self._variants}, got {variant!r}")
        norm_layer = nn.BatchNorm2d if norm_layer is None else norm_layer
        self._make_layers(_BlockArgs(inplanes, planes, stride, groups, base_width, dilation, norm_layer, stride_on_1x1))
        self.downsample = downsample
        self.stride = stride
        self.variant = variant
        self.residual = residual
        self.fused = False

    def _make_layers(self, a: _BlockArgs) -> None:
        """Register the convolutions, norms and ``relu`` in torchvision's order (its state_dict keys)."""
        raise NotImplementedError


# ----------------------------------------------------------------------------- post-activation blocks
class _ResidualBlock(_Block):
    """Post-activation blocks (``conv_i`` then ``bn_i``): the end of the block depends on ``variant``."""

    fold_layout = "residual"  # fastblocks.nn.fold: conv_i + bn_i (+ ReLU) -> FoldedConv2d

    def _fused_norms(self) -> dict[str, type[FastBatchNorm2d]]:
        norms: dict[str, type[FastBatchNorm2d]] = {
            n: BatchNormReLU2d for n in ("bn1", "bn2", "bn3") if hasattr(self, n)
        }
        if self.residual and self.variant == "original":
            norms[self._last_bn] = BNAddReLU
        return norms

    def _end_eager(self, out: Tensor, identity: Tensor, bn: nn.Module) -> Tensor:
        """``out`` is the last convolution's output: its BN, the addition and the ReLU per ``variant``."""
        if not self.residual:  # plain network: conv-BN-ReLU only
            return self.relu(bn(out))
        if self.variant == "bn_after_add":
            out += identity
            out = bn(out)
            return self.relu(out)
        if self.variant == "relu_before_add":
            out = self.relu(bn(out))
            return out + identity
        out = bn(out)
        out += identity
        return self.relu(out)


class BasicBlock(_ResidualBlock):
    """torchvision's BasicBlock: two 3x3 convolutions (ResNet-18/34).

    Args: as torchvision (``groups`` and ``base_width`` must be 1 and 64, ``dilation`` 1), plus
    keyword-only ``variant`` (``"original"``, ``"bn_after_add"``, ``"relu_before_add"``; see
    :mod:`fastblocks.models.resnet`), ``residual`` (``False``: no shortcut, a block of a plain
    network) and ``stride_on_1x1`` (accepted for symmetry with :class:`Bottleneck`; no effect).

    The block starts eager (``fused=False``); :class:`~fastblocks.models.resnet.ResNet` switches it.
    Shapes: ``[N, inplanes, H, W] -> [N, planes, H/stride, W/stride]``.
    """

    expansion: int = 1
    _relu_after = "bn1"

    def _make_layers(self, a: _BlockArgs) -> None:
        a.check_basic()
        # Both self.conv1 and self.downsample layers downsample the input when stride != 1
        self.conv1 = conv3x3(a.inplanes, a.planes, a.stride)
        self.bn1 = a.norm_layer(a.planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(a.planes, a.planes)
        self.bn2 = a.norm_layer(a.planes)

    def forward(self, x: Tensor) -> Tensor:
        identity = x

        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)

        out = self.conv2(out)

        if self.downsample is not None:
            identity = self.downsample(x)

        return self._end_eager(out, identity, self.bn2)


class Bottleneck(_ResidualBlock):
    """torchvision's Bottleneck: 1x1 (reduce), 3x3 (grouped for ResNeXt), 1x1 (expand x4).

    The stride sits on the 3x3 (torchvision's v1.5) unless ``stride_on_1x1=True`` (the
    paper's v1). Other arguments as :class:`BasicBlock`; ``width = int(planes * base_width / 64) * groups``.
    Shapes: ``[N, inplanes, H, W] -> [N, 4 * planes, H/stride, W/stride]``.
    """

    expansion: int = 4
    _last_bn = "bn3"
    _relu_after = "bn3"
    recompute_tail: bool = True  # read by the fused form; set per block by the network (_resnet_fused.plan_tails)

    def _make_layers(self, a: _BlockArgs) -> None:
        width = a.width
        stride_1x1, stride_3x3 = a.strides
        # Both self.conv2 (or self.conv1 with stride_on_1x1) and self.downsample downsample the input when stride != 1
        self.conv1 = conv1x1(a.inplanes, width, stride_1x1)
        self.bn1 = a.norm_layer(width)
        self.conv2 = conv3x3(width, width, stride_3x3, a.groups, a.dilation)
        self.bn2 = a.norm_layer(width)
        self.conv3 = conv1x1(width, a.planes * self.expansion)
        self.bn3 = a.norm_layer(a.planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        identity = x

        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)

        out = self.conv2(out)
        out = self.bn2(out)
        out = self.relu(out)

        out = self.conv3(out)

        if self.downsample is not None:
            identity = self.downsample(x)

        return self._end_eager(out, identity, self.bn3)


# ----------------------------------------------------------------------------- pre-activation blocks
class _PreActBlock(_Block):
    """Full pre-activation (He et al. 2016b, Fig. 4e): every conv reads ``relu(bn(.))`` of its input.

    When there is a projection shortcut, it reads the pre-activated input too (the paper's
    "first activation ... before splitting into two paths"; the authors' Torch code, timm's
    ResNetV2); an identity shortcut reads the raw input. No ReLU after the addition.
    """

    _variants = ("preact",)
    _relu_after = "bn1"
    fold_layout = "preact"  # fastblocks.nn.fold: conv_i + bn_{i+1} (+ ReLU) -> FoldedConv2d, bn1 frozen

    def _fused_norms(self) -> dict[str, type[FastBatchNorm2d]]:
        return {n: BatchNormReLU2d for n in ("bn1", "bn2", "bn3") if hasattr(self, n)}

    def _enter_eager(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(conv1's output, shortcut)."""
        out = self.bn1(x)
        out = self.relu(out)
        identity = x if self.downsample is None else self.downsample(out)
        return self.conv1(out), identity

    def _add(self, out: Tensor, identity: Tensor) -> Tensor:
        if self.residual:
            out += identity  # out is a convolution's output, which its backward does not need
        return out


class PreActBasicBlock(_PreActBlock):
    """Pre-activation BasicBlock: ``x + conv2(relu(bn2(conv1(relu(bn1(x))))))``.

    Arguments as :class:`BasicBlock` (``variant`` may only be ``"preact"``). ``bn1`` normalizes
    the ``inplanes`` input channels.
    Shapes: ``[N, inplanes, H, W] -> [N, planes, H/stride, W/stride]``.
    """

    expansion: int = 1
    _last_bn = "bn2"

    def _make_layers(self, a: _BlockArgs) -> None:
        a.check_basic()
        self.bn1 = a.norm_layer(a.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = conv3x3(a.inplanes, a.planes, a.stride)
        self.bn2 = a.norm_layer(a.planes)
        self.conv2 = conv3x3(a.planes, a.planes)

    def forward(self, x: Tensor) -> Tensor:
        out, identity = self._enter_eager(x)
        out = self.bn2(out)
        out = self.relu(out)
        out = self.conv2(out)
        return self._add(out, identity)


class PreActBottleneck(_PreActBlock):
    """Pre-activation Bottleneck: ``x + conv3(relu(bn3(conv2(relu(bn2(conv1(relu(bn1(x)))))))))``.

    Arguments as :class:`Bottleneck` (``variant`` may only be ``"preact"``); ``bn1`` normalizes
    the ``inplanes`` input channels, ``bn2``/``bn3`` the ``width`` channels of conv1/conv2.
    Shapes: ``[N, inplanes, H, W] -> [N, 4 * planes, H/stride, W/stride]``.
    """

    expansion: int = 4
    _last_bn = "bn3"

    def _make_layers(self, a: _BlockArgs) -> None:
        width = a.width
        stride_1x1, stride_3x3 = a.strides
        self.bn1 = a.norm_layer(a.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = conv1x1(a.inplanes, width, stride_1x1)
        self.bn2 = a.norm_layer(width)
        self.conv2 = conv3x3(width, width, stride_3x3, a.groups, a.dilation)
        self.bn3 = a.norm_layer(width)
        self.conv3 = conv1x1(width, a.planes * self.expansion)

    def forward(self, x: Tensor) -> Tensor:
        out, identity = self._enter_eager(x)
        out = self.bn2(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn3(out)
        out = self.relu(out)
        out = self.conv3(out)
        return self._add(out, identity)


Block = type[BasicBlock] | type[Bottleneck] | type[PreActBasicBlock] | type[PreActBottleneck]


# ----------------------------------------------------------------------------- folded forms (inference)
class _FoldedBasicBlock(BasicBlock):
    """A folded :class:`BasicBlock` (:func:`fastblocks.fold_bn`): no BatchNorm, one call per convolution."""

    forward = forward_folded_residual


class _FoldedBottleneck(Bottleneck):
    """A folded :class:`Bottleneck` (:func:`fastblocks.fold_bn`): no BatchNorm, one call per convolution."""

    forward = forward_folded_residual


class _FoldedPreActBasicBlock(PreActBasicBlock):
    """A folded :class:`PreActBasicBlock` (:func:`fastblocks.fold_bn`): ``bn1`` frozen, one call per convolution."""

    forward = forward_folded_preact


class _FoldedPreActBottleneck(PreActBottleneck):
    """A folded :class:`PreActBottleneck` (:func:`fastblocks.fold_bn`): ``bn1`` frozen, one call per convolution."""

    forward = forward_folded_preact


register_form(BasicBlock, "folded", _FoldedBasicBlock)
register_form(Bottleneck, "folded", _FoldedBottleneck)
register_form(PreActBasicBlock, "folded", _FoldedPreActBasicBlock)
register_form(PreActBottleneck, "folded", _FoldedPreActBottleneck)
