"""Two processes (gloo on CPU, DDP + synchronized BN) train exactly like one process on the global batch.

The processes are spawned with ``torch.multiprocessing`` on 127.0.0.1, no ``torchrun``: each
initializes the group itself and calls :func:`fastblocks.train.train`, which then uses that group.
With synchronized BatchNorm, each global batch split in two gives the same batch statistics, the
same averaged gradients and so the same step as one process on the whole batch, up to fp32
summation order (tolerance 1e-5 after a few steps).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastblocks.train import TrainConfig, train
from fastblocks.train.checkpoint import load_checkpoint
from tests.train.conftest import TINY_RESNET

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

STEPS = 4
COMMON = {
    "data": "synthetic",
    "image_size": 8,
    "batch_size": 16,  # global: 8 per process
    "epochs": 1,
    "lr": 0.05,
    "max_steps": STEPS,
    "deterministic": True,
    "progress": False,
}
CASES = {
    "resnet20_fused": {"model": "resnet20", "model_kwargs": TINY_RESNET, "fused": True},
    "resnet20_eager": {"model": "resnet20", "model_kwargs": TINY_RESNET, "fused": False},
    "densenet_eager": {"model": "tiny_densenet", "fused": False},
}


def _tiny_densenet(num_classes: int) -> torch.nn.Module:
    from fastblocks.models.densenet import DenseNet

    # The eager twin: every BatchNorm is an nn.BatchNorm2d that convert_sync_batchnorm synchronizes.
    return DenseNet(4, (2, 2), 8, bn_size=2, num_classes=num_classes, stem="cifar", fused=False)


def _run(name: str, output: Path) -> object:
    case = dict(CASES[name])
    model_fn = _tiny_densenet if case["model"] == "tiny_densenet" else None
    return train(TrainConfig(**COMMON, **case, output=str(output)), model_fn=model_fn, log=lambda s: None)


def _worker(rank: int, world_size: int, port: int, root: str) -> None:
    """One rank: join the group, train every case, wait for the others, leave."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        for name in CASES:
            _run(name, Path(root) / name)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ddp")
    os.environ.pop("RANK", None)  # not under torchrun: the workers create the group themselves
    mp.spawn(_worker, args=(2, _free_port(), str(root)), nprocs=2, join=True)
    return root


@pytest.mark.parametrize("name", list(CASES))
def test_two_processes_match_one(name: str, ddp_runs: Path, tmp_path: Path) -> None:
    if "densenet" in name:
        pytest.importorskip("fastblocks.models.densenet")
    single = _run(name, tmp_path / "single")
    ddp = load_checkpoint(ddp_runs / name / "checkpoint.pt")
    assert ddp["world_size"] == 2 and ddp["step"] == single.step == STEPS
    # Same loss at every step (the DDP loss is the mean of the two half-batch losses).
    torch.testing.assert_close(torch.tensor(ddp["step_losses"]), torch.tensor(single.step_losses), rtol=1e-5, atol=1e-5)
    ref = single.model.state_dict()
    assert set(ddp["model"]) == set(ref)
    for key, value in ref.items():
        if value.is_floating_point():  # weights and BN running statistics (from global batch statistics)
            torch.testing.assert_close(ddp["model"][key], value, rtol=1e-5, atol=1e-5, msg=key)
        else:
            assert torch.equal(ddp["model"][key], value), key
    # Only rank 0 wrote files; the metrics cover the global batch.
    rows = ddp["history"]
    assert rows[-1]["train_images"] == STEPS * COMMON["batch_size"] == single.history[-1]["train_images"]
    assert abs(rows[-1]["test_loss"] - single.history[-1]["test_loss"]) < 1e-4


def test_sharded_batches_union_is_the_global_batch() -> None:
    from fastblocks.train.data import ShardedBatches

    for n in (101, 128):
        one = ShardedBatches(n, 16, seed=3, epoch=2)
        shards = [ShardedBatches(n, 8, seed=3, epoch=2, rank=r, world_size=2) for r in range(2)]
        assert len(shards[0]) == len(shards[1]) >= len(one)
        for k in range(len(one)):
            union = torch.cat([s[k] for s in shards]).sort().values
            assert torch.equal(union, one[k].sort().values)
