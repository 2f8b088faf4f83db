"""Input checks and layout helpers shared by the ops in this package."""

from __future__ import annotations

import torch

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
