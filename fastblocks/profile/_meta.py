"""Fast paths for running models on the meta device (shapes only, nothing allocated).

The meta kernels of batch norm, of pointwise ops and of the random initialisers are Python
decompositions (0.1-15 ms a call); building DenseNet-201 on meta and running its training step
calls them thousands of times. :func:`fast_meta` returns what those kernels return without
running them, for the cases where the answer is unambiguous, and ``NotImplemented`` otherwise;
:class:`MetaInit` applies it (and skips in-place initialisers, which do nothing on meta).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["MetaInit", "fast_meta"]


def _dense(t: torch.Tensor) -> bool:
    return t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))


def _elementwise_meta(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Output of a pointwise op on meta tensors when its layout is unambiguous, else ``NotImplemented``.

    Unambiguous: the operands of the full (broadcast) shape have identical strides (dense, or
    with distinct strides and sizes), and every other operand is a Python scalar, a 0-d tensor
    or a vector along one dimension (``[C, 1, 1]``): TensorIterator then lays the output out
    densely in the full operands' dimension order, in ``torch.result_type``'s dtype.
    """
    if kwargs.keys() - {"alpha"}:
        return NotImplemented
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if not tensors or not all(t.is_meta for t in tensors):
        return NotImplemented
    shape = torch.broadcast_shapes(*(t.shape for t in tensors))
    full = [t for t in tensors if t.shape == shape]
    if not full or any(t.stride() != full[0].stride() for t in full):
        return NotImplemented
    strides = full[0].stride()
    if not _dense(full[0]):
        # e.g. channel slices of a concatenation's gradient: the output is dense, its dimensions
        # in the order of the operands' strides (unambiguous when strides and sizes are distinct).
        if len(set(strides)) != len(strides) or min(shape, default=0) < 2:
            return NotImplemented
        dense, step = [0] * len(shape), 1
        for d in sorted(range(len(shape)), key=lambda d: strides[d]):
            dense[d], step = step, step * shape[d]
        strides = tuple(dense)
    if any(t.shape != shape and t.dim() > 0 and t.numel() != max(t.shape) for t in tensors):
        return NotImplemented
    values = list(args[1:]) if func is torch.ops.aten.where.self else list(args)
    if func in _COMPARE:
        dtype = torch.bool
    else:
        if not all(isinstance(v, (int, float, bool, torch.Tensor)) for v in values):
            return NotImplemented
        if any(
            isinstance(v, torch.Tensor) and not v.is_floating_point()
            for v in values
            if func is not torch.ops.aten.bitwise_not.default
        ):
            return NotImplemented
        dtype = values[0].dtype if len(values) == 1 else torch.result_type(*values[:2])
    return full[0].new_empty_strided(shape, strides, dtype=dtype)


_aten = torch.ops.aten
_POINTWISE = {
    _aten.add.Tensor, _aten.sub.Tensor, _aten.mul.Tensor, _aten.div.Tensor, _aten.threshold_backward.default,
    _aten.where.self, _aten.relu.default, _aten.rsqrt.default, _aten.neg.default, _aten.bitwise_not.default,
    _aten.le.Scalar, _aten.lt.Scalar, _aten.ge.Scalar, _aten.gt.Scalar,
}  # fmt: skip
_COMPARE = {_aten.le.Scalar, _aten.lt.Scalar, _aten.ge.Scalar, _aten.gt.Scalar}


def fast_meta(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Outputs of a few hot ops on meta tensors without their Python meta kernels, or ``NotImplemented``.

    The meta kernels of batch norm and of pointwise ops are Python decompositions (0.1-15 ms
    a call) and DenseNet-201's step calls them thousands of times. These shortcuts return what
    those kernels return (shape, dtype, strides, ``None`` for masked-out gradients: checked
    op by op by tests/profile/test_memory.py::test_fast_meta_matches_meta_kernels) and fall
    back to the kernel otherwise.
    """
    if func in _POINTWISE:
        return _elementwise_meta(func, args, kwargs)
    if func is _aten.relu_.default and isinstance(args[0], torch.Tensor) and args[0].is_meta:
        return args[0]
    if func is _aten.native_batch_norm.default and not kwargs and len(args) == 8 and args[5]:
        x = args[0]
        if not (isinstance(x, torch.Tensor) and x.is_meta and x.dim() >= 2 and _dense(x)):
            return NotImplemented
        sd = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        c = x.shape[1]
        return torch.empty_like(x), x.new_empty((c,), dtype=sd), x.new_empty((c,), dtype=sd)
    if func is _aten.native_batch_norm_backward.default and not kwargs and len(args) == 10:
        g, x, w, mask = args[0], args[1], args[2], args[9]
        ok = isinstance(g, torch.Tensor) and g.is_meta and _dense(g) and g.stride() == x.stride()
        if not ok or w is None:
            return NotImplemented
        return (
            torch.empty_like(g) if mask[0] else None,
            torch.empty_like(w) if mask[1] else None,
            torch.empty_like(w) if mask[2] else None,
        )
    return NotImplemented


# In-place initialisers: on meta tensors they have nothing to write.
_INIT = {_aten.normal_.default, _aten.uniform_.default, _aten.fill_.Scalar, _aten.zero_.default}


class MetaInit(TorchDispatchMode):
    """Dispatch mode for meta-device builds and forwards: :func:`fast_meta` shortcuts, no-op initialisers."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _INIT and isinstance(args[0], torch.Tensor) and args[0].is_meta:
            return args[0]
        out = fast_meta(func, args, kwargs)
        return func(*args, **kwargs) if out is NotImplemented else out
