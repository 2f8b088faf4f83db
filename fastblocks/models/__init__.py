from fastblocks.models.densenet import (  # noqa: F401  (DenseNet builders)
    DenseNet,
    densenet121,
    densenet161,
    densenet169,
    densenet201,
    densenet264,
    densenet_bc_100_12,
    densenet_bc_250_24,
    remap_legacy_densenet_keys,
)
