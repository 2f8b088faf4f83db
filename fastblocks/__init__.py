"""fastblocks: fused building blocks for ResNet and DenseNet training in PyTorch.

``import fastblocks`` works with or without the compiled extension and Triton; what is missing
is reported by ``fastblocks info`` (or :func:`fastblocks.info.report`).
"""

from __future__ import annotations

from fastblocks import (
    _ext,  # noqa: F401  (loads fastblocks._C first, when it was built)
    nn,
    ops,
)
from fastblocks._backend import (
    BACKENDS,
    BackendUnavailableError,
    get_backend,
    set_backend,
    use_backend,
)
from fastblocks.models.convert import convert, export_torch
from fastblocks.nn.fold import fold_bn

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "__version__",
    "convert",
    "export_torch",
    "fold_bn",
    "get_backend",
    "nn",
    "ops",
    "set_backend",
    "use_backend",
]
