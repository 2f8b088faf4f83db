"""Whole models, a few SGD steps at identical weights, fused vs eager vs float64 (the harness).

Every model family of the package on the ``cpu`` backend; the ``reference`` backend and
channels_last on one ResNet and one DenseNet. ``FASTBLOCKS_ACCURACY_SWEEP=1`` adds seeds, layouts
and the ``reference`` backend everywhere.
"""

from __future__ import annotations

import os

import pytest

from fastblocks.testing import accuracy
from tests.helpers import skip_unless_available

SWEEP = os.environ.get("FASTBLOCKS_ACCURACY_SWEEP", "0") == "1"

CASES = [(name, "cpu", "nchw") for name in accuracy.MODELS if name != "wide_resnet50_2" or SWEEP]
CASES += [("resnet50", "cpu", "channels_last"), ("densenet121", "cpu", "channels_last")]
CASES += [("resnet18", "reference", "nchw"), ("densenet121", "reference", "channels_last")]
if SWEEP:
    CASES += [(n, b, lay) for n in accuracy.MODELS for b in ("cpu", "reference") for lay in ("nchw", "channels_last")]
    CASES = list(dict.fromkeys(CASES))


@pytest.mark.parametrize(("model", "backend", "layout"), CASES)
def test_model_steps(model: str, backend: str, layout: str) -> None:
    skip_unless_available("batch_norm_act", backend, "cpu")
    setting = accuracy.Setting(backend, channels_last=layout == "channels_last")
    for seed in (0, 1, 2) if SWEEP else (0,):
        report = accuracy.compare_model(model, setting, seed=seed, steps=2)
        assert len({r.trial for r in report.records}) == 3  # two steps and the eval forward
        report.check()
