"""Convolution blocks with BatchNorm-ReLU fused into them.

Models keep their BatchNorm and Conv2d as separate attributes (so the state_dict keys are
torchvision's: ``norm1``/``conv1``, ``bn1``/``conv2``, ...) and call the functional
:func:`bn_relu_conv` on the pair.

Two orders: pre-activation ``conv(relu(bn(x)))`` (:func:`bn_relu_conv`, :class:`BNReLUConv2d`:
the BN-ReLU is the convolution's prologue) and post-activation ``relu(bn(conv(x)))``
(:func:`conv_bn_relu`, :class:`ConvBNReLU2d`: PyTorch's convolution, then the fused
BatchNorm-ReLU op, which keeps only the conv output for backward).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fastblocks.nn.batchnorm import BatchNorm2d as FastBatchNorm2d
from fastblocks.nn.fold import FoldedConv2d
from fastblocks.ops._bn_core import module_step, scale_shift, update_running_stats
from fastblocks.ops._common import acc_dtype
from fastblocks.ops.batchnorm import batch_norm_act, bn_stats, sync_batch_norm_act
from fastblocks.ops.bn_relu_conv import bn_relu_conv2d, bn_relu_conv_with_batch_norm, cpu_whole_layer_available
from fastblocks.ops.bn_relu_conv_bn_add_relu import bn_relu_conv_bn_add_relu2d
from fastblocks.ops.conv2d import conv2d_module


def _autocast_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a convolution runs in here: autocast's when it is on, else x's."""
    device = x.device.type
    if device not in ("cpu", "cuda"):  # autocast state is undefined for meta tensors
        return x.dtype
    if torch.is_autocast_enabled(device) and x.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return torch.get_autocast_dtype(device)
    return x.dtype


def batch_norm_affine(x: torch.Tensor, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-channel ``(scale, shift)`` with ``bn(x) = x * scale + shift``, as ``bn`` would normalize x.

    Training (or no running buffers): batch statistics from ``bn_stats``, the running buffers
    and ``num_batches_tracked`` updated once, exactly as ``nn.BatchNorm2d`` would; differentiable,
    so gradients of scale and shift reach x through the statistics and bn's weight and bias.
    Eval: the running statistics. An empty batch leaves the buffers alone, as ``nn.BatchNorm2d``.

    Args:
        x: ``[N, C, H, W]`` in the dtype the layer computes in.
        bn: a BatchNorm2d over ``C`` channels.

    Returns:
        ``(scale, shift)``, each ``[C]`` float32 (float64 for float64 x).
    """
    use_batch, _, _ = module_step(bn, x.shape)
    cd = acc_dtype(x.dtype)
    if use_batch and x.numel() == 0:
        mean = var = torch.zeros(x.shape[1], dtype=cd, device=x.device)
    elif use_batch:
        mean, var = bn_stats(x)
        if bn.training and bn.track_running_stats:
            update_running_stats(
                bn.running_mean, bn.running_var, mean.detach(), var.detach(), x.numel() // x.shape[1],
                bn.momentum, bn.num_batches_tracked,
            )  # fmt: skip
    else:
        mean, var = bn.running_mean.to(cd), bn.running_var.to(cd)
    scale, shift, _ = scale_shift(mean, var, bn.weight, bn.bias, bn.eps)
    return scale, shift


def bn_relu_conv_bn_add_relu(
    x: torch.Tensor, bn: nn.BatchNorm2d, conv: nn.Conv2d, bn_out: nn.BatchNorm2d, identity: torch.Tensor
) -> torch.Tensor:
    """``relu(bn_out(conv(relu(bn(x)))) + identity)``, the tail of a post-activation bottleneck,
    keeping neither conv's input nor its output for backward (both recomputed from x; see
    :mod:`fastblocks.ops.bn_relu_conv_bn_add_relu`). Running statistics of both BatchNorms
    are updated once, as ``nn.BatchNorm2d`` would.

    A BatchNorm that synchronizes over a process group in training, or a conv with a bias, runs
    as :func:`bn_relu_conv` followed by the fused BN-add-ReLU instead.

    Args:
        x: ``[N, C_in, H, W]`` (NCHW or channels_last).
        bn: BatchNorm2d over ``C_in``; conv: Conv2d ``C_in -> C_out`` with zero padding;
        bn_out: BatchNorm2d over ``C_out``.
        identity: ``[N, C_out, H_out, W_out]``, the shortcut.

    Returns:
        ``[N, C_out, H_out, W_out]``.
    """
    syncing = any(b.training and getattr(b, "process_group", None) is not None for b in (bn, bn_out))
    if syncing or conv.bias is not None or x.dim() != 4:
        y = conv(bn(x)) if bn.training and getattr(bn, "process_group", None) is not None else bn_relu_conv(x, bn, conv)
        return _batch_norm_tail(y, bn_out, True, identity.to(y.dtype))
    if x.shape[1] != bn.num_features:
        raise ValueError(f"input has {x.shape[1]} channels but the BatchNorm expects {bn.num_features}")
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise ValueError("bn_relu_conv_bn_add_relu supports zero padding given as integers")
    dtype = _autocast_dtype(x)
    x = x.to(dtype)
    scale, shift = batch_norm_affine(x, bn)
    use_batch, running_mean, running_var = module_step(bn_out, None)  # the op checks the batch
    return bn_relu_conv_bn_add_relu2d(
        x, scale, shift, conv.weight.to(dtype), identity.to(dtype), bn_out.weight, bn_out.bias,
        running_mean, running_var,
        training=use_batch, momentum=bn_out.momentum, eps=bn_out.eps, num_batches_tracked=bn_out.num_batches_tracked,
        stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
    )  # fmt: skip


def bn_relu_conv(x: torch.Tensor, bn: nn.BatchNorm2d, conv: nn.Conv2d) -> torch.Tensor:
    """``conv(relu(bn(x)))`` without keeping the activation: only x is saved for backward.

    BatchNorm statistics come from ``bn_stats`` (training; running buffers of ``bn`` updated
    once, exactly as ``nn.BatchNorm2d`` would) or from the running buffers (eval); the
    normalization and ReLU are the prologue of :func:`fastblocks.ops.bn_relu_conv.bn_relu_conv2d`,
    which recomputes the activation in backward. On the compiled CPU backend a plain eager call
    is one node with the BatchNorm inside (``bn_relu_conv_with_batch_norm``: same results up to
    rounding, one x-sized pass and one sum of gradients fewer in backward).

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
    if cpu_whole_layer_available(x) and not (bn.training and getattr(bn, "process_group", None) is not None):
        y = _bn_relu_conv_whole(x, bn, conv, dtype)
    else:
        scale, shift = batch_norm_affine(x, bn)
        y = bn_relu_conv2d(
            x, scale, shift, conv.weight.to(dtype),
            stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
        )  # fmt: skip
    if conv.bias is not None:
        y = y + conv.bias.to(dtype).view(1, -1, 1, 1)
    return y


def _bn_relu_conv_whole(x: torch.Tensor, bn: nn.BatchNorm2d, conv: nn.Conv2d, dtype: torch.dtype) -> torch.Tensor:
    """bn_relu_conv as one node on the CPU (see ``bn_relu_conv_with_batch_norm``), with
    :func:`batch_norm_affine`'s BatchNorm rules."""
    use_batch, _, _ = module_step(bn, x.shape)
    update = bn.training and bn.track_running_stats and bn.running_mean is not None
    if use_batch:
        rm, rv = (bn.running_mean, bn.running_var) if update else (None, None)
    else:
        rm, rv = bn.running_mean, bn.running_var
    return bn_relu_conv_with_batch_norm(
        x, bn.weight, bn.bias, rm, rv, conv.weight.to(dtype), training=use_batch, momentum=bn.momentum, eps=bn.eps,
        num_batches_tracked=bn.num_batches_tracked,
        stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
    )  # fmt: skip


class _ConvAndBatchNorm(nn.Module):
    """The constructor of :class:`BNReLUConv2d` and :class:`ConvBNReLU2d`: ``nn.Conv2d``'s
    arguments (``bias`` defaults to False: a BatchNorm is beside it), then ``nn.BatchNorm2d``'s.

    ``_PRE_ACTIVATION``: the BatchNorm normalizes the convolution's input and is registered as
    ``norm`` before ``conv`` (torchvision's DenseNet layers); otherwise it normalizes the output
    and is ``bn``, after ``conv``. The registration order is the state_dict's key order.
    """

    _PRE_ACTIVATION = False

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
        affine: bool = True,
        track_running_stats: bool = True,
    ) -> None:
        super().__init__()
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        bn = nn.BatchNorm2d(
            in_channels if self._PRE_ACTIVATION else out_channels,
            eps=eps, momentum=momentum, affine=affine, track_running_stats=track_running_stats,
        )  # fmt: skip
        if self._PRE_ACTIVATION:
            self.norm, self.conv = bn, conv
        else:
            self.conv, self.bn = conv, bn


class BNReLUConv2d(_ConvAndBatchNorm):
    """Pre-activation ``conv(relu(bn(x)))`` (DenseNet layers, pre-activation ResNets).

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias: as
            ``nn.Conv2d`` (bias defaults to False).
        eps, momentum, affine, track_running_stats: as ``nn.BatchNorm2d`` (over ``in_channels``).

    State dict: ``norm.*`` (a BatchNorm2d's entries) and ``conv.*`` (a Conv2d's).
    Shapes: ``[N, C_in, H, W] -> [N, C_out, H_out, W_out]``.
    """

    _PRE_ACTIVATION = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bn_relu_conv(x, self.norm, self.conv)


# ----------------------------------------------------------------------------- post-activation
def _batch_norm_tail(
    y: torch.Tensor, bn: nn.BatchNorm2d, relu: bool, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """``act(bn(y) [+ residual])`` on the fused BatchNorm op, with ``nn.BatchNorm2d``'s running-stat rules."""
    # The batch is checked before num_batches_tracked moves: a rejected batch leaves the buffers as they were.
    bn_training, running_mean, running_var = module_step(bn, y.shape)
    kwargs = {
        "momentum": bn.momentum, "eps": bn.eps, "relu": relu, "residual": residual,
        "num_batches_tracked": bn.num_batches_tracked,
    }  # fmt: skip
    if isinstance(bn, FastBatchNorm2d) and bn._sync():
        # convert_sync_batchnorm gave this BN a process group: statistics of the global batch.
        return sync_batch_norm_act(
            y, bn.weight, bn.bias, running_mean, running_var, process_group=bn.process_group, **kwargs
        )
    return batch_norm_act(y, bn.weight, bn.bias, running_mean, running_var, training=bn_training, **kwargs)


def conv_bn_relu(x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, *, relu: bool = True) -> torch.Tensor:
    """``relu(bn(conv(x)))`` keeping neither the BatchNorm output nor the ReLU output for backward.

    The convolution is PyTorch's (``conv(x)``: cuDNN/oneDNN; under autocast it runs in the
    autocast dtype, as eager does; traced, it is the registered op ``fastblocks::conv2d``, so a
    compiled graph of fastblocks ops holds no ``aten.convolution`` and Inductor does not re-lay
    their inputs out: :mod:`fastblocks.ops.conv2d`); BatchNorm (+ ReLU) is :func:`fastblocks.ops.batchnorm.batch_norm_act`,
    which rebuilds the ReLU mask from the conv output in backward. ``bn``'s running buffers are
    updated once, as ``nn.BatchNorm2d`` updates them (``num_batches_tracked``, ``momentum=None``,
    eval, ``track_running_stats=False``, ``affine=False``).

    Args:
        x: ``[N, C_in, H, W]`` (NCHW or channels_last).
        conv: a Conv2d ``C_in -> C_out`` (any padding mode, groups, dilation; bias or not).
        bn: a BatchNorm2d over ``C_out`` (``torch.nn`` or fastblocks; a fastblocks one given a
            ``process_group`` synchronizes its statistics in training).
        relu: apply ReLU after the normalization.

    Returns:
        ``[N, C_out, H_out, W_out]`` in the convolution's output dtype (the autocast dtype under
        autocast) and layout (channels_last when x is).

    Raises:
        TypeError: x is not a tensor.
        ValueError: x is not 4-D or has the wrong channel count (naming ``x``), or a training
            batch has one value per channel (nn.BatchNorm2d's message; unlike eager, the
            rejected batch does not count in ``num_batches_tracked``).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"conv_bn_relu expects x to be a 4-D tensor [N, C, H, W], got shape {tuple(x.shape)}")
    if x.shape[1] != conv.in_channels:
        raise ValueError(f"x has {x.shape[1]} channels but the convolution expects in_channels={conv.in_channels}")
    return _batch_norm_tail(conv2d_module(x, conv), bn, relu)  # traced: fastblocks::conv2d (ops/conv2d.py)


class ConvBNReLU2d(_ConvAndBatchNorm):
    """Post-activation ``relu(bn(conv(x)))`` (ResNet stems and blocks, VGG-style layers).

    Memory. Eager ``nn.Sequential(Conv2d, BatchNorm2d, ReLU)`` keeps for backward the conv input
    x, the conv output y (BatchNorm's input) and the ReLU output (in place or not: measured with
    :func:`fastblocks.testing.saved_tensor_bytes`). This module keeps x, y and ``[C_out]`` batch
    statistics: per output element 4 B instead of 8 B in fp32 (2 B instead of 4 B in bf16), plus
    x in both. ``tests/nn/test_conv_bn_relu.py::test_saves_x_y_and_vectors_only`` measures it.

    State dict. ``conv.weight`` (``conv.bias``), ``bn.weight``, ``bn.bias``, ``bn.running_mean``,
    ``bn.running_var``, ``bn.num_batches_tracked``: a Conv2d's and a BatchNorm2d's entries
    under ``conv.``/``bn.``. The same layers as ``nn.Sequential(conv, bn, relu)`` have the keys
    ``0.*`` (conv) and ``1.*`` (bn); map ``0.`` -> ``conv.``, ``1.`` -> ``bn.``, or build one
    around the existing layers with :meth:`from_modules` (no copy).

    Statistics epilogue: not used. The Triton implicit-GEMM convolution of
    :mod:`fastblocks.ops.bn_relu_conv` can produce the per-channel sums a following BatchNorm
    needs, but it is a convolution with a BN-ReLU *prologue* (``conv(relu(x*scale + shift))``);
    here the convolution's input is not normalized, and no plain convolution with a statistics
    epilogue exists yet, so the BatchNorm runs its own statistics pass over y on every backend.
    A conv + statistics-epilogue kernel for this module is GPU work pending (issue #10).

    Inference: :meth:`fold_bn_` (called by :func:`fastblocks.fold_bn`) folds the BatchNorm into
    the convolution (:class:`fastblocks.nn.fold.FoldedConv2d`, one conv + bias + ReLU call).

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias: as
            ``nn.Conv2d`` (bias defaults to False: a BatchNorm follows).
        eps, momentum, affine, track_running_stats: as ``nn.BatchNorm2d``.
        relu: apply ReLU after the BatchNorm (``False``: conv + BN only).

    Shapes: ``[N, C_in, H, W] -> [N, C_out, H_out, W_out]``.
    """

    def __init__(self, *args: Any, relu: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.relu = relu
        self.folded: FoldedConv2d | None = None

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d, *, relu: bool = True) -> ConvBNReLU2d:
        """A ConvBNReLU2d around ``conv`` and ``bn`` themselves (parameters and buffers shared, not copied).

        ``ConvBNReLU2d.from_modules(seq[0], seq[1])`` turns an eager
        ``nn.Sequential(Conv2d, BatchNorm2d, ReLU)`` into the fused module; optimizers holding
        the layers' parameters keep working. The module starts in ``bn``'s training mode.

        Raises:
            TypeError: ``conv`` is not an ``nn.Conv2d`` or ``bn`` not an ``nn.BatchNorm2d``.
            ValueError: ``bn.num_features`` differs from ``conv.out_channels``.
        """
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        if not isinstance(bn, nn.BatchNorm2d):
            raise TypeError(f"bn must be an nn.BatchNorm2d, got {type(bn).__name__}")
        if bn.num_features != conv.out_channels:
            raise ValueError(f"bn has {bn.num_features} features but conv has out_channels={conv.out_channels}")
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.conv, module.bn, module.relu, module.folded = conv, bn, relu, None
        module.train(bn.training)
        return module

    def extra_repr(self) -> str:
        return f"relu={self.relu}" + (", folded" if self.folded is not None else "")

    @torch.no_grad()
    def fold_bn_(self) -> None:
        """Fold the BatchNorm into the convolution, in place, for inference.

        Afterwards ``conv`` and ``bn`` are gone and ``folded`` (a
        :class:`~fastblocks.nn.fold.FoldedConv2d` holding ``W' = W s``, ``b' = (b - μ) s + β``,
        ``s = γ / sqrt(σ² + eps)``) computes ``relu(bn_eval(conv(x)))`` in one call; the
        state_dict becomes ``folded.weight``/``folded.bias``. A BatchNorm without running
        statistics (``track_running_stats=False``) normalizes with batch statistics even in
        eval and cannot be folded: the module is then left as it is. Calling it again is a no-op.
        """
        if self.folded is not None or self.bn.running_mean is None or self.bn.running_var is None:
            return
        self.folded = FoldedConv2d(self.conv, self.bn, relu=self.relu)
        del self.conv, self.bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.folded is not None:
            return self.folded(x)
        return conv_bn_relu(x, self.conv, self.bn, relu=self.relu)
