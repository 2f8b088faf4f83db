"""Model names the command line and the tools accept: ``get_model("resnet50", fused=True)``."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from torch import nn

# Builder name -> module that defines it. The CLI, the profiler, the summary and the benchmarks
# resolve names through here, so one list says what "any model of the package" means.
_BUILDERS: dict[str, str] = {
    **{
        n: "fastblocks.models.resnet"
        for n in (
            "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
            "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d",
            "wide_resnet50_2", "wide_resnet101_2", "plain18", "plain34",
        )
    },
    **{
        n: "fastblocks.models.cifar"
        for n in ("resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "plain20", "plain56")
    },
    **{
        n: "fastblocks.models.densenet"
        for n in (
            "densenet121", "densenet169", "densenet201", "densenet161", "densenet264",
            "densenet_bc_100_12", "densenet_bc_250_24",
        )
    },
}  # fmt: skip


def _builder(name: str) -> Callable[..., nn.Module] | None:
    module = _BUILDERS.get(name)
    if module is None:
        return None
    try:
        return getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None


def list_models() -> list[str]:
    """Names of every model builder available in this installation, sorted."""
    return sorted(n for n in _BUILDERS if _builder(n) is not None)


def get_model(name: str, **kwargs: object) -> nn.Module:
    """Build model ``name`` (e.g. ``"resnet50"``, ``"densenet201"``) with builder keyword arguments.

    Raises:
        ValueError: unknown name; the message lists the available ones.
    """
    builder = _builder(name)
    if builder is None:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    return builder(**kwargs)
