"""The model registry: mdistiller's CIFAR zoo by name, torchvision and timm models by prefix."""

from collections.abc import Callable
from functools import partial

from torch import nn

from richkd.pipeline.errors import UserError

from . import resnet_v2
from .cifar_resnet import CifarResNet
from .external import timm_model, torchvision_model
from .mobilenetv2 import MobileNetV2
from .shufflenet import ShuffleNetV1, ShuffleNetV2
from .vgg import VGG
from .wrn import WideResNet

NARROW = (16, 16, 32, 64)
WIDE = (32, 64, 128, 256)

# each entry builds the architecture given num_classes=
CIFAR_ZOO: dict[str, Callable[..., nn.Module]] = {
    "resnet8": partial(CifarResNet, 8, NARROW),
    "resnet14": partial(CifarResNet, 14, NARROW),
    "resnet20": partial(CifarResNet, 20, NARROW),
    "resnet32": partial(CifarResNet, 32, NARROW),
    "resnet44": partial(CifarResNet, 44, NARROW),
    "resnet56": partial(CifarResNet, 56, NARROW),
    "resnet110": partial(CifarResNet, 110, NARROW),
    "resnet8x4": partial(CifarResNet, 8, WIDE),
    "resnet32x4": partial(CifarResNet, 32, WIDE),
    "ResNet18": partial(resnet_v2.ResNetV2, resnet_v2.BasicBlock, (2, 2, 2, 2)),
    "ResNet50": partial(resnet_v2.ResNetV2, resnet_v2.Bottleneck, (3, 4, 6, 3)),
    "wrn_16_1": partial(WideResNet, 16, 1),
    "wrn_16_2": partial(WideResNet, 16, 2),
    "wrn_40_1": partial(WideResNet, 40, 1),
    "wrn_40_2": partial(WideResNet, 40, 2),
    "vgg8": partial(VGG, (1, 1, 1, 1, 1)),
    "vgg11": partial(VGG, (1, 1, 2, 2, 2)),
    "vgg13": partial(VGG, (2, 2, 2, 2, 2)),
    "vgg16": partial(VGG, (2, 2, 3, 3, 3)),
    "vgg19": partial(VGG, (2, 2, 4, 4, 4)),
    "MobileNetV2": partial(MobileNetV2, 6, 0.5),
    "ShuffleV1": ShuffleNetV1,
    "ShuffleV2": ShuffleNetV2,
}

# "<prefix>:<library model name>"
LIBRARY_PREFIXES: dict[str, Callable[[str, int], nn.Module]] = {
    "tv": torchvision_model,
    "timm": timm_model,
}


def create_model(name: str, num_classes: int) -> nn.Module:
    """Build `name` with a `num_classes`-way classifier.

    The module's forward(x) returns (logits, pooled_features); it carries `arch` (= name),
    `num_classes`, `feature_dim` and `classifier_name` (the path of its final Linear layer).
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    prefix, colon, library_name = name.partition(":")
    if colon and prefix in LIBRARY_PREFIXES:
        model = LIBRARY_PREFIXES[prefix](library_name, num_classes)
    elif name in CIFAR_ZOO:
        model = CIFAR_ZOO[name](num_classes=num_classes)
    else:
        raise UserError(
            f"unknown model {name!r}: choose one of {', '.join(CIFAR_ZOO)}, "
            "or tv:<torchvision model> or timm:<timm model>"
        )
    model.arch = name
    return model
