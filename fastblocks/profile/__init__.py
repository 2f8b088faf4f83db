"""Measurement tools: the memory of a training step and the parameter/FLOP calculator.

- :mod:`fastblocks.profile.flops`: parameters and multiply-adds per stage, from the papers'
  formulas and counted from the module (``fastblocks summary MODEL``);
- :mod:`fastblocks.profile.memory`: parameters, gradients, optimizer state, saved activations
  and peaks of one training step per implementation (``fastblocks memory MODEL``).
"""

from fastblocks.profile.flops import summarize
from fastblocks.profile.memory import lower_bound, measure_step, profile

__all__ = ["lower_bound", "measure_step", "profile", "summarize"]
