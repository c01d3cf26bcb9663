"""CIFAR ResNets of depth 6n+2 with three stages (resnet8 ... resnet110, resnet8x4, resnet32x4)."""

import torch
import torch.nn.functional as F
from torch import nn

from .weight_init import he_normal_convs


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def projection(in_channels: int, out_channels: int, stride: int) -> nn.Sequential | None:
    """A 1x1 conv + BN shortcut where the shape changes, None (the identity) elsewhere."""
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
        nn.BatchNorm2d(out_channels),
    )


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample = projection(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


def make_stage(in_channels: int, out_channels: int, num_blocks: int, stride: int) -> nn.Sequential:
    blocks = [BasicBlock(in_channels, out_channels, stride)]
    blocks += [BasicBlock(out_channels, out_channels, 1) for _ in range(num_blocks - 1)]
    return nn.Sequential(*blocks)


class CifarResNet(nn.Module):
    """`widths` are the stem's channels followed by those of the three stages."""

    classifier_name = "fc"

    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int) -> None:
        super().__init__()
        blocks_per_stage = (depth - 2) // 6
        self.num_classes = num_classes
        self.feature_dim = widths[3]
        self.conv1 = conv3x3(3, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.layer1 = make_stage(widths[0], widths[1], blocks_per_stage, 1)
        self.layer2 = make_stage(widths[1], widths[2], blocks_per_stage, 2)
        self.layer3 = make_stage(widths[2], widths[3], blocks_per_stage, 2)
        self.fc = nn.Linear(self.feature_dim, num_classes)
        he_normal_convs(self)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        pooled = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(pooled), pooled
