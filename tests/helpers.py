"""Helpers shared by the tests (the environment is prepared by tests/conftest.py)."""

from __future__ import annotations

import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastblocks import _backend, _ext

HAS_CUDA = torch.cuda.is_available()
REQUIRED = {b.strip() for b in os.environ.get("FASTBLOCKS_REQUIRE_BACKENDS", "").split(",") if b.strip()}

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def devices() -> list[str]:
    """Devices the suite runs on here."""
    return ["cpu", "cuda"] if HAS_CUDA else ["cpu"]


def skip_unless_available(op: str, backend: str, device: str) -> None:
    """Skip (or fail, when CI requires the backend) if ``backend`` cannot run ``op`` here."""
    reason = _backend.unavailable_reason(op, backend, device)
    if reason is None:
        return
    if backend in REQUIRED and device == "cpu":
        pytest.fail(f"backend {backend} is required (FASTBLOCKS_REQUIRE_BACKENDS) but unavailable: {reason}")
    pytest.skip(f"{backend} on {device}: {reason}")


def require_compiled_kernels(*schemas: str, dispatch_key: str = "CPU") -> None:
    """At module level: skip the module unless ``fastblocks._C`` has a ``dispatch_key`` kernel for every
    schema, or fail when CI requires that backend (``FASTBLOCKS_REQUIRE_BACKENDS``)."""
    missing = [s for s in schemas if not _ext.has_kernel(s, dispatch_key)]
    if not missing:
        return
    why = f"fastblocks._C has no {dispatch_key} kernel for {', '.join(missing)}"
    if not _ext.loaded():
        why += f" (the extension did not load: {_ext.load_error()})"
    backend = dispatch_key.lower()
    if backend in REQUIRED:
        pytest.fail(f"backend {backend} is required (FASTBLOCKS_REQUIRE_BACKENDS) but {why}", pytrace=False)
    pytest.skip(why, allow_module_level=True)


def skip_bf16_in_interpreter(backend: str, dtype: torch.dtype, device: str) -> None:
    """The Triton interpreter computes bf16 arithmetic wrongly: bf16 Triton runs need a GPU."""
    if backend == "triton" and dtype == torch.bfloat16 and device == "cpu":
        pytest.skip("Triton interpreter computes bf16 wrongly; bf16 Triton is tested on GPU")


BACKENDS_UNDER_TEST = list(_backend.BACKENDS)


class RecordOps(TorchDispatchMode):
    """Records the names of the ops dispatched while active. Being a dispatch mode, it also turns
    off the ops' eager fast paths (``fastblocks.ops._common.eager_path``): the registered op runs."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.add(str(func))
        return func(*args, **(kwargs or {}))
