"""The ImageNet stem ``maxpool3x3/2(relu(bn(conv7x7/2(x))))`` as one autograd node saving x.

Used by both model families (DenseNet's ``conv0-norm0-relu0-pool0``, ResNet's
``conv1-bn1-relu-maxpool``). Backward recomputes the convolution (about 4% of DenseNet-121's
forward multiply-adds) instead of keeping the conv output, the ReLU output and the max-pool
indices: at 224x224 those are larger than all four dense-block buffers together. On the compiled
CPU backend BN-ReLU-maxpool is one kernel (``fastblocks::stem_pool_fwd``, csrc/cpu/stem.cpp) that
also keeps which of the nine window positions won each output (one byte per pooled output, 1/16
of the conv output's fp32 bytes), so backward routes the gradient with ``stem_pool_bwd`` instead
of recomputing the BN-ReLU and the max-pool; these two kernels have fake kernels and stay in the
graph under torch.compile. Other backends recompute them.

Synchronized BatchNorm: as :mod:`fastblocks.ops.transition` (one all_gather forward, one
all-reduce backward).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from fastblocks import _backend
from fastblocks.ops import _bn_core
from fastblocks.ops._common import (
    acc_dtype,
    cast_weight,
    check_tensor,
    compute_dtype_of,
    eager_path,
    empty0,
    is_channels_last,
    memory_format,
    no_autocast,
    schemas_defined,
)

_backend.register_op(_backend.OpSpec(name="stem", triton=True, compiled=_bn_core.COMPILED))


def _pool_kernels(device: torch.device) -> bool:
    """Whether the stem's BN-ReLU-maxpool runs as the compiled CPU kernel pair (also under
    torch.compile: they have fake kernels); else the backend's BN-ReLU, then ``F.max_pool2d``,
    and backward recomputes both."""
    return _backend.cpu_kernels("stem", device, "stem_pool_fwd", "stem_pool_bwd", under_compile=True)


def _stem_forward(x, training, eps, conv_weight, weight, bias, running_mean, running_var, group):
    """(out, mean, var, total, winners): the pooled output, the statistics ``[C]``, the global count
    (synchronized; else None) and the max-pool's winners (compiled CPU backend; else None)."""
    kern = _bn_core.kernels_for("stem", x.device)
    c = F.conv2d(x, conv_weight, stride=2, padding=3)
    cl = is_channels_last(c)
    sd = acc_dtype(c.dtype)
    total = None
    if training:
        mean, var = kern.stats(c, cl)
        if group is not None:
            mean, var, total = _bn_core.global_stats(mean, var, c.numel() // c.shape[1], group)
    else:
        mean, var = running_mean.to(sd).clone(), running_var.to(sd).clone()
    scale, shift, _ = _bn_core.scale_shift(mean, var, weight, bias, eps)
    if _pool_kernels(c.device):
        # One pass: BN-ReLU-maxpool, keeping which window position won (1 byte per output).
        out, winners = torch.ops.fastblocks.stem_pool_fwd.default(c, scale, shift, cl)
    else:
        out, winners = F.max_pool2d(kern.apply(c, scale, shift, None, True, cl), 3, 2, 1), None
    return out, mean, var, total, winners


def _stem_backward(grad_out, x, conv_weight, weight, bias, mean, var, winners, training, eps, group, total, need):
    """(dx, dconv_weight, dweight, dbias), None where ``need`` (4 flags) is false or the tensor is
    absent; recomputes the convolution (and, without the winners, the BN-ReLU and the pool)."""
    kern = _bn_core.kernels_for("stem", x.device)
    with no_autocast(x.device.type):
        c = F.conv2d(x, conv_weight, stride=2, padding=3)
        cl = is_channels_last(c)
        scale, shift, invstd = _bn_core.scale_shift(mean, var, weight, bias, eps)
        if winners is not None:
            da = torch.ops.fastblocks.stem_pool_bwd.default(grad_out, winners, c.shape[2], c.shape[3], cl)
        else:
            a = kern.apply(c, scale, shift, None, True, cl)
            _, idx = torch.ops.aten.max_pool2d_with_indices(a, [3, 3], [2, 2], [1, 1], [1, 1], False)
            da = torch.ops.aten.max_pool2d_with_indices_backward(
                grad_out, a, [3, 3], [2, 2], [1, 1], [1, 1], False, idx
            )
            del a, idx
        sum_g, sum_gx = kern.bwd_reduce(da, c, mean, scale, shift, None, True, cl)
        sums = _bn_core.synced_sums(sum_g, sum_gx, c, group, total)
        ca, cb, cc = _bn_core.dx_coefficients(weight, mean, invstd, *sums, training)
        dc = kern.bwd_apply(da, c, scale, shift, None, ca, cb, cc, True, cl)
        del da, c
        dx, dconv, _ = torch.ops.aten.convolution_backward(
            dc, x, conv_weight, None, [2, 2], [3, 3], [1, 1], False, [0, 0], 1, [need[0], need[1], False]
        )
    dweight = (invstd * sum_gx).to(weight.dtype) if weight is not None and need[2] else None
    dbias = sum_g.to(bias.dtype) if bias is not None and need[3] else None
    return dx, dconv, dweight, dbias


class _StemFunction(torch.autograd.Function):
    """conv7x7/2-BN-ReLU-maxpool3x3/2 as one node for eager calls and synchronized statistics;
    saves x (the network input), the statistics and, on the compiled CPU backend, the max-pool's
    winning window positions (int8, one per output)."""

    @staticmethod
    def forward(ctx, x, training: bool, eps: float, conv_weight, weight, bias, running_mean, running_var, group):
        out, mean, var, total, winners = _stem_forward(
            x, training, eps, conv_weight, weight, bias, running_mean, running_var, group
        )
        ctx.training, ctx.eps, ctx.group, ctx.total = training, eps, group, total
        ctx.save_for_backward(x, conv_weight, weight, bias, mean, var, winners)
        ctx.mark_non_differentiable(mean, var)
        if total is not None:
            ctx.mark_non_differentiable(total)
        return out, mean, var, total

    @staticmethod
    def backward(ctx, grad_out, _gm, _gv, _gt):
        x, conv_weight, weight, bias, mean, var, winners = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dconv, dweight, dbias = _stem_backward(
            grad_out, x, conv_weight, weight, bias, mean, var, winners, ctx.training, ctx.eps, ctx.group,
            ctx.total, (need[0], need[3], need[4], need[5]),
        )  # fmt: skip
        return dx, None, None, dconv, dweight, dbias, None, None, None


# Under torch.compile (and other tracing) the stem is a registered op, opaque to Inductor: its
# joint-graph CSE would merge the backward's recomputed convolution with the forward's, and the
# partitioner would then keep the convolution's output (the largest activation of the network).
@torch.library.custom_op("fastblocks::stem", mutates_args=())
def _stem_op(
    x: torch.Tensor,
    conv_weight: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    training: bool,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Registered op: ``(out, mean, var, winners)`` (winners empty without the CPU pool kernels)."""
    out, mean, var, _, winners = _stem_forward(
        x, training, eps, conv_weight, weight, bias, running_mean, running_var, None
    )
    return out, mean, var, empty0(x, torch.int8) if winners is None else winners


def _stem_out_shape(x: torch.Tensor, conv_weight: torch.Tensor) -> tuple[int, int, int, int]:
    h1, w1 = _pool_out(x.shape[2]), _pool_out(x.shape[3])  # the conv's output: the same rule at 7x7/2 pad 3
    return x.shape[0], conv_weight.shape[0], _pool_out(h1), _pool_out(w1)


@_stem_op.register_fake
def _(x, conv_weight, weight, bias, running_mean, running_var, training, eps):
    fmt = memory_format(is_channels_last(x))
    out = x.new_empty(_stem_out_shape(x, conv_weight)).contiguous(memory_format=fmt)
    cd = acc_dtype(x.dtype)
    stats = (x.new_empty(conv_weight.shape[0], dtype=cd), x.new_empty(conv_weight.shape[0], dtype=cd))
    if _pool_kernels(x.device):
        return out, *stats, torch.empty_like(out, dtype=torch.int8, memory_format=fmt)
    return out, *stats, empty0(x, torch.int8)


@torch.library.custom_op("fastblocks::stem_backward", mutates_args=())
def _stem_backward_op(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    conv_weight: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    var: torch.Tensor,
    winners: torch.Tensor,
    training: bool,
    eps: float,
    need: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Registered op: ``(dx, dconv_weight, dweight, dbias)``, empty where not needed."""
    grads = _stem_backward(
        grad_out, x, conv_weight, weight, bias, mean, var, winners if winners.numel() else None, training, eps,
        None, None, need,
    )  # fmt: skip
    return tuple(empty0(x) if g is None else g for g in grads)


@_stem_backward_op.register_fake
def _(grad_out, x, conv_weight, weight, bias, mean, var, winners, training, eps, need):
    # dx and dconv_weight as the real op's aten.convolution_backward lays them out.
    c = F.conv2d(x, conv_weight, stride=2, padding=3)
    dx, dconv, _ = torch.ops.aten.convolution_backward(
        torch.empty_like(c), x, conv_weight, None, [2, 2], [3, 3], [1, 1], False, [0, 0], 1, [need[0], need[1], False]
    )
    dweight = torch.empty_like(weight) if weight is not None and need[2] else empty0(x)
    dbias = torch.empty_like(bias) if bias is not None and need[3] else empty0(x)
    return empty0(x) if dx is None else dx, empty0(x) if dconv is None else dconv, dweight, dbias


def _stem_setup_context(ctx, inputs, output) -> None:
    x, conv_weight, weight, bias, _rm, _rv, training, eps = inputs
    _out, mean, var, winners = output
    ctx.training, ctx.eps = training, eps
    ctx.save_for_backward(x, conv_weight, weight, bias, mean, var, winners)


def _stem_autograd(ctx, grad_out, _gm, _gv, _gw):
    x, conv_weight, weight, bias, mean, var, winners = ctx.saved_tensors
    need = [bool(n) for n in ctx.needs_input_grad[:4]]
    grads = _stem_backward_op(grad_out, x, conv_weight, weight, bias, mean, var, winners, ctx.training, ctx.eps, need)
    return (*(g if wanted else None for g, wanted in zip(grads, need)), None, None, None, None)


_stem_op.register_autograd(_stem_autograd, setup_context=_stem_setup_context)


def stem_reference(
    x: torch.Tensor, conv_weight: torch.Tensor, norm: _bn_core.BatchNormParams, *, training: bool
) -> torch.Tensor:
    """The specification: torchvision's stem (conv 7x7/2 pad 3, BN, ReLU, max pool 3x3/2 pad 1)."""
    factor = norm.step(training)
    h = F.batch_norm(
        F.conv2d(x, conv_weight, stride=2, padding=3), norm.running_mean, norm.running_var, norm.weight, norm.bias,
        training or norm.running_mean is None, factor, norm.eps,
    )  # fmt: skip
    return F.max_pool2d(torch.relu(h), 3, 2, 1)


def stem_conv_bn_relu_pool(
    x: torch.Tensor, conv_weight: torch.Tensor, norm: _bn_core.BatchNormParams, *, training: bool
) -> torch.Tensor:
    """ImageNet stem ``maxpool3x3/2(relu(bn(conv7x7/2(x))))`` saving only x (and, on the CPU, the
    max-pool's winners: one byte per output) for backward.

    Backward recomputes the convolution (about 4% of DenseNet-121's forward MACs) instead of
    keeping the conv output, the ReLU output and the max-pool indices: at 224x224 those are
    larger than all four dense-block buffers together. Used by DenseNet; it is ResNet's stem too.
    On the compiled CPU backend, BN-ReLU-maxpool is one kernel (``fastblocks::stem_pool_fwd``)
    that also keeps which of the nine window positions won each output (one byte per pooled
    output, 1/16 of the conv output's fp32 bytes), so backward routes the gradient with
    ``stem_pool_bwd`` instead of recomputing the BN-ReLU and the max-pool. Other backends
    recompute them.

    Args:
        x: ``[N, C_in, H, W]`` (NCHW or channels_last); the network input.
        conv_weight: ``[C, C_in, 7, 7]``.
        norm: the BatchNorm over ``C`` (running buffers updated once in training); synchronized
            over its ``process_group`` as :func:`dense_transition`.
        training: batch statistics (and running-stat update) or running statistics.

    Returns:
        ``[N, C, H', W']`` with ``H1 = (H - 1) // 2 + 1`` and ``H' = (H1 - 1) // 2 + 1``.
    """
    check_tensor(x, "x", dim=4)
    if conv_weight.dim() != 4 or conv_weight.shape[1] != x.shape[1] or tuple(conv_weight.shape[2:]) != (7, 7):
        raise ValueError(f"conv_weight must have shape [C, {x.shape[1]}, 7, 7], got {tuple(conv_weight.shape)}")
    if norm.num_features not in (None, conv_weight.shape[0]):
        raise ValueError(f"norm has {norm.num_features} channels but conv_weight has {conv_weight.shape[0]} outputs")
    if not training and (norm.running_mean is None or norm.running_var is None):
        raise ValueError("stem norm has no running statistics: eval mode needs them")
    h1, w1 = (x.shape[2] - 1) // 2 + 1, (x.shape[3] - 1) // 2 + 1  # the conv's output size
    _bn_core.check_train_batch((x.shape[0], conv_weight.shape[0], h1, w1), training)
    cd = compute_dtype_of(x)
    w = cast_weight(conv_weight, x, cd, "conv_weight")
    xc = x.to(cd)
    rm, rv = (None, None) if training else (norm.running_mean, norm.running_var)
    group = _bn_core.sync_group([norm], training)
    with no_autocast(x.device.type):
        if group is None and not eager_path(xc):  # traced (torch.compile, ...): the registered op
            out, mean, var, _ = _stem_op(xc, w, norm.weight, norm.bias, rm, rv, training, float(norm.eps))
            total = None
        else:
            out, mean, var, total = _StemFunction.apply(
                xc, training, float(norm.eps), w, norm.weight, norm.bias, rm, rv, group
            )
    if training and norm.running_mean is not None:
        norm.update_running(mean, var, x.shape[0] * h1 * w1 if total is None else total)
    return out


def _pool_out(n: int) -> int:
    return (n - 1) // 2 + 1  # 3x3 window, stride 2, padding 1


if schemas_defined("stem_pool_fwd", "stem_pool_bwd"):

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
