"""What an op module declares about itself for the project's shared tables.

Three tables used to list every op by hand: the accuracy harness's cases
(:mod:`fastblocks.testing.accuracy_cases`), the op benchmark's cases (:mod:`fastblocks.bench.ops`)
and the sm_90 compile check's launcher calls (``tools/sm90_compile.py``). Each now collects the
:class:`OpDeclaration` that op modules pass to :func:`declare`, so a new elementwise op is added
in its own file (plus its test, its benchmark suite and the export in ``fastblocks/ops/__init__.py``)
and nowhere else. ``docs/ADDING_AN_OP.md`` walks through it.

Blocks and convolutions (the dense block, ``bn_relu_conv2d``, the BatchNorm kernels' shape grid)
have their own, larger cases in those tables; this is for ops whose inputs and output are all
activation-sized, ``[N, C, H, W]``, NCHW or channels_last.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Sequence

import torch

Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class BenchDeclaration:
    """How ``fastblocks bench --ops`` and ``benchmarks/bench_<op>.py`` time the op.

    Every op takes ``(x, r)``: x and a second x-sized input (the residual), which an op of one
    input ignores. Nominal bytes per call are ``passes`` x-sized tensors per mode, plus one bit per
    element each way when the op keeps a 1-bit mask (:mod:`fastblocks.bench.ops`).

    Attributes:
        registered: the backend op (``_backend.resolve(registered, device)``) the fused provider
            reports, e.g. ``"batch_norm_act"``.
        passes: x-sized tensor passes of a fused two-pass implementation, ``(fwd, bwd)``.
        mask_bits: the op keeps a 1-bit-per-element mask for its backward.
        gpu_shapes: ``(N, C, H, W)`` of x on GPUs (ResNet-50 layers at batch 256).
        cpu_shapes: the same activations at batch 8 on the CPU.
        functions: ``(channels, device, fused) -> (f(x, r) -> out, parameters)``; ``fused=False``
            is what torchvision does (eager PyTorch, in place where it is in place), and both
            get identical parameters.
    """

    registered: str
    passes: tuple[int, int]
    gpu_shapes: tuple[Shape, ...]
    cpu_shapes: tuple[Shape, ...]
    functions: Callable[[int, torch.device, bool], tuple[Callable[..., torch.Tensor], list[torch.Tensor]]]
    mask_bits: bool = False


@dataclasses.dataclass(frozen=True)
class AccuracyDeclaration:
    """How the accuracy harness judges the op against float64 truth, with eager's error as the bound.

    Attributes:
        reference: the eager PyTorch twin, ``reference(*inputs) -> out``.
        fused: the public fused function, same arguments.
        inputs: ``(x, generator) -> inputs``: every float64 input of a trial, from the harness's
            x (one of its adversarial distributions); this is where the op's own adversarial data
            goes (e.g. a residual that cancels x exactly, a ReLU decision at exactly 0).
    """

    reference: Callable[..., torch.Tensor]
    fused: Callable[..., torch.Tensor]
    inputs: Callable[[torch.Tensor, torch.Generator], list[torch.Tensor]]


#: ``launches(empty, shape, channels_last) -> [(what, launcher, args), ...]``: the Triton launcher
#: calls that compile every kernel variant of the op for one shape, dtype and layout;
#: ``empty(shape)`` makes an uninitialized tensor in that dtype and layout.
Sm90Launches = Callable[
    [Callable[[Sequence[int]], torch.Tensor], Shape, bool], list[tuple[str, Callable[..., object], tuple]]
]


@dataclasses.dataclass(frozen=True)
class OpDeclaration:
    """One op's entries in the shared tables (each ``None`` where the op has none).

    Attributes:
        name: the case name in every table, e.g. ``"add_relu"``.
        bench: its op benchmark.
        accuracy: its accuracy-harness case.
        sm90_launches: its Triton launcher calls for ``make sm90-compile`` (:data:`Sm90Launches`).
    """

    name: str
    bench: BenchDeclaration | None = None
    accuracy: AccuracyDeclaration | None = None
    sm90_launches: Sm90Launches | None = None


_DECLARED: dict[str, OpDeclaration] = {}


def declare(decl: OpDeclaration) -> OpDeclaration:
    """Add ``decl`` to the tables (at import of its op module; a module reloaded replaces its
    entry); returns it."""
    _DECLARED[decl.name] = decl
    return decl


def declared() -> dict[str, OpDeclaration]:
    """Every declared op, in declaration order (importing :mod:`fastblocks.ops` first, so all are)."""
    importlib.import_module("fastblocks.ops")
    return dict(_DECLARED)
