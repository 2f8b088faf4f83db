"""Helpers shared by the ops in this package: input checks, layouts, dtypes, autocast, and the
fake kernels' output rules.

Fake (meta) kernels of the compiled ``fastblocks::`` schemas live beside the op that calls them;
they give FakeTensor, torch.compile and ``torch.library.opcheck`` the outputs' shape, dtype and
strides without running anything, and must agree with the real kernels on all three:
per-channel outputs are 1-D ``[C]`` float32 (float64 for float64 x), contiguous
(:func:`fake_channel_vectors`); x-sized outputs have x's shape and dtype, channels_last when the
kernel's ``channels_last`` argument is true, else contiguous (:func:`fake_like`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch

from fastblocks import _backend, _ext

FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(
    t: object,
    name: str,
    *,
    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES,
    dim: int | tuple[int, ...] | None = None,
) -> torch.Tensor:
    """Raise a ``TypeError``/``ValueError`` naming ``name`` unless ``t`` is a fitting tensor."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({allowed}), got {str(t.dtype).replace('torch.', '')}")
    if dim is not None:
        dims = (dim,) if isinstance(dim, int) else dim
        if t.dim() not in dims:
            want = " or ".join(str(d) for d in dims)
            raise ValueError(f"{name} must be {want}-D, got a {t.dim()}-D tensor of shape {tuple(t.shape)}")
    return t


def check_like(t: torch.Tensor, name: str, ref: torch.Tensor, ref_name: str, *, shape: bool = True) -> None:
    """Raise naming ``name`` unless ``t`` matches ``ref`` in device, dtype (and shape)."""
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")
    if t.dtype != ref.dtype:
        raise TypeError(
            f"{name} has dtype {str(t.dtype).replace('torch.', '')} but {ref_name} has "
            f"{str(ref.dtype).replace('torch.', '')}"
        )
    if shape and t.shape != ref.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)} but {ref_name} has shape {tuple(ref.shape)}")


def is_channels_last(t: torch.Tensor) -> bool:
    """True when ``t`` is a 4-D tensor laid out channels_last (and not also plain contiguous)."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def memory_format(channels_last: bool) -> torch.memory_format:
    """``torch.channels_last`` or ``torch.contiguous_format``."""
    return torch.channels_last if channels_last else torch.contiguous_format


def to_layout(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``t`` with exactly the strides ``torch.empty(..., memory_format=...)`` gives (as the fake)."""
    fmt = memory_format(channels_last)
    want = torch.empty(t.shape, device="meta", memory_format=fmt).stride()
    if t.stride() == want:
        return t
    return torch.empty(t.shape, dtype=t.dtype, device=t.device, memory_format=fmt).copy_(t)


def empty0(ref: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The placeholder for an output that was not asked for (custom ops return tensors)."""
    return ref.new_empty((0,), dtype=dtype or ref.dtype)


def flat_in_memory_order(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """The elements of a dense ``t`` as a 1-D tensor in the order they lie in memory."""
    if channels_last:
        return t.permute(0, 2, 3, 1).reshape(-1)
    return t.reshape(-1)


def unflatten_memory_order(flat: torch.Tensor, shape: torch.Size, channels_last: bool) -> torch.Tensor:
    """Inverse of :func:`flat_in_memory_order`: a ``shape`` tensor laid out as requested."""
    if channels_last:
        n, c, h, w = shape
        return flat.view(n, h, w, c).permute(0, 3, 1, 2)
    return flat.view(shape)


def eager_function(
    name: str,
    forward: Callable[..., Any],
    setup_context: Callable[[Any, tuple, Any], None],
    backward: Callable[..., Any],
    *,
    non_differentiable: Callable[[tuple, Any], Sequence[torch.Tensor]] = lambda inputs, output: (),
    materialize_grads: bool = True,
    once_differentiable: bool = True,
) -> type[torch.autograd.Function]:
    """The eager fast path of a registered op, built from the op's own pieces.

    A plain eager call (:func:`eager_path`) skips the custom-op dispatch (argument defaulting,
    redispatch), which costs more Python per call than a small kernel. The returned
    ``torch.autograd.Function`` runs ``forward(*inputs)`` (the op's implementation on the backend
    ``_backend.resolve`` picks), then the op's ``setup_context(ctx, inputs, output)``, marks
    ``non_differentiable(inputs, output)``, and runs ``backward(ctx, *grads)`` under the backend
    its forward was forced to (``_backend.backward_on_forward_backend``). ``once_differentiable``:
    a double backward raises (else ``backward`` must build a differentiable graph, e.g. by calling
    registered ops when grad mode is on). ``materialize_grads=False``: absent gradients reach
    ``backward`` as ``None``.
    """

    def fwd(ctx: Any, *inputs: Any) -> Any:
        output = forward(*inputs)
        setup_context(ctx, inputs, output)
        frozen = non_differentiable(inputs, output)
        if frozen:
            ctx.mark_non_differentiable(*frozen)
        if not materialize_grads:
            ctx.set_materialize_grads(False)
        return output

    bwd = _backend.backward_on_forward_backend(backward)
    if once_differentiable:
        bwd = torch.autograd.function.once_differentiable(bwd)
    doc = f"The eager fast path of ``fastblocks::{name}`` (see :func:`fastblocks.ops._common.eager_function`)."
    return type(
        f"_{name}_eager",
        (torch.autograd.Function,),
        {"forward": staticmethod(fwd), "backward": staticmethod(bwd), "__doc__": doc},
    )


def eager_path(x: torch.Tensor) -> bool:
    """Whether a call on ``x`` may bypass the registered op: plain eager execution, where nothing
    (torch.compile, export, a dispatch or function mode such as FakeTensor or FlopCounterMode,
    functorch transforms, tensor subclasses) needs to see ``fastblocks::`` ops."""
    return (
        type(x) is torch.Tensor
        and x.device.type in ("cpu", "cuda")
        and not torch.compiler.is_compiling()
        and torch._C._len_torch_dispatch_stack() == 0
        and not torch._C._is_torch_function_mode_enabled()
        and not torch._C._are_functorch_transforms_active()
    )


# ----------------------------------------------------------------------------- dtypes
def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of per-channel statistics and of kernel arithmetic: float64 for float64 data,
    else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def channel_vector(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A ``[C]`` vector as the kernels read it: ``dtype``, contiguous."""
    return v.to(dtype).contiguous()


def combine_partials(cnt: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Chan et al.'s combination of per-part ``(count, mean, M2)`` rows ``[P, C]`` -> (mean, biased var) ``[C]``.

    Exact and stable (Chan, Golub & LeVeque 1979), unlike summing Σx and Σx²; used for the
    Triton statistics' per-program partials and for the per-rank statistics of synchronized BN.
    """
    total = cnt.sum(0)
    safe = total.clamp_min(1)
    g_mean = (cnt * mean).sum(0) / safe
    m2_total = m2.sum(0) + (cnt * (mean - g_mean) ** 2).sum(0)
    return g_mean, m2_total / safe


# ----------------------------------------------------------------------------- autocast
def autocasting(x: torch.Tensor) -> bool:
    """Whether autocast is on for x's device."""
    return x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type)


def compute_dtype_of(x: torch.Tensor) -> torch.dtype:
    """Autocast's dtype for x's device when autocast is on (and x is not float64), else x's dtype."""
    if autocasting(x) and x.dtype != torch.float64:
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def cast_weight(w: torch.Tensor, x: torch.Tensor, cd: torch.dtype, name: str) -> torch.Tensor:
    """The conv weight ``w`` in the compute dtype ``cd``: cast under autocast, else it must match
    x's dtype (as ``F.conv2d`` requires); the error names ``name``."""
    if w.dtype == cd:
        return w
    if not autocasting(x):
        raise TypeError(f"{name} has dtype {w.dtype} but x has {x.dtype} (outside autocast they must match)")
    return w.to(cd)


def no_autocast(device_type: str) -> contextlib.AbstractContextManager:
    """A context with autocast off for ``device_type`` (a no-op when it is off already)."""
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def needs_graph(tensors: Sequence[torch.Tensor | None]) -> bool:
    """Whether autograd records a call on ``tensors`` (grad mode on and one of them requires grad)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def conv_backward(
    grad_out: torch.Tensor, inp: torch.Tensor, weight: torch.Tensor, padding: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_input, grad_weight) of ``F.conv2d(inp, weight, padding=padding)`` (stride 1):
    ``[N, C_out, H, W]`` -> ``([N, C_in, H, W], [C_out, C_in, kH, kW])``."""
    gi, gw, _ = torch.ops.aten.convolution_backward(
        grad_out, inp, weight, None, [1, 1], [padding, padding], [1, 1], False, [0, 0], 1, [True, True, False]
    )
    return gi, gw


# ----------------------------------------------------------------------------- fake kernels
def schemas_defined(*names: str) -> bool:
    """Whether the loaded extension defines the ``fastblocks::`` schemas ``names`` (a stale build
    may not): fake kernels are registered only then, so ``import fastblocks`` never fails."""
    return _ext.loaded() and all(hasattr(torch.ops.fastblocks, s) for s in names)


def fake_channel_vectors(x: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """``k`` per-channel outputs of a compiled kernel: ``[C]`` in :func:`acc_dtype`, contiguous."""
    return tuple(x.new_empty((x.shape[1],), dtype=acc_dtype(x.dtype)) for _ in range(k))


def fake_like(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """An x-sized output of a compiled kernel: x's shape and dtype, channels_last when
    ``channels_last`` is true, else contiguous (as the C++ ``at::empty_like`` with that format)."""
    return torch.empty_like(x, memory_format=memory_format(channels_last))
