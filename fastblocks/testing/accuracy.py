"""The accuracy harness: fastblocks against eager PyTorch, both judged by a float64 truth.

Every comparison runs one computation three times on the same weights and the same data:

- the **truth**: the eager module (plain ``torch.nn`` layers) in float64;
- **eager**: the same eager module in the dtype under test ``D``;
- **fused**: its fastblocks twin (same state_dict) in ``D``, on one forced backend.

Inputs and weights are made in float64 and rounded to ``D`` first, so all three start from the
same values. For every output, input gradient, parameter gradient and BatchNorm buffer (after the
forward's update) the error of a result ``r`` against the truth ``t`` is

    err(r) = max|r - t| / max|t|           (0 when both are 0)

and the fused result is accepted when

    err(fused) <= factor * err(eager) + floor(D)

(ARCHITECTURE.md's rule; FlashAttention's tests use the same form). ``num_batches_tracked`` must
be equal. :data:`TOLERANCES` gives the numbers and why.

Model-level runs (:func:`compare`, ``steps > 1``) take a few SGD steps: before each step the
fp64 truth's weights and buffers are copied (rounded) into the eager and fused twins, so each step
is compared at identical weights; after the steps one eval-mode forward is compared.

Chaos, measured (``tests/accuracy/``, ``python -m fastblocks.testing.accuracy --help``): at small
batches a ReLU whose pre-activation lies within the accumulated fp32 forward error of 0
(~4e-6 relative in ResNet-18's layer4) decides differently in two fp32 computations, and layer4's
BatchNorms (16 values per channel at 4x64x64 inputs) spread that one element into every gradient
below it. Eager PyTorch's own fp32 gradients then differ from float64 by 1e-3 to 4e-2
(``python benchmarks/accuracy_models.py --batches 8``: ResNet-50 on 8 of 8 batches, ResNet-18 on
3 of 8, DenseNet-121 on 8 of 8, eager and fused alike), and which of two fp32 implementations is
hit on a given batch is luck. So whole-model comparisons here use :func:`condition` (BatchNorm affine
parameters that keep pre-activations away from 0) and the block- and op-level comparisons use
adversarial data on purpose (exact zeros, BN outputs exactly at 0, constant channels) where the
decision is exact in every implementation.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from fastblocks import _backend

# ----------------------------------------------------------------------------- the rule


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """The accuracy rule of one dtype (errors relative to the truth's largest |value|).

    - on average: the geometric mean over a case's trials and quantities of
      ``(err_fused + floor) / (err_eager + floor)`` is at most ``factor``;
    - everywhere: ``err_fused <= worst * err_eager + floor`` for every quantity of every trial.
    """

    factor: float
    worst: float
    floor: float

    def bound(self, err_eager: float) -> float:
        return self.worst * err_eager + self.floor

    def ratio(self, err_fused: float, err_eager: float) -> float:
        return (err_fused + self.floor) / (err_eager + self.floor)


def _ulps(dtype: torch.dtype, n: float) -> float:
    return n * torch.finfo(dtype).eps


#: Per dtype: ``factor = 2`` on average, ``worst = 8`` per quantity, and
#: ``floor = 8 eps(D) + 32 eps(fp32)`` (4.8e-6 in fp32, 7.8e-3 in fp16, 6.3e-2 in bf16).
#:
#: Why an average and a worst case, not ``err_fused <= 2 err_eager + floor`` per quantity: one
#: quantity's error is one sample of rounding noise, and the ratio of two such samples exceeds 2
#: by chance when the quantity is ill-conditioned. Measured with :func:`run_case` on the
#: ``bottleneck`` case at input shapes (1, 8, 3, 3) and (1, 8, 6, 6) (4 and 9 values per channel in
#: its last BatchNorms): the gradients of ``bn1`` had 10x to 27x eager's error on the ``cpu``
#: backend and on the ``reference`` one (pure PyTorch, another order of the same operations), which
#: is why the block shapes give every BatchNorm at least 16 values; and BatchNorm's dx over 2
#: values per channel (``batch_norm`` at (2, 5, 1, 1)) is 0 in exact arithmetic, so both errors are
#: pure noise (5e-3 and 1e-2). A defect is far outside both limits: a wrong ReLU
#: decision or a lost term moves an error by orders of magnitude (``tests/accuracy`` shows the
#: harness failing on each), and a systematic loss of precision moves the average.
#:
#: Why this floor: ``8 eps(D)`` covers a few more roundings in D than eager's (an FMA, an
#: intermediate stored in D) where eager lands on the truth; ``32 eps(fp32)`` covers fp32
#: accumulation. Eager PyTorch's CPU BatchNorm accumulates its sums in double; the fused kernels
#: (and every GPU BatchNorm) accumulate in fp32, and the sums cancel: ``sum(g * (x - mean))`` on data
#: of mean 6 and std 0.5 (the "shifted" inputs) has 1e-6 to 9e-6 error against eager's 1e-7 to
#: 7e-7 (the ``cpu`` and ``triton`` backends alike).
TOLERANCES: dict[torch.dtype, Tolerance] = {
    dt: Tolerance(2.0, 8.0, _ulps(dt, 8) + _ulps(torch.float32, 32))
    for dt in (torch.float32, torch.float16, torch.bfloat16)
}
TOLERANCES[torch.float64] = Tolerance(2.0, 8.0, _ulps(torch.float64, 64))


def rel_err(result: Tensor, truth: Tensor) -> float:
    """``max|result - truth| / max|truth|`` in float64 (NaN at the same places counts as equal).

    Shapes must match; ``inf`` when only one side is NaN, 0.0 for empty or all-zero equal tensors.
    """
    if result.shape != truth.shape:
        raise AssertionError(f"shape mismatch: {tuple(result.shape)} vs {tuple(truth.shape)}")
    if result.numel() == 0:
        return 0.0
    r, t = result.detach().double().cpu(), truth.detach().double().cpu()
    if not torch.equal(torch.isnan(r), torch.isnan(t)):
        return float("inf")
    ok = ~torch.isnan(t)
    diff = float((r[ok] - t[ok]).abs().max()) if ok.any() else 0.0
    scale = float(t[ok].abs().max()) if ok.any() else 0.0
    if scale == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / scale


@dataclasses.dataclass
class Record:
    """One compared quantity of one trial."""

    group: str  # case and setting: the averaging unit
    trial: str  # shape, data, seed, step
    quantity: str  # "out", "grad:x0", "grad:<param>", "buffer:<name>"
    err_fused: float
    err_eager: float
    tol: Tolerance

    @property
    def bound(self) -> float:
        return self.tol.bound(self.err_eager)

    @property
    def ratio(self) -> float:
        return self.tol.ratio(self.err_fused, self.err_eager)

    @property
    def ok(self) -> bool:
        return self.err_fused <= self.bound

    def __str__(self) -> str:
        mark = "ok  " if self.ok else "FAIL"
        return (
            f"{mark} {self.group} {self.trial} {self.quantity}: fused {self.err_fused:.2e}"
            f" eager {self.err_eager:.2e} bound {self.bound:.2e}"
        )


@dataclasses.dataclass
class Report:
    """Every record of a run; :meth:`check` raises with what breaks the rule."""

    records: list[Record] = dataclasses.field(default_factory=list)

    def extend(self, other: Report) -> None:
        self.records.extend(other.records)

    @property
    def failures(self) -> list[Record]:
        """Quantities over their worst-case bound."""
        return [r for r in self.records if not r.ok]

    def mean_ratios(self) -> dict[str, float]:
        """Per group, the geometric mean of ``(err_fused + floor) / (err_eager + floor)``."""
        logs: dict[str, list[float]] = {}
        for r in self.records:
            logs.setdefault(r.group, []).append(math.log(r.ratio) if math.isfinite(r.ratio) else math.inf)
        return {g: math.exp(sum(v) / len(v)) for g, v in logs.items()}

    def over_average(self) -> dict[str, float]:
        """Groups whose mean ratio is over their dtype's ``factor``."""
        factor = {r.group: r.tol.factor for r in self.records}
        return {g: m for g, m in self.mean_ratios().items() if not m <= factor[g]}

    def worst(self) -> Record | None:
        """The record closest to (or furthest past) its bound."""
        return max(self.records, key=lambda r: r.err_fused / r.bound, default=None)

    def summary(self) -> str:
        """One line: counts, the largest mean ratio and the worst record."""
        means = self.mean_ratios()
        worst = self.worst()
        if worst is None:
            return "no records"
        top = max(means, key=means.get)
        return (
            f"{len({(r.group, r.trial) for r in self.records})} trials, {len(self.records)} quantities,"
            f" {len(self.failures)} over the worst-case bound, {len(self.over_average())} groups over the"
            f" average; largest mean ratio {means[top]:.2f} ({top}); worst {worst.err_fused / worst.bound:.2f}"
            f" of its bound ({worst})"
        )

    def check(self) -> None:
        """Raise ``AssertionError`` naming every quantity over its bound and every group over the average."""
        bad, avg = self.failures, self.over_average()
        if not bad and not avg:
            return
        lines = [str(r) for r in bad[:40]] + ([f"... and {len(bad) - 40} more"] if len(bad) > 40 else [])
        lines += [f"mean ratio {m:.2f} over the factor: {g}" for g, m in avg.items()]
        raise AssertionError(f"accuracy rule broken ({self.summary()}):\n" + "\n".join(lines))


# ----------------------------------------------------------------------------- data


#: Input distributions. Each is a function ``(shape, generator) -> float64 tensor``.
def _normal(shape: Sequence[int], g: torch.Generator) -> Tensor:
    return torch.randn(shape, generator=g, dtype=torch.float64)


def _shifted(shape: Sequence[int], g: torch.Generator) -> Tensor:
    # Mean 6, std 0.5 (mean^2 / var = 144): a plain sum of squares loses 2 digits here.
    return 6.0 + 0.5 * _normal(shape, g)


def _post_relu(shape: Sequence[int], g: torch.Generator) -> Tensor:
    return _normal(shape, g).clamp_min(0.0)  # about half exact zeros


def _sparse(shape: Sequence[int], g: torch.Generator) -> Tensor:
    return _normal(shape, g) * (torch.rand(shape, generator=g, dtype=torch.float64) < 0.1)


def _ties(shape: Sequence[int], g: torch.Generator) -> Tensor:
    """Values in {-1, 0, 1}, each channel's sum exactly 0, and every other channel constant 0.

    Each channel's mean is exactly 0 in any summation order, so with ``beta = 0`` BatchNorm's output
    is exactly 0 wherever x is 0 (a ReLU decision at exactly 0 in every implementation), and the
    constant channels have variance 0 (the normalization divides by ``sqrt(eps)``).
    """
    n, c = shape[0], shape[1]
    per = n * int(torch.tensor(shape[2:]).prod()) if len(shape) > 2 else n
    x = torch.zeros(c, per, dtype=torch.float64)
    half = per // 2
    if half:
        v = torch.randint(-1, 2, (c, half), generator=g).double()
        x[:, :half], x[:, half : 2 * half] = v, -v
        x = x[:, torch.randperm(per, generator=g)]
    x[1::2] = 0.0
    return x.view(c, n, *shape[2:]).transpose(0, 1).contiguous()


DISTRIBUTIONS: dict[str, Callable[[Sequence[int], torch.Generator], Tensor]] = {
    "normal": _normal,
    "shifted": _shifted,
    "post_relu": _post_relu,
    "sparse": _sparse,
    "ties": _ties,
}


def _randomize_params(module: nn.Module, g: torch.Generator, data: str) -> None:
    """Weights as trained networks have them: BatchNorm gamma in [0.5, 1.5], beta ~ N(0, 0.5)
    (``beta = 0`` for the "ties" data, so BN outputs sit exactly at 0), convolutions Kaiming-like."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                if m.affine:
                    m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g, dtype=torch.float64))
                    beta = 0.5 * torch.randn(m.bias.shape, generator=g, dtype=torch.float64)
                    m.bias.copy_(beta * (data != "ties"))
                if m.track_running_stats:
                    m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g, dtype=torch.float64))
                    m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g, dtype=torch.float64))
            elif isinstance(m, nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g, dtype=torch.float64) * (2.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g, dtype=torch.float64))


def condition(model: nn.Module, seed: int = 0) -> None:
    """Set every BatchNorm's affine parameters so that no pre-activation lies near 0 (in place).

    A BatchNorm followed by a ReLU gets gamma 0.3 and beta +-1 per channel (channels mostly active
    or mostly dead: masks are exercised, but ``|0.3 z +- 1| < 1e-5`` needs ``|z| ~ 3.3``); the last
    BatchNorm of a residual branch and a projection shortcut's get gamma 0.2, beta 0.5 (damped
    branches). Same effect on the eager twin and the fused model: apply it before making the twin.
    """
    g = torch.Generator().manual_seed(seed)
    damped: set[str] = set()
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        if getattr(m, "variant", None) in ("original", "bn_after_add", "relu_before_add") and hasattr(m, "_last_bn"):
            damped.add(prefix + m._last_bn)
        if name.endswith("downsample") and isinstance(m, nn.Sequential) and len(m) > 1:
            damped.add(prefix + "1")
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, nn.BatchNorm2d) and m.affine:
                if name in damped:
                    m.weight.fill_(0.2)
                    m.bias.fill_(0.5)
                else:
                    m.weight.fill_(0.3)
                    m.bias.copy_(torch.randint(0, 2, m.bias.shape, generator=g).to(m.bias.dtype) * 2 - 1)


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


# ----------------------------------------------------------------------------- cases
class _BNAct(nn.Module):
    """Eager ``act(bn(x) [+ residual])``: the twin of the fastblocks BatchNorm modules."""

    def __init__(self, channels: int, relu: bool) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.relu = relu

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        y = self.bn(x)
        if residual is not None:
            y = y + residual
        return torch.relu(y) if self.relu else y


class _FusedBNAct(_BNAct):
    def __init__(self, eager: _BNAct, residual: bool) -> None:
        from fastblocks.nn import batchnorm as fbn

        super().__init__(eager.bn.num_features, eager.relu)
        cls = fbn.BNAddReLU if residual and eager.relu else fbn.BatchNormReLU2d if eager.relu else fbn.BatchNorm2d
        self.bn = cls(eager.bn.num_features)
        self.load_state_dict(eager.state_dict())

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        if residual is None:
            return self.bn(x)
        return self.bn(x, residual) if self.relu else self.bn(x) + residual


class _AddReLU(nn.Module):
    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        return torch.relu(x + residual)


class _PreAct(nn.Module):
    """Eager ``conv(relu(norm(x)))`` with :class:`fastblocks.nn.BNReLUConv2d`'s keys."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(c_in)
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(torch.relu(self.norm(x)))


class _PostAct(nn.Module):
    """Eager ``relu(bn(conv(x)))`` with :class:`fastblocks.nn.ConvBNReLU2d`'s keys."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.bn(self.conv(x)))


def _fused_preact(eager: _PreAct) -> nn.Module:
    from fastblocks.nn import BNReLUConv2d

    c = eager.conv
    m = BNReLUConv2d(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding)
    m.load_state_dict(eager.state_dict())
    return m


def _fused_postact(eager: _PostAct) -> nn.Module:
    from fastblocks.nn import ConvBNReLU2d

    c = eager.conv
    m = ConvBNReLU2d(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding)
    m.load_state_dict(eager.state_dict())
    return m


def _convert(eager: nn.Module) -> nn.Module:
    from fastblocks.models.convert import convert

    return convert(eager, inplace=True)


def _fused_class(cls_name: str) -> Callable[[nn.Module], nn.Module]:
    def fuse(eager: nn.Module) -> nn.Module:
        from fastblocks.models import densenet

        eager.__class__ = getattr(densenet, cls_name)
        return eager

    return fuse


#: ``make(shape, generator, data) -> (eager module, fuse, float64 inputs)``
Maker = Callable[
    [tuple[int, ...], torch.Generator, str], tuple[nn.Module, Callable[[nn.Module], nn.Module], list[Tensor]]
]


@dataclasses.dataclass(frozen=True)
class Case:
    """One fused op or block and the shapes it is tried on.

    Attributes:
        name: e.g. ``"bn_add_relu"``.
        make: builds the eager module (random weights), the fuse function and the inputs of a trial.
        shapes: input shapes ``(N, C, H, W)`` tried (tiny spatial sizes, N = 1 and 2, odd C).
        data: the input distributions tried (keys of :data:`DISTRIBUTIONS`).
        steps: training steps per trial.
    """

    name: str
    make: Maker
    shapes: tuple[tuple[int, ...], ...]
    data: tuple[str, ...] = tuple(DISTRIBUTIONS)
    steps: int = 1


def _bn_case(relu: bool, residual: bool) -> Maker:
    def make(shape, g, data):
        eager = _BNAct(shape[1], relu)
        _randomize_params(eager, g, data)
        xs = [DISTRIBUTIONS[data](shape, g)]
        if residual:
            xs.append(_normal(shape, g) * 0.5)
        return eager, lambda m: _FusedBNAct(m, residual), xs

    return make


def _add_relu_make(shape, g, data):
    from fastblocks.nn import AddReLU

    x = DISTRIBUTIONS[data](shape, g)
    # The residual cancels x exactly at some elements: ReLU decisions at exactly 0.
    r = torch.where(torch.rand(shape, generator=g, dtype=torch.float64) < 0.2, -x, _normal(shape, g))
    return _AddReLU(), lambda m: AddReLU(), [x, r]


def _conv_case(pre: bool, kernel: int, stride: int) -> Maker:
    def make(shape, g, data):
        c_out = max(3, shape[1] + 3)
        eager = (_PreAct if pre else _PostAct)(shape[1], c_out, kernel, stride)
        _randomize_params(eager, g, data)
        return eager, _fused_preact if pre else _fused_postact, [DISTRIBUTIONS[data](shape, g)]

    return make


def _block_case(kind: str) -> Maker:
    def make(shape, g, data):
        from fastblocks.models import densenet, resnet

        c = shape[1]
        fuse: Callable[[nn.Module], nn.Module] = _convert
        if kind == "basic":
            eager = resnet.BasicBlock(c, c)
        elif kind == "basic_down":
            down = nn.Sequential(nn.Conv2d(c, 2 * c, 1, 2, bias=False), nn.BatchNorm2d(2 * c))
            eager = resnet.BasicBlock(c, 2 * c, 2, down)
        elif kind in ("bottleneck", "bottleneck_tail"):
            down = nn.Sequential(nn.Conv2d(c, 8, 1, 2, bias=False), nn.BatchNorm2d(8))
            eager = resnet.Bottleneck(c, 2, 2, down)
            eager.recompute_tail = kind == "bottleneck_tail"
        elif kind == "preact":
            eager = resnet.PreActBasicBlock(c, c)
        elif kind == "dense_block":
            eager = densenet._DenseBlock(3, c, bn_size=2, growth_rate=3, drop_rate=0.0)
            fuse = _fused_class("_FusedDenseBlock")
        elif kind == "transition":
            eager = densenet._Transition(c, max(1, c // 2))
            fuse = _fused_class("_FusedTransition")
        else:
            raise ValueError(f"unknown block {kind!r}")
        _randomize_params(eager, g, data)
        return eager, fuse, [DISTRIBUTIONS[data](shape, g)]

    return make


_TINY = ((4, 5, 1, 1), (1, 3, 3, 3), (2, 6, 2, 2), (3, 7, 5, 4))  # >= 4 values per channel
_CONV = ((1, 4, 3, 3), (2, 5, 4, 4), (2, 16, 5, 5))
_BLOCK = ((2, 8, 6, 6), (1, 8, 8, 8))  # every BatchNorm of a block sees >= 16 values per channel
# Blocks take no "ties" data: a convolution of it gives BatchNorm inputs whose exact mean is 0 with
# values exactly at it. Eager CPU PyTorch sums them in double (mean exactly 0: BN output exactly
# 0, ReLU off); fp32 sums (the fused kernels, the reference backend, every GPU BatchNorm) give a
# mean of ~1e-8, which turns those ReLUs on (a Bottleneck's dx then differs by 14%). Measured in
# tests/accuracy; the single ops take "ties" directly, where the sums are exact in fp32.
_BLOCK_DATA = tuple(d for d in DISTRIBUTIONS if d != "ties")

#: The op- and block-level cases (small shapes: they also run in the Triton interpreter).
CASES: dict[str, Case] = {
    c.name: c
    for c in (
        Case("batch_norm", _bn_case(relu=False, residual=False), _TINY),
        Case("batch_norm_relu", _bn_case(relu=True, residual=False), _TINY),
        Case("bn_add_relu", _bn_case(relu=True, residual=True), _TINY),
        Case("add_relu", _add_relu_make, _TINY),
        Case("bn_relu_conv1x1", _conv_case(True, 1, 1), _CONV),
        Case("bn_relu_conv3x3", _conv_case(True, 3, 1), _CONV),
        Case("bn_relu_conv3x3_s2", _conv_case(True, 3, 2), _CONV),
        Case("conv_bn_relu3x3", _conv_case(False, 3, 1), _CONV),
        Case("basic_block", _block_case("basic"), _BLOCK, _BLOCK_DATA, steps=2),
        Case("basic_block_down", _block_case("basic_down"), _BLOCK, _BLOCK_DATA, steps=2),
        Case("bottleneck", _block_case("bottleneck"), _BLOCK, _BLOCK_DATA, steps=2),
        Case("bottleneck_tail", _block_case("bottleneck_tail"), _BLOCK, _BLOCK_DATA, steps=2),
        Case("preact_block", _block_case("preact"), _BLOCK, _BLOCK_DATA, steps=2),
        Case("dense_block", _block_case("dense_block"), _BLOCK, _BLOCK_DATA, steps=2),
        Case("transition", _block_case("transition"), _BLOCK, _BLOCK_DATA, steps=2),
    )
}


def run_case(case: Case, setting: Setting, *, seeds: Sequence[int] = (0,), limit: int | None = None) -> Report:
    """Every (shape, data, seed) trial of ``case`` under ``setting`` (the first ``limit`` of them).

    Per seed every (data, shape) pair is one trial, ordered so that the first ``max(len(data),
    len(shapes))`` trials already meet every distribution and every shape.
    """
    report = Report()
    nd, ns = len(case.data), len(case.shapes)
    trials = [
        (seed, case.data[j % nd], case.shapes[(j // nd + j) % ns]) for seed in seeds for j in range(nd * ns)
    ]  # j -> (data, shape) is a bijection; the first max(nd, ns) trials meet every data and shape
    for i, (seed, data, shape) in enumerate(trials[:limit]):
        g = torch.Generator().manual_seed(1000 * seed + i)
        eager, fuse, xs = case.make(shape, g, data)
        name = f"{tuple(shape)} {data} seed {seed}"
        report.extend(compare(eager, fuse, xs, setting, grad_seed=seed, steps=case.steps, group=case.name, name=name))
    return report


# ----------------------------------------------------------------------------- models
#: Model families: builder name, input size and batch. Small inputs keep the CPU run short;
#: every family of the package is here (basic and bottleneck ResNets, ResNeXt, wide, the block
#: variants, CIFAR ResNets, DenseNet and DenseNet-BC).
MODELS: dict[str, tuple[str, dict, int, int]] = {
    "resnet18": ("resnet18", {}, 64, 4),
    "resnet50": ("resnet50", {}, 64, 4),
    "resnext50_32x4d": ("resnext50_32x4d", {}, 64, 2),
    "wide_resnet50_2": ("wide_resnet50_2", {}, 64, 2),
    "resnet18_bn_after_add": ("resnet18", {"block_variant": "bn_after_add"}, 64, 4),
    "resnet18_relu_before_add": ("resnet18", {"block_variant": "relu_before_add"}, 64, 4),
    "resnet18_preact": ("resnet18", {"block_variant": "preact"}, 64, 4),
    "resnet20": ("resnet20", {}, 32, 4),
    "densenet121": ("densenet121", {}, 64, 4),
    "densenet_bc_100_12": ("densenet_bc_100_12", {}, 32, 4),
}


def compare_model(name: str, setting: Setting, *, seed: int = 0, steps: int = 2, num_classes: int = 10) -> Report:
    """Train ``steps`` SGD steps of a model of :data:`MODELS`, fused vs eager vs float64 truth.

    The eager twin is the package's own model with ``fused=False`` (torchvision's modules and
    forward), conditioned by :func:`condition`; the fused model is built with ``fused=True`` and
    loads the twin's state_dict.
    """
    from fastblocks.models import registry

    builder, kwargs, size, batch = MODELS[name]
    torch.manual_seed(seed)
    eager = registry.get_model(builder, num_classes=num_classes, fused=False, **kwargs)
    condition(eager, seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=g, dtype=torch.float64)

    def fuse(m: nn.Module) -> nn.Module:
        fused = registry.get_model(builder, num_classes=num_classes, fused=True, **kwargs)
        fused.load_state_dict(m.state_dict())
        if not any(
            type(sub).__module__.startswith("fastblocks.nn") or "Fused" in type(sub).__name__ for sub in fused.modules()
        ):
            raise AssertionError(f"{name}: the fused model has no fused module")
        return fused

    return compare(eager, fuse, [x], setting, grad_seed=seed, steps=steps, group=name, name=f"seed {seed}")


def available_backends(device: str = "cpu") -> list[str]:
    """The fastblocks backends that can run every op on ``device`` here."""
    ops = _backend.registered_ops()
    return [b for b in _backend.BACKENDS if all(_backend.unavailable_reason(op, b, device) is None for op in ops)]


def settings_for(device: str, backends: Sequence[str] | None = None) -> list[Setting]:
    """The settings a device is checked in: every backend available, NCHW and channels_last, and
    on CUDA fp32 (TF32 off and on), fp16 and bf16 (pure and autocast); fp32 on the CPU."""
    backends = [b for b in (backends or available_backends(device)) if b != "reference" or device == "cpu"]
    out = []
    for b in backends:
        for cl in (False, True):
            if device == "cuda":
                out += [Setting(b, torch.float32, device, cl), Setting(b, torch.float32, device, cl, tf32=True)]
                for dt in (torch.float16, torch.bfloat16):
                    out += [Setting(b, dt, device, cl), Setting(b, dt, device, cl, autocast=True)]
            else:
                out.append(Setting(b, torch.float32, device, cl))
    return out


def run_suite(
    device: str = "cpu",
    *,
    backends: Sequence[str] | None = None,
    cases: Sequence[str] | None = None,
    models: Sequence[str] = (),
    seeds: Sequence[int] = (0,),
    quick: bool = True,
    log: Callable[[str], None] | None = None,
    time_limit_s: float | None = None,
) -> Report:
    """The harness over every setting of :func:`settings_for` (``fastblocks bench --check``, the GPU check).

    Args:
        device: ``"cpu"`` or ``"cuda"``.
        backends: backends to check (default: every one available on ``device``).
        cases: names of :data:`CASES` (default: all).
        models: names of :data:`MODELS` checked too (two steps each; fp32 and the first backend only
            on the CPU, every setting on CUDA).
        seeds: seeds of each case.
        quick: the shortest run per case that meets every shape and distribution.
        log: called with one line per case and setting.
        time_limit_s: start no new case after this many seconds (the log says what was skipped).
    """
    report = Report()
    start = time.perf_counter()
    for setting in settings_for(device, backends):
        for name in cases or list(CASES):
            if time_limit_s is not None and time.perf_counter() - start > time_limit_s:
                if log:
                    log(f"{name} [{setting}]: NOT RUN (time limit of {time_limit_s:.0f} s reached)")
                continue
            case = CASES[name]
            limit = max(len(case.data), len(case.shapes)) if quick else None
            part = run_case(case, setting, seeds=seeds, limit=limit)
            report.extend(part)
            if log:
                log(f"{name} [{setting}]: {part.summary()}")
        for name in models:
            if time_limit_s is not None and time.perf_counter() - start > time_limit_s:
                if log:
                    log(f"{name} [{setting}]: NOT RUN (time limit of {time_limit_s:.0f} s reached)")
                continue
            if device == "cpu" and (
                setting.channels_last or setting.backend != settings_for(device, backends)[0].backend
            ):
                continue
            part = compare_model(name, setting)
            report.extend(part)
            if log:
                log(f"{name} [{setting}]: {part.summary()}")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fastblocks.testing.accuracy``: run the harness here and print its verdict."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m fastblocks.testing.accuracy", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backends", default=None, help="comma-separated (default: every one available)")
    p.add_argument("--cases", default=None, help=f"comma-separated subset of {','.join(CASES)}")
    p.add_argument("--models", default="", help=f"comma-separated subset of {','.join(MODELS)}")
    p.add_argument("--seeds", type=int, default=1, help="seeds per case")
    p.add_argument("--full", action="store_true", help="every trial of every case (default: the quick set)")
    p.add_argument("--time-limit", type=float, default=None, help="start no new case after this many seconds")
    p.add_argument("--json", default=None, help="also write every record to this JSON file")
    args = p.parse_args(argv)
    report = run_suite(
        args.device,
        backends=args.backends.split(",") if args.backends else None,
        cases=args.cases.split(",") if args.cases else None,
        models=[m for m in args.models.split(",") if m],
        seeds=range(args.seeds),
        quick=not args.full,
        log=lambda line: print(line, flush=True),
        time_limit_s=args.time_limit,
    )
    print(report.summary())
    if args.json:
        rows = [{**dataclasses.asdict(r), "tol": dataclasses.asdict(r.tol), "ok": r.ok} for r in report.records]
        with open(args.json, "w") as f:
            json.dump({"summary": report.summary(), "mean_ratios": report.mean_ratios(), "records": rows}, f)
    try:
        report.check()
    except AssertionError as exc:
        print(exc)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
