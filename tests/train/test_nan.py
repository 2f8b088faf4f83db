"""A NaN/Inf loss stops the run, naming the step, before the update; the CLI prints one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from fastblocks import cli
from fastblocks.train import NonFiniteLossError, TrainConfig, train
from fastblocks.train import trainer as trainer_mod
from fastblocks.train.checkpoint import load_checkpoint
from tests.train.conftest import TINY_RESNET


class PoisonAfter(nn.Module):
    """Wraps a model; its ``bad_from``-th training forward onwards returns ``value`` in every logit."""

    def __init__(self, model: nn.Module, bad_from: int, value: float = float("nan")) -> None:
        super().__init__()
        self.model, self.bad_from, self.value, self.calls = model, bad_from, value, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        if self.training:
            self.calls += 1
            if self.calls >= self.bad_from:
                out = out * 0 + self.value
        return out


def _poisoned(bad_from: int, value: float = float("nan")):
    def build(num_classes: int) -> nn.Module:
        from fastblocks.models.registry import get_model

        return PoisonAfter(get_model("resnet20", num_classes=num_classes, **TINY_RESNET), bad_from, value)

    return build


CFG = {"data": "synthetic", "image_size": 8, "batch_size": 64, "progress": False}


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_loss_names_the_step(tmp_path: Path, value: float) -> None:
    with pytest.raises(NonFiniteLossError, match=r"at step 3 \(epoch 1\)") as info:
        train(
            TrainConfig(**CFG, output=str(tmp_path), checkpoint_every=1),
            model_fn=_poisoned(3, value),
            log=lambda s: None,
        )
    assert info.value.step == 3
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["step"] == 2  # the last good state, not overwritten
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_cli_nan_exits_nonzero_without_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(trainer_mod, "build_model", lambda cfg, n: _poisoned(2)(n))
    argv = ["train", "--data", "synthetic", "--image-size", "8", "--batch-size", "64", "--output", str(tmp_path)]
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 1
    assert err.startswith("fastblocks train: error: loss is nan at step 2 (epoch 1)")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
