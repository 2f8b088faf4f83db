"""BatchNorm + ReLU (+ residual): fastblocks ``BatchNormReLU2d`` / ``BNAddReLU`` against eager
``nn.BatchNorm2d`` + in-place ReLU (+ in-place add), as torchvision's blocks do (and compiled).

ResNet-50 shapes (64x56x56, 256x56x56, 2048x7x7) at batch 256 in bf16 on GPUs, batch 8 in fp32
on the CPU; NCHW and channels_last. Run: ``pytest benchmarks/bench_batchnorm.py --benchmark-only``.
"""

from __future__ import annotations

import pytest
import torch

from fastblocks.bench.ops import PROVIDERS, default_cases, suite_modes

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = default_cases(DEVICE, ops=["bn_relu", "bn_add_relu"])


@pytest.mark.parametrize("mode", suite_modes(DEVICE))
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_batchnorm(bench_op, case, provider, mode):
    bench_op(case, provider, mode)
