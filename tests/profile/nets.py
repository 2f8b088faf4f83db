"""Small networks the profiler tests build by ``"tests.profile.nets:<name>"`` (also in a subprocess)."""

from __future__ import annotations

from torch import nn


def tiny_net() -> nn.Sequential:
    """Conv2d(3->4, 3x3, pad 1) -> BN(4) -> ReLU -> Flatten -> Linear(4*8*8 -> 10), for ``[N, 3, 8, 8]``.

    The saved bytes of one step are worked out by hand in test_memory.py::test_hand_computed_step.
    """
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 10),
    )


def wide_shallow_net(channels: int = 16, layers: int = 8) -> nn.Sequential:
    """Activation-heavy, compute-light: 1x1 convs with BN-ReLU at full resolution, ``[N, 3, S, S] -> [N, 10]``.

    At batch 8 and 128x128 each activation is 8 MiB while a step costs ~0.3 GMAC, so a CPU
    measurement of its memory is dominated by activations and takes well under a second.
    """
    mods: list[nn.Module] = [nn.Conv2d(3, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU()]
    for _ in range(layers):
        mods += [nn.Conv2d(channels, channels, 1, bias=False), nn.BatchNorm2d(channels), nn.ReLU()]
    mods += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 10)]
    return nn.Sequential(*mods)


def small_densenet(*, fused: bool = True, memory_efficient: bool = False) -> nn.Module:
    """A CIFAR DenseNet-BC with k=12 and 3 blocks of 4 layers (24 stem channels), ``[N, 3, 32, 32] -> [N, 10]``.

    Block outputs: 24 + 4*12 = 72 channels at 32x32, 36 + 48 = 84 at 16x16, 42 + 48 = 90 at 8x8.
    """
    from fastblocks.models.densenet import DenseNet

    return DenseNet(12, (4, 4, 4), 24, num_classes=10, memory_efficient=memory_efficient, fused=fused, stem="cifar")
