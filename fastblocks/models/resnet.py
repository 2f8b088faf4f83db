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
one conv, and no BatchNorm is left. Per variant, see
:func:`fastblocks.nn.fold.fold_residual_block_` and :func:`fastblocks.nn.fold.fold_preact_block_`.
A folded model is for inference only and its state_dict holds the folded weights, not
torchvision's keys.

Where the code is: this module holds the networks (:class:`ResNet`, the parts CIFAR's
:class:`~fastblocks.models.cifar.CifarResNet` shares) and the builders; the blocks, as
torchvision writes them, are in :mod:`fastblocks.models._resnet_blocks` (imported here, so
``fastblocks.models.resnet.Bottleneck`` is the class); their fused forms (subclasses that
override ``forward``), the fused stem and the ``memory_efficient`` plan in
:mod:`fastblocks.models._resnet_fused`; the switch between forms in
:mod:`fastblocks.models._fusion`; folding in :mod:`fastblocks.nn.fold`. A block's form is its
class (``Bottleneck``, its fused subclass, its folded subclass), switched in place; a network
keeps its class and reads its ``fused`` / ``folded`` flags.

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

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fastblocks import _backend
from fastblocks.models._fusion import Fusable, set_fused
from fastblocks.models._resnet_blocks import (
    BLOCK_VARIANTS,
    BasicBlock,
    Block,
    BlockVariant,
    Bottleneck,
    NormLayer,
    PreActBasicBlock,
    PreActBottleneck,
    ShortcutType,
    ZeroPadShortcut,
    _PreActBlock,
    _ResidualBlock,
    conv1x1,
)
from fastblocks.models._resnet_fused import fused_stem, plan_tails, runs_fused_stem
from fastblocks.nn.batchnorm import BatchNorm2d as FastBatchNorm2d
from fastblocks.nn.batchnorm import BatchNormReLU2d
from fastblocks.ops.conv2d import conv2d_module

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
    """What the ImageNet and CIFAR networks share: stages, shortcuts, init, input checks, fusing.

    One class in every form: the forward reads ``fused`` and ``folded`` (set by
    :meth:`~fastblocks.models._fusion.Fusable.fold_bn_`, :func:`fastblocks.nn.fold.fold_resnet_`).
    """

    _relu_after = "bn1"
    fold_layout = "resnet"

    # Set by the subclasses' __init__.
    conv1: nn.Conv2d
    block_variant: str
    fused: bool

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
        plan_tails(self)
        self._finish(fused)

    memory_efficient: bool | None = None  # a ResNet adopted by convert() keeps the default

    def _forward_impl(self, x: Tensor) -> Tensor:
        if self.fused:
            x = _backend.body_layout("resnet", x)  # channels_last on the CPU: oneDNN's faster convolutions
        if runs_fused_stem(self):
            x = fused_stem(self, x)  # conv1, bn1, relu, maxpool as one node that recomputes the conv
        else:
            x = conv2d_module(x, self.conv1) if self.fused else self.conv1(x)  # a registered op when traced
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
