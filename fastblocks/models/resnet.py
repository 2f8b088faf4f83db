"""ResNet, ResNeXt and Wide ResNet (He et al. 2016, Xie et al. 2017, Zagoruyko & Komodakis 2016), the torchvision way.

One class, :class:`ResNet`, parametrized by block type and a table of blocks per stage; each
builder is one row of He et al. 2016, Table 1 (``resnet50`` = ``Bottleneck, [3, 4, 6, 3]``) or
of torchvision's ResNeXt/Wide ResNet rows. Attribute names are torchvision's, so for the default
``block_variant="original"`` the state_dicts are identical to torchvision's (keys, shapes,
parameter counts) and checkpoints load both ways. No weights are downloaded; to use a
checkpoint file you have (e.g. one saved from torchvision)::

    model = fastblocks.models.resnet50()
    model.load_state_dict(torch.load("resnet50.pth", map_location="cpu"))

``fused=True`` (the default) runs every block on the fused ops: the BatchNorm-ReLU in front of
each convolution through :func:`fastblocks.nn.conv.bn_relu_conv`, the block's last BatchNorm,
residual add and ReLU as one :class:`fastblocks.nn.BNAddReLU`, the stem's BatchNorm-ReLU as one
:class:`fastblocks.nn.BatchNormReLU2d`. BatchNorm running statistics are updated exactly once per
training forward, as ``nn.BatchNorm2d`` does. ``fused=False`` builds the eager twin: the same
modules, names and state_dict with ``nn.BatchNorm2d``/``nn.ReLU(inplace=True)`` and
torchvision's exact forward, the reference every fused model is compared with.
:func:`fastblocks.models.unfuse` / :func:`fastblocks.models.fuse` switch between the two.
A custom ``norm_layer`` that does not build ``nn.BatchNorm2d`` layers (e.g. GroupNorm) builds the
eager blocks whatever ``fused`` says (``model.fused`` is then ``False``).

Inference: :func:`fastblocks.fold_bn` (each block's and model's ``fold_bn_()``) folds every
BatchNorm that directly follows a convolution into it; for the default network every
conv+BN(+ReLU) is then one :class:`~fastblocks.nn.fold.FoldedConv2d` call, the block tail
``relu(bn_last(conv_last(.)) + shortcut)`` one call with the residual as a fused add
(oneDNN's binary post-op on the CPU, cuDNN's conv-add-ReLU on CUDA), the projection shortcut
one conv, and no BatchNorm is left. Per variant, see :meth:`BasicBlock.fold_bn_` and
:meth:`PreActBasicBlock.fold_bn_`. A folded model is for inference only and its state_dict
holds the folded weights, not torchvision's keys.

Options beyond torchvision (keyword-only; the defaults give torchvision's network):

- ``stride_on_1x1``: put a bottleneck's stride on its first 1x1 convolution, as the paper's
  v1 (He et al. 2016, Sec. 3.3); the default is torchvision's v1.5, stride on the 3x3 (better
  accuracy, Goyal et al. 2017). BasicBlock's first convolution is its 3x3, so it has no effect there.
- ``block_variant``: where BN and ReLU sit around the addition (He et al. 2016b, "Identity
  Mappings in Deep Residual Networks", Fig. 4):

  ==================  =====================================================  ====================
  variant             block output                                           fused form
  ==================  =====================================================  ====================
  ``original``        ``relu(bn_last(F(x)) + shortcut(x))`` (Fig. 4a)        ``BNAddReLU``
  ``bn_after_add``    ``relu(bn_last(F(x) + shortcut(x)))`` (Fig. 4b)        add, ``BatchNormReLU2d``
  ``relu_before_add`` ``relu(bn_last(F(x))) + shortcut(x)``: no ReLU after   ``BatchNormReLU2d``, add
                      the addition (Fig. 4c)
  ``preact``          ``F'(x) + shortcut(x)``, every conv preceded by its    ``bn_relu_conv`` for
                      BN-ReLU (Fig. 4e, full pre-activation)                 every conv
  ==================  =====================================================  ====================

  The first three keep torchvision's keys and shapes. ``preact`` moves the BatchNorms in front
  of the convolutions (``bn1`` normalizes the block input), so its keys differ from
  torchvision's but are those of both its twins: the stem is ``conv1`` + ``maxpool`` (no
  ``bn1``: the first block normalizes), projection shortcuts are a bare 1x1 convolution
  (``downsample.0``) applied to the pre-activated input, and the final BN-ReLU sits after the
  last addition, before average pooling, as ``bn_final`` (He et al. 2016b, Sec. 4 / appendix:
  "an extra activation right after its element-wise addition" of the last unit).
- ``shortcut``: ``"B"`` (default: projection when the shape changes, identity otherwise),
  ``"A"`` (parameter-free: identity with stride-2 subsampling and zero-padded extra channels,
  He et al. 2016, Sec. 3.3) or ``None`` (a plain network without shortcuts: ``plain18``, ``plain34``).
- ``memory_efficient`` (fused models only): the stem (conv, BN, ReLU, max-pool) and bottleneck
  tails ``relu(bn3(conv3(relu(bn2(.)))) + identity)`` can be single nodes that recompute their
  convolution in backward instead of keeping its output (one extra 1x1 convolution per tail, the
  same multiply-adds in every stage of ResNet-50, while the output it would keep shrinks 2x per
  stage). ``None`` (default): the stem recomputes, and so do the tails of the first stages; the
  tails with the smallest outputs (the last stages, latest blocks first) keep theirs while the
  kept outputs add up to at most about 10% of the eager twin's saved activations (estimated as
  12 tensors of ``planes x H x W`` per bottleneck, which ResNet-50 measures). In ResNet-50 that
  keeps layer3's and layer4's: 58.5% of the eager twin's activation bytes instead of 50.9% at
  2x3x64x64 (tests/models/test_resnet.py::test_memory_saved_bytes_resnet50), for
  7 recomputed 1x1 convolutions per step instead of 16. ``True``: every tail recomputes (least
  memory). ``False``: nothing recomputes (fused BN-ReLU-conv and BN-add-ReLU only).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fastblocks.models._fusion import Fusable, fused_bn_relu_conv, set_fused
from fastblocks.nn.batchnorm import BatchNorm2d as FastBatchNorm2d
from fastblocks.nn.batchnorm import BatchNormReLU2d, BNAddReLU
from fastblocks.nn.conv import bn_relu_conv_bn_add_relu
from fastblocks.nn.fold import FoldedConv2d, FrozenBatchNorm2d, bn_scale_shift, fold_modules_, has_running_stats
from fastblocks.ops import BatchNormParams, stem_conv_bn_relu_pool

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "PreActBasicBlock",
    "PreActBottleneck",
    "ResNet",
    "ZeroPadShortcut",
    "plain18",
    "plain34",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "wide_resnet50_2",
    "wide_resnet101_2",
]

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


# ----------------------------------------------------------------------------- blocks
class _ResidualBlock(Fusable, nn.Module):
    """What the post-activation blocks share: the end of the block, per variant, fused or eager."""

    expansion: int = 1
    _last_bn: str = "bn2"  # the BN closing the residual branch (zero_init_residual sets its gamma)

    _convs: tuple[str, ...] = ("conv1", "conv2")  # in forward order; conv_i is followed by bn_i

    # Set by __init__ of the subclasses.
    variant: str
    residual: bool
    downsample: nn.Module | None
    folded: bool = False  # set by fold_bn_()

    def _fused_norms(self) -> dict[str, type[FastBatchNorm2d]]:
        norms: dict[str, type[FastBatchNorm2d]] = {
            n: BatchNormReLU2d for n in ("bn1", "bn2", "bn3") if hasattr(self, n)
        }
        if self.residual and self.variant == "original":
            norms[self._last_bn] = BNAddReLU
        return norms

    def _end_eager(self, out: Tensor, identity: Tensor, bn: nn.Module) -> Tensor:
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

    def _end_fused(self, out: Tensor, identity: Tensor, bn: nn.Module) -> Tensor:
        if not self.residual:
            return bn(out)  # BatchNormReLU2d
        if self.variant == "bn_after_add":
            return bn(out + identity)  # BatchNormReLU2d
        if self.variant == "relu_before_add":
            return bn(out) + identity  # BatchNormReLU2d
        return bn(out, identity)  # BNAddReLU: relu(bn(out) + identity)

    @torch.no_grad()
    def fold_bn_(self) -> None:
        """Fold every BatchNorm into the convolution before it, in place, for inference.

        Each ``conv_i`` becomes a :class:`~fastblocks.nn.fold.FoldedConv2d` with ``bn_i`` (and the
        ReLU after it) inside; the ``bn_i`` and ``relu`` modules are removed. The last one, per
        variant (``s, t``: the last BN's ``x s + t``):

        - ``original``: ``relu(conv_last'(h) + shortcut(x))``, one call (the residual is the
          fused add); a projection shortcut (1x1 conv + BN) becomes one folded conv;
        - ``bn_after_add``: ``relu(s (F + P x) + t) = relu(conv_last'(h) + (s P) x)``: exact, the
          BN after the addition is folded into the last conv *and* the shortcut: the projection's
          weights are scaled by ``s``, an identity shortcut is multiplied by ``s`` (the buffer
          ``shortcut_scale``), then one call;
        - ``relu_before_add``: ``relu(conv_last'(h)) + shortcut(x)``: one call, then the addition
          (a ReLU before the add is not a post-op after it);
        - plain (``residual=False``): ``relu(conv_last'(h))``, one call.

        Works on the fused block and on its eager twin (same modules). When a BatchNorm has no
        running statistics (``track_running_stats=False``, so eval normalizes with batch
        statistics) nothing is folded. Calling it again is a no-op.
        """
        if self.folded:
            return
        bns = [getattr(self, "bn" + c[4:]) for c in self._convs]
        projection = _projection(self.downsample)
        if projection and projection[1] is not None:
            bns.append(projection[1])
        if not all(has_running_stats(bn) for bn in bns):
            return
        # bn_after_add: the last BN's scale s multiplies the shortcut too.
        scale = (
            bn_scale_shift(bns[len(self._convs) - 1])[0] if self.residual and self.variant == "bn_after_add" else None
        )
        for name in self._convs:
            setattr(self, name, FoldedConv2d(getattr(self, name), getattr(self, "bn" + name[4:]), relu=True))
            delattr(self, "bn" + name[4:])
        if projection:
            self.downsample = FoldedConv2d(*projection, relu=False)
            if scale is not None:
                self.downsample.scale_output_(scale)
        elif self.downsample is not None:
            fold_modules_(self.downsample)
        if scale is not None and not projection:
            self.register_buffer("shortcut_scale", scale.to(getattr(self, self._convs[-1]).weight.dtype))
        if "relu" in self._modules:
            del self._modules["relu"]
        self.folded = True

    def _forward_folded(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = x
        for name in self._convs[:-1]:
            out = getattr(self, name)(out)  # conv + BN + ReLU, one call
        last = getattr(self, self._convs[-1])
        if not self.residual:
            return last(out)
        if self.variant == "relu_before_add":
            return last(out) + identity
        scale = getattr(self, "shortcut_scale", None)  # bn_after_add with a parameter-free shortcut
        if scale is not None:
            identity = identity * scale.view(1, -1, 1, 1)
        return last(out, identity)  # relu(conv + BN + residual), one call


def _projection(shortcut: nn.Module | None) -> tuple[nn.Conv2d, nn.Module | None] | None:
    """``(conv, bn or None)`` of a projection shortcut ``Sequential(Conv2d[, BatchNorm2d])``, else ``None``."""
    if not isinstance(shortcut, nn.Sequential) or not 1 <= len(shortcut) <= 2:
        return None
    conv, bn = shortcut[0], shortcut[1] if len(shortcut) == 2 else None
    if type(conv) is not nn.Conv2d or not (bn is None or isinstance(bn, nn.BatchNorm2d)):
        return None
    return conv, bn


def _check_block_args(variant: str, allowed: tuple[str, ...], cls: str) -> None:
    if variant not in allowed:
        raise ValueError(f"{cls} variant must be one of {allowed}, got {variant!r}")


class BasicBlock(_ResidualBlock):
    """torchvision's BasicBlock: two 3x3 convolutions (ResNet-18/34).

    Args: as torchvision (``groups`` and ``base_width`` must be 1 and 64, ``dilation`` 1), plus
    keyword-only ``variant`` (``"original"``, ``"bn_after_add"``, ``"relu_before_add"``; see the
    module docstring), ``residual`` (``False``: no shortcut, a block of a plain network) and
    ``stride_on_1x1`` (accepted for symmetry with :class:`Bottleneck`; no effect).

    The block starts eager (``fused=False``); :class:`ResNet` switches it.
    Shapes: ``[N, inplanes, H, W] -> [N, planes, H/stride, W/stride]``.
    """

    expansion: int = 1
    _last_bn = "bn2"
    _relu_after = "bn1"

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
        variant: str = "original",
        residual: bool = True,
        stride_on_1x1: bool = False,
    ) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        if dilation > 1:
            raise NotImplementedError("Dilation > 1 not supported in BasicBlock")
        _check_block_args(variant, BLOCK_VARIANTS[:3], "BasicBlock")
        # Both self.conv1 and self.downsample layers downsample the input when stride != 1
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride
        self.variant = variant
        self.residual = residual
        self.fused = False

    def forward(self, x: Tensor) -> Tensor:
        if self.folded:
            return self._forward_folded(x)
        if self.fused:
            identity = x if self.downsample is None else self.downsample(x)
            out = fused_bn_relu_conv(self.conv1(x), self.bn1, self.conv2)
            return self._end_fused(out, identity, self.bn2)

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
    _convs = ("conv1", "conv2", "conv3")
    recompute_tail: bool = True  # set per block by ResNet._plan_tails

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
        variant: str = "original",
        residual: bool = True,
        stride_on_1x1: bool = False,
    ) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        _check_block_args(variant, BLOCK_VARIANTS[:3], "Bottleneck")
        width = int(planes * (base_width / 64.0)) * groups
        stride_1x1, stride_3x3 = (stride, 1) if stride_on_1x1 else (1, stride)
        # Both self.conv2 (or self.conv1 with stride_on_1x1) and self.downsample downsample the input when stride != 1
        self.conv1 = conv1x1(inplanes, width, stride_1x1)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride_3x3, groups, dilation)
        self.bn2 = norm_layer(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self.variant = variant
        self.residual = residual
        self.fused = False

    def forward(self, x: Tensor) -> Tensor:
        if self.folded:
            return self._forward_folded(x)
        if self.fused:
            identity = x if self.downsample is None else self.downsample(x)
            out = self.conv1(x)
            out = fused_bn_relu_conv(out, self.bn1, self.conv2)
            if self.recompute_tail and self.residual and self.variant == "original":
                # relu(bn3(conv3(relu(bn2(out)))) + identity) as one node: conv3's input and output
                # (5 of the 12 units of a bottleneck's eager saved bytes) are recomputed in backward.
                return bn_relu_conv_bn_add_relu(out, self.bn2, self.conv3, self.bn3, identity)
            out = fused_bn_relu_conv(out, self.bn2, self.conv3)
            return self._end_fused(out, identity, self.bn3)

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


class _PreActBlock(Fusable, nn.Module):
    """Full pre-activation (He et al. 2016b, Fig. 4e): every conv reads ``relu(bn(.))`` of its input.

    When there is a projection shortcut, it reads the pre-activated input too (the paper's
    "first activation ... before splitting into two paths"; the authors' Torch code, timm's
    ResNetV2); an identity shortcut reads the raw input. No ReLU after the addition.
    """

    expansion: int = 1
    _last_bn: str = "bn2"
    _relu_after = "bn1"
    variant = "preact"
    _convs: tuple[str, ...] = ("conv1", "conv2")  # in forward order; conv_i is preceded by bn_i
    residual: bool
    downsample: nn.Module | None
    folded: bool = False  # set by fold_bn_()

    def _fused_norms(self) -> dict[str, type[FastBatchNorm2d]]:
        return {n: BatchNormReLU2d for n in ("bn1", "bn2", "bn3") if hasattr(self, n)}

    @torch.no_grad()
    def fold_bn_(self) -> None:
        """Fold what is exact, in place, for inference: ``bn_{i+1}`` into ``conv_i``.

        ``conv_i`` -> ``bn_{i+1}`` -> ReLU -> ``conv_{i+1}``: ``bn_{i+1}`` (and the ReLU) fold
        into ``conv_i`` (:class:`~fastblocks.nn.fold.FoldedConv2d`, one call). ``bn1`` cannot be
        folded: the previous block's addition comes before it and a ReLU after it (``relu(x s +
        t)`` is no affine map of ``relu(x)``), so it stays as an eval-mode fused BN-ReLU,
        :class:`~fastblocks.nn.fold.FrozenBatchNorm2d`. The last convolution has no BN after it:
        it runs with the shortcut as a fused add (no ReLU), ``conv_last(h) + shortcut``, one call;
        a projection shortcut (a bare 1x1 conv) becomes a FoldedConv2d too. The ``bn_i`` and
        ``relu`` modules are removed. Works on the fused block and on its eager twin. When a
        BatchNorm has no running statistics nothing is folded. Calling it again is a no-op.
        """
        if self.folded:
            return
        bns = [getattr(self, f"bn{i + 1}") for i in range(len(self._convs))]
        if not all(has_running_stats(bn) for bn in bns):
            return
        self.bn1 = FrozenBatchNorm2d(self.bn1, relu=True)
        for i, name in enumerate(self._convs):
            after = f"bn{i + 2}" if i + 1 < len(self._convs) else None
            setattr(self, name, FoldedConv2d(getattr(self, name), getattr(self, after) if after else None,
                                             relu=after is not None))  # fmt: skip
            if after:
                delattr(self, after)
        projection = _projection(self.downsample)
        if projection and projection[1] is None:
            self.downsample = FoldedConv2d(projection[0], None, relu=False)
        elif self.downsample is not None:
            fold_modules_(self.downsample)
        if "relu" in self._modules:
            del self._modules["relu"]
        self.folded = True

    def _forward_folded(self, x: Tensor) -> Tensor:
        act = self.bn1(x)  # FrozenBatchNorm2d: eval BN + ReLU, one pass
        identity = x if self.downsample is None else self.downsample(act)
        out = act
        for name in self._convs[:-1]:
            out = getattr(self, name)(out)  # conv + next BN + ReLU, one call
        last = getattr(self, self._convs[-1])
        return last(out, identity) if self.residual else last(out)  # conv (+ shortcut), one call

    def _enter_fused(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(conv1's output, shortcut) of the fused form."""
        if self.downsample is None:
            return fused_bn_relu_conv(x, self.bn1, self.conv1), x
        act = self.bn1(x)  # BatchNormReLU2d: conv1 and the projection both read it
        return self.conv1(act), self.downsample(act)

    def _enter_eager(self, x: Tensor) -> tuple[Tensor, Tensor]:
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
        variant: str = "preact",
        residual: bool = True,
        stride_on_1x1: bool = False,
    ) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        if dilation > 1:
            raise NotImplementedError("Dilation > 1 not supported in BasicBlock")
        _check_block_args(variant, ("preact",), "PreActBasicBlock")
        self.bn1 = norm_layer(inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn2 = norm_layer(planes)
        self.conv2 = conv3x3(planes, planes)
        self.downsample = downsample
        self.stride = stride
        self.residual = residual
        self.fused = False

    def forward(self, x: Tensor) -> Tensor:
        if self.folded:
            return self._forward_folded(x)
        if self.fused:
            out, identity = self._enter_fused(x)
            out = fused_bn_relu_conv(out, self.bn2, self.conv2)
            return self._add(out, identity)

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
    _convs = ("conv1", "conv2", "conv3")

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
        variant: str = "preact",
        residual: bool = True,
        stride_on_1x1: bool = False,
    ) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        _check_block_args(variant, ("preact",), "PreActBottleneck")
        width = int(planes * (base_width / 64.0)) * groups
        stride_1x1, stride_3x3 = (stride, 1) if stride_on_1x1 else (1, stride)
        self.bn1 = norm_layer(inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = conv1x1(inplanes, width, stride_1x1)
        self.bn2 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride_3x3, groups, dilation)
        self.bn3 = norm_layer(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.downsample = downsample
        self.stride = stride
        self.residual = residual
        self.fused = False

    def forward(self, x: Tensor) -> Tensor:
        if self.folded:
            return self._forward_folded(x)
        if self.fused:
            out, identity = self._enter_fused(x)
            out = fused_bn_relu_conv(out, self.bn2, self.conv2)
            out = fused_bn_relu_conv(out, self.bn3, self.conv3)
            return self._add(out, identity)

        out, identity = self._enter_eager(x)
        out = self.bn2(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn3(out)
        out = self.relu(out)
        out = self.conv3(out)
        return self._add(out, identity)


Block = type[BasicBlock] | type[Bottleneck] | type[PreActBasicBlock] | type[PreActBottleneck]
_PREACT_OF: dict[type, type] = {BasicBlock: PreActBasicBlock, Bottleneck: PreActBottleneck}


def _block_for(block: Block, variant: str) -> Block:
    if variant not in BLOCK_VARIANTS:
        raise ValueError(f"block_variant must be one of {BLOCK_VARIANTS}, got {variant!r}")
    is_preact = issubclass(block, _PreActBlock)
    if variant == "preact" and not is_preact:
        for post, pre in _PREACT_OF.items():
            if issubclass(block, post):
                return pre
        raise ValueError(f"no pre-activation form of block {block.__name__}")
    if variant != "preact" and is_preact:
        raise ValueError(f"block {block.__name__} is a pre-activation block but block_variant={variant!r}")
    if not issubclass(block, (_ResidualBlock, _PreActBlock)) and variant != "original":
        raise ValueError(f"block_variant={variant!r} needs a fastblocks block, got {block.__name__}")
    return block


# ----------------------------------------------------------------------------- networks
class _ResNetBase(Fusable, nn.Module):
    """What the ImageNet and CIFAR networks share: stages, shortcuts, init, input checks, fusing."""

    _relu_after = "bn1"

    # Set by the subclasses' __init__.
    conv1: nn.Conv2d
    block_variant: str
    fused: bool
    folded: bool = False  # set by fold_bn_()

    def _setup(
        self,
        norm_layer: NormLayer | None,
        groups: int,
        width_per_group: int,
        block_variant: str,
        stride_on_1x1: bool,
        shortcut: ShortcutType,
    ) -> None:
        if shortcut not in ("A", "B", None):
            raise ValueError(f"shortcut must be 'A', 'B' or None, got {shortcut!r}")
        if shortcut is None and block_variant in ("bn_after_add", "relu_before_add"):
            raise ValueError(
                f"block_variant={block_variant!r} places BN/ReLU around the addition; a plain network has none"
            )
        self._norm_layer = nn.BatchNorm2d if norm_layer is None else norm_layer
        self.groups = groups
        self.base_width = width_per_group
        self.block_variant = block_variant
        self.stride_on_1x1 = stride_on_1x1
        self.shortcut = shortcut
        self.dilation = 1
        self.fused = False
        if block_variant == "preact":
            self._relu_after = "conv1"

    def _downsample(self, inplanes: int, outplanes: int, stride: int) -> nn.Module:
        if self.shortcut == "A":
            return ZeroPadShortcut(inplanes, outplanes, stride)
        if self.block_variant == "preact":
            # The authors' pre-activation code: a bare projection of the pre-activated input.
            return nn.Sequential(conv1x1(inplanes, outplanes, stride))
        return nn.Sequential(conv1x1(inplanes, outplanes, stride), self._norm_layer(outplanes))

    def _make_layer(
        self, block: Block, planes: int, blocks: int, stride: int = 1, dilate: bool = False
    ) -> nn.Sequential:
        norm_layer = self._norm_layer
        downsample = None
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        if self.shortcut is not None and (stride != 1 or self.inplanes != planes * block.expansion):
            downsample = self._downsample(self.inplanes, planes * block.expansion, stride)
        extra: dict[str, Any] = {}
        if issubclass(block, (_ResidualBlock, _PreActBlock)):
            extra = {"variant": self.block_variant, "residual": self.shortcut is not None}
            extra["stride_on_1x1"] = self.stride_on_1x1

        layers = []
        layers.append(
            block(
                self.inplanes, planes, stride, downsample, self.groups, self.base_width, previous_dilation, norm_layer,
                **extra,
            )
        )  # fmt: skip
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(
                block(
                    self.inplanes, planes, groups=self.groups, base_width=self.base_width, dilation=self.dilation,
                    norm_layer=norm_layer, **extra,
                )
            )  # fmt: skip

        return nn.Sequential(*layers)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) and m.weight is not None:
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

        # Zero-initialize the last BN in each residual branch, so that the residual branch starts
        # with zeros, and each residual block behaves like an identity. This improves the model
        # by 0.2~0.3% according to https://arxiv.org/abs/1706.02677
        if zero_init_residual:
            if self.shortcut is None or self.block_variant == "bn_after_add":
                raise ValueError(
                    "zero_init_residual zeroes the gamma of the last BN of each residual branch; "
                    f"{'a plain network' if self.shortcut is None else 'block_variant=bn_after_add'} has none "
                    "(its last BN normalizes the block output)"
                )
            for m in self.modules():
                if isinstance(m, (_ResidualBlock, _PreActBlock)):
                    bn = getattr(m, m._last_bn)
                    if getattr(bn, "weight", None) is not None:
                        nn.init.constant_(bn.weight, 0)

    def _finish(self, fused: bool) -> None:
        """Switch to the fused form when asked and every norm layer is a BatchNorm2d."""
        parts = [m for m in self.modules() if isinstance(m, Fusable)]
        if fused and all(m._fusable() for m in parts):
            set_fused(self, True)

    def _fused_norms(self) -> dict[str, type[FastBatchNorm2d]]:
        return {"bn_final" if self.block_variant == "preact" else "bn1": BatchNormReLU2d}

    def _bn_relu(self, bn: nn.Module, x: Tensor) -> Tensor:
        # Fused: the BatchNormReLU2d applies the ReLU itself; folded: the FrozenBatchNorm2d does.
        return bn(x) if self.fused or self.folded else self.relu(bn(x))

    @torch.no_grad()
    def fold_bn_(self) -> None:
        """Fold the network for inference, in place: the stem and every block (see the module docstring).

        The stem's ``conv1`` + ``bn1`` + ReLU become one :class:`~fastblocks.nn.fold.FoldedConv2d`
        (``bn1`` and ``relu`` are removed); with ``block_variant="preact"`` the stem has no BN and
        ``bn_final`` (BN-ReLU after the last addition, no convolution after it) stays as an
        eval-mode :class:`~fastblocks.nn.fold.FrozenBatchNorm2d`. Blocks fold through their own
        ``fold_bn_()``. A stem BatchNorm without running statistics is left as it is.
        """
        if self.folded:
            return
        stem_bn = getattr(self, "bn_final" if self.block_variant == "preact" else "bn1")
        for name, child in list(self.named_children()):
            if name not in ("conv1", "bn1", "bn_final"):
                fold_modules_(child)
        if not has_running_stats(stem_bn):
            return
        if self.block_variant == "preact":
            self.conv1 = FoldedConv2d(self.conv1, None, relu=False)  # the oneDNN path with a packed weight
            self.bn_final = FrozenBatchNorm2d(self.bn_final, relu=True)
        else:
            self.conv1 = FoldedConv2d(self.conv1, self.bn1, relu=True)
            del self.bn1
        if "relu" in self._modules:
            del self._modules["relu"]
        self.folded = True

    def _stages(self) -> list[nn.Module]:
        return [m for name, m in self.named_children() if name.startswith("layer")]

    @property
    def output_stride(self) -> int:
        """Ratio of input to final feature-map resolution (32 for ImageNet ResNets, 4 for CIFAR)."""
        stride = _first(self.conv1.stride)
        pool = getattr(self, "maxpool", None)
        if isinstance(pool, nn.MaxPool2d):
            stride *= _first(pool.stride)
        for stage in self._stages():
            if isinstance(stage, nn.Sequential) and len(stage):
                stride *= _first(getattr(stage[0], "stride", 1))
        return stride

    @property
    def min_input_size(self) -> int:
        """Smallest input height/width: the output stride, so the last stage sees at least one real pixel.

        Smaller images would still run (every layer pads), but the last stages would then compute
        on zero padding only; the input check rejects them.
        """
        return self.output_stride

    def _check_input(self, x: object) -> None:
        name = type(self).__name__
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} input must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} input must be a 4-D [N, C, H, W] batch of images, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(
                f"{name} input must be a floating-point tensor, got dtype {str(x.dtype).replace('torch.', '')} "
                "(convert images with x.float(), e.g. after scaling to [0, 1])"
            )
        weight = self.conv1.weight
        if x.shape[1] != self.conv1.in_channels:
            raise ValueError(
                f"{name} input must have {self.conv1.in_channels} channels, got {x.shape[1]} (shape {tuple(x.shape)})"
            )
        if x.device != weight.device:
            raise ValueError(f"{name} input is on {x.device} but the model is on {weight.device}")
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(
                f"{name} input has dtype {str(x.dtype).replace('torch.', '')} but the model's parameters are "
                f"{str(weight.dtype).replace('torch.', '')} (use model.to(dtype) or autocast)"
            )
        if x.shape[0] == 0:
            raise ValueError(f"{name} input is an empty batch (shape {tuple(x.shape)})")
        smallest, stride = self.min_input_size, self.output_stride
        height, width = x.shape[2], x.shape[3]
        if height < smallest or width < smallest:
            raise ValueError(
                f"{name} input of {height}x{width} pixels is too small: the network reduces resolution "
                f"{stride}x, so images must be at least {smallest}x{smallest}"
            )
        feature = -(-height // stride) * -(-width // stride)
        if self.training and x.shape[0] * feature <= 1 and self._has_batchnorm():
            raise ValueError(
                f"{name} in training mode: a batch of {x.shape[0]} image(s) of {height}x{width} leaves one value "
                "per channel for the last BatchNorm (it needs more than one); use a larger batch or larger "
                "images, or eval mode"
            )

    def _has_batchnorm(self) -> bool:
        last = self._stages()[-1] if self._stages() else None
        return last is not None and any(isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm)) for m in last.modules())


def _first(value: int | Sequence[int]) -> int:
    return value if isinstance(value, int) else value[0]


class ResNet(_ResNetBase):
    """ResNet for ImageNet (He et al. 2016), torchvision's constructor and state_dict.

    Args:
        block: :class:`BasicBlock` or :class:`Bottleneck` (or their pre-activation forms).
        layers: blocks per stage, e.g. ``[3, 4, 6, 3]``.
        num_classes: classifier outputs.
        zero_init_residual: zero the gamma of the last BN of every residual branch (Goyal et al. 2017).
        groups, width_per_group: ResNeXt cardinality and width per group (Wide ResNet: 128).
        replace_stride_with_dilation: for stages 2-4, dilate instead of striding (segmentation).
        norm_layer: factory ``C -> norm module`` (default ``nn.BatchNorm2d``); non-BatchNorm
            layers give an eager model.
        fused: fused blocks (default) or the eager twin (see the module docstring).
        block_variant: ``"original"`` (torchvision), ``"bn_after_add"``, ``"relu_before_add"``
            or ``"preact"`` (He et al. 2016b, Fig. 4).
        stride_on_1x1: stride on the bottleneck's first 1x1 conv (paper v1) instead of the 3x3.
        shortcut: ``"B"`` (torchvision), ``"A"`` (zero-padded identity) or ``None`` (plain network).

    Shapes: ``[N, 3, H, W] -> [N, num_classes]``, ``H, W >= min_input_size`` (32).
    """

    def __init__(
        self,
        block: Block,
        layers: list[int],
        num_classes: int = 1000,
        zero_init_residual: bool = False,
        groups: int = 1,
        width_per_group: int = 64,
        replace_stride_with_dilation: list[bool] | None = None,
        norm_layer: NormLayer | None = None,
        *,
        fused: bool = True,
        block_variant: BlockVariant = "original",
        stride_on_1x1: bool = False,
        shortcut: ShortcutType = "B",
        memory_efficient: bool | None = None,
    ) -> None:
        super().__init__()
        if memory_efficient is not None and not isinstance(memory_efficient, bool):
            raise TypeError(f"memory_efficient must be None, True or False, got {memory_efficient!r}")
        self.memory_efficient = memory_efficient
        block = _block_for(block, block_variant)
        self._setup(norm_layer, groups, width_per_group, block_variant, stride_on_1x1, shortcut)
        norm_layer = self._norm_layer

        self.inplanes = 64
        if replace_stride_with_dilation is None:
            # each element in the tuple indicates if we should replace
            # the 2x2 stride with a dilated convolution instead
            replace_stride_with_dilation = [False, False, False]
        if len(replace_stride_with_dilation) != 3:
            raise ValueError(
                f"replace_stride_with_dilation should be None or a 3-element tuple, got {replace_stride_with_dilation}"
            )
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        if block_variant != "preact":
            self.bn1 = norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2, dilate=replace_stride_with_dilation[0])
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2, dilate=replace_stride_with_dilation[1])
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2, dilate=replace_stride_with_dilation[2])
        if block_variant == "preact":
            self.bn_final = norm_layer(512 * block.expansion)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

        self._init_weights(zero_init_residual)
        self._plan_tails()
        self._finish(fused)

    memory_efficient: bool | None = None  # a ResNet adopted by convert() keeps the default

    def _plan_tails(self) -> None:
        """Set each bottleneck's ``recompute_tail`` from ``memory_efficient`` (module docstring).

        Sizes are per input pixel: a tail's output has ``4 planes`` channels at ``1 / s**2`` of
        the input's pixels, ``s`` the cumulative stride (the stem's 4, then each stride-2 block's).
        The budget is 10% of ``12 planes / s**2`` summed over the bottlenecks.
        """
        tails: list[tuple[float, int, Bottleneck]] = []  # (output size, -order, block)
        budget, stride = 0.0, 4
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in layer:
                stride *= getattr(block, "stride", 1)
                if isinstance(block, Bottleneck):
                    size = block.bn3.num_features / stride**2
                    tails.append((size, -len(tails), block))
                    budget += 0.1 * 12 * (size / Bottleneck.expansion)
        if self.memory_efficient is not None:
            for *_, block in tails:
                block.recompute_tail = self.memory_efficient
            return
        kept = 0.0
        for size, _, block in sorted(tails, key=lambda t: t[:2]):  # smallest first; ties: latest first
            block.recompute_tail = kept + size > budget
            kept += 0.0 if block.recompute_tail else size

    def _fused_stem(self) -> bool:
        """Whether the stem is torchvision's conv7x7/2 - BN - ReLU - maxpool3x3/2, run as one node."""
        conv, pool = self.conv1, self.maxpool
        return (
            self.fused
            and self.memory_efficient is not False
            and not self.folded
            and self.block_variant != "preact"
            and type(conv) is nn.Conv2d
            and conv.bias is None
            and (conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups)
            == ((7, 7), (2, 2), (3, 3), (1, 1), 1)
            and isinstance(self.bn1, nn.BatchNorm2d)
            and isinstance(pool, nn.MaxPool2d)
            and (pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode) == (3, 2, 1, 1, False)
        )

    def _forward_impl(self, x: Tensor) -> Tensor:
        if self._fused_stem():
            # One node that keeps the network input for backward (and on the CPU one byte per
            # pooled output, the max-pool's winners); it recomputes the conv (3% of ResNet-50's
            # forward MACs) instead of keeping its output, the ReLU output and the max-pool's
            # int64 indices (at 224x224: more than every bottleneck of layer1 keeps).
            norm = BatchNormParams.from_module(self.bn1)
            x = stem_conv_bn_relu_pool(x, self.conv1.weight, norm, training=self.bn1.training)
        else:
            x = self.conv1(x)
            if self.block_variant != "preact" and not self.folded:  # pre-activation: the first block normalizes
                x = self._bn_relu(self.bn1, x)  # folded: inside conv1
            x = self.maxpool(x)

        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        if self.block_variant == "preact":  # the activation after the last addition
            x = self._bn_relu(self.bn_final, x)

        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.fc(x)

        return x

    def forward(self, x: Tensor) -> Tensor:
        """``[N, 3, H, W]`` (float, ``H, W >= min_input_size``) -> logits ``[N, num_classes]``."""
        self._check_input(x)
        return self._forward_impl(x)

    @classmethod
    def _adopt(cls, source: nn.Module) -> ResNet:
        """A ResNet holding ``source``'s own submodules (a torchvision-style ResNet; eager form)."""
        model = cls.__new__(cls)
        nn.Module.__init__(model)
        for name, child in source.named_children():
            setattr(model, name, child)
        model._setup(None, 1, 64, "original", False, "B")
        model.inplanes = getattr(source, "inplanes", 0)
        model.train(source.training)
        return model


def _ovewrite_named_param(kwargs: dict[str, Any], param: str, new_value: object) -> None:
    # torchvision's rule: a builder's fixed argument may be passed only with the same value.
    if param in kwargs:
        if kwargs[param] != new_value:
            raise ValueError(f"The parameter '{param}' expected value {new_value} but got {kwargs[param]} instead.")
    else:
        kwargs[param] = new_value


def check_no_weights(weights: object, progress: bool) -> None:
    """Builders accept ``weights=None`` only: nothing is downloaded; load a local file instead."""
    del progress  # torchvision's download flag
    if weights is not None:
        raise ValueError(
            f"fastblocks ships and downloads no pretrained weights (got weights={weights!r}). Build the model "
            "with weights=None and load a checkpoint file you have: "
            "model.load_state_dict(torch.load(path, map_location='cpu')); torchvision checkpoints load unchanged."
        )


def _resnet(block: Block, layers: list[int], weights: object, progress: bool, **kwargs: Any) -> ResNet:
    check_no_weights(weights, progress)
    return ResNet(block, layers, **kwargs)


def resnet18(*, weights: object = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNet-18 (He et al. 2016, Table 1): 11,689,512 parameters. ``[N, 3, 224, 224] -> [N, 1000]``.

    ``kwargs`` go to :class:`ResNet` (``fused``, ``block_variant``, ``num_classes``, ...).
    """
    return _resnet(BasicBlock, [2, 2, 2, 2], weights, progress, **kwargs)


def resnet34(*, weights: object = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNet-34 (He et al. 2016, Table 1): 21,797,672 parameters. ``[N, 3, 224, 224] -> [N, 1000]``."""
    return _resnet(BasicBlock, [3, 4, 6, 3], weights, progress, **kwargs)


def resnet50(*, weights: object = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNet-50 (He et al. 2016, Table 1; torchvision v1.5): 25,557,032 parameters. ``[N, 3, 224, 224] -> [N, 1000]``."""
    return _resnet(Bottleneck, [3, 4, 6, 3], weights, progress, **kwargs)


def resnet101(*, weights: object = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNet-101 (He et al. 2016, Table 1): 44,549,160 parameters. ``[N, 3, 224, 224] -> [N, 1000]``."""
    return _resnet(Bottleneck, [3, 4, 23, 3], weights, progress, **kwargs)


def resnet152(*, weights: object = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNet-152 (He et al. 2016, Table 1): 60,192,808 parameters. ``[N, 3, 224, 224] -> [N, 1000]``."""
    return _resnet(Bottleneck, [3, 8, 36, 3], weights, progress, **kwargs)


def resnext50_32x4d(*, weights: object = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNeXt-50 32x4d (Xie et al. 2017): 25,028,904 parameters. ``[N, 3, 224, 224] -> [N, 1000]``."""
    _ovewrite_named_param(kwargs, "groups", 32)
    _ovewrite_named_param(kwargs, "width_per_group", 4)
    return _resnet(Bottleneck, [3, 4, 6, 3], weights, progress, **kwargs)


def resnext101_32x8d(*, weights: object = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNeXt-101 32x8d (Xie et al. 2017): 88,791,336 parameters. ``[N, 3, 224, 224] -> [N, 1000]``."""
    _ovewrite_named_param(kwargs, "groups", 32)
    _ovewrite_named_param(kwargs, "width_per_group", 8)
    return _resnet(Bottleneck, [3, 4, 23, 3], weights, progress, **kwargs)


def resnext101_64x4d(*, weights: object = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNeXt-101 64x4d (Xie et al. 2017): 83,455,272 parameters. ``[N, 3, 224, 224] -> [N, 1000]``."""
    _ovewrite_named_param(kwargs, "groups", 64)
    _ovewrite_named_param(kwargs, "width_per_group", 4)
    return _resnet(Bottleneck, [3, 4, 23, 3], weights, progress, **kwargs)


def wide_resnet50_2(*, weights: object = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """Wide ResNet-50-2 (Zagoruyko & Komodakis 2016; bottleneck twice as wide): 68,883,240 parameters."""
    _ovewrite_named_param(kwargs, "width_per_group", 64 * 2)
    return _resnet(Bottleneck, [3, 4, 6, 3], weights, progress, **kwargs)


def wide_resnet101_2(*, weights: object = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """Wide ResNet-101-2 (Zagoruyko & Komodakis 2016; bottleneck twice as wide): 126,886,696 parameters."""
    _ovewrite_named_param(kwargs, "width_per_group", 64 * 2)
    return _resnet(Bottleneck, [3, 4, 23, 3], weights, progress, **kwargs)


def plain18(*, weights: object = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """Plain-18 (He et al. 2016, Fig. 3/4): ResNet-18's layout without shortcuts. ``[N, 3, 224, 224] -> [N, 1000]``."""
    _ovewrite_named_param(kwargs, "shortcut", None)
    return _resnet(BasicBlock, [2, 2, 2, 2], weights, progress, **kwargs)


def plain34(*, weights: object = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """Plain-34 (He et al. 2016, Fig. 3/4): ResNet-34's layout without shortcuts. ``[N, 3, 224, 224] -> [N, 1000]``."""
    _ovewrite_named_param(kwargs, "shortcut", None)
    return _resnet(BasicBlock, [3, 4, 6, 3], weights, progress, **kwargs)
