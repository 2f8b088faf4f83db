"""Fused residual add + ReLU: ``out = relu(x + residual)``.

What is fused: the add and the ReLU run in one pass (read x and residual once, write out once)
and the backward keeps a 1-bit-per-element mask instead of a full tensor.

Bytes kept for backward, per element, against eager ``torch.relu(x + y)``:
eager's ReLU saves its output (4 bytes in fp32, 2 in fp16/bf16, 8 in fp64); here 1/8 byte.
Saving: 3.875 B/element in fp32, 1.875 B/element in fp16/bf16. Memory traffic per element,
forward: eager reads 2 and writes 1 tensor for the add, then reads 1 and writes 1 for the
ReLU (5 passes); fused reads 2 and writes 1 (+1/8 byte of mask).

The mask: bit ``j`` of byte ``b`` is set when element ``8*b + j`` of ``out`` (in memory order of
the op's layout) satisfies ``not (out <= 0)``. This is ``threshold_backward``'s rule, so NaN
outputs pass their gradient exactly as eager does; the mask is taken from the stored, rounded
output, so fp16/bf16 agree with eager too.

Layout: when ``x`` is channels_last, ``out`` is channels_last and the kernels walk memory in
NHWC order; otherwise contiguous. ``residual`` is brought to ``x``'s layout if it differs.

Limits: ``x`` and ``residual`` must have the same shape, dtype and device (no broadcasting,
no type promotion; the error names the argument).
"""

from __future__ import annotations

import torch

from fastblocks import _backend, _ext
from fastblocks.ops._common import (
    check_like,
    check_tensor,
    eager_function,
    eager_path,
    flat_in_memory_order,
    is_channels_last,
    memory_format,
    unflatten_memory_order,
)
from fastblocks.ops._declarations import AccuracyDeclaration, BenchDeclaration, OpDeclaration, declare
from fastblocks.ops._triton import tl, triton

SPEC = _backend.register_op(_backend.OpSpec(name="add_relu", triton=True, compiled=("add_relu_fwd", "add_relu_bwd")))


# ----------------------------------------------------------------------------- reference
def add_relu_reference(x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """The specification: ``torch.relu(x + residual)`` (eager PyTorch, any shape)."""
    return torch.relu(x + residual)


def pack_mask(keep: torch.Tensor) -> torch.Tensor:
    """Pack a 1-D bool tensor ``[n]`` into ``[ceil(n/8)]`` uint8, bit j of byte b = keep[8b+j]."""
    n = keep.numel()
    bits = torch.nn.functional.pad(keep.to(torch.uint8), (0, (-n) % 8)).view(-1, 8)
    weights = torch.tensor([1 << j for j in range(8)], dtype=torch.uint8, device=keep.device)
    return (bits * weights).sum(dim=1, dtype=torch.uint8)


def unpack_mask(mask: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_mask`: ``[ceil(n/8)]`` uint8 -> ``[n]`` bool."""
    shifts = torch.arange(8, dtype=torch.uint8, device=mask.device)
    return ((mask[:, None] >> shifts) & 1).view(-1)[:n].bool()


def _fwd_reference(x: torch.Tensor, residual: torch.Tensor, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    out = add_relu_reference(x, residual).contiguous(memory_format=memory_format(channels_last))
    keep = ~(flat_in_memory_order(out, channels_last) <= 0)
    return out, pack_mask(keep)


def _bwd_reference(grad_out: torch.Tensor, mask: torch.Tensor, channels_last: bool) -> torch.Tensor:
    g = flat_in_memory_order(grad_out.contiguous(memory_format=memory_format(channels_last)), channels_last)
    keep = unpack_mask(mask, g.numel())
    gi = torch.where(keep, g, torch.zeros((), dtype=g.dtype, device=g.device))
    return unflatten_memory_order(gi, grad_out.shape, channels_last)


# ----------------------------------------------------------------------------- Triton kernels
if triton is not None:

    @triton.jit
    def _add_relu_fwd_kernel(
        x_ptr,  # *T [n]: input, dense in the op's layout
        r_ptr,  # *T [n]: residual, same layout as x
        out_ptr,  # *T [n]: relu(x + r)
        mask_ptr,  # *u8 [ceil(n/8)]: bit j of byte b = not (out[8b+j] <= 0)
        n,  # number of elements
        COMPUTE: tl.constexpr,  # tl.float32, or tl.float64 for fp64 inputs
        BLOCK_BYTES: tl.constexpr,  # mask bytes per program; 8 * BLOCK_BYTES elements
    ):
        byte = tl.program_id(0).to(tl.int64) * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
        bit = tl.arange(0, 8)
        offs = byte[:, None] * 8 + bit[None, :]
        inb = offs < n
        x = tl.load(x_ptr + offs, mask=inb, other=0.0).to(COMPUTE)
        r = tl.load(r_ptr + offs, mask=inb, other=0.0).to(COMPUTE)
        s = x + r
        o = tl.where(s < 0.0, 0.0, s).to(out_ptr.dtype.element_ty)  # NaN and -0 stay, as torch.relu
        tl.store(out_ptr + offs, o, mask=inb)
        keep = tl.where(o.to(COMPUTE) <= 0.0, 0, 1)
        bits = tl.sum(keep << bit[None, :], axis=1)
        tl.store(mask_ptr + byte, bits.to(tl.uint8), mask=byte * 8 < n)

    @triton.jit
    def _add_relu_bwd_kernel(
        g_ptr,  # *T [n]: grad of out, dense in the op's layout
        mask_ptr,  # *u8 [ceil(n/8)]: the forward's mask
        gi_ptr,  # *T [n]: grad of x (and of residual)
        n,  # number of elements
        BLOCK_BYTES: tl.constexpr,  # mask bytes per program
    ):
        byte = tl.program_id(0).to(tl.int64) * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
        bit = tl.arange(0, 8)
        offs = byte[:, None] * 8 + bit[None, :]
        inb = offs < n
        bits = tl.load(mask_ptr + byte, mask=byte * 8 < n, other=0).to(tl.int32)
        keep = ((bits[:, None] >> bit[None, :]) & 1) != 0
        g = tl.load(g_ptr + offs, mask=inb, other=0.0)
        tl.store(gi_ptr + offs, tl.where(keep, g, tl.zeros_like(g)), mask=inb)


_BLOCK_BYTES = 512  # 4096 elements per program


def _fwd_triton(x: torch.Tensor, residual: torch.Tensor, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    fmt = memory_format(channels_last)
    xc, rc = x.contiguous(memory_format=fmt), residual.contiguous(memory_format=fmt)
    out = torch.empty_like(xc, memory_format=fmt)
    n = xc.numel()
    mask = torch.empty((n + 7) // 8, dtype=torch.uint8, device=x.device)
    if n:
        compute = tl.float64 if x.dtype == torch.float64 else tl.float32
        grid = (triton.cdiv(n, 8 * _BLOCK_BYTES),)
        _add_relu_fwd_kernel[grid](xc, rc, out, mask, n, COMPUTE=compute, BLOCK_BYTES=_BLOCK_BYTES)
    return out, mask


def _bwd_triton(grad_out: torch.Tensor, mask: torch.Tensor, channels_last: bool) -> torch.Tensor:
    fmt = memory_format(channels_last)
    g = grad_out.contiguous(memory_format=fmt)
    gi = torch.empty_like(g, memory_format=fmt)
    n = g.numel()
    if n:
        grid = (triton.cdiv(n, 8 * _BLOCK_BYTES),)
        _add_relu_bwd_kernel[grid](g, mask, gi, n, BLOCK_BYTES=_BLOCK_BYTES)
    return gi


# ----------------------------------------------------------------------------- compiled (C++/CUDA)
def _fwd_compiled(x: torch.Tensor, residual: torch.Tensor, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.fastblocks.add_relu_fwd.default(x, residual, channels_last)


def _bwd_compiled(grad_out: torch.Tensor, mask: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return torch.ops.fastblocks.add_relu_bwd.default(grad_out, mask, channels_last)


_FWD = {"reference": _fwd_reference, "triton": _fwd_triton, "cpu": _fwd_compiled, "cuda": _fwd_compiled}
_BWD = {"reference": _bwd_reference, "triton": _bwd_triton, "cpu": _bwd_compiled, "cuda": _bwd_compiled}


# ----------------------------------------------------------------------------- registration
def _check(x: torch.Tensor, residual: torch.Tensor) -> None:
    check_tensor(x, "x")
    check_tensor(residual, "residual")
    check_like(residual, "residual", x, "x")


def _fake_fwd(x: torch.Tensor, residual: torch.Tensor, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    out = torch.empty_like(x, memory_format=memory_format(channels_last))
    return out, x.new_empty(((x.numel() + 7) // 8,), dtype=torch.uint8)


@torch.library.custom_op("fastblocks::add_relu", mutates_args=())
def _add_relu_op(x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Registered op: ``(relu(x + residual), 1-bit ReLU mask)``."""
    _check(x, residual)
    backend = _backend.resolve("add_relu", x.device)
    return _FWD[backend](x, residual, is_channels_last(x))


@_add_relu_op.register_fake
def _(x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _check(x, residual)
    return _fake_fwd(x, residual, is_channels_last(x))


@torch.library.custom_op("fastblocks::add_relu_backward", mutates_args=())
def _add_relu_backward_op(grad_out: torch.Tensor, mask: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """Registered op: gradient of :func:`add_relu` w.r.t. x (and residual)."""
    backend = _backend.resolve("add_relu", grad_out.device)
    return _BWD[backend](grad_out, mask, channels_last)


@_add_relu_backward_op.register_fake
def _(grad_out: torch.Tensor, mask: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return torch.empty_like(grad_out, memory_format=memory_format(channels_last))


def _setup_context(ctx, inputs, output) -> None:
    _backend.remember(ctx)
    ctx.channels_last = is_channels_last(inputs[0])
    ctx.save_for_backward(output[1])


@_backend.backward_on_forward_backend
def _backward(ctx, grad_out: torch.Tensor, _grad_mask: torch.Tensor | None):
    (mask,) = ctx.saved_tensors
    grad = _add_relu_backward_op(grad_out, mask, ctx.channels_last)
    return grad, grad


def _setup_context_bwd(ctx, inputs, output) -> None:
    _backend.remember(ctx)
    ctx.channels_last = inputs[2]
    ctx.save_for_backward(inputs[1])


@_backend.backward_on_forward_backend
def _backward_bwd(ctx, gg: torch.Tensor):
    # The backward is linear in grad_out with the same mask: its own gradient is itself.
    (mask,) = ctx.saved_tensors
    return _add_relu_backward_op(gg, mask, ctx.channels_last), None, None


_add_relu_op.register_autograd(_backward, setup_context=_setup_context)
_add_relu_backward_op.register_autograd(_backward_bwd, setup_context=_setup_context_bwd)


def _backward_direct(ctx, grad_out, _grad_mask):
    if grad_out is None:
        return None, None
    (mask,) = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph: the registered op carries the double backward
        grad = _add_relu_backward_op(grad_out, mask, ctx.channels_last)
    else:
        grad = _BWD[_backend.resolve("add_relu", grad_out.device)](grad_out, mask, ctx.channels_last)
    return grad, grad


_AddReLUFunction = eager_function(
    "add_relu",
    lambda x, residual: _FWD[_backend.resolve("add_relu", x.device)](x, residual, is_channels_last(x)),
    _setup_context,
    _backward_direct,
    non_differentiable=lambda inputs, output: output[1:],  # the mask
    materialize_grads=False,  # no zero-filled gradient for the (n/8-byte) mask
    once_differentiable=False,
)


if _ext.loaded():
    torch.library.register_fake("fastblocks::add_relu_fwd")(_fake_fwd)

    @torch.library.register_fake("fastblocks::add_relu_bwd")
    def _(grad_out: torch.Tensor, mask: torch.Tensor, channels_last: bool) -> torch.Tensor:
        return torch.empty_like(grad_out, memory_format=memory_format(channels_last))


# ----------------------------------------------------------------------------- public functional
def add_relu(x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``relu(x + residual)`` in one pass, keeping a 1-bit mask for backward.

    Args:
        x: ``[*]`` floating tensor (e.g. ``[N, C, H, W]``, NCHW or channels_last).
        residual: same shape, dtype and device as ``x``.

    Returns:
        ``[*]`` tensor, same shape and dtype as ``x``, channels_last when ``x`` is.

    Raises:
        TypeError / ValueError: naming the argument, on a non-tensor, a non-floating dtype,
            or a shape, dtype or device mismatch.
    """
    _check(x, residual)
    op = _AddReLUFunction.apply if eager_path(x) else _add_relu_op
    return op(x, residual)[0]


# ----------------------------------------------------------------------------- the shared tables
def _accuracy_inputs(x: torch.Tensor, g: torch.Generator) -> list[torch.Tensor]:
    # The residual cancels x exactly at a fifth of the elements: ReLU decisions at exactly 0.
    cancel = torch.rand(x.shape, generator=g, dtype=x.dtype) < 0.2
    return [x, torch.where(cancel, -x, torch.randn(x.shape, generator=g, dtype=x.dtype))]


def _bench_functions(channels: int, device: torch.device, fused: bool):
    return (add_relu if fused else add_relu_reference), []


def _sm90_launches(empty, shape, channels_last):
    x = empty(shape)
    mask = torch.empty((x.numel() + 7) // 8, dtype=torch.uint8)
    return [
        ("fwd", _fwd_triton, (x, empty(shape), channels_last)),
        ("bwd", _bwd_triton, (empty(shape), mask, channels_last)),
    ]


declare(
    OpDeclaration(
        "add_relu",
        bench=BenchDeclaration(
            registered="add_relu",
            passes=(3, 2),  # read x, r, write out; read g, write dx (plus the mask each way)
            mask_bits=True,
            gpu_shapes=((256, 256, 56, 56),),  # ResNet-50 conv2_x output at batch 256
            cpu_shapes=((8, 64, 56, 56),),
            functions=_bench_functions,
        ),
        accuracy=AccuracyDeclaration(add_relu_reference, add_relu, _accuracy_inputs),
        sm90_launches=_sm90_launches,
    )
)
