"""Fused model vs its eager twin on the same weights: the comparison the ResNet-family tests share.

Tolerances are fp32's ``rtol=1e-4, atol=1e-5`` on every output, gradient and buffer, which is
only meaningful when fp32 rounding is not amplified by the test setup. Two effects were measured
(``python -m pytest tests/models -k twin``, 2x3x64x64 inputs, torchvision's init):

- chaos: with 2 images, layer4's BatchNorms see 8 values per channel and the network is
  ill-conditioned: *eager* fp32 differs from an fp64 run of itself by up to 35% (max error /
  max value) in resnet50's gradients, 13% in resnet18's, so no fp32 implementation can agree
  with another to 1e-4;
- ReLU decisions: a pre-activation within ~1e-7 of zero flips between two fp32 computations
  and moves whole gradients (one flip in resnet18's layer2.1 changed its ``bn2.bias`` gradient
  by 2%, and everything below it).

:func:`~fastblocks.testing.accuracy.condition` therefore sets the BatchNorm affine parameters (same for both twins): BNs
followed by a ReLU get gamma 0.3 and beta = +-1 per channel (channels mostly active or mostly
dead, so masks are exercised but pre-activations stay away from 0); the last BN of each residual
branch and the projection shortcut's BN get gamma 0.2, beta 0.5 (damped residual branches).
Measured with it, over 3 SGD steps: every output, gradient and buffer agrees to within 0.2 of
the ``rtol=1e-4, atol=1e-5`` tolerance for resnet18 and resnet50.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from fastblocks.testing.accuracy import condition

RTOL, ATOL = 1e-4, 1e-5


def twins(build: Callable[..., nn.Module], seed: int = 0, **kwargs: object) -> tuple[nn.Module, nn.Module]:
    """``(fused, eager)`` built by ``build(fused=..., **kwargs)`` with the same conditioned weights."""
    torch.manual_seed(seed)
    eager = build(fused=False, **kwargs)
    condition(eager, seed)
    fused = build(fused=True, **kwargs)
    fused.load_state_dict(eager.state_dict())
    assert fused.fused and not eager.fused
    return fused, eager


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")


def assert_same_training(
    fused: nn.Module,
    eager: nn.Module,
    shape: tuple[int, int, int, int] = (2, 3, 64, 64),
    *,
    steps: int = 3,
    channels_last: bool = False,
    lr: float = 0.01,
    seed: int = 1,
) -> None:
    """Train both ``steps`` SGD steps on the same batches; compare outputs, every gradient and buffer, then eval."""
    if channels_last:
        fused = fused.to(memory_format=torch.channels_last)
    num_classes = eager.fc.out_features
    opts = [torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9) for m in (fused, eager)]
    g = torch.Generator().manual_seed(seed)
    fused.train()
    eager.train()
    for step in range(steps):
        x = torch.randn(shape, generator=g)
        target = torch.randint(0, num_classes, (shape[0],), generator=g)
        xf = x.contiguous(memory_format=torch.channels_last) if channels_last else x
        outs = []
        for model, inp, opt in zip((fused, eager), (xf, x), opts):
            opt.zero_grad()
            out = model(inp)
            F.cross_entropy(out, target).backward()
            outs.append(out)
        _close(outs[0], outs[1], f"step {step} output")
        named_e = dict(eager.named_parameters())
        for name, p in fused.named_parameters():
            _close(p.grad, named_e[name].grad, f"step {step} grad of {name}")
        for opt in opts:
            opt.step()
        named_b = dict(eager.named_buffers())
        for name, b in fused.named_buffers():
            if b.dtype == torch.long:
                assert torch.equal(b, named_b[name]), f"step {step} {name}: {b} vs {named_b[name]}"
            else:
                _close(b, named_b[name], f"step {step} buffer {name}")
    fused.eval()
    eager.eval()
    x = torch.randn(shape, generator=g)
    xf = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    with torch.no_grad():
        _close(fused(xf), eager(x), "eval output")
