"""Test utilities shared by the test suite and the benchmarks (also useful to users).

The accuracy rule (from FlashAttention's tests): a fused result in a low-precision dtype is
accepted when its error against a float64 reference is at most ``factor`` times the error of
eager PyTorch in the same dtype, plus a small absolute slack.
"""

from __future__ import annotations

import torch


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b|`` in float64 (NaN where both are NaN count as equal); 0.0 for empty tensors."""
    if a.shape != b.shape:
        raise AssertionError(f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.numel() == 0:
        return 0.0
    a64, b64 = a.detach().double(), b.detach().double()
    both_nan = torch.isnan(a64) & torch.isnan(b64)
    if (torch.isnan(a64) != torch.isnan(b64)).any():
        return float("inf")
    diff = (a64 - b64).abs().masked_fill(both_nan, 0.0)
    return float(diff.max())


def assert_close_to_reference(
    fused: torch.Tensor,
    eager: torch.Tensor,
    reference: torch.Tensor,
    *,
    factor: float = 2.0,
    atol: float = 1e-5,
    name: str = "output",
) -> None:
    """Assert ``err(fused, reference) <= factor * err(eager, reference) + atol``.

    Args:
        fused: result of the fused op in the dtype under test.
        eager: result of eager PyTorch in the same dtype.
        reference: the same computation in float64 (or the highest precision available).
    """
    err_fused = max_abs_err(fused, reference)
    err_eager = max_abs_err(eager, reference)
    bound = factor * err_eager + atol
    if not err_fused <= bound:
        raise AssertionError(
            f"{name}: fused error {err_fused:.3e} exceeds {factor} x eager error {err_eager:.3e} + {atol:.1e}"
        )


def saved_tensor_bytes(fn, *args, exclude=(), **kwargs) -> tuple[object, int]:
    """Run ``fn(*args, **kwargs)`` and count the bytes autograd saves for backward.

    Storages are de-duplicated (a tensor saved twice, or two views of one storage, count once).
    Tensors that are ``args`` themselves are counted too: they are kept alive by the graph.
    Storages of the tensors in ``exclude`` (e.g. ``model.parameters()``, which exist anyway)
    are not counted.

    Returns:
        ``(result, bytes)``.
    """
    storages: dict[int, int] = {}
    skip = {t.untyped_storage().data_ptr() for t in exclude}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            storages[st.data_ptr()] = max(storages.get(st.data_ptr(), 0), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn(*args, **kwargs)
    return result, sum(storages.values())
