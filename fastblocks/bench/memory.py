"""Memory numbers, each labelled with what it is.

- ``saved_bytes`` (any device): bytes autograd keeps for backward after a forward, counted by
  a saved-tensor hook (storages de-duplicated), as :func:`fastblocks.testing.saved_tensor_bytes`
  does. For models, the parameters are left out (every provider keeps the same weights), so the
  number is the activation memory a training step holds between forward and backward.
- ``peak_bytes`` (CUDA): ``torch.cuda.max_memory_allocated`` during one measured call, reset
  just before it: everything PyTorch's allocator held at the worst moment (weights, inputs,
  gradients, optimizer state and activations included).
- ``max_rss_bytes`` (CPU): the process's peak resident set (``ru_maxrss``); it never goes down,
  so it bounds a whole run, not one measurement.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from fastblocks.bench.timing import synchronize
from fastblocks.testing import saved_tensor_bytes

SAVED = "saved_for_backward"
CUDA_PEAK = "cuda_max_allocated"


def saved_bytes(fn: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> tuple[object, int]:
    """Run ``fn()`` and count the bytes autograd saves for backward, without ``exclude``'s storages.

    Returns:
        ``(result, bytes)``; with nothing to exclude this is
        :func:`fastblocks.testing.saved_tensor_bytes`.
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    if not skip:
        return saved_tensor_bytes(fn)
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            storages[st.data_ptr()] = max(storages.get(st.data_ptr(), 0), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return result, sum(storages.values())


def cuda_peak_bytes(fn: Callable[[], object], device: torch.device | str) -> int:
    """``torch.cuda.max_memory_allocated`` over one call of ``fn`` (peak stats reset before)."""
    device = torch.device(device)
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    return int(torch.cuda.max_memory_allocated(device))


def max_rss_bytes() -> int | None:
    """Peak resident set size of this process in bytes (``None`` where ``resource`` is missing)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Linux
        return None
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
