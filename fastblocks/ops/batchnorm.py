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
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fastblocks import _backend, _ext
from fastblocks.ops._common import check_like, check_tensor, eager_path, is_channels_last, memory_format
from fastblocks.ops._triton import tl, triton

_COMPILED = ("bn_stats_fwd", "bn_apply", "bn_bwd_reduce", "bn_bwd_apply")
for _name in ("batch_norm_act", "bn_stats", "scale_shift_act"):
    _backend.register_op(_backend.OpSpec(name=_name, triton=True, compiled=_COMPILED))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _per_channel(v: torch.Tensor, ndim: int) -> torch.Tensor:
    return v.view(1, -1, *([1] * (ndim - 2)))


def _reduce_dims(ndim: int) -> list[int]:
    return [0, *range(2, ndim)]


# ----------------------------------------------------------------------------- reference kernels
# The specification of the four kernel-level functions (what csrc/ and the Triton kernels
# implement). Arithmetic in fp32 (fp64 for fp64 inputs); per-channel tensors are fp32 [C].


def _stats_reference(x: torch.Tensor, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    # Two passes: the mean as a sum / count, then the mean squared deviation. Not torch.var_mean:
    # its Welford updates round the mean of {-1, 0, 1} data away from an exact 0, so BatchNorm
    # outputs that are exactly 0 (x == mean, beta = 0) became +-1e-9 and flipped ReLU decisions
    # (tests/accuracy, "ties" data: gradients wrong by 100%).
    dims = _reduce_dims(x.dim())
    xc = x.to(_compute_dtype(x.dtype))
    mean = xc.mean(dims)
    var = (xc - _per_channel(mean, x.dim())).square().mean(dims)
    return mean, var


def _forward_value(
    x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, residual: torch.Tensor | None
) -> torch.Tensor:
    """``x * scale + shift [+ residual]`` rounded as eager rounds it (once per eager op)."""
    cd = _compute_dtype(x.dtype)
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
    g = grad_y.to(_compute_dtype(x.dtype))
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


# ----------------------------------------------------------------------------- Triton kernels
# x-sized tensors are addressed as [N, C, HW] through three strides, so one kernel serves NCHW
# (s_c = HW, s_hw = 1) and channels_last (s_c = 1, s_hw = C). Programs tile (pixels, channels);
# reductions write per-program partials [programs_m, C] that are combined in PyTorch.
if triton is not None:

    @triton.jit
    def _tile(
        pid_m,
        pid_c,
        M,  # N * HW: elements per channel
        C,  # channels
        HW,  # pixels per image
        s_n,  # stride of the batch dimension (elements)
        s_c,  # stride of the channel dimension
        s_hw,  # stride of the (flattened) spatial dimension
        BLOCK_M: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        n = rows // HW
        hw = rows % HW
        offs = n[:, None] * s_n + hw[:, None] * s_hw + cols[None, :].to(tl.int64) * s_c
        mask = (rows[:, None] < M) & (cols[None, :] < C)
        return offs, mask, cols

    @triton.jit
    def _value(x, scale, shift, r_ptr, offs, mask, HAS_RES: tl.constexpr, COMPUTE: tl.constexpr):
        # x * scale + shift [+ residual], rounded to the storage dtype as eager rounds it. One
        # explicit fused multiply-add (as the CPU and CUDA kernels): left to the compiler, the
        # contraction may differ between the forward and the backward kernel, and the backward's
        # ReLU mask must be rebuilt from bit-identical values.
        y = tl.fma(x.to(COMPUTE), scale[None, :], shift[None, :]).to(x.dtype)
        if HAS_RES:
            r = tl.load(r_ptr + offs, mask=mask, other=0.0)
            y = (y.to(COMPUTE) + r.to(COMPUTE)).to(x.dtype)
        return y

    @triton.jit
    def _bn_stats_kernel(
        x_ptr,  # *T [N, C, HW] (strided): input
        part_ptr,  # *COMPUTE [3, programs_m, C]: per-program count, mean, M2 (sum of squared deviations)
        M,
        C,
        HW,
        s_n,
        s_c,
        s_hw,
        COMPUTE: tl.constexpr,  # accumulation dtype (fp32, fp64 for fp64 input)
        BLOCK_M: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_c = tl.program_id(1)
        offs, mask, cols = _tile(pid_m, pid_c, M, C, HW, s_n, s_c, s_hw, BLOCK_M, BLOCK_C)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
        cnt = tl.sum(mask.to(COMPUTE), axis=0)
        mean = tl.sum(x, axis=0) / tl.maximum(cnt, 1.0)
        # Deviations from the tile's own mean: the two-level scheme that keeps large-mean inputs
        # (e.g. 1e3 + N(0, 1)) exact where a plain sum of squares would cancel.
        d = tl.where(mask, x - mean[None, :], 0.0)
        m2 = tl.sum(d * d, axis=0)
        n_prog = tl.num_programs(0)
        cmask = cols < C
        base = pid_m.to(tl.int64) * C + cols
        tl.store(part_ptr + base, cnt, mask=cmask)
        tl.store(part_ptr + n_prog * C + base, mean, mask=cmask)
        tl.store(part_ptr + 2 * n_prog * C + base, m2, mask=cmask)

    @triton.jit
    def _bn_apply_kernel(
        x_ptr,  # *T [N, C, HW] (strided): input
        scale_ptr,  # *COMPUTE [C]
        shift_ptr,  # *COMPUTE [C]
        r_ptr,  # *T, same layout as x: residual (ignored unless HAS_RES)
        y_ptr,  # *T, same layout as x: act(x * scale + shift [+ r])
        M,
        C,
        HW,
        s_n,
        s_c,
        s_hw,
        HAS_RES: tl.constexpr,
        RELU: tl.constexpr,
        COMPUTE: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        offs, mask, cols = _tile(tl.program_id(0), tl.program_id(1), M, C, HW, s_n, s_c, s_hw, BLOCK_M, BLOCK_C)
        scale = tl.load(scale_ptr + cols, mask=cols < C, other=0.0).to(COMPUTE)
        shift = tl.load(shift_ptr + cols, mask=cols < C, other=0.0).to(COMPUTE)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        y = _value(x, scale, shift, r_ptr, offs, mask, HAS_RES, COMPUTE)
        if RELU:
            y = tl.where(y <= 0.0, 0.0, y).to(x.dtype)  # NaN passes, as torch.relu
        tl.store(y_ptr + offs, y, mask=mask)

    @triton.jit
    def _masked_grad_tile(
        g_ptr, x, scale, shift, r_ptr, offs, mask, HAS_RES: tl.constexpr, RELU: tl.constexpr, COMPUTE: tl.constexpr
    ):
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
        if RELU:
            y = _value(x, scale, shift, r_ptr, offs, mask, HAS_RES, COMPUTE)
            g = tl.where(y <= 0.0, 0.0, g)  # threshold_backward's rule: NaN passes
        return tl.where(mask, g, 0.0)

    @triton.jit
    def _bn_bwd_reduce_kernel(
        g_ptr,  # *T, same layout as x: dL/dy
        x_ptr,  # *T [N, C, HW] (strided): forward input
        mean_ptr,  # *COMPUTE [C]
        scale_ptr,  # *COMPUTE [C]
        shift_ptr,  # *COMPUTE [C]
        r_ptr,  # *T residual (ignored unless HAS_RES)
        part_ptr,  # *COMPUTE [2, programs_m, C]: partial Σ g' and Σ g' (x - mean)
        M,
        C,
        HW,
        s_n,
        s_c,
        s_hw,
        HAS_RES: tl.constexpr,
        RELU: tl.constexpr,
        COMPUTE: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        offs, mask, cols = _tile(pid_m, tl.program_id(1), M, C, HW, s_n, s_c, s_hw, BLOCK_M, BLOCK_C)
        cmask = cols < C
        scale = tl.load(scale_ptr + cols, mask=cmask, other=0.0).to(COMPUTE)
        shift = tl.load(shift_ptr + cols, mask=cmask, other=0.0).to(COMPUTE)
        mean = tl.load(mean_ptr + cols, mask=cmask, other=0.0).to(COMPUTE)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        g = _masked_grad_tile(g_ptr, x, scale, shift, r_ptr, offs, mask, HAS_RES, RELU, COMPUTE)
        xc = tl.where(mask, x.to(COMPUTE) - mean[None, :], 0.0)
        base = pid_m.to(tl.int64) * C + cols
        tl.store(part_ptr + base, tl.sum(g, axis=0), mask=cmask)
        tl.store(part_ptr + tl.num_programs(0) * C + base, tl.sum(g * xc, axis=0), mask=cmask)

    @triton.jit
    def _bn_bwd_apply_kernel(
        g_ptr,  # *T, same layout as x: dL/dy
        x_ptr,  # *T [N, C, HW] (strided): forward input
        scale_ptr,  # *COMPUTE [C]
        shift_ptr,  # *COMPUTE [C]
        r_ptr,  # *T residual (ignored unless HAS_RES)
        a_ptr,  # *COMPUTE [C]: dx = a g' + b x + c
        b_ptr,  # *COMPUTE [C]
        c_ptr,  # *COMPUTE [C]
        dx_ptr,  # *T, same layout as x
        M,
        C,
        HW,
        s_n,
        s_c,
        s_hw,
        HAS_RES: tl.constexpr,
        RELU: tl.constexpr,
        COMPUTE: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        offs, mask, cols = _tile(tl.program_id(0), tl.program_id(1), M, C, HW, s_n, s_c, s_hw, BLOCK_M, BLOCK_C)
        cmask = cols < C
        scale = tl.load(scale_ptr + cols, mask=cmask, other=0.0).to(COMPUTE)
        shift = tl.load(shift_ptr + cols, mask=cmask, other=0.0).to(COMPUTE)
        a = tl.load(a_ptr + cols, mask=cmask, other=0.0).to(COMPUTE)
        b = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(COMPUTE)
        c = tl.load(c_ptr + cols, mask=cmask, other=0.0).to(COMPUTE)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        g = _masked_grad_tile(g_ptr, x, scale, shift, r_ptr, offs, mask, HAS_RES, RELU, COMPUTE)
        dx = a[None, :] * g + b[None, :] * x.to(COMPUTE) + c[None, :]
        tl.store(dx_ptr + offs, dx.to(x.dtype), mask=mask)


def _geometry(x: torch.Tensor) -> tuple[int, int, int, int, int, int]:
    """(M, C, HW, s_n, s_c, s_hw) of a dense 4-D (or 2-D/3-D) x."""
    n, c = x.shape[0], x.shape[1]
    hw = math.prod(x.shape[2:])
    if x.dim() == 4 and is_channels_last(x):
        return n * hw, c, hw, x.stride(0), 1, c
    return n * hw, c, hw, c * hw, hw, 1


def _blocks(x: torch.Tensor, channels_last: bool) -> tuple[int, int]:
    # Wide channel tiles when channels are contiguous in memory, tall pixel tiles otherwise; 4096
    # elements per program (2048 in fp64: with 4096, the backward kernels spilled on sm_90).
    c = x.shape[1]
    block_c = min(64, triton.next_power_of_2(c)) if channels_last else min(16, triton.next_power_of_2(c))
    block_m = max(16, (2048 if x.dtype == torch.float64 else 4096) // block_c)
    return block_m, block_c


def _prepare(x: torch.Tensor, channels_last: bool, *others: torch.Tensor | None) -> list[torch.Tensor | None]:
    fmt = memory_format(channels_last)
    return [None if t is None else t.contiguous(memory_format=fmt) for t in (x, *others)]


def _vec(v: torch.Tensor, cd: torch.dtype) -> torch.Tensor:
    return v.to(cd).contiguous()


def _stats_triton(x: torch.Tensor, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    (xc,) = _prepare(x, channels_last)
    cd = _compute_dtype(x.dtype)
    M, C, HW, s_n, s_c, s_hw = _geometry(xc)
    bm, bc = _blocks(xc, channels_last)
    grid = (triton.cdiv(M, bm), triton.cdiv(C, bc))
    part = torch.empty((3, grid[0], C), dtype=cd, device=x.device)
    tl_cd = tl.float64 if cd == torch.float64 else tl.float32
    _bn_stats_kernel[grid](xc, part, M, C, HW, s_n, s_c, s_hw, COMPUTE=tl_cd, BLOCK_M=bm, BLOCK_C=bc)
    return _combine_partials(part[0], part[1], part[2])


def _combine_partials(cnt: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Chan et al.'s combination of per-part (count, mean, M2) rows [P, C] -> (mean, biased var) [C]."""
    total = cnt.sum(0)
    safe = total.clamp_min(1)
    g_mean = (cnt * mean).sum(0) / safe
    m2_total = m2.sum(0) + (cnt * (mean - g_mean) ** 2).sum(0)
    return g_mean, m2_total / safe


def _apply_triton(
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    residual: torch.Tensor | None,
    relu: bool,
    channels_last: bool,
) -> torch.Tensor:
    xc, rc = _prepare(x, channels_last, residual)
    y = torch.empty_like(xc)
    if xc.numel() == 0:
        return y
    cd = _compute_dtype(x.dtype)
    M, C, HW, s_n, s_c, s_hw = _geometry(xc)
    bm, bc = _blocks(xc, channels_last)
    grid = (triton.cdiv(M, bm), triton.cdiv(C, bc))
    _bn_apply_kernel[grid](
        xc, _vec(scale, cd), _vec(shift, cd), xc if rc is None else rc, y,
        M, C, HW, s_n, s_c, s_hw,
        HAS_RES=rc is not None, RELU=relu, COMPUTE=tl.float64 if cd == torch.float64 else tl.float32,
        BLOCK_M=bm, BLOCK_C=bc,
    )  # fmt: skip
    return y


def _bwd_reduce_triton(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    residual: torch.Tensor | None,
    relu: bool,
    channels_last: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    xc, gc, rc = _prepare(x, channels_last, grad_y, residual)
    cd = _compute_dtype(x.dtype)
    M, C, HW, s_n, s_c, s_hw = _geometry(xc)
    bm, bc = _blocks(xc, channels_last)
    grid = (triton.cdiv(M, bm), triton.cdiv(C, bc))
    part = torch.empty((2, grid[0], C), dtype=cd, device=x.device)
    _bn_bwd_reduce_kernel[grid](
        gc, xc, _vec(mean, cd), _vec(scale, cd), _vec(shift, cd), xc if rc is None else rc, part,
        M, C, HW, s_n, s_c, s_hw,
        HAS_RES=rc is not None, RELU=relu, COMPUTE=tl.float64 if cd == torch.float64 else tl.float32,
        BLOCK_M=bm, BLOCK_C=bc,
    )  # fmt: skip
    return part[0].sum(0), part[1].sum(0)  # two separate tensors: op outputs may not alias


def _bwd_apply_triton(
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
    xc, gc, rc = _prepare(x, channels_last, grad_y, residual)
    dx = torch.empty_like(xc)
    if xc.numel() == 0:
        return dx
    cd = _compute_dtype(x.dtype)
    M, C, HW, s_n, s_c, s_hw = _geometry(xc)
    bm, bc = _blocks(xc, channels_last)
    grid = (triton.cdiv(M, bm), triton.cdiv(C, bc))
    _bn_bwd_apply_kernel[grid](
        gc, xc, _vec(scale, cd), _vec(shift, cd), xc if rc is None else rc,
        _vec(a, cd), _vec(b, cd), _vec(c, cd), dx,
        M, C, HW, s_n, s_c, s_hw,
        HAS_RES=rc is not None, RELU=relu, COMPUTE=tl.float64 if cd == torch.float64 else tl.float32,
        BLOCK_M=bm, BLOCK_C=bc,
    )  # fmt: skip
    return dx


# ----------------------------------------------------------------------------- compiled (C++/CUDA)
def _stats_compiled(x: torch.Tensor, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.fastblocks.bn_stats_fwd.default(x, channels_last)


def _apply_compiled(x, scale, shift, residual, relu, channels_last):
    cd = _compute_dtype(x.dtype)
    return torch.ops.fastblocks.bn_apply.default(x, _vec(scale, cd), _vec(shift, cd), residual, relu, channels_last)


def _bwd_reduce_compiled(grad_y, x, mean, scale, shift, residual, relu, channels_last):
    cd = _compute_dtype(x.dtype)
    return torch.ops.fastblocks.bn_bwd_reduce.default(
        grad_y, x, _vec(mean, cd), _vec(scale, cd), _vec(shift, cd), residual, relu, channels_last
    )


def _bwd_apply_compiled(grad_y, x, scale, shift, residual, a, b, c, relu, channels_last):
    cd = _compute_dtype(x.dtype)
    return torch.ops.fastblocks.bn_bwd_apply.default(
        grad_y,
        x,
        _vec(scale, cd),
        _vec(shift, cd),
        residual,
        _vec(a, cd),
        _vec(b, cd),
        _vec(c, cd),
        relu,
        channels_last,
    )


@dataclass(frozen=True)
class _Kernels:
    stats: Callable
    apply: Callable
    bwd_reduce: Callable
    bwd_apply: Callable


_REFERENCE = _Kernels(_stats_reference, _apply_reference, _bwd_reduce_reference, _bwd_apply_reference)
_TRITON = _Kernels(_stats_triton, _apply_triton, _bwd_reduce_triton, _bwd_apply_triton)
_COMPILED_KERNELS = _Kernels(_stats_compiled, _apply_compiled, _bwd_reduce_compiled, _bwd_apply_compiled)
_BY_BACKEND = {"reference": _REFERENCE, "triton": _TRITON, "cpu": _COMPILED_KERNELS, "cuda": _COMPILED_KERNELS}


def kernels_for(op: str, device: torch.device) -> _Kernels:
    """The four kernel-level functions of the backend that runs ``op`` on ``device`` now."""
    return _BY_BACKEND[_backend.resolve(op, device)]


# ----------------------------------------------------------------------------- shared math
def _scale_shift(
    mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scale, shift, invstd) [C] in the statistics' dtype."""
    # Few small ops, no no-op casts: on a CPU each costs microseconds of Python per BatchNorm call.
    invstd = (var + eps).rsqrt_()
    scale = invstd if weight is None else _as_dtype(weight, var.dtype) * invstd
    shift = -mean * scale if bias is None else torch.addcmul(_as_dtype(bias, var.dtype), mean, scale, value=-1)
    return scale, shift, invstd


def _as_dtype(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return v if v.dtype == dtype else v.to(dtype)


def _check_batch(x: torch.Tensor, training: bool) -> None:
    if training and x.numel() and x.numel() // x.shape[1] <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}")


def _check_vector(v: torch.Tensor | None, name: str, x: torch.Tensor) -> None:
    if v is None:
        return
    check_tensor(v, name, dim=1)
    if v.numel() != x.shape[1]:
        raise ValueError(f"{name} has {v.numel()} elements but x has {x.shape[1]} channels")
    if v.device != x.device:
        raise ValueError(f"{name} is on {v.device} but x is on {x.device}")


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
        _check_vector(v, name, x)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be given or both be None")
    if not training and running_mean is None:
        raise ValueError("eval mode needs running_mean and running_var (or use training=True)")
    if residual is not None:
        check_tensor(residual, "residual")
        check_like(residual, "residual", x, "x")
    _check_batch(x, training)


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
    cd = _compute_dtype(x.dtype)
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
    cd = _compute_dtype(x.dtype)
    if x.numel() == 0:
        # An empty batch, as nn.BatchNorm2d: an empty output, zero gradients, and (the caller
        # skips the update) running buffers left alone. Zero statistics keep invstd finite.
        zeros = torch.zeros(x.shape[1], dtype=cd, device=x.device)
        return torch.empty_like(x, memory_format=memory_format(cl)), zeros, zeros.clone()
    if training:
        mean, var = k.stats(x, cl)
    else:
        mean, var = running_mean.to(cd).clone(), running_var.to(cd).clone()
    scale, shift, _ = _scale_shift(mean, var, weight, bias, eps)
    return k.apply(x, scale, shift, residual, relu, cl), mean, var


@_batch_norm_act_op.register_fake
def _(x, weight, bias, running_mean, running_var, residual, training, eps, relu):
    _check_bn_inputs(x, weight, bias, running_mean, running_var, residual, training)
    cd = _compute_dtype(x.dtype)
    y = torch.empty_like(x, memory_format=memory_format(is_channels_last(x)))
    return y, x.new_empty(x.shape[1], dtype=cd), x.new_empty(x.shape[1], dtype=cd)


def _bn_setup_context(ctx, inputs, output) -> None:
    _backend.remember(ctx)
    x, weight, bias, _rm, _rv, residual, training, eps, relu = inputs
    _, mean, var = output
    ctx.training, ctx.eps, ctx.relu = training, eps, relu
    ctx.has_weight, ctx.has_bias, ctx.has_res = weight is not None, bias is not None, residual is not None
    # The residual is needed only to rebuild the ReLU mask.
    ctx.save_for_backward(x, weight, bias, residual if relu else None, mean, var)


def _dx_coefficients(
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    sum_g: torch.Tensor,
    sum_gx: torch.Tensor,
    count: int | torch.Tensor,
    training: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(a, b, c) [C] of ``dx = a g' + b x + c`` (the derivation is in the module docstring)."""
    gamma = torch.ones_like(invstd) if weight is None else weight.to(invstd.dtype)
    a = gamma * invstd
    if not training:
        return a, torch.zeros_like(a), torch.zeros_like(a)
    b = -gamma * invstd**3 * sum_gx / count
    return a, b, -a * sum_g / count - b * mean


def _residual_grad(grad_y, x, scale, shift, residual, relu):
    if not relu:
        return grad_y
    one, zero = torch.ones_like(scale), torch.zeros_like(scale)
    # dres = g' (the masked gradient), in the residual's dtype and layout.
    return _bwd_apply_op(grad_y, x, scale, shift, residual, one, zero, zero, relu).to(residual.dtype)


def _bn_backward_impl(ctx, grad_y, reduce: Callable, apply: Callable) -> tuple:
    """The backward of ``batch_norm_act`` given the reduce/apply functions to call."""
    x, weight, bias, residual, mean, var = ctx.saved_tensors
    scale, shift, invstd = _scale_shift(mean, var, weight, bias, ctx.eps)
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
    a, b, c = _dx_coefficients(weight, mean, invstd, sum_g, sum_gx, x.numel() // x.shape[1], ctx.training)
    dx = apply(grad_y, x, scale, shift, residual, a, b, c, relu) if need[0] else None
    dweight = (sum_gx * invstd).to(weight.dtype) if ctx.has_weight and need[1] else None
    dbias = sum_g.to(bias.dtype) if ctx.has_bias and need[2] else None
    return dx, dweight, dbias, None, None, dres, None, None, None


@_backend.backward_on_forward_backend
def _bn_backward(ctx, grad_y, _grad_mean, _grad_var):
    # The registered backward ops (not the kernels), so the backward graph traces.
    return _bn_backward_impl(ctx, grad_y, _bwd_reduce_op, _bwd_apply_op)


def _reduce_direct(grad_y, x, mean, scale, shift, residual, relu):
    k = kernels_for("batch_norm_act", x.device)
    return k.bwd_reduce(grad_y, x, mean, scale, shift, residual, relu, is_channels_last(x))


def _apply_direct(grad_y, x, scale, shift, residual, a, b, c, relu):
    k = kernels_for("batch_norm_act", x.device)
    return k.bwd_apply(grad_y, x, scale, shift, residual, a, b, c, relu, is_channels_last(x))


class _BatchNormActFunction(torch.autograd.Function):
    """``fastblocks::batch_norm_act`` for plain eager calls: the same kernels and formulas as the
    registered op, without the custom-op dispatch (argument defaulting, redispatch), which costs
    more Python per call than everything else in the op. See :func:`fastblocks.ops._common.eager_path`."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, residual, training, eps, relu):
        y, mean, var = _bn_forward_impl(x, weight, bias, running_mean, running_var, residual, training, eps, relu)
        _bn_setup_context(
            ctx, (x, weight, bias, running_mean, running_var, residual, training, eps, relu), (y, mean, var)
        )
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    @torch.autograd.function.once_differentiable
    @_backend.backward_on_forward_backend
    def backward(ctx, grad_y, _grad_mean, _grad_var):
        return _bn_backward_impl(ctx, grad_y, _reduce_direct, _apply_direct)


_batch_norm_act_op.register_autograd(_bn_backward, setup_context=_bn_setup_context)


@functools.cache
def _whole_cpu_kernels() -> bool:
    """Whether the extension has the one-call CPU BatchNorm (a stale build may not)."""
    return _ext.has_kernel("bn_fused_fwd", "CPU") and _ext.has_kernel("bn_fused_bwd", "CPU")


class _BatchNormActCPUFunction(torch.autograd.Function):
    """``batch_norm_act`` for plain eager calls on the compiled CPU backend: one C++ call per
    direction (``fastblocks::bn_fused_fwd``/``bn_fused_bwd``: the same kernels as
    :class:`_BatchNormActFunction`, the per-channel arithmetic and the running-statistics update as
    loops over C), because around a small activation the dozen per-channel tensor ops cost as
    much as a pass over x. Results agree with the registered op's to an ulp or so. The running
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
        ctx.training, ctx.eps, ctx.relu, ctx.channels_last = training, eps, relu, cl
        ctx.has_res = residual is not None
        ctx.save_for_backward(x, weight, bias, residual if relu else None, mean, var)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        x, weight, bias, residual, mean, var = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dweight, dbias, dres = torch.ops.fastblocks.bn_fused_bwd.default(
            grad_y, x, weight, bias, mean, var, residual, ctx.training, ctx.eps, ctx.relu,
            need[0], need[1], need[2], need[4] and ctx.has_res, ctx.channels_last,
        )  # fmt: skip
        if need[4] and ctx.has_res and not ctx.relu:
            dres = grad_y
        return dx, dweight, dbias, None, dres, None, None, None, None


def _momentum_factor(momentum: float | None, num_batches_tracked: torch.Tensor | None) -> float:
    """The running-statistics weight of this batch: ``momentum``, or ``1 / num_batches_tracked``
    (the cumulative average) when ``momentum`` is None, as ``nn.BatchNorm2d``."""
    if momentum is not None:
        return momentum
    if num_batches_tracked is None:
        raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
    return 1.0 / float(num_batches_tracked)


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
    if (
        eager
        and x.device.type == "cpu"
        and x.numel()
        and _backend.resolve("batch_norm_act", x.device) == "cpu"
        and _whole_cpu_kernels()
    ):
        factor = _momentum_factor(momentum, num_batches_tracked) if training and running_mean is not None else 0.0
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
    """Fold batch statistics ``mean``/biased ``var`` of ``count`` values per channel into the buffers.

    Same rule as ``torch.nn.BatchNorm2d``: the unbiased variance (``var * n / (n - 1)``) is
    stored, and ``momentum=None`` means the cumulative average ``1 / num_batches_tracked``.
    """
    factor = _momentum_factor(momentum, num_batches_tracked)
    if isinstance(count, torch.Tensor):
        unbiased = var * (count / (count - 1).clamp_min(1))
    else:
        unbiased = var * (count / max(count - 1, 1))
    buffers = [running_mean, running_var]
    torch._foreach_mul_(buffers, 1 - factor)
    batch = [_as_dtype(mean, running_mean.dtype), _as_dtype(unbiased, running_var.dtype)]
    torch._foreach_add_(buffers, batch, alpha=factor)


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
    cd = _compute_dtype(x.dtype)
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


class _BNStatsFunction(torch.autograd.Function):
    """``fastblocks::bn_stats`` for plain eager calls (same kernels, no custom-op dispatch)."""

    @staticmethod
    def forward(ctx, x):
        mean, var = kernels_for("bn_stats", x.device).stats(x, is_channels_last(x))
        _stats_setup_context(ctx, (x,), (mean, var))
        return mean, var

    @staticmethod
    @torch.autograd.function.once_differentiable
    @_backend.backward_on_forward_backend
    def backward(ctx, grad_mean, grad_var):
        x, mean = ctx.saved_tensors
        scale, shift = _stats_backward_coefficients(x, mean, grad_mean, grad_var)
        k = kernels_for("scale_shift_act", x.device)
        return k.apply(x, scale, shift, None, False, is_channels_last(x))


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
    zero = torch.zeros_like(scale, dtype=_compute_dtype(x.dtype))
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
    _check_vector(scale, "scale", x)
    _check_vector(shift, "shift", x)
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
        import torch.distributed as dist

        mean_l, var_l = _bn_stats_op(x)
        count_l = torch.full_like(mean_l, x.numel() // x.shape[1])
        local = torch.stack([count_l, mean_l, var_l * count_l])
        world = dist.get_world_size(group)
        gathered = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(gathered, local, group=group)
        parts = torch.stack(gathered, dim=1)  # [3, world, C]
        mean, var = _combine_partials(parts[0], parts[1], parts[2])
        total = parts[0, :, 0].sum()  # stays on the device: no host synchronization
        scale, shift, _ = _scale_shift(mean, var, weight, bias, eps)
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
        import torch.distributed as dist

        x, weight, bias, residual, mean, var = ctx.saved_tensors
        scale, shift, invstd = _scale_shift(mean, var, weight, bias, ctx.eps)
        sum_g, sum_gx = _bwd_reduce_op(grad_y, x, mean, scale, shift, residual, ctx.relu)
        # Parameter gradients stay local, as in nn.SyncBatchNorm: DDP all-reduces them itself.
        dweight = None if weight is None else (sum_gx * invstd).to(weight.dtype)
        dbias = None if bias is None else sum_g.to(bias.dtype)
        sums = torch.stack([sum_g, sum_gx])
        dist.all_reduce(sums, group=ctx.group)
        sum_g, sum_gx = sums[0], sums[1]
        a, b, c = _dx_coefficients(weight, mean, invstd, sum_g, sum_gx, ctx.total, training=True)
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


if _ext.loaded() and _ext.has_kernel("bn_apply", "CPU"):
    from fastblocks.ops import _bn_kernels  # noqa: F401  (fake kernels of the compiled schemas)
