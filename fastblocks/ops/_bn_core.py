"""The BatchNorm core: one definition of every BatchNorm formula and rule the ops share.

Every fused op that contains a BatchNorm (``batch_norm_act``, ``bn_relu_conv2d``'s prologue, the
bottleneck tail, the dense block, the transition, the stem) takes from here:

- the kernel table: the four kernel-level functions ``stats``, ``apply``, ``bwd_reduce``,
  ``bwd_apply`` of each backend (:func:`kernels_for`): the reference kernels below (the
  specification), the Triton ones (:mod:`fastblocks.ops._bn_triton`), the compiled CPU/CUDA
  ones (``csrc/cpu/batchnorm.cpp``, ``csrc/cuda/batchnorm.cu``) with their fake kernels;
- the formulas: per-channel scale and shift (:func:`scale_shift`; the C++ one-call kernels use
  the same ATen operations, ``csrc/cpu/bn_kernels.h``), the dx coefficients of
  ``dx = a g' + b x + c`` (:func:`dx_coefficients`, derived in :mod:`fastblocks.ops.batchnorm`),
  the combination of partial statistics (:func:`fastblocks.ops._common.combine_partials`);
- the module rules of ``nn.BatchNorm2d``: the "more than 1 value per channel" check
  (:func:`check_train_batch`), ``num_batches_tracked`` and the momentum factor
  (:func:`momentum_factor`, :meth:`BatchNormParams.step`, :func:`module_step` for modules), the
  running-statistics update with
  the unbiased variance (:func:`update_running_stats`, :meth:`BatchNormParams.update_running`);
- synchronized BatchNorm: the process group of a set of norms (:func:`sync_group`), global
  statistics by one all_gather (:func:`global_stats`), the backward sums summed over the ranks
  (:func:`synced_sums`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fastblocks import _backend
from fastblocks.ops import _bn_triton
from fastblocks.ops._common import (
    acc_dtype,
    channel_vector,
    check_tensor,
    combine_partials,
    fake_channel_vectors,
    fake_like,
    memory_format,
    schemas_defined,
)

COMPILED = ("bn_stats_fwd", "bn_apply", "bn_bwd_reduce", "bn_bwd_apply")
"""The compiled schemas behind the ``cpu``/``cuda`` kernel table (``OpSpec.compiled`` of every BN op)."""


def _per_channel(v: torch.Tensor, ndim: int) -> torch.Tensor:
    return v.view(1, -1, *([1] * (ndim - 2)))


def _reduce_dims(ndim: int) -> list[int]:
    return [0, *range(2, ndim)]


def as_dtype(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``v`` in ``dtype``, without a no-op cast."""
    return v if v.dtype == dtype else v.to(dtype)


# ----------------------------------------------------------------------------- reference kernels
# The specification of the four kernel-level functions (what csrc/ and the Triton kernels
# implement). Arithmetic in fp32 (fp64 for fp64 inputs); per-channel tensors are fp32 [C].


def _stats_reference(x: torch.Tensor, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    # Two passes: the mean as a sum / count, then the mean squared deviation. Not torch.var_mean:
    # its Welford updates round the mean of {-1, 0, 1} data away from an exact 0, so BatchNorm
    # outputs that are exactly 0 (x == mean, beta = 0) became +-1e-9 and flipped ReLU decisions
    # (tests/accuracy, "ties" data: gradients wrong by 100%).
    dims = _reduce_dims(x.dim())
    xc = x.to(acc_dtype(x.dtype))
    mean = xc.mean(dims)
    var = (xc - _per_channel(mean, x.dim())).square().mean(dims)
    return mean, var


def _forward_value(
    x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, residual: torch.Tensor | None
) -> torch.Tensor:
    """``x * scale + shift [+ residual]`` rounded as eager rounds it (once per eager op)."""
    cd = acc_dtype(x.dtype)
    y = (x.to(cd) * _per_channel(scale, x.dim()) + _per_channel(shift, x.dim())).to(x.dtype)
    if residual is not None:
        y = (y.to(cd) + residual.to(cd)).to(x.dtype)
    return y


def _masked_grad(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    residual: torch.Tensor | None,
    relu: bool,
) -> torch.Tensor:
    g = grad_y.to(acc_dtype(x.dtype))
    if not relu:
        return g
    keep = ~(_forward_value(x, scale, shift, residual) <= 0)  # threshold_backward's rule
    return torch.where(keep, g, torch.zeros((), dtype=g.dtype, device=g.device))


def _apply_reference(
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    residual: torch.Tensor | None,
    relu: bool,
    channels_last: bool,
) -> torch.Tensor:
    y = _forward_value(x, scale, shift, residual)
    if relu:
        y = torch.relu(y)
    return y.contiguous(memory_format=memory_format(channels_last))


def _bwd_reduce_reference(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    residual: torch.Tensor | None,
    relu: bool,
    channels_last: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    g = _masked_grad(grad_y, x, scale, shift, residual, relu)
    dims = _reduce_dims(x.dim())
    xc = x.to(g.dtype) - _per_channel(mean.to(g.dtype), x.dim())
    return g.sum(dims), (g * xc).sum(dims)


def _bwd_apply_reference(
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
    g = _masked_grad(grad_y, x, scale, shift, residual, relu)
    nd = x.dim()
    dx = _per_channel(a, nd) * g + _per_channel(b, nd) * x.to(g.dtype) + _per_channel(c, nd)
    return dx.to(x.dtype).contiguous(memory_format=memory_format(channels_last))


# ----------------------------------------------------------------------------- compiled (C++/CUDA)
def _stats_compiled(x: torch.Tensor, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.fastblocks.bn_stats_fwd.default(x, channels_last)


def _apply_compiled(x, scale, shift, residual, relu, channels_last):
    cd = acc_dtype(x.dtype)
    return torch.ops.fastblocks.bn_apply.default(
        x, channel_vector(scale, cd), channel_vector(shift, cd), residual, relu, channels_last
    )


def _bwd_reduce_compiled(grad_y, x, mean, scale, shift, residual, relu, channels_last):
    cd = acc_dtype(x.dtype)
    return torch.ops.fastblocks.bn_bwd_reduce.default(
        grad_y,
        x,
        channel_vector(mean, cd),
        channel_vector(scale, cd),
        channel_vector(shift, cd),
        residual,
        relu,
        channels_last,
    )


def _bwd_apply_compiled(grad_y, x, scale, shift, residual, a, b, c, relu, channels_last):
    cd = acc_dtype(x.dtype)
    return torch.ops.fastblocks.bn_bwd_apply.default(
        grad_y,
        x,
        channel_vector(scale, cd),
        channel_vector(shift, cd),
        residual,
        channel_vector(a, cd),
        channel_vector(b, cd),
        channel_vector(c, cd),
        relu,
        channels_last,
    )


if schemas_defined(*COMPILED):

    @torch.library.register_fake("fastblocks::bn_stats_fwd")
    def _(x: torch.Tensor, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
        per_channel = x.shape[0] * math.prod(x.shape[2:])
        torch._check(per_channel > 0, lambda: f"fastblocks::bn_stats_fwd: empty batch: x has shape {tuple(x.shape)}")
        return fake_channel_vectors(x, 2)

    @torch.library.register_fake("fastblocks::bn_apply")
    def _(
        x: torch.Tensor,
        scale: torch.Tensor,
        shift: torch.Tensor,
        residual: torch.Tensor | None,
        relu: bool,
        channels_last: bool,
    ) -> torch.Tensor:
        return fake_like(x, channels_last)

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
        return fake_channel_vectors(x, 2)

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
        return fake_like(x, channels_last)


# ----------------------------------------------------------------------------- the kernel table
@dataclass(frozen=True)
class Kernels:
    """The four kernel-level functions of one backend (signatures as the reference kernels), and
    where the backend has it, ``bwd_apply_add(out, grad_y, x, scale, shift, a, b, c, relu,
    channels_last)``: ``out += bwd_apply(grad_y, x, scale, shift, None, a, b, c, relu,
    channels_last)`` in one pass (the dense block's norm1 into its gradient buffer)."""

    stats: Callable
    apply: Callable
    bwd_reduce: Callable
    bwd_apply: Callable
    bwd_apply_add: Callable | None = None


REFERENCE = Kernels(_stats_reference, _apply_reference, _bwd_reduce_reference, _bwd_apply_reference)
TRITON = Kernels(
    _bn_triton.stats_triton,
    _bn_triton.apply_triton,
    _bn_triton.bwd_reduce_triton,
    _bn_triton.bwd_apply_triton,
    _bn_triton.bwd_apply_add_triton,
)
COMPILED_KERNELS = Kernels(_stats_compiled, _apply_compiled, _bwd_reduce_compiled, _bwd_apply_compiled)
_BY_BACKEND = {"reference": REFERENCE, "triton": TRITON, "cpu": COMPILED_KERNELS, "cuda": COMPILED_KERNELS}


def kernels_for(op: str, device: torch.device) -> Kernels:
    """The four kernel-level functions of the backend that runs ``op`` on ``device`` now."""
    return _BY_BACKEND[_backend.resolve(op, device)]


# ----------------------------------------------------------------------------- formulas
def scale_shift(
    mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scale, shift, invstd) ``[C]`` in the statistics' dtype: ``invstd = (var + eps)^-1/2``,
    ``scale = weight invstd``, ``shift = bias - mean scale`` (``y = x scale + shift``)."""
    # Few small ops, no no-op casts: on a CPU each costs microseconds of Python per BatchNorm call.
    invstd = (var + eps).rsqrt_()
    scale = invstd if weight is None else as_dtype(weight, var.dtype) * invstd
    shift = -mean * scale if bias is None else torch.addcmul(as_dtype(bias, var.dtype), mean, scale, value=-1)
    return scale, shift, invstd


def dx_coefficients(
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    sum_g: torch.Tensor,
    sum_gx: torch.Tensor,
    count: int | torch.Tensor,
    training: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(a, b, c) ``[C]`` of the BN backward ``dx = a g' + b x + c`` (derived in
    :mod:`fastblocks.ops.batchnorm`): ``a = weight invstd``; training:
    ``b = -a invstd² Σg'(x-μ) / M``, ``c = -a Σg' / M - b μ``; eval: ``b = c = 0``.
    ``count`` is ``M``, the values per channel behind the statistics."""
    gamma = torch.ones_like(invstd) if weight is None else weight.to(invstd.dtype)
    a = gamma * invstd
    if not training:
        return a, torch.zeros_like(a), torch.zeros_like(a)
    b = -gamma * invstd**3 * sum_gx / count
    return a, b, -a * sum_g / count - b * mean


# ----------------------------------------------------------------------------- module rules
def check_train_batch(shape: Sequence[int], training: bool, *, allow_empty: bool = False) -> None:
    """``nn.BatchNorm2d``'s error (same text) for at most one value per channel in training.

    ``shape`` is the normalized tensor's (``[N, C, ...]``); ``allow_empty``: an empty batch passes
    (``batch_norm_act`` returns an empty output, as ``nn.BatchNorm2d``).
    """
    numel = math.prod(shape)
    if training and not (allow_empty and numel == 0) and numel // shape[1] <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(shape)}")


def module_step(
    bn: torch.nn.modules.batchnorm._BatchNorm, shape: Sequence[int] | None
) -> tuple[bool, torch.Tensor | None, torch.Tensor | None]:
    """``nn.BatchNorm2d.forward``'s rules for one fused call on an input of ``shape`` (``[N, C, ...]``).

    Checks the batch (more than one value per channel when batch statistics are used; an empty
    batch passes) unless ``shape`` is None (the op checks it), then increments
    ``num_batches_tracked`` in training when the module tracks running statistics.

    Returns:
        ``(use_batch, running_mean, running_var)``: whether batch statistics normalize (training,
        or no running buffers), and the buffers to read or update (``None`` in training without
        ``track_running_stats``: neither used nor updated).
    """
    use_batch = bn.training or (bn.running_mean is None and bn.running_var is None)
    if shape is not None:
        check_train_batch(shape, use_batch, allow_empty=True)
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
    track = not bn.training or bn.track_running_stats
    return use_batch, (bn.running_mean if track else None), (bn.running_var if track else None)


def check_vector(v: torch.Tensor | None, name: str, x: torch.Tensor) -> None:
    """Raise naming ``name`` unless ``v`` is ``None`` or a ``[C]`` vector on x's device (x ``[N, C, ...]``)."""
    if v is None:
        return
    check_tensor(v, name, dim=1)
    if v.numel() != x.shape[1]:
        raise ValueError(f"{name} has {v.numel()} elements but x has {x.shape[1]} channels")
    if v.device != x.device:
        raise ValueError(f"{name} is on {v.device} but x is on {x.device}")


def momentum_factor(momentum: float | None, num_batches_tracked: torch.Tensor | None) -> float:
    """The running-statistics weight of this batch: ``momentum``, or ``1 / num_batches_tracked``
    (the cumulative average) when ``momentum`` is None, as ``nn.BatchNorm2d``."""
    if momentum is not None:
        return momentum
    if num_batches_tracked is None:
        raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
    return 1.0 / float(num_batches_tracked)


@torch.no_grad()
def update_running_stats(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    count: int | torch.Tensor,
    momentum: float | None,
    num_batches_tracked: torch.Tensor | None = None,
) -> None:
    """Fold batch statistics ``mean``/biased ``var`` ``[C]`` of ``count`` values per channel into the buffers.

    Same rule as ``torch.nn.BatchNorm2d``: the unbiased variance (``var * n / (n - 1)``) is
    stored, and ``momentum=None`` means the cumulative average ``1 / num_batches_tracked``
    (the caller increments it first). A ``count`` tensor (synchronized BN's global count) causes
    no host synchronization.
    """
    factor = momentum_factor(momentum, num_batches_tracked)
    buffers = [running_mean, running_var]
    torch._foreach_mul_(buffers, 1 - factor)
    batch = [as_dtype(mean, running_mean.dtype), as_dtype(var * unbiased_correction(count), running_var.dtype)]
    torch._foreach_add_(buffers, batch, alpha=factor)


def unbiased_correction(count: int | torch.Tensor) -> float | torch.Tensor:
    """``n / (n - 1)``: the biased variance of ``n`` values times this is the unbiased one."""
    if isinstance(count, torch.Tensor):
        return count / (count - 1).clamp_min(1)
    return count / max(count - 1, 1)


@dataclass(frozen=True)
class BatchNormParams:
    """The tensors and settings of one BatchNorm2d (what ``F.batch_norm`` takes).

    Attributes:
        weight, bias: ``[C]`` affine parameters, or ``None`` (``affine=False``).
        running_mean, running_var: ``[C]`` buffers, or ``None`` (``track_running_stats=False``).
        num_batches_tracked: scalar buffer incremented once per training forward, or ``None``.
        momentum: as ``nn.BatchNorm2d`` (``None``: cumulative average).
        eps: added to the variance.
        process_group: a ``torch.distributed`` group: in training, when ``torch.distributed`` is
            initialized and the group has more than one rank, batch statistics are those of the
            batch of every rank of the group (synchronized BatchNorm); ``None``: this process's.
    """

    weight: torch.Tensor | None
    bias: torch.Tensor | None
    running_mean: torch.Tensor | None = None
    running_var: torch.Tensor | None = None
    num_batches_tracked: torch.Tensor | None = None
    momentum: float | None = 0.1
    eps: float = 1e-5
    process_group: object | None = None

    @classmethod
    def from_module(cls, bn: torch.nn.modules.batchnorm._BatchNorm) -> BatchNormParams:
        """The parameters and buffers of ``bn`` (shared, not copied) and its ``process_group``.

        ``process_group`` is set by :func:`fastblocks.nn.convert_sync_batchnorm` on fastblocks
        ``BatchNorm2d`` (``None`` there means local statistics). For ``nn.SyncBatchNorm``,
        ``None`` means the default group, as in its own forward.
        """
        # A plain attribute: read from __dict__, as getattr of a missing one goes through
        # nn.Module.__getattr__'s exception (6 us per BN, 1 ms per DenseNet-201 forward).
        group = vars(bn).get("process_group")
        if group is None and isinstance(bn, torch.nn.SyncBatchNorm) and dist.is_available() and dist.is_initialized():
            group = dist.group.WORLD
        return cls(
            bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked, bn.momentum, bn.eps, group
        )

    @property
    def num_features(self) -> int | None:
        for t in (self.weight, self.bias, self.running_mean, self.running_var):
            if t is not None:
                return t.numel()
        return None

    @torch.no_grad()
    def step(self, training: bool) -> float:
        """The factor ``F.batch_norm`` takes for this call, incrementing ``num_batches_tracked``
        first in training (as ``nn.BatchNorm2d.forward``)."""
        if not (training and self.running_mean is not None and self.num_batches_tracked is not None):
            return 0.0 if self.momentum is None else self.momentum
        self.num_batches_tracked.add_(1)
        return momentum_factor(self.momentum, self.num_batches_tracked)

    def update_running(self, mean: torch.Tensor, var: torch.Tensor, count: int | torch.Tensor) -> None:
        """One training forward's update of the running buffers from the batch's ``mean`` and
        biased ``var`` ``[C]`` (``num_batches_tracked`` first, as ``nn.BatchNorm2d``)."""
        if self.running_mean is None:
            return
        if self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        update_running_stats(
            self.running_mean, self.running_var, mean, var, count, self.momentum, self.num_batches_tracked
        )


# ----------------------------------------------------------------------------- synchronized BN
def sync_group(norms: Sequence[BatchNormParams], training: bool) -> object | None:
    """The process group the batch statistics of ``norms`` are synchronized over, or ``None``.

    ``None`` (local statistics, no collective) unless training with a group of more than one
    rank, as ``fastblocks.nn.BatchNorm2d``. The norms of one fused node share statistics
    (a dense block's chunk statistics feed every later norm1), so they must share one group.
    """
    if not training:
        return None
    group = norms[0].process_group
    for bn in norms[1:]:
        if bn.process_group is not group:
            raise ValueError(
                "the BatchNorms of one fused DenseNet node must share one process_group (their batch "
                "statistics are shared): convert the whole model with fastblocks.nn.convert_sync_batchnorm"
            )
    if group is None or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) <= 1:
        return None
    return group


def global_stats(
    mean: torch.Tensor, var: torch.Tensor, count: int, group: object
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, biased var) ``[C]`` and the total count (0-d) over the batches of every rank of ``group``.

    One ``all_gather`` of each rank's ``[3, C]`` (count, mean, M2 = var count), combined with
    Chan et al.'s formula (:func:`fastblocks.ops._common.combine_partials`): exact and stable,
    unlike all-reducing Σx and Σx². The count stays a tensor: no host synchronization.
    """
    local = torch.stack([torch.full_like(mean, count), mean, var * count])
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group=group)
    parts = torch.stack(gathered, dim=1)  # [3, world, C]
    g_mean, g_var = combine_partials(parts[0], parts[1], parts[2])
    return g_mean, g_var, parts[0, :, 0].sum()


def all_reduce_pair(a: torch.Tensor, b: torch.Tensor, group: object) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Σ_ranks a, Σ_ranks b)`` for two ``[C]`` vectors, in one ``all_reduce``."""
    both = torch.stack([a, b])
    dist.all_reduce(both, group=group)
    return both[0], both[1]


def synced_sums(
    sum_g: torch.Tensor, sum_gx: torch.Tensor, x: torch.Tensor, group: object | None, total: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, int | torch.Tensor]:
    """``(Σg', Σg'(x-mu), M)`` behind a training BN's dx: this rank's (``group`` None), or summed
    over ``group`` with ``total`` the global count. x is the normalized ``[N, C, ...]``.

    The parameter gradients keep the local sums (as ``nn.SyncBatchNorm``: DDP averages them).
    """
    if group is None:
        return sum_g, sum_gx, x.numel() // x.shape[1]
    return (*all_reduce_pair(sum_g, sum_gx, group), total)
