"""Atomic checkpoints, and exact resume: stopped + resumed == uninterrupted, bitwise, on CPU."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastblocks.train import CheckpointError, TrainConfig, train
from fastblocks.train.checkpoint import atomic_write_bytes, capture_rng, load_checkpoint, restore_rng, save_checkpoint
from tests.train.conftest import TINY_RESNET

ROOT = Path(__file__).resolve().parents[2]
# 1,024 synthetic 8x8 images, batch 128: 8 steps per epoch; 2 epochs are scheduled.
BASE = {
    "model": "resnet20",
    "model_kwargs": TINY_RESNET,
    "data": "synthetic",
    "image_size": 8,
    "batch_size": 128,
    "epochs": 2,
    "lr": 0.05,
    "deterministic": True,
    "progress": False,
}


def quiet(_: str) -> None:
    pass


def assert_same_run(a: dict, b: dict) -> None:
    """Bitwise-equal model state dicts."""
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_atomic_write_replaces_or_keeps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "sub" / "file.bin"
    atomic_write_bytes(path, b"old")
    assert path.read_bytes() == b"old"

    def boom(src: str, dst: str) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk gone"):
        atomic_write_bytes(path, b"new")
    monkeypatch.undo()
    assert path.read_bytes() == b"old"  # the old file is intact ...
    assert sorted(p.name for p in path.parent.iterdir()) == ["file.bin"]  # ... and no temporary is left


def test_checkpoint_roundtrip_and_rng(tmp_path: Path) -> None:
    import random

    import numpy as np

    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)  # noqa: NPY002 (the global generator is what capture_rng saves)
    state = capture_rng()
    expected = (torch.rand(3), random.random(), np.random.rand())  # noqa: NPY002
    save_checkpoint(tmp_path / "c.pt", {"rng": state, "x": torch.arange(3)})
    loaded = load_checkpoint(tmp_path / "c.pt")
    restore_rng(loaded["rng"])
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]
    assert np.random.rand() == expected[2]  # noqa: NPY002
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path / "bad.pt")


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory):
    """12 steps without interruption (crosses the epoch boundary at step 8)."""
    return train(TrainConfig(**BASE, max_steps=12, output=str(tmp_path_factory.mktemp("straight"))), log=quiet)


@pytest.mark.parametrize("stop_at", [5, 8])  # mid-epoch, and exactly at the epoch's end
def test_stop_and_resume_is_bitwise_exact(straight, stop_at: int, tmp_path: Path) -> None:
    first = train(TrainConfig(**BASE, max_steps=stop_at, output=str(tmp_path)), log=quiet)
    assert first.step == stop_at
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert (ckpt["epoch"], ckpt["batch_in_epoch"]) == ((0, stop_at) if stop_at < 8 else (1, 0))
    assert {"model", "optimizer", "scheduler", "scaler", "ranks", "step"} <= set(ckpt)
    resumed = train(TrainConfig(**BASE, max_steps=12, output=str(tmp_path), resume=True), log=quiet)
    assert resumed.step == 12
    assert resumed.step_losses == straight.step_losses
    assert_same_run(resumed.model.state_dict(), straight.model.state_dict())
    # The resumed epoch's training metrics include the steps before the stop.
    assert resumed.history[-1]["train_images"] == straight.history[-1]["train_images"]
    assert resumed.history[-1]["train_loss"] == pytest.approx(straight.history[-1]["train_loss"], rel=1e-9)


def test_resume_refuses_another_run(tmp_path: Path) -> None:
    train(TrainConfig(**BASE, max_steps=1, output=str(tmp_path)), log=quiet)
    with pytest.raises(CheckpointError, match="batch_size=128"):
        train(TrainConfig(**{**BASE, "batch_size": 64}, max_steps=2, output=str(tmp_path), resume=True), log=quiet)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        train(TrainConfig(**BASE, max_steps=2, output=str(tmp_path / "empty"), resume=True), log=quiet)


@pytest.mark.slow
def test_sigkill_then_resume_is_bitwise_exact(straight, tmp_path: Path) -> None:
    """A real ``kill -9`` of ``fastblocks train`` while it checkpoints every step, then ``--resume``."""
    argv = [
        sys.executable, "-m", "fastblocks", "train", "--model", "resnet20", "--model-arg", "widths=(4,8,8)",
        "--data", "synthetic", "--image-size", "8", "--batch-size", "128", "--epochs", "2", "--lr", "0.05",
        "--deterministic", "--max-steps", "12", "--checkpoint-every", "1", "--no-progress", "--output", str(tmp_path),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (tmp_path / "checkpoint.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.05)  # land anywhere: inside a step, or inside the next checkpoint's write
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]  # killed, not finished
    killed_at = load_checkpoint(tmp_path / "checkpoint.pt")["step"]  # a whole file, never a torn one
    resumed = train(TrainConfig(**BASE, max_steps=12, output=str(tmp_path), resume=True), log=quiet)
    assert resumed.step == 12 and 1 <= killed_at < 12
    assert resumed.step_losses == straight.step_losses
    assert_same_run(resumed.model.state_dict(), straight.model.state_dict())
