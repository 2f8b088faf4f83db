"""An op declared in its own module reaches every shared table: the accuracy harness, the op
benchmark and the sm_90 compile check's launcher calls (fastblocks.ops._declarations), with no
edit to those tables. A toy op, declared here for the test only, stands in for a new one."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from fastblocks.bench import ops as op_bench
from fastblocks.ops import _declarations
from fastblocks.testing import accuracy, accuracy_cases

FAST = {"warmup": 1, "min_reps": 2, "min_time_s": 0.0, "max_time_s": 0.2}


def _toy_reference(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    return torch.relu(2.0 * x - r)


def _toy_launch(x: torch.Tensor, r: torch.Tensor, channels_last: bool) -> None:
    """Stands in for a Triton launcher."""


def _toy(fused=_toy_reference) -> _declarations.OpDeclaration:
    def inputs(x: torch.Tensor, g: torch.Generator) -> list[torch.Tensor]:
        return [x, torch.where(torch.rand(x.shape, generator=g, dtype=x.dtype) < 0.2, 2.0 * x, x)]  # exact 0s

    def functions(channels: int, device: torch.device, is_fused: bool):
        return (fused if is_fused else _toy_reference), []

    return _declarations.OpDeclaration(
        "toy",
        bench=_declarations.BenchDeclaration(
            registered="add_relu",
            passes=(3, 2),
            gpu_shapes=((64, 32, 8, 8),),
            cpu_shapes=((2, 4, 5, 5), (1, 3, 2, 2)),
            functions=functions,
        ),
        accuracy=_declarations.AccuracyDeclaration(_toy_reference, fused, inputs),
        sm90_launches=lambda empty, shape, cl: [("fwd", _toy_launch, (empty(shape), empty(shape), cl))],
    )


@pytest.fixture
def declare(monkeypatch: pytest.MonkeyPatch):
    def declare(decl: _declarations.OpDeclaration) -> None:
        monkeypatch.setitem(_declarations._DECLARED, decl.name, decl)

    return declare


def test_the_project_ops_are_declared() -> None:
    decls = _declarations.declared()
    assert list(op_bench.OPS) == [n for n, d in decls.items() if d.bench is not None]
    assert {"add_relu", "bn_relu", "bn_add_relu"} <= set(op_bench.OPS)
    assert "add_relu" in accuracy.CASES and decls["add_relu"].accuracy is not None
    assert decls["add_relu"].sm90_launches is not None


def test_a_declared_op_is_benchmarked(declare) -> None:
    declare(_toy())
    cases = op_bench.default_cases("cpu", ops=["toy"], layouts=(False, True))
    assert [(c.shape, c.channels_last) for c in cases] == [
        ((2, 4, 5, 5), False), ((2, 4, 5, 5), True), ((1, 3, 2, 2), False), ((1, 3, 2, 2), True),
    ]  # fmt: skip
    assert cases[0].nbytes("full") == (3 + 2) * 200 * 4  # 200 fp32 elements, no mask
    preps = [op_bench.prepare(cases[0], p, "cpu") for p in ("eager", "fused")]
    rows = op_bench.run_interleaved(preps, "full", "cpu", timing=FAST)
    assert [(r["name"], r["provider"]) for r in rows] == [("toy", "eager"), ("toy", "fused")]
    assert rows[1]["backend"] == op_bench.fused_backend(cases[0], "cpu")


def test_a_declared_op_is_judged_by_the_accuracy_harness(declare) -> None:
    declare(_toy())
    (case,) = [c for c in accuracy_cases._declared_cases() if c.name == "toy"]
    accuracy.run_case(case, accuracy.Setting("reference"), seeds=(0,)).check()

    declare(_toy(fused=lambda x, r: _toy_reference(x, r) * (1 + 1e-3)))  # 0.1% off: must fail
    (case,) = [c for c in accuracy_cases._declared_cases() if c.name == "toy"]
    with pytest.raises(AssertionError):
        accuracy.run_case(case, accuracy.Setting("reference"), seeds=(0,)).check()


def test_a_declared_op_is_compiled_for_sm90(declare) -> None:
    path = Path(__file__).resolve().parents[1] / "tools" / "sm90_compile.py"
    spec = importlib.util.spec_from_file_location("sm90_compile", path)
    sm90 = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = sm90
    spec.loader.exec_module(sm90)

    class Calls:
        def __init__(self) -> None:
            self.seen: list[tuple[str, object, tuple]] = []

        def call(self, case: str, fn, *args) -> None:
            self.seen.append((case, fn, args))

    declare(_toy())
    rec = Calls()
    sm90.run_launchers(rec, select=lambda group: group == "toy")
    n = len(sm90.ELEMENTWISE_SHAPES) * len(sm90.BN_DTYPES["grid"]) * len(sm90.LAYOUTS)
    assert len(rec.seen) == n and all(fn is _toy_launch for _, fn, _ in rec.seen)
    case, _, (x, _, cl) = rec.seen[-1]
    assert case == "toy fwd [3, 5, 7, 9] fp64 channels_last"
    assert x.dtype == torch.float64 and cl and x.is_contiguous(memory_format=torch.channels_last)
