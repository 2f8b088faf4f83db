"""The bottleneck tail ``relu(BN(conv(relu(x*scale+shift))) + identity)`` against its reference.

The BatchNorm arithmetic runs on the BatchNorm kernels of each backend (reference, Triton in
the interpreter, the compiled CPU kernels; on a GPU compiled Triton and the CUDA kernels); the
convolutions are PyTorch's everywhere (cuDNN on CUDA, TF32 off: tests/conftest.py).
"""

from __future__ import annotations

import pytest
import torch

import fastblocks
from fastblocks.ops.bn_relu_conv_bn_add_relu import (
    bn_relu_conv_bn_add_relu2d,
    bn_relu_conv_bn_add_relu2d_reference,
)
from fastblocks.testing import assert_close_to_reference, saved_tensor_bytes
from tests.helpers import BACKENDS_UNDER_TEST, device_backends, devices, skip_bf16_in_interpreter, skip_unless_available

OP = "batch_norm_act"
# (N, C_in, C_out, H, W, kernel, stride, padding)
CASES = [(2, 5, 12, 7, 7, 1, 1, 0), (1, 13, 17, 9, 9, 3, 2, 1), (3, 8, 16, 5, 6, 1, 2, 0)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float64: 1e-10}
GRAD_NAMES = ["y", "dx", "dscale", "dshift", "dweight", "didentity", "dbn_weight", "dbn_bias"]
# (device, backend): every backend on the CPU (those that cannot run skip), CUDA's on a GPU.
RUNS = device_backends(BACKENDS_UNDER_TEST)


def _inputs(case, seed=0, device="cpu"):
    """fp64 tensors on ``device``: x, scale, shift, weight, identity, bn_weight, bn_bias, grad."""
    n, c, co, h, w, k, s, p = case
    ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64)
    scale = 0.5 + torch.rand(c, generator=g, dtype=torch.float64)
    shift = 0.5 * torch.randn(c, generator=g, dtype=torch.float64)
    weight = torch.randn(co, c, k, k, generator=g, dtype=torch.float64) / (c * k * k) ** 0.5
    identity = torch.randn(n, co, ho, wo, generator=g, dtype=torch.float64)
    bn_w = 0.5 + torch.rand(co, generator=g, dtype=torch.float64)
    bn_b = 0.3 * torch.randn(co, generator=g, dtype=torch.float64)
    grad = torch.randn(n, co, ho, wo, generator=g, dtype=torch.float64)
    return tuple(t.to(device) for t in (x, scale, shift, weight, identity, bn_w, bn_b, grad))


def _run(fn, case, tensors, dtype, vec_dtype, channels_last, training, running):
    """Forward + backward of ``fn``; returns the outputs/gradients and the running buffers after."""
    x, scale, shift, weight, identity, bn_w, bn_b, grad = tensors
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    big = [t.to(dtype).contiguous(memory_format=fmt).requires_grad_() for t in (x, identity)]
    small = [t.to(vec_dtype).requires_grad_() for t in (scale, shift, bn_w, bn_b)]
    w = weight.to(dtype).requires_grad_()
    rm, rv = (t.to(vec_dtype).clone() for t in running)
    y = fn(
        big[0], small[0], small[1], w, big[1], small[2], small[3], rm, rv,
        training=training, stride=case[6], padding=case[7],
    )  # fmt: skip
    y.backward(grad.to(dtype).contiguous(memory_format=fmt))
    grads = [big[0].grad, small[0].grad, small[1].grad, w.grad, big[1].grad, small[2].grad, small[3].grad]
    return [y.detach(), *grads], (rm, rv)


@pytest.mark.parametrize("device,backend", RUNS)
@pytest.mark.parametrize(
    "dtype,case", [(torch.float32, c) for c in CASES] + [(d, CASES[1]) for d in DTYPES[1:]], ids=str
)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_matches_reference(device, backend, dtype, case, channels_last, training):
    skip_unless_available(OP, backend, device)
    skip_bf16_in_interpreter(backend, dtype, device)
    tensors = _inputs(case, device=device)
    co = case[2]
    running = (0.1 * torch.randn(co, dtype=torch.float64), 0.5 + torch.rand(co, dtype=torch.float64))
    running = tuple(t.to(device) for t in running)
    with fastblocks.use_backend(backend):
        fused, fused_buf = _run(
            bn_relu_conv_bn_add_relu2d, case, tensors, dtype, torch.float32, channels_last, training, running
        )
    eager, _ = _run(
        bn_relu_conv_bn_add_relu2d_reference, case, tensors, dtype, torch.float32, channels_last, training, running
    )
    ref, ref_buf = _run(
        bn_relu_conv_bn_add_relu2d_reference, case, tensors, torch.float64, torch.float64, channels_last, training,
        running,
    )  # fmt: skip
    for name, f, e, r in zip(GRAD_NAMES, fused, eager, ref):
        assert f is not None, name
        assert_close_to_reference(f, e, r, atol=ATOL[dtype] * max(1.0, float(r.abs().max())), name=name)
    if channels_last:
        assert fused[0].is_contiguous(memory_format=torch.channels_last)
    for f, r in zip(fused_buf, ref_buf):
        torch.testing.assert_close(f.double(), r, rtol=1e-3, atol=ATOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
def test_gradcheck_float64(backend):
    skip_unless_available(OP, backend, "cpu")
    case = (2, 2, 3, 3, 4, 3, 1, 1)
    x, scale, shift, weight, identity, bn_w, bn_b, _ = (t.requires_grad_() for t in _inputs(case, seed=3))
    with fastblocks.use_backend(backend):
        rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
        for training in (True, False):
            assert torch.autograd.gradcheck(
                lambda *t, tr=training: bn_relu_conv_bn_add_relu2d(*t, rm.clone(), rv.clone(), training=tr, padding=1),
                (x, scale, shift, weight, identity, bn_w, bn_b),
                fast_mode=True,  # a random projection of the Jacobian: the Triton interpreter is slow
            )


@pytest.mark.parametrize("device", devices())
def test_saves_neither_the_activation_nor_the_conv_output(device):
    """Saved: x, the weight, [C] vectors and the output y (the next block's input)."""
    case = (4, 16, 64, 14, 14, 1, 1, 0)
    x, scale, shift, weight, identity, bn_w, bn_b, _ = (t.float() for t in _inputs(case, device=device))
    x.requires_grad_()
    identity.requires_grad_()
    params = [t.requires_grad_() for t in (scale, shift, weight, bn_w, bn_b)]
    y, fused = saved_tensor_bytes(bn_relu_conv_bn_add_relu2d, x, *params[:3], identity, *params[3:], exclude=params)

    def eager(x, scale, shift, weight, identity, bn_w, bn_b):
        return bn_relu_conv_bn_add_relu2d_reference(x * 1, scale, shift, weight, identity, bn_w, bn_b)

    _, ref = saved_tensor_bytes(eager, x, *params[:3], identity, *params[3:], exclude=params)
    vectors = 16 * 64 * 4
    assert fused <= x.numel() * 4 + y.numel() * 4 + vectors
    # eager also keeps the activation (x-sized) and the conv output and BN output (y-sized)
    assert ref >= x.numel() * 4 * 2 + y.numel() * 4 * 2


@pytest.mark.parametrize("device", devices())
def test_empty_batch_and_running_buffers_like_torch(device):
    case = (0, 4, 8, 5, 5, 1, 1, 0)
    x, scale, shift, weight, identity, bn_w, bn_b, _ = (t.float() for t in _inputs(case, device=device))
    rm, rv = torch.full((8,), 0.5, device=device), torch.full((8,), 2.0, device=device)
    y = bn_relu_conv_bn_add_relu2d(x, scale, shift, weight, identity, bn_w, bn_b, rm, rv, training=True)
    assert y.shape == (0, 8, 5, 5)
    assert torch.equal(rm, torch.full_like(rm, 0.5)) and torch.equal(rv, torch.full_like(rv, 2.0))


@pytest.mark.parametrize("device", devices())
def test_torch_compile_runs_and_matches(device):
    case = (2, 4, 8, 5, 5, 1, 1, 0)
    x, scale, shift, weight, identity, bn_w, bn_b, _ = (t.float() for t in _inputs(case, device=device))

    def f(x):
        return bn_relu_conv_bn_add_relu2d(x * 2, scale, shift, weight, identity, bn_w, bn_b).sum()

    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    compiled = torch.compile(f, backend="aot_eager")
    out = compiled(xc)
    out.backward()
    ref = f(xe)
    ref.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(xc.grad, xe.grad)


@pytest.mark.parametrize(
    "change,exc,words",
    [
        ({"identity": torch.randn(2, 8, 4, 4)}, ValueError, "identity has shape"),
        ({"identity": torch.randn(2, 8, 5, 5).double()}, TypeError, "identity has dtype"),
        ({"bn_weight": torch.ones(7)}, ValueError, "bn_weight has 7 elements"),
        ({"running_mean": torch.zeros(8)}, ValueError, "running_mean and running_var"),
        ({"x": torch.randn(1, 4, 1, 1), "identity": torch.randn(1, 8, 1, 1)}, ValueError, "more than 1 value"),
        ({"weight": torch.randn(8, 3, 1, 1)}, ValueError, "input channels"),
    ],
)
def test_bad_input_names_the_argument(change, exc, words):
    args = {
        "x": torch.randn(2, 4, 5, 5), "scale": torch.ones(4), "shift": torch.zeros(4),
        "weight": torch.randn(8, 4, 1, 1), "identity": torch.randn(2, 8, 5, 5),
        "bn_weight": torch.ones(8), "bn_bias": torch.zeros(8),
    }  # fmt: skip
    args.update(change)
    with pytest.raises(exc, match=words):
        bn_relu_conv_bn_add_relu2d(**args)


@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_opcheck_registered_tail(backend, training):
    """The tail is a registered op (opaque to torch.compile): schema, fake kernel, autograd."""
    skip_unless_available("batch_norm_act", backend, "cpu")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 5, 5, generator=g, requires_grad=True)
    scale, shift = (torch.rand(4, generator=g) + 0.5).requires_grad_(), torch.randn(4, generator=g).requires_grad_()
    w = torch.randn(6, 4, 3, 3, generator=g, requires_grad=True)
    identity = torch.randn(2, 6, 5, 5, generator=g, requires_grad=True)
    bw, bb = (torch.rand(6, generator=g) + 0.5).requires_grad_(), torch.randn(6, generator=g).requires_grad_()
    rm, rv = torch.randn(6, generator=g), torch.rand(6, generator=g) + 0.5
    args = (x, scale, shift, w, identity, bw, bb, rm, rv, [1, 1], [1, 1], [1, 1], 1, training, 1e-5)
    with fastblocks.use_backend(backend):
        torch.library.opcheck(torch.ops.fastblocks.bn_relu_conv_bn_add_relu2d.default, args)
        y, mean, var = torch.ops.fastblocks.bn_relu_conv_bn_add_relu2d(*args)
        bwd = (torch.randn_like(y), x, scale, shift, w, bw, bb, mean, var, y, [1, 1], [1, 1], [1, 1], 1, training, 1e-5)
        torch.library.opcheck(
            torch.ops.fastblocks.bn_relu_conv_bn_add_relu2d_backward.default, (*bwd, [True] * 7),
            test_utils=("test_schema", "test_faketensor"),
        )  # fmt: skip
