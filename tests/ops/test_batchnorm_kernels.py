"""The compiled CPU kernels of the BatchNorm family (csrc/cpu/batchnorm.cpp), called directly as
``torch.ops.fastblocks.bn_stats_fwd / bn_apply / bn_bwd_reduce / bn_bwd_apply``.

Each is compared with a float64 formula written here. x-sized results (one or two roundings to x's
dtype) must lie within a few units of x's rounding of the exact value, scaled by the magnitude of
the terms that produced it; reductions (fp32 accumulation for every dtype but fp64) within 1e-5 of
the sum of the terms' magnitudes.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import fastblocks.ops._bn_core  # noqa: F401  (fake kernels of the compiled schemas, for opcheck)
from tests.helpers import require_compiled_kernels

require_compiled_kernels("bn_stats_fwd", "bn_apply", "bn_bwd_reduce", "bn_bwd_apply", dispatch_key="CPU")

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SHAPES = [(1, 63, 7, 7), (2, 3, 13, 13), (3, 17, 5, 9), (8, 64, 28, 28), (2, 2048, 2, 2)]
LAYOUTS = ["nchw", "channels_last"]
UNIT = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 2.0**-24, torch.float64: 2.0**-53}


def _ops():
    return torch.ops.fastblocks


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _red_tol(dtype: torch.dtype) -> float:
    return 1e-12 if dtype == torch.float64 else 1e-5


def _pc(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """A per-channel vector as float64, broadcastable against [N, C, ...]."""
    return v.double().view(1, -1, *([1] * (ndim - 2)))


def _dims(x: torch.Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def _make(shape, dtype, layout, seed, scale=1.0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(shape, generator=g, dtype=torch.float64) * scale + offset).to(dtype)
    return t.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else t


def _strided(shape, dtype, seed):
    """A non-contiguous (in every memory format) view with fresh values."""
    g = torch.Generator().manual_seed(seed)
    wide = torch.randn((*shape[:-1], 2 * shape[-1]), generator=g, dtype=torch.float64).to(dtype)
    view = wide[..., ::2]
    assert view.numel() <= 1 or not view.is_contiguous()
    return view


def _channel(c, seed, dtype, lo=-1.0, hi=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(c, generator=g, dtype=torch.float64) * (hi - lo) + lo).to(dtype)


def _params(x, seed=10):
    c, acc = x.shape[1], _acc(x.dtype)
    scale = _channel(c, seed, acc, -2.0, 2.0)
    shift = _channel(c, seed + 1, acc, -1.0, 1.0)
    return scale, shift


def _value64(x, scale, shift, residual):
    """x*scale + shift [+ residual] in float64, rounded to x's dtype where eager rounds: after the BN
    (when a residual follows); the final rounding is left to the caller."""
    nd = x.dim()
    y = x.double() * _pc(scale, nd) + _pc(shift, nd)
    if residual is not None:
        y = y.to(x.dtype).double() + residual.double()
    return y


def _value_bound(x, scale, shift, residual):
    """Allowed |kernel - float64| of the forward value: two roundings to x's dtype (the BN, the add)
    plus fp32 arithmetic, relative to the magnitude of the terms; smallest normal as the floor."""
    nd = x.dim()
    mag = (x.double() * _pc(scale, nd)).abs() + _pc(shift, nd).abs()
    if residual is not None:
        mag = mag + residual.double().abs()
    return (4 * UNIT[x.dtype] + 4 * UNIT[_acc(x.dtype)]) * mag + torch.finfo(x.dtype).tiny


def assert_within(actual, expected, bound, what):
    a = actual.double()
    ok = ((a - expected).abs() <= bound) | (a.isnan() & expected.isnan())
    if not bool(ok.all()):
        excess = ((a - expected).abs() - bound)[~ok]
        raise AssertionError(f"{what}: {int((~ok).sum())} of {ok.numel()} off, worst by {excess.max().item():.3g}")


def _fmt(layout):
    return torch.channels_last if layout == "channels_last" else torch.contiguous_format


def _case(shape, dtype, layout, with_residual, seed=0):
    x = _make(shape, dtype, layout, seed, scale=2.0, offset=0.3)
    scale, shift = _params(x, seed + 10)
    residual = _make(shape, dtype, layout, seed + 20) if with_residual else None
    return x, scale, shift, residual


BIG = (8, 64, 28, 28)


def _full_matrix(shape, dtype, with_residual, relu):
    # Every combination on the small odd shapes; on the big one (several tiles per channel in both
    # layouts) fewer, to keep the file fast: fp32 and bf16, plain or with residual and ReLU.
    return shape != BIG or (dtype in (torch.float32, torch.bfloat16) and with_residual == relu)


CASES = pytest.mark.parametrize("shape", SHAPES, ids=str)
DTYPE = pytest.mark.parametrize("dtype", DTYPES, ids=str)
LAYOUT = pytest.mark.parametrize("layout", LAYOUTS)
ELEMENTWISE_CASES = pytest.mark.parametrize(
    "shape,dtype,layout,with_residual,relu",
    [
        pytest.param(*c, id=f"{c[0]}-{c[1]}-{c[2]}{'-residual' if c[3] else ''}{'-relu' if c[4] else ''}")
        for c in itertools.product(SHAPES, DTYPES, LAYOUTS, [False, True], [False, True])
        if _full_matrix(c[0], c[1], c[3], c[4])
    ],
)


# ----------------------------------------------------------------------------- bn_stats_fwd
@CASES
@DTYPE
@LAYOUT
def test_stats_match_float64(shape, dtype, layout):
    x = _make(shape, dtype, layout, 1, scale=3.0, offset=0.5)
    mean, var = _ops().bn_stats_fwd(x, layout == "channels_last")
    assert mean.dtype == var.dtype == _acc(dtype) and mean.shape == var.shape == (shape[1],)
    var64, mean64 = torch.var_mean(x.double(), dim=_dims(x), correction=0)
    tol = _red_tol(dtype)
    assert_within(mean, mean64, tol * x.double().abs().mean(_dims(x)), "mean")
    assert_within(var, var64, tol * var64, "var")


@LAYOUT
def test_stats_are_stable_for_a_large_mean(layout):
    # mean² / var = 1e6: a one-pass sum of squares in fp32 loses every digit here.
    x = _make((16, 8, 64, 64), torch.float32, layout, 2, scale=1.0, offset=1000.0)
    mean, var = _ops().bn_stats_fwd(x, layout == "channels_last")
    var64, mean64 = torch.var_mean(x.double(), dim=_dims(x), correction=0)
    assert_within(var, var64, 1e-3 * var64, "var")
    assert_within(mean, mean64, 1e-6 * mean64, "mean")


def test_stats_of_an_empty_batch_raise():
    with pytest.raises(RuntimeError, match="empty batch"):
        _ops().bn_stats_fwd(torch.empty(0, 3, 4, 4), False)


# ----------------------------------------------------------------------------- bn_apply
@ELEMENTWISE_CASES
def test_apply_matches_float64(shape, dtype, layout, with_residual, relu):
    x, scale, shift, residual = _case(shape, dtype, layout, with_residual)
    y = _ops().bn_apply(x, scale, shift, residual, relu, layout == "channels_last")
    assert y.dtype == dtype and y.shape == x.shape
    assert y.is_contiguous(memory_format=_fmt(layout))
    expected = _value64(x, scale, shift, residual)
    if relu:
        expected = torch.where(expected <= 0, 0.0, expected)
    assert_within(y, expected, _value_bound(x, scale, shift, residual), "y")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_apply_rounds_like_eager_bn_plus_residual(dtype):
    # Eager's relu(bn(x) + residual) rounds bn(x) to the dtype before the add: so must the kernel.
    x, scale, shift, residual = _case((2, 8, 9, 9), dtype, "nchw", True, seed=5)
    y = _ops().bn_apply(x, scale, shift, residual, True, False)
    t = torch.addcmul(_pc(shift, 4).float(), x.float(), _pc(scale, 4).float()).to(dtype)  # fp32 fma, rounded
    assert torch.equal(y, torch.relu(t + residual))


@pytest.mark.parametrize("channels_last", [False, True])
def test_apply_output_layout_follows_the_flag_not_the_input(channels_last):
    x = _make((2, 5, 6, 7), torch.float32, "channels_last" if not channels_last else "nchw", 3)
    scale, shift = _params(x)
    y = _ops().bn_apply(x, scale, shift, None, True, channels_last)
    assert y.is_contiguous(memory_format=_fmt("channels_last" if channels_last else "nchw"))
    assert_within(y, torch.relu(_value64(x, scale, shift, None)), _value_bound(x, scale, shift, None), "y")


# ----------------------------------------------------------------------------- backward kernels
def _keep(x, scale, shift, residual, channels_last):
    """The forward ReLU's pass pattern: bn_apply's output is > 0 or NaN exactly where it passed."""
    y = _ops().bn_apply(x, scale, shift, residual, True, channels_last)
    keep = ~(y <= 0)
    # The float64 formula agrees except where the value is within rounding of 0.
    expected = _value64(x, scale, shift, residual).to(x.dtype)
    differ = keep != ~(expected <= 0)
    assert bool((expected.double().abs()[differ] <= _value_bound(x, scale, shift, residual)[differ]).all())
    return keep


@ELEMENTWISE_CASES
def test_bwd_reduce_matches_float64(shape, dtype, layout, with_residual, relu):
    x, scale, shift, residual = _case(shape, dtype, layout, with_residual)
    cl = layout == "channels_last"
    grad = _strided(shape, dtype, 7)
    mean = torch.var_mean(x.double(), dim=_dims(x), correction=0)[1].to(_acc(dtype))
    sum_g, sum_gx = _ops().bn_bwd_reduce(grad, x, mean, scale, shift, residual, relu, cl)
    assert sum_g.dtype == sum_gx.dtype == _acc(dtype) and sum_g.shape == sum_gx.shape == (shape[1],)
    g = grad.double()
    if relu:
        g = torch.where(_keep(x, scale, shift, residual, cl), g, 0.0)
    xc = x.double() - _pc(mean, x.dim())
    dims, tol = _dims(x), _red_tol(dtype)
    assert_within(sum_g, g.sum(dims), tol * g.abs().sum(dims), "sum_g")
    assert_within(sum_gx, (g * xc).sum(dims), tol * (g * xc).abs().sum(dims), "sum_gx")


@ELEMENTWISE_CASES
def test_bwd_apply_matches_float64(shape, dtype, layout, with_residual, relu):
    x, scale, shift, residual = _case(shape, dtype, layout, with_residual)
    cl = layout == "channels_last"
    grad = _strided(shape, dtype, 8)
    acc, c = _acc(dtype), shape[1]
    a, b, cc = _channel(c, 30, acc), _channel(c, 31, acc), _channel(c, 32, acc)
    dx = _ops().bn_bwd_apply(grad, x, scale, shift, residual, a, b, cc, relu, cl)
    assert dx.dtype == dtype and dx.shape == x.shape and dx.is_contiguous(memory_format=_fmt(layout))
    g = grad.double()
    if relu:
        g = torch.where(_keep(x, scale, shift, residual, cl), g, 0.0)
    nd = x.dim()
    terms = (_pc(a, nd) * g, _pc(b, nd) * x.double(), _pc(cc, nd).expand(x.shape))
    mag = sum(t.abs() for t in terms)
    bound = (2 * UNIT[dtype] + 4 * UNIT[acc]) * mag + torch.finfo(dtype).tiny
    assert_within(dx, sum(terms), bound, "dx")


def test_eval_backward_is_a_scaled_masked_grad():
    # a = scale, b = c = 0: dx = scale * g' exactly in fp32 (one product, one rounding).
    x, scale, shift, residual = _case((2, 6, 5, 5), torch.float32, "nchw", True, seed=9)
    grad = _strided(x.shape, torch.float32, 9)
    zero = torch.zeros_like(scale)
    dx = _ops().bn_bwd_apply(grad, x, scale, shift, residual, scale, zero, zero, True, False)
    keep = _keep(x, scale, shift, residual, False)
    assert torch.equal(dx, torch.where(keep, grad * scale.view(1, -1, 1, 1), 0.0))


# ----------------------------------------------------------------------------- other ranks, empty
@pytest.mark.parametrize("shape", [(37, 19), (4, 6, 33)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_2d_and_3d_inputs(shape, dtype):
    x, scale, shift, residual = _case(shape, dtype, "nchw", True, seed=11)
    mean, var = _ops().bn_stats_fwd(x, False)
    var64, mean64 = torch.var_mean(x.double(), dim=_dims(x), correction=0)
    assert_within(var, var64, 1e-5 * var64, "var")
    assert_within(mean, mean64, 1e-5 * x.double().abs().mean(_dims(x)), "mean")
    y = _ops().bn_apply(x, scale, shift, residual, True, False)
    bound = _value_bound(x, scale, shift, residual)
    assert_within(y, torch.relu(_value64(x, scale, shift, residual)), bound, "y")
    grad = _strided(shape, dtype, 12)
    keep = ~(y <= 0)
    g = torch.where(keep, grad.double(), 0.0)
    sum_g, sum_gx = _ops().bn_bwd_reduce(grad, x, mean, scale, shift, residual, True, False)
    gxc = g * (x.double() - _pc(mean, x.dim()))
    assert_within(sum_g, g.sum(_dims(x)), 1e-5 * g.abs().sum(_dims(x)), "sum_g")
    assert_within(sum_gx, gxc.sum(_dims(x)), 1e-5 * gxc.abs().sum(_dims(x)), "sum_gx")
    ones, zero = torch.ones_like(scale), torch.zeros_like(scale)
    dx = _ops().bn_bwd_apply(grad, x, scale, shift, residual, ones, zero, zero, True, False)
    assert torch.equal(dx, torch.where(keep, grad, 0).to(dtype))


@pytest.mark.parametrize("channels_last", [False, True])
def test_empty_batch(channels_last):
    x = torch.empty(0, 3, 4, 4)
    scale, shift = _params(x)
    y = _ops().bn_apply(x, scale, shift, None, True, channels_last)
    assert y.shape == x.shape and y.is_contiguous(memory_format=_fmt("channels_last" if channels_last else "nchw"))
    sum_g, sum_gx = _ops().bn_bwd_reduce(x, x, scale, scale, shift, None, True, channels_last)
    assert torch.equal(sum_g, torch.zeros(3)) and torch.equal(sum_gx, torch.zeros(3))
    dx = _ops().bn_bwd_apply(x, x, scale, shift, None, scale, scale, scale, True, channels_last)
    assert dx.shape == x.shape


# ----------------------------------------------------------------------------- NaN
@LAYOUT
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_nan_passes_through_apply_and_its_gradient(layout, dtype):
    cl = layout == "channels_last"
    x, scale, shift, residual = _case((2, 5, 6, 7), dtype, layout, True, seed=13)
    x[0, 1, 2, 3] = float("nan")
    x[1, 4, 0, 0] = float("nan")
    residual[1, 2, 5, 6] = float("nan")
    nan = x.isnan() | residual.isnan()
    y = _ops().bn_apply(x, scale, shift, residual, True, cl)
    assert torch.equal(y.isnan(), nan)
    keep = ~(y <= 0)  # threshold_backward's rule: NaN passes its gradient
    assert bool(keep[nan].all())
    grad = torch.ones_like(x)
    ones, zero = torch.ones_like(scale), torch.zeros_like(scale)
    dx = _ops().bn_bwd_apply(grad, x, scale, shift, residual, ones, zero, zero, True, cl)
    # dx = 1 * g' + 0 * x + 0: the gradient passes where y is NaN; 0 * x is NaN where x is.
    assert torch.equal(dx.isnan(), x.isnan())
    assert torch.equal(dx[~x.isnan()], keep[~x.isnan()].to(dtype))
    mean = torch.zeros_like(scale)
    sum_g, sum_gx = _ops().bn_bwd_reduce(grad, x, mean, scale, shift, residual, True, cl)
    assert torch.equal(sum_g, keep.sum(_dims(x)).to(sum_g.dtype))
    assert torch.equal(sum_gx.isnan(), x.isnan().any(dim=(0, 2, 3)))


# ----------------------------------------------------------------------------- bad input
_X = torch.randn(2, 4, 3, 3)
_S, _B = torch.ones(4), torch.zeros(4)
BAD_CALLS = [
    ("scale must be 1-D with one element per channel", "bn_apply", (_X, torch.ones(5), _B, None, True, False)),
    ("scale must have dtype Float", "bn_apply", (_X, _S.double(), _B, None, True, False)),
    ("shift must be 1-D", "bn_apply", (_X, _S, _B[:3], None, True, False)),
    ("residual has shape", "bn_apply", (_X, _S, _B, torch.randn(2, 4, 3, 2), True, False)),
    ("residual has dtype", "bn_apply", (_X, _S, _B, _X.half(), True, False)),
    ("channels_last needs a 4-D x", "bn_apply", (_X[0, 0], _S[:3], _B[:3], None, True, True)),
    ("x must be float16", "bn_apply", (_X.int(), _S, _B, None, True, False)),
    ("x must be", "bn_stats_fwd", (torch.randn(5), False)),
    ("grad_y has shape", "bn_bwd_reduce", (_X[:1], _X, _S, _S, _B, None, True, False)),
    ("mean must be 1-D", "bn_bwd_reduce", (_X, _X, _S[:2], _S, _B, None, True, False)),
    (": a must have dtype", "bn_bwd_apply", (_X, _X, _S, _B, None, _S.half(), _B, _B, True, False)),
    (": c must be 1-D", "bn_bwd_apply", (_X, _X, _S, _B, None, _S, _B, torch.ones(2, 2), True, False)),
]


@pytest.mark.parametrize("words,op,args", BAD_CALLS, ids=[w for w, _, _ in BAD_CALLS])
def test_bad_input_names_the_argument(words, op, args):
    with pytest.raises(RuntimeError, match=words):
        getattr(_ops(), op)(*args)


# ----------------------------------------------------------------------------- opcheck
@pytest.mark.parametrize("dtype,channels_last", [(torch.float32, False), (torch.float16, True)], ids=str)
def test_opcheck(dtype, channels_last):
    layout = "channels_last" if channels_last else "nchw"
    x, scale, shift, residual = _case((2, 3, 5, 7), dtype, layout, True, seed=14)
    grad = _strided(x.shape, dtype, 15)
    mean = torch.zeros_like(scale)
    ops = _ops()
    torch.library.opcheck(ops.bn_stats_fwd.default, (x, channels_last))
    torch.library.opcheck(ops.bn_apply.default, (x, scale, shift, residual, True, channels_last))
    torch.library.opcheck(ops.bn_apply.default, (x, scale, shift, None, False, not channels_last))
    torch.library.opcheck(ops.bn_bwd_reduce.default, (grad, x, mean, scale, shift, residual, True, channels_last))
    torch.library.opcheck(ops.bn_bwd_reduce.default, (grad, x, mean, scale, shift, None, False, channels_last))
    args = (grad, x, scale, shift, residual, scale, shift, mean, True, channels_last)
    torch.library.opcheck(ops.bn_bwd_apply.default, args)


# ----------------------------------------------------------------------------- one-call forward/backward
def test_one_call_ops_opcheck_and_bad_input():
    """bn_fused_fwd / bn_fused_bwd (their results are compared with the four-kernel path, bit for
    bit, in tests/ops/test_batchnorm.py::test_eager_path_equals_the_registered_op)."""
    require_compiled_kernels("bn_fused_fwd", "bn_fused_bwd", dispatch_key="CPU")
    ops = _ops()
    for dtype, cl in ((torch.float32, False), (torch.float16, True)):
        layout = "channels_last" if cl else "nchw"
        x, _, _, residual = _case((2, 3, 5, 7), dtype, layout, True, seed=16)
        grad = _strided(x.shape, dtype, 17)
        w, b = torch.rand(3) + 0.5, torch.randn(3)
        rm, rv = torch.randn(3), torch.rand(3) + 0.5
        torch.library.opcheck(ops.bn_fused_fwd.default, (x, w, b, rm, rv, residual, True, 0.1, 1e-5, True, True, cl))
        torch.library.opcheck(
            ops.bn_fused_fwd.default, (x, None, None, rm, rv, None, False, 0.1, 1e-5, False, False, cl)
        )
        mean, var = rm.clone(), rv.clone()
        for need in ((True, True, True, True), (True, False, False, False), (False, True, True, True)):
            torch.library.opcheck(
                ops.bn_fused_bwd.default, (grad, x, w, b, mean, var, residual, True, 1e-5, True, *need, cl)
            )
        torch.library.opcheck(
            ops.bn_fused_bwd.default,
            (grad, x, None, None, mean, var, None, False, 1e-5, False, True, True, True, True, cl),
        )
    x = torch.randn(2, 3, 4, 5)
    with pytest.raises(RuntimeError, match="running_mean and running_var must both be given"):
        ops.bn_fused_fwd(x, None, None, torch.zeros(3), None, None, True, 0.1, 1e-5, False, False, False)
    with pytest.raises(RuntimeError, match="eval mode needs running_mean"):
        ops.bn_fused_fwd(x, None, None, None, None, None, False, 0.1, 1e-5, False, False, False)
    with pytest.raises(RuntimeError, match="update_running needs training=True"):
        ops.bn_fused_fwd(x, None, None, torch.zeros(3), torch.ones(3), None, False, 0.1, 1e-5, False, True, False)
    with pytest.raises(RuntimeError, match="weight must be 1-D with one element per channel"):
        ops.bn_fused_fwd(x, torch.ones(4), None, None, None, None, True, 0.1, 1e-5, False, False, False)
    with pytest.raises(RuntimeError, match="var must be 1-D"):
        ops.bn_fused_bwd(
            x, x, None, None, torch.zeros(3), torch.ones(2), None, True, 1e-5, False, True, True, True, True, False
        )


# ----------------------------------------------------------------------------- stem: BN-ReLU-maxpool
def _pool_reference(x, scale, shift, channels_last):
    """bn_apply's BN-ReLU, then PyTorch's max-pool 3x3/2 pad 1 with indices."""
    a = _ops().bn_apply(x, scale, shift, None, True, channels_last)
    out, idx = torch.ops.aten.max_pool2d_with_indices(a, [3, 3], [2, 2], [1, 1], [1, 1], False)
    return a, out, idx


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 13, 13), (2, 5, 8, 9), (1, 4, 1, 1), (2, 3, 2, 3), (2, 64, 30, 28)], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_stem_pool_matches_max_pool(dtype, shape, layout):
    """stem_pool_fwd picks the winner F.max_pool2d picks (first maximum, NaN wins; checked on
    ties and a NaN), and stem_pool_bwd routes the gradient as max_pool2d_with_indices_backward:
    bit for bit in fp32/fp64; in fp16/bf16 one rounding of each sum instead of one per term."""
    require_compiled_kernels("stem_pool_fwd", "stem_pool_bwd", dispatch_key="CPU")
    cl = layout == "channels_last"
    x, scale, shift, _ = _case(shape, dtype, layout, False, seed=30)
    x = x.clone()
    x[:, :, ::3] = 0.25  # ties inside windows (and, after BN-ReLU, windows of zeros)
    x[0, 0, 0, 0] = float("nan")
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    a, out_ref, idx_ref = _pool_reference(x, scale, shift, cl)
    out, winners = _ops().stem_pool_fwd(x, scale, shift, cl)
    assert winners.dtype == torch.int8 and winners.shape == out.shape == out_ref.shape
    assert out.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    assert torch.equal(out.isnan(), out_ref.isnan())
    assert torch.equal(out.nan_to_num(7.0), out_ref.nan_to_num(7.0))
    # The winners name the same input element as PyTorch's flat indices.
    oh = torch.arange(out.shape[2]).view(1, 1, -1, 1)
    ow = torch.arange(out.shape[3]).view(1, 1, 1, -1)
    k = winners.long()
    flat = (2 * oh - 1 + k // 3) * shape[3] + (2 * ow - 1 + k % 3)
    assert torch.equal(flat, idx_ref)
    grad = _strided(out.shape, dtype, 31)
    gin = _ops().stem_pool_bwd(grad, winners, shape[2], shape[3], cl)
    gin_ref = torch.ops.aten.max_pool2d_with_indices_backward(grad, a, [3, 3], [2, 2], [1, 1], [1, 1], False, idx_ref)
    assert gin.dtype == dtype and gin.shape == x.shape
    if dtype in (torch.float32, torch.float64):
        assert torch.equal(gin, gin_ref)
    else:  # at most two windows share a winner in each direction: four terms
        exact = torch.ops.aten.max_pool2d_with_indices_backward(
            grad.double(), a.double(), [3, 3], [2, 2], [1, 1], [1, 1], False, idx_ref
        )
        assert (gin.double() - exact).abs().max() <= 4 * UNIT[dtype] * exact.abs().max() + 1e-12


def test_stem_pool_opcheck_and_bad_input():
    require_compiled_kernels("stem_pool_fwd", "stem_pool_bwd", dispatch_key="CPU")
    ops = _ops()
    for dtype, layout in ((torch.float32, "nchw"), (torch.bfloat16, "channels_last")):
        cl = layout == "channels_last"
        x, scale, shift, _ = _case((2, 3, 9, 8), dtype, layout, False, seed=32)
        torch.library.opcheck(ops.stem_pool_fwd.default, (x, scale, shift, cl))
        _, winners = ops.stem_pool_fwd(x, scale, shift, cl)
        grad = _strided(winners.shape, dtype, 33)
        torch.library.opcheck(ops.stem_pool_bwd.default, (grad, winners, 9, 8, cl))
    g = torch.randn(1, 1, 2, 2)
    with pytest.raises(RuntimeError, match="not a window position inside the input"):
        ops.stem_pool_bwd(g, torch.full((1, 1, 2, 2), 9, dtype=torch.int8), 3, 3, False)
    with pytest.raises(RuntimeError, match="not a window position inside the input"):
        ops.stem_pool_bwd(g, torch.zeros(1, 1, 2, 2, dtype=torch.int8), 3, 3, False)  # (0, 0): padding
    with pytest.raises(RuntimeError, match="not the 3x3/2 pool of a 5x5 input"):
        ops.stem_pool_bwd(g, torch.zeros(1, 1, 2, 2, dtype=torch.int8), 5, 5, False)
    with pytest.raises(RuntimeError, match="idx must be int8"):
        ops.stem_pool_bwd(g, torch.zeros(1, 1, 2, 2), 3, 3, False)
    with pytest.raises(RuntimeError, match="scale must be 1-D with one element per channel"):
        ops.stem_pool_fwd(torch.randn(1, 2, 4, 4), torch.ones(3), torch.zeros(2), False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(3, 11, 5, 7), (2, 40, 1, 1)], ids=str)  # 1x1: NCHW reads as rows too
def test_channel_prefix_views_are_read_in_place(dtype, layout, shape):
    """A channel prefix buf[:, :C] of a wider tensor (a dense block's buffer) is read through its
    strides, not copied (NCHW: the image stride; channels_last: the row stride): every kernel
    gives the bits it gives on a dense copy."""
    require_compiled_kernels("bn_fused_fwd", "bn_fused_bwd", dispatch_key="CPU")
    ops = _ops()
    cl, c = layout == "channels_last", shape[1] // 2 + 1
    buf = _make(shape, dtype, layout, 40)
    x, xd = buf[:, :c], buf[:, :c].contiguous(memory_format=_fmt(layout))
    assert not x.is_contiguous(memory_format=_fmt(layout))
    scale, shift = _params(xd, 41)
    mean, var = _channel(c, 42, scale.dtype), _channel(c, 45, scale.dtype, 0.5, 2.0)
    small = (shape[0], c, *shape[2:])
    grad, residual = _make(small, dtype, layout, 43), _make(small, dtype, layout, 44)
    calls = [
        ("bn_stats_fwd", lambda t: ops.bn_stats_fwd(t, cl)),
        ("bn_apply", lambda t: ops.bn_apply(t, scale, shift, residual, True, cl)),
        ("bn_bwd_reduce", lambda t: ops.bn_bwd_reduce(grad, t, mean, scale, shift, residual, True, cl)),
        ("bn_bwd_apply", lambda t: ops.bn_bwd_apply(grad, t, scale, shift, residual, scale, shift, mean, True, cl)),
        (
            "bn_fused_fwd",
            lambda t: ops.bn_fused_fwd(t, None, None, None, None, residual, True, 0.1, 1e-5, True, False, cl),
        ),
        (
            "bn_fused_bwd",
            lambda t: ops.bn_fused_bwd(
                grad, t, None, None, mean, var, residual, True, 1e-5, True, True, True, True, True, cl
            ),
        ),
    ]
    for name, call in calls:
        with torch.profiler.profile() as prof:
            got = call(x)
        assert not any(e.name in ("aten::copy_", "aten::clone") for e in prof.events()), name
        want = call(xd)
        for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
            assert (a is None and b is None) or torch.equal(a, b), name


# ----------------------------------------------------------------------------- dense block: reduce + add
def _reduce_add_case(shape, dtype, layout, prefix, seed):
    """(acc, x, grad, mean, scale, shift) with x and acc channel prefixes of wider tensors when
    ``prefix`` (a dense block's buffer and gradient buffer), else dense in ``layout``."""
    n, c, h, w = shape
    fmt = _fmt(layout)
    if prefix:
        x = _make((n, c + 5, h, w), dtype, layout, seed, scale=2.0, offset=0.3)[:, :c]
        acc = _make((n, c + 5, h, w), dtype, layout, seed + 1)[:, :c]
    else:
        x = _make(shape, dtype, layout, seed, scale=2.0, offset=0.3)
        acc = _make(shape, dtype, layout, seed + 1)
    scale, shift = _params(x.contiguous(memory_format=fmt), seed + 10)
    mean = torch.var_mean(x.double(), dim=_dims(x), correction=0)[1].to(_acc(dtype))
    return acc, x, _strided(shape, dtype, seed + 2), mean, scale, shift


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 17, 5, 9), (1, 63, 7, 7), (2, 40, 28, 28), (2, 2048, 2, 2)], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("prefix", [False, True], ids=["dense", "prefix"])
def test_bwd_reduce_add_matches_float64(dtype, shape, layout, prefix):
    """bn_bwd_reduce_add_: bn_bwd_reduce's sums, and acc += scale * g' in place (a prefix view's
    other channels untouched)."""
    require_compiled_kernels("bn_bwd_reduce_add_", dispatch_key="CPU")
    cl = layout == "channels_last"
    acc, x, grad, mean, scale, shift = _reduce_add_case(shape, dtype, layout, prefix, seed=50)
    whole = acc._base if prefix else acc
    before, acc0 = whole.clone(), acc.clone().double()  # a copy: .double() of float64 is acc itself
    sum_g, sum_gx = _ops().bn_bwd_reduce_add_(acc, grad, x, mean, scale, shift, True, cl)
    assert sum_g.dtype == sum_gx.dtype == _acc(dtype) and sum_g.shape == sum_gx.shape == (shape[1],)
    keep = _keep(x.contiguous(memory_format=_fmt(layout)), scale, shift, None, cl)
    g = torch.where(keep, grad.double(), 0.0)
    xc = x.double() - _pc(mean, 4)
    dims, tol = _dims(x), _red_tol(dtype)
    assert_within(sum_g, g.sum(dims), tol * g.abs().sum(dims), "sum_g")
    assert_within(sum_gx, (g * xc).sum(dims), tol * (g * xc).abs().sum(dims), "sum_gx")
    term = _pc(scale, 4) * g
    bound = (2 * UNIT[dtype] + 4 * UNIT[_acc(dtype)]) * (acc0.abs() + term.abs()) + torch.finfo(dtype).tiny
    assert_within(acc, acc0 + term, bound, "acc")
    if prefix:
        assert torch.equal(whole[:, shape[1] :], before[:, shape[1] :])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_bwd_reduce_add_writes_a_prefix_in_place(layout):
    """Dense-block operands (x and acc channel prefixes of NCHW or channels_last buffers) are read
    and written through their strides: no copy; an acc laid out unlike x still gets the right
    values (through a copy)."""
    require_compiled_kernels("bn_bwd_reduce_add_", dispatch_key="CPU")
    ops = _ops()
    cl, fmt = layout == "channels_last", _fmt(layout)
    acc, x, grad, mean, scale, shift = _reduce_add_case((3, 6, 5, 7), torch.float32, layout, True, seed=60)
    grad = grad.contiguous(memory_format=fmt)
    want_acc = acc.clone()
    want = ops.bn_bwd_reduce_add_(want_acc, grad, x.contiguous(memory_format=fmt), mean, scale, shift, True, cl)
    with torch.profiler.profile() as prof:
        got = ops.bn_bwd_reduce_add_(acc, grad, x, mean, scale, shift, True, cl)
    assert not any(e.name in ("aten::copy_", "aten::clone", "aten::contiguous") for e in prof.events())
    assert torch.equal(acc, want_acc) and all(torch.equal(a, b) for a, b in zip(got, want))
    # acc dense with x a prefix, and acc a prefix with x dense (through copies): the right values.
    wide = _make((3, 11, 5, 7), torch.float32, layout, 61)
    rest = wide[:, 6:].clone()
    for acc2, x2 in ((want_acc.contiguous(memory_format=fmt), x), (wide[:, :6], x.contiguous(memory_format=fmt))):
        start = acc2.clone()
        ops.bn_bwd_reduce_add_(acc2, grad, x2, mean, scale, shift, True, cl)
        ref = start + torch.where(_keep(x2.contiguous(memory_format=fmt), scale, shift, None, cl), grad, 0.0) * (
            scale.view(1, -1, 1, 1)
        )
        torch.testing.assert_close(acc2, ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(wide[:, 6:], rest)


def test_bwd_reduce_add_opcheck_and_bad_input():
    require_compiled_kernels("bn_bwd_reduce_add_", dispatch_key="CPU")
    ops = _ops()
    for dtype, layout in ((torch.float32, "nchw"), (torch.bfloat16, "channels_last")):
        acc, x, grad, mean, scale, shift = _reduce_add_case((2, 3, 5, 7), dtype, layout, False, seed=70)
        torch.library.opcheck(
            ops.bn_bwd_reduce_add_.default, (acc, grad, x, mean, scale, shift, True, layout != "nchw")
        )
    x = torch.randn(2, 3, 4, 4)
    v = torch.zeros(3)
    with pytest.raises(RuntimeError, match="acc has shape"):
        ops.bn_bwd_reduce_add_(torch.zeros(2, 3, 4, 5), x, x, v, v, v, True, False)
    with pytest.raises(RuntimeError, match="acc has dtype"):
        ops.bn_bwd_reduce_add_(x.double(), x, x, v, v, v, True, False)
    with pytest.raises(RuntimeError, match="grad_y has shape"):
        ops.bn_bwd_reduce_add_(x.clone(), x[:1], x, v, v, v, True, False)
    with pytest.raises(RuntimeError, match="mean must be 1-D with one element per channel"):
        ops.bn_bwd_reduce_add_(x.clone(), x, x, v[:2], v, v, True, False)


# ----------------------------------------------------------------------------- transition: BN-ReLU-avgpool
def _transition64(x, grad, mean, scale, shift, invstd, training, cl):
    """Float64 formulas of transition_pool_fwd/bwd: the kernels' ReLU pass pattern (bn_apply's), the
    rest exact. Returns (out, dx, sum_g, sum_gx, g', the three terms of dx), g' the gradient at the
    ReLU's output."""
    n, _, h, w = x.shape
    keep = _keep(x, scale, shift, None, cl)
    a = torch.where(keep, _value64(x, scale, shift, None).to(x.dtype).double(), 0.0)
    out = torch.nn.functional.avg_pool2d(a, 2, 2)
    up = torch.zeros(x.shape, dtype=torch.float64)
    oh, ow = h // 2, w // 2
    up[:, :, : 2 * oh, : 2 * ow] = grad.double().repeat_interleave(2, 2).repeat_interleave(2, 3) / 4
    gp = torch.where(keep, up, 0.0)
    xc = x.double() - _pc(mean, 4)
    sum_g, sum_gx = gp.sum((0, 2, 3)), (gp * xc).sum((0, 2, 3))
    m = n * h * w
    s, inv = scale.double(), invstd.double()
    if training:
        b = -s * inv * inv * sum_gx / m
        cc = -s * sum_g / m - b * mean.double()
    else:
        b = cc = torch.zeros_like(s)
    dx = _pc(s, 4) * gp + _pc(b, 4) * x.double() + _pc(cc, 4)
    return out, dx, sum_g, sum_gx, gp, (_pc(s, 4) * gp, _pc(b, 4) * x.double(), _pc(cc, 4).expand(x.shape))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 6, 8), (3, 5, 7, 5), (2, 4, 2, 2), (1, 2, 3, 2), (2, 70, 14, 14)], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_transition_pool_matches_float64(dtype, shape, layout, training):
    """transition_pool_fwd = avgpool2x2/2 (floor) of bn_apply's BN-ReLU; transition_pool_bwd = the
    gradient of x through it (batch statistics' dependence included in training), odd edges
    (in no window) getting only the statistics' share."""
    require_compiled_kernels("transition_pool_fwd", "transition_pool_bwd", dispatch_key="CPU")
    cl = layout == "channels_last"
    x, scale, shift, _ = _case(shape, dtype, layout, False, seed=80)
    var, mean = torch.var_mean(x.double(), dim=_dims(x), correction=0)
    mean, invstd = mean.to(_acc(dtype)), (var + 1e-5).rsqrt().to(_acc(dtype))
    ops = _ops()
    out = ops.transition_pool_fwd(x, scale, shift, cl)
    oshape = (shape[0], shape[1], shape[2] // 2, shape[3] // 2)
    assert out.dtype == dtype and out.shape == oshape and out.is_contiguous(memory_format=_fmt(layout))
    grad = _strided(oshape, dtype, 81)
    dx, sum_g, sum_gx = ops.transition_pool_bwd(grad, x, mean, scale, shift, invstd, training, cl)
    assert dx.dtype == dtype and dx.shape == x.shape and dx.is_contiguous(memory_format=_fmt(layout))
    out64, dx64, sg64, sgx64, gp, terms = _transition64(x, grad, mean, scale, shift, invstd, training, cl)
    acc_unit = UNIT[_acc(dtype)]
    # Each of the four values within _value_bound of its float64 value, then the mean rounds.
    window = torch.nn.functional.avg_pool2d(_value_bound(x, scale, shift, None), 2, 2)
    assert_within(out, out64, window + (UNIT[dtype] + 4 * acc_unit) * out64 + torch.finfo(dtype).tiny, "out")
    xc = (x.double() - _pc(mean, 4)).abs()
    dims, tol = (0, 2, 3), _red_tol(dtype)
    assert_within(sum_g, sg64, tol * gp.abs().sum(dims), "sum_g")
    assert_within(sum_gx, sgx64, tol * (gp.abs() * xc).sum(dims), "sum_gx")
    # dx: rounding of its terms, plus what the error the sums may carry (bounded above) does to
    # the coefficients b = -s inv² Σg'(x-mean)/M and c = -s Σg'/M - b mean.
    mag = sum(t.abs() for t in terms)
    bound = (2 * UNIT[dtype] + 8 * acc_unit) * mag + torch.finfo(dtype).tiny
    if training:
        m, s, inv = x.numel() // shape[1], scale.double().abs(), invstd.double()
        err_b = 2 * tol * s * inv * inv * (gp.abs() * xc).sum(dims) / m
        err_c = 2 * tol * s * gp.abs().sum(dims) / m + err_b * mean.double().abs()
        bound = bound + _pc(err_b, 4) * x.double().abs() + _pc(err_c, 4)
    assert_within(dx, dx64, bound, "dx")


def test_transition_pool_equals_avg_pool_in_fp32():
    """The forward adds each window's four values in F.avg_pool2d's order: the same bits."""
    require_compiled_kernels("transition_pool_fwd", dispatch_key="CPU")
    for layout in LAYOUTS:
        cl = layout == "channels_last"
        x, scale, shift, _ = _case((2, 9, 10, 7), torch.float32, layout, False, seed=82)
        a = _ops().bn_apply(x, scale, shift, None, True, cl)
        assert torch.equal(_ops().transition_pool_fwd(x, scale, shift, cl), torch.nn.functional.avg_pool2d(a, 2, 2))


def test_transition_pool_opcheck_and_bad_input():
    require_compiled_kernels("transition_pool_fwd", "transition_pool_bwd", dispatch_key="CPU")
    ops = _ops()
    for dtype, layout in ((torch.float32, "nchw"), (torch.bfloat16, "channels_last")):
        cl = layout == "channels_last"
        x, scale, shift, _ = _case((2, 3, 7, 6), dtype, layout, False, seed=83)
        torch.library.opcheck(ops.transition_pool_fwd.default, (x, scale, shift, cl))
        grad = _strided((2, 3, 3, 3), dtype, 84)
        mean, invstd = _channel(3, 85, scale.dtype), _channel(3, 86, scale.dtype, 0.5, 2.0)
        for training in (True, False):
            args = (grad, x, mean, scale, shift, invstd, training, cl)
            torch.library.opcheck(ops.transition_pool_bwd.default, args)
    x, v = torch.randn(2, 3, 4, 4), torch.ones(3)
    with pytest.raises(RuntimeError, match="at least 2x2"):
        ops.transition_pool_fwd(torch.randn(2, 3, 1, 4), v, v, False)
    with pytest.raises(RuntimeError, match="must be 4-D"):
        ops.transition_pool_fwd(torch.randn(2, 3, 4), v, v, False)
    with pytest.raises(RuntimeError, match="scale must be 1-D with one element per channel"):
        ops.transition_pool_fwd(x, v[:2], v, False)
    with pytest.raises(RuntimeError, match="not the 2x2/2 pool of x"):
        ops.transition_pool_bwd(torch.randn(2, 3, 3, 2), x, v, v, v, v, True, False)
    with pytest.raises(RuntimeError, match="grad_out has dtype"):
        ops.transition_pool_bwd(torch.randn(2, 3, 2, 2).double(), x, v, v, v, v, True, False)
    with pytest.raises(RuntimeError, match="invstd must be 1-D"):
        ops.transition_pool_bwd(torch.randn(2, 3, 2, 2), x, v, v, v, v[:1], True, False)


# ----------------------------------------------------------------------------- one scale/shift
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_one_call_scale_shift_is_the_python_one_bit_for_bit(dtype, monkeypatch):
    """scale and shift are written twice, in Python (``_bn_core.scale_shift``, used by every
    backend) and in C++ (``scale_shift_loop`` of the one-call ``bn_fused_fwd``); they must not
    drift: the one-call path's output equals the registered op's bit for bit, on random data with
    and without affine parameters, residual, training and eval, channel counts that exercise the
    vector loop and its tail."""
    from fastblocks.ops import batchnorm as bn_ops

    require_compiled_kernels("bn_fused_fwd", dispatch_key="CPU")
    calls = []
    real = bn_ops._BatchNormActCPUFunction.apply
    monkeypatch.setattr(bn_ops._BatchNormActCPUFunction, "apply", lambda *a: calls.append(1) or real(*a))
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    for seed in range(12):
        g = torch.Generator().manual_seed(seed)
        c = 5 + 7 * seed
        x = (torch.randn(3, c, 4, 5, generator=g, dtype=torch.float64) * (seed + 1) + seed).to(dtype)
        r = torch.randn(3, c, 4, 5, generator=g, dtype=torch.float64).to(dtype)
        w, b = (torch.rand(c, generator=g, dtype=cd) + 0.5), torch.randn(c, generator=g, dtype=cd)
        rm, rv = torch.randn(c, generator=g, dtype=cd), torch.rand(c, generator=g, dtype=cd) + 0.1
        for affine, training, res in itertools.product((True, False), (True, False), (None, r)):
            args = (x, w if affine else None, b if affine else None)
            fused = bn_ops.batch_norm_act(*args, rm.clone(), rv.clone(), training=training, relu=True, residual=res)
            y, _, _ = bn_ops._batch_norm_act_op(*args, rm.clone(), rv.clone(), res, training, 1e-5, True)
            assert torch.equal(fused, y), (seed, affine, training, res is not None)
    assert len(calls) == 12 * 8  # every call above took the one-call path
