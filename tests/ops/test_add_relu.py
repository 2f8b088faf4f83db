"""fastblocks::add_relu against its reference, on every backend available here."""

from __future__ import annotations

import contextlib

import pytest
import torch

import fastblocks
from fastblocks.nn import AddReLU
from fastblocks.ops.add_relu import add_relu, add_relu_reference, pack_mask, unpack_mask
from fastblocks.testing import saved_tensor_bytes
from tests.helpers import BACKENDS_UNDER_TEST, RecordOps, devices, skip_bf16_in_interpreter, skip_unless_available

SHAPES = [(1, 63, 7, 7), (2, 3, 13, 13), (4, 8, 16, 16), (5,), (3, 1001), (0, 3, 4, 4), (2, 1, 1, 1)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _make(shape, dtype, device, layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":  # a non-contiguous view: every other element of a wider tensor
        wide = torch.randn((*shape[:-1], shape[-1] * 2), generator=g, dtype=torch.float64)
        wide[..., ::2] = x.double().cpu()
        x = wide.to(device=device, dtype=dtype)[..., ::2]
        assert x.numel() == 0 or not x.is_contiguous()
    return x


def _layouts(shape):
    return ["contiguous", "strided"] + (["channels_last"] if len(shape) == 4 else [])


CASES = [(s, lay) for s in SHAPES for lay in _layouts(s)]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout", CASES, ids=str)
def test_matches_eager_forward_and_backward(backend, dtype, shape, layout, device):
    skip_unless_available("add_relu", backend, device)
    skip_bf16_in_interpreter(backend, dtype, device)
    x = _make(shape, dtype, device, layout, seed=1).requires_grad_()
    r = _make(shape, dtype, device, layout, seed=2).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    r_ref = r.detach().clone().requires_grad_()
    grad = _make(shape, dtype, device, "contiguous", seed=3)

    with fastblocks.use_backend(backend):
        out = add_relu(x, r)
        out.backward(grad)
    ref = add_relu_reference(x_ref, r_ref)
    ref.backward(grad)

    # add+ReLU rounds once, exactly like eager: results must be identical, not just close.
    assert out.dtype == dtype and out.shape == ref.shape
    assert torch.equal(out, ref)
    assert torch.equal(x.grad, x_ref.grad)
    assert torch.equal(r.grad, r_ref.grad)
    if layout == "channels_last" and x.numel():
        assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
def test_nan_and_inf_follow_eager(backend):
    skip_unless_available("add_relu", backend, "cpu")
    x = torch.tensor([float("nan"), 1.0, -1.0, float("inf"), -float("inf"), 0.0, -0.0, 2.0, 3.0])
    r = torch.tensor([1.0, float("nan"), 0.5, 1.0, 1.0, 0.0, 0.0, -2.0, -1.0])
    xa, ra = x.clone().requires_grad_(), r.clone().requires_grad_()
    xe, re = x.clone().requires_grad_(), r.clone().requires_grad_()
    with fastblocks.use_backend(backend):
        out = add_relu(xa, ra)
        out.sum().backward()
    ref = add_relu_reference(xe, re)
    ref.sum().backward()
    torch.testing.assert_close(out, ref, equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(xa.grad, xe.grad, equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_tensor_with_special_values_is_bitwise_eager(backend, dtype):
    """Several parallel tasks, a length that is not a multiple of 8 or of any vector width, and
    NaN, inf, signed zeros and tiny values, in the inputs and in the gradient."""
    skip_unless_available("add_relu", backend, "cpu")
    skip_bf16_in_interpreter(backend, dtype, "cpu")
    g = torch.Generator().manual_seed(7)
    n = 3 * 17 * 61 * 67 + 5
    x = torch.randn(n, generator=g, dtype=torch.float64)
    r = torch.randn(n, generator=g, dtype=torch.float64)
    grad = torch.randn(n, generator=g, dtype=torch.float64)
    pick = torch.randint(0, n, (4, 500), generator=g)
    x[pick[0]] = float("nan")
    x[pick[1]] = float("inf") * torch.sign(torch.randn(500, generator=g, dtype=torch.float64))
    x[pick[2]], r[pick[2]] = -0.0, 0.0
    r[pick[2][::2]] = -0.0  # -0 + -0 = -0, which eager's relu keeps
    x[pick[3]], r[pick[3]] = 3e-8, -1e-39  # tiny: subnormal in fp32, zero after the cast to fp16
    grad[pick[0][:250]] = float("nan")
    x, r, grad = x.to(dtype), r.to(dtype), grad.to(dtype)
    xa, ra = x.clone().requires_grad_(), r.clone().requires_grad_()
    xe, re = x.clone().requires_grad_(), r.clone().requires_grad_()
    with fastblocks.use_backend(backend):
        out = add_relu(xa, ra)
        out.backward(grad)
    ref = add_relu_reference(xe, re)
    ref.backward(grad)
    for got, want in ((out, ref), (xa.grad, xe.grad), (ra.grad, re.grad)):
        torch.testing.assert_close(got, want, equal_nan=True, rtol=0, atol=0)
        assert torch.equal(got.isnan(), want.isnan())
        number = ~want.isnan()  # a NaN's sign bit carries no meaning
        assert torch.equal(torch.signbit(got[number]), torch.signbit(want[number]))


@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
def test_backends_produce_identical_masks(backend):
    skip_unless_available("add_relu", backend, "cpu")
    x, r = torch.randn(3, 5, 7, 11), torch.randn(3, 5, 7, 11)
    expected = pack_mask((torch.relu(x + r) > 0).reshape(-1))
    with fastblocks.use_backend(backend):
        _, mask = torch.ops.fastblocks.add_relu(x, r)
    assert mask.dtype == torch.uint8 and mask.numel() == (x.numel() + 7) // 8
    assert torch.equal(mask, expected)


def test_pack_unpack_round_trip():
    keep = torch.rand(1003) > 0.5
    assert torch.equal(unpack_mask(pack_mask(keep), keep.numel()), keep)


@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
def test_saves_one_bit_per_element(backend):
    skip_unless_available("add_relu", backend, "cpu")
    x = torch.randn(4, 16, 10, 10, requires_grad=True)
    r = torch.randn(4, 16, 10, 10, requires_grad=True)
    with fastblocks.use_backend(backend):
        _, fused_bytes = saved_tensor_bytes(add_relu, x, r)
    _, eager_bytes = saved_tensor_bytes(add_relu_reference, x, r)
    assert fused_bytes == x.numel() // 8
    assert eager_bytes == x.numel() * x.element_size()


@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
def test_opcheck(backend):
    skip_unless_available("add_relu", backend, "cpu")
    x, r = torch.randn(2, 3, 5, 7, requires_grad=True), torch.randn(2, 3, 5, 7, requires_grad=True)
    xcl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    with fastblocks.use_backend(backend):
        torch.library.opcheck(torch.ops.fastblocks.add_relu.default, (x, r))
        torch.library.opcheck(torch.ops.fastblocks.add_relu.default, (xcl, r.detach()))
        mask = torch.ops.fastblocks.add_relu(x, r)[1]
        torch.library.opcheck(torch.ops.fastblocks.add_relu_backward.default, (torch.randn(2, 3, 5, 7), mask, False))


def test_opcheck_compiled_kernels():
    skip_unless_available("add_relu", "cpu", "cpu")
    x, r = torch.randn(2, 3, 5, 7), torch.randn(2, 3, 5, 7)
    torch.library.opcheck(torch.ops.fastblocks.add_relu_fwd.default, (x, r, False))
    xcl, rcl = (t.contiguous(memory_format=torch.channels_last) for t in (x, r))
    torch.library.opcheck(torch.ops.fastblocks.add_relu_fwd.default, (xcl, rcl, True))
    mask = torch.ops.fastblocks.add_relu_fwd(x, r, False)[1]
    torch.library.opcheck(torch.ops.fastblocks.add_relu_bwd.default, (torch.randn(2, 3, 5, 7), mask, False))


@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
def test_gradcheck_float64(backend):
    skip_unless_available("add_relu", backend, "cpu")
    # Keep |x + r| away from 0 so finite differences do not straddle the kink.
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    r = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    x = torch.where((x + r).abs() < 0.1, x + 0.3, x).requires_grad_()
    r.requires_grad_()
    with fastblocks.use_backend(backend):
        assert torch.autograd.gradcheck(add_relu, (x, r))
        assert torch.autograd.gradgradcheck(add_relu, (x, r))


def test_torch_compile_traces_the_op():
    def f(a, b):
        return add_relu(a * 2, b).sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    a, b = torch.randn(2, 4, 3, 3, requires_grad=True), torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(compiled(a, b), f(a, b))
    compiled(a, b).backward()
    assert a.grad is not None


def test_meta_tensors_shapes_and_layout():
    x = torch.empty(8, 64, 56, 56, device="meta").contiguous(memory_format=torch.channels_last)
    out = add_relu(x, torch.empty_like(x))
    assert out.device.type == "meta" and out.shape == x.shape
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_module_is_drop_in():
    x, r = torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5)
    assert torch.equal(AddReLU()(x, r), torch.relu(x + r))


@pytest.mark.parametrize(
    "x,r,exc,words",
    [
        ([1.0], torch.randn(1), TypeError, "x must be a torch.Tensor"),
        (torch.randn(1), None, TypeError, "residual must be a torch.Tensor"),
        (torch.arange(4), torch.arange(4), TypeError, "x must have dtype"),
        (torch.randn(2, 3), torch.randn(3, 2), ValueError, "residual has shape"),
        (torch.randn(4), torch.randn(4, dtype=torch.float64), TypeError, "residual has dtype"),
        (torch.randn(4), torch.randn(4, device="meta"), ValueError, "residual is on meta"),
    ],
)
def test_bad_input_names_the_argument(x, r, exc, words):
    with pytest.raises(exc, match=words):
        add_relu(x, r)


@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_eager_path_equals_the_registered_op(backend, layout):
    """Plain eager calls skip the custom-op dispatch (an autograd.Function over the same
    launchers); both paths give identical outputs and gradients, double backward included."""
    skip_unless_available("add_relu", backend, "cpu")
    x, r = _make((2, 5, 7, 9), torch.float32, "cpu", layout, seed=4), _make((2, 5, 7, 9), torch.float32, "cpu", layout)
    results = []
    for registered in (False, True):
        xl, rl = x.clone().requires_grad_(), r.clone().requires_grad_()
        g = torch.linspace(-1, 1, x.numel()).view_as(x).requires_grad_()
        mode = RecordOps() if registered else contextlib.nullcontext()
        with fastblocks.use_backend(backend), mode:
            out = add_relu(xl, rl)
            gx, gr = torch.autograd.grad(out, (xl, rl), g, create_graph=True)
            (gx * gx.detach()).sum().backward()  # double backward: d/dg
        if registered:
            assert "fastblocks.add_relu.default" in mode.seen
        results.append((out.detach(), gx.detach(), gr.detach(), g.grad))
    for a, e in zip(*results):
        assert torch.equal(a, e)
