"""Triton kernels of ``bn_relu_conv2d``: the implicit-GEMM convolution with the BN-ReLU prologue
in its A-tile loader (forward and weight gradient) and the prologue's backward.

The design, the padding rule and the bytes saved are in :mod:`fastblocks.ops.bn_relu_conv`, which
calls :func:`fwd` and :func:`bwd` for the cases :func:`covers` (1x1 and 3x3, groups=1,
dilation=1, fp16/bf16/fp32) and runs the reference path for the rest. Tiles per dtype
(:func:`_fwd_tiles`, :func:`_wgrad_tiles`) were chosen with ``tools/sm90_compile.py`` so that no
variant spills registers on sm_90.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, NamedTuple

import torch

from fastblocks.ops._common import empty0, is_channels_last, memory_format
from fastblocks.ops._triton import tl, triton

if TYPE_CHECKING:
    from fastblocks.ops.bn_relu_conv import Conv


# ----------------------------------------------------------------------------- Triton kernels
if triton is not None:

    @triton.jit
    def _bn_relu_tile(
        x_ptr,  # *T: x, read through its strides
        x_row,  # int64 [BLOCK_P]: offset of pixel (n, ih, iw) in x, for each GEMM row
        tap_ok,  # bool [BLOCK_P]: the row is a real pixel and its tap lies inside the image
        offs_c,  # int [BLOCK_C]: input channels of this tile
        c_ok,  # bool [BLOCK_C]: offs_c < C
        sxc,  # x's channel stride
        sc,  # f32 [BLOCK_C]: scale
        sh,  # f32 [BLOCK_C]: shift
    ):
        """The [BLOCK_P, BLOCK_C] activation tile ``relu(x*scale + shift)``, zero outside the image."""
        ok = tap_ok[:, None] & c_ok[None, :]
        xv = tl.load(x_ptr + x_row[:, None] + offs_c[None, :].to(tl.int64) * sxc, mask=ok, other=0.0)
        z = tl.fma(xv.to(tl.float32), sc[None, :], sh[None, :])  # explicit: the backward rebuilds z bit for bit
        a = tl.where(z <= 0.0, 0.0, z)  # NaN stays NaN, as torch.relu
        # Zero padding applies to the activation: a padded tap is 0, not relu(shift).
        return tl.where(ok, a, 0.0)

    @triton.jit
    def _bn_relu_conv_fwd_kernel(
        x_ptr,  # *T [N, C, H, W]: input, any strides (NCHW, channels_last, channel-prefix view)
        scale_ptr,  # *f32 [C]: per-input-channel scale
        shift_ptr,  # *f32 [C]: per-input-channel shift
        w_ptr,  # *T [CO, C, KH, KW]: weight, any strides
        y_ptr,  # *T [N, CO, HO, WO]: output, any strides
        psum_ptr,  # *f32 [grid_m, CO]: per-program Σy over this program's pixels (if STATS)
        psumsq_ptr,  # *f32 [grid_m, CO]: per-program Σy² (if STATS)
        M,  # N * HO * WO: GEMM rows (output pixels, in (n, oh, ow) order)
        C,  # input channels
        H,  # input height
        W,  # input width
        CO,  # output channels: GEMM columns
        HO,  # output height
        WO,  # output width
        sxn, sxc, sxh, sxw,  # x strides, in elements
        swo, swc, swh, sww,  # weight strides
        syn, syc, syh, syw,  # y strides
        stride_h, stride_w,  # convolution stride
        pad_h, pad_w,  # zero padding (of the activation)
        KH: tl.constexpr,  # kernel height
        KW: tl.constexpr,  # kernel width
        STATS: tl.constexpr,  # write the Σy/Σy² partials
        INPUT_PRECISION: tl.constexpr,  # "ieee" or "tf32" for fp32 dots
        BLOCK_M: tl.constexpr,  # output pixels per program
        BLOCK_N: tl.constexpr,  # output channels per program
        BLOCK_K: tl.constexpr,  # input channels per step of the reduction
    ):  # fmt: skip
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        ow = offs_m % WO
        oh = (offs_m // WO) % HO
        n = (offs_m // (WO * HO)).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < CO
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        # K = (kh, kw, c): taps outside, channels inside, so a tap's bounds test is done once.
        for kh in tl.static_range(KH):
            for kw in tl.static_range(KW):
                ih = oh * stride_h - pad_h + kh
                iw = ow * stride_w - pad_w + kw
                tap_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                x_row = n * sxn + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw
                for c0 in range(0, C, BLOCK_K):
                    offs_k = c0 + tl.arange(0, BLOCK_K)
                    k_ok = offs_k < C
                    sc = tl.load(scale_ptr + offs_k, mask=k_ok, other=0.0)
                    sh = tl.load(shift_ptr + offs_k, mask=k_ok, other=0.0)
                    a = _bn_relu_tile(x_ptr, x_row, tap_ok, offs_k, k_ok, sxc, sc, sh)
                    w_offs = offs_n[None, :] * swo + offs_k[:, None] * swc + kh * swh + kw * sww
                    wv = tl.load(w_ptr + w_offs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                    # The activation is rounded to the input dtype before the product, as eager.
                    acc = tl.dot(a.to(wv.dtype), wv, acc, input_precision=INPUT_PRECISION)
        y = acc.to(y_ptr.dtype.element_ty)
        out_ok = m_ok[:, None] & n_ok[None, :]
        y_row = n * syn + oh.to(tl.int64) * syh + ow.to(tl.int64) * syw
        tl.store(y_ptr + y_row[:, None] + offs_n[None, :].to(tl.int64) * syc, y, mask=out_ok)
        if STATS:
            # Statistics of the stored (rounded) output: what a BN reading y would see.
            yr = tl.where(out_ok, y.to(tl.float32), 0.0)
            tl.store(psum_ptr + pid_m * CO + offs_n, tl.sum(yr, axis=0), mask=n_ok)
            tl.store(psumsq_ptr + pid_m * CO + offs_n, tl.sum(yr * yr, axis=0), mask=n_ok)

    @triton.jit
    def _bn_relu_prologue_bwd_kernel(
        ga_ptr,  # *T [N, C, H, W]: dL/da (the dgrad output), any strides
        x_ptr,  # *T [N, C, H, W]: input, any strides
        scale_ptr,  # *f32 [C]
        shift_ptr,  # *f32 [C]
        dx_ptr,  # *T [N, C, H, W]: dL/dx = g_z * scale, any strides
        pdscale_ptr,  # *f32 [grid_p, C]: per-program Σ g_z * x
        pdshift_ptr,  # *f32 [grid_p, C]: per-program Σ g_z
        P,  # N * H * W pixels
        C,  # channels
        H,  # height
        W,  # width
        sgn, sgc, sgh, sgw,  # grad_a strides
        sxn, sxc, sxh, sxw,  # x strides
        sdn, sdc, sdh, sdw,  # dx strides
        BLOCK_P: tl.constexpr,  # pixels per program
        BLOCK_C: tl.constexpr,  # channels per program
    ):  # fmt: skip
        pid_p = tl.program_id(0)
        offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        p_ok = offs_p < P
        c_ok = offs_c < C
        ok = p_ok[:, None] & c_ok[None, :]
        iw = (offs_p % W).to(tl.int64)
        ih = ((offs_p // W) % H).to(tl.int64)
        n = (offs_p // (W * H)).to(tl.int64)
        c = offs_c.to(tl.int64)[None, :]
        g = tl.load(ga_ptr + (n * sgn + ih * sgh + iw * sgw)[:, None] + c * sgc, mask=ok, other=0.0)
        xv = tl.load(x_ptr + (n * sxn + ih * sxh + iw * sxw)[:, None] + c * sxc, mask=ok, other=0.0)
        sc = tl.load(scale_ptr + offs_c, mask=c_ok, other=0.0)
        sh = tl.load(shift_ptr + offs_c, mask=c_ok, other=0.0)
        xf = xv.to(tl.float32)
        z = tl.fma(xf, sc[None, :], sh[None, :])  # as the forward's activation tile, bit for bit
        # threshold_backward's rule on the ReLU output: the gradient passes unless z <= 0.
        gz = tl.where(ok & ~(z <= 0.0), g.to(tl.float32), 0.0)
        dx = (gz * sc[None, :]).to(dx_ptr.dtype.element_ty)
        tl.store(dx_ptr + (n * sdn + ih * sdh + iw * sdw)[:, None] + c * sdc, dx, mask=ok)
        tl.store(pdscale_ptr + pid_p * C + offs_c, tl.sum(gz * xf, axis=0), mask=c_ok)
        tl.store(pdshift_ptr + pid_p * C + offs_c, tl.sum(gz, axis=0), mask=c_ok)

    @triton.jit
    def _bn_relu_conv_wgrad_kernel(
        gy_ptr,  # *T [N, CO, HO, WO]: dL/dy, any strides
        x_ptr,  # *T [N, C, H, W]: input, any strides
        scale_ptr,  # *f32 [C]
        shift_ptr,  # *f32 [C]
        pdw_ptr,  # *f32 [SPLIT, CO, C, KH, KW], dense: per-split partial dL/dW
        M,  # N * HO * WO: the GEMM's reduction length (output pixels)
        C,  # input channels
        H,  # input height
        W,  # input width
        CO,  # output channels
        HO,  # output height
        WO,  # output width
        sgn, sgc, sgh, sgw,  # grad_y strides
        sxn, sxc, sxh, sxw,  # x strides
        stride_h, stride_w,  # convolution stride
        pad_h, pad_w,  # zero padding (of the activation)
        KH: tl.constexpr,  # kernel height
        KW: tl.constexpr,  # kernel width
        INPUT_PRECISION: tl.constexpr,  # "ieee" or "tf32" for fp32 dots
        BLOCK_CO: tl.constexpr,  # output channels per program
        BLOCK_C: tl.constexpr,  # input channels per program
        BLOCK_P: tl.constexpr,  # output pixels per step of the reduction
    ):  # fmt: skip
        # Grid: (CO tiles, C tiles, KH*KW*SPLIT). One program owns one (co, c) tile of one tap
        # and the pixel blocks s, s + SPLIT, s + 2 SPLIT, ... (split-K for parallelism).
        offs_co = tl.program_id(0) * BLOCK_CO + tl.arange(0, BLOCK_CO)
        offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        co_ok = offs_co < CO
        c_ok = offs_c < C
        pid_t = tl.program_id(2)
        tap = pid_t % (KH * KW)
        split_id = pid_t // (KH * KW)
        num_split = tl.num_programs(2) // (KH * KW)
        kh = tap // KW
        kw = tap % KW
        sc = tl.load(scale_ptr + offs_c, mask=c_ok, other=0.0)
        sh = tl.load(shift_ptr + offs_c, mask=c_ok, other=0.0)
        acc = tl.zeros((BLOCK_CO, BLOCK_C), dtype=tl.float32)
        for p0 in range(split_id * BLOCK_P, M, num_split * BLOCK_P):
            offs_p = p0 + tl.arange(0, BLOCK_P)
            p_ok = offs_p < M
            ow = offs_p % WO
            oh = (offs_p // WO) % HO
            n = (offs_p // (WO * HO)).to(tl.int64)
            gy_row = n * sgn + oh.to(tl.int64) * sgh + ow.to(tl.int64) * sgw
            gy_offs = offs_co[:, None].to(tl.int64) * sgc + gy_row[None, :]
            gy = tl.load(gy_ptr + gy_offs, mask=co_ok[:, None] & p_ok[None, :], other=0.0)
            ih = oh * stride_h - pad_h + kh
            iw = ow * stride_w - pad_w + kw
            tap_ok = p_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            x_row = n * sxn + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw
            # The activation is recomputed here, in the B operand's load; never stored.
            a = _bn_relu_tile(x_ptr, x_row, tap_ok, offs_c, c_ok, sxc, sc, sh)
            acc = tl.dot(gy, a.to(gy.dtype), acc, input_precision=INPUT_PRECISION)
        out = ((split_id * CO + offs_co[:, None]).to(tl.int64) * C + offs_c[None, :]) * (KH * KW) + tap
        tl.store(pdw_ptr + out, acc, mask=co_ok[:, None] & c_ok[None, :])


# ----------------------------------------------------------------------------- launchers
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TRITON_KERNELS = ((1, 1), (3, 3))


def covers(x: torch.Tensor, weight: torch.Tensor, conv: Conv) -> bool:
    """Whether the Triton kernels handle this call (else the triton backend runs the reference path).

    fp64 is not a Triton target (GPU fp64 dots are slow and the models train in fp32/fp16/bf16);
    grouped and dilated convolutions and other kernel sizes are rare in ResNet/DenseNet.
    """
    return (
        x.dtype in _TRITON_DTYPES
        and conv.groups == 1
        and conv.dilation == (1, 1)
        and tuple(weight.shape[2:]) in _TRITON_KERNELS
    )


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


class _Tiles(NamedTuple):
    """A Triton GEMM's tile sizes and launch options (``m, n, k``: the GEMM's rows, columns and
    reduction step as each kernel names them)."""

    m: int
    n: int
    k: int
    num_warps: int
    num_stages: int


def _fwd_tiles(dtype: torch.dtype, c: int, co: int, precision: str) -> _Tiles:
    """Tiles of the forward GEMM (output pixels x output channels, input channels per step).

    Chosen so that no variant spills registers on sm_90 (``make sm90-compile`` prints registers
    and spills of each): a 64x128 tile runs on 8 warps (with 4, every 3x3 and the fp32 1x1
    forwards spilled 0.5-2.8 KB per thread); fp32 steps 32 input channels with 2 stages (with
    64, the 3x3 NCHW forward spilled even on 8 warps), and 16 on 8 warps without tf32 (FMA dots,
    operands in registers: with 32, up to 116 bytes spilled). Starting points, to be autotuned
    on the GPU.
    """
    n = _pow2(co, 16, 128)
    if dtype == torch.float32 and precision == "ieee":
        return _Tiles(64, n, 16, 8, 2)
    warps = 8 if n == 128 else 4
    if dtype == torch.float32:
        return _Tiles(64, n, _pow2(c, 16, 32), warps, 2)
    return _Tiles(64, n, _pow2(c, 16, 64), warps, 3)


def _wgrad_tiles(dtype: torch.dtype, c: int, co: int, precision: str) -> _Tiles:
    """Tiles of the weight-gradient GEMM (output channels x input channels, pixels per step).

    No spills on sm_90: a tile of 32x64 or more runs on 8 warps (with 4, the NCHW variants
    spilled 4-148 bytes per thread); fp32 without tf32 (FMA dots, operands in registers) steps 32 pixels with 2 stages
    (with 64 on 4 warps it spilled 8-12 KB).
    """
    m, n = _pow2(co, 16, 64), _pow2(c, 16, 64)
    warps = 8 if m * n >= 32 * 64 else 4
    if dtype == torch.float32 and precision == "ieee":
        return _Tiles(m, n, 32, warps, 2)
    return _Tiles(m, n, 64, warps, 3)


def _input_precision(dtype: torch.dtype) -> str:
    # fp32 dots follow eager's convolution setting (cuDNN uses tf32 by default on Ampere+).
    return "tf32" if dtype == torch.float32 and torch.backends.cudnn.allow_tf32 else "ieee"


def _vec(v: torch.Tensor) -> torch.Tensor:
    return v.to(torch.float32).contiguous()


def fwd(
    x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, weight: torch.Tensor, conv: Conv, stats: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward on a covered case (:func:`covers`): ``y [N, C_out, Ho, Wo]`` (x's layout) and, with
    ``stats``, the per-output-channel ``Σ y`` and ``Σ y²`` ``[C_out]`` (fp32; else empty)."""
    n, c, h, w = x.shape
    co, _, kh, kw = weight.shape
    ho, wo = conv.out_hw(h, w, kh, kw)
    y = torch.empty((n, co, ho, wo), dtype=x.dtype, device=x.device, memory_format=memory_format(is_channels_last(x)))
    m = n * ho * wo
    t = _fwd_tiles(x.dtype, c, co, _input_precision(x.dtype))  # tl.dot needs every dimension >= 16
    grid = (triton.cdiv(m, t.m), triton.cdiv(co, t.n))
    psum = torch.empty((grid[0] if stats else 0, co), dtype=torch.float32, device=x.device)
    psumsq = torch.empty_like(psum)
    if m and co:
        _bn_relu_conv_fwd_kernel[grid](
            x, _vec(scale), _vec(shift), weight, y, psum, psumsq,
            m, c, h, w, co, ho, wo,
            *x.stride(), *weight.stride(), *y.stride(),
            *conv.stride, *conv.padding,
            KH=kh, KW=kw, STATS=stats, INPUT_PRECISION=_input_precision(x.dtype),
            BLOCK_M=t.m, BLOCK_N=t.n, BLOCK_K=t.k, num_warps=t.num_warps, num_stages=t.num_stages,
        )  # fmt: skip
    if not stats:
        return y, empty0(y, torch.float32), empty0(y, torch.float32)
    return y, psum.sum(dim=0), psumsq.sum(dim=0)


def _prologue_bwd_triton(
    grad_a: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, c, h, w = x.shape
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=memory_format(is_channels_last(x)))
    p = n * h * w
    block_p, block_c = 64, _pow2(c, 1, 64)
    grid = (triton.cdiv(p, block_p), triton.cdiv(c, block_c))
    pdscale = torch.empty((grid[0], c), dtype=torch.float32, device=x.device)
    pdshift = torch.empty_like(pdscale)
    if p and c:
        _bn_relu_prologue_bwd_kernel[grid](
            grad_a, x, _vec(scale), _vec(shift), dx, pdscale, pdshift,
            p, c, h, w, *grad_a.stride(), *x.stride(), *dx.stride(),
            BLOCK_P=block_p, BLOCK_C=block_c,
        )  # fmt: skip
    return dx, pdscale.sum(dim=0).to(scale.dtype), pdshift.sum(dim=0).to(shift.dtype)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _wgrad_split(tiles: int, pixel_blocks: int, device: torch.device) -> int:
    """Split-K factor: enough programs to fill the GPU (about 2 per SM); 1 in the interpreter."""
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    return max(1, min(pixel_blocks, 2 * _sm_count(index) // max(tiles, 1)))


def _wgrad_triton(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    weight: torch.Tensor,
    conv: Conv,
    split: int | None = None,
) -> torch.Tensor:
    """dL/dW as a Triton GEMM ``grad_y^T x relu(x*scale + shift)`` (split-K partials summed by torch)."""
    n, c, h, w = x.shape
    co, _, kh, kw = weight.shape
    ho, wo = grad_y.shape[2:]
    m = n * ho * wo
    precision = _input_precision(x.dtype)
    t = _wgrad_tiles(x.dtype, c, co, precision)
    tiles = triton.cdiv(co, t.m) * triton.cdiv(c, t.n) * kh * kw
    if split is None:
        split = _wgrad_split(tiles, triton.cdiv(m, t.k), x.device)
    if m == 0:
        return torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device)
    pdw = torch.empty((split, co, c, kh, kw), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(co, t.m), triton.cdiv(c, t.n), kh * kw * split)
    _bn_relu_conv_wgrad_kernel[grid](
        grad_y, x, _vec(scale), _vec(shift), pdw,
        m, c, h, w, co, ho, wo,
        *grad_y.stride(), *x.stride(), *conv.stride, *conv.padding,
        KH=kh, KW=kw, INPUT_PRECISION=precision,
        BLOCK_CO=t.m, BLOCK_C=t.n, BLOCK_P=t.k, num_warps=t.num_warps, num_stages=t.num_stages,
    )  # fmt: skip
    return pdw.sum(dim=0).to(weight.dtype)


def _dgrad_input_proxy(x: torch.Tensor) -> torch.Tensor:
    # convolution_backward reads only the shape and layout of `input` for the input gradient;
    # a dense x passes as is (its layout picks the kernel), a strided view as a stride-0 proxy
    # so that nothing copies it.
    if x.is_contiguous() or is_channels_last(x):
        return x
    return x.new_empty((1,)).expand(x.shape)


def bwd(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    weight: torch.Tensor,
    conv: Conv,
    need_input: bool,
    need_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward on a covered case: ``(dx [N, C, H, W], dscale [C], dshift [C], dweight)``; the
    outputs not asked for are empty."""
    dweight = _wgrad_triton(grad_y, x, scale, shift, weight, conv) if need_weight else empty0(weight)
    if not need_input:
        return empty0(x), empty0(scale), empty0(shift), dweight
    # dgrad: the transposed convolution is a plain GEMM with no prologue, left to PyTorch
    # (cuDNN on GPU); only the prologue's backward (mask, dx, dscale, dshift) is fused.
    grad_a = torch.ops.aten.convolution_backward(
        grad_y, _dgrad_input_proxy(x), weight, None, conv.stride, conv.padding, conv.dilation, False, [0, 0],
        conv.groups, [True, False, False],
    )[0]  # fmt: skip
    dx, dscale, dshift = _prologue_bwd_triton(grad_a, x, scale, shift)
    return dx, dscale, dshift, dweight
