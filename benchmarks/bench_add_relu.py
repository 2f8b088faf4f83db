"""Residual add + ReLU: fastblocks ``add_relu`` against eager ``torch.relu(x + y)`` (and compiled).

Run: ``pytest benchmarks/bench_add_relu.py --benchmark-only`` (``--bench-compile`` adds the
torch.compile providers on the CPU). GB/s and the percentage of copy bandwidth are in
``extra_info`` and in ``benchmarks/results/<device-slug>/bench_add_relu.json``.
"""

from __future__ import annotations

import pytest
import torch

from fastblocks.bench.ops import PROVIDERS, default_cases, suite_modes

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = default_cases(DEVICE, ops=["add_relu"])


@pytest.mark.parametrize("mode", suite_modes(DEVICE))
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_add_relu(bench_op, case, provider, mode):
    bench_op(case, provider, mode)
