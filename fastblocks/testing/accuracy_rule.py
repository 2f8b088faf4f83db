"""The accuracy harness's rule and its bookkeeping.

:class:`Tolerance` and :data:`TOLERANCES` (the bound per dtype, and why), :func:`rel_err` (the
error of a result against the float64 truth), :class:`Record` (one compared quantity) and
:class:`Report` (every record of a run: summary and check). Re-exported by
:mod:`fastblocks.testing.accuracy`, whose docstring states the rule.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

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
