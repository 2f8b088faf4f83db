"""The harness itself: its rule, and that it fails on the defects it exists to catch.

Each defect is injected into the ``reference`` backend (pure PyTorch, patched for the test only):
a ReLU mask rebuilt with the wrong rule at exactly-zero outputs, BatchNorm's mean taken with
Welford's updates (the defect that ``_stats_reference`` had until this harness found it), and a
dx coefficient 0.1% off.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from fastblocks.ops import _bn_core as bn_core
from fastblocks.ops import batchnorm as bn_ops
from fastblocks.testing import accuracy


def _report(case: str, data: tuple[str, ...], backend: str = "reference") -> accuracy.Report:
    c = dataclasses.replace(accuracy.CASES[case], data=data)
    return accuracy.run_case(c, accuracy.Setting(backend), seeds=(0,))


def test_rel_err() -> None:
    t = torch.tensor([1.0, -4.0, 2.0], dtype=torch.float64)
    assert accuracy.rel_err(t, t) == 0.0
    assert accuracy.rel_err(t + torch.tensor([0.0, 0.0, 0.4], dtype=torch.float64), t) == pytest.approx(0.1)
    assert accuracy.rel_err(torch.zeros(2), torch.zeros(2)) == 0.0
    assert accuracy.rel_err(torch.tensor([1e-9]), torch.zeros(1)) == math.inf
    nan = torch.tensor([float("nan"), 1.0])
    assert accuracy.rel_err(nan, nan) == 0.0
    assert accuracy.rel_err(torch.tensor([0.0, 1.0]), nan) == math.inf
    with pytest.raises(AssertionError, match="shape mismatch"):
        accuracy.rel_err(torch.zeros(2), torch.zeros(3))


def test_rule_per_quantity_and_on_average() -> None:
    tol = accuracy.TOLERANCES[torch.float32]
    assert tol.bound(1e-6) == pytest.approx(8e-6 + tol.floor)
    ok = accuracy.Record("g", "t", "out", 1e-6, 1e-6, tol)
    bad = accuracy.Record("g", "t", "grad:x0", 1e-2, 1e-6, tol)
    assert ok.ok and not bad.ok
    accuracy.Report([ok]).check()
    with pytest.raises(AssertionError, match="grad:x0"):
        accuracy.Report([ok, bad]).check()
    # Within the worst-case bound everywhere, but 3x eager's error on average: broken.
    meh = [accuracy.Record("g", f"t{i}", "out", 3 * (1e-5 + tol.floor) - tol.floor, 1e-5, tol) for i in range(4)]
    assert all(r.ok for r in meh)
    with pytest.raises(AssertionError, match=r"mean ratio 3\.00 over the factor: g"):
        accuracy.Report(meh).check()


def test_ties_data_puts_batchnorm_outputs_exactly_at_zero() -> None:
    x = accuracy.DISTRIBUTIONS["ties"]((3, 6, 4, 5), torch.Generator().manual_seed(0))
    assert torch.equal(x.float().sum((0, 2, 3)), torch.zeros(6))
    assert (x[:, 1::2] == 0).all() and (x == 0).float().mean() > 0.5


def test_passes_the_unpatched_reference() -> None:
    _report("batch_norm_relu", ("ties", "normal")).check()


def test_fails_on_a_wrong_relu_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    real = bn_core._forward_value
    # The mask as `y >= 0` instead of threshold_backward's `y > 0`: differs only at exact zeros.
    monkeypatch.setattr(bn_core, "_forward_value", lambda *a: real(*a) + torch.finfo(torch.float32).tiny)
    with pytest.raises(AssertionError, match="grad:x0"):
        _report("batch_norm_relu", ("ties",)).check()


def test_fails_on_welford_statistics(monkeypatch: pytest.MonkeyPatch) -> None:
    def welford(x: torch.Tensor, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
        var, mean = torch.var_mean(x.float(), dim=bn_core._reduce_dims(x.dim()), correction=0)
        return mean, var

    monkeypatch.setitem(bn_core._BY_BACKEND, "reference", dataclasses.replace(bn_core.REFERENCE, stats=welford))
    with pytest.raises(AssertionError, match="over the worst-case bound"):
        _report("batch_norm_relu", ("ties",)).check()


def test_fails_on_a_coefficient_off_by_a_thousandth(monkeypatch: pytest.MonkeyPatch) -> None:
    real = bn_ops.dx_coefficients

    def off(*args, **kwargs):
        a, b, c = real(*args, **kwargs)
        return a * 1.001, b, c

    monkeypatch.setattr(bn_ops, "dx_coefficients", off)
    with pytest.raises(AssertionError, match="grad:x0"):
        _report("batch_norm", ("normal",)).check()
