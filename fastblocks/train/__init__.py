"""Training: the loop behind ``fastblocks train`` (one process or DDP), data without torchvision, checkpoints.

- :mod:`fastblocks.train.trainer`: :class:`TrainConfig`, :func:`train`.
- :mod:`fastblocks.train.data`: ``synthetic``, ``digits``, ``cifar10:DIR``, ``imagefolder:DIR``;
  augmentation in torch ops; the ``DistributedSampler``-like sharding.
- :mod:`fastblocks.train.optim`: SGD with weight decay on weights only; cosine/step schedules.
- :mod:`fastblocks.train.checkpoint`: atomic files and generator states.
- :mod:`fastblocks.train.distributed`: ``torchrun`` process-group setup.
"""

from fastblocks.train.checkpoint import CheckpointError
from fastblocks.train.data import DataError, load_data
from fastblocks.train.trainer import NonFiniteLossError, TrainConfig, TrainResult, build_model, train

__all__ = [
    "CheckpointError",
    "DataError",
    "NonFiniteLossError",
    "TrainConfig",
    "TrainResult",
    "build_model",
    "load_data",
    "train",
]
