"""Test configuration.

Without a CUDA device, Triton kernels run in the interpreter: ``TRITON_INTERPRET=1`` must be set
before Triton is first imported, so it is set here, before ``fastblocks`` is imported.
``FASTBLOCKS_REQUIRE_BACKENDS=cpu,triton`` (set by .ci/run) turns a missing backend into a test
failure instead of a skip, so a broken extension build cannot pass CI silently.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

import fastblocks


@pytest.fixture(autouse=True)
def _reset_backend():
    fastblocks.set_backend(None)
    yield
    fastblocks.set_backend(None)
