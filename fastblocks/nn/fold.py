"""Inference folding: BatchNorm folded into the preceding convolution, conv + bias (+ residual)
(+ ReLU) run as one call where the backend has it.

For an eval-mode BatchNorm with running statistics (μ, σ²), affine (γ, β) after a convolution
with weight W and bias b:  BN(W * x + b) = W' * x + b'  with  s = γ / sqrt(σ² + eps),
W' = W · s (per output channel),  b' = (b - μ) · s + β.

One-call fused paths (otherwise conv2d, then add, then ReLU):
- CUDA: cuDNN's ``torch.cudnn_convolution_relu`` / ``torch.cudnn_convolution_add_relu``;
- CPU (fp32, eager): oneDNN's fused post-ops ``torch.ops.mkldnn._convolution_pointwise`` (ReLU
  or none) and its ``.binary`` overload (``add``, then ReLU or none), the kernels torch.compile's
  CPU backend emits, with the weight pre-packed once per input shape into oneDNN's blocked layout
  (``torch._C._nn.mkldnn_reorder_conv2d_weight``, what inductor's freezing pass does). Without
  the packing oneDNN reorders the plain weight on every call: ResNet-50's 512x512 3x3 conv on
  8x512x7x7 took 22 ms instead of 16 (2-core AMD EPYC dev machine, fp32, best of 15). With a
  packed weight oneDNN returns channels_last activations (also from an NCHW input), so every
  later layer runs in its fast layout: the 64->256 1x1 conv on 8x64x56x56 took 49 ms in NCHW
  (``F.conv2d``), 8 ms in channels_last. The values are those of the NCHW computation; only
  the strides differ.
- torch.compile / torch.export (and FakeTensor, FlopCounterMode, ...): plain ``aten.conv2d``
  (+ ``add``) (+ ``relu``), so an exported program holds portable aten ops only (the oneDNN ops
  have no fake kernel for export) and inductor applies its own conv fusions.

What :func:`fold_bn` folds (:func:`fold_modules_`): a module with a ``fold_bn_()`` method folds
itself; ``Conv2d -> BatchNorm2d [-> ReLU]`` runs inside ``nn.Sequential`` become one
:class:`FoldedConv2d`. The blocks and networks of :mod:`fastblocks.models` (ResNet family) all
fold here, by their attribute layout (torchvision's names; their ``fold_layout``):
:func:`fold_layout_` and one function per layout, ``"residual"`` (:func:`fold_residual_block_`),
``"preact"`` (:func:`fold_preact_block_`), ``"resnet"`` (:func:`fold_resnet_`); a folded block runs
:func:`forward_folded_residual` / :func:`forward_folded_preact` (its folded form's ``forward``).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F

from fastblocks.ops._bn_core import scale_shift
from fastblocks.ops.batchnorm import batch_norm_act

__all__ = [
    "FoldedConv2d",
    "FrozenBatchNorm2d",
    "bn_scale_shift",
    "fold_bn",
    "fold_conv_bn_weights",
    "fold_layout_",
    "fold_modules_",
    "fold_preact_block_",
    "fold_residual_block_",
    "fold_resnet_",
    "forward_folded_preact",
    "forward_folded_residual",
    "has_running_stats",
]


def has_running_stats(bn: nn.Module) -> bool:
    """Whether ``bn`` has running statistics (so eval normalizes with them and it can be folded)."""
    return getattr(bn, "running_mean", None) is not None and getattr(bn, "running_var", None) is not None


def bn_scale_shift(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, t)``, both ``[C]`` fp64, of the eval BatchNorm ``bn(x) = x * s + t``: ``s = γ / sqrt(σ² + eps)``, ``t = β - μ s``."""
    if not has_running_stats(bn):
        raise ValueError("cannot fold a BatchNorm without running statistics (track_running_stats=False)")
    weight = bn.weight.detach().double() if bn.weight is not None else None
    bias = bn.bias.detach().double() if bn.bias is not None else None
    s, t, _ = scale_shift(bn.running_mean.detach().double(), bn.running_var.detach().double(), weight, bias, bn.eps)
    return s, t


def fold_conv_bn_weights(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(W', b') of ``bn(conv(x))`` folded into one convolution (bn must have running statistics).

    Returns:
        ``W'`` with ``conv.weight``'s shape ``[C_out, C_in/groups, kh, kw]`` and ``b'`` ``[C_out]``.
    """
    if not has_running_stats(bn):
        raise ValueError("cannot fold a BatchNorm without running statistics (track_running_stats=False)")
    if bn.num_features != conv.out_channels:
        raise ValueError(f"BatchNorm has {bn.num_features} features but the conv has {conv.out_channels} outputs")
    with torch.no_grad():
        s, t = bn_scale_shift(bn)
        w = conv.weight.double() * s.view(-1, 1, 1, 1)
        b0 = conv.bias.double() if conv.bias is not None else torch.zeros_like(s)
        b = b0 * s + t
    return w.to(conv.weight.dtype), b.to(conv.weight.dtype)


def _plain_eager(x: torch.Tensor) -> bool:
    """Whether ``x`` is a real tensor in plain eager execution: no torch.compile/export tracing,
    dispatch or function mode (FakeTensor, FlopCounterMode), functorch transform or subclass,
    all of which need ops with fake kernels and autograd (the oneDNN ops have neither)."""
    return (
        type(x) is torch.Tensor
        and not torch.compiler.is_compiling()
        and torch._C._len_torch_dispatch_stack() == 0
        and not torch._C._is_torch_function_mode_enabled()
        and not torch._C._are_functorch_transforms_active()
        and not (x.requires_grad and torch.is_grad_enabled())
    )


class FoldedConv2d(nn.Module):
    """``act(conv(x, W', b') [+ residual])`` for inference, in one backend call where possible.

    Built from a convolution and the BatchNorm that follows it (``bn=None``: the convolution
    alone, its bias or zero). The parameters do not require grad; on the CPU oneDNN path the
    result does not carry autograd (an input that requires grad takes the aten path). That path
    keeps a copy of the weight packed for oneDNN (as much memory again as the weight; not in the
    state_dict, not copied or pickled) and returns channels_last outputs.

    Attributes:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups: the conv's.
        relu: apply ReLU last (after the residual).

    Shapes: ``forward(x [N, C_in, H, W], residual [N, C_out, H_out, W_out] | None) -> [N, C_out, H_out, W_out]``.
    """

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d | None, *, relu: bool) -> None:
        super().__init__()
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("FoldedConv2d supports zero padding given as integers")
        if bn is not None:
            weight, bias = fold_conv_bn_weights(conv, bn)
        else:
            weight = conv.weight.detach().clone()
            bias = conv.bias.detach().clone() if conv.bias is not None else torch.zeros(conv.out_channels)
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = nn.Parameter(bias.to(weight.device, weight.dtype), requires_grad=False)
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size = tuple(conv.kernel_size)
        self.stride, self.padding = list(conv.stride), list(conv.padding)
        self.dilation, self.groups = list(conv.dilation), conv.groups
        self.relu = relu
        self._packed: tuple[tuple, torch.Tensor] | None = None  # (key, oneDNN-blocked weight); not state

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={tuple(self.stride)}, relu={self.relu}"
        )

    def __getstate__(self) -> dict:
        # The packed weight is an opaque oneDNN tensor (no deepcopy, no pickling) and a cache.
        state = self.__dict__.copy()
        state["_packed"] = None
        return state

    @torch.no_grad()
    def scale_output_(self, scale: torch.Tensor) -> None:
        """Multiply the output by ``scale`` (``[C_out]``, per channel) before the residual, in place.

        ``s * conv(x, W, b) = conv(x, W s, b s)``: how a BatchNorm after the residual addition is
        pushed into a projection shortcut (``bn(F + P x) = s F + t + (s P) x``).
        """
        s = scale.to(torch.float64).view(-1)
        self.weight.copy_((self.weight.double() * s.view(-1, 1, 1, 1)).to(self.weight.dtype))
        self.bias.copy_((self.bias.double() * s).to(self.bias.dtype))

    def _onednn_ok(self, x: torch.Tensor) -> bool:
        # _plain_eager first: under torch.compile the rest is not traced (mkldnn.is_available is a graph break).
        return (
            _plain_eager(x)
            and x.device.type == "cpu"
            and x.dtype == torch.float32
            and self.weight.dtype == torch.float32
            and self.weight.device.type == "cpu"
            and x.dim() == 4
            and x.numel() > 0
            and torch.backends.mkldnn.is_available()
            and torch.backends.mkldnn.enabled
            and not torch.is_autocast_enabled("cpu")  # autocast: the aten conv runs in the autocast dtype
        )

    def _packed_weight(self, x: torch.Tensor) -> torch.Tensor:
        """The weight reordered for oneDNN, packed for ``x``'s shape (cached; repacked when the input
        shape, or the weight's storage or version, changes). oneDNN picks the blocked layout from
        the problem size; a weight packed for another shape still computes the right result."""
        w = self.weight
        # An inference tensor (made under inference_mode) has no version counter; it cannot be
        # modified outside inference_mode either.
        key = (tuple(x.shape), w.data_ptr(), 0 if w.is_inference() else w._version)
        cached = self._packed
        if cached is not None and cached[0] == key:
            return cached[1]
        packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
            w.detach().to_mkldnn(), self.padding, self.stride, self.dilation, self.groups, list(x.shape)
        )
        self._packed = (key, packed)
        return packed

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        w, b = self.weight, self.bias
        if self._onednn_ok(x) and (residual is None or (residual.dtype == x.dtype and _plain_eager(residual))):
            args = (self.padding, self.stride, self.dilation, self.groups)
            packed = self._packed_weight(x)
            if residual is None:
                return torch.ops.mkldnn._convolution_pointwise(
                    x, packed, b, *args, "relu" if self.relu else "none", [], ""
                )
            return torch.ops.mkldnn._convolution_pointwise.binary(
                x, residual, packed, b, *args, "add", None, "relu" if self.relu else None, [], None
            )
        if _plain_eager(x) and self.relu and x.is_cuda and torch.backends.cudnn.enabled and x.dtype == w.dtype:
            conv_args = (self.stride, self.padding, self.dilation, self.groups)
            if residual is None:
                return torch.cudnn_convolution_relu(x, w, b, *conv_args)
            if residual.dtype == x.dtype:
                return torch.cudnn_convolution_add_relu(x, w, residual, 1.0, b, *conv_args)
        y = F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)
        if residual is not None:
            y = y + residual
        return torch.relu(y) if self.relu else y


class FrozenBatchNorm2d(nn.Module):
    """An eval-mode BatchNorm (+ ReLU) that no convolution can absorb, with its statistics frozen.

    Where ReLU sits between a BatchNorm and the next convolution (pre-activation blocks:
    ``conv(relu(bn(x)))``), the BatchNorm cannot be folded into that convolution's weights
    exactly (``relu(x s + t)`` is not ``relu(x) s' + t'`` unless ``t = 0``), nor into the
    previous one when an addition comes in between. It stays a per-channel affine map plus
    ReLU: one pass (:func:`fastblocks.ops.batchnorm.batch_norm_act`, eval) in eager, and
    ``aten.batch_norm`` + ``relu`` under torch.compile/export (portable ops). Buffers are
    ``weight``, ``bias``, ``running_mean``, ``running_var`` (torchvision's FrozenBatchNorm2d keys).

    Shapes: ``[N, C, H, W] -> [N, C, H, W]``.
    """

    def __init__(self, bn: nn.BatchNorm2d, *, relu: bool) -> None:
        super().__init__()
        if not has_running_stats(bn):
            raise ValueError("cannot freeze a BatchNorm without running statistics (track_running_stats=False)")
        like = bn.running_mean
        self.register_buffer("weight", bn.weight.detach().clone() if bn.weight is not None else torch.ones_like(like))
        self.register_buffer("bias", bn.bias.detach().clone() if bn.bias is not None else torch.zeros_like(like))
        self.register_buffer("running_mean", bn.running_mean.detach().clone())
        self.register_buffer("running_var", bn.running_var.detach().clone())
        self.eps = bn.eps
        self.relu = relu

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, eps={self.eps}, relu={self.relu}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _plain_eager(x) and x.device.type in ("cpu", "cuda"):
            return batch_norm_act(
                x, self.weight, self.bias, self.running_mean, self.running_var,
                training=False, eps=self.eps, relu=self.relu,
            )  # fmt: skip
        y = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return torch.relu(y) if self.relu else y


def _fold_sequential(seq: nn.Sequential) -> None:
    children = list(seq.named_children())
    i = 0
    while i < len(children):
        name, mod = children[i]
        nxt = children[i + 1][1] if i + 1 < len(children) else None
        if isinstance(mod, nn.Conv2d) and isinstance(nxt, nn.BatchNorm2d) and has_running_stats(nxt):
            after = children[i + 2][1] if i + 2 < len(children) else None
            relu = isinstance(after, nn.ReLU) or bool(getattr(nxt, "relu", False))
            setattr(seq, name, FoldedConv2d(mod, nxt, relu=relu))
            setattr(seq, children[i + 1][0], nn.Identity())
            if isinstance(after, nn.ReLU):
                setattr(seq, children[i + 2][0], nn.Identity())
                i += 1
            i += 2
            continue
        i += 1


def _runs_children_in_order(module: nn.Module) -> bool:
    """An ``nn.Sequential`` whose forward calls its children in order, so that replacing a
    ``Conv2d, BatchNorm2d, ReLU`` run by ``FoldedConv2d, Identity, Identity`` keeps its result.

    A subclass with its own forward may address a child by name (the fused DenseNet stem reads
    ``norm0``'s parameters); it is folded only if its class sets ``foldable_runs = True``.
    """
    return isinstance(module, nn.Sequential) and (
        type(module).forward is nn.Sequential.forward or getattr(type(module), "foldable_runs", False)
    )


def fold_modules_(module: nn.Module) -> None:
    """Fold ``module`` and everything under it in place (no copy, no change of mode).

    A module with a ``fold_bn_()`` method folds itself and its children (the blocks and models
    of :mod:`fastblocks.models`); an ``nn.Sequential`` that runs its children in order folds
    its ``Conv2d -> BatchNorm2d [-> ReLU]`` runs; every other module is walked into.
    """
    fold_self = getattr(module, "fold_bn_", None)
    if callable(fold_self):
        fold_self()
        return
    if _runs_children_in_order(module):
        _fold_sequential(module)
    for child in list(module.children()):
        fold_modules_(child)


# ----------------------------------------------------------------------------- fastblocks.models' layouts
def _projection(shortcut: nn.Module | None) -> tuple[nn.Conv2d, nn.Module | None] | None:
    """``(conv, bn or None)`` of a projection shortcut ``Sequential(Conv2d[, BatchNorm2d])``, else ``None``."""
    if not isinstance(shortcut, nn.Sequential) or not 1 <= len(shortcut) <= 2:
        return None
    conv, bn = shortcut[0], shortcut[1] if len(shortcut) == 2 else None
    if type(conv) is not nn.Conv2d or not (bn is None or isinstance(bn, nn.BatchNorm2d)):
        return None
    return conv, bn


def _convs(block: nn.Module) -> list[str]:
    """``conv1``, ``conv2`` [, ``conv3``]: a block's convolutions in forward order."""
    return [name for name in ("conv1", "conv2", "conv3") if name in block._modules]


def _drop_relu(module: nn.Module) -> None:
    if "relu" in module._modules:
        del module._modules["relu"]


@torch.no_grad()
def fold_residual_block_(block: nn.Module) -> bool:
    """Fold a post-activation block (``fold_layout = "residual"``: BasicBlock, Bottleneck) in place.

    Layout: ``conv_i`` followed by ``bn_i`` (i = 1, 2 [, 3]), ``downsample`` (``None``, a
    projection ``Sequential(conv1x1, BN)`` or another shortcut), ``relu``, and the attributes
    ``variant`` and ``residual``. Each ``conv_i`` becomes a :class:`FoldedConv2d` with ``bn_i``
    (and the ReLU after it) inside; the ``bn_i`` and ``relu`` modules are removed. The last one,
    per variant (``s, t``: the last BN's ``x s + t``):

    - ``original``: ``relu(conv_last'(h) + shortcut(x))``, one call (the residual is the
      fused add); a projection shortcut (1x1 conv + BN) becomes one folded conv;
    - ``bn_after_add``: ``relu(s (F + P x) + t) = relu(conv_last'(h) + (s P) x)``: exact, the
      BN after the addition is folded into the last conv *and* the shortcut: the projection's
      weights are scaled by ``s``, an identity shortcut is multiplied by ``s`` (the buffer
      ``shortcut_scale``), then one call;
    - ``relu_before_add``: ``relu(conv_last'(h)) + shortcut(x)``: one call, then the addition
      (a ReLU before the add is not a post-op after it);
    - plain (``residual=False``): ``relu(conv_last'(h))``, one call.

    Returns:
        whether it folded: not when a BatchNorm has no running statistics
        (``track_running_stats=False``, so eval normalizes with batch statistics).
    """
    convs = _convs(block)
    bns = [getattr(block, "bn" + c[4:]) for c in convs]
    projection = _projection(block.downsample)
    if projection and projection[1] is not None:
        bns.append(projection[1])
    if not all(has_running_stats(bn) for bn in bns):
        return False
    # bn_after_add: the last BN's scale s multiplies the shortcut too.
    scale = bn_scale_shift(bns[len(convs) - 1])[0] if block.residual and block.variant == "bn_after_add" else None
    for name in convs:
        setattr(block, name, FoldedConv2d(getattr(block, name), getattr(block, "bn" + name[4:]), relu=True))
        delattr(block, "bn" + name[4:])
    if projection:
        block.downsample = FoldedConv2d(*projection, relu=False)
        if scale is not None:
            block.downsample.scale_output_(scale)
    elif block.downsample is not None:
        fold_modules_(block.downsample)
    if scale is not None and not projection:
        block.register_buffer("shortcut_scale", scale.to(getattr(block, convs[-1]).weight.dtype))
    _drop_relu(block)
    block.folded = True
    return True


def forward_folded_residual(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A block folded by :func:`fold_residual_block_`: ``[N, C_in, H, W] -> [N, C_out, H_out, W_out]``."""
    identity = x if block.downsample is None else block.downsample(x)
    *first, last_name = _convs(block)
    out = x
    for name in first:
        out = getattr(block, name)(out)  # conv + BN + ReLU, one call
    last = getattr(block, last_name)
    if not block.residual:
        return last(out)
    if block.variant == "relu_before_add":
        return last(out) + identity
    scale = getattr(block, "shortcut_scale", None)  # bn_after_add with a parameter-free shortcut
    if scale is not None:
        identity = identity * scale.view(1, -1, 1, 1)
    return last(out, identity)  # relu(conv + BN + residual), one call


@torch.no_grad()
def fold_preact_block_(block: nn.Module) -> bool:
    """Fold a full pre-activation block (``fold_layout = "preact"``) in place, where it is exact.

    Layout: ``bn_i`` (+ ReLU) in front of ``conv_i`` (i = 1, 2 [, 3]), ``downsample`` (``None``,
    a bare projection ``Sequential(conv1x1)`` reading ``relu(bn1(x))``, or another shortcut),
    ``relu`` and the attribute ``residual``. ``conv_i`` -> ``bn_{i+1}`` -> ReLU -> ``conv_{i+1}``:
    ``bn_{i+1}`` (and the ReLU) fold into ``conv_i`` (:class:`FoldedConv2d`, one call). ``bn1``
    cannot be folded: the previous block's addition comes before it and a ReLU after it
    (``relu(x s + t)`` is no affine map of ``relu(x)``), so it stays as an eval-mode fused
    BN-ReLU, :class:`FrozenBatchNorm2d`. The last convolution has no BN after it: it runs with
    the shortcut as a fused add (no ReLU), ``conv_last(h) + shortcut``, one call; a projection
    shortcut becomes a FoldedConv2d too. The ``bn_i`` (i > 1) and ``relu`` modules are removed.

    Returns:
        whether it folded: not when a BatchNorm has no running statistics.
    """
    convs = _convs(block)
    if not all(has_running_stats(getattr(block, f"bn{i + 1}")) for i in range(len(convs))):
        return False
    block.bn1 = FrozenBatchNorm2d(block.bn1, relu=True)
    for i, name in enumerate(convs):
        after = f"bn{i + 2}" if i + 1 < len(convs) else None
        setattr(block, name, FoldedConv2d(getattr(block, name), getattr(block, after) if after else None,
                                          relu=after is not None))  # fmt: skip
        if after:
            delattr(block, after)
    projection = _projection(block.downsample)
    if projection and projection[1] is None:
        block.downsample = FoldedConv2d(projection[0], None, relu=False)
    elif block.downsample is not None:
        fold_modules_(block.downsample)
    _drop_relu(block)
    block.folded = True
    return True


def forward_folded_preact(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A block folded by :func:`fold_preact_block_`: ``[N, C_in, H, W] -> [N, C_out, H_out, W_out]``."""
    act = block.bn1(x)  # FrozenBatchNorm2d: eval BN + ReLU, one pass
    identity = x if block.downsample is None else block.downsample(act)
    *first, last_name = _convs(block)
    out = act
    for name in first:
        out = getattr(block, name)(out)  # conv + next BN + ReLU, one call
    last = getattr(block, last_name)
    return last(out, identity) if block.residual else last(out)  # conv (+ shortcut), one call


@torch.no_grad()
def fold_resnet_(model: nn.Module) -> bool:
    """Fold a ResNet-family network (``fold_layout = "resnet"``) in place: the stem and every block.

    Layout: the stem ``conv1`` + ``bn1`` + ``relu`` (``block_variant="preact"``: ``conv1`` alone,
    and ``bn_final``, the BN-ReLU after the last addition), every other child folded by
    :func:`fold_modules_` (the blocks through their ``fold_bn_()``). The stem becomes one
    :class:`FoldedConv2d` (``bn1`` and ``relu`` are removed); ``bn_final`` (no convolution after
    it) stays as an eval-mode :class:`FrozenBatchNorm2d`.

    Returns:
        whether the stem folded: not when its BatchNorm has no running statistics (the blocks
        are folded anyway).
    """
    preact = model.block_variant == "preact"
    for name, child in list(model.named_children()):
        if name not in ("conv1", "bn1", "bn_final"):
            fold_modules_(child)
    if not has_running_stats(model.bn_final if preact else model.bn1):
        return False
    if preact:
        model.conv1 = FoldedConv2d(model.conv1, None, relu=False)  # the oneDNN path with a packed weight
        model.bn_final = FrozenBatchNorm2d(model.bn_final, relu=True)
    else:
        model.conv1 = FoldedConv2d(model.conv1, model.bn1, relu=True)
        del model.bn1
    _drop_relu(model)
    model.folded = True
    return True


_FOLD_BY_LAYOUT = {"residual": fold_residual_block_, "preact": fold_preact_block_, "resnet": fold_resnet_}


def fold_layout_(module: nn.Module) -> bool:
    """Fold a block or network of :mod:`fastblocks.models` in place by its ``fold_layout``.

    Returns:
        whether it folded now (``False``: already folded, or a BatchNorm without running statistics).
    """
    if getattr(module, "folded", False):
        return False
    return _FOLD_BY_LAYOUT[module.fold_layout](module)


def fold_bn(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """An eval-mode copy of ``model`` with every BatchNorm folded into its convolution.

    Handles modules that know how to fold themselves (a ``fold_bn_()`` method: the blocks and
    models of ``fastblocks.models``) and Conv2d -> BatchNorm2d [-> ReLU] runs inside
    ``nn.Sequential`` (see :func:`fold_modules_`). A BatchNorm without running statistics is left
    as it is. The result is for inference only (its parameters do not require grad); its
    state_dict holds the folded weights (``conv1.weight``/``conv1.bias``, no ``bn1.*``), not
    torchvision's keys: keep the original model for checkpoints.

    Returns:
        the folded model; its outputs equal ``model.eval()``'s within fp32 rounding.
    """
    folded = model if inplace else copy.deepcopy(model)
    folded.eval()
    fold_modules_(folded)
    for p in folded.parameters():
        p.requires_grad_(False)
    return folded
