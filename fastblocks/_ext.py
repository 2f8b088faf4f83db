"""Loading of the optional compiled extension ``fastblocks._C``.

``import fastblocks`` never fails because the extension is missing or broken: the reason is
kept here and reported by ``fastblocks info`` and by the errors of the ``cpu``/``cuda`` backends.
"""

from __future__ import annotations

import functools

import torch

_C = None
_load_error: str | None = None

try:
    from fastblocks import _C
except Exception as exc:  # ImportError, or an OSError/undefined symbol from a stale build
    _load_error = f"{type(exc).__name__}: {exc}"


def loaded() -> bool:
    """Whether ``fastblocks._C`` imported."""
    return _C is not None


def load_error() -> str | None:
    """Why the extension did not load (``None`` when it did)."""
    return _load_error


def built_with_cuda() -> bool:
    """Whether the loaded extension contains the CUDA kernels."""
    return _C is not None and bool(_C.built_with_cuda())


def cpu_capability() -> str | None:
    """Vector ISA the CPU kernels were compiled for, or ``None`` without the extension."""
    return None if _C is None else str(_C.cpu_capability())


@functools.cache
def has_kernel(schema: str, dispatch_key: str) -> bool:
    """Whether ``fastblocks::<schema>`` has a compiled kernel for ``dispatch_key`` ("CPU"/"CUDA")."""
    if _C is None:
        return False
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"fastblocks::{schema}", dispatch_key))
    except RuntimeError:
        return False
