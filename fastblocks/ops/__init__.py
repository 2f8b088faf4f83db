"""Functional fused ops (one module per op): reference, Triton, launchers, registration."""

from fastblocks.ops.add_relu import add_relu, add_relu_reference

__all__ = ["add_relu", "add_relu_reference"]
