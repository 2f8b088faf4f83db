"""fp32 gradient error of whole models against float64, eager PyTorch vs fastblocks, over many batches.

One training step (cross-entropy, train mode) per batch at identical weights (torchvision's
initialization, no conditioning), as a user would compare a model with torchvision's:

    python benchmarks/accuracy_models.py --models resnet18,resnet50,densenet121 --batches 8

For each model and batch: the largest per-parameter relative error ``||g - g64|| / ||g64||`` of
the eager twin (``fused=False``: torchvision's modules and forward) and of the fused model on the
default backend. Prints one markdown row per model: median and max over the batches, and on how
many batches each exceeds 1e-3. Small batches make single-batch figures chaotic (a ReLU decision
within the fp32 error of 0 moves every gradient below it, in eager PyTorch as much as in fused
code), which is why this script looks at many batches.
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch

import fastblocks
from fastblocks.models import registry


def _grads(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    return {k: p.grad.double().clone() for k, p in model.named_parameters() if p.grad is not None}


def _worst(g: dict[str, torch.Tensor], truth: dict[str, torch.Tensor]) -> float:
    return max(float((g[k] - t).norm() / t.norm()) for k, t in truth.items() if t.norm() > 0)


def measure(name: str, batches: int, size: int, batch: int) -> dict[str, list[float]]:
    """Per batch, the worst parameter-gradient error of the eager twin and of the fused model."""
    torch.manual_seed(0)
    eager = registry.get_model(name, num_classes=10, fused=False)
    state = copy.deepcopy(eager.state_dict())
    fused = registry.get_model(name, num_classes=10, fused=True)
    truth = copy.deepcopy(eager).double()
    out: dict[str, list[float]] = {"eager": [], "fused": []}
    for b in range(batches):
        g = torch.Generator().manual_seed(1 + b)
        x = torch.randn(batch, 3, size, size, generator=g, dtype=torch.float64).float()
        y = torch.randint(0, 10, (batch,), generator=g)
        for m in (eager, fused, truth):
            m.load_state_dict(state)
        t = _grads(truth, x.double(), y)
        out["eager"].append(_worst(_grads(eager, x, y), t))
        with fastblocks.use_backend(None):
            out["fused"].append(_worst(_grads(fused, x, y), t))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="resnet18,resnet50,densenet121")
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4)
    args = p.parse_args()
    print(f"| model ({args.batch_size}x3x{args.image_size}x{args.image_size}, {args.batches} batches) "
          "| eager fp32: median / max | batches > 1e-3 | fused fp32: median / max | batches > 1e-3 |")  # fmt: skip
    print("|---|---|---|---|---|")
    for name in args.models.split(","):
        r = measure(name, args.batches, args.image_size, args.batch_size)
        cells = []
        for who in ("eager", "fused"):
            v = r[who]
            cells += [f"{statistics.median(v):.1e} / {max(v):.1e}", str(sum(e > 1e-3 for e in v))]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
