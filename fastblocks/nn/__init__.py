"""Drop-in ``nn.Module``s built on the fused ops (state_dict-compatible with ``torch.nn``)."""

from fastblocks.nn.activation import AddReLU
from fastblocks.nn.batchnorm import BatchNorm2d, BatchNormReLU2d, BNAddReLU, convert_sync_batchnorm
from fastblocks.nn.conv import BNReLUConv2d, ConvBNReLU2d

__all__ = [
    "AddReLU",
    "BNAddReLU",
    "BNReLUConv2d",
    "BatchNorm2d",
    "BatchNormReLU2d",
    "ConvBNReLU2d",
    "convert_sync_batchnorm",
]
