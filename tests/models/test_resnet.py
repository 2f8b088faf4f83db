"""ResNet family (fastblocks.models.resnet): torchvision's state_dicts, fused == eager twin, variants, errors, memory."""

from __future__ import annotations

import functools
import hashlib
import json
import pathlib

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from fastblocks.models import fuse, unfuse
from fastblocks.models import resnet as R
from fastblocks.nn import BatchNorm2d as FastBatchNorm2d
from fastblocks.nn import BatchNormReLU2d, BNAddReLU
from fastblocks.testing import saved_tensor_bytes
from tests.helpers import RecordOps, devices, to_device
from tests.models.resnet_twins import assert_same_training, condition, twins

# A copy of shared/reference/torchvision_models.json (torchvision 0.29.2 state_dict keys and shapes).
REFERENCE = pathlib.Path(__file__).resolve().parents[1] / "data" / "torchvision_models.json"

# torchvision's (num_params, number of state_dict keys, sha256 of "key:shape" lines) from
# shared/reference/torchvision_models.json, so the suite also checks a clean clone without it.
TORCHVISION = {
    "resnet18": (11_689_512, 122, "3e58b0798c806a0c"),
    "resnet34": (21_797_672, 218, "97e365907d64da74"),
    "resnet50": (25_557_032, 320, "781bb16f43b8f96f"),
    "resnet101": (44_549_160, 626, "708e8813e2eb3461"),
    "resnet152": (60_192_808, 932, "9e3321003337a848"),
    "resnext50_32x4d": (25_028_904, 320, "7140c3dbddac5382"),
    "resnext101_32x8d": (88_791_336, 626, "d8d4f6f347fc1097"),
    "resnext101_64x4d": (83_455_272, 626, "b1642e95df84809d"),
    "wide_resnet50_2": (68_883_240, 320, "31ec3ad967f7b3b9"),
    "wide_resnet101_2": (126_886_696, 626, "b36705398a51e311"),
}

SMALL = {"num_classes": 10}


@functools.cache
def _reference() -> dict | None:
    return json.loads(REFERENCE.read_text())["models"] if REFERENCE.exists() else None


def _shapes(model: nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def _digest(shapes: dict[str, list[int]]) -> str:
    text = "\n".join(f"{k}:{tuple(v)}" for k, v in shapes.items())
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _tiny(block: type, **kwargs: object):
    """A one-block-per-stage ImageNet ResNet builder (fast twins)."""
    return functools.partial(R.ResNet, block, [1, 1, 1, 1], num_classes=10, **kwargs)


# ----------------------------------------------------------------------------- torchvision compatibility
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "eager"])
@pytest.mark.parametrize("name", sorted(TORCHVISION))
def test_state_dict_matches_torchvision(name: str, fused: bool) -> None:
    with torch.device("meta"):
        model = getattr(R, name)(fused=fused)
    shapes = _shapes(model)
    ref = _reference()
    if ref is not None:
        expected = ref[name]["state_dict"]
        assert list(shapes) == list(expected), set(shapes) ^ set(expected)
        assert shapes == expected
    num_params, num_keys, digest = TORCHVISION[name]
    assert sum(p.numel() for p in model.parameters()) == num_params
    assert len(shapes) == num_keys
    assert _digest(shapes) == digest
    assert model.fused is fused
    last = model.layer4[-1]
    assert type(getattr(last, last._last_bn)) is (BNAddReLU if fused else nn.BatchNorm2d)
    assert type(model.bn1) is (BatchNormReLU2d if fused else nn.BatchNorm2d)
    assert hasattr(model, "relu") is not fused


def test_same_seed_same_weights_fused_and_eager() -> None:
    torch.manual_seed(0)
    a = R.resnet18(fused=True)
    torch.manual_seed(0)
    b = R.resnet18(fused=False)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k


def test_load_state_dict_both_ways() -> None:
    torch.manual_seed(0)
    fused = R.resnet50(fused=True)
    torch.manual_seed(1)
    eager = R.resnet50(fused=False)
    condition(eager)
    fused.load_state_dict(eager.state_dict(), strict=True)
    for (k, v), w in zip(fused.state_dict().items(), eager.state_dict().values()):
        assert torch.equal(v, w), k
    torch.manual_seed(2)
    other = R.resnet50(fused=True)
    eager.load_state_dict(other.state_dict(), strict=True)
    for (k, v), w in zip(eager.state_dict().items(), other.state_dict().values()):
        assert torch.equal(v, w), k


def test_eager_twin_is_torchvision_forward() -> None:
    from tests.models import torchvision_resnet as tv

    torch.manual_seed(0)
    ref = tv.resnet50(num_classes=10)
    condition(ref)
    ours = R.resnet50(fused=False, num_classes=10)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=0)  # the same ops in the same order
    for (k, a), b in zip(ours.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), k


# ----------------------------------------------------------------------------- fused == eager twin
# The CUDA cases (``device``) run both twins on the GPU behind a CPU interface (tests/helpers.py:
# ``to_device``): resnet_twins.assert_same_training builds its batches on the CPU.
@pytest.mark.parametrize("device", devices())
def test_twin_resnet18_training(device: str) -> None:
    assert_same_training(*to_device(twins(R.resnet18, **SMALL), device))


@pytest.mark.slow
def test_twin_resnet50_training() -> None:
    assert_same_training(*twins(R.resnet50, **SMALL))


@pytest.mark.parametrize("device", devices())
def test_twin_resnet18_channels_last(device: str) -> None:
    fused, eager = to_device(twins(R.resnet18, **SMALL), device)
    assert_same_training(fused, eager, steps=2, channels_last=True)
    out = fused.train()(torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last))
    assert out.shape == (2, 10)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("variant", R.BLOCK_VARIANTS)
def test_twin_block_variants(variant: str, device: str) -> None:
    # Bottleneck variants here; BasicBlock variants on resnet20 in test_cifar.py (same code, cheaper).
    fused, eager = twins(_tiny(R.Bottleneck, block_variant=variant))
    assert fused.block_variant == variant
    assert_same_training(*to_device((fused, eager), device), steps=2)


@pytest.mark.parametrize("variant", R.BLOCK_VARIANTS)
def test_variant_keys(variant: str) -> None:
    with torch.device("meta"):
        fused = R.resnet50(block_variant=variant)
        eager = R.resnet50(block_variant=variant, fused=False)
    shapes = _shapes(fused)
    assert shapes == _shapes(eager)
    assert sum(p.numel() for p in fused.parameters()) == sum(p.numel() for p in eager.parameters())
    if variant != "preact":
        assert _digest(shapes) == TORCHVISION["resnet50"][2]  # parameters stay where torchvision has them
        return
    # Pre-activation: BNs precede their convs; no stem BN; bare projection shortcuts; bn_final before the pool.
    assert "bn1.weight" not in shapes and shapes["bn_final.weight"] == [2048]
    assert shapes["layer1.0.bn1.weight"] == [64]  # normalizes the block input
    assert shapes["layer2.0.bn1.weight"] == [256] and shapes["layer2.0.bn3.weight"] == [128]
    assert "layer2.0.downsample.1.weight" not in shapes and shapes["layer2.0.downsample.0.weight"] == [512, 256, 1, 1]
    assert all(type(m) is BatchNormReLU2d for m in fused.modules() if isinstance(m, nn.BatchNorm2d))


@pytest.mark.parametrize("variant", ["original", "preact"])
def test_twin_stride_on_1x1(variant: str) -> None:
    fused, eager = twins(_tiny(R.Bottleneck, stride_on_1x1=True, block_variant=variant))
    assert fused.layer2[0].conv1.stride == (2, 2) and fused.layer2[0].conv2.stride == (1, 1)
    with torch.device("meta"):
        v15 = R.resnet50()
    assert v15.layer2[0].conv1.stride == (1, 1) and v15.layer2[0].conv2.stride == (2, 2)
    assert_same_training(fused, eager, steps=1)


def test_twin_dilation() -> None:
    fused, eager = twins(_tiny(R.Bottleneck, replace_stride_with_dilation=[False, True, True]))
    assert fused.output_stride == 8 and fused.min_input_size == 8
    # torchvision's rule: a dilated stage's first block keeps the previous dilation.
    assert fused.layer3[0].conv2.dilation == (1, 1) and fused.layer4[0].conv2.dilation == (2, 2)
    assert_same_training(fused, eager, (2, 3, 32, 32), steps=2)


def test_twin_shortcut_a_and_plain() -> None:
    assert_same_training(*twins(_tiny(R.Bottleneck, shortcut="A")), steps=2)
    assert_same_training(*twins(_tiny(R.BasicBlock, shortcut=None)), steps=2)


def test_twin_resnext_grouped() -> None:
    assert_same_training(*twins(_tiny(R.Bottleneck, groups=4, width_per_group=8)), steps=2)


def test_plain_imagenet_nets() -> None:
    for name, ref in (("plain18", "resnet18"), ("plain34", "resnet34")):
        with torch.device("meta"):
            plain, res = getattr(R, name)(), getattr(R, ref)()
        shapes = _shapes(plain)
        assert not any("downsample" in k for k in shapes)
        assert {k: v for k, v in _shapes(res).items() if "downsample" not in k} == shapes
        assert all(not b.residual for b in plain.modules() if isinstance(b, R.BasicBlock))


# ----------------------------------------------------------------------------- fuse / unfuse, options
def test_unfuse_and_fuse_round_trip() -> None:
    fused, _ = twins(R.resnet18, **SMALL)
    eager = unfuse(fused)
    assert fused.fused and not eager.fused and eager is not fused
    assert not any(isinstance(m, FastBatchNorm2d) for m in eager.modules())
    assert all(isinstance(getattr(b, "relu", None), nn.ReLU) for b in eager.modules() if isinstance(b, R.BasicBlock))
    assert list(eager.state_dict()) == list(fused.state_dict())
    again = fuse(eager)
    assert again.fused and type(again.layer1[0].bn2) is BNAddReLU and not hasattr(again.layer1[0], "relu")
    x = torch.randn(2, 3, 64, 64)
    for m in (fused, eager, again):
        m.eval()
    with torch.no_grad():
        ref = eager(x)
        torch.testing.assert_close(fused(x), ref, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(again(x), ref, rtol=1e-4, atol=1e-5)
    # Copies share nothing: training one leaves the other alone.
    before = fused.layer1[0].bn1.running_mean.clone()
    eager.train()(x)
    assert torch.equal(fused.layer1[0].bn1.running_mean, before)
    with pytest.raises(TypeError, match=r"fastblocks.convert"):
        fuse(nn.Sequential(nn.Conv2d(3, 3, 1)))
    with pytest.raises(TypeError, match="no fastblocks blocks"):
        unfuse(nn.Linear(2, 2))


def test_custom_norm_layer_builds_eager_blocks() -> None:
    model = R.resnet18(norm_layer=lambda c: nn.GroupNorm(8, c), **SMALL)
    assert not model.fused
    assert not any(isinstance(m, FastBatchNorm2d) for m in model.modules())
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)  # no BatchNorm: a batch of one trains
    with pytest.raises(ValueError, match="GroupNorm"):
        fuse(model)
    # A BatchNorm factory with other hyperparameters still fuses, keeping them.
    bn = functools.partial(nn.BatchNorm2d, eps=1e-3, momentum=0.01)
    model = R.resnet18(norm_layer=bn, **SMALL)
    assert model.fused and type(model.layer1[0].bn2) is BNAddReLU
    assert model.layer1[0].bn2.eps == 1e-3 and model.layer1[0].bn2.momentum == 0.01


def test_zero_init_residual() -> None:
    for block_cls, last in ((R.Bottleneck, "bn3"), (R.BasicBlock, "bn2")):
        for variant in ("original", "relu_before_add", "preact"):
            model = R.ResNet(block_cls, [1, 1, 1, 1], zero_init_residual=True, block_variant=variant)
            blocks = [m for m in model.modules() if isinstance(m, (R._ResidualBlock, R._PreActBlock))]
            assert len(blocks) == 4
            for block in blocks:
                assert torch.count_nonzero(getattr(block, last).weight) == 0, (variant, last)
                assert torch.count_nonzero(block.bn1.weight) == block.bn1.num_features
    with pytest.raises(ValueError, match="bn_after_add"):
        R.resnet18(zero_init_residual=True, block_variant="bn_after_add")
    with pytest.raises(ValueError, match="plain network"):
        R.plain18(zero_init_residual=True)


def test_builder_arguments() -> None:
    with pytest.raises(ValueError, match=r"load_state_dict\(torch.load\(path"):
        R.resnet50(weights="IMAGENET1K_V2")
    with pytest.raises(ValueError, match="'groups' expected value 32"):
        R.resnext50_32x4d(groups=16)
    with torch.device("meta"):
        R.resnext50_32x4d(groups=32, progress=False)  # the same value is accepted, as torchvision
    with pytest.raises(ValueError, match="groups=1 and base_width=64"):
        R.resnet18(groups=2)
    with pytest.raises(NotImplementedError, match="Dilation"):
        R.resnet18(replace_stride_with_dilation=[False, False, True])
    with pytest.raises(ValueError, match="3-element"):
        R.resnet50(replace_stride_with_dilation=[True])
    with pytest.raises(ValueError, match="block_variant must be one of"):
        R.resnet50(block_variant="post")
    with pytest.raises(ValueError, match="shortcut must be"):
        R.resnet50(shortcut="C")
    with pytest.raises(ValueError, match="plain network has none"):
        R.plain18(block_variant="bn_after_add")


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "eager"])
def test_bad_input_errors(fused: bool) -> None:
    model = R.resnet50(fused=fused, **SMALL)
    assert model.min_input_size == 32 and model.output_stride == 32
    with pytest.raises(ValueError, match="3 channels, got 1"):
        model(torch.randn(2, 1, 64, 64))
    with pytest.raises(ValueError, match=r"1x1 pixels is too small.*at least 32x32"):
        model(torch.randn(2, 3, 1, 1))
    with pytest.raises(ValueError, match="31x64 pixels is too small"):
        model(torch.randn(2, 3, 31, 64))
    with pytest.raises(TypeError, match=r"floating-point.*int64"):
        model(torch.randint(0, 255, (2, 3, 64, 64)))
    with pytest.raises(TypeError, match="float64 but the model's parameters are float32"):
        model(torch.randn(2, 3, 64, 64, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"4-D \[N, C, H, W\].*\(3, 64, 64\)"):
        model(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match="empty batch"):
        model(torch.randn(0, 3, 64, 64))
    with pytest.raises(TypeError, match=r"torch.Tensor"):
        model([[0.0]])
    with pytest.raises(ValueError, match="one value per channel for the last BatchNorm"):
        model.train()(torch.randn(1, 3, 32, 32))
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)  # fine in eval
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(torch.randn(1, 3, 32, 32, dtype=torch.bfloat16)).shape == (1, 10)


# ----------------------------------------------------------------------------- torch.compile
@pytest.mark.slow
def test_compile_aot_eager_matches_eager() -> None:
    fused, eager = twins(R.resnet18, **SMALL)
    compiled = torch.compile(fused, backend="aot_eager")
    x = torch.randn(2, 3, 64, 64)
    target = torch.tensor([1, 7])
    out_c = compiled(x)
    F.cross_entropy(out_c, target).backward()
    out_e = eager(x)
    F.cross_entropy(out_e, target).backward()
    torch.testing.assert_close(out_c, out_e, rtol=1e-4, atol=1e-5)
    named = dict(eager.named_parameters())
    for name, p in fused.named_parameters():
        torch.testing.assert_close(p.grad, named[name].grad, rtol=1e-4, atol=1e-5, msg=name)
    named_b = dict(eager.named_buffers())
    for name, b in fused.named_buffers():
        if b.dtype == torch.long:
            assert torch.equal(b, named_b[name]), name  # running stats updated once, also when compiled
        else:
            torch.testing.assert_close(b, named_b[name], rtol=1e-4, atol=1e-5, msg=name)


# ----------------------------------------------------------------------------- memory contract
def _saved_bytes(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """(all bytes saved for backward, those that are not the model's own parameters/buffers).

    The first is :func:`fastblocks.testing.saved_tensor_bytes`'s count, the second the same count
    (storages de-duplicated) without the weights, in a second training forward.
    """
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    activations: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in own:
            activations[st.data_ptr()] = max(activations.get(st.data_ptr(), 0), st.nbytes())
        return t

    _, total = saved_tensor_bytes(model, x)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return total, sum(activations.values())


@functools.cache
def _resnet50_saved_ratios(memory_efficient: bool | None = None) -> tuple[float, float]:
    """(all saved bytes, activations only) of fused / eager resnet50, training forward on 2x3x64x64."""
    fused, eager = R.resnet50(fused=True, memory_efficient=memory_efficient), R.resnet50(fused=False)
    x = torch.randn(2, 3, 64, 64)
    (total_f, act_f), (total_e, act_e) = _saved_bytes(fused, x), _saved_bytes(eager, x)
    return total_f / total_e, act_f / act_e


def test_memory_saved_bytes_resnet50() -> None:
    total, activations = _resnet50_saved_ratios(True)
    # memory_efficient=True, measured: activations only 0.509 (total 0.939: the 102 MB of weights
    # the convolutions save dominate at 64x64). Per bottleneck the fused model keeps the block
    # input and conv1's and conv2's outputs, 6 units of width*H*W against eager's 12: the tail
    # relu(bn3(conv3(relu(bn2(.)))) + identity) recomputes conv3's input and output, and the
    # stem keeps the image and one byte per pooled output, the max-pool's winners (it recomputes
    # its conv).
    assert total <= 0.939 + 0.01, total
    assert activations <= 0.509 + 0.02, activations
    # The default keeps layer3's and layer4's tail outputs (conv3's, 4 units each): measured 0.585.
    _, default = _resnet50_saved_ratios(None)
    assert activations + 0.05 <= default <= 0.585 + 0.01, default


def test_memory_target_60_percent() -> None:
    """The issue's target: fused ResNet-50 keeps at most 60% of its eager twin's activation bytes."""
    _, activations = _resnet50_saved_ratios(None)
    assert activations <= 0.60


@pytest.mark.parametrize(
    ("name", "kept"),
    [("resnet50", [0, 0, 6, 3]), ("resnet101", [0, 0, 11, 3]), ("resnet152", [0, 0, 18, 3])],
)
def test_default_keeps_the_smallest_tails(name: str, kept: list[int]) -> None:
    """memory_efficient=None keeps the tails of the last blocks (the smallest outputs, 2x smaller
    per stage, the same recomputation each), up to about 10% of eager's saved activations."""
    model = getattr(R, name)(num_classes=10)
    layers = [model.layer1, model.layer2, model.layer3, model.layer4]
    assert [sum(not b.recompute_tail for b in layer) for layer in layers] == kept
    layer3 = [b.recompute_tail for b in model.layer3]
    assert layer3 == sorted(layer3, reverse=True)  # the latest blocks of a stage keep theirs first
    for flag, expected in ((True, True), (False, False)):
        model = getattr(R, name)(num_classes=10, memory_efficient=flag)
        assert all(b.recompute_tail is expected for b in model.modules() if isinstance(b, R.Bottleneck))
    with pytest.raises(TypeError, match="memory_efficient"):
        R.resnet50(memory_efficient="yes")


def test_memory_efficient_false_keeps_conv_outputs_and_matches() -> None:
    """memory_efficient=False: no recomputed convolution (more saved bytes), same numbers.

    Compared in float64: the plans round differently (a recomputing tail is one node, a kept
    one a BN-ReLU-conv node and a BN-add-ReLU), and in fp32 this two-image, 64x64 ResNet-50
    amplifies rounding to about 2% of the stem's weight gradient (against eager too)."""
    torch.manual_seed(0)
    lean, fast = R.resnet50(num_classes=10, memory_efficient=True), R.resnet50(num_classes=10, memory_efficient=False)
    default = R.resnet50(num_classes=10)
    fast.load_state_dict(lean.state_dict())
    default.load_state_dict(lean.state_dict())
    for m in (lean, fast, default):
        m.double()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    (_, act_lean), (_, act_fast) = _saved_bytes(lean, x), _saved_bytes(fast, x)
    _saved_bytes(default, x)  # the same training forwards (running statistics) as the others
    assert act_fast > 1.5 * act_lean
    outs = []
    for m in (lean, fast, default):
        xl = x.clone().requires_grad_()
        m(xl).square().mean().backward()
        outs.append((m(x).detach(), xl.grad, m.layer1[0].conv3.weight.grad, m.conv1.weight.grad))
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    for name, buf in lean.state_dict().items():
        for m in (fast, default):
            torch.testing.assert_close(buf, m.state_dict()[name], rtol=1e-9, atol=1e-12, msg=name)


class _ConvInputLayouts(RecordOps):
    """:class:`~tests.helpers.RecordOps` that also records ``(op, channels_last)`` for every
    convolution-running op, forward and backward: its activation (or gradient) operand, args[0].
    Under a dispatch mode a fused network calls its registered ops (``fastblocks::stem``,
    ``fastblocks::conv2d``, ...), which this sees as they are."""

    def __init__(self) -> None:
        super().__init__()
        self.layouts: list[tuple[str, bool]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        if ("conv" in name or "stem" in name) and isinstance(args[0], torch.Tensor) and args[0].dim() == 4:
            self.layouts.append((name, args[0].is_contiguous(memory_format=torch.channels_last)))
        return super().__torch_dispatch__(func, types, args, kwargs)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "eager"])
def test_fused_network_runs_channels_last_on_the_cpu(fused: bool) -> None:
    """On the CPU a fused ResNet fed NCHW runs channels_last from its first convolution on (the
    stem's, recomputed in backward, included), where oneDNN's convolutions are faster
    (``fastblocks._backend.body_layout``); the eager twin runs the input's format. The input's
    gradient keeps the input's format either way."""
    torch.manual_seed(0)
    model = R.resnet18(fused=fused)
    seen: list[bool] = []
    model.layer1.register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    with _ConvInputLayouts() as convs:
        model(x).sum().backward()
    assert seen == [fused]
    if fused:
        assert {"fastblocks.stem.default", "fastblocks.stem_backward.default"} <= convs.seen
    else:
        assert "aten.convolution.default" in convs.seen
    assert len(convs.layouts) > 20 and all(cl == fused for _, cl in convs.layouts), convs.layouts
    assert x.grad.is_contiguous()
