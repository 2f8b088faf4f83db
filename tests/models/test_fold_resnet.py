"""Inference folding of the ResNet family (fold_bn_ of every block and model): same outputs as eval, no BN left.

Folded outputs are compared against an fp64 evaluation of the eager twin with the same weights:
the folded model must be at least as close to it as eager fp32 is (err_folded <= 2 err_eager
+ a small atol), the project's tolerance rule. BatchNorm statistics and affine parameters are
randomized (or trained for a few steps), so that folding is not the identity.
"""

from __future__ import annotations

import copy
import functools
import io

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from fastblocks.models import cifar, fuse, unfuse
from fastblocks.models import resnet as R
from fastblocks.nn.fold import FoldedConv2d, FrozenBatchNorm2d, fold_bn

VARIANTS = ("original", "bn_after_add", "relu_before_add", "preact")
ONEDNN = torch.backends.mkldnn.is_available()


def _tiny(block: type, **kwargs: object):
    """A one-block-per-stage ImageNet ResNet builder (its stem has the max pooling)."""
    return functools.partial(R.ResNet, block, [1, 1, 1, 1], num_classes=10, **kwargs)


def _tiny_cifar(block: type, **kwargs: object):
    """A one-block-per-stage, narrow CIFAR ResNet builder (fast: the variant matrix runs on it)."""
    return functools.partial(cifar.CifarResNet, block, [1, 1, 1], widths=(8, 16, 32), **kwargs)


def _randomize_bn(model: nn.Module, seed: int = 1) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.rand(c, generator=g) - 0.5)
    return model


def _build(builder, *, fused: bool, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return _randomize_bn(builder(fused=fused)).eval()


def _assert_folds_exactly(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """fold_bn(model)(x) is as close to the fp64 eager result as model.eval()(x) is; returns the folded model."""
    folded = fold_bn(model)
    eager = model if not getattr(model, "fused", False) else unfuse(model)
    with torch.no_grad():
        ref = copy.deepcopy(eager).double().eval()(x.double())
        out_eval = model.eval()(x)
        out_folded = folded(x)
    assert out_folded.shape == ref.shape and out_folded.dtype == x.dtype
    err_eval = (out_eval.double() - ref).abs().max().item()
    err_folded = (out_folded.double() - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err_folded <= 2 * err_eval + 1e-6 * scale, (err_folded, err_eval, scale)
    return folded


def _bn_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))]


# ----------------------------------------------------------------------------- outputs
@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("block", [R.BasicBlock, R.Bottleneck], ids=["basic", "bottleneck"])
def test_every_block_variant_folds_to_eval_outputs(block, variant, fused):
    model = _build(_tiny_cifar(block, block_variant=variant, shortcut="B"), fused=fused)
    folded = _assert_folds_exactly(model, torch.randn(2, 3, 16, 16))
    if variant == "preact":  # only the BNs with a ReLU before the next conv, and none after the stem
        assert all(isinstance(m, FrozenBatchNorm2d) for m in _bn_modules(folded))
        assert len(_bn_modules(folded)) == 3 + 1  # bn1 of each block + bn_final
    else:
        assert _bn_modules(folded) == []


@pytest.mark.parametrize("variant", VARIANTS)
def test_shortcut_a_and_v1_stride_fold(variant):
    builder = _tiny_cifar(R.Bottleneck, block_variant=variant, shortcut="A", stride_on_1x1=True)
    _assert_folds_exactly(_build(builder, fused=False), torch.randn(2, 3, 16, 16))


@pytest.mark.parametrize("variant", VARIANTS)
def test_imagenet_stem_folds_in_every_variant(variant):
    _assert_folds_exactly(_build(_tiny(R.BasicBlock, block_variant=variant), fused=True), torch.randn(2, 3, 32, 32))


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("resnet18", {}),
        ("resnet50", {}),
        ("resnext50_32x4d", {}),
        ("plain18", {}),
    ],
)
def test_torchvision_resnets_fold_to_one_call_per_conv(name, kwargs):
    model = _build(functools.partial(getattr(R, name), num_classes=10, **kwargs), fused=True)
    folded = _assert_folds_exactly(model, torch.randn(2, 3, 32, 32))
    assert _bn_modules(folded) == [] and not any(isinstance(m, nn.ReLU) for m in folded.modules())
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    folded_convs = [m for m in folded.modules() if isinstance(m, FoldedConv2d)]
    assert len(folded_convs) == len(convs) and not any(isinstance(m, nn.Conv2d) for m in folded.modules())
    # Every conv + BN (+ ReLU) is one FoldedConv2d call; each block's last one gets the residual.
    calls: list[tuple[bool, bool]] = []
    hooks = [m.register_forward_pre_hook(lambda m, args: calls.append((m.relu, len(args) > 1))) for m in folded_convs]
    with torch.no_grad():
        folded(torch.randn(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    blocks = [m for m in model.modules() if isinstance(m, R._ResidualBlock)]
    downsamples = sum(b.downsample is not None for b in blocks)
    assert len(calls) == len(convs)
    assert calls.count((True, True)) == (len(blocks) if model.shortcut else 0)
    assert calls.count((False, False)) == downsamples  # projection: conv + BN, no ReLU


@pytest.mark.parametrize(
    "builder",
    [
        functools.partial(cifar.resnet20, shortcut="A"),
        functools.partial(cifar.resnet20, shortcut="B"),
        cifar.plain20,
        functools.partial(cifar.resnet20, block_variant="preact"),
    ],
    ids=["resnet20-A", "resnet20-B", "plain20", "resnet20-preact"],
)
@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
def test_cifar_models_fold(builder, fused):
    folded = _assert_folds_exactly(_build(builder, fused=fused), torch.randn(2, 3, 32, 32))
    assert all(isinstance(m, FrozenBatchNorm2d) for m in _bn_modules(folded))


def test_trained_statistics_fold_and_channels_last():
    """BN statistics from real training steps; channels_last input; the original model is untouched."""
    torch.manual_seed(0)
    model = cifar.resnet20(fused=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model = fuse(model).eval()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    folded = _assert_folds_exactly(model, x)
    with torch.no_grad():
        torch.testing.assert_close(folded(x.contiguous()), folded(x), rtol=1e-5, atol=1e-5)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert model.fused and isinstance(model.bn1, nn.BatchNorm2d)


def test_bn_without_running_stats_is_left_unfolded():
    def norm(c: int) -> nn.Module:
        return nn.BatchNorm2d(c, track_running_stats=False)

    torch.manual_seed(0)
    model = cifar.resnet20(norm_layer=norm, fused=False).eval()
    folded = fold_bn(model)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x))
    assert len(_bn_modules(folded)) == len(_bn_modules(model))


# ----------------------------------------------------------------------------- properties of a folded model
def test_folded_model_copies_saves_and_needs_no_grad():
    model = _build(functools.partial(cifar.resnet20, shortcut="B"), fused=False)
    folded = fold_bn(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        expected = folded(x)  # fills the packed-weight caches
    assert not any(p.requires_grad for p in folded.parameters())
    assert "conv1.bias" in folded.state_dict() and not any(
        ".bn" in k or k.startswith("bn") for k in folded.state_dict()
    )
    buffer = io.BytesIO()
    torch.save(copy.deepcopy(folded), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected)
    # An input that requires grad takes the differentiable aten path: saliency maps work.
    xg = x.clone().requires_grad_(True)
    loaded(xg).sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="folded for inference"):
        fuse(folded)
    with pytest.raises(ValueError, match="folded for inference"):
        unfuse(folded)


@pytest.mark.skipif(not ONEDNN, reason="oneDNN (mkldnn) not available")
def test_cpu_eval_runs_onednn_fused_post_ops():
    """Every conv of the folded ResNet-50 is one oneDNN call with its bias/add/ReLU post-ops."""
    folded = fold_bn(_build(functools.partial(R.resnet50, num_classes=10), fused=False))
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        folded(torch.randn(1, 3, 32, 32))
    counts = {e.key: e.count for e in prof.key_averages()}
    assert counts.get("mkldnn::_convolution_pointwise", 0) == 53  # 49 + 4 projections
    assert not any(k in counts for k in ("aten::conv2d", "aten::add", "aten::relu", "aten::batch_norm"))


# ----------------------------------------------------------------------------- export / compile
def _aten_only(program: torch.export.ExportedProgram) -> set[str]:
    """Namespaces of the ops the exported graph calls, other than aten."""
    nodes = [n for n in program.graph.nodes if n.op == "call_function" and hasattr(n.target, "namespace")]
    assert nodes
    return {n.target.namespace for n in nodes} - {"aten"}


@pytest.mark.parametrize(
    "builder, size",
    [
        (functools.partial(R.resnet18, num_classes=10), 32),
        (functools.partial(cifar.resnet20, block_variant="preact"), 32),
    ],
    ids=["resnet18", "resnet20-preact"],
)
def test_folded_model_exports_to_portable_aten_ops(builder, size):
    model = _build(builder, fused=True)
    folded = fold_bn(model)
    x = torch.randn(2, 3, size, size)
    program = torch.export.export(folded, (x,))
    assert _aten_only(program) == set()
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), folded(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(program.module()(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_folded_model_compiles():
    model = _build(functools.partial(cifar.resnet20, shortcut="B"), fused=False)
    folded = fold_bn(model)
    x = torch.randn(2, 3, 32, 32)
    torch._dynamo.reset()
    compiled = torch.compile(folded, fullgraph=True)  # no graph break: the aten path under compile
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)
