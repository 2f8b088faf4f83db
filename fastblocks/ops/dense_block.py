"""Memory-efficient DenseNet dense block: the whole block as one autograd node.

What is fused. A DenseNet layer computes ``conv3x3(relu(bn2(conv1x1(relu(bn1(cat(features)))))))``
(Huang et al. 2017, "Densely Connected Convolutional Networks", BC variant). Eager PyTorch
materialises ``cat(features)`` for every layer and keeps, per layer, the concatenation, the
bn1/relu1 output, the bottleneck and the bn2/relu2 output: memory quadratic in depth. Here
(the design of Pleiss et al. 2017, "Memory-Efficient Implementation of DenseNets", without
their shared-storage tricks, because one autograd node owns everything):

- one buffer per block ``[N, C0 + L*k, H, W]`` (x's memory format). The input is copied into
  the first ``C0`` channels; layer ``i`` reads the channel prefix ``buf[:, :C_i]``
  (``C_i = C0 + i*k``) as a view and writes its ``k`` new channels into ``buf[:, C_i:C_i+k]``.
  No ``torch.cat``; the block output *is* the buffer;
- the batch statistics (mean, biased var) of every chunk (the input's ``C0`` channels, then
  each layer's ``k``) are computed once, when the chunk is produced, and every later layer's
  bn1 reuses them: the statistics of a prefix are the concatenation of its chunks' (BN
  statistics are per channel), only gamma/beta differ per layer;
- forward saves the buffer, the per-channel statistics and the parameters, and the bottleneck
  ``conv1(relu(norm1(.)))`` of the layers chosen by ``keep_bottleneck`` (by default those whose
  input has at least ``4 B`` channels: recomputing their 1x1 convolution costs ``C_i``
  multiply-adds per kept element, the most per byte). Backward walks the layers in reverse,
  recomputes each other bottleneck from the buffer with the saved statistics (no
  running-statistics update), and accumulates the gradient in one buffer ``G`` of the
  buffer's shape.

Bytes saved for backward by a DenseNet-201 training forward, fp32, parameters excluded,
storages de-duplicated (tests/models/test_densenet.py::test_saved_bytes_densenet201_224,
``pytest -m slow``), with this block, ``dense_transition`` and the fused stem below:
    8x3x224x224: eager 1549 MiB, torchvision checkpointing 543 MiB (35.0%); fused 96.3 MiB
    (6.2%) with the default ``keep_bottleneck``, 59.6 MiB (3.84%) with every bottleneck
    recomputed; lower bound (the four block buffers + the input) 54.9 MiB (3.55%). The rest is
    the final ReLU's output (kept by the global average pool), the stem's max-pool winners
    (1.5 MiB) and the statistics vectors.
    2x3x64x64: eager 32.5 MiB, fused 2.14 MiB (6.6%) / 1.39 MiB (4.3%), lower bound 1.12 MiB (3.5%).

Backward derivation (one layer ``i``, names as in ``_DenseBlockFunction.backward``).
``X = buf[:, :C_i]``, its chunk statistics ``mu1, var1`` (``[C_i]``), ``inv1 = (var1+eps)^-1/2``,
``s1 = g1 inv1`` (scale), ``t1 = b1 - mu1 s1`` (shift), ``M = N H W``:
    a1 = relu(X s1 + t1);  bott = conv1(a1);  a2 = relu(bott s2 + t2);  y = conv2(a2)
    buf[:, C_i:C_i+k] = dropout(y)
Given ``dy`` (the finished gradient of the layer's output chunk, see below):
    da2, dw2 = conv2 backward(dy, a2)
    norm2 is ordinary training-mode BN (its statistics depend on ``bott`` only), with
    sg2 = Σ g2', sgx2 = Σ g2' (bott - mu2)  (g2' = da2 masked by relu2):
        dbott = s2 g2' + b (bott) + c,  b = -s2 inv2² sgx2 / M,  c = -s2 sg2 / M - b mu2
        dg2 = inv2 sgx2,  db2 = sg2
    da1, dw1 = conv1 backward(dbott, a1)
    norm1 with the statistics held fixed (their dependence on the chunks is handled apart),
    sg1 = Σ g1', sgx1 = Σ g1' (X - mu1):
        G[:, :C_i] += s1 g1'                                  (the "direct" part)
        dg1 = inv1 sgx1,  db1 = sg1
        gmu[:C_i]  += ∂L/∂mu1  = Σ g1' (-s1)                  = -s1 sg1
        gvar[:C_i] += ∂L/∂var1 = Σ g1' g1 (X-mu1) (-½ inv1³)  = -½ s1 inv1² sgx1
The chunk statistics are functions of their chunk: ``mu = Σx/M`` and ``var = Σ(x-mu)²/M``, so
``∂mu/∂x = 1/M`` and ``∂var/∂x = 2 (x - mu)/M`` (the ``-2/M² Σ(x-mu)`` term is zero). Once every
consumer of a chunk has run its backward (every layer after the one that produced it), the
chunk's gradient is finished by folding the accumulated ``gmu, gvar`` into it:
        G[:, chunk] += gmu/M + (2 gvar/M) (x - mu)
Walking the layers in reverse makes this exact: before layer ``i``'s backward, layers
``i+1..L-1`` (the only consumers of chunk ``i+1``) are done. For one layer alone this reduces
to the usual BN backward ``dx = a g' + b x + c`` of ``fastblocks.ops.batchnorm``.

Dropout (``drop_rate > 0``, ``F.dropout`` after each layer as in torchvision): forward calls
``F.dropout`` exactly as eager does (so, with the same seed, the same masks as the eager model)
after saving the generator state of x's device (``torch.get_rng_state`` /
``torch.cuda.get_rng_state``) per layer. Backward restores it inside ``torch.random.fork_rng``
and draws ``F.dropout(ones)`` of the same shape, dtype and layout: the same mask times
``1/(1-p)``. No mask is stored and the global generator is left as it was.

Mixed precision. Under ``torch.autocast`` the block computes in the autocast dtype (fp16/bf16):
the input and the conv weights are cast once before the autograd node (so their casts'
backward returns gradients in the parameters' dtypes), the buffer and the bottleneck are in
that dtype, BN statistics and scale/shift are fp32, and autocast is disabled inside forward
and backward so every conv runs in that one dtype. Without autocast everything is in x's dtype
(the conv weights must have it, as for ``F.conv2d``).

Synchronized BatchNorm (DDP). When the norms carry a ``process_group``, set by
``fastblocks.nn.convert_sync_batchnorm(model, group)`` (it turns the layers' and transitions'
``nn.BatchNorm2d`` into fastblocks ``BatchNorm2d`` holding the group; ``BatchNormParams.from_module``
reads it), in training, with ``torch.distributed`` initialized and more than one rank in the
group, each rank holds its share of the batch and every statistic is the global batch's. The
design is unchanged; only the sums cross ranks:
- forward: each chunk's ``(count, mean, M2)`` ``[3, C]`` is all-gathered once, when the chunk is
  produced, and combined with Chan et al.'s formula (exact and stable, as
  ``fastblocks.ops.batchnorm.sync_batch_norm_act``); every later norm1 reuses the global chunk
  statistics. Each bottleneck's norm2 statistics likewise. ``M`` above becomes the global
  count (a 0-d tensor: no host synchronization); the running buffers are updated once, from
  the global statistics and count;
- backward: the recomputation uses the saved global statistics (no collective). The per-channel
  sums behind dx are summed over the ranks: norm2's ``sg2, sgx2`` are all-reduced before
  ``dbott``; norm1's ``gmu, gvar`` are accumulated locally over every consumer layer and
  all-reduced once per chunk, just before the chunk's gradient is finished (the local share of
  ``∂L/∂mu, ∂L/∂var``, summed, is the global one). The direct part ``s1 g1'`` needs no sum; the
  parameter gradients keep the local sums (DDP averages them, as with ``nn.SyncBatchNorm``);
- cost of a block of ``L`` layers: forward ``2 L`` all_gathers (the input's ``[3, C0]``, ``L``
  bottlenecks' ``[3, B]``, ``L - 1`` chunks' ``[3, k]``), backward ``2 L`` all-reduces (``L`` of
  ``[2, B]``, ``L`` of ``[2, k]`` or ``[2, C0]``); each needs the result of the one before, so
  they are not batched. The transition and the stem: one each way. As many collectives as
  ``nn.SyncBatchNorm`` in torchvision's eager block, but norm1 exchanges ``k`` channels per layer
  instead of the whole ``C_i`` prefix. Saved for backward: the same tensors (global statistics
  in place of local ones) and the 0-d global count.
Without a group, with a group of one rank, without ``torch.distributed`` or in eval: no
collective, the single-process code as it was.

torch.compile. The block (like the transition and the stem) is ``torch.autograd.Function``s built
from traceable pieces: Dynamo traces their forward and backward (``backend="aot_eager"`` runs
a whole DenseNet with ``fullgraph=True``). The backend choice is read once at trace time (a
constant of the graph: changing ``fastblocks.set_backend`` afterwards needs a recompile). With
``drop_rate > 0`` the generator-state calls (``torch.get_rng_state``) are not traceable: the
graph breaks at each block, which then runs eagerly; results are unchanged.

On the compiled CPU backend (eager calls) each layer's backward is one C++ call,
``fastblocks::dense_layer_bwd_`` (the fold of its output chunk, the recomputation, both BN-ReLU
backwards and both convolution backwards, the per-channel steps): the same steps as the Python
loop, without its two dozen Python-level tensor operations per layer; scale and shift come from
the same ATen operations as the forward's, so the recomputed ReLU masks are the forward's. Inside
it, and in the Python loop that runs with dropout or synchronized statistics, norm1's backward is
one pass over the prefix (``fastblocks::bn_bwd_reduce_add_``): the sums ``sg1, sgx1`` and
``G[:, :C_i] += s1 g1'`` written into the gradient buffer in place. Other backends (and
torch.compile) run ``bn_bwd_reduce``, then ``bn_bwd_apply`` into a temporary added to ``G``: three
more passes over the prefix per layer.

Limits: the bottleneck convs are ``torch`` convolutions on the (transient) activation; the
BN-ReLU prologue fusion into the 1x1 GEMM is future work. The kernel-table functions take
the prefix view as is: the compiled CPU kernels read an NCHW prefix through its image stride
(no copy); the Triton and CUDA launchers, and the CPU ones for a channels_last buffer, make a
dense copy of it first.
Synchronized: the "more than 1 value per channel" check applies to each rank's own batch
(``nn.SyncBatchNorm`` checks the global one); ``torch.compile`` of a synchronized model is
untested (tests/models/test_densenet_ddp.py runs it eagerly).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from fastblocks import _backend
from fastblocks.ops._bn_core import (
    COMPILED,
    BatchNormParams,
    all_reduce_pair,
    check_train_batch,
    dx_coefficients,
    global_stats,
    kernels_for,
    scale_shift,
    sync_group,
    unbiased_correction,
    update_running_stats,
)
from fastblocks.ops._common import (
    acc_dtype,
    cast_weight,
    check_tensor,
    compute_dtype_of,
    conv_backward,
    fake_channel_vectors,
    is_channels_last,
    memory_format,
    needs_graph,
    no_autocast,
    schemas_defined,
)
from fastblocks.ops.dense_layer import one_call_layers

_backend.register_op(_backend.OpSpec(name="dense_block", triton=True, compiled=COMPILED))


# ----------------------------------------------------------------------------- parameters
@dataclass(frozen=True)
class DenseLayerParams:
    """One DenseNet-BC layer: ``conv2(relu(norm2(conv1(relu(norm1(prefix))))))``.

    Attributes:
        norm1: BatchNorm over the layer's ``C_i = C0 + i*k`` input channels.
        conv1_weight: ``[B, C_i, 1, 1]`` (``B = bn_size * k``), no bias.
        norm2: BatchNorm over ``B`` channels.
        conv2_weight: ``[k, B, 3, 3]`` (padding 1), no bias.
    """

    norm1: BatchNormParams
    conv1_weight: torch.Tensor
    norm2: BatchNormParams
    conv2_weight: torch.Tensor

    @classmethod
    def from_module(cls, layer: torch.nn.Module) -> DenseLayerParams:
        """From a module with torchvision's ``norm1``/``conv1``/``norm2``/``conv2`` attributes."""
        return cls(
            BatchNormParams.from_module(layer.norm1),
            layer.conv1.weight,
            BatchNormParams.from_module(layer.norm2),
            layer.conv2.weight,
        )


@dataclass(frozen=True)
class _BlockConfig:
    num_layers: int
    growth_rate: int
    eps1: tuple[float, ...]
    eps2: tuple[float, ...]
    drop_rate: float
    training: bool
    keep: tuple[bool, ...] = ()  # per layer: backward reuses the bottleneck kept by forward


_KEEP_RATIO = 4  # default: keep layer i's bottleneck when C_i >= 4 B (see dense_block)
_PER_LAYER = 6  # norm1 weight, norm1 bias, conv1 weight, norm2 weight, norm2 bias, conv2 weight
_PER_LAYER_RUNNING = 4  # norm1 running mean/var, norm2 running mean/var (eval only)


# ----------------------------------------------------------------------------- reference
def dense_block_reference(
    x: torch.Tensor,
    layers: Sequence[DenseLayerParams],
    *,
    training: bool,
    drop_rate: float = 0.0,
) -> torch.Tensor:
    """The specification: torchvision's eager dense block (``torch.cat`` and ``F.batch_norm``).

    Updates the running buffers as ``nn.BatchNorm2d`` does (``num_batches_tracked`` included).
    Shapes as :func:`dense_block`.
    """
    features = [x]
    for p in layers:
        h = torch.cat(features, 1)
        for bn, weight, padding in ((p.norm1, p.conv1_weight, 0), (p.norm2, p.conv2_weight, 1)):
            factor = bn.step(training)
            h = F.batch_norm(
                h, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                training or bn.running_mean is None, factor, bn.eps,
            )  # fmt: skip
            h = F.conv2d(torch.relu(h), weight, padding=padding)
        if drop_rate > 0:
            h = F.dropout(h, p=drop_rate, training=training)
        features.append(h)
    return torch.cat(features, 1)


# ----------------------------------------------------------------------------- helpers
def _rng_state(device: torch.device) -> torch.Tensor:
    if device.type == "cpu":
        return torch.get_rng_state()
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    raise NotImplementedError(f"dense_block: drop_rate > 0 is supported on cpu and cuda tensors, not {device.type}")


def _dropout_noise(state: torch.Tensor, like: torch.Tensor, p: float, channels_last: bool) -> torch.Tensor:
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


# ----------------------------------------------------------------------------- dense block
def _channel_rows(t: torch.Tensor, start: int, stop: int, cl: bool) -> torch.Tensor:
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


def _rows_of(t: torch.Tensor, cl: bool) -> torch.Tensor:
    """A 4-D ``t`` as :func:`_channel_rows` lays out all its channels (a copy unless t is dense in that layout)."""
    n, c, h, w = t.shape
    if cl:
        return t.permute(0, 2, 3, 1).reshape(n * h * w, c)
    return t.reshape(n, c * h * w)


def _block_forward(
    x: torch.Tensor,
    cfg: _BlockConfig,
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
    With a ``group`` every statistic is global (:func:`_global_stats`, one all_gather when the
    chunk or bottleneck is produced: ``2 L`` in all) and ``total`` is the global count per
    channel (0-d tensor); without, ``total`` is ``None``.
    """
    n, c0, h, w = x.shape
    nl, k = cfg.num_layers, cfg.growth_rate
    cl = is_channels_last(x)
    sd = acc_dtype(x.dtype)
    kern = kernels_for("dense_block", x.device)
    buf = torch.empty((n, c0 + nl * k, h, w), dtype=x.dtype, device=x.device, memory_format=memory_format(cl))
    _channel_rows(buf, 0, c0, cl).copy_(_rows_of(x, cl))
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
        mean1 = var1 = mean2 = var2 = torch.empty(0, dtype=sd, device=x.device)
    rng: list[torch.Tensor] = []
    one_call = one_call_layers(x.device, cfg.training and cfg.drop_rate > 0, group)
    for i in range(nl):
        g1, b1, w1, g2, b2, w2 = params[i * _PER_LAYER : (i + 1) * _PER_LAYER]
        ci = c0 + i * k
        if one_call:  # the same steps as below, in C++
            if cfg.training:
                stats = mean1, var1, mean2[i], var2[i]
            else:
                stats = tuple(t.to(sd) for t in running[i * _PER_LAYER_RUNNING : (i + 1) * _PER_LAYER_RUNNING])
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
            m1, v1 = running[i * _PER_LAYER_RUNNING].to(sd), running[i * _PER_LAYER_RUNNING + 1].to(sd)
        s1, t1, _ = scale_shift(m1, v1, g1, b1, cfg.eps1[i])
        bott = F.conv2d(kern.apply(buf[:, :ci], s1, t1, None, True, cl), w1)
        if cfg.training:
            m2, v2 = kern.stats(bott, cl)
            if group is not None:
                m2, v2, _ = global_stats(m2, v2, count, group)
            mean2[i].copy_(m2)
            var2[i].copy_(v2)
        else:
            m2, v2 = running[i * _PER_LAYER_RUNNING + 2].to(sd), running[i * _PER_LAYER_RUNNING + 3].to(sd)
        s2, t2, _ = scale_shift(m2, v2, g2, b2, cfg.eps2[i])
        y = F.conv2d(kern.apply(bott, s2, t2, None, True, cl), w2, padding=1)
        if kept is not None and cfg.keep[i]:
            kept.append(bott)
        del bott
        if cfg.training and cfg.drop_rate > 0:
            if save_rng:
                rng.append(_rng_state(x.device))
            y = F.dropout(y, cfg.drop_rate, True)
        if cfg.training and i < nl - 1:
            m, v = kern.stats(y, cl)
            if group is not None:
                m, v, _ = global_stats(m, v, count, group)
            mean1[ci : ci + k].copy_(m)
            var1[ci : ci + k].copy_(v)
        _channel_rows(buf, ci, ci + k, cl).copy_(_rows_of(y, cl))
    return buf, mean1, var1, mean2, var2, rng, total


def _fold_stats_grad(
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

    ``g_rows``: g's channels as :func:`_channel_rows` views them, when g is a channel slice
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
        g_rows.copy_(_rows_of(new, cl))


class _DenseBlockFunction(torch.autograd.Function):
    """The whole dense block as one autograd node (see the module docstring for the math)."""

    @staticmethod
    def forward(ctx, x, cfg: _BlockConfig, group, *tensors):
        nparams = cfg.num_layers * _PER_LAYER
        params, running = tensors[:nparams], tensors[nparams:]
        kept: list[torch.Tensor] = []
        buf, mean1, var1, mean2, var2, rng, total = _block_forward(x, cfg, params, running, True, group, kept)
        ctx.cfg, ctx.c0, ctx.channels_last = cfg, x.shape[1], is_channels_last(x)
        ctx.group, ctx.total = group, total  # total: not an input, no grad_fn (no reference cycle)
        ctx.has_param = [t is not None for t in params]
        ctx.n_rng = len(rng)
        ctx.save_for_backward(buf, mean1, var1, mean2, var2, *params, *running, *rng, *kept)
        ctx.mark_non_differentiable(mean1, var1, mean2, var2)
        if total is not None:
            ctx.mark_non_differentiable(total)
        return buf, mean1, var1, mean2, var2, total

    @staticmethod
    def backward(ctx, grad_buf, *_stats_grads):
        cfg: _BlockConfig = ctx.cfg
        nl, k, c0, cl = cfg.num_layers, cfg.growth_rate, ctx.c0, ctx.channels_last
        saved = ctx.saved_tensors
        buf, mean1, var1, mean2, var2 = saved[:5]
        nparams = nl * _PER_LAYER
        params = saved[5 : 5 + nparams]
        nrun = 0 if cfg.training else nl * _PER_LAYER_RUNNING
        running = saved[5 + nparams : 5 + nparams + nrun]
        rng = saved[5 + nparams + nrun : 5 + nparams + nrun + ctx.n_rng]
        kept = list(saved[5 + nparams + nrun + ctx.n_rng :])  # in layer order; popped from the end
        kern = kernels_for("dense_block", buf.device)
        sd = acc_dtype(buf.dtype)
        n, _, h, w = buf.shape
        group = ctx.group
        m = n * h * w if group is None else ctx.total  # the count behind the statistics
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
                g1, b1, w1, g2, b2, w2 = params[i * _PER_LAYER : (i + 1) * _PER_LAYER]
                ci = c0 + i * k
                base = i * _PER_LAYER
                if one_call:  # the same steps as below, in C++
                    if cfg.training:
                        stats = mean1, var1, mean2[i], var2[i]
                    else:
                        stats = tuple(t.to(sd) for t in running[i * _PER_LAYER_RUNNING : (i + 1) * _PER_LAYER_RUNNING])
                    layer_grads = torch.ops.fastblocks.dense_layer_bwd_.default(
                        g, gmu, gvar, buf, *stats, g1, b1, w1, g2, b2, w2, kept.pop() if cfg.keep[i] else None,
                        cfg.eps1[i], cfg.eps2[i], ci, k, cfg.training, cfg.training and i < nl - 1, cl,
                    )  # fmt: skip
                    grads[base : base + _PER_LAYER] = layer_grads
                    continue
                out = slice(ci, ci + k)
                if cfg.training and i < nl - 1:
                    # Layers i+1.. (every consumer of chunk i+1) are done: finish its gradient.
                    _fold_stats_grad(
                        kern, g[:, out], buf[:, out], mean1[out], gmu[out], gvar[out], m, cl, group,
                        g_rows=_channel_rows(g, ci, ci + k, cl),
                    )  # fmt: skip
                dy = g[:, out]
                if cfg.training and cfg.drop_rate > 0:
                    dy = dy * _dropout_noise(rng[i], dy, cfg.drop_rate, cl)
                # Recompute the bottleneck with the saved statistics (no running-stat update).
                if cfg.training:
                    m1, v1, m2, v2 = mean1[:ci], var1[:ci], mean2[i], var2[i]
                else:
                    m1, v1, m2, v2 = (t.to(sd) for t in running[i * _PER_LAYER_RUNNING : (i + 1) * _PER_LAYER_RUNNING])
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
                    sg1, sgx1 = torch.ops.fastblocks.bn_bwd_reduce_add_.default(
                        g[:, :ci], da1, x_pre, m1, s1, t1, True, cl
                    )
                else:
                    sg1, sgx1 = kern.bwd_reduce(da1, x_pre, m1, s1, t1, None, True, cl)
                    zero = torch.zeros_like(s1)
                    _channel_rows(g, 0, ci, cl).add_(
                        _rows_of(kern.bwd_apply(da1, x_pre, s1, t1, None, s1, zero, zero, True, cl), cl)
                    )
                del da1
                if cfg.training:
                    gmu[:ci] -= s1 * sg1
                    gvar[:ci] -= 0.5 * s1 * inv1 * inv1 * sgx1
                layer_grads = (inv1 * sgx1, sg1, dw1, inv2 * sgx2, sg2, dw2)
                for j, (gr, has) in enumerate(zip(layer_grads, ctx.has_param[base : base + _PER_LAYER])):
                    if has:
                        grads[base + j] = gr.to(params[base + j].dtype)
            if cfg.training:
                _fold_stats_grad(
                    kern, g[:, :c0], buf[:, :c0], mean1[:c0], gmu[:c0], gvar[:c0], m, cl, group,
                    g_rows=_channel_rows(g, 0, c0, cl),
                )  # fmt: skip
            dx = g[:, :c0].contiguous(memory_format=memory_format(cl))
        return (dx, None, None, *grads)


def _check_block(x: torch.Tensor, layers: Sequence[DenseLayerParams], training: bool) -> tuple[int, int]:
    """Validate shapes; returns (growth_rate k, bottleneck channels B)."""
    check_tensor(x, "x", dim=4)
    if len(layers) == 0:
        raise ValueError("dense_block needs at least one layer")
    c0 = x.shape[1]
    k = layers[0].conv2_weight.shape[0]
    bott = layers[0].conv1_weight.shape[0]
    for i, p in enumerate(layers):
        ci = c0 + i * k
        if p.norm1.num_features not in (None, ci):
            raise ValueError(
                f"layer {i}: norm1 has {p.norm1.num_features} channels but its input has {ci} "
                f"(x has {c0} channels, growth rate {k})"
            )
        if tuple(p.conv1_weight.shape) != (bott, ci, 1, 1):
            raise ValueError(
                f"layer {i}: conv1_weight must have shape {(bott, ci, 1, 1)}, got {tuple(p.conv1_weight.shape)}"
            )
        if p.norm2.num_features not in (None, bott):
            raise ValueError(f"layer {i}: norm2 has {p.norm2.num_features} channels, expected {bott}")
        if tuple(p.conv2_weight.shape) != (k, bott, 3, 3):
            raise ValueError(
                f"layer {i}: conv2_weight must have shape {(k, bott, 3, 3)}, got {tuple(p.conv2_weight.shape)}"
            )
        for bn, name in ((p.norm1, "norm1"), (p.norm2, "norm2")):
            if not training and (bn.running_mean is None or bn.running_var is None):
                raise ValueError(f"layer {i}: {name} has no running statistics: eval mode needs them")
        for t, name in ((p.conv1_weight, "conv1_weight"), (p.conv2_weight, "conv2_weight")):
            if t.device != x.device:
                raise ValueError(f"layer {i}: {name} is on {t.device} but x is on {x.device}")
    check_train_batch(x.shape, training)
    return k, bott


def dense_block(
    x: torch.Tensor,
    layers: Sequence[DenseLayerParams],
    *,
    training: bool,
    drop_rate: float = 0.0,
    keep_bottleneck: bool | None = None,
) -> torch.Tensor:
    """A DenseNet dense block, memory-efficient: ``[N, C0, H, W] -> [N, C0 + L*k, H, W]``.

    Output equals torchvision's ``_DenseBlock`` (``cat([x, y_1, ..., y_L], 1)``, ``y_i`` the
    new features of layer ``i``). One autograd node; saves the output buffer and per-channel
    statistics only (see the module docstring).

    Args:
        x: ``[N, C0, H, W]``, NCHW or channels_last (the output has the same layout).
        layers: ``L`` layers; layer ``i`` has ``norm1`` over ``C0 + i*k`` channels,
            ``conv1_weight [B, C0 + i*k, 1, 1]``, ``norm2`` over ``B``, ``conv2_weight [k, B, 3, 3]``.
        training: normalize with batch statistics and update every BN's running buffers
            exactly once (``num_batches_tracked`` too); else use the running statistics.
        drop_rate: dropout probability after each layer (training only), as torchvision.
        keep_bottleneck: whether forward keeps each layer's bottleneck ``conv1(relu(norm1(.)))``
            (``[N, B, H, W]``) for backward, which then skips recomputing that 1x1 convolution.
            ``None`` (default): kept for the layers whose input has at least ``4 B`` channels,
            where the recomputation costs the most per kept byte (``C_i`` multiply-adds per
            element); in DenseNet-121/169/201 (``B = 128``) that is most layers of the last two
            blocks, at 7x7 and 14x14. ``True``: every layer; ``False``: none (least memory).

    Synchronized BatchNorm: when the norms carry a ``process_group`` (all the same one) with more
    than one rank and ``training``, ``x`` is this rank's share of the batch and every batch
    statistic is that of the global batch (``2 L`` all_gathers of small ``[3, C]`` vectors
    forward, ``2 L`` all-reduces of ``[2, C]`` backward; see the module docstring).

    Returns:
        ``[N, C0 + L*k, H, W]`` in x's dtype (the autocast dtype under autocast) and layout.
    """
    k, bott_ch = _check_block(x, layers, training)
    if keep_bottleneck is not None and not isinstance(keep_bottleneck, bool):
        raise TypeError(f"keep_bottleneck must be None, True or False, got {keep_bottleneck!r}")
    group = sync_group([bn for p in layers for bn in (p.norm1, p.norm2)], training)
    cd = compute_dtype_of(x)
    flat: list[torch.Tensor | None] = []
    for i, p in enumerate(layers):
        flat += [
            p.norm1.weight, p.norm1.bias, cast_weight(p.conv1_weight, x, cd, f"layer {i} conv1_weight"),
            p.norm2.weight, p.norm2.bias, cast_weight(p.conv2_weight, x, cd, f"layer {i} conv2_weight"),
        ]  # fmt: skip
    running: list[torch.Tensor | None] = []
    if not training:
        for p in layers:
            running += [p.norm1.running_mean, p.norm1.running_var, p.norm2.running_mean, p.norm2.running_var]
    cfg = _BlockConfig(
        num_layers=len(layers),
        growth_rate=k,
        eps1=tuple(float(p.norm1.eps) for p in layers),
        eps2=tuple(float(p.norm2.eps) for p in layers),
        drop_rate=float(drop_rate),
        training=training,
        keep=tuple(
            (x.shape[1] + i * k >= _KEEP_RATIO * bott_ch) if keep_bottleneck is None else keep_bottleneck
            for i in range(len(layers))
        ),
    )
    xc = x.to(cd)
    with no_autocast(x.device.type):
        if needs_graph([xc, *flat]):
            buf, mean1, var1, mean2, var2, total = _DenseBlockFunction.apply(xc, cfg, group, *flat, *running)
        else:
            buf, mean1, var1, mean2, var2, _, total = _block_forward(xc, cfg, flat, running, False, group)
    if training:
        count = x.shape[0] * x.shape[2] * x.shape[3] if total is None else total
        _update_block_running_stats(layers, (mean1, var1, mean2, var2), x.shape[1], k, count)
    return buf


@torch.no_grad()
def _update_block_running_stats(
    layers: Sequence[DenseLayerParams],
    stats: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    c0: int,
    k: int,
    count: int | torch.Tensor,
) -> None:
    """Every norm1/norm2 once, as ``nn.BatchNorm2d``: norm1 of layer i sees the prefix's stats.

    ``stats`` = (mean1, var1, mean2, var2) of :func:`_block_forward`. Fixed-momentum BNs are
    updated with four multi-tensor (``torch._foreach_*``) calls in all instead of several small
    kernels each: DenseNet-201 has 196 BatchNorms in its dense blocks.
    """
    mean1, var1, mean2, var2 = stats
    # running_var stores the unbiased variance. A synchronized count is a 0-d tensor: no host sync.
    correction = unbiased_correction(count)
    unbiased1, unbiased2 = var1 * correction, var2 * correction
    groups: dict[tuple[float, torch.dtype], list[list[torch.Tensor]]] = {}
    counters: list[torch.Tensor] = []
    for i, p in enumerate(layers):
        ci = c0 + i * k
        for bn, mean, var, unbiased in (
            (p.norm1, mean1[:ci], var1[:ci], unbiased1[:ci]),
            (p.norm2, mean2[i], var2[i], unbiased2[i]),
        ):
            if bn.running_mean is None:
                continue
            if bn.momentum is None:  # cumulative average: the factor depends on this BN's counter
                if bn.num_batches_tracked is not None:
                    bn.num_batches_tracked.add_(1)
                update_running_stats(bn.running_mean, bn.running_var, mean, var, count, None, bn.num_batches_tracked)
                continue
            if bn.num_batches_tracked is not None:
                counters.append(bn.num_batches_tracked)
            lists = groups.setdefault((float(bn.momentum), bn.running_mean.dtype), [[], [], [], []])
            lists[0].append(bn.running_mean)
            lists[1].append(bn.running_var)
            lists[2].append(mean.to(bn.running_mean.dtype))
            lists[3].append(unbiased.to(bn.running_var.dtype))
    if counters:
        torch._foreach_add_(counters, 1)
    for (momentum, _), (rm, rv, bm, bv) in groups.items():
        torch._foreach_mul_(rm, 1.0 - momentum)
        torch._foreach_add_(rm, bm, alpha=momentum)
        torch._foreach_mul_(rv, 1.0 - momentum)
        torch._foreach_add_(rv, bv, alpha=momentum)


if schemas_defined("bn_bwd_reduce_add_"):

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
        return fake_channel_vectors(x, 2)
