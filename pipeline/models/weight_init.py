"""The reference zoo's initialisation, so that students trained from scratch start where mdistiller's do."""

from torch import nn


def he_normal_convs(model: nn.Module) -> None:
    """He-normal (fan-out) weights and zero biases for every convolution in `model`."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def small_normal_linear(linear: nn.Linear) -> None:
    """N(0, 0.01) weights and zero bias, as the reference uses for VGG and MobileNetV2 classifiers."""
    nn.init.normal_(linear.weight, std=0.01)
    nn.init.zeros_(linear.bias)
