"""Every fused op and block against eager PyTorch, judged by float64 (fastblocks.testing.accuracy).

Each case runs on every backend here (``cpu``, ``reference``, and ``triton`` in the interpreter,
fewer trials: it is slow), in NCHW and channels_last, on every input distribution of the harness
(normal, shifted, post-ReLU zeros, sparse, exact ties at the BatchNorm mean) and tiny shapes.
``FASTBLOCKS_ACCURACY_SWEEP=1`` runs more seeds (a few minutes more).
"""

from __future__ import annotations

import os

import pytest

from fastblocks.testing import accuracy
from tests.helpers import skip_unless_available

SWEEP = os.environ.get("FASTBLOCKS_ACCURACY_SWEEP", "0") == "1"
BACKENDS = ["cpu", "reference", "triton"]


def _trials(case: accuracy.Case, backend: str) -> tuple[tuple[int, ...], int | None]:
    """(seeds, limit): the interpreter gets the shortest run that meets every shape and distribution."""
    if SWEEP:
        return (0, 1, 2, 3), None
    if backend == "triton":
        return (0,), max(len(case.data), len(case.shapes))
    return (0, 1), None


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(accuracy.CASES))
def test_case(case: str, backend: str, layout: str) -> None:
    skip_unless_available("batch_norm_act", backend, "cpu")
    c = accuracy.CASES[case]
    seeds, limit = _trials(c, backend)
    setting = accuracy.Setting(backend, channels_last=layout == "channels_last")
    report = accuracy.run_case(c, setting, seeds=seeds, limit=limit)
    assert report.records
    report.check()
