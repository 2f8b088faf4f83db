"""Drop-in BatchNorm modules on the fused kernels of :mod:`fastblocks.ops.batchnorm`.

Each is a subclass of ``torch.nn.BatchNorm2d`` with the same constructor arguments, buffers and
state_dict keys, so torchvision checkpoints load unchanged and ``isinstance(m, nn.BatchNorm2d)``
code keeps working. Running statistics follow ``nn.BatchNorm2d`` exactly (unbiased variance in
``running_var``, ``momentum=None`` cumulative average, ``num_batches_tracked``) and are updated
once per training forward.

Bytes kept for backward per activation element (fp32), against eager:

=====================  ===========================================  =========================
module                 eager keeps                                  fused keeps
=====================  ===========================================  =========================
BatchNorm2d            BN input (4 B)                               BN input (4 B)
BatchNormReLU2d        BN input, ReLU output (8 B)                  BN input (4 B)
BNAddReLU              BN input, ReLU output (8 B)                  BN input (4 B) + residual*
=====================  ===========================================  =========================

Eager here is torchvision's pattern (in-place ReLU); an out-of-place ReLU adds the BN output
(12 B). ``tests/ops/test_batchnorm.py::test_saved_for_backward_is_only_the_input`` measures it.
(*) the residual is the block's input, which its first convolution keeps anyway.
``BatchNorm2d`` itself saves no memory: it exists so a model can be fused layer by layer.
"""

from __future__ import annotations

import torch
from torch import nn

from fastblocks.ops._bn_core import module_step
from fastblocks.ops.batchnorm import batch_norm_act, sync_batch_norm_act


class BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` on fused kernels, optionally followed by ``+ residual`` and ReLU.

    Args:
        num_features, eps, momentum, affine, track_running_stats, device, dtype: as ``nn.BatchNorm2d``.
        relu: apply ReLU after the normalization (and the residual).
        process_group: synchronize batch statistics over this ``torch.distributed`` group in
            training (NCCL or gloo); ``None`` keeps them local.

    Shapes: ``forward(x [N, C, H, W], residual [N, C, H, W] | None) -> [N, C, H, W]``.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        relu: bool = False,
        process_group: object | None = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.relu = relu
        self.process_group = process_group

    def extra_repr(self) -> str:
        return super().extra_repr() + (", relu=True" if self.relu else "")

    def _sync(self) -> bool:
        if self.process_group is None or not self.training:
            return False
        import torch.distributed as dist

        return dist.is_available() and dist.is_initialized() and dist.get_world_size(self.process_group) > 1

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        self._check_input_dim(x)
        bn_training, running_mean, running_var = module_step(self, x.shape)
        if self._sync():
            return sync_batch_norm_act(
                x, self.weight, self.bias, running_mean, running_var,
                process_group=self.process_group, momentum=self.momentum, eps=self.eps,
                residual=residual, relu=self.relu, num_batches_tracked=self.num_batches_tracked,
            )  # fmt: skip
        return batch_norm_act(
            x, self.weight, self.bias, running_mean, running_var,
            training=bn_training, momentum=self.momentum, eps=self.eps,
            residual=residual, relu=self.relu, num_batches_tracked=self.num_batches_tracked,
        )  # fmt: skip


class BatchNormReLU2d(BatchNorm2d):
    """``relu(BatchNorm2d(x))`` fused; same arguments and state_dict as ``nn.BatchNorm2d``.

    Shapes: ``[N, C, H, W] -> [N, C, H, W]``.
    """

    def __init__(self, num_features: int, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("relu", True)
        super().__init__(num_features, *args, **kwargs)


class BNAddReLU(BatchNorm2d):
    """``relu(BatchNorm2d(x) + residual)`` fused: the end of a residual block.

    Same arguments and state_dict as ``nn.BatchNorm2d``.
    Shapes: ``forward(x [N, C, H, W], residual [N, C, H, W]) -> [N, C, H, W]``.
    """

    def __init__(self, num_features: int, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("relu", True)
        super().__init__(num_features, *args, **kwargs)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if residual is None:
            raise TypeError("BNAddReLU.forward needs residual (use BatchNormReLU2d without one)")
        return super().forward(x, residual)


def convert_sync_batchnorm(module: nn.Module, process_group: object | None = None) -> nn.Module:
    """Make every BatchNorm2d in ``module`` synchronize its statistics over ``process_group``.

    fastblocks BatchNorm modules get the group; plain ``nn.BatchNorm2d`` (and
    ``nn.SyncBatchNorm``) layers are replaced by :class:`BatchNorm2d` with the same state.
    Unlike ``nn.SyncBatchNorm``, the result also runs on CPU tensors with the gloo backend.
    Also unlike it, ``process_group=None`` means "do not synchronize"; pass
    ``torch.distributed.group.WORLD`` (after ``init_process_group``) for every rank.

    Returns:
        ``module`` (modified in place) or its replacement when ``module`` itself is a BatchNorm.
    """
    if isinstance(module, BatchNorm2d):
        module.process_group = process_group
        return module
    if isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm)):
        # The new module takes the old one's device and floating dtype (an fp64 or bf16 model stays so).
        like = next((t for t in module.state_dict().values() if t.is_floating_point()), None)
        factory = {} if like is None else {"device": like.device, "dtype": like.dtype}
        new = BatchNorm2d(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
            process_group=process_group, **factory,
        )  # fmt: skip
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new
    for name, child in module.named_children():
        setattr(module, name, convert_sync_batchnorm(child, process_group))
    return module
