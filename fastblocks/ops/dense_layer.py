"""The dense layer's one-call CPU kernels, ``fastblocks::dense_layer_fwd_`` and
``dense_layer_bwd_`` (csrc/cpu/dense_layer.cpp): their fake kernels and when the dense block uses
them.

Each runs one layer of :func:`fastblocks.ops.dense_block.dense_block` in one C++ call (the fold of
its output chunk's statistics gradient, the recomputation, both BN-ReLU steps and both
convolutions; the same steps as the block's Python loop, whose derivation and names it follows),
without one to two dozen Python-level tensor operations per layer. They mutate the block's buffers
in place (``buf``, the statistics; ``g``, ``gmu``, ``gvar`` backward), so they serve eager calls
only: under torch.compile the block runs its kernel-table steps, which Inductor sees.
"""

from __future__ import annotations

import torch

from fastblocks import _backend
from fastblocks.ops._common import memory_format, schemas_defined


def one_call_layers(device: torch.device, dropout: bool, group: object | None) -> bool:
    """Whether each layer's forward and backward are one C++ call each: eager CPU calls on the
    compiled backend, without dropout (``dropout``: training with ``drop_rate > 0``) and without
    synchronized statistics (``group``)."""
    if group is not None or dropout:
        return False
    return _backend.cpu_kernels("dense_block", device, "dense_layer_fwd_", "dense_layer_bwd_")


if schemas_defined("dense_layer_fwd_", "dense_layer_bwd_"):

    @torch.library.register_fake("fastblocks::dense_layer_bwd_")
    def _(
        g: torch.Tensor,
        gmu: torch.Tensor,
        gvar: torch.Tensor,
        buf: torch.Tensor,
        mean1: torch.Tensor,
        var1: torch.Tensor,
        mean2: torch.Tensor,
        var2: torch.Tensor,
        weight1: torch.Tensor | None,
        bias1: torch.Tensor | None,
        conv1_weight: torch.Tensor,
        weight2: torch.Tensor | None,
        bias2: torch.Tensor | None,
        conv2_weight: torch.Tensor,
        bottleneck: torch.Tensor | None,
        eps1: float,
        eps2: float,
        ci: int,
        k: int,
        training: bool,
        fold: bool,
        channels_last: bool,
    ) -> tuple[torch.Tensor | None, ...]:
        def like(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else torch.empty_like(t, memory_format=torch.contiguous_format)

        return like(weight1), like(bias1), like(conv1_weight), like(weight2), like(bias2), like(conv2_weight)

    @torch.library.register_fake("fastblocks::dense_layer_fwd_")
    def _(
        buf: torch.Tensor,
        mean1: torch.Tensor,
        var1: torch.Tensor,
        mean2: torch.Tensor,
        var2: torch.Tensor,
        weight1: torch.Tensor | None,
        bias1: torch.Tensor | None,
        conv1_weight: torch.Tensor,
        weight2: torch.Tensor | None,
        bias2: torch.Tensor | None,
        conv2_weight: torch.Tensor,
        eps1: float,
        eps2: float,
        ci: int,
        k: int,
        training: bool,
        chunk_stats: bool,
        keep: bool,
        channels_last: bool,
    ) -> torch.Tensor | None:
        if not keep:
            return None
        shape = (buf.shape[0], conv1_weight.shape[0], buf.shape[2], buf.shape[3])
        return buf.new_empty(shape).contiguous(memory_format=memory_format(channels_last))
