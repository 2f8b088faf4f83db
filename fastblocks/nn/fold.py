"""Inference folding: BatchNorm folded into the preceding convolution, conv + bias (+ residual)
(+ ReLU) run as one call where the backend has it.

For an eval-mode BatchNorm with running statistics (μ, σ²), affine (γ, β) after a convolution
with weight W and bias b:  BN(W * x + b) = W' * x + b'  with  s = γ / sqrt(σ² + eps),
W' = W · s (per output channel),  b' = (b - μ) · s + β.

One-call fused paths (otherwise conv2d, then add, then ReLU):
- CUDA: cuDNN's ``torch.cudnn_convolution_relu`` / ``torch.cudnn_convolution_add_relu``;
- CPU: oneDNN's fused post-ops ``torch.ops.mkldnn._convolution_pointwise`` (unary ReLU) and its
  ``.binary`` overload (``add`` then ReLU), the kernels torch.compile's CPU backend uses.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F


def fold_conv_bn_weights(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(W', b') of ``bn(conv(x))`` folded into one convolution (bn must have running statistics).

    Returns:
        ``W'`` with ``conv.weight``'s shape ``[C_out, C_in/groups, kh, kw]`` and ``b'`` ``[C_out]``.
    """
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("cannot fold a BatchNorm without running statistics (track_running_stats=False)")
    if bn.num_features != conv.out_channels:
        raise ValueError(f"BatchNorm has {bn.num_features} features but the conv has {conv.out_channels} outputs")
    with torch.no_grad():
        invstd = torch.rsqrt(bn.running_var.double() + bn.eps)
        gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(invstd)
        beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(invstd)
        s = gamma * invstd
        w = conv.weight.double() * s.view(-1, 1, 1, 1)
        b0 = conv.bias.double() if conv.bias is not None else torch.zeros_like(s)
        b = (b0 - bn.running_mean.double()) * s + beta
    return w.to(conv.weight.dtype), b.to(conv.weight.dtype)


class FoldedConv2d(nn.Module):
    """``act(conv(x, W', b') [+ residual])`` for inference, in one backend call where possible.

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
        self.bias = nn.Parameter(bias.to(weight.device), requires_grad=False)
        self.stride, self.padding = list(conv.stride), list(conv.padding)
        self.dilation, self.groups = list(conv.dilation), conv.groups
        self.relu = relu

    def extra_repr(self) -> str:
        w = self.weight.shape
        return (
            f"{w[1] * self.groups}, {w[0]}, kernel_size={tuple(w[2:])}, stride={tuple(self.stride)}, relu={self.relu}"
        )

    def _onednn_ok(self, x: torch.Tensor) -> bool:
        return (
            x.device.type == "cpu"
            and x.dtype == torch.float32
            and x.dim() == 4
            and torch.backends.mkldnn.is_available()
            and torch.backends.mkldnn.enabled
            and not torch.jit.is_scripting()
        )

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        w, b = self.weight, self.bias
        args = (self.padding, self.stride, self.dilation, self.groups)
        if self.relu and self._onednn_ok(x) and (residual is None or residual.dtype == x.dtype):
            if residual is None:
                return torch.ops.mkldnn._convolution_pointwise(x, w, b, *args, "relu", [], "")
            return torch.ops.mkldnn._convolution_pointwise.binary(x, residual, w, b, *args, "add", None, "relu", [], "")
        if self.relu and x.is_cuda and torch.backends.cudnn.enabled and x.dtype == w.dtype:
            conv_args = (self.stride, self.padding, self.dilation, self.groups)
            if residual is None:
                return torch.cudnn_convolution_relu(x, w, b, *conv_args)
            return torch.cudnn_convolution_add_relu(x, w, residual, 1.0, b, *conv_args)
        y = F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)
        if residual is not None:
            y = y + residual
        return torch.relu(y) if self.relu else y


def _fold_sequential(seq: nn.Sequential) -> None:
    children = list(seq.named_children())
    i = 0
    while i < len(children):
        name, mod = children[i]
        nxt = children[i + 1][1] if i + 1 < len(children) else None
        if isinstance(mod, nn.Conv2d) and isinstance(nxt, nn.BatchNorm2d) and nxt.running_mean is not None:
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


def fold_bn(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """An eval-mode copy of ``model`` with every BatchNorm folded into its convolution.

    Handles modules that know how to fold themselves (a ``fold_bn_()`` method: the blocks of
    ``fastblocks.models``) and Conv2d -> BatchNorm2d [-> ReLU] runs inside ``nn.Sequential``.
    The result is for inference only (its parameters do not require grad).

    Returns:
        the folded model; its outputs equal ``model.eval()``'s within fp32 rounding.
    """
    folded = model if inplace else copy.deepcopy(model)
    folded.eval()
    for module in list(folded.modules()):
        fold_self = getattr(module, "fold_bn_", None)
        if callable(fold_self) and module is not folded:
            fold_self()
        elif isinstance(module, nn.Sequential):
            _fold_sequential(module)
    if callable(getattr(folded, "fold_bn_", None)):
        folded.fold_bn_()
    for p in folded.parameters():
        p.requires_grad_(False)
    return folded
