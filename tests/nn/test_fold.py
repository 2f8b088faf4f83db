"""Inference folding: BN folded into convs, conv + bias (+ residual) (+ ReLU) in one call."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastblocks.nn import BatchNormReLU2d
from fastblocks.nn.fold import FoldedConv2d, fold_bn, fold_conv_bn_weights


def _randomize_bn(bn: nn.BatchNorm2d) -> None:
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)


@pytest.mark.parametrize("channels_last", [False, True])
def test_sequential_conv_bn_relu_folds_to_same_outputs(channels_last):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, stride=2),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 6, 1, bias=False),
        BatchNormReLU2d(6),
        nn.Conv2d(6, 4, 3, padding=1, groups=2),
        nn.BatchNorm2d(4),
    )
    for m in model:
        if isinstance(m, nn.BatchNorm2d):
            _randomize_bn(m)
    model.eval()
    folded = fold_bn(model)
    assert sum(isinstance(m, FoldedConv2d) for m in folded) == 3
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(2, 3, 13, 13)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
    assert model[1].training is False and isinstance(model[1], nn.BatchNorm2d)  # original untouched


def test_folded_conv_with_residual_matches():
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
    _randomize_bn(bn)
    bn.eval()
    fc = FoldedConv2d(conv, bn, relu=True)
    x, r = torch.randn(2, 8, 7, 7), torch.randn(2, 8, 7, 7)
    with torch.no_grad():
        torch.testing.assert_close(fc(x, r), torch.relu(bn(conv(x)) + r), rtol=1e-5, atol=1e-5)


def test_folded_model_exports():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    folded = fold_bn(model)
    x = torch.randn(1, 3, 8, 8)
    program = torch.export.export(folded, (x,))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), rtol=1e-5, atol=1e-5)


def test_errors():
    conv = nn.Conv2d(3, 4, 1)
    with pytest.raises(ValueError, match="running statistics"):
        fold_conv_bn_weights(conv, nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(ValueError, match="BatchNorm has 5 features but the conv has 4 outputs"):
        fold_conv_bn_weights(conv, nn.BatchNorm2d(5))
