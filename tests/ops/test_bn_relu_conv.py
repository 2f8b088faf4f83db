"""fastblocks::bn_relu_conv2d against plain autograd of its reference, on the reference and Triton backends.

Triton runs in the interpreter on CPU machines (tests/conftest.py), so Triton shapes stay tiny.
The ``cpu``/``cuda`` backends run the BatchNorm family's compiled kernels for the prologue and
PyTorch's convolutions. Every comparison also runs on CUDA where a GPU is present (the
``device`` parameter; there the ``tl.dot`` kernels run compiled, bf16 included, with TF32 off on
both sides: tests/conftest.py).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

import fastblocks
from fastblocks.ops._bn_relu_conv_triton import _wgrad_triton, covers
from fastblocks.ops.bn_relu_conv import bn_relu_conv2d, bn_relu_conv2d_reference, make_conv
from fastblocks.testing import assert_close_to_reference, saved_tensor_bytes
from tests.helpers import (
    CUDA_BACKENDS,
    RecordOps,
    deterministic_cudnn,
    device_backends,
    devices,
    skip_bf16_in_interpreter,
    skip_unless_available,
)

OP = "bn_relu_conv2d"
BACKENDS = ["reference", "triton", "cpu"]
# (device, backend): BACKENDS on the CPU, CUDA_BACKENDS on a GPU.
RUNS = device_backends(BACKENDS)

# (N, C_in, C_out, H, W, kernel, stride, padding): small enough for the Triton interpreter.
SMALL = [
    (2, 5, 3, 7, 7, 1, 1, 0),
    (1, 16, 17, 9, 9, 1, 2, 0),
    (2, 8, 12, 7, 7, 3, 1, 1),
    (1, 13, 9, 9, 9, 3, 2, 1),
    (1, 6, 5, 5, 8, 3, 1, 0),
]
# Odd, larger shapes for the reference backend only.
LARGE = [(1, 63, 17, 7, 7, 3, 1, 1), (2, 63, 17, 13, 13, 1, 2, 0)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
LAYOUTS = ["contiguous", "channels_last"]
# Relative slack per dtype, scaled by the size of the values compared.
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float64: 1e-12}


def _inputs(case, dtype, layout="contiguous", seed=0, shift_mean=0.0, device="cpu"):
    n, c, co, h, w, k, _, _ = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64)
    scale = 0.5 + torch.rand(c, generator=g, dtype=torch.float64)
    shift = shift_mean + 0.5 * torch.randn(c, generator=g, dtype=torch.float64)
    weight = torch.randn(co, c, k, k, generator=g, dtype=torch.float64) / (c * k * k) ** 0.5
    x, weight = x.to(device, dtype), weight.to(device, dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    vec = torch.float64 if dtype == torch.float64 else torch.float32
    return x, scale.to(device, vec), shift.to(device, vec), weight


def _conv_kwargs(case):
    return {"stride": case[6], "padding": case[7]}


def _grads_of(fn, tensors, grad_out, backend=None):
    """``[out, *grads]``; forward and backward both run under ``backend`` (resolved per call)."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    with fastblocks.use_backend(backend):
        out = fn(*leaves)
        out.backward(grad_out)
    return [out.detach()] + [t.grad for t in leaves]


def _check_against_reference(backend, tensors, dtype, grad_out=None, **conv):
    """Forward and the four gradients: fused error <= 2 x eager error (same dtype) + atol."""

    def ref(*t):
        return bn_relu_conv2d_reference(*t, conv.get("stride", 1), conv.get("padding", 0), conv.get("dilation", 1),
                                        conv.get("groups", 1))  # fmt: skip

    def fused(*t):
        return bn_relu_conv2d(*t, **conv)

    y_shape = ref(*tensors).shape
    if grad_out is None:
        grad_out = torch.randn(y_shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        grad_out = grad_out.to(tensors[0].device, dtype)
    truth = _grads_of(ref, [t.double() for t in tensors], grad_out.double())
    eager = _grads_of(ref, tensors, grad_out)
    got = _grads_of(fused, tensors, grad_out, backend)
    for name, f, e, t in zip(("y", "dx", "dscale", "dshift", "dweight"), got, eager, truth):
        assert f.dtype == e.dtype and f.shape == e.shape, name
        assert_close_to_reference(f, e, t, atol=ATOL[dtype] * (1 + float(t.abs().max())), name=name)
    return got


def _cases(device):
    backends = BACKENDS if device == "cpu" else CUDA_BACKENDS
    return [(device, case, b) for case in SMALL for b in backends] + [(device, case, "reference") for case in LARGE]


CASES = [run for device in devices() for run in _cases(device)]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device,case,backend", CASES, ids=str)
def test_matches_reference_forward_and_backward(device, case, backend, dtype, layout):
    skip_unless_available(OP, backend, device)
    skip_bf16_in_interpreter(backend, dtype, device)
    tensors = _inputs(case, dtype, layout, device=device)
    y = _check_against_reference(backend, tensors, dtype, **_conv_kwargs(case))[0]
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("device,backend", RUNS)
@pytest.mark.parametrize("buffer_layout", LAYOUTS)
def test_strided_inputs_and_grads(device, backend, buffer_layout):
    # A dense block reads a channel prefix of a wider buffer in place: x is a strided view.
    # The incoming gradient is an expanded (stride-0) or transposed tensor.
    skip_unless_available(OP, backend, device)
    case = (2, 6, 5, 7, 7, 3, 1, 1)
    x, scale, shift, weight = _inputs(case, torch.float32, device=device)
    buf = torch.randn(2, 9, 7, 7).to(device)
    if buffer_layout == "channels_last":
        buf = buf.contiguous(memory_format=torch.channels_last)
    buf[:, :6] = x
    x = buf[:, :6]
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    _check_against_reference(backend, (x, scale, shift, weight), torch.float32,
                             torch.ones(1, device=device).expand(2, 5, 7, 7), stride=1, padding=1)  # fmt: skip
    transposed = torch.randn(2, 5, 7, 7).to(device).transpose(2, 3).contiguous().transpose(2, 3)
    _check_against_reference(backend, (x, scale, shift, weight), torch.float32, transposed, stride=1, padding=1)


@pytest.mark.parametrize("device,backend", RUNS)
@pytest.mark.parametrize("stride", [1, 2])
def test_zero_padding_applies_to_the_activation(device, backend, stride):
    # With shift = +5 every activation is > 0: relu(shift) leaking into the border would be
    # a large error, not a rounding one.
    skip_unless_available(OP, backend, device)
    case = (1, 8, 6, 7, 7, 3, stride, 1)
    x, scale, shift, weight = _inputs(case, torch.float32, shift_mean=5.0, device=device)
    got = _check_against_reference(backend, (x, scale, shift, weight), torch.float32, stride=stride, padding=1)
    wrong = F.conv2d(torch.relu(F.pad(x, (1, 1, 1, 1)) * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)),
                     weight, stride=stride)  # fmt: skip
    assert (got[0] - wrong).abs().max() > 1.0


@pytest.mark.parametrize("device,backend", RUNS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_stats_epilogue_and_its_gradient(device, backend, layout, dtype):
    skip_unless_available(OP, backend, device)
    case = (2, 8, 12, 7, 7, 3, 2, 1)
    tensors = _inputs(case, dtype, layout, device=device)
    gen = torch.Generator().manual_seed(3)
    gy = torch.randn(2, 12, 4, 4, generator=gen).to(device, dtype)
    gs, gss = torch.randn(12, generator=gen).to(device), torch.randn(12, generator=gen).to(device)

    fused_in = [t.clone().requires_grad_() for t in tensors]
    with fastblocks.use_backend(backend):
        y, s, ss = bn_relu_conv2d(*fused_in, stats=True, **_conv_kwargs(case))
        ((y.float() * gy.float()).sum() + (s * gs).sum() + (ss * gss).sum()).backward()
    assert s.dtype == ss.dtype == torch.float32 and s.shape == ss.shape == (12,)
    yf = y.detach().float()
    torch.testing.assert_close(s, yf.sum((0, 2, 3)), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ss, (yf * yf).sum((0, 2, 3)), rtol=1e-5, atol=1e-4)

    ref_in = [t.clone().requires_grad_() for t in tensors]
    yr = bn_relu_conv2d_reference(*ref_in, **_conv_kwargs(case)).float()
    loss = (yr * gy.float()).sum() + (yr.sum((0, 2, 3)) * gs).sum() + ((yr * yr).sum((0, 2, 3)) * gss).sum()
    loss.backward()
    for name, a, b in zip(("dx", "dscale", "dshift", "dweight"), fused_in, ref_in):
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(a.grad, b.grad, rtol=tol, atol=tol * float(b.grad.abs().max()), msg=name)


@pytest.mark.parametrize(
    "case,conv",
    [
        ((1, 8, 6, 7, 7, 3, 1, 1), {"groups": 2}),
        ((1, 6, 4, 9, 9, 3, 1, 2), {"dilation": 2}),
        ((1, 5, 3, 8, 8, 5, 2, 2), {}),
    ],
    ids=["groups2", "dilation2", "5x5"],
)
@pytest.mark.parametrize("device,backend", RUNS)
def test_uncovered_shapes_fall_back(case, conv, device, backend):
    skip_unless_available(OP, backend, device)
    c, stride, padding = case[1], case[6], case[7]
    x, scale, shift, weight = _inputs(case, torch.float32, device=device)
    weight = weight[:, : c // conv.get("groups", 1)].contiguous()
    kwargs = {"stride": stride, "padding": padding, **conv}
    assert not covers(x, weight, make_conv(stride, padding, conv.get("dilation", 1), conv.get("groups", 1)))
    _check_against_reference(backend, (x, scale, shift, weight), torch.float32, **kwargs)
    leaves = [t.clone().requires_grad_() for t in (x, scale, shift, weight)]
    with fastblocks.use_backend(backend):
        _, saved = saved_tensor_bytes(bn_relu_conv2d, *leaves, **kwargs)
    assert saved == sum(t.nbytes for t in leaves)


@pytest.mark.parametrize("device", devices())
def test_float64_on_triton_backend_runs_the_reference_path(device):
    skip_unless_available(OP, "triton", device)
    tensors = _inputs(SMALL[2], torch.float64, device=device)
    got = _check_against_reference("triton", tensors, torch.float64, **_conv_kwargs(SMALL[2]))
    eager = _grads_of(lambda *t: bn_relu_conv2d_reference(*t, 1, 1), tensors, torch.ones_like(got[0]))
    assert got[0].dtype == torch.float64 and torch.allclose(got[0], eager[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("device", devices())
def test_wgrad_split_k_matches(device):
    skip_unless_available(OP, "triton", device)
    case = (2, 8, 12, 7, 7, 3, 1, 1)
    x, scale, shift, weight = _inputs(case, torch.float32, device=device)
    gy = torch.randn(2, 12, 7, 7).to(device)
    conv = make_conv(1, 1, 1, 1)
    splits = [1, 3] if device == "cpu" else [1, 3, None]  # None: the GPU's own split (from its SM count)
    expected = torch.nn.grad.conv2d_weight(
        torch.relu(x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)), weight.shape, gy, 1, 1
    )
    for split in splits:
        got = _wgrad_triton(gy, x, scale, shift, weight, conv, split=split)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=lambda m, s=split: f"split={s}: {m}")


@pytest.mark.parametrize("device,backend", RUNS)
@pytest.mark.parametrize("stats", [False, True])
def test_saves_only_x_and_vectors(device, backend, stats):
    skip_unless_available(OP, backend, device)
    case = (2, 8, 12, 10, 10, 3, 1, 1)
    x, scale, shift, weight = (t.requires_grad_() for t in _inputs(case, torch.float32, device=device))
    with fastblocks.use_backend(backend):
        out, fused_bytes = saved_tensor_bytes(bn_relu_conv2d, x, scale, shift, weight, padding=1, stats=stats)

    def eager(x, scale, shift, weight):
        return F.conv2d(torch.relu(x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)), weight, padding=1)

    _, eager_bytes = saved_tensor_bytes(eager, x, scale, shift, weight)
    inputs = x.nbytes + scale.nbytes + shift.nbytes + weight.nbytes
    y_bytes = out[0].nbytes if stats else 0  # the statistics' gradient needs y (the next BN keeps it anyway)
    assert fused_bytes == inputs + y_bytes
    # eager keeps the activation (the ReLU output = the conv input) on top of x and the weight
    assert eager_bytes >= 2 * x.nbytes + weight.nbytes
    if not stats:
        assert fused_bytes < eager_bytes


@pytest.mark.parametrize("device,backend", RUNS)
def test_opcheck(device, backend):
    skip_unless_available(OP, backend, device)
    x, scale, shift, weight = _inputs((1, 4, 3, 5, 5, 3, 1, 1), torch.float32, device=device)
    xcl = x.contiguous(memory_format=torch.channels_last)
    leaves = [t.clone().requires_grad_() for t in (x, scale, shift, weight)]
    with fastblocks.use_backend(backend):
        op = torch.ops.fastblocks.bn_relu_conv2d.default
        torch.library.opcheck(op, (*leaves, [1, 1], [1, 1], [1, 1], 1, False))
        torch.library.opcheck(op, (xcl, scale, shift, weight, [2, 2], [1, 1], [1, 1], 1, True))
        bwd = torch.ops.fastblocks.bn_relu_conv2d_backward.default
        gy = torch.randn(1, 3, 5, 5).to(device)
        torch.library.opcheck(bwd, (gy, x, scale, shift, weight, [1, 1], [1, 1], [1, 1], 1, True, True))
        torch.library.opcheck(bwd, (gy, xcl, scale, shift, weight, [1, 1], [1, 1], [1, 1], 1, False, True))


@pytest.mark.parametrize("kernel,stride,padding,stats", [(3, 1, 1, True), (1, 2, 0, False)])
def test_gradcheck_float64(kernel, stride, padding, stats):
    gen = torch.Generator().manual_seed(0)
    # Build x from z = x*scale + shift with |z| >= 0.2, so finite differences never cross the kink.
    z = torch.randn(1, 3, 5, 5, generator=gen, dtype=torch.float64)
    z = torch.sign(z) * (0.2 + z.abs())
    scale = 0.5 + torch.rand(3, generator=gen, dtype=torch.float64)
    shift = 0.5 * torch.randn(3, generator=gen, dtype=torch.float64)
    x = (z - shift.view(1, -1, 1, 1)) / scale.view(1, -1, 1, 1)
    weight = torch.randn(2, 3, kernel, kernel, generator=gen, dtype=torch.float64)
    inputs = tuple(t.requires_grad_() for t in (x, scale, shift, weight))

    def fn(*t):
        return bn_relu_conv2d(*t, stride=stride, padding=padding, stats=stats)

    with fastblocks.use_backend("reference"):
        assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("device", devices())
def test_empty_batch(device):
    x, scale, shift, weight = _inputs((1, 4, 3, 5, 5, 3, 1, 1), torch.float32, device=device)
    x = x[:0].requires_grad_()
    zeros = torch.zeros(3, device=device)
    for backend in BACKENDS if device == "cpu" else CUDA_BACKENDS:
        skip_unless_available(OP, backend, device)
        with fastblocks.use_backend(backend):
            y, s, ss = bn_relu_conv2d(x, scale, shift, weight, padding=1, stats=True)
            y.sum().backward()
        assert y.shape == (0, 3, 5, 5) and torch.equal(s, zeros) and torch.equal(ss, zeros)
        assert x.grad.shape == x.shape


def test_meta_tensors_shapes_and_layout():
    x = torch.empty(8, 64, 56, 56, device="meta").contiguous(memory_format=torch.channels_last)
    vec = torch.empty(64, device="meta")
    y, s, ss = bn_relu_conv2d(x, vec, vec, torch.empty(128, 64, 3, 3, device="meta"), stride=2, padding=1, stats=True)
    assert y.device.type == "meta" and y.shape == (8, 128, 28, 28) and s.shape == ss.shape == (128,)
    assert y.is_contiguous(memory_format=torch.channels_last)
    y = bn_relu_conv2d(x.contiguous(), vec, vec, torch.empty(32, 64, 1, 1, device="meta"))
    assert y.shape == (8, 32, 56, 56) and y.is_contiguous()


@pytest.mark.parametrize("device", devices())
def test_torch_compile_traces_the_op(device):
    def f(x, scale, shift, weight):
        y, s, _ = bn_relu_conv2d(x * 2, scale, shift, weight, padding=1, stats=True)
        return y.sum() + s.sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    inputs = _inputs((1, 4, 3, 5, 5, 3, 1, 1), torch.float32, device=device)
    x, scale, shift, weight = (t.requires_grad_() for t in inputs)
    torch.testing.assert_close(compiled(x, scale, shift, weight), f(x, scale, shift, weight))
    compiled(x, scale, shift, weight).backward()
    assert x.grad is not None and weight.grad is not None


_X, _S, _B, _W = _inputs((1, 4, 3, 5, 5, 3, 1, 1), torch.float32)


@pytest.mark.parametrize(
    "args,kwargs,exc,words",
    [
        (([1.0], _S, _B, _W), {}, TypeError, "x must be a torch.Tensor"),
        ((_X[0], _S, _B, _W), {}, ValueError, "x must be 4-D"),
        ((_X.long(), _S, _B, _W), {}, TypeError, "x must have dtype"),
        ((_X, _S, _B, None), {}, TypeError, "weight must be a torch.Tensor"),
        ((_X, _S, _B, _W[0]), {}, ValueError, "weight must be 4-D"),
        ((_X, _S, _B, _W.double()), {}, TypeError, "weight has dtype float64 but x has float32"),
        ((_X, _S.long(), _B, _W), {}, TypeError, "scale must have dtype"),
        ((_X, _S[:3], _B, _W), {}, ValueError, "scale has 3 elements but x has 4 channels"),
        ((_X, _S, _B[None], _W), {}, ValueError, "shift must be 1-D"),
        ((_X, _S, torch.randn(5), _W), {}, ValueError, "shift has 5 elements"),
        ((_X, _S, _B, torch.randn(3, 5, 3, 3)), {}, ValueError, "weight of shape"),
        ((_X, _S.to("meta"), _B, _W), {}, ValueError, "scale is on meta"),
        ((_X, _S, _B, _W.to("meta")), {}, ValueError, "weight is on meta"),
        ((_X, _S, _B, _W), {"padding": -1}, ValueError, "padding must be non-negative"),
        ((_X, _S, _B, _W), {"padding": "same"}, TypeError, "padding must be an int or a pair"),
        ((_X, _S, _B, _W), {"stride": 0}, ValueError, "stride must be >= 1"),
        ((_X, _S, _B, _W), {"stride": (1,)}, TypeError, "stride must be an int or a pair"),
        ((_X, _S, _B, _W), {"stride": 1.5}, TypeError, "stride must be an int or a pair"),
        ((_X, _S, _B, _W), {"dilation": 0}, ValueError, "dilation must be >= 1"),
        ((_X, _S, _B, _W), {"groups": 0}, ValueError, "groups must be >= 1"),
        ((_X, _S, _B, _W), {"groups": 2}, ValueError, "weight of shape"),
        ((_X[:, :, :2, :2], _S, _B, _W), {}, ValueError, "x of spatial size"),
        ((_X, _S, _B, _W), {"stats": "yes"}, TypeError, "stats must be a bool"),
    ],
)
def test_bad_input_names_the_argument(args, kwargs, exc, words):
    with pytest.raises(exc, match=words):
        bn_relu_conv2d(*args, **kwargs)


@pytest.mark.parametrize("device", devices())
def test_triton_backend_runs_the_kernels_for_covered_shapes(device, monkeypatch):
    # No silent fallback: on covered shapes the triton backend must not touch the reference path.
    skip_unless_available(OP, "triton", device)
    import fastblocks.ops.bn_relu_conv as mod

    def refuse(*args, **kwargs):
        raise AssertionError("the reference path ran on the triton backend")

    for name in ("_fwd_reference", "_bwd_reference", "_prologue_bwd_reference"):
        monkeypatch.setattr(mod, name, refuse)
    case = (1, 4, 3, 5, 5, 3, 2, 1)
    leaves = [t.requires_grad_() for t in _inputs(case, torch.float16, "channels_last", device=device)]
    with fastblocks.use_backend("triton"):
        y, s, _ = bn_relu_conv2d(*leaves, stride=2, padding=1, stats=True)
        (y.float().sum() + s.sum()).backward()
    assert all(t.grad is not None for t in leaves)


@pytest.mark.parametrize("device,backend", RUNS)
@pytest.mark.parametrize("stats", [False, True])
def test_eager_path_equals_the_registered_op(device, backend, stats):
    """Plain eager calls skip the custom-op dispatch (an autograd.Function over the same
    launchers); both paths must give identical outputs and gradients (on CUDA with cuDNN's
    deterministic algorithms: some of the others accumulate with atomics)."""
    skip_unless_available(OP, backend, device)
    case = SMALL[2]
    x, scale, shift, weight = _inputs(case, torch.float32, device=device)
    results = []
    for registered in (False, True):
        leaves = [t.detach().clone().requires_grad_() for t in (x, scale, shift, weight)]
        mode = RecordOps() if registered else contextlib.nullcontext()
        with fastblocks.use_backend(backend), deterministic_cudnn(device), mode:
            out = bn_relu_conv2d(*leaves, stats=stats, **_conv_kwargs(case))
            y = out[0] if stats else out
            loss = (y * torch.linspace(-1, 1, y.numel(), device=device).view_as(y)).sum()
            if stats:
                loss = loss + out[1].sum() + 0.1 * out[2].sum()
            loss.backward()
        if registered:
            assert "fastblocks.bn_relu_conv2d.default" in mode.seen
        results.append((y.detach(), *(t.grad for t in leaves)))
    for a, e in zip(*results):
        assert torch.equal(a, e)


# ----------------------------------------------------------------------------- whole layer, CPU
WHOLE = torch.ops.fastblocks.batch_norm_relu_conv2d.default
WHOLE_BWD = torch.ops.fastblocks.batch_norm_relu_conv2d_backward.default


def _whole_inputs(affine: bool, channels_last: bool, dtype=torch.float32, c_in=4, c_out=3, groups=1):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, c_in, 6, 5, generator=g, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    gamma = (0.5 + torch.rand(c_in, generator=g, dtype=dtype)) if affine else None
    beta = (0.5 * torch.randn(c_in, generator=g, dtype=dtype)) if affine else None
    rm, rv = 0.3 * torch.randn(c_in, generator=g, dtype=dtype), 0.5 + torch.rand(c_in, generator=g, dtype=dtype)
    weight = torch.randn(c_out, c_in // groups, 3, 3, generator=g, dtype=dtype)
    return x, gamma, beta, rm, rv, weight


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
def test_whole_layer_opcheck(affine, channels_last):
    """``fastblocks::batch_norm_relu_conv2d`` and its backward (the traced form of the CPU whole
    layer): schema, fake kernels (shapes, dtypes, strides), autograd registration."""
    from tests.helpers import require_compiled_kernels

    require_compiled_kernels("bn_fused_fwd", "bn_fused_bwd", dispatch_key="CPU")
    x, gamma, beta, rm, rv, weight = _whole_inputs(affine, channels_last)
    leaves = [t if t is None else t.clone().requires_grad_() for t in (x, gamma, beta)]
    w = weight.clone().requires_grad_()
    torch.library.opcheck(WHOLE, (*leaves, None, None, w, [1, 1], [1, 1], [1, 1], 1, True, 1e-5))
    torch.library.opcheck(WHOLE, (*leaves, rm, rv, w, [2, 2], [1, 1], [1, 1], 1, False, 1e-5))
    xg, *rest = _whole_inputs(affine, channels_last, c_out=4, groups=2)
    torch.library.opcheck(WHOLE, (xg, rest[0], rest[1], None, None, rest[4], [1, 1], [2, 2], [2, 2], 2, True, 1e-5))
    _, mean, var = WHOLE(x, gamma, beta, None, None, weight, [1, 1], [1, 1], [1, 1], 1, True, 1e-5)
    gy = torch.randn(2, 3, 6, 5)
    for mask in ([True, True, True, True], [True, False, False, False], [False, affine, affine, True]):
        torch.library.opcheck(
            WHOLE_BWD, (gy, x, gamma, beta, mean, var, weight, [1, 1], [1, 1], [1, 1], 1, True, 1e-5, mask)
        )


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_whole_layer_gradcheck_float64(training):
    """float64 gradcheck of the registered whole layer (every input that takes a gradient); x is
    built so that no finite difference crosses the ReLU's kink."""
    from tests.helpers import require_compiled_kernels

    require_compiled_kernels("bn_fused_fwd", "bn_fused_bwd", dispatch_key="CPU")
    x, gamma, beta, rm, rv, weight = _whole_inputs(True, False, torch.float64)
    # z = BN(x) away from 0 so that no finite difference flips the ReLU (eval: known statistics).
    if not training:
        z = torch.randn_like(x)
        z = torch.sign(z) * (0.3 + z.abs())
        x = (z - beta.view(1, -1, 1, 1)) / gamma.view(1, -1, 1, 1) * (rv + 1e-5).sqrt().view(1, -1, 1, 1)
        x = x + rm.view(1, -1, 1, 1)
    inputs = tuple(t.requires_grad_() for t in (x, gamma, beta, weight))

    def f(x, gamma, beta, weight):
        stats = (None, None) if training else (rm, rv)
        return WHOLE(x, gamma, beta, *stats, weight, [1, 1], [1, 1], [1, 1], 1, training, 1e-5)[0]

    assert torch.autograd.gradcheck(f, inputs)
