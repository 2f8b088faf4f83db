"""Optional Triton import: ``triton``/``tl`` are ``None`` when Triton is not installed.

Op modules define their kernels under ``if triton is not None:`` so that ``import fastblocks``
works without Triton. ``TRITON_INTERPRET=1`` must be set before this module is first imported
for the kernels to run in the interpreter (tests do it in ``tests/conftest.py``).
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where Triton is absent
    triton = None
    tl = None

__all__ = ["tl", "triton"]
