"""Wide ResNets of depth 6n+4 with pre-activation blocks (wrn_16_1 ... wrn_40_2)."""

import torch
import torch.nn.functional as F
from torch import nn

from .cifar_resnet import conv3x3
from .weight_init import he_normal_convs


class WideBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.convShortcut = (
            nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
            if in_channels != out_channels
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(activated))))
        # the projection sees the pre-activated input, the identity shortcut the raw one
        return out + (x if self.convShortcut is None else self.convShortcut(activated))


class WideStage(nn.Module):
    """Only here to give the reference's `blockN.layer.i` parameter names."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, stride: int) -> None:
        super().__init__()
        blocks = [WideBlock(in_channels, out_channels, stride)]
        blocks += [WideBlock(out_channels, out_channels, 1) for _ in range(num_blocks - 1)]
        self.layer = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    classifier_name = "fc"

    def __init__(self, depth: int, widen_factor: int, num_classes: int) -> None:
        super().__init__()
        blocks_per_stage = (depth - 4) // 6
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.num_classes = num_classes
        self.feature_dim = widths[3]
        self.conv1 = conv3x3(3, widths[0])
        self.block1 = WideStage(widths[0], widths[1], blocks_per_stage, 1)
        self.block2 = WideStage(widths[1], widths[2], blocks_per_stage, 2)
        self.block3 = WideStage(widths[2], widths[3], blocks_per_stage, 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(self.feature_dim, num_classes)
        he_normal_convs(self)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = F.relu(self.bn1(x))
        pooled = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(pooled), pooled
