"""Running one trial of the accuracy harness: fused vs eager vs float64 truth.

:class:`Setting` (backend, dtype, device, layout, autocast, TF32) and :func:`compare`, which runs a
module's forward and backward three times on the same weights and inputs and records the error of
every output, gradient and buffer in a :class:`~fastblocks.testing.accuracy_rule.Report`.
Re-exported by :mod:`fastblocks.testing.accuracy`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import math
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from fastblocks import _backend
from fastblocks.testing.accuracy_rule import TOLERANCES, Record, Report, Tolerance, rel_err

# ----------------------------------------------------------------------------- running a trial


@dataclasses.dataclass(frozen=True)
class Setting:
    """Where and how a trial runs.

    Attributes:
        backend: the fastblocks backend forced for the fused twin.
        dtype: the dtype under test (the truth is always float64).
        device: ``"cpu"`` or ``"cuda"``.
        channels_last: inputs and modules in channels_last memory format.
        autocast: run eager and fused in fp32 weights under ``torch.autocast(dtype)`` (GPU).
        tf32: allow TF32 matmuls/convolutions for eager and fused alike (GPU, fp32 only).
    """

    backend: str
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    channels_last: bool = False
    autocast: bool = False
    tf32: bool = False

    def __str__(self) -> str:
        dt = str(self.dtype).removeprefix("torch.")
        extra = "".join([" autocast" if self.autocast else "", " tf32" if self.tf32 else ""])
        layout = "channels_last" if self.channels_last else "nchw"
        return f"{self.backend} {self.device} {dt}{extra} {layout}"

    @property
    def tolerance(self) -> Tolerance:
        return TOLERANCES[self.dtype]


@contextlib.contextmanager
def _tf32(enabled: bool) -> Iterator[None]:
    if not torch.cuda.is_available():
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _place(t: Tensor, dtype: torch.dtype, device: str, channels_last: bool) -> Tensor:
    fmt = torch.channels_last if channels_last and t.dim() == 4 else torch.contiguous_format
    return t.detach().to(device=device, dtype=dtype, memory_format=fmt, copy=True)


def _run(
    module: nn.Module,
    inputs: Sequence[Tensor],
    cotangent: Callable[[torch.Size], Tensor],
    *,
    dtype: torch.dtype,
    setting: Setting,
    backend: str | None,
    train: bool,
) -> dict[str, Tensor]:
    """Forward (and, training, backward with ``cotangent(out.shape)``) of ``module``; results by name."""
    module.train(train)
    module.zero_grad(set_to_none=True)
    low = dtype != torch.float64
    in_dtype = torch.float32 if setting.autocast and low else dtype
    xs = [_place(x, in_dtype, setting.device, setting.channels_last).requires_grad_(train) for x in inputs]
    amp = torch.autocast(setting.device, dtype=setting.dtype) if setting.autocast and low else contextlib.nullcontext()
    with _backend.use_backend(backend), _tf32(setting.tf32 and low):
        with amp:
            out = module(*xs)
        if train:
            out.backward(cotangent(out.shape).to(device=out.device, dtype=out.dtype))
    res = {"out": out.detach()}
    if train:
        for i, x in enumerate(xs):
            res[f"grad:x{i}"] = x.grad
        for name, p in module.named_parameters():
            if p.grad is not None:
                res[f"grad:{name}"] = p.grad
    for name, b in module.named_buffers():
        res[f"buffer:{name}"] = b.detach().clone()
    return res


def _compare(group: str, trial: str, fused: dict, eager: dict, truth: dict, tol: Tolerance, report: Report) -> None:
    for key, t in truth.items():
        if key not in fused or key not in eager:
            report.records.append(Record(group, trial, f"{key} (missing)", math.inf, 0.0, tol))
        elif key.endswith("num_batches_tracked"):
            same = torch.equal(fused[key].cpu(), t.cpu()) and torch.equal(eager[key].cpu(), t.cpu())
            report.records.append(Record(group, trial, key, 0.0 if same else math.inf, 0.0, tol))
        else:
            report.records.append(Record(group, trial, key, rel_err(fused[key], t), rel_err(eager[key], t), tol))


@torch.no_grad()
def _round_state_(module: nn.Module, dtype: torch.dtype) -> None:
    """Round every floating tensor of ``module``'s state to ``dtype`` and back, in place."""
    for v in module.state_dict().values():
        if v.is_floating_point():
            v.copy_(v.to(dtype))


@torch.no_grad()
def _sync(dst: nn.Module, src: nn.Module) -> None:
    """Copy ``src``'s state into ``dst`` (each tensor keeps its own dtype and memory format)."""
    dst_state = dst.state_dict()
    for k, v in src.state_dict().items():
        dst_state[k].copy_(v)


def compare(
    eager: nn.Module,
    fuse: Callable[[nn.Module], nn.Module],
    inputs: Sequence[Tensor],
    setting: Setting,
    *,
    grad_seed: int = 0,
    steps: int = 1,
    lr: float = 0.05,
    eval_after: bool = True,
    group: str = "",
    name: str = "",
) -> Report:
    """Compare ``fuse(eager)`` with ``eager``, both judged by ``eager`` in float64.

    Args:
        eager: the eager module (plain ``torch.nn`` layers) on the CPU; not modified.
        fuse: builds the fused twin from a copy of the eager module (same state_dict).
        inputs: the forward's tensor arguments in float64 (rounded to ``setting.dtype`` here).
        setting: backend, dtype, device, layout, autocast, TF32.
        grad_seed: seed of the random cotangent ``dL/dout`` of each step (a fixed random direction,
            the same for the three runs).
        steps: training steps, each at identical weights: the truth takes an SGD step with ``lr``,
            its state is rounded to the weights' dtype and copied into both twins.
        eval_after: after the steps, compare one eval-mode forward (running statistics).
        group: the case's name (the averaging unit of the rule).
        name: the trial's name (shape, data, seed), for the records.

    Returns:
        the :class:`Report` of every output, gradient and buffer of every step.
    """
    dtype, report = setting.dtype, Report()
    weights = torch.float32 if setting.autocast else dtype  # the twins' parameter dtype
    truth = copy.deepcopy(eager).to(device=setting.device, dtype=torch.float64)
    twin = copy.deepcopy(eager).to(device=setting.device, dtype=weights)
    fused = fuse(copy.deepcopy(eager)).to(device=setting.device, dtype=weights)
    if setting.channels_last:
        twin, fused = twin.to(memory_format=torch.channels_last), fused.to(memory_format=torch.channels_last)
    xs = [x.to(setting.dtype).double() for x in inputs]  # every run sees these values
    g = torch.Generator().manual_seed(grad_seed)
    for step in range(steps + (1 if eval_after else 0)):
        train = step < steps
        _round_state_(truth, weights)
        _sync(twin, truth)
        _sync(fused, truth)
        memo: dict[str, Tensor] = {}

        def cotangent(shape: torch.Size, memo: dict[str, Tensor] = memo) -> Tensor:
            if "g" not in memo:
                memo["g"] = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).double()
            return memo["g"]

        trial = f"{name} " + (f"step {step}" if train else "eval")
        run = functools.partial(_run, inputs=xs, cotangent=cotangent, setting=setting, train=train)
        r_truth = run(truth, dtype=torch.float64, backend="reference")
        r_eager = run(twin, dtype=dtype, backend="reference")
        r_fused = run(fused, dtype=dtype, backend=setting.backend)
        _compare(f"{group} [{setting}]", trial, r_fused, r_eager, r_truth, setting.tolerance, report)
        if train:
            with torch.no_grad():
                for p in truth.parameters():
                    if p.grad is not None:
                        p -= lr * p.grad
    return report
