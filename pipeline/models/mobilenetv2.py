"""MobileNetV2 for 32x32 inputs (the zoo's `MobileNetV2` is expansion 6, width 0.5)."""

import torch
import torch.nn.functional as F
from torch import nn

from .weight_init import he_normal_convs, small_normal_linear

# (output channels at width 1, blocks, stride of the first block); the first stage does not expand
STAGES = ((16, 1, 1), (24, 2, 1), (32, 3, 2), (64, 4, 2), (96, 3, 1), (160, 3, 2), (320, 1, 1))


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class InvertedResidual(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        self.has_residual = stride == 1 and in_channels == out_channels
        # pointwise expand, depthwise 3x3, linear pointwise projection (the expansion runs even at ratio 1)
        self.conv = nn.Sequential(
            *conv_bn_relu(in_channels, hidden, 1),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.has_residual else out


class MobileNetV2(nn.Module):
    classifier_name = "classifier.0"

    def __init__(self, expansion: int, width_mult: float, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        # the head keeps 1280 channels unless the network is widened
        self.feature_dim = int(1280 * width_mult) if width_mult > 1.0 else 1280
        in_channels = int(32 * width_mult)
        self.conv1 = conv_bn_relu(3, in_channels, 3, stride=2)
        self.blocks = nn.ModuleList()
        for stage_index, (channels, num_blocks, stride) in enumerate(STAGES):
            out_channels = int(channels * width_mult)
            stage_expansion = expansion if stage_index else 1
            blocks = []
            for block_stride in [stride] + [1] * (num_blocks - 1):
                blocks.append(InvertedResidual(in_channels, out_channels, block_stride, stage_expansion))
                in_channels = out_channels
            self.blocks.append(nn.Sequential(*blocks))
        self.conv2 = conv_bn_relu(in_channels, self.feature_dim, 1)
        self.classifier = nn.Sequential(nn.Linear(self.feature_dim, num_classes))
        he_normal_convs(self)
        small_normal_linear(self.classifier[0])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.conv1(x)
        for stage in self.blocks:
            x = stage(x)
        x = self.conv2(x)
        pooled = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.classifier(pooled), pooled
