"""The fused BatchNorm ops against eager PyTorch, on every backend available here."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.nn import functional as F

import fastblocks
from fastblocks.ops.batchnorm import (
    batch_norm_act,
    batch_norm_act_reference,
    bn_stats,
    scale_shift_act,
)
from fastblocks.testing import assert_close_to_reference, saved_tensor_bytes
from tests.helpers import BACKENDS_UNDER_TEST, RecordOps, devices, skip_bf16_in_interpreter, skip_unless_available

SHAPES = [(1, 63, 7, 7), (2, 3, 13, 13), (4, 16, 5, 9), (3, 17, 1, 1)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float64: 1e-10}


def _inputs(shape, dtype, device, channels_last, seed=0, residual=False):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5).to(device, dtype)
    w = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).to(device, torch.float32)
    b = torch.randn(c, generator=g, dtype=torch.float64).to(device, torch.float32)
    r = torch.randn(shape, generator=g, dtype=torch.float64).to(device, dtype) if residual else None
    grad = torch.randn(shape, generator=g, dtype=torch.float64).to(device, dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        r = None if r is None else r.contiguous(memory_format=torch.channels_last)
    return x, w, b, r, grad


def _run(fn, x, w, b, r, grad, **kw):
    """Forward + backward; returns (y, dx, dw, db, dr)."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b, r)]
    xl, wl, bl, rl = leaves
    y = fn(xl, wl, bl, rl, **kw)
    y.backward(grad)
    return y.detach(), *(None if t is None else t.grad for t in (xl, wl, bl, rl))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("variant", ["bn", "bn_relu", "bn_add_relu", "bn_add"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batch_norm_act_matches_eager(backend, dtype, shape, channels_last, variant, training, device):
    skip_unless_available("batch_norm_act", backend, device)
    skip_bf16_in_interpreter(backend, dtype, device)
    if training and shape[0] * shape[2] * shape[3] == 1:
        pytest.skip("one value per channel: covered by the error test")
    relu = "relu" in variant
    x, w, b, r, grad = _inputs(shape, dtype, device, channels_last, residual="add" in variant)
    c = shape[1]
    rm0 = torch.randn(c, device=device) * 0.1
    rv0 = torch.rand(c, device=device) + 0.5

    def fused(x, w, b, r, rm, rv):
        with fastblocks.use_backend(backend):
            return batch_norm_act(x, w, b, rm, rv, training=training, residual=r, relu=relu)

    def eager(x, w, b, r, rm, rv):
        return batch_norm_act_reference(x, w, b, rm, rv, training=training, residual=r, relu=relu)

    # Parameters and buffers are rounded to the test dtype so every run starts from the same
    # values; eager on the CPU needs them in x's dtype, the fused op takes them in fp32.
    w, b = w.to(dtype).float(), b.to(dtype).float()
    rm0, rv0 = rm0.to(dtype).float(), rv0.to(dtype).float()
    buffers = {}
    results = {}
    runs = (
        ("fused", fused, dtype, torch.float32),
        ("eager", eager, dtype, dtype),
        ("ref", eager, torch.float64, torch.float64),
    )
    for name, fn, cast, pcast in runs:
        rm, rv = rm0.to(pcast, copy=True), rv0.to(pcast, copy=True)
        args = [x.to(cast), w.to(pcast), b.to(pcast), None if r is None else r.to(cast)]
        results[name] = _run(lambda x, w, b, r, fn=fn, rm=rm, rv=rv: fn(x, w, b, r, rm, rv), *args, grad.to(cast))
        buffers[name] = (rm, rv)

    for i, what in enumerate(["y", "dx", "dweight", "dbias", "dresidual"]):
        f, e, ref = (results[k][i] for k in ("fused", "eager", "ref"))
        if ref is None:
            assert f is None
            continue
        assert f.dtype == (dtype if what in ("y", "dx", "dresidual") else torch.float32), what
        assert_close_to_reference(f, e, ref, atol=TOL[dtype] * max(1.0, float(ref.abs().max())), name=what)
    y = results["fused"][0]
    if channels_last and y.numel():
        assert y.is_contiguous(memory_format=torch.channels_last)
    for f_buf, r_buf in zip(buffers["fused"], buffers["ref"]):
        torch.testing.assert_close(f_buf.double(), r_buf, rtol=1e-3, atol=TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
def test_statistics_are_stable_for_large_means(backend):
    skip_unless_available("bn_stats", backend, "cpu")
    g = torch.Generator().manual_seed(0)
    x64 = 1000.0 + torch.randn(16, 8, 32, 32, generator=g, dtype=torch.float64)
    with fastblocks.use_backend(backend):
        mean, var = bn_stats(x64.float())
    var_true, mean_true = torch.var_mean(x64.float().double(), dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(mean.double(), mean_true, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(var.double(), var_true, rtol=1e-3, atol=0)


@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
@pytest.mark.parametrize("channels_last", [False, True])
def test_bn_stats_and_scale_shift_act_compose_to_batchnorm(backend, channels_last):
    """bn_stats -> scale/shift -> scale_shift_act gives training BN, gradients included."""
    skip_unless_available("bn_stats", backend, "cpu")
    x, w, b, r, grad = _inputs((3, 6, 5, 7), torch.float32, "cpu", channels_last, residual=True)

    def composed(x, w, b, r):
        with fastblocks.use_backend(backend):
            mean, var = bn_stats(x)
            invstd = torch.rsqrt(var + 1e-5)
            return scale_shift_act(x, w * invstd, b - mean * w * invstd, residual=r, relu=True)

    def eager(x, w, b, r):
        return torch.relu(F.batch_norm(x, None, None, w, b, True, 0.1, 1e-5) + r)

    for f, e in zip(_run(composed, x, w, b, r, grad), _run(eager, x, w, b, r, grad)):
        torch.testing.assert_close(f, e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
@pytest.mark.parametrize("variant", ["bn", "bn_relu", "bn_add_relu", "bn_add"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(
    "dtype,channels_last,affine,momentum",
    [(torch.float32, False, True, 0.1), (torch.float32, True, False, None), (torch.float16, True, True, 0.3)],
    ids=["fp32-nchw", "fp32-nhwc-noaffine-cumulative", "fp16-nhwc"],
)
def test_eager_path_equals_the_registered_op(backend, variant, training, dtype, channels_last, affine, momentum):
    """batch_norm_act skips the custom-op dispatch in plain eager calls (an autograd.Function over
    the same kernels; on the compiled CPU backend one C++ call per direction, which also updates
    the running buffers); both paths must give the same outputs, gradients and buffers: identical
    bits, except that the one-call path does its per-channel arithmetic in loops (an fma for the
    shift, the running update and dx coefficients in double): there, within a few ulps."""
    skip_unless_available("batch_norm_act", backend, "cpu")
    x, w, b, r, grad = _inputs((3, 5, 6, 7), dtype, "cpu", channels_last, seed=4, residual="add" in variant)
    if not affine:
        w = b = None
    relu = "relu" in variant
    results, buffers, seen = [], [], []
    for registered in (False, True):
        rm, rv = torch.linspace(-1, 1, 5), torch.linspace(0.5, 2, 5)
        tracked = torch.tensor(3)
        mode = RecordOps() if registered else torch.profiler.profile()
        with fastblocks.use_backend(backend), mode:

            def fn(x, w, b, r, rm=rm, rv=rv, tracked=tracked):
                return batch_norm_act(
                    x, w, b, rm, rv, training=training, residual=r, relu=relu,
                    momentum=momentum, num_batches_tracked=tracked,
                )  # fmt: skip

            results.append(_run(fn, x, w, b, r, grad))
        seen.append(mode.seen if registered else {e.name for e in mode.events()})
        buffers.append((rm, rv))
    assert "fastblocks.batch_norm_act.default" in seen[1]
    one_call = backend == "cpu"  # the compiled CPU backend runs the whole BatchNorm in one call
    assert ("fastblocks::bn_fused_fwd" in seen[0]) == one_call
    assert ("fastblocks::bn_fused_bwd" in seen[0]) == one_call
    assert ("fastblocks::bn_apply" in seen[0]) == (backend == "cuda")
    ulps = 8 if one_call else 0
    for a, e in zip(results[0], results[1]):
        if a is None or e is None:
            assert a is None and e is None
            continue
        unit = torch.finfo(a.dtype).eps * e.abs().max().clamp_min(1)
        assert a.dtype == e.dtype and (a - e).abs().max() <= ulps * unit
    for a, e in zip(buffers[0], buffers[1]):
        assert (a - e).abs().max() <= ulps * torch.finfo(a.dtype).eps * e.abs().max().clamp_min(1)


@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
def test_gradcheck_float64(backend):
    skip_unless_available("batch_norm_act", backend, "cpu")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 3, 2, generator=g, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(4, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    r = torch.randn(3, 4, 3, 2, generator=g, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    scale = (torch.rand(4, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    shift = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    with fastblocks.use_backend(backend):
        for training in (True, False):
            for relu in (False, True):
                assert torch.autograd.gradcheck(
                    lambda x, w, b, r, t=training, a=relu: batch_norm_act(
                        x, w, b, rm.clone(), rv.clone(), training=t, residual=r, relu=a
                    ),
                    (x, w, b, r),
                )
        assert torch.autograd.gradcheck(lambda x: bn_stats(x), (x,))
        assert torch.autograd.gradcheck(
            lambda x, s, t, r: scale_shift_act(x, s, t, residual=r, relu=True), (x, scale, shift, r)
        )


@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
def test_opcheck(backend):
    skip_unless_available("batch_norm_act", backend, "cpu")
    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    xcl = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    w, b = torch.rand(3, requires_grad=True), torch.randn(3, requires_grad=True)
    rm, rv = torch.zeros(3), torch.ones(3)
    r = torch.randn(2, 3, 4, 5, requires_grad=True)
    with fastblocks.use_backend(backend):
        op = torch.ops.fastblocks.batch_norm_act.default
        torch.library.opcheck(op, (x, w, b, rm, rv, None, True, 1e-5, True))
        torch.library.opcheck(op, (xcl, w, b, rm, rv, None, True, 1e-5, False))
        torch.library.opcheck(op, (x, w, b, rm, rv, r, False, 1e-5, True))
        torch.library.opcheck(op, (x, None, None, None, None, r, True, 1e-5, True))
        torch.library.opcheck(torch.ops.fastblocks.bn_stats.default, (x,))
        torch.library.opcheck(torch.ops.fastblocks.bn_stats.default, (xcl,))
        torch.library.opcheck(torch.ops.fastblocks.scale_shift_act.default, (x, w, b, r, True))
        torch.library.opcheck(torch.ops.fastblocks.scale_shift_act.default, (xcl, w, b, None, False))


def test_saved_for_backward_is_only_the_input():
    x = torch.randn(4, 8, 6, 6, requires_grad=True)
    w, b = torch.ones(8, requires_grad=True), torch.zeros(8, requires_grad=True)
    _, fused = saved_tensor_bytes(lambda: batch_norm_act(x, w, b, training=True, relu=True))
    _, eager = saved_tensor_bytes(lambda: torch.relu(F.batch_norm(x * 1, None, None, w, b, True)))
    x_bytes = x.numel() * 4
    assert fused <= x_bytes + 8 * 4 * 4  # x plus a few [C] vectors
    assert eager >= 2 * x_bytes


def test_nan_propagates_like_eager():
    x = torch.randn(2, 3, 4, 4)
    x[0, 1, 2, 2] = float("nan")
    y = batch_norm_act(x, None, None, training=True, relu=True)
    e = torch.relu(F.batch_norm(x, None, None, training=True))
    torch.testing.assert_close(y, e, equal_nan=True)
    assert torch.isnan(y[:, 1]).all() and not torch.isnan(y[:, 0]).any()


def test_torch_compile_traces_the_op():
    def f(x, w, b):
        return batch_norm_act(x * 2, w, b, training=True, relu=True).sum()

    x, w, b = torch.randn(2, 3, 4, 4, requires_grad=True), torch.rand(3), torch.randn(3)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, w, b), f(x, w, b))
    compiled(x, w, b).backward()
    assert x.grad is not None


@pytest.mark.parametrize(
    "kwargs,exc,words",
    [
        ({"x": torch.randn(2, 3, 4, 4).long()}, TypeError, "x must have dtype"),
        ({"x": torch.randn(3)}, ValueError, "x must be 2 or 3 or 4-D"),
        ({"weight": torch.ones(4)}, ValueError, "weight has 4 elements but x has 3 channels"),
        ({"bias": torch.ones(3, 1)}, ValueError, "bias must be 1-D"),
        ({"running_mean": torch.zeros(3)}, ValueError, "running_mean and running_var"),
        ({"residual": torch.randn(2, 3, 4, 5)}, ValueError, "residual has shape"),
        ({"x": torch.randn(1, 3, 1, 1)}, ValueError, "Expected more than 1 value per channel when training"),
        ({"training": False}, ValueError, "eval mode needs running_mean"),
    ],
)
def test_bad_input_names_the_argument(kwargs, exc, words):
    args = {"x": torch.randn(2, 3, 4, 4), "weight": torch.ones(3), "bias": torch.zeros(3)}
    args.update(kwargs)
    x, w, b = args.pop("x"), args.pop("weight"), args.pop("bias")
    with pytest.raises(exc, match=words):
        batch_norm_act(x, w, b, **args)


@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_bn_stats_eager_path_equals_the_registered_op(backend, channels_last):
    skip_unless_available("bn_stats", backend, "cpu")
    x, *_ = _inputs((3, 5, 6, 7), torch.float32, "cpu", channels_last, seed=5)
    results = []
    for registered in (False, True):
        xl = x.detach().clone().requires_grad_()
        mode = RecordOps() if registered else contextlib.nullcontext()
        with fastblocks.use_backend(backend), mode:
            mean, var = bn_stats(xl)
            (mean * torch.arange(5.0) + var.square()).sum().backward()
        if registered:
            assert "fastblocks.bn_stats.default" in mode.seen
        results.append((mean.detach(), var.detach(), xl.grad))
    for a, e in zip(*results):
        assert torch.equal(a, e)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(3, 11, 5, 7), (2, 40, 1, 1), (2, 9, 1, 6), (1, 7, 4, 1)], ids=str)
def test_kernels_read_a_channel_prefix_as_a_dense_copy(device, backend, layout, shape):
    """A dense block's BatchNorm input is a channel prefix ``buf[:, :C]`` of a wider buffer. Every
    backend's kernel functions give on the view the bits they give on a dense copy of it: the
    Triton kernels read x through its own strides (and take the view itself: no copy), the
    compiled kernels through their row or image stride (tests/ops/test_batchnorm_kernels.py)."""
    skip_unless_available("dense_block", backend, device)
    from fastblocks.ops import _bn_core, _bn_triton

    kern = {"reference": _bn_core.REFERENCE, "triton": _bn_core.TRITON}.get(backend, _bn_core.COMPILED_KERNELS)
    cl = layout == "channels_last"
    fmt = torch.channels_last if cl else torch.contiguous_format
    g = torch.Generator().manual_seed(sum(shape))
    buf = torch.randn(shape, generator=g).to(device).contiguous(memory_format=fmt)
    c = shape[1] // 2 + 1
    x = buf[:, :c]
    xd = x.contiguous(memory_format=fmt)
    assert shape[0] == 1 or shape[2] * shape[3] == 1 or not x.is_contiguous(memory_format=fmt)
    small = (shape[0], c, *shape[2:])
    grad, res = (torch.randn(small, generator=g).to(device).contiguous(memory_format=fmt) for _ in range(2))
    scale, shift, mean = (torch.randn(c, generator=g).to(device) for _ in range(3))
    calls = {
        "stats": lambda t: kern.stats(t, cl),
        "apply": lambda t: kern.apply(t, scale, shift, res, True, cl),
        "bwd_reduce": lambda t: kern.bwd_reduce(grad, t, mean, scale, shift, res, True, cl),
        "bwd_apply": lambda t: kern.bwd_apply(grad, t, scale, shift, None, scale, shift, mean, True, cl),
    }
    for name, call in calls.items():
        got, want = call(x), call(xd)
        for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
            assert torch.equal(a, b), name
            if a.dim() == 4:
                assert a.is_contiguous(memory_format=fmt), name
    if backend == "triton":
        assert _bn_triton._x_operand(x, cl)[0] is x  # read in place
        # Not read in place: pixels that do not flatten to one stride; the other layout's innermost stride.
        if shape[2] > 1 and shape[3] > 2:
            every_other = buf[:, :c, :, ::2]
            assert _bn_triton._x_operand(every_other, cl)[0] is not every_other
        if shape[2] * shape[3] > 1:
            assert _bn_triton._x_operand(xd, not cl)[0] is not xd


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(3, 11, 5, 7), (2, 40, 1, 1), (1, 7, 4, 1)], ids=str)
def test_triton_bwd_apply_add_accumulates_into_a_prefix_in_place(device, dtype, layout, shape):
    """``bwd_apply_add(out, ...)``: ``out += a g' + b x + c`` in one pass, ``out`` the channel
    prefix of a dense block's gradient buffer: the two-pass result (bwd_apply, then add) bit for
    bit in fp32, the float64 truth within one rounding in fp16; the buffer's other channels
    untouched; an ``out`` the kernel cannot address in place takes the two-pass form."""
    skip_unless_available("dense_block", "triton", device)
    from fastblocks.ops import _bn_core

    kern = _bn_core.TRITON
    cl = layout == "channels_last"
    fmt = torch.channels_last if cl else torch.contiguous_format
    g = torch.Generator().manual_seed(7 + sum(shape))

    def make(s):
        return torch.randn(s, generator=g, dtype=torch.float64).to(device, dtype).contiguous(memory_format=fmt)

    buf, gbuf = make(shape), make(shape)
    c = shape[1] // 2 + 1
    x, out = buf[:, :c], gbuf[:, :c]
    da = make((shape[0], c, *shape[2:]))
    scale, shift, a, b, cc = (torch.randn(c, generator=g).to(device) for _ in range(5))
    before = gbuf.clone()
    kern.bwd_apply_add(out, da, x, scale, shift, a, b, cc, True, cl)
    two_pass = before[:, :c] + kern.bwd_apply(da, x, scale, shift, None, a, b, cc, True, cl)
    assert torch.equal(gbuf[:, c:], before[:, c:])
    if dtype == torch.float32:
        assert torch.equal(out, two_pass)
    else:
        pc = [1, -1, 1, 1]
        z = x.double() * scale.double().view(pc) + shift.double().view(pc)
        z = z.to(dtype).double()  # the forward's rounded BN output, whose sign masks the gradient
        truth = before[:, :c].double() + a.double().view(pc) * torch.where(z <= 0, 0.0, da.double())
        truth = truth + b.double().view(pc) * x.double() + cc.double().view(pc)
        ulp = torch.finfo(dtype).eps * truth.abs().clamp_min(torch.finfo(dtype).tiny)
        assert ((out.double() - truth).abs() <= ulp).all()
    # Pixels that do not flatten to one stride: still correct, through the two-pass form.
    if shape[2] > 1 and shape[3] > 2 and dtype == torch.float32:
        wide = make((shape[0], c, shape[2], 2 * shape[3]))
        view, base = wide[..., ::2], wide[..., ::2].clone()
        xs, ds = x[..., : view.shape[3]], da[..., : view.shape[3]]
        kern.bwd_apply_add(view, ds, xs, scale, shift, a, b, cc, True, cl)
        assert torch.equal(view, base + kern.bwd_apply(ds, xs, scale, shift, None, a, b, cc, True, cl))
    with pytest.raises(ValueError, match="out must have x's shape"):
        kern.bwd_apply_add(gbuf, da, x, scale, shift, a, b, cc, True, cl)
