"""The fused forms of the ResNet blocks, and the fused parts of the ResNet networks.

DenseNet's pattern (:mod:`fastblocks.models.densenet`): each eager block class of
:mod:`fastblocks.models._resnet_blocks` (torchvision's code) has a fused subclass here that
overrides ``forward`` only. Same modules, names and state_dict; its BatchNorms are the
fastblocks classes its ``_fused_norms`` lists and it has no ``relu`` module.
:func:`~fastblocks.models._fusion.set_fused` switches an instance between the eager class and
the fused one in place (the classes are paired by :func:`~fastblocks.models._fusion.register_form`
below), so ``isinstance(block, Bottleneck)`` holds in both forms. What the fused forms run:

- every BatchNorm-ReLU in front of a convolution: :func:`~fastblocks.models._fusion.fused_bn_relu_conv`;
- every other convolution (a block's first, a projection shortcut's):
  :func:`~fastblocks.ops.conv2d.conv2d_module`, the module itself on eager calls and a registered
  op when traced, so that a compiled fused network holds no ``aten.convolution`` and Inductor
  keeps its layout (:mod:`fastblocks.ops.conv2d` says why);
- the end of a post-activation block, per variant: ``relu(bn(out) + identity)`` as one
  :class:`~fastblocks.nn.BNAddReLU` (``original``), the other variants' BN-ReLU as a
  :class:`~fastblocks.nn.BatchNormReLU2d`;
- a bottleneck with ``recompute_tail`` (``original`` variant):
  ``relu(bn3(conv3(relu(bn2(.)))) + identity)`` as one node recomputing conv3 in backward
  (:func:`~fastblocks.nn.conv.bn_relu_conv_bn_add_relu`); :func:`plan_tails` chooses the blocks.

For the networks (one class each, switched by their ``fused`` flag): :func:`fused_stem`, the
ImageNet stem as one node, and :func:`plan_tails`, the ``memory_efficient`` plan.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor, nn

from fastblocks.models._fusion import fused_bn_relu_conv, register_form
from fastblocks.models._resnet_blocks import BasicBlock, Bottleneck, PreActBasicBlock, PreActBottleneck, _PreActBlock
from fastblocks.nn.conv import bn_relu_conv_bn_add_relu
from fastblocks.ops import BatchNormParams, stem_conv_bn_relu_pool
from fastblocks.ops.conv2d import conv2d_module

if TYPE_CHECKING:
    from fastblocks.models.resnet import ResNet

__all__ = ["fused_stem", "plan_tails", "runs_fused_stem"]


def _shortcut(block: nn.Module, x: Tensor) -> Tensor:
    """The block's shortcut: x, or ``downsample(x)`` with its convolution through
    :func:`~fastblocks.ops.conv2d.conv2d_module` (a registered op when traced)."""
    down = block.downsample
    if down is None:
        return x
    if isinstance(down, nn.Sequential) and len(down) and type(down[0]) is nn.Conv2d:
        out = conv2d_module(x, down[0])
        for m in down[1:]:
            out = m(out)
        return out
    return down(x)  # shortcut "A": parameter-free


def _end(block: BasicBlock | Bottleneck, out: Tensor, identity: Tensor, bn: nn.Module) -> Tensor:
    """The fused end of a post-activation block: ``out`` is its last convolution's output."""
    if not block.residual:
        return bn(out)  # BatchNormReLU2d
    if block.variant == "bn_after_add":
        return bn(out + identity)  # BatchNormReLU2d
    if block.variant == "relu_before_add":
        return bn(out) + identity  # BatchNormReLU2d
    return bn(out, identity)  # BNAddReLU: relu(bn(out) + identity)


class _FusedBasicBlock(BasicBlock):
    """:class:`BasicBlock`'s fused form: ``conv2(relu(bn1(conv1(x))))`` through ``bn_relu_conv``, then the fused end."""

    def forward(self, x: Tensor) -> Tensor:
        identity = _shortcut(self, x)
        out = fused_bn_relu_conv(conv2d_module(x, self.conv1), self.bn1, self.conv2)
        return _end(self, out, identity, self.bn2)


class _FusedBottleneck(Bottleneck):
    """:class:`Bottleneck`'s fused form: two ``bn_relu_conv``, then the fused end or the recomputing tail."""

    def forward(self, x: Tensor) -> Tensor:
        identity = _shortcut(self, x)
        out = conv2d_module(x, self.conv1)
        out = fused_bn_relu_conv(out, self.bn1, self.conv2)
        if self.recompute_tail and self.residual and self.variant == "original":
            # relu(bn3(conv3(relu(bn2(out)))) + identity) as one node: conv3's input and output
            # (5 of the 12 units of a bottleneck's eager saved bytes) are recomputed in backward.
            return bn_relu_conv_bn_add_relu(out, self.bn2, self.conv3, self.bn3, identity)
        out = fused_bn_relu_conv(out, self.bn2, self.conv3)
        return _end(self, out, identity, self.bn3)


def _enter(block: _PreActBlock, x: Tensor) -> tuple[Tensor, Tensor]:
    """(conv1's output, shortcut) of a fused pre-activation block."""
    if block.downsample is None:
        return fused_bn_relu_conv(x, block.bn1, block.conv1), x
    act = block.bn1(x)  # BatchNormReLU2d: conv1 and the projection both read it
    return conv2d_module(act, block.conv1), _shortcut(block, act)


class _FusedPreActBasicBlock(PreActBasicBlock):
    """:class:`PreActBasicBlock`'s fused form: each BN-ReLU-conv through ``bn_relu_conv``."""

    def forward(self, x: Tensor) -> Tensor:
        out, identity = _enter(self, x)
        out = fused_bn_relu_conv(out, self.bn2, self.conv2)
        return self._add(out, identity)


class _FusedPreActBottleneck(PreActBottleneck):
    """:class:`PreActBottleneck`'s fused form: each BN-ReLU-conv through ``bn_relu_conv``."""

    def forward(self, x: Tensor) -> Tensor:
        out, identity = _enter(self, x)
        out = fused_bn_relu_conv(out, self.bn2, self.conv2)
        out = fused_bn_relu_conv(out, self.bn3, self.conv3)
        return self._add(out, identity)


register_form(BasicBlock, "fused", _FusedBasicBlock)
register_form(Bottleneck, "fused", _FusedBottleneck)
register_form(PreActBasicBlock, "fused", _FusedPreActBasicBlock)
register_form(PreActBottleneck, "fused", _FusedPreActBottleneck)


# ----------------------------------------------------------------------------- networks
def runs_fused_stem(model: ResNet) -> bool:
    """Whether the stem is torchvision's conv7x7/2 - BN - ReLU - maxpool3x3/2, run as one node (:func:`fused_stem`)."""
    conv, pool = model.conv1, getattr(model, "maxpool", None)
    return (
        model.fused
        and model.memory_efficient is not False
        and not model.folded
        and model.block_variant != "preact"
        and type(conv) is nn.Conv2d
        and conv.bias is None
        and (conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups)
        == ((7, 7), (2, 2), (3, 3), (1, 1), 1)
        and isinstance(model.bn1, nn.BatchNorm2d)
        and isinstance(pool, nn.MaxPool2d)
        and (pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode) == (3, 2, 1, 1, False)
    )


def fused_stem(model: ResNet, x: Tensor) -> Tensor:
    """``maxpool(relu(bn1(conv1(x))))`` as one node: ``[N, 3, H, W] -> [N, 64, H/4, W/4]`` (rounded up).

    It keeps the network input for backward (and on the CPU one byte per pooled output, the
    max-pool's winners); it recomputes the conv (3% of ResNet-50's forward MACs) instead of
    keeping its output, the ReLU output and the max-pool's int64 indices (at 224x224: more than
    every bottleneck of layer1 keeps). Only where :func:`runs_fused_stem` says so.
    """
    norm = BatchNormParams.from_module(model.bn1)
    return stem_conv_bn_relu_pool(x, model.conv1.weight, norm, training=model.bn1.training)


def plan_tails(model: ResNet) -> None:
    """Set each bottleneck's ``recompute_tail`` from ``model.memory_efficient`` (see :mod:`fastblocks.models.resnet`).

    Sizes are per input pixel: a tail's output has ``4 planes`` channels at ``1 / s**2`` of
    the input's pixels, ``s`` the cumulative stride (the stem's 4, then each stride-2 block's).
    The budget is 10% of ``12 planes / s**2`` summed over the bottlenecks.
    """
    tails: list[tuple[float, int, Bottleneck]] = []  # (output size, -order, block)
    budget, stride = 0.0, 4
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in layer:
            stride *= getattr(block, "stride", 1)
            if isinstance(block, Bottleneck):
                size = block.bn3.num_features / stride**2
                tails.append((size, -len(tails), block))
                budget += 0.1 * 12 * (size / Bottleneck.expansion)
    if model.memory_efficient is not None:
        for *_, block in tails:
            block.recompute_tail = model.memory_efficient
        return
    kept = 0.0
    for size, _, block in sorted(tails, key=lambda t: t[:2]):  # smallest first; ties: latest first
        block.recompute_tail = kept + size > budget
        kept += 0.0 if block.recompute_tail else size
