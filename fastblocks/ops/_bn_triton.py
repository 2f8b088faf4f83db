"""Triton kernels of the BatchNorm family: the ``triton`` backend's four kernel-level functions.

``stats`` (per-channel mean and biased variance), ``apply`` (``act(x * scale + shift
[+ residual])``), ``bwd_reduce`` (``Σ g'`` and ``Σ g' (x - mean)``) and ``bwd_apply``
(``dx = a g' + b x + c``); their specification is the reference kernels of
:mod:`fastblocks.ops._bn_core`, which also holds the kernel table that picks these launchers.
Arithmetic in fp32 (fp64 for fp64 data), per-channel vectors ``[C]`` in that dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fastblocks.ops._common import acc_dtype, channel_vector, combine_partials, memory_format
from fastblocks.ops._triton import tl, triton

# ----------------------------------------------------------------------------- Triton kernels
# x-sized tensors are addressed as [N, C, HW] through three strides, so one kernel serves NCHW
# (s_c = HW, s_hw = 1) and channels_last (s_c = 1, s_hw = C). The input x has strides of its own
# (xs_n, xs_c, xs_hw): a channel prefix buf[:, :C] of a wider buffer (a dense block's) is read in
# place, the other operands and the outputs are dense. Programs tile (pixels, channels);
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
        r_ptr,  # *T [N, C, HW] (dense): residual (ignored unless HAS_RES)
        y_ptr,  # *T [N, C, HW] (dense): act(x * scale + shift [+ r])
        M,
        C,
        HW,
        s_n,  # the dense operands' strides
        s_c,
        s_hw,
        xs_n,  # x's strides
        xs_c,
        xs_hw,
        HAS_RES: tl.constexpr,
        RELU: tl.constexpr,
        X_DENSE: tl.constexpr,  # x's strides are the dense ones: one set of offsets
        COMPUTE: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        offs, mask, cols = _tile(tl.program_id(0), tl.program_id(1), M, C, HW, s_n, s_c, s_hw, BLOCK_M, BLOCK_C)
        xoffs = offs
        if not X_DENSE:
            xoffs, _, _ = _tile(tl.program_id(0), tl.program_id(1), M, C, HW, xs_n, xs_c, xs_hw, BLOCK_M, BLOCK_C)
        scale = tl.load(scale_ptr + cols, mask=cols < C, other=0.0).to(COMPUTE)
        shift = tl.load(shift_ptr + cols, mask=cols < C, other=0.0).to(COMPUTE)
        x = tl.load(x_ptr + xoffs, mask=mask, other=0.0)
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
        g_ptr,  # *T [N, C, HW] (dense): dL/dy
        x_ptr,  # *T [N, C, HW] (strided): forward input
        mean_ptr,  # *COMPUTE [C]
        scale_ptr,  # *COMPUTE [C]
        shift_ptr,  # *COMPUTE [C]
        r_ptr,  # *T [N, C, HW] (dense): residual (ignored unless HAS_RES)
        part_ptr,  # *COMPUTE [2, programs_m, C]: partial Σ g' and Σ g' (x - mean)
        M,
        C,
        HW,
        s_n,  # the dense operands' strides
        s_c,
        s_hw,
        xs_n,  # x's strides
        xs_c,
        xs_hw,
        HAS_RES: tl.constexpr,
        RELU: tl.constexpr,
        X_DENSE: tl.constexpr,  # x's strides are the dense ones: one set of offsets
        COMPUTE: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        offs, mask, cols = _tile(pid_m, tl.program_id(1), M, C, HW, s_n, s_c, s_hw, BLOCK_M, BLOCK_C)
        xoffs = offs
        if not X_DENSE:
            xoffs, _, _ = _tile(pid_m, tl.program_id(1), M, C, HW, xs_n, xs_c, xs_hw, BLOCK_M, BLOCK_C)
        cmask = cols < C
        scale = tl.load(scale_ptr + cols, mask=cmask, other=0.0).to(COMPUTE)
        shift = tl.load(shift_ptr + cols, mask=cmask, other=0.0).to(COMPUTE)
        mean = tl.load(mean_ptr + cols, mask=cmask, other=0.0).to(COMPUTE)
        x = tl.load(x_ptr + xoffs, mask=mask, other=0.0)
        g = _masked_grad_tile(g_ptr, x, scale, shift, r_ptr, offs, mask, HAS_RES, RELU, COMPUTE)
        xc = tl.where(mask, x.to(COMPUTE) - mean[None, :], 0.0)
        base = pid_m.to(tl.int64) * C + cols
        tl.store(part_ptr + base, tl.sum(g, axis=0), mask=cmask)
        tl.store(part_ptr + tl.num_programs(0) * C + base, tl.sum(g * xc, axis=0), mask=cmask)

    @triton.jit
    def _bn_bwd_apply_kernel(
        g_ptr,  # *T [N, C, HW] (dense): dL/dy
        x_ptr,  # *T [N, C, HW] (strided): forward input
        scale_ptr,  # *COMPUTE [C]
        shift_ptr,  # *COMPUTE [C]
        r_ptr,  # *T [N, C, HW] (dense): residual (ignored unless HAS_RES)
        a_ptr,  # *COMPUTE [C]: dx = a g' + b x + c
        b_ptr,  # *COMPUTE [C]
        c_ptr,  # *COMPUTE [C]
        dx_ptr,  # *T [N, C, HW] (strided): dx, or what dx is added to (ACCUMULATE)
        M,
        C,
        HW,
        s_n,  # the dense operands' strides
        s_c,
        s_hw,
        xs_n,  # x's strides
        xs_c,
        xs_hw,
        ds_n,  # dx's strides
        ds_c,
        ds_hw,
        HAS_RES: tl.constexpr,
        RELU: tl.constexpr,
        X_DENSE: tl.constexpr,  # x's strides are the dense ones: one set of offsets
        ACCUMULATE: tl.constexpr,  # dx_ptr[...] += dx, one rounding of the sum
        COMPUTE: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        offs, mask, cols = _tile(tl.program_id(0), tl.program_id(1), M, C, HW, s_n, s_c, s_hw, BLOCK_M, BLOCK_C)
        xoffs = offs
        if not X_DENSE:
            xoffs, _, _ = _tile(tl.program_id(0), tl.program_id(1), M, C, HW, xs_n, xs_c, xs_hw, BLOCK_M, BLOCK_C)
        doffs = offs  # dx dense, unless accumulated into a view
        if ACCUMULATE:
            doffs, _, _ = _tile(tl.program_id(0), tl.program_id(1), M, C, HW, ds_n, ds_c, ds_hw, BLOCK_M, BLOCK_C)
        cmask = cols < C
        scale = tl.load(scale_ptr + cols, mask=cmask, other=0.0).to(COMPUTE)
        shift = tl.load(shift_ptr + cols, mask=cmask, other=0.0).to(COMPUTE)
        a = tl.load(a_ptr + cols, mask=cmask, other=0.0).to(COMPUTE)
        b = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(COMPUTE)
        c = tl.load(c_ptr + cols, mask=cmask, other=0.0).to(COMPUTE)
        x = tl.load(x_ptr + xoffs, mask=mask, other=0.0)
        g = _masked_grad_tile(g_ptr, x, scale, shift, r_ptr, offs, mask, HAS_RES, RELU, COMPUTE)
        dx = a[None, :] * g + b[None, :] * x.to(COMPUTE) + c[None, :]
        if ACCUMULATE:
            dx += tl.load(dx_ptr + doffs, mask=mask, other=0.0).to(COMPUTE)
        tl.store(dx_ptr + doffs, dx.to(x.dtype), mask=mask)


def _geometry(shape: torch.Size, channels_last: bool) -> tuple[int, int, int, int, int, int]:
    """(M, C, HW, s_n, s_c, s_hw) of a dense ``[N, C, ...]`` tensor of ``shape`` in the layout
    (channels_last: 4-D only)."""
    n, c = shape[0], shape[1]
    hw = math.prod(shape[2:])
    if len(shape) == 4 and channels_last:
        return n * hw, c, hw, c * hw, 1, c
    return n * hw, c, hw, c * hw, hw, 1


def _in_place_strides(t: torch.Tensor, channels_last: bool) -> tuple[int, int, int] | None:
    """``(s_n, s_c, s_hw)`` through which the kernels address a 4-D ``t`` as ``[N, C, HW]``
    where its pixels flatten to one stride and its innermost stride is the layout's (channels
    for channels_last, pixels for NCHW; a channel prefix ``buf[:, :C]`` of a dense block's
    buffer is such a view), else None."""
    if t.dim() != 4:
        return None
    _, c, h, w = t.shape
    s_n, s_c, s_h, s_w = t.stride()
    flat = h == 1 or w == 1 or s_h == w * s_w
    s_hw = s_w if w > 1 else s_h
    inner = (s_c == 1 or c == 1) if channels_last else (s_hw == 1 or h * w == 1)
    return (s_n, s_c, s_hw) if flat and inner else None


def _x_operand(x: torch.Tensor, channels_last: bool) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """``(x, (s_n, s_c, s_hw))``: x as the kernels read it, in place where
    :func:`_in_place_strides` allows, else a dense copy in the layout."""
    strides = _in_place_strides(x, channels_last)
    if strides is not None:
        return x, strides
    xc = x.contiguous(memory_format=memory_format(channels_last))
    return xc, _geometry(xc.shape, channels_last)[3:]


def _blocks(x: torch.Tensor, channels_last: bool) -> tuple[int, int]:
    # Wide channel tiles when channels are contiguous in memory, tall pixel tiles otherwise; 4096
    # elements per program (2048 in fp64: with 4096, the backward kernels spilled on sm_90).
    c = x.shape[1]
    block_c = min(64, triton.next_power_of_2(c)) if channels_last else min(16, triton.next_power_of_2(c))
    block_m = max(16, (2048 if x.dtype == torch.float64 else 4096) // block_c)
    return block_m, block_c


def _prepare(channels_last: bool, *others: torch.Tensor | None) -> list[torch.Tensor | None]:
    """The dense operands (gradient, residual), dense in the layout."""
    fmt = memory_format(channels_last)
    return [None if t is None else t.contiguous(memory_format=fmt) for t in others]


def _dense_empty(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """An uninitialized output of x's shape and dtype, dense in the layout."""
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=memory_format(channels_last))


@dataclass(frozen=True)
class _Launch:
    """What every kernel of this file is launched with for an input x: x as it is read, the
    size and stride arguments ``(M, C, HW, s_n, s_c, s_hw, xs_n, xs_c, xs_hw)``, the dense
    strides alone, the grid, the accumulation dtype and the constexprs."""

    x: torch.Tensor
    sizes: tuple[int, ...]
    dense: tuple[int, int, int]
    grid: tuple[int, int]
    cd: torch.dtype
    meta: dict


def _launch(x: torch.Tensor, channels_last: bool) -> _Launch:
    xc, xs = _x_operand(x, channels_last)
    cd = acc_dtype(x.dtype)
    M, C, HW, s_n, s_c, s_hw = _geometry(x.shape, channels_last)
    bm, bc = _blocks(x, channels_last)
    meta = {
        "X_DENSE": xs == (s_n, s_c, s_hw),
        "COMPUTE": tl.float64 if cd == torch.float64 else tl.float32,
        "BLOCK_M": bm,
        "BLOCK_C": bc,
    }
    return _Launch(
        xc, (M, C, HW, s_n, s_c, s_hw, *xs), (s_n, s_c, s_hw), (triton.cdiv(M, bm), triton.cdiv(C, bc)), cd, meta
    )


def stats_triton(x: torch.Tensor, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, C, ...]`` -> per-channel (mean, biased var) ``[C]`` (see ``_bn_core._stats_reference``)."""
    ln = _launch(x, channels_last)
    M, C, HW, *_, xs_n, xs_c, xs_hw = ln.sizes
    part = torch.empty((3, ln.grid[0], C), dtype=ln.cd, device=x.device)
    meta = {k: v for k, v in ln.meta.items() if k != "X_DENSE"}  # x is its only operand
    _bn_stats_kernel[ln.grid](ln.x, part, M, C, HW, xs_n, xs_c, xs_hw, **meta)
    return combine_partials(part[0], part[1], part[2])


def apply_triton(
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    residual: torch.Tensor | None,
    relu: bool,
    channels_last: bool,
) -> torch.Tensor:
    """``act(x * scale + shift [+ residual])``: x ``[N, C, ...]``, scale/shift ``[C]`` -> x's shape and layout."""
    y = _dense_empty(x, channels_last)
    if x.numel() == 0:
        return y
    ln = _launch(x, channels_last)
    (rc,) = _prepare(channels_last, residual)
    _bn_apply_kernel[ln.grid](
        ln.x, channel_vector(scale, ln.cd), channel_vector(shift, ln.cd), y if rc is None else rc, y,
        *ln.sizes, HAS_RES=rc is not None, RELU=relu, **ln.meta,
    )  # fmt: skip
    return y


def bwd_reduce_triton(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    residual: torch.Tensor | None,
    relu: bool,
    channels_last: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Σ g', Σ g' (x - mean))`` ``[C]`` each; ``g'`` is grad_y ``[N, C, ...]`` masked by the ReLU."""
    ln = _launch(x, channels_last)
    gc, rc = _prepare(channels_last, grad_y, residual)
    cd = ln.cd
    part = torch.empty((2, ln.grid[0], x.shape[1]), dtype=cd, device=x.device)
    _bn_bwd_reduce_kernel[ln.grid](
        gc, ln.x, channel_vector(mean, cd), channel_vector(scale, cd), channel_vector(shift, cd),
        gc if rc is None else rc, part,
        *ln.sizes, HAS_RES=rc is not None, RELU=relu, **ln.meta,
    )  # fmt: skip
    return part[0].sum(0), part[1].sum(0)  # two separate tensors: op outputs may not alias


def bwd_apply_triton(
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
    """``dx = a g' + b x + c`` per channel (a, b, c ``[C]``): x's shape, dtype and layout."""
    dx = _dense_empty(x, channels_last)
    if x.numel() == 0:
        return dx
    ln = _launch(x, channels_last)
    gc, rc = _prepare(channels_last, grad_y, residual)
    cd = ln.cd
    _bn_bwd_apply_kernel[ln.grid](
        gc, ln.x, channel_vector(scale, cd), channel_vector(shift, cd), gc if rc is None else rc,
        channel_vector(a, cd), channel_vector(b, cd), channel_vector(c, cd), dx,
        *ln.sizes, *ln.dense, HAS_RES=rc is not None, RELU=relu, ACCUMULATE=False, **ln.meta,
    )  # fmt: skip
    return dx


def bwd_apply_add_triton(
    out: torch.Tensor,
    grad_y: torch.Tensor,
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    relu: bool,
    channels_last: bool,
) -> None:
    """``out += a g' + b x + c`` in place (out ``[N, C, ...]`` x's shape and dtype, sharing no
    memory with grad_y or x; e.g. a channel prefix of a dense block's gradient buffer): one pass
    that reads out, grad_y and x and writes out, instead of :func:`bwd_apply_triton`'s
    temporary and an add. The sum is rounded to out's dtype once."""
    if out.shape != x.shape or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(
            f"bwd_apply_add: out must have x's shape, dtype and device; out is {tuple(out.shape)} "
            f"{out.dtype} on {out.device}, x {tuple(x.shape)} {x.dtype} on {x.device}"
        )
    if x.numel() == 0:
        return
    ds = _in_place_strides(out, channels_last)
    if ds is None:  # not addressable in place: the two-pass form
        out.add_(bwd_apply_triton(grad_y, x, scale, shift, None, a, b, c, relu, channels_last))
        return
    ln = _launch(x, channels_last)
    (gc,) = _prepare(channels_last, grad_y)
    cd = ln.cd
    _bn_bwd_apply_kernel[ln.grid](
        gc, ln.x, channel_vector(scale, cd), channel_vector(shift, cd), gc,
        channel_vector(a, cd), channel_vector(b, cd), channel_vector(c, cd), out,
        *ln.sizes, *ds, HAS_RES=False, RELU=relu, ACCUMULATE=True, **ln.meta,
    )  # fmt: skip
