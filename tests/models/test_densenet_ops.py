"""The memory-efficient dense block, transition and stem ops against their eager references.

The eager references (``*_reference`` in fastblocks/ops/dense_block.py) are torchvision's
forward with ``torch.cat`` and ``F.batch_norm``; autograd of them is the ground truth for the
hand-written backward (including the gradient through the shared chunk statistics).

Where a GPU is present the comparisons also run on CUDA (the ``device`` parameter): the
BatchNorm kernels of the triton/cuda/reference backends and cuDNN convolutions (TF32 off:
tests/conftest.py). The one-call CPU layers and pool kernels are checked on the CPU only.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastblocks
from fastblocks.models.densenet import _DenseBlock
from fastblocks.ops import BatchNormParams, DenseLayerParams
from fastblocks.ops.dense_block import dense_block, dense_block_reference
from fastblocks.ops.stem import stem_conv_bn_relu_pool, stem_reference
from fastblocks.ops.transition import dense_transition, dense_transition_reference
from fastblocks.testing import assert_close_to_reference, max_abs_err
from tests.helpers import CUDA_BACKENDS, device_backends, devices, rng_state, skip_unless_available

TOL = {torch.float64: 1e-10, torch.float32: 2e-4}
# (device, backend): the automatic choice on the CPU (its one-call layers), each CUDA backend on a GPU.
BLOCK_RUNS = device_backends([None], CUDA_BACKENDS)


def _randomize_bn(module: nn.Module, seed: int) -> None:
    """Non-trivial affine parameters and running statistics (init is 1/0/0/1)."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            with torch.no_grad():
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.5)
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)


def _block(c0=5, k=3, bn_size=2, num_layers=3, dtype=torch.float64, seed=0, drop_rate=0.0, momentum=0.1, device="cpu"):
    torch.manual_seed(seed)
    block = _DenseBlock(num_layers, c0, bn_size, k, drop_rate).to(dtype)
    _randomize_bn(block, seed)
    for m in block.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = momentum
    return block.to(device)


def _params(block: nn.Module) -> list[DenseLayerParams]:
    return [DenseLayerParams.from_module(layer) for layer in block.values()]


def _input(shape, dtype, channels_last, seed=1, device="cpu"):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(device, dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _compare_modules(a: nn.Module, b: nn.Module, tol: float, grads: bool = True) -> None:
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        if grads:
            scale = max(1.0, float(pb.grad.abs().max()))
            assert max_abs_err(pa.grad, pb.grad) <= tol * scale, f"grad of {name}"
    for (name, ba), bb in zip(a.named_buffers(), b.buffers()):
        assert max_abs_err(ba.double(), bb.double()) <= tol, f"buffer {name}"


@pytest.mark.parametrize("device,backend", BLOCK_RUNS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_dense_block_matches_reference(device, backend, dtype, channels_last, training):
    if backend is not None:
        skip_unless_available("dense_block", backend, device)
    fused = _block(dtype=dtype, device=device)
    ref = copy.deepcopy(fused)
    x = _input((3, 5, 6, 7), dtype, channels_last, device=device)
    xf, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    grad = _input((3, 5 + 3 * 3, 6, 7), dtype, channels_last, seed=2, device=device)
    with fastblocks.use_backend(backend):
        yf = dense_block(xf, _params(fused), training=training)
        yf.backward(grad)
    yr = dense_block_reference(xr, _params(ref), training=training)
    assert yf.shape == (3, 5 + 3 * 3, 6, 7)
    assert yf.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert max_abs_err(yf, yr) <= TOL[dtype]
    yr.backward(grad)
    assert max_abs_err(xf.grad, xr.grad) <= TOL[dtype] * max(1.0, float(xr.grad.abs().max()))
    _compare_modules(fused, ref, TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("keep", [None, False], ids=["default", "recompute"])
@pytest.mark.parametrize("drop_rate", [0.0, 0.3], ids=["", "dropout"])
def test_dense_block_cpu_and_reference_backends_agree(dtype, channels_last, training, keep, drop_rate):
    """On the compiled CPU backend each layer's forward and backward are one C++ call each
    (``dense_layer_fwd_``/``dense_layer_bwd_``);
    with dropout the Python loop runs, with norm1's sums and its direct dx share in one pass
    (``bn_bwd_reduce_add_``, added into the gradient buffer in place). The reference backend runs
    the separate kernels. Same outputs, gradients and buffers (dropout: the same seed, so the same
    masks)."""
    skip_unless_available("dense_block", "cpu", "cpu")
    blocks = {b: _block(dtype=dtype, num_layers=4, bn_size=1, drop_rate=drop_rate) for b in ("cpu", "reference")}
    x = _input((3, 5, 6, 7), dtype, channels_last)
    grad = _input((3, 5 + 4 * 3, 6, 7), dtype, channels_last, seed=2)
    results = {}
    for backend, block in blocks.items():
        xb = x.clone().requires_grad_()
        torch.manual_seed(7)
        with fastblocks.use_backend(backend), torch.profiler.profile() as prof:
            y = dense_block(xb, _params(block), training=training, drop_rate=drop_rate, keep_bottleneck=keep)
            y.backward(grad)
        ran = {e.name for e in prof.events()}
        one_call = backend == "cpu" and not (training and drop_rate > 0)
        assert ("fastblocks::dense_layer_fwd_" in ran) == one_call
        assert ("fastblocks::dense_layer_bwd_" in ran) == one_call
        assert ("fastblocks::bn_bwd_reduce_add_" in ran) == (backend == "cpu" and not one_call)
        results[backend] = (y.detach(), xb.grad)
    for a, b in zip(results["cpu"], results["reference"]):
        assert max_abs_err(a, b) <= TOL[dtype] * max(1.0, float(b.abs().max()))
    _compare_modules(blocks["cpu"], blocks["reference"], TOL[dtype])


@pytest.mark.parametrize("keep", [False, True], ids=["recompute", "keep"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_dense_block_gradcheck(training, keep):
    """float64 gradcheck of the hand-written backward, statistics path included, with the
    bottlenecks recomputed and kept."""
    block = _block(c0=3, k=2, bn_size=2, num_layers=3)
    layers = _params(block)
    if training:  # running buffers would be updated by every gradcheck evaluation
        layers = [
            DenseLayerParams(
                BatchNormParams(p.norm1.weight, p.norm1.bias),
                p.conv1_weight,
                BatchNormParams(p.norm2.weight, p.norm2.bias),
                p.conv2_weight,
            )
            for p in layers
        ]
    params = [t for p in layers for t in (p.norm1.weight, p.norm1.bias, p.conv1_weight, p.norm2.weight, p.conv2_weight)]
    x = _input((2, 3, 3, 4), torch.float64, False).requires_grad_()

    def fn(x, *_params):
        return dense_block(x, layers, training=training, keep_bottleneck=keep)

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-5, fast_mode=True)


@pytest.mark.parametrize("device", devices())
def test_running_statistics_updated_once_as_batchnorm(device):
    """norm1 of layer i sees the prefix: its running stats are the concatenated chunk stats."""
    fused = _block(momentum=0.1, device=device)
    ref = copy.deepcopy(fused)
    for step in range(2):
        x = _input((4, 5, 5, 5), torch.float64, False, seed=10 + step, device=device).requires_grad_()
        y = dense_block(x, _params(fused), training=True)
        y_ref = dense_block_reference(x.detach(), _params(ref), training=True)
        snapshot = copy.deepcopy(fused.state_dict())
        y.sum().backward()  # the recomputation in backward must not touch the buffers
        for key, value in fused.state_dict().items():
            assert torch.equal(value, snapshot[key]), key
        assert max_abs_err(y, y_ref) <= 1e-10
    for m in fused.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert int(m.num_batches_tracked) == 2
    _compare_modules(fused, ref, 1e-12, grads=False)


@pytest.mark.parametrize("device", devices())
def test_running_statistics_cumulative_average(device):
    fused = _block(momentum=None, device=device)
    ref = copy.deepcopy(fused)
    for step in range(3):
        x = _input((2, 5, 4, 4), torch.float64, False, seed=20 + step, device=device)
        dense_block(x, _params(fused), training=True)
        dense_block_reference(x, _params(ref), training=True)
    _compare_modules(fused, ref, 1e-12, grads=False)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("keep", [False, True], ids=["recompute", "keep"])
def test_dropout_draws_the_eager_masks(keep, device):
    """Same seed -> the same masks as eager F.dropout; backward replays them from the saved RNG
    state (with the bottlenecks recomputed or kept: dropout acts after conv2, not on them).
    The generator is x's device's (the CPU's or the current CUDA device's)."""
    fused = _block(drop_rate=0.5, device=device)
    ref = copy.deepcopy(fused)
    x = _input((3, 5, 6, 6), torch.float64, False, device=device)
    xf, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(123)
    yf = dense_block(xf, _params(fused), training=True, drop_rate=0.5, keep_bottleneck=keep)
    state_after_fused = rng_state(device)
    torch.manual_seed(123)
    yr = dense_block_reference(xr, _params(ref), training=True, drop_rate=0.5)
    assert torch.equal(state_after_fused, rng_state(device))  # same draws, same count
    assert max_abs_err(yf, yr) <= 1e-10
    assert (yf[:, 5:] == 0).any()  # dropout did drop something
    grad = _input(yf.shape, torch.float64, False, seed=2, device=device)
    torch.manual_seed(999)  # something else happens between forward and backward
    before = rng_state(device)
    yf.backward(grad)
    assert torch.equal(before, rng_state(device))  # backward leaves the generator alone
    yr.backward(grad)
    assert max_abs_err(xf.grad, xr.grad) <= 1e-10
    _compare_modules(fused, ref, 1e-10)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_kept_bottlenecks_change_nothing_but_the_work(channels_last, training, device):
    """keep_bottleneck only decides what backward recomputes: the output, input gradient,
    parameter gradients and running buffers agree for False, True and the default (which,
    here, keeps only the last layer's: C_i = 5, 8, 11, 14 against 4 B = 12)."""
    x = _input((3, 5, 6, 7), torch.float64, channels_last, device=device)
    grad = _input((3, 5 + 4 * 3, 6, 7), torch.float64, channels_last, seed=2, device=device)
    runs = {}
    for keep in (False, True, None):
        block = _block(c0=5, k=3, bn_size=1, num_layers=4, device=device)
        xi = x.clone().requires_grad_()
        y = dense_block(xi, _params(block), training=training, keep_bottleneck=keep)
        y.backward(grad)
        runs[keep] = (y.detach(), xi.grad, block)
    y0, g0, b0 = runs[False]
    for keep in (True, None):
        y, g, b = runs[keep]
        assert max_abs_err(y, y0) <= 1e-12, keep
        assert max_abs_err(g, g0) <= 1e-12 * max(1.0, float(g0.abs().max())), keep
        _compare_modules(b, b0, 1e-12)


def test_keep_bottleneck_must_be_a_bool_or_none():
    block = _block()
    with pytest.raises(TypeError, match="keep_bottleneck"):
        dense_block(_input((2, 5, 4, 4), torch.float64, False), _params(block), training=True, keep_bottleneck="yes")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("keep", [None, False, True], ids=["default", "recompute", "keep"])
def test_saves_only_the_buffer_and_vectors(keep, device):
    """The buffer and the statistics; with ``keep_bottleneck=True`` each layer's bottleneck too
    (the default keeps none here: C_i = 16..40 is below 4 B = 128)."""
    block = _block(c0=16, k=8, bn_size=4, num_layers=4, dtype=torch.float32, device=device)
    x = _input((4, 16, 16, 16), torch.float32, False, device=device).requires_grad_()
    param_storages = {p.untyped_storage().data_ptr() for p in block.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in param_storages:
            saved[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = dense_block(x, _params(block), training=True, keep_bottleneck=keep)
    vectors = 4 * (2 * (16 + 3 * 8) + 2 * 4 * 32)  # chunk stats + bottleneck stats, fp32
    bottlenecks = 4 * (4 * 32 * 16 * 16 * 4) if keep else 0  # layers x [N, B, H, W] fp32
    assert sum(saved.values()) == y.numel() * y.element_size() + vectors + bottlenecks
    with torch.no_grad():
        block.eval()
        assert dense_block(x, _params(block), training=False).grad_fn is None


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("op", ["transition", "stem"])
@pytest.mark.parametrize("device,backend", device_backends(["cpu", "reference"]))
def test_transition_and_stem_match_reference(op, channels_last, training, device, backend):
    """On the compiled CPU backend the stem runs BN-ReLU-maxpool as one kernel and keeps the
    pool's winners; on the others it recomputes BN-ReLU and the max-pool in backward."""
    skip_unless_available("dense_transition", backend, device)
    torch.manual_seed(0)
    if op == "transition":
        bn, conv = nn.BatchNorm2d(6).double(), nn.Conv2d(6, 3, 1, bias=False).double()
        x = _input((2, 6, 7, 6), torch.float64, channels_last, device=device)
        fused_fn, ref_fn = dense_transition, dense_transition_reference
    else:
        bn, conv = nn.BatchNorm2d(4).double(), nn.Conv2d(3, 4, 7, 2, 3, bias=False).double()
        x = _input((2, 3, 15, 12), torch.float64, channels_last, device=device)
        fused_fn, ref_fn = stem_conv_bn_relu_pool, stem_reference
    _randomize_bn(bn, 3)
    bn, conv = bn.to(device), conv.to(device)
    bn_ref, conv_ref = copy.deepcopy(bn), copy.deepcopy(conv)
    xf, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    saved = []
    with (
        fastblocks.use_backend(backend),
        torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.dtype) or t, lambda t: t),
        torch.profiler.profile() as prof,
    ):
        if op == "transition":
            yf = fused_fn(xf, BatchNormParams.from_module(bn), conv.weight, training=training)
        else:
            yf = fused_fn(xf, conv.weight, BatchNormParams.from_module(bn), training=training)
        yf.backward(_input(yf.shape, torch.float64, channels_last, seed=5, device=device))
    ran = {e.name for e in prof.events()}
    if op == "transition":  # BN-ReLU-avgpool as one kernel each way on the compiled CPU backend
        for kernel in ("fastblocks::transition_pool_fwd", "fastblocks::transition_pool_bwd"):
            assert (kernel in ran) == (backend == "cpu"), kernel
    if op == "transition":
        yr = ref_fn(xr, BatchNormParams.from_module(bn_ref), conv_ref.weight, training=training)
    else:
        yr = ref_fn(xr, conv_ref.weight, BatchNormParams.from_module(bn_ref), training=training)
        assert (torch.int8 in saved) == (backend == "cpu")  # the pool's winners
    assert yf.shape == yr.shape
    assert max_abs_err(yf, yr) <= 1e-10
    yr.backward(_input(yf.shape, torch.float64, channels_last, seed=5, device=device))
    assert max_abs_err(xf.grad, xr.grad) <= 1e-10
    for a, b in ((bn, bn_ref), (conv, conv_ref)):
        _compare_modules(a, b, 1e-10)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("op", ["transition", "stem"])
def test_transition_and_stem_gradcheck(op, training, channels_last):
    """float64 gradcheck of the transition's and the stem's hand-written backward (odd sizes: the
    transition's last row and column lie in no pooling window)."""
    torch.manual_seed(0)
    if op == "transition":
        bn, conv = nn.BatchNorm2d(3).double(), nn.Conv2d(3, 2, 1, bias=False).double()
        x = _input((2, 3, 5, 7), torch.float64, channels_last)
    else:
        bn, conv = nn.BatchNorm2d(3).double(), nn.Conv2d(2, 3, 7, 2, 3, bias=False).double()
        x = _input((2, 2, 9, 8), torch.float64, channels_last)
    _randomize_bn(bn, 4)
    # Training without running buffers: every gradcheck evaluation would update them.
    norm = BatchNormParams(bn.weight, bn.bias) if training else BatchNormParams.from_module(bn)

    def fn(x, weight, bias, conv_weight):
        p = BatchNormParams(weight, bias, norm.running_mean, norm.running_var)
        if op == "transition":
            return dense_transition(x, p, conv_weight, training=training)
        return stem_conv_bn_relu_pool(x, conv_weight, p, training=training)

    inputs = (x.requires_grad_(), bn.weight, bn.bias, conv.weight)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, fast_mode=True)


@pytest.mark.parametrize("device", devices())
def test_triton_backend_in_interpreter(device):
    """The triton backend (in the interpreter on CPU machines, compiled on a GPU)."""
    skip_unless_available("dense_block", "triton", device)
    fused = _block(c0=4, k=2, bn_size=2, num_layers=2, dtype=torch.float32, device=device)
    ref = copy.deepcopy(fused)
    x = _input((2, 4, 5, 5), torch.float32, True, device=device)
    xf, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    with fastblocks.use_backend("triton"):
        yf = dense_block(xf, _params(fused), training=True)
        yf.backward(torch.ones_like(yf))
    yr = dense_block_reference(xr, _params(ref), training=True)
    yr.backward(torch.ones_like(yr))
    assert max_abs_err(yf, yr) <= 1e-4
    assert max_abs_err(xf.grad, xr.grad) <= 1e-3
    _compare_modules(fused, ref, 1e-3)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("keep", [False, True], ids=["recompute", "keep"])
def test_autocast_computes_in_one_dtype(keep, device):
    block = _block(dtype=torch.float32, device=device)
    x = _input((2, 5, 6, 6), torch.float32, False, device=device).requires_grad_()
    with torch.autocast(device, dtype=torch.bfloat16):
        y = dense_block(x, _params(block), training=True, keep_bottleneck=keep)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32
    for p in block.parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32


def test_bad_arguments_raise_clear_errors():
    block = _block()
    layers = _params(block)
    with pytest.raises(ValueError, match="norm1 has 5 channels but its input has 4"):
        dense_block(torch.randn(2, 4, 5, 5, dtype=torch.float64), layers, training=True)
    with pytest.raises(ValueError, match="x must be 4-D"):
        dense_block(torch.randn(5, 5, 5, dtype=torch.float64), layers, training=True)
    with pytest.raises(TypeError, match="conv1_weight has dtype"):
        dense_block(torch.randn(2, 5, 5, 5), layers, training=True)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        dense_block(torch.randn(1, 5, 1, 1, dtype=torch.float64), layers, training=True)
    no_stats = [DenseLayerParams(BatchNormParams(None, None), p.conv1_weight, p.norm2, p.conv2_weight) for p in layers]
    with pytest.raises(ValueError, match="eval mode needs them"):
        dense_block(torch.randn(2, 5, 5, 5, dtype=torch.float64), no_stats, training=False)
    with pytest.raises(ValueError, match="too small for the 2x2 average pool"):
        bn, conv = nn.BatchNorm2d(5).double(), nn.Conv2d(5, 2, 1, bias=False).double()
        dense_transition(
            torch.randn(2, 5, 1, 1, dtype=torch.float64), BatchNormParams.from_module(bn), conv.weight, training=True
        )


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("keep", [False, True], ids=["recompute", "keep"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_dense_block_low_precision_training(dtype, keep, device):
    """fp16/bf16 storage: at most twice eager's error (same dtype) against a float64 reference."""
    ref = _block(c0=6, k=4, bn_size=2, num_layers=3, device=device)
    eager, fused = copy.deepcopy(ref).to(dtype), copy.deepcopy(ref).to(dtype)
    x = _input((4, 6, 8, 8), torch.float64, False, device=device)
    xs = [x.to(t).detach().requires_grad_() for t in (torch.float64, dtype, dtype)]
    outs = [
        dense_block_reference(xs[0], _params(ref), training=True),
        dense_block_reference(xs[1], _params(eager), training=True),
        dense_block(xs[2], _params(fused), training=True, keep_bottleneck=keep),
    ]
    grad = _input(outs[0].shape, torch.float64, False, seed=2, device=device)
    for out in outs:
        out.backward(grad.to(out.dtype))
    slack = 1e-3 if dtype == torch.float16 else 2e-2  # relative to each tensor's largest value
    assert_close_to_reference(outs[2], outs[1], outs[0], atol=slack * float(outs[0].detach().abs().max()))
    assert_close_to_reference(xs[2].grad, xs[1].grad, xs[0].grad, atol=slack * float(xs[0].grad.abs().max()))
    for (name, p_ref), p_eager, p_fused in zip(ref.named_parameters(), eager.parameters(), fused.parameters()):
        atol = slack * float(p_ref.grad.abs().max())
        assert_close_to_reference(p_fused.grad, p_eager.grad, p_ref.grad, atol=atol, name=f"grad of {name}")


@pytest.mark.parametrize("device", devices())
def test_kept_bottlenecks_compile_without_graph_break(device):
    """The block with kept bottlenecks traces whole (aot_eager, fullgraph) and matches eager."""
    block = _block(c0=5, k=3, bn_size=1, num_layers=3, device=device)
    layers = _params(block)
    x = _input((2, 5, 5, 6), torch.float64, False, device=device)

    def f(x):
        return dense_block(x, layers, training=True, keep_bottleneck=True)

    xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    yc = torch.compile(f, backend="aot_eager", fullgraph=True)(xc)
    ye = f(xe)
    assert max_abs_err(yc, ye) <= 1e-12
    yc.square().sum().backward()
    ye.square().sum().backward()
    assert max_abs_err(xc.grad, xe.grad) <= 1e-10


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_dense_layer_bwd_opcheck_and_bad_input(channels_last, training):
    """The one-call layer backward (CPU): opcheck (schema, fake, mutation of g/gmu/gvar), with
    and without a kept bottleneck, folding or not; bad shapes raise with the argument's name."""
    from tests.helpers import require_compiled_kernels

    require_compiled_kernels("dense_layer_bwd_", dispatch_key="CPU")
    import fastblocks.ops.dense_layer  # noqa: F401  (fake kernels of the one-call layer)

    ops = torch.ops.fastblocks
    n, c0, k, b, h, w = 2, 4, 3, 5, 5, 6
    ci, c = c0 + k, c0 + 3 * k
    buf = _input((n, c, h, w), torch.float32, channels_last)
    g = _input((n, c, h, w), torch.float32, channels_last, seed=3)
    mean1, var1 = torch.randn(c), torch.rand(c) + 0.5
    mean2, var2 = torch.randn(b), torch.rand(b) + 0.5
    gmu, gvar = (torch.randn(c), torch.randn(c)) if training else (torch.empty(0), torch.empty(0))
    w1, w2 = torch.randn(b, ci, 1, 1), torch.randn(k, b, 3, 3)
    gamma1, beta1, gamma2 = torch.rand(ci) + 0.5, torch.randn(ci), torch.rand(b) + 0.5
    bott = _input((n, b, h, w), torch.float32, channels_last, seed=4)
    for kept, fold in ((None, training), (bott, False)):
        args = (g, gmu, gvar, buf, mean1, var1, mean2, var2, gamma1, beta1, w1, gamma2, None, w2, kept,
                1e-5, 1e-5, ci, k, training, fold, channels_last)  # fmt: skip
        torch.library.opcheck(ops.dense_layer_bwd_.default, args)
        grads = ops.dense_layer_bwd_(*[a.clone() if isinstance(a, torch.Tensor) else a for a in args])
        assert grads[4] is None and [t.shape for t in grads if t is not None] == [
            gamma1.shape,
            beta1.shape,
            w1.shape,
            gamma2.shape,
            w2.shape,
        ]
    base = (g.clone(), gmu, gvar, buf, mean1, var1, mean2, var2, None, None)
    with pytest.raises(RuntimeError, match="conv1_weight must be"):
        ops.dense_layer_bwd_(*base, torch.randn(b, ci + 1, 1, 1), None, None, w2, None, 1e-5, 1e-5, ci, k,
                             training, False, channels_last)  # fmt: skip
    with pytest.raises(RuntimeError, match="conv2_weight must be"):
        ops.dense_layer_bwd_(*base, w1, None, None, torch.randn(k, b, 1, 1), None, 1e-5, 1e-5, ci, k,
                             training, False, channels_last)  # fmt: skip
    with pytest.raises(RuntimeError, match="are not inside buf"):
        ops.dense_layer_bwd_(*base, w1, None, None, w2, None, 1e-5, 1e-5, c, k, training, False, channels_last)
    with pytest.raises(RuntimeError, match="mean2 must be 1-D"):
        ops.dense_layer_bwd_(g.clone(), gmu, gvar, buf, mean1, var1, mean2[:2], var2, None, None, w1, None, None,
                             w2, None, 1e-5, 1e-5, ci, k, training, False, channels_last)  # fmt: skip


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_dense_layer_fwd_opcheck_and_bad_input(channels_last, training):
    """The one-call layer forward (CPU): opcheck (schema, fake, mutation of buf and the statistics),
    keeping the bottleneck or not; it writes only the layer's chunk; bad shapes raise."""
    from tests.helpers import require_compiled_kernels

    require_compiled_kernels("dense_layer_fwd_", dispatch_key="CPU")
    import fastblocks.ops.dense_layer  # noqa: F401  (fake kernels of the one-call layer)

    ops = torch.ops.fastblocks
    n, c0, k, b, h, w = 2, 4, 3, 5, 5, 6
    ci, c = c0 + k, c0 + 3 * k
    buf = _input((n, c, h, w), torch.float32, channels_last)
    mean1, var1 = torch.randn(c), torch.rand(c) + 0.5
    mean2, var2 = torch.randn(b), torch.rand(b) + 0.5
    w1, w2 = torch.randn(b, ci, 1, 1), torch.randn(k, b, 3, 3)
    gamma1, beta1, gamma2 = torch.rand(ci) + 0.5, torch.randn(ci), torch.rand(b) + 0.5
    for keep in (False, True):
        args = [buf, mean1, var1, mean2, var2, gamma1, beta1, w1, gamma2, None, w2, 1e-5, 1e-5, ci, k, training,
                training, keep, channels_last]  # fmt: skip
        torch.library.opcheck(ops.dense_layer_fwd_.default, tuple(args))
        fresh = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
        bott = ops.dense_layer_fwd_(*fresh)
        assert (bott is not None) == keep
        changed = (fresh[0] != buf).any(dim=(0, 2, 3))
        assert not changed[:ci].any() and changed[ci : ci + k].all() and not changed[ci + k :].any()
    with pytest.raises(RuntimeError, match="conv1_weight must be"):
        ops.dense_layer_fwd_(buf.clone(), mean1, var1, mean2, var2, None, None, torch.randn(b, ci - 1, 1, 1), None,
                             None, w2, 1e-5, 1e-5, ci, k, training, False, False, channels_last)  # fmt: skip
    with pytest.raises(RuntimeError, match="mean1 must be 1-D"):
        ops.dense_layer_fwd_(buf.clone(), mean1[:2], var1, mean2, var2, None, None, w1, None, None, w2, 1e-5,
                             1e-5, ci, k, training, False, False, channels_last)  # fmt: skip
    with pytest.raises(RuntimeError, match="more than 1 value per channel"):
        one = torch.randn(1, c, 1, 1)
        ops.dense_layer_fwd_(one, mean1, var1, mean2, var2, None, None, w1, None, None, w2, 1e-5, 1e-5, ci, k,
                             True, False, False, False)  # fmt: skip


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_stem_registered_op_opcheck_and_matches_the_eager_path(training, channels_last):
    """Traced calls (torch.compile) run the stem as a registered op: schema, fake kernel (with the
    CPU max-pool winners or without), autograd; its results equal the eager path's."""
    g = torch.Generator().manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 3, 19, 17, generator=g).contiguous(memory_format=fmt).requires_grad_()
    w = torch.randn(8, 3, 7, 7, generator=g, requires_grad=True)
    bw, bb = (torch.rand(8, generator=g) + 0.5).requires_grad_(), torch.randn(8, generator=g).requires_grad_()
    rm, rv = torch.randn(8, generator=g), torch.rand(8, generator=g) + 0.5
    args = (x, w, bw, bb, None if training else rm, None if training else rv, training, 1e-5)
    torch.library.opcheck(torch.ops.fastblocks.stem.default, args)
    out, mean, var, winners = torch.ops.fastblocks.stem(*args)
    bwd = (torch.randn_like(out), x, w, bw, bb, mean, var, winners, training, 1e-5, [True] * 4)
    torch.library.opcheck(
        torch.ops.fastblocks.stem_backward.default, bwd, test_utils=("test_schema", "test_faketensor")
    )
    norm = BatchNormParams(bw, bb, rm.clone(), rv.clone(), torch.zeros((), dtype=torch.long))
    eager = stem_conv_bn_relu_pool(x, w, norm, training=training)
    assert torch.equal(out, eager)
    (gx_op,) = torch.autograd.grad(out.square().sum(), x)
    (gx_eager,) = torch.autograd.grad(eager.square().sum(), x)
    assert max_abs_err(gx_op, gx_eager) <= 1e-5 * (1 + gx_eager.abs().max().item())


def _op_params(c0, k, bott, num_layers, affine, g):
    """The registered op's flat parameter list (an absent BN weight or bias is an empty tensor)."""
    params: list[torch.Tensor] = []
    running: list[torch.Tensor] = []
    for i in range(num_layers):
        ci = c0 + i * k
        params += [
            (torch.rand(ci, generator=g) + 0.5).requires_grad_() if affine else torch.empty(0),
            torch.randn(ci, generator=g).requires_grad_() if affine else torch.empty(0),
            (0.3 * torch.randn(bott, ci, 1, 1, generator=g)).requires_grad_(),
            (torch.rand(bott, generator=g) + 0.5).requires_grad_() if affine else torch.empty(0),
            torch.randn(bott, generator=g).requires_grad_() if affine else torch.empty(0),
            (0.2 * torch.randn(k, bott, 3, 3, generator=g)).requires_grad_(),
        ]
        running += [torch.randn(ci, generator=g), torch.rand(ci, generator=g) + 0.5]
        running += [torch.randn(bott, generator=g), torch.rand(bott, generator=g) + 0.5]
    return params, running


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_dense_block_registered_op_opcheck_and_matches_the_eager_path(training, channels_last, affine):
    """Traced calls (torch.compile) run the block as a registered op: schema, fake kernel (with
    and without kept bottlenecks, absent BN parameters), autograd; forward and every gradient
    equal the eager path's (the same loops)."""
    g = torch.Generator().manual_seed(0)
    c0, k, bott, nl, eps = 6, 4, 8, 3, [1e-5] * 3
    x = _input((2, c0, 5, 4), torch.float32, channels_last).requires_grad_()
    params, running = _op_params(c0, k, bott, nl, affine, g)
    keep = [True, False, True]
    run = [] if training else running
    args = (x, params, run, eps, eps, keep, training)
    torch.library.opcheck(torch.ops.fastblocks.dense_block.default, args)
    buf, m1, v1, m2, v2, kept = torch.ops.fastblocks.dense_block(*args)
    bwd = (torch.randn_like(buf), buf, m1, v1, m2, v2, params, run, kept, eps, eps, keep, training, c0)
    torch.library.opcheck(
        torch.ops.fastblocks.dense_block_backward.default, bwd, test_utils=("test_schema", "test_faketensor")
    )
    opt = [p if p.numel() else None for p in params]

    def norm(i: int, j: int) -> BatchNormParams:
        return BatchNormParams(*opt[i : i + 2], *(None, None) if training else running[j : j + 2])

    layers = [
        DenseLayerParams(norm(6 * i, 4 * i), opt[6 * i + 2], norm(6 * i + 3, 4 * i + 2), opt[6 * i + 5])
        for i in range(nl)
    ]
    eager = dense_block(x, layers, training=training, keep_bottleneck=None)
    assert torch.equal(buf, eager)
    leaves = [x] + [p for p in params if p.numel()]
    grad = torch.randn_like(buf)
    for got, want in zip(torch.autograd.grad(buf, leaves, grad), torch.autograd.grad(eager, leaves, grad)):
        assert max_abs_err(got, want) <= 1e-5 * (1 + want.abs().max().item())


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_transition_registered_op_opcheck_and_matches_the_eager_path(training, channels_last):
    """Traced calls run the transition as a registered op: schema, fake kernel, autograd; its
    results equal the eager path's."""
    g = torch.Generator().manual_seed(0)
    x = _input((2, 8, 6, 5), torch.float32, channels_last).requires_grad_()
    w, b = (torch.rand(8, generator=g) + 0.5).requires_grad_(), torch.randn(8, generator=g).requires_grad_()
    cw = torch.randn(4, 8, 1, 1, generator=g, requires_grad=True)
    rm, rv = torch.randn(8, generator=g), torch.rand(8, generator=g) + 0.5
    args = (x, w, b, cw, None if training else rm, None if training else rv, training, 1e-5)
    torch.library.opcheck(torch.ops.fastblocks.dense_transition.default, args)
    out, mean, var = torch.ops.fastblocks.dense_transition(*args)
    torch.library.opcheck(
        torch.ops.fastblocks.dense_transition_backward.default,
        (torch.randn_like(out), x, w, b, cw, mean, var, training, 1e-5),
        test_utils=("test_schema", "test_faketensor"),
    )
    norm = BatchNormParams(w, b, rm.clone(), rv.clone(), torch.zeros((), dtype=torch.long))
    eager = dense_transition(x, norm, cw, training=training)
    assert torch.equal(out, eager)
    grad = torch.randn_like(out)
    for got, want in zip(
        torch.autograd.grad(out, (x, w, b, cw), grad), torch.autograd.grad(eager, (x, w, b, cw), grad)
    ):
        assert max_abs_err(got, want) <= 1e-5 * (1 + want.abs().max().item())


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_traced_dense_block_keeps_bottlenecks_only_for_a_backward(monkeypatch, grad):
    """On the registered-op path (traced calls; here a dispatch mode), the bottlenecks are kept for
    backward only when autograd records the call: under no_grad (compiled inference) none is kept."""
    import sys

    from tests.helpers import RecordOps

    module = sys.modules["fastblocks.ops.dense_block"]  # the package exports the function by that name

    asked: list[list[bool]] = []
    op = module._dense_block_op

    def spy(x, params, running, eps1, eps2, keep, training):
        asked.append(list(keep))
        return op(x, params, running, eps1, eps2, keep, training)

    monkeypatch.setattr(module, "_dense_block_op", spy)
    g = torch.Generator().manual_seed(0)
    params, _ = _op_params(6, 4, 8, 3, True, g)
    layers = [DenseLayerParams(BatchNormParams(*params[6 * i : 6 * i + 2]), params[6 * i + 2],
                               BatchNormParams(*params[6 * i + 3 : 6 * i + 5]), params[6 * i + 5])
              for i in range(3)]  # fmt: skip
    x = torch.randn(2, 6, 5, 4)
    with torch.set_grad_enabled(grad), RecordOps() as rec:
        dense_block(x, layers, training=True, keep_bottleneck=True)
    assert "fastblocks.dense_block.default" in rec.seen
    assert asked == [[grad] * 3]
