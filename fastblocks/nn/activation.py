"""Activation modules."""

from __future__ import annotations

import torch
from torch import nn

from fastblocks.ops.add_relu import add_relu


class AddReLU(nn.Module):
    """Drop-in for ``torch.relu(x + residual)``: one fused pass, 1-bit mask kept for backward.

    Shapes: ``x`` and ``residual`` ``[N, C, H, W]`` (or any equal shapes) -> same shape.
    """

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return add_relu(x, residual)
