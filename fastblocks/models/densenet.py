"""DenseNet (Huang et al. 2017, "Densely Connected Convolutional Networks"), the torchvision way.

One class, :class:`DenseNet`, parametrized by growth rate, block configuration and stem; each
builder is one row of the paper's Table 1 (ImageNet: DenseNet-121/169/201/161/264) or of the
CIFAR DenseNet-BC rows (L=100 k=12, L=250 k=24). Attribute names are torchvision's, so the
state_dicts are identical (keys, shapes, parameter counts) and checkpoints load both ways.

``fused=True`` (the default) runs each dense block as one memory-efficient autograd node
(:func:`fastblocks.ops.dense_block.dense_block`: one buffer per block, shared batch statistics,
the wide layers' bottlenecks kept and the others recomputed in backward, BN running statistics
updated exactly once) and each
transition as BN-ReLU-pool-conv1x1 saving only its input
(:func:`fastblocks.ops.dense_block.dense_transition`); the ImageNet stem (conv0-norm0-relu0-
pool0) is one node saving the network input (and on the CPU one byte per pooled output, the
max-pool's winners), and norm5 uses the fused BatchNorm kernels.
A DenseNet-201 training forward then keeps 6.2% of the eager model's activation bytes, 3.84%
with ``memory_efficient=True`` (torchvision's checkpointing: 35%; the block buffers alone: 3.55%;
measured at 8x3x224x224 by tests/models/test_densenet.py::test_saved_bytes_densenet201_224). ``fused=False`` is the eager twin: torchvision's exact modules and forward
(``torch.cat``, ``nn.BatchNorm2d``), kept as the reference the tests compare against.

Synchronized BatchNorm (DDP, ``fastblocks train`` under torchrun):
``fastblocks.nn.convert_sync_batchnorm(model, group)`` gives every BatchNorm the group, the ones
inside the fused nodes too (stem norm0, each layer's norm1/norm2, the transitions' norms; norm5
is an ordinary fastblocks ``BatchNorm2d``). In training with more than one rank their statistics
are the global batch's: a dense block of ``L`` layers all-gathers each new chunk's and each
bottleneck's per-channel (count, mean, M2) once (``2 L`` small all_gathers forward) and
all-reduces ``2 L`` pairs of per-channel sums backward; the stem and each transition one of each.
The fused model then trains as one process on the whole batch does
(tests/models/test_densenet_ddp.py). Without a group or with one rank: no collective.

``memory_efficient=True`` on the eager twin is torchvision's: ``torch.utils.checkpoint`` of each
bottleneck (``norm1-relu1-conv1``). Its recomputation runs norm1 in training mode a second time,
so norm1's running statistics and ``num_batches_tracked`` are updated twice per step (PyTorch
issue 96136); we keep that, it is the baseline we compare against. The fused model is
memory-efficient either way, without the double update; there ``memory_efficient`` chooses
which bottlenecks its backward recomputes (``keep_bottleneck`` of
:func:`fastblocks.ops.dense_block.dense_block`): ``False`` (default) keeps the bottleneck of each
layer whose input has at least 4x the bottleneck's channels (the wide layers of the last two
blocks, where recomputing the 1x1 convolution costs the most per kept byte), ``True`` keeps
none (least memory, one more 1x1 convolution per layer in backward).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.utils.checkpoint as cp
from torch import Tensor, nn
from torch.nn import functional as F

from fastblocks.nn.batchnorm import BatchNorm2d as _FusedBatchNorm2d
from fastblocks.ops._bn_core import BatchNormParams
from fastblocks.ops.dense_block import DenseLayerParams, dense_block
from fastblocks.ops.stem import stem_conv_bn_relu_pool
from fastblocks.ops.transition import dense_transition

__all__ = [
    "DenseNet",
    "densenet121",
    "densenet161",
    "densenet169",
    "densenet201",
    "densenet264",
    "densenet_bc_100_12",
    "densenet_bc_250_24",
    "remap_legacy_densenet_keys",
]

# Old torchvision checkpoints name the layers' modules 'norm.1', 'relu.1', 'conv.1', 'norm.2', ...
# ('.' is no longer allowed in module names). torchvision's pattern, from its _load_state_dict.
_LEGACY_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def _remap_in_place(state_dict: dict[str, Any], prefix: str = "") -> None:
    for key in [k for k in state_dict if k.startswith(prefix)]:
        match = _LEGACY_KEY.match(key)
        if match:
            state_dict[match.group(1) + match.group(2)] = state_dict.pop(key)


def remap_legacy_densenet_keys(state_dict: Mapping[str, Any]) -> OrderedDict[str, Any]:
    """Rename legacy ``...denselayerN.norm.1.weight`` keys to ``...denselayerN.norm1.weight``.

    Returns a new ``OrderedDict`` (the input is not modified; ``_metadata`` is kept). Other keys
    pass through. DenseNet models also apply this on ``load_state_dict``.
    """
    out: OrderedDict[str, Any] = OrderedDict(state_dict)
    metadata = getattr(state_dict, "_metadata", None)
    _remap_in_place(out)
    if metadata is not None:
        out._metadata = metadata  # type: ignore[attr-defined]
    return out


class _DenseLayer(nn.Module):
    """torchvision's DenseNet-BC layer: ``conv2(relu2(norm2(conv1(relu1(norm1(cat(inputs)))))))``.

    Shapes: ``list of [N, C_j, H, W]`` (``Σ C_j = num_input_features``) -> ``[N, growth_rate, H, W]``.
    """

    def __init__(
        self,
        num_input_features: int,
        growth_rate: int,
        bn_size: int,
        drop_rate: float,
        memory_efficient: bool = False,
    ) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, kernel_size=1, stride=1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, kernel_size=3, stride=1, padding=1, bias=False)
        self.drop_rate = float(drop_rate)
        self.memory_efficient = memory_efficient

    def bn_function(self, inputs: list[Tensor]) -> Tensor:
        concated_features = torch.cat(inputs, 1)
        return self.conv1(self.relu1(self.norm1(concated_features)))

    def any_requires_grad(self, inputs: list[Tensor]) -> bool:
        return any(t.requires_grad for t in inputs)

    def call_checkpoint_bottleneck(self, inputs: list[Tensor]) -> Tensor:
        def closure(*inputs: Tensor) -> Tensor:
            return self.bn_function(list(inputs))

        # Recomputation runs norm1 in training mode again: its running stats update twice.
        return cp.checkpoint(closure, *inputs, use_reentrant=False)

    def forward(self, input: Tensor | list[Tensor]) -> Tensor:
        prev_features = [input] if isinstance(input, Tensor) else input
        if self.memory_efficient and self.any_requires_grad(prev_features):
            bottleneck_output = self.call_checkpoint_bottleneck(prev_features)
        else:
            bottleneck_output = self.bn_function(prev_features)
        new_features = self.conv2(self.relu2(self.norm2(bottleneck_output)))
        if self.drop_rate > 0:
            new_features = F.dropout(new_features, p=self.drop_rate, training=self.training)
        return new_features

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        _remap_in_place(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class _DenseBlock(nn.ModuleDict):
    """torchvision's dense block: ``[N, C0, H, W] -> [N, C0 + num_layers * growth_rate, H, W]``."""

    _version = 2

    def __init__(
        self,
        num_layers: int,
        num_input_features: int,
        bn_size: int,
        growth_rate: int,
        drop_rate: float,
        memory_efficient: bool = False,
    ) -> None:
        super().__init__()
        for i in range(num_layers):
            layer = _DenseLayer(
                num_input_features + i * growth_rate,
                growth_rate=growth_rate,
                bn_size=bn_size,
                drop_rate=drop_rate,
                memory_efficient=memory_efficient,
            )
            self.add_module(f"denselayer{i + 1}", layer)

    def forward(self, init_features: Tensor) -> Tensor:
        features = [init_features]
        for _name, layer in self.items():
            new_features = layer(features)
            features.append(new_features)
        return torch.cat(features, 1)


class _FusedDenseBlock(_DenseBlock):
    """The same modules and state_dict; forward is one memory-efficient autograd node."""

    def forward(self, init_features: Tensor) -> Tensor:
        layers = list(self.values())
        return dense_block(
            init_features,
            [DenseLayerParams.from_module(layer) for layer in layers],
            training=self.training,
            drop_rate=layers[0].drop_rate,
            keep_bottleneck=False if layers[0].memory_efficient else None,
        )


class _Transition(nn.Sequential):
    """torchvision's transition: BN, ReLU, conv1x1 (compression), 2x2 average pool."""

    def __init__(self, num_input_features: int, num_output_features: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(num_input_features, num_output_features, kernel_size=1, stride=1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


class _FusedTransition(_Transition):
    """The same modules and state_dict; forward saves only its input (the block's buffer)."""

    def forward(self, input: Tensor) -> Tensor:
        return dense_transition(input, BatchNormParams.from_module(self.norm), self.conv.weight, training=self.training)


class _FusedFeatures(nn.Sequential):
    """torchvision's ``features`` (same children, same state_dict) with a fused ImageNet stem.

    ``conv0, norm0, relu0, pool0`` run as one node that saves only the network input
    (:func:`fastblocks.ops.dense_block.stem_conv_bn_relu_pool`); the other children run in order.
    """

    _STEM = ("conv0", "norm0", "relu0", "pool0")

    def forward(self, input: Tensor) -> Tensor:
        names = list(self._modules)
        skip = 0
        if tuple(names[:4]) == self._STEM:
            norm0 = BatchNormParams.from_module(self.norm0)
            input = stem_conv_bn_relu_pool(input, self.conv0.weight, norm0, training=self.norm0.training)
            skip = 4
        for name in names[skip:]:
            input = self._modules[name](input)
        return input


class DenseNet(nn.Module):
    """DenseNet-BC (Huang et al. 2017), torchvision's constructor and state_dict.

    Args:
        growth_rate: ``k``, channels each layer adds.
        block_config: layers per dense block.
        num_init_features: channels of the stem convolution.
        bn_size: bottleneck width factor (the 1x1 conv outputs ``bn_size * k`` channels).
        drop_rate: dropout after each dense layer (training only).
        num_classes: classifier outputs.
        memory_efficient: eager twin: torchvision's checkpointed bottlenecks. Fused: recompute
            every bottleneck in backward (least memory) instead of keeping the wide layers'
            (module docstring).
        fused: memory-efficient fused blocks and transitions (default) or the eager twin.
        stem: ``"imagenet"`` (7x7/2 conv, BN, ReLU, 3x3/2 max pool; 224x224 inputs) or
            ``"cifar"`` (one 3x3 conv, as the paper's CIFAR models; 32x32 inputs).

    Shapes: ``[N, 3, H, W] -> [N, num_classes]``; the final block's ``norm5`` is always called
    ``norm5`` (torchvision's name), whatever the number of blocks.
    """

    def __init__(
        self,
        growth_rate: int = 32,
        block_config: tuple[int, ...] = (6, 12, 24, 16),
        num_init_features: int = 64,
        bn_size: int = 4,
        drop_rate: float = 0,
        num_classes: int = 1000,
        memory_efficient: bool = False,
        *,
        fused: bool = True,
        stem: Literal["imagenet", "cifar"] = "imagenet",
    ) -> None:
        super().__init__()
        if stem not in ("imagenet", "cifar"):
            raise ValueError(f"stem must be 'imagenet' or 'cifar', got {stem!r}")
        self.fused = fused
        self.stem = stem
        bn_cls = _FusedBatchNorm2d if fused else nn.BatchNorm2d
        block_cls = _FusedDenseBlock if fused else _DenseBlock
        transition_cls = _FusedTransition if fused else _Transition

        # First convolution
        features_cls = _FusedFeatures if fused else nn.Sequential
        if stem == "imagenet":
            self.features = features_cls(
                OrderedDict(
                    [
                        ("conv0", nn.Conv2d(3, num_init_features, kernel_size=7, stride=2, padding=3, bias=False)),
                        ("norm0", bn_cls(num_init_features)),
                        ("relu0", nn.ReLU(inplace=True)),
                        ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
                    ]
                )
            )
        else:
            # Huang et al. Sec. 3 (CIFAR): one 3x3 conv with 2k channels before the first block.
            conv0 = nn.Conv2d(3, num_init_features, kernel_size=3, stride=1, padding=1, bias=False)
            self.features = features_cls(OrderedDict([("conv0", conv0)]))

        # Each denseblock
        num_features = num_init_features
        for i, num_layers in enumerate(block_config):
            block = block_cls(
                num_layers=num_layers,
                num_input_features=num_features,
                bn_size=bn_size,
                growth_rate=growth_rate,
                drop_rate=drop_rate,
                memory_efficient=memory_efficient,
            )
            self.features.add_module(f"denseblock{i + 1}", block)
            num_features = num_features + num_layers * growth_rate
            if i != len(block_config) - 1:
                # Compression 0.5 (DenseNet-BC).
                trans = transition_cls(num_input_features=num_features, num_output_features=num_features // 2)
                self.features.add_module(f"transition{i + 1}", trans)
                num_features = num_features // 2

        # Final batch norm
        self.features.add_module("norm5", bn_cls(num_features))

        # Linear layer
        self.classifier = nn.Linear(num_features, num_classes)

        # Official init from torch repo.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)

        self._num_transitions = len(block_config) - 1

    @property
    def min_input_size(self) -> int:
        """Smallest input height/width for which every transition's 2x2 pool has input."""
        size = 1
        while not self._fits(size):
            size += 1
        return size

    def _fits(self, size: int) -> bool:
        if self.stem == "imagenet":
            size = (size + 2 * 3 - 7) // 2 + 1  # conv0: 7x7, stride 2, padding 3
            size = (size + 2 * 1 - 3) // 2 + 1  # pool0: 3x3, stride 2, padding 1
        for _ in range(self._num_transitions):
            if size < 2:
                return False
            size //= 2
        return size >= 1

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"DenseNet input must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"DenseNet input must be [N, C, H, W], got a {x.dim()}-D tensor of shape {tuple(x.shape)}")
        expected = self.features.conv0.in_channels
        if x.shape[1] != expected:
            raise ValueError(f"DenseNet input must have {expected} channels, got {x.shape[1]} (shape {tuple(x.shape)})")
        smallest = self.min_input_size
        if x.shape[2] < smallest or x.shape[3] < smallest:
            raise ValueError(
                f"DenseNet input of {x.shape[2]}x{x.shape[3]} pixels is too small for this network: "
                f"{self._num_transitions} transitions need at least {smallest}x{smallest}"
            )

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        features = self.features(x)
        out = F.relu(features, inplace=True)
        out = F.adaptive_avg_pool2d(out, (1, 1))
        out = torch.flatten(out, 1)
        out = self.classifier(out)
        return out


def _densenet(
    growth_rate: int,
    block_config: tuple[int, ...],
    num_init_features: int,
    weights: object | None,
    progress: bool,
    **kwargs: Any,
) -> DenseNet:
    del progress  # torchvision's download flag; nothing is downloaded here
    if weights is not None:
        raise ValueError(
            f"fastblocks ships no pretrained weights (got weights={weights!r}). Build the model with "
            "weights=None and load a local checkpoint: model.load_state_dict(torch.load(path)); torchvision "
            "DenseNet checkpoints (also the old 'norm.1'-style keys) load unchanged."
        )
    return DenseNet(growth_rate, block_config, num_init_features, **kwargs)


def densenet121(*, weights: object | None = None, progress: bool = True, **kwargs: Any) -> DenseNet:
    """DenseNet-121 (k=32, blocks 6-12-24-16): 7,978,856 parameters. ``[N, 3, 224, 224] -> [N, 1000]``."""
    return _densenet(32, (6, 12, 24, 16), 64, weights, progress, **kwargs)


def densenet161(*, weights: object | None = None, progress: bool = True, **kwargs: Any) -> DenseNet:
    """DenseNet-161 (k=48, blocks 6-12-36-24, 96 stem channels): 28,681,000 parameters."""
    return _densenet(48, (6, 12, 36, 24), 96, weights, progress, **kwargs)


def densenet169(*, weights: object | None = None, progress: bool = True, **kwargs: Any) -> DenseNet:
    """DenseNet-169 (k=32, blocks 6-12-32-32): 14,149,480 parameters."""
    return _densenet(32, (6, 12, 32, 32), 64, weights, progress, **kwargs)


def densenet201(*, weights: object | None = None, progress: bool = True, **kwargs: Any) -> DenseNet:
    """DenseNet-201 (k=32, blocks 6-12-48-32): 20,013,928 parameters."""
    return _densenet(32, (6, 12, 48, 32), 64, weights, progress, **kwargs)


def densenet264(*, weights: object | None = None, progress: bool = True, **kwargs: Any) -> DenseNet:
    """DenseNet-264 (k=32, blocks 6-12-64-48; Huang et al. Table 1, not in torchvision)."""
    return _densenet(32, (6, 12, 64, 48), 64, weights, progress, **kwargs)


def _densenet_bc_cifar(depth: int, growth_rate: int, weights: object | None, progress: bool, **kwargs: Any) -> DenseNet:
    # Huang et al. Sec. 4.1: three blocks of (depth - 4) / 6 bottleneck layers (each layer is two
    # convs; + the stem conv, two transitions and the classifier = depth), 2k stem channels.
    if (depth - 4) % 6:
        raise ValueError(f"DenseNet-BC depth must be 6n + 4, got {depth}")
    n = (depth - 4) // 6
    kwargs.setdefault("num_classes", 10)
    kwargs.setdefault("stem", "cifar")
    return _densenet(growth_rate, (n, n, n), 2 * growth_rate, weights, progress, **kwargs)


def densenet_bc_100_12(*, weights: object | None = None, progress: bool = True, **kwargs: Any) -> DenseNet:
    """CIFAR DenseNet-BC, L=100, k=12 (3 blocks of 16 layers): ``[N, 3, 32, 32] -> [N, 10]``."""
    return _densenet_bc_cifar(100, 12, weights, progress, **kwargs)


def densenet_bc_250_24(*, weights: object | None = None, progress: bool = True, **kwargs: Any) -> DenseNet:
    """CIFAR DenseNet-BC, L=250, k=24 (3 blocks of 41 layers): ``[N, 3, 32, 32] -> [N, 10]``."""
    return _densenet_bc_cifar(250, 24, weights, progress, **kwargs)
