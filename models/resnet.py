"""CIFAR-style ResNet (He et al. 2016, section 4.2) with projection shortcuts when downsampling."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from onnxdns.models.layers import ConvBNAct, init_weights


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU -> conv3x3-BN, plus the shortcut (identity, or 1x1 conv stride s + BN), ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = ConvBNAct(in_channels, out_channels, 3, stride)
        self.conv2 = ConvBNAct(out_channels, out_channels, 3, 1, act=None)
        self.shortcut = (ConvBNAct(in_channels, out_channels, 1, stride, act=None)
                         if stride != 1 or in_channels != out_channels else nn.Identity())
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class ResNet(nn.Module):
    """Stem conv3x3-BN-ReLU, one stage of ``blocks`` BasicBlocks per width (stride 2 from the
    second stage on), global average pool, Linear."""

    def __init__(self, blocks: int = 3, widths: Sequence[int] = (16, 32, 64), in_channels: int = 1,
                 num_classes: int = 10) -> None:
        super().__init__()
        self.stem = ConvBNAct(in_channels, widths[0], 3)
        stages: list[nn.Module] = []
        channels = widths[0]
        for i, width in enumerate(widths):
            layers = []
            for j in range(blocks):
                layers.append(BasicBlock(channels, width, 2 if i > 0 and j == 0 else 1))
                channels = width
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.stages(self.stem(x)))
        return self.fc(torch.flatten(x, 1))


def resnet20(in_channels: int = 1, num_classes: int = 10) -> ResNet:
    """``resnet-20``: 3 stages x 3 BasicBlocks, 16/32/64 channels (6n+2 = 20 weighted layers)."""
    return ResNet(3, (16, 32, 64), in_channels, num_classes)
