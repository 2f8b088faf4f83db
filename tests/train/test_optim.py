"""Weight decay only on conv/linear weights; learning-rate schedules."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fastblocks.models.registry import get_model
from fastblocks.train.optim import lr_factor, make_optimizer, param_groups
from tests.train.conftest import TINY_RESNET


@pytest.mark.parametrize("fused", [True, False])
def test_weight_decay_groups(fused: bool) -> None:
    model = get_model("resnet20", fused=fused, **TINY_RESNET)
    groups = param_groups(model, 5e-4)
    decay, no_decay = ({id(p) for p in g["params"]} for g in groups)
    assert [g["weight_decay"] for g in groups] == [5e-4, 0.0]
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[i] for i in decay} == {n for n, p in model.named_parameters() if p.ndim > 1}
    for i in no_decay:
        assert names[i].endswith("bias") or ".bn" in names[i] or names[i].startswith("bn")
    assert len(decay) + len(no_decay) == len(list(model.parameters()))


def test_decay_touches_weights_only() -> None:
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(2, 2, 5, 5))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = make_optimizer(model, lr=0.5, momentum=0.0, nesterov=False, weight_decay=0.1)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in model.named_parameters():
        if n in ("0.weight", "3.weight"):
            torch.testing.assert_close(p, before[n] * (1 - 0.5 * 0.1))
        else:  # conv/linear bias, BN weight and bias
            assert torch.equal(p, before[n]), n
    with pytest.raises(ValueError, match="nesterov"):
        make_optimizer(model, lr=0.1, momentum=0.0, nesterov=True, weight_decay=0.0)


def test_schedules() -> None:
    kw = {"total_steps": 100, "warmup_steps": 10}
    assert lr_factor(0, schedule="cosine", **kw) == pytest.approx(1 / 11)
    assert lr_factor(9, schedule="cosine", **kw) == pytest.approx(10 / 11)
    assert lr_factor(10, schedule="cosine", **kw) == pytest.approx(1.0)
    assert lr_factor(55, schedule="cosine", **kw) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(100, schedule="cosine", **kw) == pytest.approx(0.0)
    step = {"total_steps": 64000, "schedule": "step", "milestones": (0.5, 0.75), "gamma": 0.1}
    assert [lr_factor(s, **step) for s in (0, 31999, 32000, 47999, 48000, 63999)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.01]
    )
    with pytest.raises(ValueError, match="schedule"):
        lr_factor(0, total_steps=1, schedule="linear")
