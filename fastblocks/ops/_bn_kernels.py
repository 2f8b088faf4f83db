"""Fake (meta) kernels of the compiled BatchNorm schemas ``fastblocks::bn_stats_fwd``,
``bn_apply``, ``bn_bwd_reduce`` and ``bn_bwd_apply`` (csrc/ops.cpp; CPU kernels in
csrc/cpu/batchnorm.cpp, CUDA in csrc/cuda/batchnorm.cu), and of the CPU-only one-call
``bn_fused_fwd``/``bn_fused_bwd`` and the dense block's ``bn_bwd_reduce_add_`` (csrc/cpu/batchnorm.cpp),
the stem's ``stem_pool_fwd``/``stem_pool_bwd`` (csrc/cpu/stem.cpp), the transition's
``transition_pool_fwd``/``transition_pool_bwd`` (csrc/cpu/transition.cpp) and
``dense_layer_fwd_``/``dense_layer_bwd_`` (csrc/cpu/dense_layer.cpp).

They give FakeTensor, torch.compile and ``torch.library.opcheck`` the outputs' shape, dtype and
strides without running anything, and must agree with the real kernels on all three:

- per-channel outputs are 1-D ``[C]`` float32 (float64 when x is float64), contiguous;
- x-sized outputs have x's shape and dtype, laid out channels_last when ``channels_last`` is true,
  else contiguous (``empty_like`` with an explicit memory format, as the C++ ``at::empty_like``).

Registered only when the extension is loaded and defines the schemas (a stale build may not), so
``import fastblocks`` never fails because of them.
"""

from __future__ import annotations

import math

import torch

from fastblocks import _ext
from fastblocks.ops._common import memory_format

_SCHEMAS = ("bn_stats_fwd", "bn_apply", "bn_bwd_reduce", "bn_bwd_apply")


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _channel_vectors(x: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    return tuple(x.new_empty((x.shape[1],), dtype=_acc_dtype(x)) for _ in range(k))


def _like_x(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return torch.empty_like(x, memory_format=memory_format(channels_last))


def _schemas_defined() -> bool:
    return all(hasattr(torch.ops.fastblocks, s) for s in _SCHEMAS)


if _ext.loaded() and _schemas_defined():

    @torch.library.register_fake("fastblocks::bn_stats_fwd")
    def _(x: torch.Tensor, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
        per_channel = x.shape[0] * math.prod(x.shape[2:])
        torch._check(per_channel > 0, lambda: f"fastblocks::bn_stats_fwd: empty batch: x has shape {tuple(x.shape)}")
        return _channel_vectors(x, 2)

    @torch.library.register_fake("fastblocks::bn_apply")
    def _(
        x: torch.Tensor,
        scale: torch.Tensor,
        shift: torch.Tensor,
        residual: torch.Tensor | None,
        relu: bool,
        channels_last: bool,
    ) -> torch.Tensor:
        return _like_x(x, channels_last)

    @torch.library.register_fake("fastblocks::bn_bwd_reduce")
    def _(
        grad_y: torch.Tensor,
        x: torch.Tensor,
        mean: torch.Tensor,
        scale: torch.Tensor,
        shift: torch.Tensor,
        residual: torch.Tensor | None,
        relu: bool,
        channels_last: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return _channel_vectors(x, 2)

    @torch.library.register_fake("fastblocks::bn_bwd_apply")
    def _(
        grad_y: torch.Tensor,
        x: torch.Tensor,
        scale: torch.Tensor,
        shift: torch.Tensor,
        residual: torch.Tensor | None,
        a: torch.Tensor,
        b: torch.Tensor,
        c: torch.Tensor,
        relu: bool,
        channels_last: bool,
    ) -> torch.Tensor:
        return _like_x(x, channels_last)


if _ext.loaded() and all(hasattr(torch.ops.fastblocks, s) for s in ("bn_fused_fwd", "bn_fused_bwd")):

    @torch.library.register_fake("fastblocks::bn_fused_fwd")
    def _(
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None,
        residual: torch.Tensor | None,
        training: bool,
        momentum: float,
        eps: float,
        relu: bool,
        update_running: bool,
        channels_last: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (_like_x(x, channels_last), *_channel_vectors(x, 2))

    @torch.library.register_fake("fastblocks::bn_fused_bwd")
    def _(
        grad_y: torch.Tensor,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        mean: torch.Tensor,
        var: torch.Tensor,
        residual: torch.Tensor | None,
        training: bool,
        eps: float,
        relu: bool,
        need_dx: bool,
        need_dweight: bool,
        need_dbias: bool,
        need_dres: bool,
        channels_last: bool,
    ) -> tuple[torch.Tensor | None, ...]:
        dx = _like_x(x, channels_last) if need_dx else None
        dweight = (
            torch.empty_like(weight, memory_format=torch.contiguous_format)
            if need_dweight and weight is not None
            else None
        )
        dbias = (
            torch.empty_like(bias, memory_format=torch.contiguous_format) if need_dbias and bias is not None else None
        )
        dres = _like_x(x, channels_last) if need_dres and residual is not None and relu else None
        return dx, dweight, dbias, dres


if _ext.loaded() and hasattr(torch.ops.fastblocks, "bn_bwd_reduce_add_"):

    @torch.library.register_fake("fastblocks::bn_bwd_reduce_add_")
    def _(
        acc: torch.Tensor,
        grad_y: torch.Tensor,
        x: torch.Tensor,
        mean: torch.Tensor,
        scale: torch.Tensor,
        shift: torch.Tensor,
        relu: bool,
        channels_last: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return _channel_vectors(x, 2)


def _pool_out(n: int) -> int:
    return (n - 1) // 2 + 1  # 3x3 window, stride 2, padding 1


if _ext.loaded() and all(hasattr(torch.ops.fastblocks, s) for s in ("stem_pool_fwd", "stem_pool_bwd")):

    @torch.library.register_fake("fastblocks::stem_pool_fwd")
    def _(
        x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, channels_last: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        torch._check(x.dim() == 4, lambda: f"fastblocks::stem_pool_fwd: x must be 4-D, got shape {tuple(x.shape)}")
        shape = (x.shape[0], x.shape[1], _pool_out(x.shape[2]), _pool_out(x.shape[3]))
        fmt = memory_format(channels_last)
        out = x.new_empty(shape).contiguous(memory_format=fmt)
        return out, torch.empty_like(out, dtype=torch.int8, memory_format=fmt)

    @torch.library.register_fake("fastblocks::stem_pool_bwd")
    def _(grad_out: torch.Tensor, idx: torch.Tensor, H: int, W: int, channels_last: bool) -> torch.Tensor:
        shape = (grad_out.shape[0], grad_out.shape[1], H, W)
        return grad_out.new_empty(shape).contiguous(memory_format=memory_format(channels_last))


if _ext.loaded() and all(hasattr(torch.ops.fastblocks, s) for s in ("transition_pool_fwd", "transition_pool_bwd")):

    @torch.library.register_fake("fastblocks::transition_pool_fwd")
    def _(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, channels_last: bool) -> torch.Tensor:
        torch._check(
            x.dim() == 4, lambda: f"fastblocks::transition_pool_fwd: x must be 4-D, got shape {tuple(x.shape)}"
        )
        shape = (x.shape[0], x.shape[1], x.shape[2] // 2, x.shape[3] // 2)
        return x.new_empty(shape).contiguous(memory_format=memory_format(channels_last))

    @torch.library.register_fake("fastblocks::transition_pool_bwd")
    def _(
        grad_out: torch.Tensor,
        x: torch.Tensor,
        mean: torch.Tensor,
        scale: torch.Tensor,
        shift: torch.Tensor,
        invstd: torch.Tensor,
        training: bool,
        channels_last: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (_like_x(x, channels_last), *_channel_vectors(x, 2))


if _ext.loaded() and all(hasattr(torch.ops.fastblocks, s) for s in ("dense_layer_fwd_", "dense_layer_bwd_")):

    @torch.library.register_fake("fastblocks::dense_layer_bwd_")
    def _(
        g: torch.Tensor,
        gmu: torch.Tensor,
        gvar: torch.Tensor,
        buf: torch.Tensor,
        mean1: torch.Tensor,
        var1: torch.Tensor,
        mean2: torch.Tensor,
        var2: torch.Tensor,
        weight1: torch.Tensor | None,
        bias1: torch.Tensor | None,
        conv1_weight: torch.Tensor,
        weight2: torch.Tensor | None,
        bias2: torch.Tensor | None,
        conv2_weight: torch.Tensor,
        bottleneck: torch.Tensor | None,
        eps1: float,
        eps2: float,
        ci: int,
        k: int,
        training: bool,
        fold: bool,
        channels_last: bool,
    ) -> tuple[torch.Tensor | None, ...]:
        def like(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else torch.empty_like(t, memory_format=torch.contiguous_format)

        return like(weight1), like(bias1), like(conv1_weight), like(weight2), like(bias2), like(conv2_weight)

    @torch.library.register_fake("fastblocks::dense_layer_fwd_")
    def _(
        buf: torch.Tensor,
        mean1: torch.Tensor,
        var1: torch.Tensor,
        mean2: torch.Tensor,
        var2: torch.Tensor,
        weight1: torch.Tensor | None,
        bias1: torch.Tensor | None,
        conv1_weight: torch.Tensor,
        weight2: torch.Tensor | None,
        bias2: torch.Tensor | None,
        conv2_weight: torch.Tensor,
        eps1: float,
        eps2: float,
        ci: int,
        k: int,
        training: bool,
        chunk_stats: bool,
        keep: bool,
        channels_last: bool,
    ) -> torch.Tensor | None:
        if not keep:
            return None
        shape = (buf.shape[0], conv1_weight.shape[0], buf.shape[2], buf.shape[3])
        return buf.new_empty(shape).contiguous(memory_format=memory_format(channels_last))
