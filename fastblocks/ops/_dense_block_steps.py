"""The dense block's forward and backward loops, layer by layer (the math and the memory plan
are in :mod:`fastblocks.ops.dense_block`'s docstring). Both the autograd node used by eager calls
and the registered ops ``fastblocks::dense_block`` / ``dense_block_backward`` (traced calls) run
them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from fastblocks import _backend
from fastblocks.ops._bn_core import all_reduce_pair, dx_coefficients, global_stats, kernels_for, scale_shift
from fastblocks.ops._common import acc_dtype, conv_backward, is_channels_last, memory_format, no_autocast
from fastblocks.ops.dense_layer import one_call_layers


@dataclass(frozen=True)
class BlockConfig:
    """The block's non-tensor arguments (one per block call)."""

    num_layers: int
    growth_rate: int
    eps1: tuple[float, ...]
    eps2: tuple[float, ...]
    drop_rate: float
    training: bool
    keep: tuple[bool, ...] = ()  # per layer: backward reuses the bottleneck kept by forward


PER_LAYER = 6  # norm1 weight, norm1 bias, conv1 weight, norm2 weight, norm2 bias, conv2 weight
PER_LAYER_RUNNING = 4  # norm1 running mean/var, norm2 running mean/var (eval only)


def rng_state(device: torch.device) -> torch.Tensor:
    """The generator state of ``device`` (a uint8 tensor), from which :func:`dropout_noise` redraws a mask."""
    if device.type == "cpu":
        return torch.get_rng_state()
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    raise NotImplementedError(f"dense_block: drop_rate > 0 is supported on cpu and cuda tensors, not {device.type}")


def dropout_noise(state: torch.Tensor, like: torch.Tensor, p: float, channels_last: bool) -> torch.Tensor:
    """``F.dropout(ones)`` drawn from generator ``state``: forward's mask times ``1/(1-p)``."""
    device = like.device
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type):
        if device.type == "cuda":
            torch.cuda.set_rng_state(state, device)
        else:
            torch.set_rng_state(state)
        ones = torch.empty(like.shape, dtype=like.dtype, device=device, memory_format=memory_format(channels_last))
        return F.dropout(ones.fill_(1), p, True)


def channel_rows(t: torch.Tensor, start: int, stop: int, cl: bool) -> torch.Tensor:
    """Channels ``[start, stop)`` of a dense 4-D ``t`` (laid out as ``cl`` says) as a 2-D view:
    ``[N, (stop - start) H W]`` (NCHW) or ``[N H W, stop - start]`` (channels_last).

    Copies and in-place adds into a 4-D channel slice ``t[:, start:stop]`` take a slow strided
    path in PyTorch's CPU kernels (several times slower than the same bytes as a 2-D view for a
    dense layer's 32-channel chunk); the dense block writes such slices every layer.
    """
    n, c, h, w = t.shape
    if cl:
        return t.permute(0, 2, 3, 1).view(n * h * w, c)[:, start:stop]
    return t.view(n, c * h * w)[:, start * h * w : stop * h * w]


def rows_of(t: torch.Tensor, cl: bool) -> torch.Tensor:
    """A 4-D ``t`` as :func:`channel_rows` lays out all its channels (a copy unless t is dense in that layout)."""
    n, c, h, w = t.shape
    if cl:
        return t.permute(0, 2, 3, 1).reshape(n * h * w, c)
    return t.reshape(n, c * h * w)


def block_forward(
    x: torch.Tensor,
    cfg: BlockConfig,
    params: Sequence[torch.Tensor | None],
    running: Sequence[torch.Tensor | None],
    save_rng: bool,
    group: object | None = None,
    kept: list[torch.Tensor] | None = None,
) -> tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor], torch.Tensor | None
]:
    """Forward of the block; returns (buf, mean1, var1, mean2, var2, rng_states, total).

    With a ``kept`` list, the bottleneck of every layer with ``cfg.keep[i]`` is appended to it
    (for backward); otherwise each bottleneck is freed once used.

    Training: ``mean1/var1`` ``[C0 + (L-1) k]`` are the chunk statistics (the last chunk's are
    not needed by the block), ``mean2/var2`` ``[L, B]`` the bottlenecks'. Eval: empty.
    With a ``group`` every statistic is global (:func:`global_stats`, one all_gather when the
    chunk or bottleneck is produced: ``2 L`` in all) and ``total`` is the global count per
    channel (0-d tensor); without, ``total`` is ``None``.
    """
    n, c0, h, w = x.shape
    nl, k = cfg.num_layers, cfg.growth_rate
    cl = is_channels_last(x)
    sd = acc_dtype(x.dtype)
    kern = kernels_for("dense_block", x.device)
    buf = torch.empty((n, c0 + nl * k, h, w), dtype=x.dtype, device=x.device, memory_format=memory_format(cl))
    channel_rows(buf, 0, c0, cl).copy_(rows_of(x, cl))
    bott_ch = params[2].shape[0]
    count, total = n * h * w, None
    if cfg.training:
        mean1 = torch.empty(c0 + (nl - 1) * k, dtype=sd, device=x.device)
        var1 = torch.empty_like(mean1)
        mean2 = torch.empty((nl, bott_ch), dtype=sd, device=x.device)
        var2 = torch.empty_like(mean2)
        m, v = kern.stats(x, cl)
        if group is not None:
            m, v, total = global_stats(m, v, count, group)
        mean1[:c0].copy_(m)
        var1[:c0].copy_(v)
    else:
        mean1, var1, mean2, var2 = (torch.empty(0, dtype=sd, device=x.device) for _ in range(4))  # no aliases
    rng: list[torch.Tensor] = []
    one_call = one_call_layers(x.device, cfg.training and cfg.drop_rate > 0, group)
    for i in range(nl):
        g1, b1, w1, g2, b2, w2 = params[i * PER_LAYER : (i + 1) * PER_LAYER]
        ci = c0 + i * k
        if one_call:  # the same steps as below, in C++
            if cfg.training:
                stats = mean1, var1, mean2[i], var2[i]
            else:
                stats = tuple(t.to(sd) for t in running[i * PER_LAYER_RUNNING : (i + 1) * PER_LAYER_RUNNING])
            keep = kept is not None and cfg.keep[i]
            bott = torch.ops.fastblocks.dense_layer_fwd_.default(
                buf, *stats, g1, b1, w1, g2, b2, w2, cfg.eps1[i], cfg.eps2[i], ci, k, cfg.training,
                cfg.training and i < nl - 1, keep, cl,
            )  # fmt: skip
            if keep:
                kept.append(bott)
            continue
        if cfg.training:
            m1, v1 = mean1[:ci], var1[:ci]
        else:
            m1, v1 = running[i * PER_LAYER_RUNNING].to(sd), running[i * PER_LAYER_RUNNING + 1].to(sd)
        s1, t1, _ = scale_shift(m1, v1, g1, b1, cfg.eps1[i])
        bott = F.conv2d(kern.apply(buf[:, :ci], s1, t1, None, True, cl), w1)
        if cfg.training:
            m2, v2 = kern.stats(bott, cl)
            if group is not None:
                m2, v2, _ = global_stats(m2, v2, count, group)
            mean2[i].copy_(m2)
            var2[i].copy_(v2)
        else:
            m2, v2 = running[i * PER_LAYER_RUNNING + 2].to(sd), running[i * PER_LAYER_RUNNING + 3].to(sd)
        s2, t2, _ = scale_shift(m2, v2, g2, b2, cfg.eps2[i])
        y = F.conv2d(kern.apply(bott, s2, t2, None, True, cl), w2, padding=1)
        if kept is not None and cfg.keep[i]:
            kept.append(bott)
        del bott
        if cfg.training and cfg.drop_rate > 0:
            if save_rng:
                rng.append(rng_state(x.device))
            y = F.dropout(y, cfg.drop_rate, True)
        if cfg.training and i < nl - 1:
            m, v = kern.stats(y, cl)
            if group is not None:
                m, v, _ = global_stats(m, v, count, group)
            mean1[ci : ci + k].copy_(m)
            var1[ci : ci + k].copy_(v)
        channel_rows(buf, ci, ci + k, cl).copy_(rows_of(y, cl))
    return buf, mean1, var1, mean2, var2, rng, total


def fold_stats_grad(
    kern,
    g: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    gmu: torch.Tensor,
    gvar: torch.Tensor,
    m: int | torch.Tensor,
    cl: bool,
    group: object | None = None,
    g_rows: torch.Tensor | None = None,
) -> None:
    """``g += gmu/M + (2 gvar/M)(x - mean)`` in place: the gradient through a chunk's statistics.

    ``g_rows``: g's channels as :func:`channel_rows` views them, when g is a channel slice
    (written through that view, the fast path).

    With a ``group``, ``gmu``/``gvar`` are this rank's shares of ``∂L/∂mu``, ``∂L/∂var`` (sums
    over its pixels); the global statistics depend on every rank's chunk, so the shares are
    summed over the ranks first and ``M`` is the global count.
    """
    if group is not None:
        gmu, gvar = all_reduce_pair(gmu, gvar, group)
    b = 2.0 * gvar / m
    c = gmu / m - b * mean
    one = torch.ones_like(b)
    new = kern.bwd_apply(g, x, one, torch.zeros_like(b), None, one, b, c, False, cl)
    if g_rows is None:
        g.copy_(new)
    else:
        g_rows.copy_(rows_of(new, cl))


def block_backward(
    grad_buf: torch.Tensor,
    buf: torch.Tensor,
    stats: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    params: Sequence[torch.Tensor | None],
    running: Sequence[torch.Tensor | None],
    rng: Sequence[torch.Tensor],
    kept: Sequence[torch.Tensor],
    cfg: BlockConfig,
    c0: int,
    group: object | None = None,
    total: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """Backward of the block (derived in :mod:`fastblocks.ops.dense_block`): ``(dx, grads)``.

    ``grad_buf`` and ``buf`` ``[N, C0 + L k, H, W]``; ``stats`` = (mean1, var1, mean2, var2) and
    ``rng``, ``kept`` as :func:`block_forward` returned them; ``dx`` ``[N, C0, H, W]`` in buf's
    layout; ``grads`` one per entry of ``params`` then ``running`` (``None`` for an absent
    parameter and for the running buffers).
    """
    nl, k, cl = cfg.num_layers, cfg.growth_rate, is_channels_last(buf)
    mean1, var1, mean2, var2 = stats
    nparams = nl * PER_LAYER
    nrun = len(running)
    kept = list(kept)  # in layer order; popped from the end
    has_param = [t is not None for t in params]
    kern = kernels_for("dense_block", buf.device)
    sd = acc_dtype(buf.dtype)
    n, _, h, w = buf.shape
    m = n * h * w if group is None else total  # the count behind the statistics
    grads: list[torch.Tensor | None] = [None] * (nparams + nrun)
    # norm1's sums and its direct dx share in one pass over the prefix, added into G in place
    # (else bn_bwd_reduce, then bn_bwd_apply into a temporary added to G: three passes more).
    direct_add = _backend.cpu_kernels("dense_block", buf.device, "bn_bwd_reduce_add_")
    with no_autocast(buf.device.type):
        g = torch.empty_like(buf)  # the one gradient buffer
        g.copy_(grad_buf)
        gmu, gvar = torch.zeros_like(mean1), torch.zeros_like(var1)  # empty in eval
        one_call = one_call_layers(buf.device, cfg.training and cfg.drop_rate > 0, group)
        for i in reversed(range(nl)):
            g1, b1, w1, g2, b2, w2 = params[i * PER_LAYER : (i + 1) * PER_LAYER]
            ci = c0 + i * k
            base = i * PER_LAYER
            if one_call:  # the same steps as below, in C++
                if cfg.training:
                    layer_stats = mean1, var1, mean2[i], var2[i]
                else:
                    layer_stats = tuple(t.to(sd) for t in running[i * PER_LAYER_RUNNING : (i + 1) * PER_LAYER_RUNNING])
                layer_grads = torch.ops.fastblocks.dense_layer_bwd_.default(
                    g, gmu, gvar, buf, *layer_stats, g1, b1, w1, g2, b2, w2, kept.pop() if cfg.keep[i] else None,
                    cfg.eps1[i], cfg.eps2[i], ci, k, cfg.training, cfg.training and i < nl - 1, cl,
                )  # fmt: skip
                grads[base : base + PER_LAYER] = layer_grads
                continue
            out = slice(ci, ci + k)
            if cfg.training and i < nl - 1:
                # Layers i+1.. (every consumer of chunk i+1) are done: finish its gradient.
                fold_stats_grad(
                    kern, g[:, out], buf[:, out], mean1[out], gmu[out], gvar[out], m, cl, group,
                    g_rows=channel_rows(g, ci, ci + k, cl),
                )  # fmt: skip
            dy = g[:, out]
            if cfg.training and cfg.drop_rate > 0:
                dy = dy * dropout_noise(rng[i], dy, cfg.drop_rate, cl)
            # Recompute the bottleneck with the saved statistics (no running-stat update).
            if cfg.training:
                m1, v1, m2, v2 = mean1[:ci], var1[:ci], mean2[i], var2[i]
            else:
                m1, v1, m2, v2 = (t.to(sd) for t in running[i * PER_LAYER_RUNNING : (i + 1) * PER_LAYER_RUNNING])
            s1, t1, inv1 = scale_shift(m1, v1, g1, b1, cfg.eps1[i])
            s2, t2, inv2 = scale_shift(m2, v2, g2, b2, cfg.eps2[i])
            x_pre = buf[:, :ci]
            a1 = kern.apply(x_pre, s1, t1, None, True, cl)
            bott = kept.pop() if cfg.keep[i] else F.conv2d(a1, w1)
            a2 = kern.apply(bott, s2, t2, None, True, cl)
            da2, dw2 = conv_backward(dy, a2, w2, 1)
            del a2, dy
            # norm2 + relu2: training-mode BN backward (its statistics depend on bott only).
            sg2, sgx2 = kern.bwd_reduce(da2, bott, m2, s2, t2, None, True, cl)
            # Synchronized: dbott needs the sums over the global batch (parameter gradients
            # keep the local ones, as nn.SyncBatchNorm: DDP averages them).
            sums2 = (sg2, sgx2) if group is None else all_reduce_pair(sg2, sgx2, group)
            ca, cb, cc = dx_coefficients(g2, m2, inv2, *sums2, m, cfg.training)
            dbott = kern.bwd_apply(da2, bott, s2, t2, None, ca, cb, cc, True, cl)
            del da2, bott
            da1, dw1 = conv_backward(dbott, a1, w1, 0)
            del dbott, a1
            # norm1 + relu1 with the statistics held fixed; their share goes to gmu/gvar.
            if direct_add:  # sums and G[:, :C_i] += s1 g1' in one pass over the prefix
                sg1, sgx1 = torch.ops.fastblocks.bn_bwd_reduce_add_.default(g[:, :ci], da1, x_pre, m1, s1, t1, True, cl)
            else:
                sg1, sgx1 = kern.bwd_reduce(da1, x_pre, m1, s1, t1, None, True, cl)
                zero = torch.zeros_like(s1)
                if kern.bwd_apply_add is not None:  # G[:, :C_i] += s1 g1' in place (Triton)
                    kern.bwd_apply_add(g[:, :ci], da1, x_pre, s1, t1, s1, zero, zero, True, cl)
                else:
                    channel_rows(g, 0, ci, cl).add_(
                        rows_of(kern.bwd_apply(da1, x_pre, s1, t1, None, s1, zero, zero, True, cl), cl)
                    )
            del da1
            if cfg.training:
                gmu[:ci] -= s1 * sg1
                gvar[:ci] -= 0.5 * s1 * inv1 * inv1 * sgx1
            layer_grads = (inv1 * sgx1, sg1, dw1, inv2 * sgx2, sg2, dw2)
            for j, (gr, has) in enumerate(zip(layer_grads, has_param[base : base + PER_LAYER])):
                if has:
                    grads[base + j] = gr.to(params[base + j].dtype)
        if cfg.training:
            fold_stats_grad(
                kern, g[:, :c0], buf[:, :c0], mean1[:c0], gmu[:c0], gvar[:c0], m, cl, group,
                g_rows=channel_rows(g, 0, c0, cl),
            )  # fmt: skip
        dx = g[:, :c0].contiguous(memory_format=memory_format(cl))
    return dx, grads
