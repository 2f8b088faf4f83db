"""Inference folding: BN folded into convs, conv + bias (+ residual) (+ ReLU) in one call.

The ``device`` cases also run on CUDA where a GPU is present (FoldedConv2d's cuDNN fused
conv-bias-(add-)ReLU path, FrozenBatchNorm2d's batch_norm_act; TF32 off: tests/conftest.py).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fastblocks.nn import BatchNormReLU2d
from fastblocks.nn.fold import FoldedConv2d, FrozenBatchNorm2d, bn_scale_shift, fold_bn, fold_conv_bn_weights
from tests.helpers import devices


def _randomize_bn(bn: nn.BatchNorm2d) -> None:
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("channels_last", [False, True])
def test_sequential_conv_bn_relu_folds_to_same_outputs(channels_last, device):
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
    model.eval().to(device)
    folded = fold_bn(model)
    assert sum(isinstance(m, FoldedConv2d) for m in folded) == 3
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(2, 3, 13, 13).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
    assert model[1].training is False and isinstance(model[1], nn.BatchNorm2d)  # original untouched


@pytest.mark.parametrize("device", devices())
def test_folded_conv_with_residual_matches(device):
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
    _randomize_bn(bn)
    bn.eval()
    conv, bn = conv.to(device), bn.to(device)
    fc = FoldedConv2d(conv, bn, relu=True)
    x, r = torch.randn(2, 8, 7, 7).to(device), torch.randn(2, 8, 7, 7).to(device)
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


def _both_paths(module: nn.Module, *args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(eager fast path, aten path) outputs: an input that requires grad takes the aten path."""
    with torch.no_grad():
        fast = module(*args)
    slow = module(args[0].detach().requires_grad_(True), *args[1:])
    return fast, slow.detach()


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_folded_conv_every_epilogue_on_both_paths(relu, with_residual, channels_last, device):
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(8, 12, 3, padding=1, stride=2, groups=4, bias=True), nn.BatchNorm2d(12)
    _randomize_bn(bn)
    bn.eval()
    conv, bn = conv.to(device), bn.to(device)
    fc = FoldedConv2d(conv, bn, relu=relu)
    assert (fc.in_channels, fc.out_channels, fc.kernel_size) == (8, 12, (3, 3))
    x, r = torch.randn(2, 8, 9, 9).to(device), torch.randn(2, 12, 5, 5).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    args = (x, r) if with_residual else (x,)
    with torch.no_grad():
        y = bn(conv(x)) + (r if with_residual else 0)
        expected = torch.relu(y) if relu else y
    for out in _both_paths(fc, *args):
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_folded_conv_repacks_for_a_new_shape_and_new_weights():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    fc = FoldedConv2d(conv, None, relu=True)
    with torch.no_grad():
        for shape in [(2, 4, 8, 8), (3, 4, 5, 7), (2, 4, 8, 8)]:
            x = torch.randn(shape)
            torch.testing.assert_close(fc(x), torch.relu(conv(x)), rtol=1e-5, atol=1e-5)
        fc.weight.mul_(-1)  # an in-place change of the weight must not be hidden by a cached packing
        torch.testing.assert_close(fc(x), torch.relu(-conv(x) + 2 * conv.bias.view(1, -1, 1, 1)), rtol=1e-5, atol=1e-5)
    copied = copy.deepcopy(fc)  # the packed weight (a oneDNN tensor) is not copied
    with torch.no_grad():
        torch.testing.assert_close(copied(x), fc(x))


def test_scale_output_pushes_a_per_channel_scale_into_the_conv():
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 5, 1), nn.BatchNorm2d(5)
    _randomize_bn(bn)
    bn.eval()
    fc = FoldedConv2d(conv, bn, relu=False)
    s = torch.randn(5)
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        expected = fc(x) * s.view(1, -1, 1, 1)
        fc.scale_output_(s)
        torch.testing.assert_close(fc(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("relu", [False, True])
def test_frozen_batchnorm_is_eval_batchnorm(relu, device):
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(6)
    _randomize_bn(bn)
    bn.eval().to(device)
    frozen = FrozenBatchNorm2d(bn, relu=relu)
    assert set(frozen.state_dict()) == {"weight", "bias", "running_mean", "running_var"}
    x = torch.randn(2, 6, 5, 5).to(device).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = torch.relu(bn(x)) if relu else bn(x)
        s, t = bn_scale_shift(bn)
        torch.testing.assert_close(bn(x), (x.double() * s.view(1, -1, 1, 1) + t.view(1, -1, 1, 1)).float())
    for out in _both_paths(frozen, x):
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="running statistics"):
        FrozenBatchNorm2d(nn.BatchNorm2d(6, track_running_stats=False), relu=True)


def test_sequential_with_its_own_forward_is_left_unless_it_opts_in():
    class ByName(nn.Sequential):  # reads a child by name: replacing it by Identity would break it
        def forward(self, x):
            return torch.relu(self.bn(self.conv(x)))

    class InOrder(nn.Sequential):
        foldable_runs = True

        def forward(self, x):
            for m in self:
                x = m(x)
            return x

    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6)
    for cls, folds in ((ByName, False), (InOrder, True)):
        model = cls()
        model.add_module("conv", nn.Conv2d(3, 4, 3))
        model.add_module("bn", nn.BatchNorm2d(4))
        model.add_module("relu", nn.ReLU())
        _randomize_bn(model.bn)
        model.eval()
        folded = fold_bn(model)
        assert isinstance(folded.conv, FoldedConv2d) is folds
        with torch.no_grad():
            torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


def test_folded_conv_non_contiguous_inputs_and_empty_batch():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    fc = FoldedConv2d(conv, None, relu=True)
    x = torch.randn(2, 8, 9, 9)[:, ::2, 1:, :-1]
    r = torch.randn(2, 6, 16, 8).transpose(2, 3)[:, :, :8, :8]
    assert not x.is_contiguous() and not r.is_contiguous()
    with torch.no_grad():
        torch.testing.assert_close(fc(x, r), torch.relu(conv(x) + r), rtol=1e-5, atol=1e-5)
        assert fc(torch.randn(0, 4, 5, 5)).shape == (0, 6, 5, 5)
