"""Swap fused blocks into a model you already have, and take them out again.

- :func:`convert` (exported as ``fastblocks.convert``): a torchvision-style model -> its fused
  equivalent with the same weights and state_dict keys. It recognizes, by duck typing:

  * blocks shaped like torchvision's ``BasicBlock``/``Bottleneck`` (children ``conv1``, ``bn1``,
    ``conv2``, ``bn2`` [, ``conv3``, ``bn3``], ``relu``, optional ``downsample``, and nothing
    else), which become :class:`~fastblocks.models.resnet.BasicBlock` /
    :class:`~fastblocks.models.resnet.Bottleneck` blocks holding the same submodules, in fused
    form (their fused subclass, :mod:`fastblocks.models._resnet_fused`);
  * a torchvision ``ResNet`` (class named ``ResNet`` with torchvision's children ``conv1``,
    ``bn1``, ``relu``, ``maxpool``, ``layer1..4``, ``avgpool``, ``fc``), which becomes a
    :class:`~fastblocks.models.resnet.ResNet` with a fused stem (subclasses with their own
    forward are not touched; their blocks still are);
  * ``nn.Sequential`` containers with ``BatchNorm2d -> ReLU`` runs, which become
    :class:`FusedSequential` (``BatchNorm2d -> ReLU -> Conv2d`` runs through
    :func:`fastblocks.nn.conv.bn_relu_conv`);
  * models of this package, switched to their fused form.

  Everything else is left as it is (and its children are visited). Only plain
  ``nn.BatchNorm2d`` layers are fused (not SyncBatchNorm, GroupNorm or BatchNorm subclasses).
- :func:`export_torch`: the inverse, for deployment: every fastblocks BatchNorm becomes an
  ``nn.BatchNorm2d`` and every fused forward the eager one, so the model runs no fastblocks op
  (``torch.export``, ONNX, a machine without fastblocks). The containers stay this package's
  classes, whose eager forward is torchvision's; to drop the package entirely, load the
  state_dict (identical keys) into torchvision's model.
- :func:`fuse` / :func:`unfuse`: switch a model of this package (``fastblocks.models``) between
  its fused form and its eager twin.

All four return a deep copy unless ``inplace=True``; weights, buffers and ``training`` are kept.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

from torch import Tensor, nn

from fastblocks.models._fusion import (
    Fusable,
    fused_bn_relu_conv,
    is_batchnorm2d,
    is_prologue_conv,
    set_fused,
    swap_batchnorm,
)
from fastblocks.models._resnet_fused import plan_tails
from fastblocks.models.resnet import BasicBlock, Bottleneck, ResNet, _ResNetBase
from fastblocks.nn.activation import AddReLU
from fastblocks.nn.batchnorm import BatchNorm2d as FastBatchNorm2d
from fastblocks.nn.batchnorm import BatchNormReLU2d

__all__ = ["FusedSequential", "convert", "export_torch", "fuse", "unfuse"]


class FusedSequential(nn.Sequential):
    """``nn.Sequential`` that runs its ``BatchNorm -> ReLU [-> Conv2d]`` runs fused; same children and state_dict.

    Made by :func:`convert`: each BatchNorm2d directly followed by a ReLU is a
    :class:`~fastblocks.nn.BatchNormReLU2d`. The ReLU child stays (so the structure, printing and
    :func:`export_torch` are unchanged, and calling the children one by one still gives the same
    result, ReLU being idempotent), but ``forward`` skips it; a following plain ``Conv2d`` runs
    with the BN-ReLU as its prologue (:func:`fastblocks.nn.conv.bn_relu_conv`).

    Shapes: those of the children (``[N, C, H, W]`` around every BatchNorm).
    """

    def forward(self, input: Tensor) -> Tensor:
        mods = list(self._modules.values())
        i = 0
        while i < len(mods):
            m = mods[i]
            if _is_bn_relu(m) and i + 1 < len(mods) and isinstance(mods[i + 1], nn.ReLU):
                conv = mods[i + 2] if i + 2 < len(mods) else None
                if is_prologue_conv(conv):
                    input = fused_bn_relu_conv(input, m, conv)
                    i += 3
                else:
                    input = m(input)
                    i += 2
                continue
            input = m(input)
            i += 1
        return input


def _is_bn_relu(m: object) -> bool:
    return isinstance(m, FastBatchNorm2d) and m.relu


# ----------------------------------------------------------------------------- recognizing
_RESNET_CHILDREN = {"conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc"}


def _torchvision_block_class(m: nn.Module) -> type[BasicBlock] | type[Bottleneck] | None:
    """Our block class for a torchvision-shaped block ``m`` with fusable layers, else None."""
    if isinstance(m, Fusable) or not hasattr(m, "downsample"):
        return None
    names = {k for k, v in m._modules.items() if v is not None}
    convs = ["conv1", "conv2", "conv3"] if "conv3" in names else ["conv1", "conv2"]
    norms = [c.replace("conv", "bn") for c in convs]
    if not set(convs + norms + ["relu"]) <= names or not names <= {*convs, *norms, "relu", "downsample"}:
        return None
    if not all(type(m._modules[c]) is nn.Conv2d for c in convs) or not isinstance(m._modules["relu"], nn.ReLU):
        return None
    if not all(is_batchnorm2d(m._modules[n]) for n in norms):
        return None
    return Bottleneck if "conv3" in names else BasicBlock


def _adopt_block(m: nn.Module, cls: type[BasicBlock] | type[Bottleneck]) -> nn.Module:
    """A ``cls`` block (eager form) holding ``m``'s own submodules, in ``m``'s order."""
    block = cls.__new__(cls)
    nn.Module.__init__(block)
    for name, child in m._modules.items():
        setattr(block, name, child)
    if "downsample" not in block._modules:
        block.downsample = getattr(m, "downsample", None)
    conv = m.conv1 if cls is BasicBlock or m.conv1.stride != (1, 1) else m.conv2
    block.stride = getattr(m, "stride", conv.stride[0])
    block.variant = "original"
    block.residual = True
    block.fused = False
    block.train(m.training)
    return block


def _is_torchvision_resnet(m: nn.Module) -> bool:
    if isinstance(m, _ResNetBase) or type(m).__name__ != "ResNet" or not hasattr(type(m), "_forward_impl"):
        return False
    names = {k for k, v in m._modules.items() if v is not None}
    return names == _RESNET_CHILDREN and is_batchnorm2d(m._modules["bn1"]) and isinstance(m._modules["relu"], nn.ReLU)


def _fuse_sequential(seq: nn.Sequential) -> nn.Sequential:
    items = list(seq._modules.items())
    out: OrderedDict[str, nn.Module] = OrderedDict()
    found = False
    for i, (name, child) in enumerate(items):
        follows = items[i + 1][1] if i + 1 < len(items) else None
        if is_batchnorm2d(child) and isinstance(follows, nn.ReLU):
            child = swap_batchnorm(child, BatchNormReLU2d)
            found = True
        out[name] = child
    if not found:
        return seq
    fused = FusedSequential(out)
    fused.train(seq.training)
    return fused


def _convert(m: nn.Module) -> nn.Module:
    if _is_torchvision_resnet(m):
        m = ResNet._adopt(m)
    else:
        cls = _torchvision_block_class(m)
        if cls is not None:
            m = _adopt_block(m, cls)
    for name, child in list(m._modules.items()):
        if child is not None:
            setattr(m, name, _convert(child))
    if type(m) is nn.Sequential:
        m = _fuse_sequential(m)
    if isinstance(m, ResNet):  # its blocks are adopted now: choose which tails recompute
        plan_tails(m)
    if isinstance(m, Fusable) and m._fusable():
        m._set_fused(True)
    return m


def _copy(model: nn.Module, inplace: bool) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return model if inplace else copy.deepcopy(model)


# ----------------------------------------------------------------------------- public API
def convert(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """The fused equivalent of a torchvision-style model, with the same weights and state_dict keys.

    See the module docstring for what is recognized. Outputs and gradients match the original
    up to fp32 rounding; BatchNorm running statistics are updated once per training forward,
    as before.

    Args:
        model: e.g. a torchvision ``resnet50()``, a model built from torchvision-shaped blocks,
            an ``nn.Sequential(Conv2d, BatchNorm2d, ReLU, ...)``, or a model of this package.
        inplace: convert ``model`` itself (its modules are replaced) instead of a deep copy.

    Returns:
        the converted model (the same object when ``inplace`` and the top module was kept; a
        new top module when it was itself replaced, e.g. a torchvision ``ResNet``).
    """
    return _convert(_copy(model, inplace))


def _unfuse_in_place(m: nn.Module) -> tuple[nn.Module, int]:
    count = 0
    for name, child in list(m._modules.items()):
        if child is not None:
            new, n = _unfuse_in_place(child)
            count += n
            setattr(m, name, new)
    if isinstance(m, Fusable):
        m._set_fused(False)
        count += 1
    if isinstance(m, FusedSequential):
        out = OrderedDict(
            (k, swap_batchnorm(v, nn.BatchNorm2d) if isinstance(v, FastBatchNorm2d) else v)
            for k, v in m._modules.items()
        )
        seq = nn.Sequential(out)
        seq.train(m.training)
        return seq, count + 1
    return m, count


def fuse(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """The fused form of a model of this package (``fastblocks.models``), same weights.

    Raises:
        TypeError: ``model`` has no fastblocks blocks (use :func:`convert` for other models).
        ValueError: its norm layers are not BatchNorm2d (a custom ``norm_layer``).
    """
    model = _copy(model, inplace)
    if set_fused(model, True) == 0:
        raise TypeError(
            f"fuse() takes a model of fastblocks.models; {type(model).__name__} has no fastblocks blocks "
            "(use fastblocks.convert for torchvision-style models)"
        )
    return model


def unfuse(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """The eager twin of a fused model of this package: ``nn.BatchNorm2d``/``nn.ReLU`` and torchvision's forward.

    Same modules, names, weights and state_dict; also undoes :class:`FusedSequential`.

    Raises:
        TypeError: ``model`` has nothing of this package to unfuse.
    """
    model = _copy(model, inplace)
    model, count = _unfuse_in_place(model)
    if count == 0:
        raise TypeError(f"unfuse() takes a model of fastblocks.models; {type(model).__name__} has no fastblocks blocks")
    return model


def export_torch(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """The model with plain ``torch.nn`` layers and eager forwards only, for deployment.

    The inverse of :func:`convert`: fused blocks become their eager twins, :class:`FusedSequential`
    an ``nn.Sequential``, stray fastblocks ``BatchNorm2d`` layers ``nn.BatchNorm2d``. Same
    state_dict (keys, values), same outputs up to fp32 rounding.

    Raises:
        ValueError: naming the module, for fused parts that have no torch.nn form with the same
            state_dict (a standalone ``BatchNormReLU2d``/``BNAddReLU``/``AddReLU``, or a model
            built fused that this package cannot unfuse, e.g. a ``fused=True`` DenseNet: build it
            with ``fused=False`` and load the state_dict).
    """
    model, _ = _unfuse_in_place(_copy(model, inplace))
    for name, child in list(model.named_modules()):
        if isinstance(child, FastBatchNorm2d) and not child.relu:
            parent, _, attr = name.rpartition(".")
            holder = model.get_submodule(parent) if parent else None
            if holder is None:
                return swap_batchnorm(child, nn.BatchNorm2d)
            setattr(holder, attr, swap_batchnorm(child, nn.BatchNorm2d))
    for name, child in model.named_modules():
        where = name or "the model itself"
        if isinstance(child, (FastBatchNorm2d, AddReLU)):
            raise ValueError(
                f"export_torch: {where} is a {type(child).__name__}, which applies a ReLU that no torch.nn "
                "layer with the same state_dict can express; replace it (e.g. nn.BatchNorm2d + nn.ReLU) first"
            )
        if getattr(child, "fused", False) is True:
            raise ValueError(
                f"export_torch: {where} ({type(child).__name__}) runs fused ops and fastblocks cannot unfuse it; "
                "build it with fused=False and load this model's state_dict"
            )
    return model
