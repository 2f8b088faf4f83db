"""Functional fused ops, one module per op (its reference, kernels or launchers, registration,
fake kernels and autograd), on the BatchNorm core (``_bn_core``) and shared helpers (``_common``).

==============================  ==================================================================
module                          public functions
==============================  ==================================================================
``add_relu``                    :func:`add_relu` (residual add + ReLU)
``batchnorm``                   :func:`batch_norm_act`, :func:`bn_stats`, :func:`scale_shift_act`,
                                :func:`sync_batch_norm_act`
``bn_relu_conv``                :func:`bn_relu_conv2d` (BN-ReLU prologue fused into a convolution)
``bn_relu_conv_bn_add_relu``    :func:`bn_relu_conv_bn_add_relu2d` (a bottleneck's tail)
``dense_block``                 :func:`dense_block` (a DenseNet dense block as one node)
``dense_layer``                 (its one-call CPU layer kernels: fake kernels, when they run)
``transition``                  :func:`dense_transition` (BN-ReLU-avgpool-conv1x1)
``stem``                        :func:`stem_conv_bn_relu_pool` (the ImageNet stem)
``conv2d``                      ``conv2d_module``: a plain convolution as a registered op when traced
                                (a compiled fused network holds no ``aten.convolution``)
``_bn_core``                    :class:`BatchNormParams`, :func:`update_running_stats` (BN rules)
``_declarations``               ``OpDeclaration``: an op's entries in the accuracy harness, the op
                                benchmark and the sm_90 compile check, declared in its module
==============================  ==================================================================

This package exports the functions. Where a function has its module's name (``add_relu``,
``dense_block``), ``fastblocks.ops.add_relu`` is the function; the module is
``import fastblocks.ops.add_relu as module`` (or ``sys.modules``).
"""

from fastblocks.ops._bn_core import BatchNormParams, update_running_stats
from fastblocks.ops.add_relu import add_relu, add_relu_reference
from fastblocks.ops.batchnorm import (
    batch_norm_act,
    batch_norm_act_reference,
    bn_stats,
    scale_shift_act,
    sync_batch_norm_act,
)
from fastblocks.ops.bn_relu_conv import bn_relu_conv2d, bn_relu_conv2d_reference
from fastblocks.ops.bn_relu_conv_bn_add_relu import bn_relu_conv_bn_add_relu2d
from fastblocks.ops.dense_block import DenseLayerParams, dense_block, dense_block_reference
from fastblocks.ops.stem import stem_conv_bn_relu_pool, stem_reference
from fastblocks.ops.transition import dense_transition, dense_transition_reference

__all__ = [
    "BatchNormParams",
    "DenseLayerParams",
    "add_relu",
    "add_relu_reference",
    "batch_norm_act",
    "batch_norm_act_reference",
    "bn_relu_conv2d",
    "bn_relu_conv2d_reference",
    "bn_relu_conv_bn_add_relu2d",
    "bn_stats",
    "dense_block",
    "dense_block_reference",
    "dense_transition",
    "dense_transition_reference",
    "scale_shift_act",
    "stem_conv_bn_relu_pool",
    "stem_reference",
    "sync_batch_norm_act",
    "update_running_stats",
]
