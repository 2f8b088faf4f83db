"""What the memory profiler measures: the configuration and the model it builds.

The implementations (:data:`IMPLS`), the dtype names, :class:`MemoryConfig` (model,
implementation, batch, size, dtype, layout, device), :func:`build_impl` (one implementation of a
registry model) and :func:`lower_bound` (the activation bytes any implementation must keep).
Re-exported by :mod:`fastblocks.profile.memory`.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fastblocks.profile import flops
from fastblocks.profile._meta import MetaInit

#: Implementations ``--impl`` accepts: the eager twin, the eager twin with torchvision's
#: checkpointed bottlenecks (DenseNet only), the fused model.
IMPLS = ("eager", "checkpoint", "fused")

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
_DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp64": "float64"}
_MIB = 1024**2
_GIB = 1024**3


def dtype_name(name: str) -> str:
    """``"fp16"``/``"half"``/``"float16"`` -> ``"float16"`` (the canonical name)."""
    key = _DTYPE_ALIASES.get(name, name)
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(_DTYPES)}")
    return key


def dtype_of(name: str) -> torch.dtype:
    """``"float32"``/``"fp16"``/``"bf16"``/... -> ``torch.dtype``."""
    return _DTYPES[dtype_name(name)]


@dataclass
class MemoryConfig:
    """One measurement: which model, implementation, batch, and where."""

    model: str
    impl: str = "eager"
    batch_size: int = 32
    image_size: int | None = None
    dtype: str = "float32"
    channels_last: bool = False
    device: str = "cpu"

    @property
    def size(self) -> int:
        return self.image_size or flops.default_input_size(self.model)


# ----------------------------------------------------------------------------------------------
# Models, lower bound
# ----------------------------------------------------------------------------------------------


def build_impl(name: str, impl: str, device: str | torch.device = "cpu") -> tuple[nn.Module | None, str]:
    """Build implementation ``impl`` of registry model ``name`` (or ``"module:builder"``) on ``device``.

    Returns:
        ``(model, "")``, or ``(None, reason)`` when the implementation does not exist for
        this model (``checkpoint`` is DenseNet's ``memory_efficient=True``).

    Raises:
        ValueError: unknown model or implementation.
    """
    from fastblocks.models import registry

    if impl not in IMPLS:
        raise ValueError(f"unknown implementation {impl!r}; use one of {', '.join(IMPLS)}")
    if ":" in name:
        # "package.module:builder": a model outside the registry (the Python API and the tests;
        # the command line takes registry names only).
        import importlib

        module, _, attr = name.partition(":")
        builder = getattr(importlib.import_module(module), attr)
    else:
        if name not in registry.list_models():
            registry.get_model(name)  # raises ValueError listing the available names
        builder = registry._builder(name)
        assert builder is not None
    kwargs: dict[str, Any] = {"fused": impl == "fused"}
    if impl == "checkpoint":
        if "memory_efficient" not in _parameters(builder):
            return None, f"only DenseNet has torchvision's memory_efficient checkpointing; skipped for {name}"
        kwargs["memory_efficient"] = True
    init = MetaInit() if torch.device(device).type == "meta" else contextlib.nullcontext()
    with torch.device(device), init:
        return builder(**flops._accepted_kwargs(builder, kwargs)), ""


def _parameters(builder: Callable[..., nn.Module]) -> set[str]:
    import inspect

    sig = inspect.signature(builder)
    names = set(sig.parameters)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        # torchvision-style builders forward **kwargs to the class: read its constructor too.
        ret = sig.return_annotation
        cls = ret if isinstance(ret, type) else getattr(sys.modules.get(builder.__module__), str(ret), None)
        if isinstance(cls, type):
            names |= set(inspect.signature(cls.__init__).parameters)
    return names


def lower_bound(
    name: str, batch_size: int, image_size: int | None = None, dtype: torch.dtype = torch.float32
) -> tuple[int, str] | None:
    """Bytes any implementation must keep between forward and backward, and its definition.

    DenseNet: the input ``[N, 3, S, S]`` + every dense block's output ``[N, C0 + L*k, H, W]``.
    ResNet: the input + the stem's output + every residual block's output. ``None`` for models
    without a config row in :data:`fastblocks.profile.flops.ARCHITECTURES`.
    """
    arch = flops.ARCHITECTURES.get(name)
    if arch is None:
        return None
    size = image_size or flops.default_input_size(name)
    esize = torch.empty((), dtype=dtype).element_size()
    total = batch_size * 3 * size * size
    rows = flops.analytic_counts(arch, size)
    if isinstance(arch, flops.DenseNetArch):
        for r in rows:
            if r.name.startswith("Dense Block"):
                total += batch_size * r.channels * r.height * r.width
        return total * esize, "network input + every dense block's output (the block buffers)"
    stem = rows[0]
    if arch.stem == "imagenet":
        h, w = (stem.height - 1) // 2 + 1, (stem.width - 1) // 2 + 1  # after the 3x3/2 max pool
    else:
        h, w = stem.height, stem.width
    total += batch_size * stem.channels * h * w
    for r, blocks in zip(rows[1:-1], arch.layers):
        total += blocks * batch_size * r.channels * r.height * r.width
    return total * esize, "network input + stem output + every residual block's output"
