"""Memory-efficient DenseNet dense block: one autograd node (one registered op when traced).

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

torch.compile. Traced (torch.compile, export, FakeTensor), the block is the registered op
``fastblocks::dense_block`` with ``fastblocks::dense_block_backward``: opaque to Inductor, whose
joint-graph common-subexpression pass would otherwise merge the backward's recomputed bottlenecks
with the forward's and the partitioner keep them. Both run the loops of
:mod:`fastblocks.ops._dense_block_steps`, as the eager ``autograd.Function`` does (so the one-call
CPU layer kernels run there too). The backend choice is read once at trace time (a constant of the
graph: changing ``fastblocks.set_backend`` afterwards needs a recompile). With ``drop_rate > 0`` in
training, or synchronized statistics, the block is the ``autograd.Function``: the generator-state
calls (``torch.get_rng_state``) are not traceable, so the graph breaks at each block, which then
runs eagerly; results are unchanged.

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
the prefix view as is: the compiled CPU kernels and the Triton kernels read it in place (an
NCHW prefix through its image stride, a channels_last one through its row stride; no copy); the
CUDA extension's launchers (``csrc/cuda/ops_cuda.cpp``) make a dense copy of it first. norm1's
input gradient is added into the block's gradient buffer in place on the compiled CPU backend
(``bn_bwd_reduce_add_``: with the sums, one pass) and on Triton (the kernel table's
``bwd_apply_add``: after the sums' pass); the CUDA and reference backends write a temporary
and add it.
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
    check_train_batch,
    sync_group,
    unbiased_correction,
    update_running_stats,
)
from fastblocks.ops._common import (
    acc_dtype,
    cast_weight,
    check_tensor,
    compute_dtype_of,
    eager_path,
    empty0,
    fake_channel_vectors,
    is_channels_last,
    memory_format,
    needs_graph,
    no_autocast,
    schemas_defined,
)
from fastblocks.ops._dense_block_steps import PER_LAYER, BlockConfig, block_backward, block_forward

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


_KEEP_RATIO = 4  # default: keep layer i's bottleneck when C_i >= 4 B (see dense_block)


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


# ----------------------------------------------------------------------------- autograd
class _DenseBlockFunction(torch.autograd.Function):
    """The whole dense block as one autograd node for eager calls, dropout and synchronized
    statistics (see the module docstring for the math)."""

    @staticmethod
    def forward(ctx, x, cfg: BlockConfig, group, *tensors):
        nparams = cfg.num_layers * PER_LAYER
        params, running = tensors[:nparams], tensors[nparams:]
        kept: list[torch.Tensor] = []
        buf, mean1, var1, mean2, var2, rng, total = block_forward(x, cfg, params, running, True, group, kept)
        ctx.cfg, ctx.c0, ctx.group, ctx.total = cfg, x.shape[1], group, total  # total: no grad_fn (no cycle)
        ctx.counts = (len(params), len(running), len(rng))
        ctx.save_for_backward(buf, mean1, var1, mean2, var2, *params, *running, *rng, *kept)
        ctx.mark_non_differentiable(mean1, var1, mean2, var2)
        if total is not None:
            ctx.mark_non_differentiable(total)
        return buf, mean1, var1, mean2, var2, total

    @staticmethod
    def backward(ctx, grad_buf, *_stats_grads):
        saved = ctx.saved_tensors
        nparams, nrun, nrng = ctx.counts
        params, rest = saved[5 : 5 + nparams], saved[5 + nparams :]
        dx, grads = block_backward(
            grad_buf, saved[0], saved[1:5], params, rest[:nrun], rest[nrun : nrun + nrng], rest[nrun + nrng :],
            ctx.cfg, ctx.c0, ctx.group, ctx.total,
        )  # fmt: skip
        return (dx, None, None, *grads)


# Under torch.compile (and other tracing) the block is a registered op, opaque to Inductor: its
# joint-graph CSE would merge the backward's recomputed bottlenecks with the forward's, and the
# partitioner would then keep them (the memory the block exists to save). Without dropout in
# training and without synchronized statistics (those take the autograd node above).
@torch.library.custom_op("fastblocks::dense_block", mutates_args=())
def _dense_block_op(
    x: torch.Tensor,
    params: list[torch.Tensor],
    running: list[torch.Tensor],
    eps1: list[float],
    eps2: list[float],
    keep: list[bool],
    training: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Registered op: ``(buf, mean1, var1, mean2, var2, kept bottlenecks)`` of :func:`block_forward`.

    ``params``: ``PER_LAYER`` per layer (norm1 weight, bias, conv1 weight, norm2 weight, bias,
    conv2 weight; an absent BN weight or bias is an empty tensor: a list of optional tensors could
    not take gradients); ``running``: ``PER_LAYER_RUNNING`` per layer in eval, empty in training."""
    kept: list[torch.Tensor] = []
    buf, mean1, var1, mean2, var2, _, _ = block_forward(
        x, _op_config(params, eps1, eps2, keep, training), _present(params), running, False, None, kept
    )
    return buf, mean1, var1, mean2, var2, kept


def _op_config(params, eps1, eps2, keep, training: bool) -> BlockConfig:
    return BlockConfig(
        num_layers=len(eps1), growth_rate=params[5].shape[0], eps1=tuple(eps1), eps2=tuple(eps2), drop_rate=0.0,
        training=training, keep=tuple(keep),
    )  # fmt: skip


@_dense_block_op.register_fake
def _(x, params, running, eps1, eps2, keep, training):
    n, c0, h, w = x.shape
    nl, k, bott = len(eps1), params[5].shape[0], params[2].shape[0]
    fmt = memory_format(is_channels_last(x))
    buf = x.new_empty((n, c0 + nl * k, h, w)).contiguous(memory_format=fmt)
    sd = acc_dtype(x.dtype)
    if training:
        mean1, mean2 = x.new_empty(c0 + (nl - 1) * k, dtype=sd), x.new_empty((nl, bott), dtype=sd)
        stats = (mean1, torch.empty_like(mean1), mean2, torch.empty_like(mean2))
    else:
        stats = tuple(x.new_empty(0, dtype=sd) for _ in range(4))
    kept = [x.new_empty((n, bott, h, w)).contiguous(memory_format=fmt) for i in range(nl) if keep[i]]
    return buf, *stats, kept


@torch.library.custom_op("fastblocks::dense_block_backward", mutates_args=())
def _dense_block_backward_op(
    grad_buf: torch.Tensor,
    buf: torch.Tensor,
    mean1: torch.Tensor,
    var1: torch.Tensor,
    mean2: torch.Tensor,
    var2: torch.Tensor,
    params: list[torch.Tensor],
    running: list[torch.Tensor],
    kept: list[torch.Tensor],
    eps1: list[float],
    eps2: list[float],
    keep: list[bool],
    training: bool,
    c0: int,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Registered op: ``(dx, grads)``, one gradient per entry of ``params`` (empty for an absent one)."""
    cfg = _op_config(params, eps1, eps2, keep, training)
    dx, grads = block_backward(grad_buf, buf, (mean1, var1, mean2, var2), _present(params), running, (), kept, cfg, c0)
    return dx, [_like_param(g, p) for g, p in zip(grads, params)]


def _present(params: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """The op's parameter list with each absent (empty) BN weight or bias as ``None``."""
    return [p if p.numel() else None for p in params]


def _like_param(g: torch.Tensor | None, p: torch.Tensor) -> torch.Tensor:
    """``g`` with ``p``'s dtype and strides (what the fake kernel promises); empty for an absent ``p``."""
    if g is None:
        return torch.empty_like(p)
    if g.dtype == p.dtype and g.stride() == p.stride():
        return g
    return torch.empty_like(p).copy_(g)


@_dense_block_backward_op.register_fake
def _(grad_buf, buf, mean1, var1, mean2, var2, params, running, kept, eps1, eps2, keep, training, c0):
    n, _, h, w = buf.shape
    dx = buf.new_empty((n, c0, h, w)).contiguous(memory_format=memory_format(is_channels_last(buf)))
    return dx, [torch.empty_like(p) for p in params]


def _dense_block_setup_context(ctx, inputs, output) -> None:
    x, params, running, eps1, eps2, keep, training = inputs
    buf, mean1, var1, mean2, var2, kept = output
    ctx.args = (list(eps1), list(eps2), list(keep), training, x.shape[1])
    ctx.counts = (len(params), len(running))
    ctx.has_param = [p.numel() > 0 for p in params]
    ctx.save_for_backward(buf, mean1, var1, mean2, var2, *params, *running, *kept)


def _dense_block_autograd(ctx, grad_buf, *_grads):
    saved = ctx.saved_tensors
    nparams, nrun = ctx.counts
    params, rest = list(saved[5 : 5 + nparams]), saved[5 + nparams :]
    dx, grads = _dense_block_backward_op(grad_buf, *saved[:5], params, list(rest[:nrun]), list(rest[nrun:]), *ctx.args)
    grads = [g if has else None for g, has in zip(grads, ctx.has_param)]
    return dx, grads, [None] * nrun, None, None, None, None


_dense_block_op.register_autograd(_dense_block_autograd, setup_context=_dense_block_setup_context)


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
    cfg = BlockConfig(
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
        if group is None and not (training and drop_rate > 0) and not eager_path(xc):  # traced: the registered op
            present = [empty0(xc, acc_dtype(xc.dtype)) if p is None else p for p in flat]
            # Without a backward to come, no bottleneck is kept (each is freed once used).
            keep = list(cfg.keep) if needs_graph([xc, *flat]) else [False] * len(layers)
            buf, mean1, var1, mean2, var2, _ = _dense_block_op(
                xc, present, running, list(cfg.eps1), list(cfg.eps2), keep, training
            )
            total = None
        elif needs_graph([xc, *flat]):
            buf, mean1, var1, mean2, var2, total = _DenseBlockFunction.apply(xc, cfg, group, *flat, *running)
        else:
            buf, mean1, var1, mean2, var2, _, total = block_forward(xc, cfg, flat, running, False, group)
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

    ``stats`` = (mean1, var1, mean2, var2) of :func:`block_forward`. Fixed-momentum BNs are
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
