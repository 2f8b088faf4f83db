from fastblocks.models.cifar import (  # noqa: F401  (CIFAR ResNets and plain nets)
    CifarResNet,
    plain20,
    plain56,
    resnet20,
    resnet32,
    resnet44,
    resnet56,
    resnet110,
)
from fastblocks.models.convert import (  # noqa: F401  (fused <-> eager conversion)
    FusedSequential,
    convert,
    export_torch,
    fuse,
    unfuse,
)
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
from fastblocks.models.registry import get_model, list_models  # noqa: F401  (builders by name)
from fastblocks.models.resnet import (  # noqa: F401  (ImageNet ResNet family)
    BasicBlock,
    Bottleneck,
    PreActBasicBlock,
    PreActBottleneck,
    ResNet,
    plain18,
    plain34,
    resnet18,
    resnet34,
    resnet50,
    resnet101,
    resnet152,
    resnext50_32x4d,
    resnext101_32x8d,
    resnext101_64x4d,
    wide_resnet50_2,
    wide_resnet101_2,
)
