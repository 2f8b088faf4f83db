"""fastblocks.nn BatchNorm modules side by side with torch.nn.BatchNorm2d (+ReLU, +residual)."""

from __future__ import annotations

import contextlib
import os
import socket

import pytest
import torch
from torch import nn

import fastblocks
from fastblocks.nn import BatchNorm2d, BatchNormReLU2d, BNAddReLU, convert_sync_batchnorm
from tests.helpers import BACKENDS_UNDER_TEST, device_backends, skip_unless_available

CONFIGS = [
    {},
    {"momentum": None},
    {"affine": False},
    {"track_running_stats": False},
    {"momentum": 0.3, "eps": 1e-3},
]


def _eager_forward(kind, bn, x, r):
    y = bn(x)
    if kind == "add_relu":
        return torch.relu(y + r)
    return torch.relu(y) if kind == "relu" else y


@pytest.mark.parametrize("device,backend", device_backends(BACKENDS_UNDER_TEST))
@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("kind", ["plain", "relu", "add_relu"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_module_tracks_nn_batchnorm_over_steps(device, backend, config, kind, channels_last):
    skip_unless_available("batch_norm_act", backend, device)
    cls = {"plain": BatchNorm2d, "relu": BatchNormReLU2d, "add_relu": BNAddReLU}[kind]
    torch.manual_seed(0)
    fused, eager = cls(6, **config), nn.BatchNorm2d(6, **config)
    if fused.affine:
        with torch.no_grad():
            fused.weight.uniform_(0.5, 1.5)
            fused.bias.uniform_(-0.5, 0.5)
    fused, eager = fused.to(device), eager.to(device)
    eager.load_state_dict(fused.state_dict())
    assert list(fused.state_dict()) == list(eager.state_dict())
    opt_f = torch.optim.SGD(fused.parameters(), lr=0.1) if fused.affine else None
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.1) if eager.affine else None
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for step in range(4):
        x = (torch.randn(4, 6, 5, 7) * (step + 1) + step).to(device).contiguous(memory_format=fmt)
        r = torch.randn(4, 6, 5, 7).to(device).contiguous(memory_format=fmt)
        g = torch.randn(4, 6, 5, 7).to(device)  # a fixed upstream gradient keeps the SGD steps bounded
        xf, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
        rf, re = r.clone().requires_grad_(), r.clone().requires_grad_()
        with fastblocks.use_backend(backend):
            yf = fused(xf, rf) if kind == "add_relu" else fused(xf)
            yf.backward(g)
        ye = _eager_forward(kind, eager, xe, re)
        ye.backward(g)
        torch.testing.assert_close(yf, ye, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(xf.grad, xe.grad, rtol=1e-4, atol=1e-4)
        if kind == "add_relu":
            torch.testing.assert_close(rf.grad, re.grad, rtol=1e-4, atol=1e-4)
        if opt_f is not None:
            for pf, pe in zip(fused.parameters(), eager.parameters()):
                torch.testing.assert_close(pf.grad, pe.grad, rtol=1e-4, atol=1e-4)
            opt_f.step()
            opt_e.step()
            opt_f.zero_grad()
            opt_e.zero_grad()
        for (name, bf), be in zip(fused.state_dict().items(), eager.state_dict().values()):
            torch.testing.assert_close(bf, be, rtol=1e-5, atol=1e-6, msg=name)
    fused.eval()
    eager.eval()
    x = torch.randn(2, 6, 3, 3).to(device)
    r = torch.randn(2, 6, 3, 3).to(device)
    with fastblocks.use_backend(backend):
        yf = fused(x, r) if kind == "add_relu" else fused(x)
    torch.testing.assert_close(yf, _eager_forward(kind, eager, x, r), rtol=1e-5, atol=1e-5)


def test_loads_a_torch_checkpoint_and_back():
    eager = nn.BatchNorm2d(5)
    eager.running_mean.uniform_()
    eager.num_batches_tracked.fill_(7)
    fused = BatchNormReLU2d(5)
    fused.load_state_dict(eager.state_dict(), strict=True)
    eager2 = nn.BatchNorm2d(5)
    eager2.load_state_dict(fused.state_dict(), strict=True)
    assert int(eager2.num_batches_tracked) == 7
    assert isinstance(fused, nn.BatchNorm2d)
    assert "relu=True" in repr(fused)


def test_one_value_per_channel_raises_like_torch():
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        BatchNorm2d(3)(torch.randn(1, 3, 1, 1))


@pytest.mark.parametrize("device,backend", device_backends(BACKENDS_UNDER_TEST))
@pytest.mark.parametrize("kind", ["bn", "bn_relu", "bn_add_relu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("registered", [False, True], ids=["eager-path", "registered-op"])
def test_empty_batch_behaves_like_torch(device, backend, kind, training, registered):
    """N = 0: an empty output, zero parameter gradients, running buffers untouched and
    num_batches_tracked still counted, exactly as nn.BatchNorm2d (+ReLU, +add)."""
    skip_unless_available("batch_norm_act", backend, device)
    module = {"bn": BatchNorm2d, "bn_relu": BatchNormReLU2d, "bn_add_relu": BNAddReLU}[kind]
    eager, fused = nn.BatchNorm2d(3).to(device), module(3).to(device)
    for m in (eager, fused):
        m.running_mean.uniform_(-1, 1)
        m.running_var.uniform_(0.5, 2)
        m.num_batches_tracked.fill_(5)
        m.train(training)
    fused.load_state_dict(eager.state_dict())
    outs = []
    for m in (eager, fused):
        x = torch.randn(0, 3, 4, 5, device=device, requires_grad=True)
        r = torch.randn(0, 3, 4, 5, device=device, requires_grad=True)
        mode = _AnyMode() if registered else contextlib.nullcontext()
        with fastblocks.use_backend(backend), mode:
            y = m(x) if m is eager else (m(x, r) if kind == "bn_add_relu" else m(x))
        y.sum().backward()
        outs.append((y, x.grad, m.weight.grad, m.bias.grad))
    for a, e in zip(*outs):
        assert a.shape == e.shape and torch.equal(a, e)
    for name, buf in eager.state_dict().items():
        assert torch.equal(fused.state_dict()[name], buf), name


class _AnyMode(torch.utils._python_dispatch.TorchDispatchMode):
    """A pass-through dispatch mode: BatchNorm then goes through its registered op."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def test_wrong_channels_and_missing_residual():
    with pytest.raises(ValueError, match="weight has 4 elements but x has 3 channels"):
        BatchNorm2d(4)(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="expected 4D input"):
        BatchNorm2d(3)(torch.randn(2, 3, 4))
    with pytest.raises(TypeError, match="needs residual"):
        BNAddReLU(3)(torch.randn(2, 3, 4, 4), None)


def test_convert_sync_batchnorm_replaces_and_keeps_state():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), BatchNormReLU2d(4))
    model[1].running_mean.fill_(0.5)
    converted = convert_sync_batchnorm(model, process_group=None)
    assert isinstance(converted[1], BatchNorm2d)
    assert torch.equal(converted[1].running_mean, torch.full((4,), 0.5))
    assert converted[3].relu


# ----------------------------------------------------------------------------- synchronized BN
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sync_worker(rank: int, world: int, port: int, x: torch.Tensor, r: torch.Tensor, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        bn = BNAddReLU(x.shape[1])
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
        bn = convert_sync_batchnorm(bn, process_group=dist.group.WORLD)
        n = x.shape[0] // world
        xs = x[rank * n : (rank + 1) * n].clone().requires_grad_()
        rs = r[rank * n : (rank + 1) * n].clone().requires_grad_()
        for _ in range(2):
            y = bn(xs, rs)
            y.square().sum().backward()
        torch.save(
            {"y": y.detach(), "dx": xs.grad, "dr": rs.grad, "dw": bn.weight.grad, "db": bn.bias.grad,
             "state": bn.state_dict()},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )  # fmt: skip
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_sync_batchnorm_with_gloo_matches_single_process(tmp_path):
    import torch.multiprocessing as mp

    torch.manual_seed(1)
    x, r = torch.randn(4, 5, 3, 3) * 3 + 1, torch.randn(4, 5, 3, 3)
    world = 2
    mp.start_processes(
        _sync_worker, args=(world, _free_port(), x, r, str(tmp_path)), nprocs=world, join=True, start_method="spawn"
    )
    torch.manual_seed(0)
    bn = BNAddReLU(5)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    xs, rs = x.clone().requires_grad_(), r.clone().requires_grad_()
    for _ in range(2):
        y = bn(xs, rs)
        y.square().sum().backward()
    parts = [torch.load(tmp_path / f"rank{i}.pt") for i in range(world)]
    torch.testing.assert_close(torch.cat([p["y"] for p in parts]), y.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([p["dx"] for p in parts]), xs.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.cat([p["dr"] for p in parts]), rs.grad, rtol=1e-4, atol=1e-5)
    # Parameter gradients are per rank (DDP would all-reduce them): their sum is the global one.
    torch.testing.assert_close(parts[0]["dw"] + parts[1]["dw"], bn.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(parts[0]["db"] + parts[1]["db"], bn.bias.grad, rtol=1e-4, atol=1e-4)
    for p in parts:
        for key, value in bn.state_dict().items():
            if "running" in key or "tracked" in key:
                torch.testing.assert_close(p["state"][key], value, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_convert_sync_batchnorm_keeps_dtype(dtype):
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).to(dtype)
    model[1].weight.data.uniform_(0.5, 1.5)
    want = model[1].weight.detach().clone()
    converted = convert_sync_batchnorm(model, process_group=None)
    assert isinstance(converted[1], BatchNorm2d)
    assert converted[1].weight.dtype == dtype and converted[1].running_var.dtype == dtype
    assert torch.equal(converted[1].weight.detach(), want)
