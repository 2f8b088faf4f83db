"""Fused DenseNet under DDP with fastblocks' synchronized BatchNorm (gloo on CPU, two processes).

Two ranks each train a small fused DenseNet (ImageNet stem, two dense blocks, one transition:
every kind of fused node and norm5) on half of every batch, after
``fastblocks.nn.convert_sync_batchnorm(model, WORLD)`` and inside ``DistributedDataParallel``.
They must compute what one process computes on the whole batch, with the fused model and with
its eager twin (``fused=False``, ``torch.cat`` + ``nn.BatchNorm2d``):

- logits: the two halves concatenated are the single-process logits;
- parameter gradients: each rank's loss is the mean over its 2 images and DDP averages the
  gradients over the 2 ranks, so each rank's gradient is that of the mean over the 4 images,
  the single-process loss: equal;
- input gradients: a rank's ``x.grad`` is the gradient of ``loss_0 + loss_1`` (synchronized BN
  all-reduces the backward sums, so each rank receives the other rank's loss's dependence on
  its images) and the single-process loss is ``(loss_0 + loss_1) / 2``: the concatenated
  ``x.grad`` is twice the single-process one;
- every BN running buffer and every parameter after 2 SGD steps: equal (no buffer broadcast before
  each forward, so each rank's buffers are its own computation, not rank 0's copy).

The unsynchronized path is checked too: in the same 2-process group, a model without a process
group, and one converted with a group of this rank alone, compute local statistics exactly as one
process does on its half; with ``torch.distributed`` not initialized a converted model runs no
collective and is bitwise the unconverted one.
"""

from __future__ import annotations

import inspect
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional as F

from fastblocks.models.densenet import DenseNet
from fastblocks.nn import convert_sync_batchnorm
from fastblocks.ops import _bn_core

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

SMALL = {"growth_rate": 4, "block_config": (2, 3), "num_init_features": 8, "bn_size": 2, "num_classes": 5}
WORLD, STEPS, LR = 2, 2, 0.1
# fp64 NCHW with momentum 0.1; fp32 channels_last with momentum=None (cumulative average: the
# running-stat update then uses the synchronized count, a tensor).
CASES = {
    "fp64_nchw": {"dtype": torch.float64, "channels_last": False, "momentum": 0.1},
    "fp32_nhwc_cumulative": {"dtype": torch.float32, "channels_last": True, "momentum": None},
}
TOL = {torch.float64: {"rtol": 1e-11, "atol": 1e-13}, torch.float32: {"rtol": 2e-5, "atol": 5e-6}}


# ----------------------------------------------------------------------------- shared helpers
# torch 2.13 deprecates broadcast_buffers for forward_sync_buffers (same meaning here: the
# buffers start equal, only the per-forward broadcast matters).
_NO_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    else {"broadcast_buffers": False}
)


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    """fp64 weights with non-trivial BN affine parameters and running buffers."""
    torch.manual_seed(seed)
    model = DenseNet(**SMALL, fused=False).double()
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=g, dtype=torch.float64) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g, dtype=torch.float64) + 0.5)
    return model.state_dict()


def _build(
    case: dict, state: dict, *, fused: bool = True, group: object | None = None, sync: bool = False
) -> nn.Module:
    """The model of ``case`` with weights ``state``; ``sync``: convert_sync_batchnorm(model, group) first.

    The conversion builds its BatchNorm2d modules in the default dtype, so the dtype cast and
    the weights come after it (loading fp64 weights into fp32 modules would round them).
    """
    model = DenseNet(**SMALL, fused=fused)
    if sync:
        model = convert_sync_batchnorm(model, group)
    model.to(case["dtype"]).load_state_dict(
        {k: v.to(case["dtype"]) if v.is_floating_point() else v for k, v in state.items()}
    )
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = case["momentum"]
    if case["channels_last"]:
        model.to(memory_format=torch.channels_last)
    return model


def _batches(case: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    fmt = torch.channels_last if case["channels_last"] else torch.contiguous_format
    return [
        (
            (torch.randn(4, 3, 32, 32, generator=g, dtype=case["dtype"]) * 2 + 0.5).contiguous(memory_format=fmt),
            torch.randint(0, SMALL["num_classes"], (4,), generator=g),
        )
        for _ in range(STEPS)
    ]


def _train(model: nn.Module, raw: nn.Module, batches, steps: int = STEPS) -> dict:
    """``steps`` SGD steps; per step the logits, the input gradient and the parameter gradients."""
    opt = torch.optim.SGD(raw.parameters(), lr=LR)
    record: dict = {"out": [], "dx": [], "grads": []}
    model.train()
    for x, y in batches[:steps]:
        opt.zero_grad(set_to_none=True)
        x = x.clone().requires_grad_()
        out = model(x)
        F.cross_entropy(out, y).backward()
        record["out"].append(out.detach())
        record["dx"].append(x.grad)
        record["grads"].append({n: p.grad.clone() for n, p in raw.named_parameters()})
        opt.step()
    record["state"] = {k: v.clone() for k, v in raw.state_dict().items()}
    return record


def _half(batches, rank: int):
    n = batches[0][0].shape[0] // WORLD
    return [(x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n]) for x, y in batches]


# ----------------------------------------------------------------------------- the ranks
def _worker(rank: int, port: int, state: dict, out_dir: str) -> None:
    """One rank: DDP + synchronized BN on its half of each batch, then the unsynchronized models."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        # Every rank creates every group (new_group is collective); each keeps its own.
        own = [dist.new_group([r]) for r in range(WORLD)][rank]
        results = {}
        for name, case in CASES.items():
            raw = _build(case, state, group=dist.group.WORLD, sync=True)
            # No buffer broadcast before each forward: each rank's buffers stay its own computation.
            ddp = nn.parallel.DistributedDataParallel(raw, **_NO_BUFFER_SYNC)
            results[name] = _train(ddp, raw, _half(_batches(case), rank))
            # No group, and a group of this rank alone: local statistics; one step, no DDP.
            half = _half(_batches(case), rank)
            for kind, model in (
                ("local", _build(case, state)),
                ("own_group", _build(case, state, group=own, sync=True)),
            ):
                results[f"{name}/{kind}"] = _train(model, model, half, steps=1)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, list[dict]]:
    out = tmp_path_factory.mktemp("densenet_ddp")
    state = _state()
    mp.spawn(_worker, args=(_free_port(), state, str(out)), nprocs=WORLD, join=True)
    return state, [torch.load(Path(out) / f"rank{r}.pt") for r in range(WORLD)]


# ----------------------------------------------------------------------------- tests
def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, msg: str) -> None:
    torch.testing.assert_close(actual, expected, **TOL[dtype], msg=lambda m: f"{msg}: {m}")


@pytest.mark.parametrize("twin", ["fused", "eager"])
@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_with_sync_bn_match_one_process(ranks, name: str, twin: str) -> None:
    state, parts = ranks
    case = CASES[name]
    dtype = case["dtype"]
    model = _build(case, state, fused=twin == "fused")
    single = _train(model, model, _batches(case))
    runs = [p[name] for p in parts]
    for step in range(STEPS):
        _close(torch.cat([r["out"][step] for r in runs]), single["out"][step], dtype, f"logits, step {step}")
        _close(torch.cat([r["dx"][step] for r in runs]), 2 * single["dx"][step], dtype, f"x.grad, step {step}")
        for key, grad in single["grads"][step].items():
            for rank, r in enumerate(runs):
                _close(r["grads"][step][key], grad, dtype, f"grad of {key}, rank {rank}, step {step}")
    for key, value in single["state"].items():
        for rank, r in enumerate(runs):
            if value.is_floating_point():
                _close(r["state"][key], value, dtype, f"{key} after {STEPS} steps, rank {rank}")
            else:
                assert torch.equal(r["state"][key], value), key
    # The statistics are not trivially equal to each half's own (the check can fail).
    local = parts[0][name + "/local"]
    assert not torch.allclose(local["out"][0], runs[0]["out"][0], **TOL[dtype])


@pytest.mark.parametrize("kind", ["local", "own_group"])
@pytest.mark.parametrize("name", list(CASES))
def test_unsynchronized_ranks_use_local_statistics(ranks, name: str, kind: str) -> None:
    """In a 2-rank group, no process group (or one of this rank alone) keeps each rank's statistics."""
    state, parts = ranks
    case = CASES[name]
    for rank, p in enumerate(parts):
        run = p[f"{name}/{kind}"]
        model = _build(case, state)
        single = _train(model, model, _half(_batches(case), rank), steps=1)
        _close(run["out"][0], single["out"][0], case["dtype"], f"logits, rank {rank}")
        _close(run["dx"][0], single["dx"][0], case["dtype"], f"x.grad, rank {rank}")
        for key, grad in single["grads"][0].items():
            _close(run["grads"][0][key], grad, case["dtype"], f"grad of {key}, rank {rank}")
        for key, value in single["state"].items():
            if value.is_floating_point():
                _close(run["state"][key], value, case["dtype"], f"{key}, rank {rank}")
            else:
                assert torch.equal(run["state"][key], value), key


def test_converted_model_without_distributed_runs_no_collective(monkeypatch) -> None:
    """torch.distributed not initialized: a group on the norms changes nothing, bitwise."""
    assert not dist.is_initialized()

    def fail(*args, **kwargs):
        raise AssertionError("a collective was called on the single-process path")

    monkeypatch.setattr(dist, "all_gather", fail)
    monkeypatch.setattr(dist, "all_reduce", fail)
    case = CASES["fp64_nchw"]
    state = _state()
    plain = _build(case, state)
    converted = _build(case, state, group=object(), sync=True)  # any group: never used
    assert all(
        getattr(m, "process_group", None) is not None for m in converted.modules() if isinstance(m, nn.BatchNorm2d)
    )
    a, b = _train(plain, plain, _batches(case)), _train(converted, converted, _batches(case))
    for step in range(STEPS):
        assert torch.equal(a["out"][step], b["out"][step])
        assert torch.equal(a["dx"][step], b["dx"][step])
        for key, grad in a["grads"][step].items():
            assert torch.equal(b["grads"][step][key], grad), key
    for key, value in a["state"].items():
        assert torch.equal(b["state"][key], value), key


def test_one_block_needs_one_process_group() -> None:
    torch.manual_seed(0)
    model = DenseNet(**SMALL, fused=True)
    model.features.denseblock1.denselayer2.norm2.process_group = object()
    with pytest.raises(ValueError, match="share one process_group"):
        model(torch.randn(2, 3, 32, 32))
    model.eval()
    model(torch.randn(2, 3, 32, 32))  # eval: running statistics, no group needed
    assert _bn_core.sync_group([_bn_core.BatchNormParams(None, None, process_group=object())], training=False) is None
