"""What the accuracy harness runs: input distributions, weights, and the op- and block-level cases.

:data:`DISTRIBUTIONS` (float64 inputs, adversarial ones included), the random weights of a trial
and :func:`condition` (model weights that keep ReLU decisions away from 0), then the eager twins
of the fused ops and :data:`CASES` (each op and block, the shapes and data it is tried on).
An elementwise op declares its case in its own module (:mod:`fastblocks.ops._declarations`);
blocks and convolutions have theirs here. Re-exported by :mod:`fastblocks.testing.accuracy`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

# ----------------------------------------------------------------------------- data


#: Input distributions. Each is a function ``(shape, generator) -> float64 tensor``.
def _normal(shape: Sequence[int], g: torch.Generator) -> Tensor:
    return torch.randn(shape, generator=g, dtype=torch.float64)


def _shifted(shape: Sequence[int], g: torch.Generator) -> Tensor:
    # Mean 6, std 0.5 (mean^2 / var = 144): a plain sum of squares loses 2 digits here.
    return 6.0 + 0.5 * _normal(shape, g)


def _post_relu(shape: Sequence[int], g: torch.Generator) -> Tensor:
    return _normal(shape, g).clamp_min(0.0)  # about half exact zeros


def _sparse(shape: Sequence[int], g: torch.Generator) -> Tensor:
    return _normal(shape, g) * (torch.rand(shape, generator=g, dtype=torch.float64) < 0.1)


def _ties(shape: Sequence[int], g: torch.Generator) -> Tensor:
    """Values in {-1, 0, 1}, each channel's sum exactly 0, and every other channel constant 0.

    Each channel's mean is exactly 0 in any summation order, so with ``beta = 0`` BatchNorm's output
    is exactly 0 wherever x is 0 (a ReLU decision at exactly 0 in every implementation), and the
    constant channels have variance 0 (the normalization divides by ``sqrt(eps)``).
    """
    n, c = shape[0], shape[1]
    per = n * int(torch.tensor(shape[2:]).prod()) if len(shape) > 2 else n
    x = torch.zeros(c, per, dtype=torch.float64)
    half = per // 2
    if half:
        v = torch.randint(-1, 2, (c, half), generator=g).double()
        x[:, :half], x[:, half : 2 * half] = v, -v
        x = x[:, torch.randperm(per, generator=g)]
    x[1::2] = 0.0
    return x.view(c, n, *shape[2:]).transpose(0, 1).contiguous()


DISTRIBUTIONS: dict[str, Callable[[Sequence[int], torch.Generator], Tensor]] = {
    "normal": _normal,
    "shifted": _shifted,
    "post_relu": _post_relu,
    "sparse": _sparse,
    "ties": _ties,
}


def _randomize_params(module: nn.Module, g: torch.Generator, data: str) -> None:
    """Weights as trained networks have them: BatchNorm gamma in [0.5, 1.5], beta ~ N(0, 0.5)
    (``beta = 0`` for the "ties" data, so BN outputs sit exactly at 0), convolutions Kaiming-like."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                if m.affine:
                    m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g, dtype=torch.float64))
                    beta = 0.5 * torch.randn(m.bias.shape, generator=g, dtype=torch.float64)
                    m.bias.copy_(beta * (data != "ties"))
                if m.track_running_stats:
                    m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g, dtype=torch.float64))
                    m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g, dtype=torch.float64))
            elif isinstance(m, nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g, dtype=torch.float64) * (2.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g, dtype=torch.float64))


def condition(model: nn.Module, seed: int = 0) -> None:
    """Set every BatchNorm's affine parameters so that no pre-activation lies near 0 (in place).

    A BatchNorm followed by a ReLU gets gamma 0.3 and beta +-1 per channel (channels mostly active
    or mostly dead: masks are exercised, but ``|0.3 z +- 1| < 1e-5`` needs ``|z| ~ 3.3``); the last
    BatchNorm of a residual branch and a projection shortcut's get gamma 0.2, beta 0.5 (damped
    branches). Same effect on the eager twin and the fused model: apply it before making the twin.
    """
    g = torch.Generator().manual_seed(seed)
    damped: set[str] = set()
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        if getattr(m, "variant", None) in ("original", "bn_after_add", "relu_before_add") and hasattr(m, "_last_bn"):
            damped.add(prefix + m._last_bn)
        if name.endswith("downsample") and isinstance(m, nn.Sequential) and len(m) > 1:
            damped.add(prefix + "1")
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, nn.BatchNorm2d) and m.affine:
                if name in damped:
                    m.weight.fill_(0.2)
                    m.bias.fill_(0.5)
                else:
                    m.weight.fill_(0.3)
                    m.bias.copy_(torch.randint(0, 2, m.bias.shape, generator=g).to(m.bias.dtype) * 2 - 1)


# ----------------------------------------------------------------------------- cases
class _BNAct(nn.Module):
    """Eager ``act(bn(x) [+ residual])``: the twin of the fastblocks BatchNorm modules."""

    def __init__(self, channels: int, relu: bool) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.relu = relu

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        y = self.bn(x)
        if residual is not None:
            y = y + residual
        return torch.relu(y) if self.relu else y


class _FusedBNAct(_BNAct):
    def __init__(self, eager: _BNAct, residual: bool) -> None:
        from fastblocks.nn import batchnorm as fbn

        super().__init__(eager.bn.num_features, eager.relu)
        cls = fbn.BNAddReLU if residual and eager.relu else fbn.BatchNormReLU2d if eager.relu else fbn.BatchNorm2d
        self.bn = cls(eager.bn.num_features)
        self.load_state_dict(eager.state_dict())

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        if residual is None:
            return self.bn(x)
        return self.bn(x, residual) if self.relu else self.bn(x) + residual


class _Function(nn.Module):
    """A parameter-free op as a module: the eager twin and the fused side of a declared op's case."""

    def __init__(self, fn: Callable[..., Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *inputs: Tensor) -> Tensor:
        return self.fn(*inputs)


class _PreAct(nn.Module):
    """Eager ``conv(relu(norm(x)))`` with :class:`fastblocks.nn.BNReLUConv2d`'s keys."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(c_in)
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(torch.relu(self.norm(x)))


class _PostAct(nn.Module):
    """Eager ``relu(bn(conv(x)))`` with :class:`fastblocks.nn.ConvBNReLU2d`'s keys."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.bn(self.conv(x)))


def _fused_preact(eager: _PreAct) -> nn.Module:
    from fastblocks.nn import BNReLUConv2d

    c = eager.conv
    m = BNReLUConv2d(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding)
    m.load_state_dict(eager.state_dict())
    return m


def _fused_postact(eager: _PostAct) -> nn.Module:
    from fastblocks.nn import ConvBNReLU2d

    c = eager.conv
    m = ConvBNReLU2d(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding)
    m.load_state_dict(eager.state_dict())
    return m


def _convert(eager: nn.Module) -> nn.Module:
    from fastblocks.models.convert import convert

    return convert(eager, inplace=True)


def _fused_class(cls_name: str) -> Callable[[nn.Module], nn.Module]:
    def fuse(eager: nn.Module) -> nn.Module:
        from fastblocks.models import densenet

        eager.__class__ = getattr(densenet, cls_name)
        return eager

    return fuse


#: ``make(shape, generator, data) -> (eager module, fuse, float64 inputs)``
Maker = Callable[
    [tuple[int, ...], torch.Generator, str], tuple[nn.Module, Callable[[nn.Module], nn.Module], list[Tensor]]
]


@dataclasses.dataclass(frozen=True)
class Case:
    """One fused op or block and the shapes it is tried on.

    Attributes:
        name: e.g. ``"bn_add_relu"``.
        make: builds the eager module (random weights), the fuse function and the inputs of a trial.
        shapes: input shapes ``(N, C, H, W)`` tried (tiny spatial sizes, N = 1 and 2, odd C).
        data: the input distributions tried (keys of :data:`DISTRIBUTIONS`).
        steps: training steps per trial.
    """

    name: str
    make: Maker
    shapes: tuple[tuple[int, ...], ...]
    data: tuple[str, ...] = tuple(DISTRIBUTIONS)
    steps: int = 1


def _bn_case(relu: bool, residual: bool) -> Maker:
    def make(shape, g, data):
        eager = _BNAct(shape[1], relu)
        _randomize_params(eager, g, data)
        xs = [DISTRIBUTIONS[data](shape, g)]
        if residual:
            xs.append(_normal(shape, g) * 0.5)
        return eager, lambda m: _FusedBNAct(m, residual), xs

    return make


def _declared_case(name: str) -> Maker:
    """The case of an op that declares its accuracy inputs (:mod:`fastblocks.ops._declarations`)."""

    def make(shape, g, data):
        from fastblocks.ops._declarations import declared

        decl = declared()[name].accuracy
        xs = decl.inputs(DISTRIBUTIONS[data](shape, g), g)
        return _Function(decl.reference), lambda m: _Function(decl.fused), xs

    return make


def _declared_cases() -> list[Case]:
    from fastblocks.ops._declarations import declared

    return [Case(name, _declared_case(name), _TINY) for name, d in declared().items() if d.accuracy is not None]


def _conv_case(pre: bool, kernel: int, stride: int) -> Maker:
    def make(shape, g, data):
        c_out = max(3, shape[1] + 3)
        eager = (_PreAct if pre else _PostAct)(shape[1], c_out, kernel, stride)
        _randomize_params(eager, g, data)
        return eager, _fused_preact if pre else _fused_postact, [DISTRIBUTIONS[data](shape, g)]

    return make


def _block_case(kind: str) -> Maker:
    def make(shape, g, data):
        from fastblocks.models import densenet, resnet

        c = shape[1]
        fuse: Callable[[nn.Module], nn.Module] = _convert
        if kind == "basic":
            eager = resnet.BasicBlock(c, c)
        elif kind == "basic_down":
            down = nn.Sequential(nn.Conv2d(c, 2 * c, 1, 2, bias=False), nn.BatchNorm2d(2 * c))
            eager = resnet.BasicBlock(c, 2 * c, 2, down)
        elif kind in ("bottleneck", "bottleneck_tail"):
            down = nn.Sequential(nn.Conv2d(c, 8, 1, 2, bias=False), nn.BatchNorm2d(8))
            eager = resnet.Bottleneck(c, 2, 2, down)
            eager.recompute_tail = kind == "bottleneck_tail"
        elif kind == "preact":
            eager = resnet.PreActBasicBlock(c, c)
        elif kind == "dense_block":
            eager = densenet._DenseBlock(3, c, bn_size=2, growth_rate=3, drop_rate=0.0)
            fuse = _fused_class("_FusedDenseBlock")
        elif kind == "transition":
            eager = densenet._Transition(c, max(1, c // 2))
            fuse = _fused_class("_FusedTransition")
        else:
            raise ValueError(f"unknown block {kind!r}")
        _randomize_params(eager, g, data)
        return eager, fuse, [DISTRIBUTIONS[data](shape, g)]

    return make


_TINY = ((4, 5, 1, 1), (1, 3, 3, 3), (2, 6, 2, 2), (3, 7, 5, 4))  # >= 4 values per channel
_CONV = ((1, 4, 3, 3), (2, 5, 4, 4), (2, 16, 5, 5))
_BLOCK = ((2, 8, 6, 6), (1, 8, 8, 8))  # every BatchNorm of a block sees >= 16 values per channel
# Blocks take no "ties" data: a convolution of it gives BatchNorm inputs whose exact mean is 0 with
# values exactly at it. Eager CPU PyTorch sums them in double (mean exactly 0: BN output exactly
# 0, ReLU off); fp32 sums (the fused kernels, the reference backend, every GPU BatchNorm) give a
# mean of ~1e-8, which turns those ReLUs on (a Bottleneck's dx then differs by 14%). Measured in
# tests/accuracy; the single ops take "ties" directly, where the sums are exact in fp32.
_BLOCK_DATA = tuple(d for d in DISTRIBUTIONS if d != "ties")

#: The op- and block-level cases (small shapes: they also run in the Triton interpreter).
CASES: dict[str, Case] = {
    c.name: c
    for c in (
        Case("batch_norm", _bn_case(relu=False, residual=False), _TINY),
        Case("batch_norm_relu", _bn_case(relu=True, residual=False), _TINY),
        Case("bn_add_relu", _bn_case(relu=True, residual=True), _TINY),
        *_declared_cases(),  # the ops that declare their case, e.g. add_relu
        Case("bn_relu_conv1x1", _conv_case(True, 1, 1), _CONV),
        Case("bn_relu_conv3x3", _conv_case(True, 3, 1), _CONV),
        Case("bn_relu_conv3x3_s2", _conv_case(True, 3, 2), _CONV),
        Case("conv_bn_relu3x3", _conv_case(False, 3, 1), _CONV),
        Case("basic_block", _block_case("basic"), _BLOCK, _BLOCK_DATA, steps=2),
        Case("basic_block_down", _block_case("basic_down"), _BLOCK, _BLOCK_DATA, steps=2),
        Case("bottleneck", _block_case("bottleneck"), _BLOCK, _BLOCK_DATA, steps=2),
        Case("bottleneck_tail", _block_case("bottleneck_tail"), _BLOCK, _BLOCK_DATA, steps=2),
        Case("preact_block", _block_case("preact"), _BLOCK, _BLOCK_DATA, steps=2),
        Case("dense_block", _block_case("dense_block"), _BLOCK, _BLOCK_DATA, steps=2),
        Case("transition", _block_case("transition"), _BLOCK, _BLOCK_DATA, steps=2),
    )
}
