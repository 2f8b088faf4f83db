"""Functional fused ops (one module per op): reference, Triton, launchers, registration."""

from fastblocks.ops.add_relu import add_relu, add_relu_reference
from fastblocks.ops.batchnorm import (
    batch_norm_act,
    batch_norm_act_reference,
    bn_stats,
    scale_shift_act,
    sync_batch_norm_act,
    update_running_stats,
)

__all__ = [
    "add_relu",
    "add_relu_reference",
    "batch_norm_act",
    "batch_norm_act_reference",
    "bn_stats",
    "scale_shift_act",
    "sync_batch_norm_act",
    "update_running_stats",
]
