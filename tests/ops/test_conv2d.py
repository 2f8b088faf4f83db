"""``fastblocks::conv2d`` (ops/conv2d.py): a plain convolution as a registered op for traced fused
networks. It must be ``F.conv2d`` exactly (forward, every gradient, layouts, autocast), pass
``opcheck`` and float64 ``gradcheck``, and leave eager calls to the module itself."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from fastblocks.ops import conv2d as conv_op

# (c_in, c_out, kernel, stride, padding, dilation, groups, bias)
CONFIGS = [
    (4, 6, 1, 1, 0, 1, 1, False),
    (4, 6, 3, 2, 1, 1, 1, True),
    (4, 6, 3, 1, 2, 2, 2, False),
    (3, 5, 7, 2, 3, 1, 1, False),
]


def _args(cfg, dtype=torch.float64, channels_last=False, n=2, hw=(7, 6)):
    c_in, c_out, k, s, p, d, g, bias = cfg
    gen = torch.Generator().manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(n, c_in, *hw, generator=gen, dtype=dtype).contiguous(memory_format=fmt)
    w = torch.randn(c_out, c_in // g, k, k, generator=gen, dtype=dtype).contiguous(memory_format=fmt)
    b = torch.randn(c_out, generator=gen, dtype=dtype) if bias else None
    return x, w, b, [s, s], [p, p], [d, d], g


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_opcheck(cfg, channels_last):
    x, w, b, *rest = _args(cfg, torch.float32, channels_last)
    for t in (x, w, b):
        if t is not None:
            t.requires_grad_()
    torch.library.opcheck(conv_op._conv2d_op, (x, w, b, *rest))


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_gradcheck_float64(cfg):
    x, w, b, *rest = _args(cfg, n=1, hw=(5, 4))
    inputs = [t.requires_grad_() for t in (x, w, b) if t is not None]

    def f(*ts):
        return conv_op._conv2d_op(ts[0], ts[1], ts[2] if len(ts) > 2 else None, *rest)

    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_same_bits_as_f_conv2d(cfg, channels_last):
    x, w, b, s, p, d, g = _args(cfg, torch.float32, channels_last)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    ws = [w.clone().requires_grad_() for _ in range(2)]
    bs = [None if b is None else b.clone().requires_grad_() for _ in range(2)]
    y = conv_op._conv2d_op(xs[0], ws[0], bs[0], s, p, d, g)
    want = F.conv2d(xs[1], ws[1], bs[1], s, p, d, g)
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert torch.equal(y, want)
    grad = torch.randn_like(want)
    y.backward(grad)
    want.backward(grad)
    assert torch.equal(xs[0].grad, xs[1].grad) and torch.equal(ws[0].grad, ws[1].grad)
    if b is not None:
        assert torch.equal(bs[0].grad, bs[1].grad)


def test_module_runs_itself_eagerly_and_the_op_when_traced():
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=False)
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    assert conv_op.conv2d_module(x, conv).grad_fn.name() == "ConvolutionBackward0"  # nn.Conv2d's own node
    x = x.detach()
    gm = torch.fx.experimental.proxy_tensor.make_fx(lambda t: conv_op.conv2d_module(t, conv))(x)
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert torch.ops.fastblocks.conv2d.default in targets and torch.ops.aten.convolution.default not in targets


def test_traced_under_autocast_casts_as_eager_does():
    conv = nn.Conv2d(4, 6, 3, padding=1)
    x = torch.randn(2, 4, 5, 5)
    compiled = torch.compile(lambda t: conv_op.conv2d_module(t, conv), backend="aot_eager", fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, want = compiled(x), conv(x)
    assert y.dtype == want.dtype == torch.bfloat16
    assert torch.equal(y, want)


def test_traced_conv_bn_relu_holds_no_aten_convolution():
    """``fastblocks.nn.conv.conv_bn_relu`` (ConvBNReLU2d) traced: its convolution is the registered op."""
    from fastblocks.nn.conv import conv_bn_relu

    conv, bn = nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
    x = torch.randn(2, 4, 5, 5)
    gm = torch.fx.experimental.proxy_tensor.make_fx(lambda t: conv_bn_relu(t, conv, bn))(x)
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert torch.ops.fastblocks.conv2d.default in targets and torch.ops.aten.convolution.default not in targets
