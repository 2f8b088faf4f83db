"""fastblocks.nn.ConvBNReLU2d side by side with eager ``nn.Sequential(Conv2d, BatchNorm2d, ReLU)``.

The convolution is PyTorch's on every backend; the backend parameter picks the fused
BatchNorm-ReLU op's implementation (Triton runs in the interpreter on CPU machines).
"""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
from torch import nn

import fastblocks
from fastblocks.nn import ConvBNReLU2d, convert_sync_batchnorm
from fastblocks.nn.conv import conv_bn_relu
from fastblocks.nn.fold import FoldedConv2d
from fastblocks.testing import saved_tensor_bytes
from tests.helpers import (
    BACKENDS_UNDER_TEST,
    device_backends,
    devices,
    skip_bf16_in_interpreter,
    skip_unless_available,
)

OP = "batch_norm_act"

# (N, C_in, C_out, H=W, kernel, stride, padding, conv bias): odd channel counts and sizes.
CASES = [
    (3, 63, 17, 13, 3, 1, 1, False),
    (1, 63, 17, 7, 1, 2, 0, True),
    (3, 63, 17, 13, 3, 2, 1, True),
    (1, 63, 17, 13, 1, 1, 0, False),
]
CONFIGS = [
    {"relu": False},
    {"momentum": None},
    {"track_running_stats": False},
    {"affine": False},
    {"momentum": 0.3, "eps": 1e-3},
]
LAYOUTS = ["nchw", "channels_last"]
# Every shape and layout on every backend; the configurations on one shape. In the Triton
# interpreter (seconds per step) only those that change what the kernels compute (ReLU on or
# off, no affine weight) run, in one layout: momentum and track_running_stats are the module's
# own bookkeeping, the same code on every backend.
STEPS = [(case, {}, layout) for case in CASES for layout in LAYOUTS] + [
    (CASES[0], config, layout) for config in CONFIGS for layout in LAYOUTS
]
INTERPRETED = {"relu": False}, {"affine": False}


def _case_id(p: object) -> str:
    return "x".join(map(str, p)) if isinstance(p, tuple) else str(p)


def _pair(case, device="cpu", seed=0, **config):
    """The fused module and its eager twin with identical (non-trivial) weights and buffers."""
    _, c_in, c_out, _, k, stride, padding, bias = case
    torch.manual_seed(seed)
    fused = ConvBNReLU2d(c_in, c_out, k, stride, padding, bias=bias, **config).to(device)
    with torch.no_grad():
        if fused.bn.affine:
            fused.bn.weight.uniform_(0.5, 1.5)
            fused.bn.bias.uniform_(-0.5, 0.5)
        if fused.bn.running_mean is not None:
            fused.bn.running_mean.uniform_(-0.2, 0.2)
            fused.bn.running_var.uniform_(0.8, 1.2)
    eager = nn.Sequential(copy.deepcopy(fused.conv), copy.deepcopy(fused.bn), nn.ReLU())
    if not fused.relu:
        eager = eager[:2]
    return fused, eager


def _input(case, step, device, layout, seed=1):
    n, c_in, _, h = case[:4]
    g = torch.Generator().manual_seed(seed + step)
    x = torch.randn(n, c_in, h, h, generator=g) * (step + 1) + 0.3 * step
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    return x.to(device).contiguous(memory_format=fmt)


def _close(got, want, tol, name):
    # Tolerances relative to the size of the compared values (gradients grow with the batch).
    scale = 1.0 + float(want.detach().abs().max())
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * scale, msg=lambda m: f"{name}: {m}")


def _run_steps(fused, eager, case, backend, device, layout, *, steps, tol, autocast_dtype=None):
    """Train both ``steps`` SGD steps, then evaluate; compare outputs, every gradient and buffer."""
    opt_f = torch.optim.SGD(fused.parameters(), lr=0.05)
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.05)

    def forward(module, x):
        if autocast_dtype is None:
            return module(x)
        with torch.autocast(device, dtype=autocast_dtype):
            return module(x)

    for step in range(steps + 1):
        training = step < steps
        fused.train(training)
        eager.train(training)
        x = _input(case, step, device, layout)
        xf, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
        with fastblocks.use_backend(backend):
            yf = forward(fused, xf)
        ye = forward(eager, xe)
        assert yf.dtype == ye.dtype and yf.shape == ye.shape
        assert yf.is_contiguous(memory_format=torch.channels_last) == ye.is_contiguous(
            memory_format=torch.channels_last
        )
        # A fixed random upstream gradient keeps the SGD steps bounded.
        g = torch.randn(ye.shape, generator=torch.Generator().manual_seed(100 + step)).to(device, ye.dtype)
        with fastblocks.use_backend(backend):
            yf.backward(g)
        ye.backward(g)
        _close(yf, ye, tol, f"step {step} output")
        _close(xf.grad, xe.grad, tol, f"step {step} input grad")
        assert len(list(fused.parameters())) == len(list(eager.parameters()))
        for (name, pf), pe in zip(fused.named_parameters(), eager.parameters()):
            _close(pf.grad, pe.grad, tol, f"step {step} {name}.grad")
        for opt in (opt_f, opt_e):
            opt.step()
            opt.zero_grad()
        state_f, state_e = fused.state_dict(), eager.state_dict()
        assert len(state_f) == len(state_e)
        for (name, vf), ve in zip(state_f.items(), state_e.values()):
            if name.endswith("num_batches_tracked"):
                assert torch.equal(vf, ve), name
                assert int(vf) == min(step + 1, steps)
            else:
                _close(vf, ve, tol, f"step {step} {name}")


@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("case,config,layout", STEPS, ids=_case_id)
def test_tracks_eager_sequential_over_steps_fp32(case, config, layout, device, backend):
    skip_unless_available(OP, backend, device)
    if backend == "triton" and device == "cpu" and config and (config not in INTERPRETED or layout != "nchw"):
        pytest.skip("Triton interpreter: shapes, layouts, relu=False and affine=False only (see STEPS)")
    fused, eager = _pair(case, device, **config)
    _run_steps(fused, eager, case, backend, device, layout, steps=3, tol=1e-4)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("case", CASES[:2], ids=_case_id)
def test_tracks_eager_under_bf16_autocast(case, device, backend, layout):
    skip_unless_available(OP, backend, device)
    skip_bf16_in_interpreter(backend, torch.bfloat16, device)
    fused, eager = _pair(case, device)
    # bf16 rounds the conv output and the BN output (8 mantissa bits: ~4e-3 relative); both
    # models round the same values, so what differs is a last-bit rounding here and there
    # (measured on the CPU: at most 3e-3 of the largest value, the input gradient).
    _run_steps(fused, eager, case, backend, device, layout, steps=2, tol=1e-2, autocast_dtype=torch.bfloat16)


@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_saves_x_y_and_vectors_only(backend, dtype):
    skip_unless_available(OP, backend, "cpu")
    skip_bf16_in_interpreter(backend, dtype, "cpu")
    case = (2, 8, 32, 10, 3, 1, 1, False)
    fused, eager = _pair(case)
    x = torch.randn(2, 8, 10, 10, requires_grad=True)
    params = [*fused.parameters(), *eager.parameters()]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16), fastblocks.use_backend(backend):
        y, fused_bytes = saved_tensor_bytes(fused, x, exclude=params)
        _, eager_bytes = saved_tensor_bytes(eager, x, exclude=params)
    es = y.element_size()
    x_bytes = x.numel() * es  # the conv's input, cast to the autocast dtype (x itself in fp32)
    w_bytes = 0 if dtype == torch.float32 else fused.conv.weight.numel() * es  # autocast's weight copy
    y_bytes = y.numel() * es
    vectors = 4 * 32 * 8  # a few [C_out] statistics
    assert x_bytes + w_bytes + y_bytes <= fused_bytes <= x_bytes + w_bytes + y_bytes + vectors
    # Eager keeps the conv output and the ReLU output (plus the same x and weight).
    assert eager_bytes >= x_bytes + w_bytes + 2 * y_bytes


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("relu", [True, False])
def test_fold_bn_matches_eval(relu, layout):
    case = (3, 63, 17, 13, 3, 2, 1, True)
    model, _ = _pair(case, relu=relu)
    x = _input(case, 0, "cpu", layout)
    for step in range(2):  # running statistics away from their initial values
        model(_input(case, step, "cpu", layout)).square().mean().backward()
    model.eval()
    with torch.no_grad():
        want = model(x)
    folded = fastblocks.fold_bn(model)
    assert isinstance(folded.folded, FoldedConv2d) and folded.folded.relu is relu
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.Conv2d)) for m in folded.modules())
    assert list(folded.state_dict()) == ["folded.weight", "folded.bias"]
    assert isinstance(model.bn, nn.BatchNorm2d)  # fold_bn works on a copy
    with torch.no_grad():
        torch.testing.assert_close(folded(x), want, rtol=1e-5, atol=1e-5)
    folded.fold_bn_()  # a second fold changes nothing
    with torch.no_grad():
        torch.testing.assert_close(folded(x), want, rtol=1e-5, atol=1e-5)


def test_fold_bn_inside_a_model_and_without_running_stats():
    torch.manual_seed(0)
    model = nn.Sequential(
        ConvBNReLU2d(3, 8, 3, padding=1),
        ConvBNReLU2d(8, 8, 1, track_running_stats=False),  # batch statistics in eval: not foldable
        ConvBNReLU2d(8, 5, 3, stride=2, relu=False),
    )
    x = torch.randn(4, 3, 9, 9)
    for _ in range(2):
        model(x).sum().backward()
    model.eval()
    with torch.no_grad():
        want = model(x)
    folded = fastblocks.fold_bn(model)
    assert folded[0].folded is not None and folded[2].folded is not None
    assert folded[1].folded is None and isinstance(folded[1].bn, nn.BatchNorm2d)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), want, rtol=1e-5, atol=1e-5)


def test_state_dict_maps_to_sequential_and_from_modules_shares():
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Conv2d(6, 5, 3, padding=1, bias=True), nn.BatchNorm2d(5), nn.ReLU())
    with torch.no_grad():
        eager[1].running_mean.uniform_(-1, 1)
        eager[1].running_var.uniform_(0.5, 2)
        eager[1].weight.uniform_(0.5, 1.5)
    eager[1].num_batches_tracked.fill_(7)
    shared = ConvBNReLU2d.from_modules(eager[0], eager[1])
    assert shared.conv is eager[0] and shared.bn is eager[1] and shared.relu
    assert shared.training
    assert list(shared.state_dict()) == [
        "conv.weight", "conv.bias", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var",
        "bn.num_batches_tracked",
    ]  # fmt: skip

    # The documented key mapping, both ways: 0. <-> conv., 1. <-> bn.
    to_fused = {"0.": "conv.", "1.": "bn."}
    loaded = ConvBNReLU2d(6, 5, 3, padding=1, bias=True)
    loaded.load_state_dict({to_fused[k[:2]] + k[2:]: v for k, v in eager.state_dict().items()}, strict=True)
    back = nn.Sequential(nn.Conv2d(6, 5, 3, padding=1, bias=True), nn.BatchNorm2d(5), nn.ReLU())
    to_eager = {"conv.": "0.", "bn.": "1."}
    back.load_state_dict(
        {to_eager[k.split(".")[0] + "."] + k.split(".", 1)[1]: v for k, v in loaded.state_dict().items()}, strict=True
    )
    assert int(back[1].num_batches_tracked) == 7
    x = torch.randn(2, 6, 7, 7)
    for m in (eager, shared, loaded, back):
        m.eval()
    with torch.no_grad():
        want = eager(x)
        for m in (shared, loaded, back):
            torch.testing.assert_close(m(x), want, rtol=1e-5, atol=1e-6)

    # A training step through the shared module updates the eager layers' own buffers.
    shared.train()
    mean_before = eager[1].running_mean.clone()
    shared(x).sum().backward()
    assert int(eager[1].num_batches_tracked) == 8
    assert not torch.equal(eager[1].running_mean, mean_before)
    assert eager[0].weight.grad is not None and eager[1].weight.grad is not None


def test_from_modules_rejects_mismatches():
    with pytest.raises(TypeError, match=r"conv must be an nn\.Conv2d"):
        ConvBNReLU2d.from_modules(nn.Linear(3, 4), nn.BatchNorm2d(4))
    with pytest.raises(TypeError, match=r"bn must be an nn\.BatchNorm2d"):
        ConvBNReLU2d.from_modules(nn.Conv2d(3, 4, 1), nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match="bn has 5 features but conv has out_channels=4"):
        ConvBNReLU2d.from_modules(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(5))


def test_bad_input_names_the_argument():
    m = ConvBNReLU2d(63, 17, 3, padding=1)
    with pytest.raises(ValueError, match="x has 5 channels but the convolution expects in_channels=63"):
        m(torch.randn(2, 5, 7, 7))
    with pytest.raises(ValueError, match="expects x to be a 4-D tensor"):
        m(torch.randn(63, 7, 7))
    with pytest.raises(TypeError, match=r"x must be a torch\.Tensor"):
        m([1.0, 2.0])


@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
def test_one_value_per_channel_in_training_raises_like_torch(backend):
    skip_unless_available(OP, backend, "cpu")
    fused = ConvBNReLU2d(4, 3, 1)
    x = torch.randn(1, 4, 1, 1)
    with pytest.raises(ValueError) as eager_error:
        nn.Sequential(nn.Conv2d(4, 3, 1), nn.BatchNorm2d(3))(x)
    message = "Expected more than 1 value per channel when training"
    assert message in str(eager_error.value)
    with fastblocks.use_backend(backend), pytest.raises(ValueError, match=message):
        fused(x)
    # A rejected batch leaves the buffers alone; eval (running statistics) takes one value.
    assert int(fused.bn.num_batches_tracked) == 0
    fused.eval()
    with fastblocks.use_backend(backend):
        assert fused(x).shape == (1, 3, 1, 1)


@pytest.mark.parametrize("device,backend", device_backends(BACKENDS_UNDER_TEST))
def test_empty_batch_behaves_as_eager(device, backend):
    skip_unless_available(OP, backend, device)
    fused, eager = _pair((0, 6, 5, 4, 3, 1, 1, True), device)
    x = torch.randn(0, 6, 4, 4, device=device)
    xf, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    with fastblocks.use_backend(backend):
        yf = fused(xf)
        yf.sum().backward()
    ye = eager(xe)
    ye.sum().backward()
    assert yf.shape == ye.shape == (0, 5, 4, 4)
    for (name, pf), pe in zip(fused.named_parameters(), eager.parameters()):
        torch.testing.assert_close(pf.grad, pe.grad, msg=name)
    for (name, vf), ve in zip(fused.state_dict().items(), eager.state_dict().values()):
        torch.testing.assert_close(vf, ve, msg=name)


@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
def test_gradcheck_float64(backend):
    skip_unless_available(OP, backend, "cpu")
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1, bias=True).double()
    bn = nn.BatchNorm2d(3).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 1.5)
    x = torch.randn(2, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    # gradcheck perturbs its inputs in place: passing the layers' own parameters perturbs the
    # layers, so the function reads them through the modules.
    inputs = (x, conv.weight, conv.bias, bn.weight, bn.bias)
    with fastblocks.use_backend(backend):
        for training in (True, False):
            bn.train(training)
            for relu in (True, False):
                # Every Jacobian entry once (reference, training, ReLU); otherwise a random
                # projection of it (gradcheck's fast mode): batch_norm_act's own kernels are
                # gradchecked entry by entry in tests/ops/test_batchnorm.py.
                fast = not (backend == "reference" and training and relu)
                assert torch.autograd.gradcheck(
                    lambda *_, r=relu: conv_bn_relu(x, conv, bn, relu=r), inputs, fast_mode=fast
                )


# ----------------------------------------------------------------------------- synchronized BN
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sync_worker(rank: int, world: int, port: int, x: torch.Tensor, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        m = convert_sync_batchnorm(ConvBNReLU2d(3, 4, 3, padding=1), process_group=dist.group.WORLD)
        n = x.shape[0] // world
        xs = x[rank * n : (rank + 1) * n].clone().requires_grad_()
        y = m(xs)
        y.square().sum().backward()
        torch.save({"y": y.detach(), "dx": xs.grad, "state": m.state_dict()}, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_convert_sync_batchnorm_normalizes_over_every_rank(tmp_path):
    import torch.multiprocessing as mp

    x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(1)) * 2 + 1
    mp.start_processes(_sync_worker, args=(2, _free_port(), x, str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")  # fmt: skip
    torch.manual_seed(0)
    m = ConvBNReLU2d(3, 4, 3, padding=1)
    xs = x.clone().requires_grad_()
    y = m(xs)
    y.square().sum().backward()
    parts = [torch.load(tmp_path / f"rank{i}.pt") for i in range(2)]
    torch.testing.assert_close(torch.cat([p["y"] for p in parts]), y.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([p["dx"] for p in parts]), xs.grad, rtol=1e-4, atol=1e-5)
    for p in parts:
        for key in ("bn.running_mean", "bn.running_var", "bn.num_batches_tracked"):
            torch.testing.assert_close(p["state"][key], m.state_dict()[key], rtol=1e-5, atol=1e-6, msg=key)
