"""SGD with weight decay on weights only, and per-step learning-rate schedules."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["lr_factor", "make_optimizer", "make_scheduler", "param_groups"]

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, object]]:
    """Two optimizer groups: conv/linear weights with ``weight_decay``; norm parameters and biases without.

    Decaying BN's gamma/beta (and biases) only shrinks a scale the next layer undoes and hurts
    accuracy slightly (Goyal et al. 2017, "Accurate, Large Minibatch SGD", Sec. 2.1 note; the
    torchvision reference recipes' ``--norm-weight-decay 0``). A parameter shared by several
    modules is listed once.

    Returns:
        ``[{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]``
        (a group is left out when empty).
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            if isinstance(module, _NORM_TYPES) or name == "bias" or p.ndim <= 1:
                no_decay.append(p)
            else:
                decay.append(p)
    groups: list[dict[str, object]] = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def make_optimizer(
    model: nn.Module, *, lr: float, momentum: float, nesterov: bool, weight_decay: float
) -> torch.optim.SGD:
    """SGD over :func:`param_groups` (``nesterov`` needs ``momentum > 0``)."""
    if nesterov and momentum <= 0:
        raise ValueError("--nesterov needs --momentum > 0")
    return torch.optim.SGD(param_groups(model, weight_decay), lr=lr, momentum=momentum, nesterov=nesterov)


def lr_factor(
    step: int,
    *,
    total_steps: int,
    schedule: str = "cosine",
    warmup_steps: int = 0,
    milestones: Sequence[float] = (0.5, 0.75),
    gamma: float = 0.1,
) -> float:
    """Learning-rate multiplier at optimizer step ``step`` (0-based).

    Warmup: linear from ``1 / (warmup_steps + 1)`` to 1 over ``warmup_steps`` steps (Goyal et al.
    2017). Then ``cosine``: half a cosine from 1 to 0 over the remaining steps (Loshchilov &
    Hutter 2017, no restarts); ``step``: multiply by ``gamma`` at each milestone, given as
    fractions of ``total_steps`` (He et al. 2016's CIFAR recipe: /10 at 32k and 48k of 64k
    iterations = 0.5 and 0.75).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "cosine":
        span = max(1, total_steps - warmup_steps)
        t = min(1.0, (step - warmup_steps) / span)
        return 0.5 * (1.0 + math.cos(math.pi * t))
    if schedule == "step":
        return gamma ** sum(step >= round(m * total_steps) for m in milestones)
    raise ValueError(f"schedule must be 'cosine' or 'step', got {schedule!r}")


def make_scheduler(optimizer: torch.optim.Optimizer, **kwargs: object) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step ``LambdaLR`` of :func:`lr_factor` (keyword arguments as :func:`lr_factor`)."""
    lr_factor(0, **kwargs)  # validate now, not at the first step
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, **kwargs))
