"""``bn_relu_conv`` / ``BNReLUConv2d`` (pre-activation BN-ReLU-conv) against eager
``nn.BatchNorm2d`` + ReLU + ``nn.Conv2d`` over several training steps and in eval.

On the compiled CPU backend a plain eager call is one autograd node with the BatchNorm inside
(``bn_fused_fwd``, the convolution, ``bn_fused_bwd``); on the others it is ``bn_stats`` ->
scale/shift -> ``bn_relu_conv2d``. Both must track eager: outputs, every gradient, the running
buffers and ``num_batches_tracked``. On CUDA (where a GPU is present) the comparison runs on
the triton, cuda and reference backends.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastblocks
from fastblocks.nn.conv import BNReLUConv2d, bn_relu_conv
from fastblocks.testing import max_abs_err
from tests.helpers import BACKENDS_UNDER_TEST, device_backends, skip_unless_available

CONFIGS = {
    "3x3-s2": dict(kernel_size=3, stride=2, padding=1),
    "1x1": dict(kernel_size=1),
    "groups2-bias-dil2": dict(kernel_size=3, padding=2, dilation=2, groups=2, bias=True),
}
BN_OPTIONS = {
    "default": {},
    "cumulative-noaffine": dict(momentum=None, affine=False),
    "untracked": dict(track_running_stats=False),
}


def _pair(cfg: dict, bn_opts: dict, c_in=4, c_out=6):
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(c_in, **bn_opts)
    if bn.affine:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    conv = nn.Conv2d(c_in, c_out, **cfg)
    eager = nn.Sequential(bn, nn.ReLU(), conv)
    fused = copy.deepcopy(eager)
    return eager, fused


def _step(eager, fused, x, grad, channels_last):
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    xe, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    ye = eager(xe)
    yf = bn_relu_conv(xf, fused[0], fused[2])
    ye.backward(grad)
    yf.backward(grad)
    return ye, yf, xe.grad, xf.grad


@pytest.mark.parametrize("device,backend", device_backends(BACKENDS_UNDER_TEST))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("bn_name", list(BN_OPTIONS))
@pytest.mark.parametrize("cfg_name", list(CONFIGS))
def test_tracks_eager_over_steps_and_eval(cfg_name, bn_name, channels_last, device, backend):
    skip_unless_available("bn_relu_conv2d", backend, device)
    eager, fused = (m.to(device) for m in _pair(CONFIGS[cfg_name], BN_OPTIONS[bn_name]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        out_shape = eager[2](torch.zeros(3, 4, 9, 8, device=device)).shape
    with fastblocks.use_backend(backend):
        for _ in range(3):
            x = (torch.randn(3, 4, 9, 8, generator=g) * 2 + 0.5).to(device)
            grad = torch.randn(out_shape, generator=g).to(device)
            ye, yf, gxe, gxf = _step(eager, fused, x, grad, channels_last)
            assert yf.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            assert max_abs_err(yf, ye) <= 1e-5
            assert max_abs_err(gxf, gxe) <= 1e-5
            for (name, pe), pf in zip(eager.named_parameters(), fused.parameters()):
                assert max_abs_err(pf.grad, pe.grad) <= 1e-4, name
                pe.grad = pf.grad = None
            for (name, be), bf in zip(eager.named_buffers(), fused.buffers()):
                assert torch.allclose(bf.double(), be.double(), rtol=1e-6, atol=1e-6), name
        eager.eval()
        fused.eval()
        x = torch.randn(2, 4, 9, 8, generator=g).to(device)
        grad = torch.randn(out_shape[1:]).to(device).expand(2, *out_shape[1:])
        ye, yf, gxe, gxf = _step(eager, fused, x, grad, channels_last)
        assert max_abs_err(yf, ye) <= 1e-5 and max_abs_err(gxf, gxe) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
def test_cpu_backend_runs_one_node(backend):
    """On the compiled CPU backend the BatchNorm runs inside the layer's node (no bn_stats, no
    separate statistics backward); elsewhere the layer is bn_stats + bn_relu_conv2d."""
    skip_unless_available("bn_relu_conv2d", backend, "cpu")
    layer = BNReLUConv2d(4, 5, 3, padding=1)
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    with fastblocks.use_backend(backend), torch.profiler.profile() as prof:
        layer(x).sum().backward()
    names = {e.name for e in prof.events()}
    one_node = backend == "cpu"
    assert ("fastblocks::bn_fused_fwd" in names) == one_node
    assert ("fastblocks::bn_fused_bwd" in names) == one_node
    assert any("bn_stats_eager" in n for n in names) != one_node  # ops._common.eager_function


@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_float64(backend, training):
    skip_unless_available("bn_relu_conv2d", backend, "cpu")
    torch.manual_seed(0)
    layer = BNReLUConv2d(3, 4, 3, stride=2, padding=1, bias=True).double()
    with torch.no_grad():
        layer.norm.running_mean.uniform_(-0.5, 0.5)
        layer.norm.running_var.uniform_(0.5, 1.5)
    layer.train(training)
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    params = (layer.norm.weight, layer.norm.bias, layer.conv.weight, layer.conv.bias)

    def f(x, *p):
        # Fresh buffers each call: gradcheck calls f many times.
        norm = copy.deepcopy(layer.norm)
        norm.weight, norm.bias = p[0], p[1]
        conv = copy.deepcopy(layer.conv)
        conv.weight, conv.bias = p[2], p[3]
        return bn_relu_conv(x, norm, conv)

    with fastblocks.use_backend(backend):
        assert torch.autograd.gradcheck(f, (x, *[torch.nn.Parameter(p.detach().clone()) for p in params]))


def test_one_value_per_channel_in_training_raises_like_torch():
    layer = BNReLUConv2d(3, 4, 1)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        layer(torch.randn(1, 3, 1, 1))
    assert int(layer.norm.num_batches_tracked) == 0


@pytest.mark.parametrize("bn_name", list(BN_OPTIONS))
def test_module_builds_the_batch_norm_it_is_given(bn_name):
    """BNReLUConv2d passes nn.BatchNorm2d's options to its norm (the constructor it shares with
    ConvBNReLU2d), keeps torchvision's key order (norm.*, then conv.*) and runs as the functional."""
    from fastblocks.nn import ConvBNReLU2d

    opts = BN_OPTIONS[bn_name]
    torch.manual_seed(0)
    module = BNReLUConv2d(4, 6, 3, padding=1, **opts)
    ref = nn.BatchNorm2d(4, **opts)
    assert list(module.state_dict()) == [f"norm.{k}" for k in ref.state_dict()] + ["conv.weight"]
    assert (module.norm.affine, module.norm.track_running_stats, module.norm.momentum) == (
        ref.affine, ref.track_running_stats, ref.momentum,
    )  # fmt: skip
    post = ConvBNReLU2d(4, 6, 3, padding=1, relu=False, **opts)
    assert list(post.state_dict()) == ["conv.weight"] + [f"bn.{k}" for k in nn.BatchNorm2d(6, **opts).state_dict()]
    assert post.bn.num_features == 6 and post.relu is False
    x = torch.randn(3, 4, 5, 5)
    eager = nn.Sequential(copy.deepcopy(module.norm), nn.ReLU(), copy.deepcopy(module.conv))
    assert max_abs_err(module(x), eager(x)) <= 1e-5


@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("bn_name", list(BN_OPTIONS))
@pytest.mark.parametrize("cfg_name", ["3x3-s2", "groups2-bias-dil2"])
def test_compiled_tracks_eager_over_steps_and_eval(cfg_name, bn_name, channels_last, backend):
    """Traced (fullgraph, AOTAutograd), the layer gives eager's outputs, gradients, running buffers
    and ``num_batches_tracked`` over training steps and in eval (float64). The compiled CPU
    backend runs the registered whole layer, the others bn_stats + bn_relu_conv2d."""
    skip_unless_available("bn_relu_conv2d", backend, "cpu")
    eager, fused = (m.double() for m in _pair(CONFIGS[cfg_name], BN_OPTIONS[bn_name]))
    torch._dynamo.reset()

    def layer(x: torch.Tensor) -> torch.Tensor:
        return bn_relu_conv(x, fused[0], fused[2])

    step = torch.compile(layer, backend="aot_eager", fullgraph=True)
    g = torch.Generator().manual_seed(1)
    with fastblocks.use_backend(backend):
        for training in (True, True, False):
            eager.train(training)
            fused.train(training)
            x = torch.randn(3, 4, 9, 8, generator=g, dtype=torch.float64) * 2 + 0.5
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            xf, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
            yf, ye = step(xf), eager(xe)
            grad = torch.randn(ye.shape, generator=g, dtype=torch.float64)
            yf.backward(grad)
            ye.backward(grad)
            assert max_abs_err(yf, ye) <= 1e-10 and max_abs_err(xf.grad, xe.grad) <= 1e-10
            for (name, pe), pf in zip(eager.named_parameters(), fused.parameters()):
                assert max_abs_err(pf.grad, pe.grad) <= 1e-9, name
                pe.grad = pf.grad = None
            for (name, be), bf in zip(eager.named_buffers(), fused.buffers()):
                assert torch.equal(bf, be) if be.dtype == torch.long else max_abs_err(bf, be) <= 1e-12, name


def test_compiled_cpu_backend_is_one_registered_op_each_way():
    """Under torch.compile on the compiled CPU backend the layer is ``fastblocks::batch_norm_relu_conv2d``
    forward and ``batch_norm_relu_conv2d_backward`` (one reduction and one dx pass for the
    BatchNorm), as a plain eager call is one node; not bn_stats + bn_relu_conv2d, whose backward
    adds the statistics' own x-sized pass and a dozen per-channel ops."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    from tests.helpers import require_compiled_kernels

    require_compiled_kernels("bn_fused_fwd", "bn_fused_bwd", dispatch_key="CPU")
    codes: list[str] = []

    def capture(gm: torch.fx.GraphModule, _inputs: list) -> object:
        codes.append(gm.code)
        return make_boxed_func(gm.forward)

    layer = BNReLUConv2d(4, 5, 3, padding=1)
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    torch._dynamo.reset()
    backend = aot_autograd(fw_compiler=capture, bw_compiler=capture)
    with fastblocks.use_backend("cpu"), torch.profiler.profile() as prof:
        torch.compile(layer, backend=backend, fullgraph=True)(x).sum().backward()
    forward, backward = codes
    assert "fastblocks.batch_norm_relu_conv2d.default" in forward
    assert "fastblocks.bn_stats" not in forward and "fastblocks.bn_relu_conv2d.default" not in forward
    assert "fastblocks.batch_norm_relu_conv2d_backward.default" in backward
    names = {e.name for e in prof.events()}
    assert {"fastblocks::bn_fused_fwd", "fastblocks::bn_fused_bwd"} <= names
    assert int(layer.norm.num_batches_tracked) == 1
