"""DenseNet transition ``avgpool2(conv1x1(relu(bn(x))))`` as one autograd node saving only x.

Transition (``dense_transition``): BN-ReLU-conv1x1-avgpool(2) as one autograd node that saves
only its input (the block buffer, already saved by the block) and the statistics. It pools
*before* the 1x1 conv: both are linear and the conv acts per pixel, so
``pool(conv1x1(a)) == conv1x1(pool(a))``; pooling first runs the conv on a quarter of the
pixels (4x fewer MACs forward and backward). Results differ from torchvision's order by
rounding only. On the compiled CPU backend (eager calls and torch.compile) BN-ReLU-avgpool is one kernel each way
(``fastblocks::transition_pool_fwd``: one read of x, the pooled quarter written;
``transition_pool_bwd``: the sums, then dx, reading the pool's gradient at its own size) instead
of writing the BN-ReLU output and the pool's full-size gradient (PyTorch's CPU ``avg_pool2d`` and
its backward on an NCHW tensor are also far from copy bandwidth). Traced (torch.compile, export),
the transition is the registered op ``fastblocks::dense_transition`` with
``fastblocks::dense_transition_backward`` (opaque to Inductor, so its backward's recomputation is
not merged with the forward and saved); eager calls run the same functions as an autograd node.

Synchronized BatchNorm: with a norm whose ``process_group`` has several ranks, in training, the
statistics are the global batch's: one all_gather forward, one all-reduce of the two backward
sums (see :mod:`fastblocks.ops.dense_block` and :mod:`fastblocks.ops._bn_core`).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from fastblocks import _backend
from fastblocks.ops._bn_core import (
    COMPILED,
    BatchNormParams,
    check_train_batch,
    dx_coefficients,
    global_stats,
    kernels_for,
    scale_shift,
    sync_group,
    synced_sums,
)
from fastblocks.ops._common import (
    acc_dtype,
    cast_weight,
    check_tensor,
    compute_dtype_of,
    conv_backward,
    eager_path,
    empty0,
    fake_channel_vectors,
    fake_like,
    is_channels_last,
    memory_format,
    no_autocast,
    schemas_defined,
)

_backend.register_op(_backend.OpSpec(name="dense_transition", triton=True, compiled=COMPILED))


def _transition_kernels(device: torch.device) -> bool:
    """Whether the transition's BN-ReLU-avgpool runs as the compiled CPU kernel pair
    (``fastblocks::transition_pool_fwd``/``transition_pool_bwd``; functional, with fake kernels,
    so also under torch.compile, as opaque nodes). Otherwise the backend's BN-ReLU, then
    ``F.avg_pool2d``."""
    return _backend.cpu_kernels(
        "dense_transition", device, "transition_pool_fwd", "transition_pool_bwd", under_compile=True
    )


def _transition_pool(x: torch.Tensor, kern, scale: torch.Tensor, shift: torch.Tensor, cl: bool) -> torch.Tensor:
    """``avg_pool2d(relu(x * scale + shift), 2, 2)``: ``[N, C, H, W] -> [N, C, H // 2, W // 2]``."""
    if _transition_kernels(x.device):
        return torch.ops.fastblocks.transition_pool_fwd.default(x, scale, shift, cl)
    return F.avg_pool2d(kern.apply(x, scale, shift, None, True, cl), 2, 2)


def _transition_forward(x, training: bool, eps: float, weight, bias, conv_weight, running_mean, running_var, group):
    """``(out, mean, var, total)``: the transition's output ``[N, C_out, H // 2, W // 2]``, the
    statistics ``[C]`` (the running ones in eval) and the synchronized count (else ``None``)."""
    cl = is_channels_last(x)
    kern = kernels_for("dense_transition", x.device)
    sd = acc_dtype(x.dtype)
    total = None
    if training:
        mean, var = kern.stats(x, cl)
        if group is not None:
            mean, var, total = global_stats(mean, var, x.numel() // x.shape[1], group)
    else:
        mean, var = running_mean.to(sd), running_var.to(sd)
    scale, shift, _ = scale_shift(mean, var, weight, bias, eps)
    pooled = _transition_pool(x, kern, scale, shift, cl)
    return F.conv2d(pooled, conv_weight), mean, var, total


def _transition_backward(grad_out, x, weight, bias, conv_weight, mean, var, training: bool, eps: float, group, total):
    """``(dx, dweight, dbias, dconv_weight)`` (``None`` for an absent BN parameter), recomputing
    the pooled BN-ReLU from x and the statistics."""
    cl = is_channels_last(x)
    kern = kernels_for("dense_transition", x.device)
    with no_autocast(x.device.type):
        scale, shift, invstd = scale_shift(mean, var, weight, bias, eps)
        pooled = _transition_pool(x, kern, scale, shift, cl)
        dpooled, dconv = conv_backward(grad_out, pooled, conv_weight, 0)
        del pooled
        if group is None and _transition_kernels(x.device):
            # Sums and dx in two passes over x, the pool's gradient read at its own size.
            dx, sum_g, sum_gx = torch.ops.fastblocks.transition_pool_bwd.default(
                dpooled, x, mean, scale, shift, invstd, training, cl
            )
        else:
            # avg_pool2d_backward reads only the shape of `self`: x has it.
            da = torch.ops.aten.avg_pool2d_backward(dpooled, x, [2, 2], [2, 2], [0, 0], False, True, None)
            del dpooled
            sum_g, sum_gx = kern.bwd_reduce(da, x, mean, scale, shift, None, True, cl)
            sums = synced_sums(sum_g, sum_gx, x, group, total)
            a, b, c = dx_coefficients(weight, mean, invstd, *sums, training)
            dx = kern.bwd_apply(da, x, scale, shift, None, a, b, c, True, cl)
    dweight = None if weight is None else (invstd * sum_gx).to(weight.dtype)
    dbias = None if bias is None else sum_g.to(bias.dtype)
    return dx, dweight, dbias, dconv


class _TransitionFunction(torch.autograd.Function):
    """BN-ReLU-avgpool(2)-conv1x1 as one node for eager calls and synchronized statistics; saves x
    and the statistics, recomputes the rest."""

    @staticmethod
    def forward(ctx, x, training: bool, eps: float, weight, bias, conv_weight, running_mean, running_var, group):
        out, mean, var, total = _transition_forward(
            x, training, eps, weight, bias, conv_weight, running_mean, running_var, group
        )
        ctx.training, ctx.eps, ctx.group, ctx.total = training, eps, group, total
        ctx.save_for_backward(x, weight, bias, conv_weight, mean, var)
        ctx.mark_non_differentiable(mean, var)
        if total is not None:
            ctx.mark_non_differentiable(total)
        return out, mean, var, total

    @staticmethod
    def backward(ctx, grad_out, _gm, _gv, _gt):
        x, weight, bias, conv_weight, mean, var = ctx.saved_tensors
        dx, dweight, dbias, dconv = _transition_backward(
            grad_out, x, weight, bias, conv_weight, mean, var, ctx.training, ctx.eps, ctx.group, ctx.total
        )
        return dx, None, None, dweight, dbias, dconv, None, None, None


# Under torch.compile (and other tracing) the transition is a registered op, opaque to Inductor:
# its joint-graph CSE would merge the backward's recomputed BN-ReLU-avgpool with the forward's, and
# the partitioner would then keep the pooled activation.
@torch.library.custom_op("fastblocks::dense_transition", mutates_args=())
def _transition_op(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    conv_weight: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    training: bool,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Registered op: ``(out, mean, var)`` (the running statistics, copied, in eval)."""
    out, mean, var, _ = _transition_forward(
        x, training, eps, weight, bias, conv_weight, running_mean, running_var, None
    )
    if not training:  # outputs may not alias inputs
        mean, var = mean.clone() if mean is running_mean else mean, var.clone() if var is running_var else var
    return out, mean, var


@_transition_op.register_fake
def _(x, weight, bias, conv_weight, running_mean, running_var, training, eps):
    shape = (x.shape[0], conv_weight.shape[0], x.shape[2] // 2, x.shape[3] // 2)
    out = x.new_empty(shape).contiguous(memory_format=memory_format(is_channels_last(x)))
    return out, *fake_channel_vectors(x, 2)


@torch.library.custom_op("fastblocks::dense_transition_backward", mutates_args=())
def _transition_backward_op(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    conv_weight: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    training: bool,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Registered op: ``(dx, dweight, dbias, dconv_weight)``, empty for an absent BN parameter."""
    grads = _transition_backward(grad_out, x, weight, bias, conv_weight, mean, var, training, eps, None, None)
    return tuple(empty0(x) if g is None else g for g in grads)


@_transition_backward_op.register_fake
def _(grad_out, x, weight, bias, conv_weight, mean, var, training, eps):
    def vec(p):
        return empty0(x) if p is None else torch.empty_like(p)

    pooled = x.new_empty((x.shape[0], x.shape[1], x.shape[2] // 2, x.shape[3] // 2))
    pooled = pooled.contiguous(memory_format=memory_format(is_channels_last(x)))
    _, dconv = conv_backward(F.conv2d(pooled, conv_weight), pooled, conv_weight, 0)
    return fake_like(x, is_channels_last(x)), vec(weight), vec(bias), dconv


def _transition_setup_context(ctx, inputs, output) -> None:
    x, weight, bias, conv_weight, _rm, _rv, training, eps = inputs
    _out, mean, var = output
    ctx.training, ctx.eps = training, eps
    ctx.save_for_backward(x, weight, bias, conv_weight, mean, var)


def _transition_autograd(ctx, grad_out, _gm, _gv):
    x, weight, bias, conv_weight, mean, var = ctx.saved_tensors
    dx, dweight, dbias, dconv = _transition_backward_op(
        grad_out, x, weight, bias, conv_weight, mean, var, ctx.training, ctx.eps
    )
    need = ctx.needs_input_grad
    return (
        dx if need[0] else None, dweight if need[1] and weight is not None else None,
        dbias if need[2] and bias is not None else None, dconv if need[3] else None, None, None, None, None,
    )  # fmt: skip


_transition_op.register_autograd(_transition_autograd, setup_context=_transition_setup_context)


def dense_transition_reference(
    x: torch.Tensor, norm: BatchNormParams, conv_weight: torch.Tensor, *, training: bool
) -> torch.Tensor:
    """The specification: torchvision's ``_Transition`` (BN, ReLU, conv1x1, avgpool 2)."""
    factor = norm.step(training)
    h = F.batch_norm(
        x, norm.running_mean, norm.running_var, norm.weight, norm.bias,
        training or norm.running_mean is None, factor, norm.eps,
    )  # fmt: skip
    return F.avg_pool2d(F.conv2d(torch.relu(h), conv_weight), 2, 2)


def dense_transition(
    x: torch.Tensor, norm: BatchNormParams, conv_weight: torch.Tensor, *, training: bool
) -> torch.Tensor:
    """DenseNet transition ``avgpool2(conv1x1(relu(bn(x))))`` saving only x for backward.

    Args:
        x: ``[N, C, H, W]`` (H, W >= 2), NCHW or channels_last; typically a block's buffer.
        norm: the BatchNorm over ``C`` (running buffers updated once in training); with a
            ``process_group`` of several ranks its training statistics are the global batch's
            (one all_gather forward, one all-reduce backward; see the module docstring).
        conv_weight: ``[C_out, C, 1, 1]``.
        training: batch statistics (and running-stat update) or running statistics.

    Returns:
        ``[N, C_out, H // 2, W // 2]`` in x's dtype (the autocast dtype under autocast).
    """
    check_tensor(x, "x", dim=4)
    if norm.num_features not in (None, x.shape[1]):
        raise ValueError(f"norm has {norm.num_features} channels but x has {x.shape[1]}")
    if conv_weight.dim() != 4 or tuple(conv_weight.shape[1:]) != (x.shape[1], 1, 1):
        raise ValueError(f"conv_weight must have shape [C_out, {x.shape[1]}, 1, 1], got {tuple(conv_weight.shape)}")
    if x.shape[2] < 2 or x.shape[3] < 2:
        raise ValueError(
            f"transition: the {x.shape[2]}x{x.shape[3]} feature map is too small for the 2x2 average pool "
            "(the input image is too small for this network)"
        )
    if not training and (norm.running_mean is None or norm.running_var is None):
        raise ValueError("transition norm has no running statistics: eval mode needs them")
    check_train_batch(x.shape, training)
    cd = compute_dtype_of(x)
    w = cast_weight(conv_weight, x, cd, "conv_weight")
    xc = x.to(cd)
    rm, rv = (None, None) if training else (norm.running_mean, norm.running_var)
    group = sync_group([norm], training)
    with no_autocast(x.device.type):
        if group is None and not eager_path(xc):  # traced (torch.compile, ...): the registered op
            out, mean, var = _transition_op(xc, norm.weight, norm.bias, w, rm, rv, training, float(norm.eps))
            total = None
        else:
            out, mean, var, total = _TransitionFunction.apply(
                xc, training, float(norm.eps), norm.weight, norm.bias, w, rm, rv, group
            )
    if training and norm.running_mean is not None:
        norm.update_running(mean, var, x.shape[0] * x.shape[2] * x.shape[3] if total is None else total)
    return out


if schemas_defined("transition_pool_fwd", "transition_pool_bwd"):

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
        return (fake_like(x, channels_last), *fake_channel_vectors(x, 2))
