"""Shared settings of the training tests.

Every test here trains tiny models (a few thousand parameters, 8x8 or 16x16 images): one
intra-op thread is as fast as two for such sizes, and far faster when other processes load
the machine (OpenMP threads then wait for each other), so each test runs single-threaded.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

HAS_SKLEARN = importlib.util.find_spec("sklearn") is not None
requires_sklearn = pytest.mark.skipif(
    not HAS_SKLEARN, reason="--data digits needs scikit-learn (pip install 'fastblocks[experiment]')"
)
# The tiny ResNet of these tests: resnet20's layout with 4/8/8 channels (the registry builder's widths).
TINY_RESNET = {"widths": (4, 8, 8)}


@pytest.fixture(autouse=True, scope="package")
def _one_thread():
    # Package scope: set before any module-scoped fixture trains (results depend on the thread count).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
