"""Parameters and multiply-adds per stage, two ways: from the papers' formulas and from the module.

``fastblocks summary MODEL`` prints the table of He et al. 2016 (Table 1, "layer name / output
size / 18-layer ... / FLOPs") or Huang et al. 2017 (Table 1, "Layers / Output Size / DenseNet-121
...") for one model, with two counts side by side:

- **analytic**: from the architecture's config row (:data:`ARCHITECTURES`) and closed-form
  formulas, written out below -- a convolution with a ``k x k`` kernel, ``C_in`` inputs,
  ``C_out`` outputs and ``groups`` groups has ``k*k*C_in/groups*C_out`` weights and does that
  many multiply-adds at each of its ``H_out*W_out`` output pixels; a BatchNorm over ``C``
  channels has ``2*C`` parameters (gamma, beta); a Linear ``C -> K`` has ``C*K + K`` parameters
  and ``C*K`` multiply-adds.
- **counted**: from the model that :func:`fastblocks.models.registry.get_model` builds, on the
  meta device (no memory is allocated): parameters are ``sum(p.numel())``; multiply-adds come
  from forward hooks on every ``nn.Conv2d``/``nn.Linear`` during one forward pass of a
  ``[1, 3, S, S]`` input. The MACs are counted on the eager twin (``fused=False``): the fused
  blocks call their convolutions through fused ops, not through the ``nn.Conv2d`` modules, so
  hooks would not see them; the fused model's parameters are counted too and must be equal.

The two must agree; the table flags every stage where they do not.

What is counted: multiply-adds (one MAC = one multiply and one add) of Conv2d and Linear only --
the quantity of the papers' "FLOPs" row and of torchvision's ``conv_linear_macs_224``. Bias
additions, BatchNorm, ReLU, pooling, residual additions and concatenations are *not* included;
the elementwise work of BatchNorm/ReLU/pooling modules is reported apart (``other_ops``).

**v1 vs v1.5.** He et al.'s Table 1 says 3.8, 7.6 and 11.3 x10^9 FLOPs (multiply-adds) for
ResNet-50/101/152. torchvision's ResNets (and ours by default) are "v1.5": a downsampling
bottleneck puts its stride 2 on the 3x3 conv instead of on the first 1x1 (better accuracy, more
work, since the first 1x1 and the 3x3 then run at the higher resolution). That gives
4.09/7.80/11.51 GMACs (torchvision's numbers); ``stride_on_1x1=True`` (paper v1) gives
3.86/7.57/11.28 -- the paper's 3.8/7.6/11.3. ResNet-18/34 have no bottleneck: 1.81/3.66 either
way (paper: 1.8/3.6). The paper's one decimal is within 0.07 GMAC of the exact count but is not
a consistent rounding: 3.66 and 3.86 are truncated, 7.57 and 11.28 rounded. Parameters do not
depend on the stride placement.

Command: ``fastblocks summary resnet50 [--stride-on-1x1] [--json | --markdown]``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from fastblocks.models import registry
from fastblocks.profile._meta import MetaInit

__all__ = [
    "ARCHITECTURES",
    "DenseNetArch",
    "ModelSummary",
    "ResNetArch",
    "StageCount",
    "analytic_counts",
    "count_module",
    "default_input_size",
    "format_table",
    "summarize",
]


# ----------------------------------------------------------------------------------------------
# Config rows (the papers' tables)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResNetArch:
    """One row of a ResNet config table.

    Attributes:
        block: ``"basic"`` (two 3x3 convs) or ``"bottleneck"`` (1x1, 3x3, 1x1 with 4x expansion).
        layers: blocks per stage.
        widths: ``planes`` per stage (the 3x3 conv width before ``groups``/``width_per_group``).
        groups, width_per_group: ResNeXt/Wide ResNet: the bottleneck width is
            ``int(planes * width_per_group / 64) * groups``.
        stem: ``"imagenet"`` (7x7/2 conv, BN, ReLU, 3x3/2 max pool) or ``"cifar"`` (3x3 conv, BN).
        shortcut: ``"projection"`` (1x1 conv + BN where the shape changes: option B),
            ``"zero_pad"`` (identity, subsampled and zero-padded: option A, no parameters),
            ``"none"`` (plain networks).
        num_classes: outputs of the final Linear.
    """

    block: Literal["basic", "bottleneck"]
    layers: tuple[int, ...]
    widths: tuple[int, ...] = (64, 128, 256, 512)
    groups: int = 1
    width_per_group: int = 64
    stem: Literal["imagenet", "cifar"] = "imagenet"
    shortcut: Literal["projection", "zero_pad", "none"] = "projection"
    num_classes: int = 1000

    @property
    def expansion(self) -> int:
        return 4 if self.block == "bottleneck" else 1


@dataclass(frozen=True)
class DenseNetArch:
    """One row of a DenseNet-BC config table (Huang et al. 2017, Table 1 / Sec. 4.1).

    Attributes:
        growth_rate: ``k``.
        block_config: layers per dense block.
        num_init_features: stem channels (ImageNet: 2k, 96 for DenseNet-161; CIFAR: 2k).
        bn_size: bottleneck factor (the 1x1 conv has ``bn_size * k`` outputs).
        compression: transition output channels = ``floor(compression * C)``.
        stem: ``"imagenet"`` (7x7/2 conv, BN, ReLU, 3x3/2 max pool) or ``"cifar"`` (3x3 conv only).
        num_classes: outputs of the classifier.
    """

    growth_rate: int
    block_config: tuple[int, ...]
    num_init_features: int
    bn_size: int = 4
    compression: float = 0.5
    stem: Literal["imagenet", "cifar"] = "imagenet"
    num_classes: int = 1000


_B, _BN = "basic", "bottleneck"
_CIFAR = {"widths": (16, 32, 64), "stem": "cifar", "shortcut": "zero_pad", "num_classes": 10}

#: Config row of every model name the registry knows (the analytic count's input).
ARCHITECTURES: dict[str, ResNetArch | DenseNetArch] = {
    # He et al. 2016, Table 1.
    "resnet18": ResNetArch(_B, (2, 2, 2, 2)),
    "resnet34": ResNetArch(_B, (3, 4, 6, 3)),
    "resnet50": ResNetArch(_BN, (3, 4, 6, 3)),
    "resnet101": ResNetArch(_BN, (3, 4, 23, 3)),
    "resnet152": ResNetArch(_BN, (3, 8, 36, 3)),
    # Xie et al. 2017 (ResNeXt), Zagoruyko & Komodakis 2016 (wide), torchvision's rows.
    "resnext50_32x4d": ResNetArch(_BN, (3, 4, 6, 3), groups=32, width_per_group=4),
    "resnext101_32x8d": ResNetArch(_BN, (3, 4, 23, 3), groups=32, width_per_group=8),
    "resnext101_64x4d": ResNetArch(_BN, (3, 4, 23, 3), groups=64, width_per_group=4),
    "wide_resnet50_2": ResNetArch(_BN, (3, 4, 6, 3), width_per_group=128),
    "wide_resnet101_2": ResNetArch(_BN, (3, 4, 23, 3), width_per_group=128),
    # He et al. 2016, Fig. 3 / Table 2: the same networks without shortcuts.
    "plain18": ResNetArch(_B, (2, 2, 2, 2), shortcut="none"),
    "plain34": ResNetArch(_B, (3, 4, 6, 3), shortcut="none"),
    # He et al. 2016, Sec. 4.2: 6n+2 layers, option A shortcuts.
    "resnet20": ResNetArch(_B, (3, 3, 3), **_CIFAR),
    "resnet32": ResNetArch(_B, (5, 5, 5), **_CIFAR),
    "resnet44": ResNetArch(_B, (7, 7, 7), **_CIFAR),
    "resnet56": ResNetArch(_B, (9, 9, 9), **_CIFAR),
    "resnet110": ResNetArch(_B, (18, 18, 18), **_CIFAR),
    "plain20": ResNetArch(_B, (3, 3, 3), **{**_CIFAR, "shortcut": "none"}),
    "plain56": ResNetArch(_B, (9, 9, 9), **{**_CIFAR, "shortcut": "none"}),
    # Huang et al. 2017, Table 1 (ImageNet) and Sec. 4.1 (CIFAR DenseNet-BC, (L-4)/6 layers/block).
    "densenet121": DenseNetArch(32, (6, 12, 24, 16), 64),
    "densenet169": DenseNetArch(32, (6, 12, 32, 32), 64),
    "densenet201": DenseNetArch(32, (6, 12, 48, 32), 64),
    "densenet161": DenseNetArch(48, (6, 12, 36, 24), 96),
    "densenet264": DenseNetArch(32, (6, 12, 64, 48), 64),
    "densenet_bc_100_12": DenseNetArch(12, (16, 16, 16), 24, stem="cifar", num_classes=10),
    "densenet_bc_250_24": DenseNetArch(24, (41, 41, 41), 48, stem="cifar", num_classes=10),
}

#: Builder keyword arguments that change the architecture, mirrored into the config row.
_ARCH_KWARGS = {"num_classes", "groups", "width_per_group", "growth_rate", "bn_size"}


def default_input_size(name: str) -> int:
    """224 for ImageNet models, 32 for CIFAR ones (``resnet20``..``resnet110``, ``densenet_bc_*``)."""
    arch = ARCHITECTURES.get(name)
    return 32 if arch is not None and arch.stem == "cifar" else 224


# ----------------------------------------------------------------------------------------------
# Analytic count
# ----------------------------------------------------------------------------------------------


@dataclass
class StageCount:
    """One row of the table: a stage's parameters and multiply-adds.

    ``height``, ``width``, ``channels``: the stage's output ``[C, H, W]``.
    """

    name: str
    height: int
    width: int
    config: str = ""
    channels: int = 0
    params: int = 0
    macs: int = 0

    @property
    def output_size(self) -> str:
        return f"{self.height}×{self.width}"


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _conv(cin: int, cout: int, k: int, h_out: int, w_out: int, groups: int = 1) -> tuple[int, int]:
    """``(params, MACs)`` of a bias-free conv: ``k*k*cin/groups*cout`` weights, used at every output pixel."""
    weights = k * k * (cin // groups) * cout
    return weights, weights * h_out * w_out


def _bn(c: int) -> int:
    return 2 * c  # gamma, beta (running statistics are buffers, not parameters)


def _resnet_counts(arch: ResNetArch, size: int, stride_on_1x1: bool) -> list[StageCount]:
    """Rows ``conv1, conv2_x, ..., fc`` of He et al.'s Table 1 for ``arch`` at ``size x size``."""
    rows: list[StageCount] = []
    h = w = size
    if arch.stem == "imagenet":
        h, w = _conv_out(h, 7, 2, 3), _conv_out(w, 7, 2, 3)
        p, m = _conv(3, 64, 7, h, w)
        rows.append(StageCount("conv1", h, w, "7×7, 64, stride 2", 64, p + _bn(64), m))
        h, w = _conv_out(h, 3, 2, 1), _conv_out(w, 3, 2, 1)  # max pool, counted in conv2_x's row
        cin = 64
    else:
        stem = arch.widths[0]
        p, m = _conv(3, stem, 3, h, w)
        rows.append(StageCount("conv1", h, w, f"3×3, {stem}", stem, p + _bn(stem), m))
        cin = stem

    for i, (planes, blocks) in enumerate(zip(arch.widths, arch.layers)):
        stride = 1 if i == 0 else 2
        params = macs = 0
        for j in range(blocks):
            s = stride if j == 0 else 1
            ho, wo = _conv_out(h, 3, s, 1), _conv_out(w, 3, s, 1)
            if arch.block == "bottleneck":
                width = int(planes * (arch.width_per_group / 64.0)) * arch.groups
                cout = planes * 4
                # v1 (paper): the stride is on the first 1x1, so it runs at the output resolution;
                # v1.5 (torchvision): on the 3x3, the first 1x1 runs at the input resolution.
                h1, w1 = (ho, wo) if stride_on_1x1 else (h, w)
                for cp, cm in (
                    _conv(cin, width, 1, h1, w1),
                    _conv(width, width, 3, ho, wo, arch.groups),
                    _conv(width, cout, 1, ho, wo),
                ):
                    params, macs = params + cp, macs + cm
                params += _bn(width) + _bn(width) + _bn(cout)
            else:
                cout = planes
                for cp, cm in (_conv(cin, cout, 3, ho, wo), _conv(cout, cout, 3, ho, wo)):
                    params, macs = params + cp, macs + cm
                params += 2 * _bn(cout)
            if arch.shortcut == "projection" and (s != 1 or cin != cout):
                cp, cm = _conv(cin, cout, 1, ho, wo)
                params, macs = params + cp + _bn(cout), macs + cm
            cin, h, w = cout, ho, wo
        rows.append(StageCount(f"conv{i + 2}_x", h, w, _resnet_stage_config(arch, i), cin, params, macs))

    k = arch.num_classes
    rows.append(StageCount("fc", 1, 1, f"average pool, {k}-d fc, softmax", k, cin * k + k, cin * k))
    return rows


def _resnet_stage_config(arch: ResNetArch, i: int) -> str:
    planes, blocks = arch.widths[i], arch.layers[i]
    if arch.block == "bottleneck":
        width = int(planes * (arch.width_per_group / 64.0)) * arch.groups
        grouped = f", C={arch.groups}" if arch.groups > 1 else ""
        body = f"[1×1, {width}; 3×3, {width}{grouped}; 1×1, {planes * 4}]"
    else:
        body = f"[3×3, {planes}; 3×3, {planes}]"
    pool = "3×3 max pool, stride 2; " if i == 0 and arch.stem == "imagenet" else ""
    return f"{pool}{body} ×{blocks}"


def _densenet_counts(arch: DenseNetArch, size: int) -> list[StageCount]:
    """Rows of Huang et al.'s Table 1: stem, dense blocks, transitions, classification layer."""
    rows: list[StageCount] = []
    k, c0 = arch.growth_rate, arch.num_init_features
    h = w = size
    if arch.stem == "imagenet":
        h, w = _conv_out(h, 7, 2, 3), _conv_out(w, 7, 2, 3)
        p, m = _conv(3, c0, 7, h, w)
        rows.append(StageCount("Convolution", h, w, f"7×7 conv, stride 2 ({c0})", c0, p + _bn(c0), m))
        h, w = _conv_out(h, 3, 2, 1), _conv_out(w, 3, 2, 1)
        rows.append(StageCount("Pooling", h, w, "3×3 max pool, stride 2", c0, 0, 0))
    else:
        p, m = _conv(3, c0, 3, h, w)  # Huang et al. Sec. 3: one 3x3 conv, no BN before block 1
        rows.append(StageCount("Convolution", h, w, f"3×3 conv ({c0})", c0, p, m))
    c = c0
    inner = arch.bn_size * k
    for i, layers in enumerate(arch.block_config):
        params = macs = 0
        for _ in range(layers):
            # norm1(c) -> conv1 1x1 c -> bn_size*k -> norm2 -> conv2 3x3 bn_size*k -> k
            p1, m1 = _conv(c, inner, 1, h, w)
            p2, m2 = _conv(inner, k, 3, h, w)
            params += _bn(c) + p1 + _bn(inner) + p2
            macs += m1 + m2
            c += k
        rows.append(StageCount(f"Dense Block ({i + 1})", h, w, f"[1×1 conv; 3×3 conv] ×{layers}", c, params, macs))
        if i != len(arch.block_config) - 1:
            cout = math.floor(c * arch.compression)
            p, m = _conv(c, cout, 1, h, w)  # the 1x1 conv runs before the 2x2 average pool
            h, w = h // 2, w // 2
            rows.append(
                StageCount(
                    f"Transition Layer ({i + 1})", h, w, "1×1 conv; 2×2 average pool, stride 2", cout, _bn(c) + p, m
                )
            )
            c = cout
    n = arch.num_classes
    rows.append(
        StageCount(
            "Classification Layer", 1, 1, f"global average pool, {n}D fully-connected", n, _bn(c) + c * n + n, c * n
        )
    )
    return rows


def analytic_counts(
    arch: ResNetArch | DenseNetArch, input_size: int, *, stride_on_1x1: bool = False
) -> list[StageCount]:
    """Per-stage parameters and MACs of ``arch`` for a ``[1, 3, input_size, input_size]`` input.

    ``stride_on_1x1`` (paper v1 bottlenecks) only matters for bottleneck ResNets.
    """
    if isinstance(arch, DenseNetArch):
        return _densenet_counts(arch, input_size)
    return _resnet_counts(arch, input_size, stride_on_1x1)


# ----------------------------------------------------------------------------------------------
# Counted (hooks, meta device)
# ----------------------------------------------------------------------------------------------


def _conv_linear_macs(module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> int:
    """MACs of one call, from the output's shape: every output element is one dot product."""
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return output.numel() * (module.in_channels // module.groups) * kh * kw
    return output.numel() * module.in_features  # nn.Linear


def _elementwise_ops(module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> tuple[str, int] | None:
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return "batchnorm", output.numel()  # one multiply-add per element once folded to scale/shift
    if isinstance(module, nn.ReLU):
        return "relu", output.numel()
    if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
        k = module.kernel_size
        kh, kw = (k, k) if isinstance(k, int) else k
        return "pooling", output.numel() * kh * kw
    if isinstance(module, nn.AdaptiveAvgPool2d) and inputs and isinstance(inputs[0], torch.Tensor):
        return "pooling", inputs[0].numel()
    return None


@dataclass
class ModuleCount:
    """What :func:`count_module` measured.

    Attributes:
        params: ``{parameter name: numel}``.
        macs: ``{module name: MACs}`` of every Conv2d/Linear call, in forward order.
        shapes: ``{module name: output shape}`` of those calls.
        other_ops: elementwise operations of BatchNorm/ReLU/pooling modules (not in ``macs``).
    """

    params: dict[str, int] = field(default_factory=dict)
    macs: dict[str, int] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    other_ops: dict[str, int] = field(default_factory=dict)


def count_module(model: nn.Module, input_size: int | tuple[int, int], in_channels: int = 3) -> ModuleCount:
    """Count ``model``'s parameters and the MACs of one forward pass of a ``[1, C, H, W]`` input.

    The input is created on the model's device (use the meta device: nothing is allocated).
    Only calls through ``nn.Conv2d``/``nn.Linear`` modules are seen (see the module docstring).
    """
    h, w = (input_size, input_size) if isinstance(input_size, int) else input_size
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("meta")
    result = ModuleCount(params={n: p.numel() for n, p in model.named_parameters()})
    handles = []

    def hook_for(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            if not isinstance(output, torch.Tensor):
                return
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                result.macs[name] = result.macs.get(name, 0) + _conv_linear_macs(module, inputs, output)
                result.shapes[name] = tuple(output.shape)
            else:
                other = _elementwise_ops(module, inputs, output)
                if other is not None:
                    result.other_ops[other[0]] = result.other_ops.get(other[0], 0) + other[1]

        return hook

    for name, module in model.named_modules():
        handles.append(module.register_forward_hook(hook_for(name)))
    try:
        with torch.no_grad(), MetaInit() if device.type == "meta" else contextlib.nullcontext():
            model(torch.zeros(1, in_channels, h, w, device=device))
    finally:
        for handle in handles:
            handle.remove()
    return result


def _stage_of(name: str, arch: ResNetArch | DenseNetArch) -> str:
    """The table row a module or parameter (by qualified name) belongs to."""
    parts = name.split(".")
    if isinstance(arch, DenseNetArch):
        if parts[0] == "classifier" or (len(parts) > 1 and parts[1] == "norm5"):
            return "Classification Layer"
        if len(parts) > 1 and parts[1].startswith("denseblock"):
            return f"Dense Block ({parts[1][len('denseblock') :]})"
        if len(parts) > 1 and parts[1].startswith("transition"):
            return f"Transition Layer ({parts[1][len('transition') :]})"
        if len(parts) > 1 and parts[1].startswith("pool"):
            return "Pooling"
        return "Convolution"
    if parts[0].startswith("layer") and parts[0][len("layer") :].isdigit():
        return f"conv{int(parts[0][len('layer') :]) + 1}_x"
    if parts[0] in ("fc", "avgpool"):
        return "fc"
    return "conv1"


# ----------------------------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------------------------


@dataclass
class SummaryRow:
    """A stage with both counts (``None`` where a count is unavailable)."""

    name: str
    output_size: str
    config: str
    params_analytic: int | None
    params_counted: int | None
    macs_analytic: int | None
    macs_counted: int | None

    @property
    def match(self) -> bool:
        return self.params_analytic == self.params_counted and self.macs_analytic == self.macs_counted


@dataclass
class ModelSummary:
    """The table of one model; :meth:`to_dict` is the ``--json`` output."""

    model: str
    input_size: int
    stride_on_1x1: bool
    rows: list[SummaryRow]
    params_fused: int | None = None
    other_ops: dict[str, int] = field(default_factory=dict)
    other_placement_macs: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def params_analytic(self) -> int:
        return sum(r.params_analytic or 0 for r in self.rows)

    @property
    def params_counted(self) -> int:
        return sum(r.params_counted or 0 for r in self.rows)

    @property
    def macs_analytic(self) -> int:
        return sum(r.macs_analytic or 0 for r in self.rows)

    @property
    def macs_counted(self) -> int:
        return sum(r.macs_counted or 0 for r in self.rows)

    @property
    def match(self) -> bool:
        fused_ok = self.params_fused is None or self.params_fused == self.params_counted
        return all(r.match for r in self.rows) and fused_ok

    def to_dict(self) -> dict[str, Any]:
        rows = []
        for r in self.rows:
            row = dataclasses.asdict(r)
            row["match"] = r.match
            rows.append(row)
        return {
            "model": self.model,
            "input_size": self.input_size,
            "stride_on_1x1": self.stride_on_1x1,
            "rows": rows,
            "total": {
                "params_analytic": self.params_analytic,
                "params_counted": self.params_counted,
                "params_fused": self.params_fused,
                "macs_analytic": self.macs_analytic,
                "macs_counted": self.macs_counted,
            },
            "match": self.match,
            "other_placement_macs": self.other_placement_macs,
            "other_ops": self.other_ops,
            "counted": "conv2d + linear multiply-adds (bias, BN, ReLU, pooling, residual adds excluded)",
            "notes": self.notes,
        }


def _accepted_kwargs(builder: Callable[..., nn.Module], kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` minus the ones ``builder`` cannot take (unless it takes ``**kwargs``)."""
    try:
        sig = inspect.signature(builder)
    except (TypeError, ValueError):
        return kwargs
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in sig.parameters}


def build_on_meta(name: str, **kwargs: Any) -> nn.Module:
    """``get_model(name, **kwargs)`` built on the meta device (shapes only, nothing allocated).

    Raises:
        ValueError: unknown model name (the message lists the available ones).
    """
    if name not in registry.list_models():
        registry.get_model(name)  # raises the registry's ValueError with the list of names
    builder = registry._builder(name)
    assert builder is not None
    with torch.device("meta"), MetaInit():
        return builder(**_accepted_kwargs(builder, kwargs))


def _arch_with(name: str, kwargs: dict[str, Any]) -> ResNetArch | DenseNetArch | None:
    arch = ARCHITECTURES.get(name)
    if arch is None:
        return None
    names = {f.name for f in dataclasses.fields(arch)}
    changes = {k: v for k, v in kwargs.items() if k in _ARCH_KWARGS and k in names}
    return dataclasses.replace(arch, **changes) if changes else arch


def summarize(
    name: str, input_size: int | None = None, *, stride_on_1x1: bool = False, **builder_kwargs: Any
) -> ModelSummary:
    """Both counts of model ``name`` per stage (see the module docstring).

    Args:
        name: a registry name (``fastblocks.models.registry.list_models()``).
        input_size: square input side; default 224, or 32 for CIFAR models.
        stride_on_1x1: paper v1 bottlenecks (stride on the first 1x1) instead of torchvision's v1.5.
        builder_kwargs: passed to the builder (e.g. ``num_classes``) and mirrored in the config row.

    Raises:
        ValueError: unknown model name; the message lists the available ones.
    """
    size = input_size or default_input_size(name)
    kwargs = dict(builder_kwargs)
    if stride_on_1x1:
        kwargs["stride_on_1x1"] = True
    eager = build_on_meta(name, fused=False, **kwargs)
    counted = count_module(eager, size)
    fused = build_on_meta(name, fused=True, **kwargs)
    params_fused = sum(p.numel() for p in fused.parameters())

    arch = _arch_with(name, builder_kwargs)
    notes: list[str] = []
    other_macs = None
    if arch is None:
        # No config row: one row per top-level child, counted only.
        groups: dict[str, SummaryRow] = {}
        for pname, n in counted.params.items():
            row = groups.setdefault(pname.split(".")[0], SummaryRow(pname.split(".")[0], "", "", None, 0, None, 0))
            row.params_counted = (row.params_counted or 0) + n
        for mname, n in counted.macs.items():
            row = groups.setdefault(mname.split(".")[0], SummaryRow(mname.split(".")[0], "", "", None, 0, None, 0))
            row.macs_counted = (row.macs_counted or 0) + n
        rows = list(groups.values())
        notes.append(f"{name} has no config row in fastblocks.profile.flops.ARCHITECTURES: counted only")
    else:
        analytic = analytic_counts(arch, size, stride_on_1x1=stride_on_1x1)
        by_stage: dict[str, list[int]] = {r.name: [0, 0] for r in analytic}
        unassigned: list[str] = []
        for pname, n in counted.params.items():
            stage = _stage_of(pname, arch)
            by_stage.setdefault(stage, [0, 0])[0] += n
        for mname, n in counted.macs.items():
            stage = _stage_of(mname, arch)
            if stage not in by_stage:
                unassigned.append(mname)
            by_stage.setdefault(stage, [0, 0])[1] += n
        rows = [
            SummaryRow(a.name, a.output_size, a.config, a.params, by_stage[a.name][0], a.macs, by_stage[a.name][1])
            for a in analytic
        ]
        rows += [
            SummaryRow(s, "", "", None, p, None, m)
            for s, (p, m) in by_stage.items()
            if s not in {a.name for a in analytic}
        ]
        if unassigned:
            notes.append(f"modules outside every stage of the table: {', '.join(unassigned)}")
        if isinstance(arch, ResNetArch) and arch.block == "bottleneck":
            other_macs = sum(r.macs for r in analytic_counts(arch, size, stride_on_1x1=not stride_on_1x1))
            here = sum(r.macs for r in analytic)
            v1, v15 = (here, other_macs) if stride_on_1x1 else (other_macs, here)
            notes.append(
                f"stride placement: torchvision v1.5 puts a downsampling bottleneck's stride 2 on its 3×3 conv "
                f"({v15 / 1e9:.2f} GMACs), He et al.'s v1 on the first 1×1 ({v1 / 1e9:.2f} GMACs, the paper's "
                f"FLOPs row); this table is {'v1 (--stride-on-1x1)' if stride_on_1x1 else 'v1.5 (default)'}"
            )
    notes.insert(
        0,
        "MACs: multiply-adds of Conv2d and Linear only (the papers' FLOPs row, torchvision's conv_linear_macs); "
        "bias, BatchNorm, ReLU, pooling and residual adds are not included",
    )
    notes.insert(1, "counted: parameters by numel, MACs by forward hooks on the eager twin (fused=False), meta device")
    if params_fused != sum(counted.params.values()):
        notes.append(
            f"MISMATCH: the fused model has {params_fused:,} parameters, the eager twin {sum(counted.params.values()):,}"
        )
    summary = ModelSummary(name, size, stride_on_1x1, rows, params_fused, counted.other_ops, other_macs, notes)
    if counted.other_ops:
        ops = ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in sorted(counted.other_ops.items()))
        summary.notes.append(f"elementwise ops not in the MACs (per element / window tap): {ops}")
    if not summary.match:
        summary.notes.append("MISMATCH between the analytic and the counted numbers: see the rows marked in 'check'")
    return summary


# ----------------------------------------------------------------------------------------------
# Formatting
# ----------------------------------------------------------------------------------------------


def _num(v: int | None) -> str:
    return "-" if v is None else f"{v:,}"


def _table_rows(summary: ModelSummary) -> Iterator[list[str]]:
    # GMACs as the papers' tables; MMACs for the CIFAR models, which stay under 10^9.
    unit, scale = ("GMACs", 1e9) if summary.macs_counted >= 1e9 else ("MMACs", 1e6)

    def g(v: int | None) -> str:
        return "-" if v is None else f"{v / scale:.3f}"

    yield ["layer name", "output size", "block configuration", "params (analytic)", "params (counted)",
           f"{unit} (analytic)", f"{unit} (counted)", "check"]  # fmt: skip
    for r in summary.rows:
        yield [r.name, r.output_size, r.config, _num(r.params_analytic), _num(r.params_counted),
               g(r.macs_analytic), g(r.macs_counted), "ok" if r.match else "MISMATCH"]  # fmt: skip
    yield ["total", "", "", _num(summary.params_analytic), _num(summary.params_counted),
           g(summary.macs_analytic), g(summary.macs_counted), "ok" if summary.match else "MISMATCH"]  # fmt: skip


def format_table(summary: ModelSummary, *, markdown: bool = False) -> str:
    """The table as aligned text, or as a Markdown table, followed by the notes."""
    rows = list(_table_rows(summary))
    title = (
        f"{summary.model}: input 3×{summary.input_size}×{summary.input_size}, "
        f"{summary.params_counted:,} parameters, {summary.macs_counted:,} multiply-adds "
        f"({summary.macs_counted / 1e9:.2f} GMACs)"
    )
    numeric = {3, 4, 5, 6}
    if markdown:
        lines = [f"**{title}**", ""]
        lines.append("| " + " | ".join(rows[0]) + " |")
        lines.append("|" + "|".join("---:" if i in numeric else "---" for i in range(len(rows[0]))) + "|")
        lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
        lines.append("")
        lines += [f"- {n}" for n in summary.notes]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]

    def fmt(r: list[str]) -> str:
        return "  ".join(c.rjust(widths[i]) if i in numeric else c.ljust(widths[i]) for i, c in enumerate(r)).rstrip()

    lines = [title, fmt(rows[0]), "  ".join("-" * w for w in widths)]
    lines += [fmt(r) for r in rows[1:-1]]
    lines += ["  ".join("-" * w for w in widths), fmt(rows[-1]), ""]
    lines += [f"note: {n}" for n in summary.notes]
    return "\n".join(lines)
