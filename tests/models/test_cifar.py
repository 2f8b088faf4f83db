"""CIFAR ResNets and plain nets (fastblocks.models.cifar): He et al. 2016's counts, shortcuts A/B, fused == eager."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastblocks.models import cifar as C
from fastblocks.models import resnet as R
from fastblocks.nn import BatchNormReLU2d, BNAddReLU
from tests.helpers import devices, to_device
from tests.models.resnet_twins import assert_same_training, twins

# Exact counts with option A (parameter-free shortcuts) and what He et al. 2016, Table 6 prints.
PARAMS_A = {
    "resnet20": (269_722, "0.27M"),
    "resnet32": (464_154, "0.46M"),
    "resnet44": (658_586, "0.66M"),
    "resnet56": (853_018, "0.85M"),
    "resnet110": (1_727_962, "1.7M"),
}
# Option B adds two 1x1 projections with their BNs: 16*32 + 2*32 + 32*64 + 2*64.
EXTRA_B = 16 * 32 + 2 * 32 + 32 * 64 + 2 * 64


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _paper_round(n: int, printed: str) -> bool:
    digits = len(printed.rstrip("M").split(".")[1])
    return f"{round(n / 1e6, digits):.{digits}f}M" == printed


@pytest.mark.parametrize("name", sorted(PARAMS_A))
def test_param_counts(name: str) -> None:
    exact, printed = PARAMS_A[name]
    model = getattr(C, name)()
    assert _count(model) == exact
    assert _paper_round(exact, printed)
    assert _count(getattr(C, name)(shortcut="B")) == exact + EXTRA_B
    assert not any(k.startswith(f"layer{i}.0.downsample") for k in model.state_dict() for i in (1, 2, 3))


def test_plain_nets() -> None:
    for name, twin in (("plain20", "resnet20"), ("plain56", "resnet56")):
        plain, res = getattr(C, name)(), getattr(C, twin)()
        assert _count(plain) == _count(res)
        assert [tuple(v.shape) for v in plain.state_dict().values()] == [
            tuple(v.shape) for v in res.state_dict().values()
        ]
        assert not any(b.residual for b in plain.modules() if isinstance(b, R.BasicBlock))
        assert type(plain.layer1[0].bn2) is BatchNormReLU2d  # conv-BN-ReLU, no addition


def test_structure_and_keys() -> None:
    model = C.resnet20()
    keys = list(model.state_dict())
    assert keys[:2] == ["conv1.weight", "bn1.weight"] and keys[-2:] == ["fc.weight", "fc.bias"]
    assert model.conv1.kernel_size == (3, 3) and model.conv1.out_channels == 16
    assert [len(getattr(model, f"layer{i}")) for i in (1, 2, 3)] == [3, 3, 3]
    assert [getattr(model, f"layer{i}")[0].conv1.out_channels for i in (1, 2, 3)] == [16, 32, 64]
    assert not hasattr(model, "layer4") and not hasattr(model, "maxpool")
    assert isinstance(model.layer2[0].downsample, R.ZeroPadShortcut) and model.layer1[0].downsample is None
    assert type(model.layer1[0].bn2) is BNAddReLU
    assert model.output_stride == 4 and model.min_input_size == 4
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    b = C.resnet20(shortcut="B")
    assert "layer2.0.downsample.0.weight" in b.state_dict() and "layer2.0.downsample.1.running_var" in b.state_dict()
    pre = C.resnet20(block_variant="preact")
    assert "bn1.weight" not in pre.state_dict() and list(pre.state_dict())[-7] == "bn_final.weight"
    with pytest.raises(ValueError, match="three stages"):
        C.CifarResNet(R.BasicBlock, [3, 3])
    with pytest.raises(ValueError, match="weights=None"):
        C.resnet56(weights="cifar10")


def test_zero_pad_shortcut() -> None:
    sc = R.ZeroPadShortcut(16, 32, stride=2)
    x = torch.randn(2, 16, 7, 7)
    y = sc(x)
    assert y.shape == (2, 32, 4, 4)
    assert torch.equal(y[:, :16], x[:, :, ::2, ::2]) and not y[:, 16:].any()
    assert list(sc.parameters()) == []
    with pytest.raises(ValueError, match="cannot reduce"):
        R.ZeroPadShortcut(32, 16)


def test_input_errors() -> None:
    model = C.resnet20()
    with pytest.raises(ValueError, match=r"2x2 pixels is too small.*at least 4x4"):
        model(torch.randn(2, 3, 2, 2))
    with pytest.raises(ValueError, match="3 channels, got 4"):
        model(torch.randn(2, 4, 32, 32))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("resnet20", {}),
        ("resnet20", {"shortcut": "B"}),
        ("plain20", {}),
        ("resnet20", {"block_variant": "preact"}),
        ("resnet20", {"block_variant": "bn_after_add"}),
        ("resnet20", {"block_variant": "relu_before_add"}),
    ],
    ids=["A", "B", "plain", "preact", "bn_after_add", "relu_before_add"],
)
def test_twin_training(name: str, kwargs: dict, device: str) -> None:
    # On CUDA both twins run on the GPU behind a CPU interface (tests/helpers.py: to_device).
    fused, eager = to_device(twins(getattr(C, name), **kwargs), device)
    assert_same_training(fused, eager, (4, 3, 32, 32))


def test_twin_channels_last() -> None:
    fused, eager = twins(C.resnet20)
    assert_same_training(fused, eager, (4, 3, 32, 32), steps=2, channels_last=True)
