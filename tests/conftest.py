"""Test configuration.

Without a CUDA device, Triton kernels run in the interpreter: ``TRITON_INTERPRET=1`` must be set
before Triton is first imported, so it is set here, before ``fastblocks`` is imported.
``FASTBLOCKS_REQUIRE_BACKENDS=cpu,triton`` (set by .ci/run) turns a missing backend into a test
failure instead of a skip, so a broken extension build cannot pass CI silently.

CUDA cases (tests/helpers.py: ``devices()``, ``device_backends()``) carry the ``gpu`` marker,
added here at collection: ``pytest -m gpu`` on a GPU machine runs every CUDA case and nothing
else. On a machine without CUDA they are not collected at all (``FASTBLOCKS_TEST_FAKE_CUDA=1``
collects them, skipped, to show what a GPU machine would run). Items that would run the ``cuda``
backend on CPU tensors are deselected everywhere: they could only ever skip.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

import fastblocks
from tests.helpers import FAKE_CUDA, FAKE_CUDA_ENV, cuda_backend_on_cpu, runs_on_cuda


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every item that runs on CUDA with ``gpu`` (see tests/helpers.py: ``runs_on_cuda``), and
    deselect the items that ask for the ``cuda`` backend on CPU tensors: that backend runs CUDA
    tensors only, so they could never run, on any machine."""
    never = [item for item in items if cuda_backend_on_cpu(item)]
    if never:
        config.hook.pytest_deselected(items=never)
        items[:] = [item for item in items if not cuda_backend_on_cpu(item)]
    for item in items:
        if runs_on_cuda(item):
            item.add_marker(pytest.mark.gpu)
            if FAKE_CUDA:
                item.add_marker(pytest.mark.skip(reason=f"{FAKE_CUDA_ENV}=1: collected to be listed, no CUDA here"))


@pytest.fixture(autouse=True)
def _exact_fp32_on_cuda(request: pytest.FixtureRequest):
    """TF32 off for the CUDA cases, restored after each.

    The tests compare fp32 results with eager PyTorch at fp32 tolerances. cuDNN convolutions use
    TF32 by default (``torch.backends.cudnn.allow_tf32``; matmuls do not), and the Triton
    convolution kernels follow that same flag (``fastblocks.ops._bn_relu_conv_triton._input_precision``:
    ``tl.dot(..., input_precision="tf32")`` exactly when it is on), so with it off both sides
    compute in IEEE fp32. CPU cases are left alone.
    """
    if request.node.get_closest_marker("gpu") is None:
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(autouse=True)
def _reset_backend():
    fastblocks.set_backend(None)
    yield
    fastblocks.set_backend(None)
