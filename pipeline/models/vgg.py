"""CIFAR VGGs with batch norm (vgg8 ... vgg19): five conv stages of 64, 128, 256, 512, 512 channels."""

import torch
import torch.nn.functional as F
from torch import nn

from .weight_init import he_normal_convs, small_normal_linear

STAGE_CHANNELS = (64, 128, 256, 512, 512)


def conv_stage(in_channels: int, out_channels: int, num_convs: int) -> nn.Sequential:
    """(conv3x3 with bias, BN, ReLU) x num_convs."""
    layers: list[nn.Module] = []
    for index in range(num_convs):
        layers += [
            nn.Conv2d(in_channels if index == 0 else out_channels, out_channels, 3, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        ]
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """`convs_per_stage` gives the depth: vgg8 is (1, 1, 1, 1, 1), vgg19 (2, 2, 4, 4, 4).

    On 32x32 inputs the first three stages are followed by 2x2 max-pooling and the last two
    run at 4x4 before global average pooling.
    """

    classifier_name = "classifier"

    def __init__(self, convs_per_stage: tuple[int, int, int, int, int], num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.feature_dim = STAGE_CHANNELS[-1]
        in_channels = (3,) + STAGE_CHANNELS[:-1]
        stages = [conv_stage(*spec) for spec in zip(in_channels, STAGE_CHANNELS, convs_per_stage)]
        self.block0, self.block1, self.block2, self.block3, self.block4 = stages
        self.classifier = nn.Linear(self.feature_dim, num_classes)
        he_normal_convs(self)
        small_normal_linear(self.classifier)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.max_pool2d(self.block0(x), 2)
        x = F.max_pool2d(self.block1(x), 2)
        x = F.max_pool2d(self.block2(x), 2)
        x = self.block4(self.block3(x))
        pooled = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.classifier(pooled), pooled
