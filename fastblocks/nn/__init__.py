"""Drop-in ``nn.Module``s built on the fused ops (state_dict-compatible with ``torch.nn``)."""

from fastblocks.nn.activation import AddReLU

__all__ = ["AddReLU"]
