"""Paper experiments run with the package's models and training loop (``fastblocks experiment ...``).

- :mod:`fastblocks.experiments.degradation`: plain vs residual networks of 20 and 56 layers
  (He et al. 2016, Fig. 6): the deeper plain net trains worse, the deeper ResNet better.
"""
