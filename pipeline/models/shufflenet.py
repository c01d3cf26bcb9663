"""CIFAR ShuffleNets: ShuffleV1 (groups 3, 240/480/960 channels) and ShuffleV2 (1x: 116/232/464, head 1024).

Both use a 1x1 stem of 24 channels and no stem pooling, so three stride-2 stages take 32x32 to 4x4.
"""

import torch
import torch.nn.functional as F
from torch import nn

STEM_CHANNELS = 24


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave the channels of `groups` equal groups so the next grouped conv mixes them."""
    batch, channels, height, width = x.shape
    x = x.reshape(batch, groups, channels // groups, height, width).transpose(1, 2)
    return x.reshape(batch, channels, height, width)


def depthwise3x3(channels: int, stride: int) -> nn.Conv2d:
    return nn.Conv2d(channels, channels, 3, stride, 1, groups=channels, bias=False)


def pointwise(in_channels: int, out_channels: int, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1, groups=groups, bias=False)


class ShuffleV1Unit(nn.Module):
    """A stride-2 unit concatenates an average-pooled copy of its input to its `out_channels`."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, groups: int) -> None:
        super().__init__()
        mid_channels = out_channels // 4
        # the stem's 24 channels are too few to split into groups
        self.first_groups = 1 if in_channels == STEM_CHANNELS else groups
        self.stride = stride
        self.conv1 = pointwise(in_channels, mid_channels, self.first_groups)
        self.bn1 = nn.BatchNorm2d(mid_channels)
        self.conv2 = depthwise3x3(mid_channels, stride)
        self.bn2 = nn.BatchNorm2d(mid_channels)
        self.conv3 = pointwise(mid_channels, out_channels, groups)
        self.bn3 = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = channel_shuffle(out, self.first_groups)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.stride == 2:
            return F.relu(torch.cat([out, F.avg_pool2d(x, 3, stride=2, padding=1)], 1))
        return F.relu(out + x)


class ShuffleNetV1(nn.Module):
    classifier_name = "linear"
    stage_channels = (240, 480, 960)
    stage_blocks = (4, 8, 4)
    groups = 3

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.feature_dim = self.stage_channels[-1]
        self.conv1 = pointwise(3, STEM_CHANNELS)
        self.bn1 = nn.BatchNorm2d(STEM_CHANNELS)
        in_channels = STEM_CHANNELS
        stages = []
        for channels, num_blocks in zip(self.stage_channels, self.stage_blocks):
            units = [ShuffleV1Unit(in_channels, channels - in_channels, 2, self.groups)]
            units += [ShuffleV1Unit(channels, channels, 1, self.groups) for _ in range(num_blocks - 1)]
            stages.append(nn.Sequential(*units))
            in_channels = channels
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(self.feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        pooled = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.linear(pooled), pooled


class ShuffleV2DownUnit(nn.Module):
    """Stride-2 unit: two branches of out_channels/2 each, concatenated and shuffled."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid_channels = out_channels // 2
        # left branch: depthwise then pointwise
        self.conv1 = depthwise3x3(in_channels, 2)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = pointwise(in_channels, mid_channels)
        self.bn2 = nn.BatchNorm2d(mid_channels)
        # right branch: pointwise, depthwise, pointwise
        self.conv3 = pointwise(in_channels, mid_channels)
        self.bn3 = nn.BatchNorm2d(mid_channels)
        self.conv4 = depthwise3x3(mid_channels, 2)
        self.bn4 = nn.BatchNorm2d(mid_channels)
        self.conv5 = pointwise(mid_channels, mid_channels)
        self.bn5 = nn.BatchNorm2d(mid_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return channel_shuffle(torch.cat([left, right], 1), 2)


class ShuffleV2Unit(nn.Module):
    """Stride-1 unit: the first half of the channels passes through, the second half is transformed."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.half = channels // 2
        self.conv1 = pointwise(self.half, self.half)
        self.bn1 = nn.BatchNorm2d(self.half)
        self.conv2 = depthwise3x3(self.half, 1)
        self.bn2 = nn.BatchNorm2d(self.half)
        self.conv3 = pointwise(self.half, self.half)
        self.bn3 = nn.BatchNorm2d(self.half)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept, transformed = x[:, : self.half], x[:, self.half :]
        out = F.relu(self.bn1(self.conv1(transformed)))
        out = F.relu(self.bn3(self.conv3(self.bn2(self.conv2(out)))))
        return channel_shuffle(torch.cat([kept, out], 1), 2)


class ShuffleNetV2(nn.Module):
    classifier_name = "linear"
    stage_channels = (116, 232, 464)
    stage_blocks = (3, 7, 3)
    head_channels = 1024

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.feature_dim = self.head_channels
        self.conv1 = pointwise(3, STEM_CHANNELS)
        self.bn1 = nn.BatchNorm2d(STEM_CHANNELS)
        in_channels = STEM_CHANNELS
        stages = []
        for channels, num_blocks in zip(self.stage_channels, self.stage_blocks):
            units = [ShuffleV2DownUnit(in_channels, channels)]
            units += [ShuffleV2Unit(channels) for _ in range(num_blocks)]
            stages.append(nn.Sequential(*units))
            in_channels = channels
        self.layer1, self.layer2, self.layer3 = stages
        self.conv2 = pointwise(in_channels, self.head_channels)
        self.bn2 = nn.BatchNorm2d(self.head_channels)
        self.linear = nn.Linear(self.feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        pooled = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.linear(pooled), pooled
