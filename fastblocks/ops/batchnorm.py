"""Fused BatchNorm: batch statistics, ``act(BN(x) [+ residual])`` forward and backward.

What is fused. Eager ``relu(bn(x) + residual)`` makes four passes over x-sized memory in
forward (stats, normalize, add, relu) and keeps two x-sized tensors for backward (the BN input
and the ReLU output; three with an out-of-place ReLU, which also keeps the BN output). Here:

- forward: one statistics pass (``bn_stats``, fp32 accumulation, numerically stable) and one
  apply pass ``y = act(x * scale + shift [+ residual])`` with per-channel
  ``scale = gamma * invstd`` and ``shift = beta - mean * scale``;
- backward: one reduction pass (``sum g'`` and ``sum g' (x - mean)`` per channel, where ``g'``
  is the incoming gradient masked by the ReLU rebuilt from x and the residual) and one
  elementwise pass for dx;
- saved for backward: x (and the residual when there is a ReLU, which a residual block keeps
  alive anyway), and per-channel vectors. Nothing the forward computed at full size.

Bytes kept for backward per element against eager (fp32, ReLU): eager with an in-place ReLU keeps
the BN input and the ReLU output = 8 B (12 B with an out-of-place ReLU, which also keeps the BN
output); fused keeps x = 4 B (BN+add+ReLU: the same, plus the residual, which the block keeps
anyway).

Backward derivation (x̂ = (x - μ) invstd, y = act(γ x̂ + β), g' = dL/dy masked by the ReLU):
    dβ = Σ g'                                  dγ = Σ g' x̂ = invstd Σ g'(x - μ)
    training:  dx = γ invstd (g' - dβ/M - x̂ dγ/M)
                  = a g' + b x + c  with  a = γ invstd,  b = -γ invstd³ Σg'(x-μ) / M,
                                          c = -a dβ / M - b μ
    eval:      dx = γ invstd g'   (a = γ invstd, b = c = 0)
So every backward is one reduction (``bn_bwd_reduce``) and one affine map (``bn_bwd_apply``).

Four kernel-level functions, implemented by every backend (reference here, Triton here, CPU
and CUDA in ``csrc/``): ``stats``, ``apply``, ``bwd_reduce``, ``bwd_apply``. On top of them,
registered ops with autograd:

- ``fastblocks::batch_norm_act``: the training/eval BatchNorm (+ residual) (+ ReLU), returning
  the batch statistics so the module updates running buffers exactly once per forward;
- ``fastblocks::bn_stats``: per-channel (mean, biased var), differentiable, for layers that
  compute statistics once and normalize several times (dense blocks, conv prologues);
- ``fastblocks::scale_shift_act``: ``act(x * scale + shift [+ residual])`` with gradients for
  x, scale, shift and residual.

Synchronized BatchNorm over ``torch.distributed`` (NCCL or gloo, so it also runs on the CPU)
combines per-rank (count, mean, var) with Chan's parallel formula, and all-reduces the two
per-channel sums in backward.

References: Ioffe & Szegedy 2015 (BatchNorm); Chan, Golub & LeVeque 1979 (pairwise variance);
Triton's layer-norm tutorial for the kernel layout.

Module layout: the kernel table, the formulas (scale/shift, dx coefficients) and the module rules
(batch checks, running statistics, synchronized statistics) are the BatchNorm core,
:mod:`fastblocks.ops._bn_core`, shared with every op that contains a BatchNorm; the Triton kernels
are :mod:`fastblocks.ops._bn_triton`. This module holds the registered ops and their autograd.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fastblocks import _backend
from fastblocks.ops._bn_core import (
    COMPILED,
    all_reduce_pair,
    check_train_batch,
    check_vector,
    dx_coefficients,
    global_stats,
    kernels_for,
    momentum_factor,
    scale_shift,
    update_running_stats,
)
from fastblocks.ops._common import (
    acc_dtype,
    check_like,
    check_tensor,
    eager_function,
    eager_path,
    fake_channel_vectors,
    fake_like,
    is_channels_last,
    memory_format,
    schemas_defined,
)
from fastblocks.ops._declarations import BenchDeclaration, OpDeclaration, declare

for _name in ("batch_norm_act", "bn_stats", "scale_shift_act"):
    _backend.register_op(_backend.OpSpec(name=_name, triton=True, compiled=COMPILED))


def batch_norm_act_reference(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    *,
    training: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
    residual: torch.Tensor | None = None,
    relu: bool = False,
) -> torch.Tensor:
    """The specification: eager ``act(F.batch_norm(x, ...) [+ residual])`` (updates buffers)."""
    y = torch.nn.functional.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    if residual is not None:
        y = y + residual
    return torch.relu(y) if relu else y


def _check_bn_inputs(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    residual: torch.Tensor | None,
    training: bool,
) -> None:
    check_tensor(x, "x", dim=(2, 3, 4))
    for v, name in ((weight, "weight"), (bias, "bias"), (running_mean, "running_mean"), (running_var, "running_var")):
        check_vector(v, name, x)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be given or both be None")
    if not training and running_mean is None:
        raise ValueError("eval mode needs running_mean and running_var (or use training=True)")
    if residual is not None:
        check_tensor(residual, "residual")
        check_like(residual, "residual", x, "x")
    check_train_batch(x.shape, training, allow_empty=True)


# ----------------------------------------------------------------------------- backward ops
# The backward formulas call these registered ops (not the launchers), so autograd graphs stay
# traceable with FakeTensors (torch.compile, AOTAutograd, opcheck).
@torch.library.custom_op("fastblocks::bn_backward_reduce", mutates_args=())
def _bwd_reduce_op(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    residual: torch.Tensor | None,
    relu: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Registered op: per-channel ``(Σ g', Σ g' (x - mean))``, g' = grad_y masked by the ReLU."""
    k = kernels_for("batch_norm_act", x.device)
    return k.bwd_reduce(grad_y, x, mean, scale, shift, residual, relu, is_channels_last(x))


@_bwd_reduce_op.register_fake
def _(grad_y, x, mean, scale, shift, residual, relu):
    cd = acc_dtype(x.dtype)
    return x.new_empty(x.shape[1], dtype=cd), x.new_empty(x.shape[1], dtype=cd)


@torch.library.custom_op("fastblocks::bn_backward_apply", mutates_args=())
def _bwd_apply_op(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    residual: torch.Tensor | None,
    a: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    relu: bool,
) -> torch.Tensor:
    """Registered op: ``dx = a g' + b x + c`` per channel, in x's dtype and layout."""
    k = kernels_for("batch_norm_act", x.device)
    return k.bwd_apply(grad_y, x, scale, shift, residual, a, b, c, relu, is_channels_last(x))


@_bwd_apply_op.register_fake
def _(grad_y, x, scale, shift, residual, a, b, c, relu):
    return torch.empty_like(x, memory_format=memory_format(is_channels_last(x)))


# ----------------------------------------------------------------------------- batch_norm_act
@torch.library.custom_op("fastblocks::batch_norm_act", mutates_args=())
def _batch_norm_act_op(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    residual: torch.Tensor | None,
    training: bool,
    eps: float,
    relu: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Registered op: ``(act(BN(x) [+ residual]), mean, biased var)``; never mutates its inputs."""
    _check_bn_inputs(x, weight, bias, running_mean, running_var, residual, training)
    return _bn_forward_impl(x, weight, bias, running_mean, running_var, residual, training, eps, relu)


def _bn_forward_impl(x, weight, bias, running_mean, running_var, residual, training, eps, relu):
    """The forward of ``batch_norm_act`` on checked inputs (the registered op and the eager path)."""
    cl = is_channels_last(x)
    k = kernels_for("batch_norm_act", x.device)
    cd = acc_dtype(x.dtype)
    if x.numel() == 0:
        # An empty batch, as nn.BatchNorm2d: an empty output, zero gradients, and (the caller
        # skips the update) running buffers left alone. Zero statistics keep invstd finite.
        zeros = torch.zeros(x.shape[1], dtype=cd, device=x.device)
        return torch.empty_like(x, memory_format=memory_format(cl)), zeros, zeros.clone()
    if _one_call(x):  # the registered op (traced graphs) runs the one-call kernels too; no update
        return torch.ops.fastblocks.bn_fused_fwd.default(
            x, weight, bias, running_mean, running_var, residual, training, 0.0, eps, relu, False, cl
        )
    if training:
        mean, var = k.stats(x, cl)
    else:
        mean, var = running_mean.to(cd).clone(), running_var.to(cd).clone()
    scale, shift, _ = scale_shift(mean, var, weight, bias, eps)
    return k.apply(x, scale, shift, residual, relu, cl), mean, var


def _one_call(x: torch.Tensor) -> bool:
    """Whether ``batch_norm_act`` on ``x`` runs the one-call CPU kernels (``bn_fused_fwd`` /
    ``bn_fused_bwd``, which have fake kernels, so traced backward graphs may call them too)."""
    return _backend.cpu_kernels("batch_norm_act", x.device, "bn_fused_fwd", "bn_fused_bwd", under_compile=True)


@_batch_norm_act_op.register_fake
def _(x, weight, bias, running_mean, running_var, residual, training, eps, relu):
    _check_bn_inputs(x, weight, bias, running_mean, running_var, residual, training)
    cd = acc_dtype(x.dtype)
    y = torch.empty_like(x, memory_format=memory_format(is_channels_last(x)))
    return y, x.new_empty(x.shape[1], dtype=cd), x.new_empty(x.shape[1], dtype=cd)


def _bn_setup_context(ctx, inputs, output) -> None:
    _backend.remember(ctx)
    x, weight, bias, _rm, _rv, residual, training, eps, relu = inputs
    _, mean, var = output
    ctx.training, ctx.eps, ctx.relu = training, eps, relu
    ctx.has_weight, ctx.has_bias, ctx.has_res = weight is not None, bias is not None, residual is not None
    ctx.one_call = x.numel() > 0 and _one_call(x)
    # The residual is needed only to rebuild the ReLU mask.
    ctx.save_for_backward(x, weight, bias, residual if relu else None, mean, var)


def _residual_grad(grad_y, x, scale, shift, residual, relu):
    if not relu:
        return grad_y
    one, zero = torch.ones_like(scale), torch.zeros_like(scale)
    # dres = g' (the masked gradient), in the residual's dtype and layout.
    return _bwd_apply_op(grad_y, x, scale, shift, residual, one, zero, zero, relu).to(residual.dtype)


def _bn_backward_impl(ctx, grad_y, reduce: Callable, apply: Callable) -> tuple:
    """The backward of ``batch_norm_act`` given the reduce/apply functions to call."""
    x, weight, bias, residual, mean, var = ctx.saved_tensors
    scale, shift, invstd = scale_shift(mean, var, weight, bias, ctx.eps)
    need = ctx.needs_input_grad
    dres = None
    relu = ctx.relu
    if ctx.has_res and need[5] and relu:
        one, zero = torch.ones_like(scale), torch.zeros_like(scale)
        # dres = g' (the masked gradient), in the residual's dtype and layout. It is also what the
        # BN backward needs: the passes below read g' and x instead of grad_y, x and the
        # residual and rebuilding the mask (9 x-sized reads/writes instead of 11).
        dres = apply(grad_y, x, scale, shift, residual, one, zero, zero, relu).to(residual.dtype)
        grad_y, residual, relu = dres, None, False
    elif ctx.has_res and need[5]:
        dres = grad_y
    sum_g, sum_gx = reduce(grad_y, x, mean, scale, shift, residual, relu)
    a, b, c = dx_coefficients(weight, mean, invstd, sum_g, sum_gx, x.numel() // x.shape[1], ctx.training)
    dx = apply(grad_y, x, scale, shift, residual, a, b, c, relu) if need[0] else None
    dweight = (sum_gx * invstd).to(weight.dtype) if ctx.has_weight and need[1] else None
    dbias = sum_g.to(bias.dtype) if ctx.has_bias and need[2] else None
    return dx, dweight, dbias, None, None, dres, None, None, None


def _fused_backward(ctx, grad_y, need_x: bool, need_weight: bool, need_bias: bool, need_res: bool) -> tuple:
    """``(dx, dweight, dbias, dres)`` of ``batch_norm_act`` in one ``bn_fused_bwd`` call, from what
    :func:`_bn_setup_context` saved (the forward ran ``bn_fused_fwd``); ``None`` where not needed."""
    x, weight, bias, residual, mean, var = ctx.saved_tensors
    need_res = need_res and ctx.has_res
    dx, dweight, dbias, dres = torch.ops.fastblocks.bn_fused_bwd.default(
        grad_y, x, weight, bias, mean, var, residual, ctx.training, ctx.eps, ctx.relu,
        need_x, need_weight, need_bias, need_res, is_channels_last(x),
    )  # fmt: skip
    if need_res and not ctx.relu:
        dres = grad_y
    return dx, dweight, dbias, dres


def _one_call_backward(ctx, grad_y) -> tuple:
    """The registered op's backward in one ``bn_fused_bwd`` call."""
    need = ctx.needs_input_grad
    dx, dweight, dbias, dres = _fused_backward(ctx, grad_y, need[0], need[1], need[2], need[5])
    return dx, dweight, dbias, None, None, dres, None, None, None


@_backend.backward_on_forward_backend
def _bn_backward(ctx, grad_y, _grad_mean, _grad_var):
    if ctx.one_call:
        return _one_call_backward(ctx, grad_y)
    # The registered backward ops (not the kernels), so the backward graph traces.
    return _bn_backward_impl(ctx, grad_y, _bwd_reduce_op, _bwd_apply_op)


def _reduce_direct(grad_y, x, mean, scale, shift, residual, relu):
    k = kernels_for("batch_norm_act", x.device)
    return k.bwd_reduce(grad_y, x, mean, scale, shift, residual, relu, is_channels_last(x))


def _apply_direct(grad_y, x, scale, shift, residual, a, b, c, relu):
    k = kernels_for("batch_norm_act", x.device)
    return k.bwd_apply(grad_y, x, scale, shift, residual, a, b, c, relu, is_channels_last(x))


_BatchNormActFunction = eager_function(
    "batch_norm_act",
    _bn_forward_impl,
    _bn_setup_context,
    lambda ctx, grad_y, _grad_mean, _grad_var: (
        _one_call_backward(ctx, grad_y)
        if ctx.one_call
        else _bn_backward_impl(ctx, grad_y, _reduce_direct, _apply_direct)
    ),
    non_differentiable=lambda inputs, output: output[1:],  # the statistics
)

_batch_norm_act_op.register_autograd(_bn_backward, setup_context=_bn_setup_context)


class _BatchNormActCPUFunction(torch.autograd.Function):
    """``batch_norm_act`` for plain eager calls on the compiled CPU backend: one C++ call per
    direction (``fastblocks::bn_fused_fwd``/``bn_fused_bwd``: the same kernels as
    :class:`_BatchNormActFunction`, the per-channel arithmetic and the running-statistics update as
    loops over C), because around a small activation the dozen per-channel tensor ops cost as
    much as a pass over x. The registered op runs the same two kernels on that backend. The running
    buffers travel in a tuple, out of autograd's view: they are updated in place, as
    ``F.batch_norm`` updates them."""

    @staticmethod
    def forward(ctx, x, weight, bias, buffers, residual, training, factor, eps, relu):
        running_mean, running_var = buffers
        cl = is_channels_last(x)
        update = training and running_mean is not None
        y, mean, var = torch.ops.fastblocks.bn_fused_fwd.default(
            x, weight, bias, running_mean, running_var, residual, training, factor, eps, relu, update, cl
        )
        ctx.training, ctx.eps, ctx.relu = training, eps, relu
        ctx.has_res = residual is not None
        ctx.save_for_backward(x, weight, bias, residual if relu else None, mean, var)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        need = ctx.needs_input_grad
        dx, dweight, dbias, dres = _fused_backward(ctx, grad_y, need[0], need[1], need[2], need[4])
        return dx, dweight, dbias, None, dres, None, None, None, None


if schemas_defined("bn_fused_fwd", "bn_fused_bwd"):

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
        return (fake_like(x, channels_last), *fake_channel_vectors(x, 2))

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
        dx = fake_like(x, channels_last) if need_dx else None
        dweight = (
            torch.empty_like(weight, memory_format=torch.contiguous_format)
            if need_dweight and weight is not None
            else None
        )
        dbias = (
            torch.empty_like(bias, memory_format=torch.contiguous_format) if need_dbias and bias is not None else None
        )
        dres = fake_like(x, channels_last) if need_dres and residual is not None and relu else None
        return dx, dweight, dbias, dres


def batch_norm_act(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    *,
    training: bool = True,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    residual: torch.Tensor | None = None,
    relu: bool = False,
    num_batches_tracked: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused ``act(batch_norm(x) [+ residual])``, a drop-in for ``F.batch_norm`` (+ add) (+ relu).

    Training normalizes with the batch statistics and, when running buffers are given, updates
    them in place exactly once (``running = (1 - m) running + m batch``, with the unbiased
    variance; ``momentum=None`` is the cumulative average over ``num_batches_tracked``, which
    the caller increments). Eval normalizes with the running statistics.

    Args:
        x: ``[N, C, H, W]`` (or ``[N, C]``/``[N, C, L]``), NCHW or channels_last.
        weight, bias: ``[C]`` affine parameters, or ``None``.
        running_mean, running_var: ``[C]`` buffers, or ``None``.
        residual: optional ``[N, C, H, W]`` added after the normalization, before the ReLU.
        relu: apply ReLU at the end.

    Returns:
        ``[N, C, H, W]`` in x's dtype and layout.
    """
    _check_bn_inputs(x, weight, bias, running_mean, running_var, residual, training)
    eager = eager_path(x)
    if eager and x.numel() and _backend.cpu_kernels("batch_norm_act", x.device, "bn_fused_fwd", "bn_fused_bwd"):
        factor = momentum_factor(momentum, num_batches_tracked) if training and running_mean is not None else 0.0
        return _BatchNormActCPUFunction.apply(
            x, weight, bias, (running_mean, running_var), residual, training, factor, eps, relu
        )
    op = _BatchNormActFunction.apply if eager else _batch_norm_act_op
    y, mean, var = op(x, weight, bias, running_mean, running_var, residual, training, eps, relu)
    if training and running_mean is not None and x.numel():
        update_running_stats(
            running_mean, running_var, mean, var, x.numel() // x.shape[1], momentum, num_batches_tracked
        )
    return y


# ----------------------------------------------------------------------------- bn_stats
@torch.library.custom_op("fastblocks::bn_stats", mutates_args=())
def _bn_stats_op(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Registered op: per-channel ``(mean, biased var)`` in fp32 (fp64 for fp64 x)."""
    check_tensor(x, "x", dim=(2, 3, 4))
    if x.numel() == 0:
        raise ValueError(f"bn_stats needs a non-empty x, got shape {tuple(x.shape)}")
    return kernels_for("bn_stats", x.device).stats(x, is_channels_last(x))


@_bn_stats_op.register_fake
def _(x):
    cd = acc_dtype(x.dtype)
    return x.new_empty(x.shape[1], dtype=cd), x.new_empty(x.shape[1], dtype=cd)


def _stats_setup_context(ctx, inputs, output) -> None:
    _backend.remember(ctx)
    ctx.save_for_backward(inputs[0], output[0])


@_backend.backward_on_forward_backend
def _stats_backward(ctx, grad_mean, grad_var):
    # mean = Σx/M, var = Σ(x-μ)²/M  =>  dx = dmean/M + dvar 2(x-μ)/M: an affine map of x.
    x, mean = ctx.saved_tensors
    scale, shift = _stats_backward_coefficients(x, mean, grad_mean, grad_var)
    return _scale_shift_act_op(x, scale, shift, None, False)


def _stats_backward_coefficients(x, mean, grad_mean, grad_var):
    m = x.numel() // x.shape[1]
    gm = torch.zeros_like(mean) if grad_mean is None else grad_mean.to(mean.dtype)
    gv = torch.zeros_like(mean) if grad_var is None else grad_var.to(mean.dtype)
    scale = 2.0 * gv / m
    return scale, gm / m - scale * mean


_bn_stats_op.register_autograd(_stats_backward, setup_context=_stats_setup_context)


def bn_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel batch mean and biased variance, in one numerically stable pass.

    Args:
        x: ``[N, C, H, W]`` (NCHW or channels_last), any floating dtype.

    Returns:
        ``(mean, var)``, each ``[C]`` float32 (float64 for float64 x); differentiable.
    """
    check_tensor(x, "x", dim=(2, 3, 4))
    if eager_path(x):
        if x.numel() == 0:
            raise ValueError(f"bn_stats needs a non-empty x, got shape {tuple(x.shape)}")
        return _BNStatsFunction.apply(x)
    return _bn_stats_op(x)


def _stats_backward_direct(ctx, grad_mean, grad_var):
    x, mean = ctx.saved_tensors
    scale, shift = _stats_backward_coefficients(x, mean, grad_mean, grad_var)
    return kernels_for("scale_shift_act", x.device).apply(x, scale, shift, None, False, is_channels_last(x))


_BNStatsFunction = eager_function(
    "bn_stats",
    lambda x: kernels_for("bn_stats", x.device).stats(x, is_channels_last(x)),
    _stats_setup_context,
    _stats_backward_direct,
)


# ----------------------------------------------------------------------------- scale_shift_act
@torch.library.custom_op("fastblocks::scale_shift_act", mutates_args=())
def _scale_shift_act_op(
    x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, residual: torch.Tensor | None, relu: bool
) -> torch.Tensor:
    """Registered op: ``act(x * scale[c] + shift[c] [+ residual])`` in x's dtype and layout."""
    return kernels_for("scale_shift_act", x.device).apply(x, scale, shift, residual, relu, is_channels_last(x))


@_scale_shift_act_op.register_fake
def _(x, scale, shift, residual, relu):
    return torch.empty_like(x, memory_format=memory_format(is_channels_last(x)))


def _ssa_setup_context(ctx, inputs, output) -> None:
    _backend.remember(ctx)
    x, scale, shift, residual, relu = inputs
    ctx.relu, ctx.has_res = relu, residual is not None
    ctx.save_for_backward(x, scale, shift, residual if relu else None)


@_backend.backward_on_forward_backend
def _ssa_backward(ctx, grad_y):
    x, scale, shift, residual = ctx.saved_tensors
    need = ctx.needs_input_grad
    zero = torch.zeros_like(scale, dtype=acc_dtype(x.dtype))
    dscale = dshift = dx = dres = None
    if need[1] or need[2]:
        sum_g, sum_gx = _bwd_reduce_op(grad_y, x, zero, scale, shift, residual, ctx.relu)
        dscale, dshift = sum_gx.to(scale.dtype), sum_g.to(shift.dtype)
    if need[0]:
        dx = _bwd_apply_op(grad_y, x, scale, shift, residual, scale, zero, zero, ctx.relu)
    if ctx.has_res and need[3]:
        dres = _residual_grad(grad_y, x, scale, shift, residual, ctx.relu)
    return dx, dscale, dshift, dres, None


_scale_shift_act_op.register_autograd(_ssa_backward, setup_context=_ssa_setup_context)


def scale_shift_act(
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    *,
    residual: torch.Tensor | None = None,
    relu: bool = False,
) -> torch.Tensor:
    """``act(x * scale[c] + shift[c] [+ residual])``: BatchNorm's apply step with given statistics.

    Args:
        x: ``[N, C, H, W]`` (NCHW or channels_last).
        scale, shift: ``[C]`` (any floating dtype; used in fp32).
        residual: optional, x's shape, dtype and device.

    Returns:
        ``[N, C, H, W]`` in x's dtype and layout; differentiable w.r.t. every tensor argument.
    """
    check_tensor(x, "x", dim=(2, 3, 4))
    check_vector(scale, "scale", x)
    check_vector(shift, "shift", x)
    if residual is not None:
        check_tensor(residual, "residual")
        check_like(residual, "residual", x, "x")
    return _scale_shift_act_op(x, scale, shift, residual, relu)


# ----------------------------------------------------------------------------- synchronized BN
class _SyncBatchNormAct(torch.autograd.Function):
    """Training-mode BN over a process group: statistics of the global batch.

    Forward: local (count, mean, var) -> all_gather -> Chan's combination (stable, unlike
    all-reducing Σx and Σx²). Backward: all-reduce Σg' and Σg'(x-μ), then the local dx.
    Works with any backend of torch.distributed (NCCL on GPU, gloo on CPU).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, residual, eps, relu, group):
        mean_l, var_l = _bn_stats_op(x)
        # total: the global count, a 0-d tensor on the device (no host synchronization)
        mean, var, total = global_stats(mean_l, var_l, x.numel() // x.shape[1], group)
        scale, shift, _ = scale_shift(mean, var, weight, bias, eps)
        y = _scale_shift_act_op(x, scale, shift, residual, relu)
        ctx.save_for_backward(x, weight, bias, residual if relu else None, mean, var)
        ctx.eps, ctx.relu, ctx.group, ctx.total = eps, relu, group, total
        _backend.remember(ctx)
        ctx.has_res = residual is not None
        ctx.mark_non_differentiable(mean, var)
        ctx.mark_non_differentiable(total)
        return y, mean, var, total

    @staticmethod
    @_backend.backward_on_forward_backend
    def backward(ctx, grad_y, _gm, _gv, _gt):
        x, weight, bias, residual, mean, var = ctx.saved_tensors
        scale, shift, invstd = scale_shift(mean, var, weight, bias, ctx.eps)
        sum_g, sum_gx = _bwd_reduce_op(grad_y, x, mean, scale, shift, residual, ctx.relu)
        # Parameter gradients stay local, as in nn.SyncBatchNorm: DDP all-reduces them itself.
        dweight = None if weight is None else (sum_gx * invstd).to(weight.dtype)
        dbias = None if bias is None else sum_g.to(bias.dtype)
        sum_g, sum_gx = all_reduce_pair(sum_g, sum_gx, ctx.group)
        a, b, c = dx_coefficients(weight, mean, invstd, sum_g, sum_gx, ctx.total, training=True)
        dx = _bwd_apply_op(grad_y, x, scale, shift, residual, a, b, c, ctx.relu)
        dres = _residual_grad(grad_y, x, scale, shift, residual, ctx.relu) if ctx.has_res else None
        return dx, dweight, dbias, dres, None, None, None


def sync_batch_norm_act(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    *,
    process_group: object | None = None,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    residual: torch.Tensor | None = None,
    relu: bool = False,
    num_batches_tracked: torch.Tensor | None = None,
) -> torch.Tensor:
    """Training-mode :func:`batch_norm_act` normalizing over the batch of every rank of ``process_group``.

    Args:
        x: this rank's ``[N_local, C, H, W]``; other arguments as :func:`batch_norm_act`.
        process_group: a ``torch.distributed`` group (default: the world).

    Returns:
        ``[N_local, C, H, W]``; running buffers are updated with the global statistics.
    """
    _check_bn_inputs(x, weight, bias, running_mean, running_var, residual, True)
    y, mean, var, total = _SyncBatchNormAct.apply(x, weight, bias, residual, eps, relu, process_group)
    if running_mean is not None:
        update_running_stats(running_mean, running_var, mean, var, total, momentum, num_batches_tracked)
    return y


# ----------------------------------------------------------------------------- the shared tables
def _bench_functions(residual: bool) -> Callable:
    """``functions(channels, device, fused)`` of the ``bn_relu`` / ``bn_add_relu`` op benchmarks."""

    def functions(channels: int, device: torch.device, fused: bool):
        g = torch.Generator().manual_seed(1)  # non-trivial affine parameters, identical for every provider
        weight = (torch.rand(channels, generator=g) + 0.5).to(device).requires_grad_()
        bias = (torch.randn(channels, generator=g) * 0.1).to(device).requires_grad_()
        mean, var = torch.zeros(channels, device=device), torch.ones(channels, device=device)

        def fused_f(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
            return batch_norm_act(x, weight, bias, mean, var, residual=r if residual else None, relu=True)

        def eager_f(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:  # nn.BatchNorm2d's call, in-place tail
            out = torch.nn.functional.batch_norm(x, mean, var, weight, bias, True, 0.1, 1e-5)
            if residual:
                out += r  # torchvision Bottleneck's tail
            return torch.relu_(out)

        return (fused_f if fused else eager_f), [weight, bias]

    return functions


# ResNet-50 BatchNorm inputs (conv2_x input, conv2_x output, conv5_x output) at batch 256 on GPUs,
# the same activations at batch 8 on the CPU.
_GPU_SHAPES = ((256, 64, 56, 56), (256, 256, 56, 56), (256, 2048, 7, 7))
_CPU_SHAPES = tuple((8, *s[1:]) for s in _GPU_SHAPES)
for _name, _residual, _passes in (("bn_relu", False, (3, 5)), ("bn_add_relu", True, (4, 8))):
    # passes: stats read x, apply read x (and r), write y; reduce read g, x (r), apply read g, x (r), write dx (dr)
    declare(
        OpDeclaration(
            _name,
            bench=BenchDeclaration("batch_norm_act", _passes, _GPU_SHAPES, _CPU_SHAPES, _bench_functions(_residual)),
        )
    )
