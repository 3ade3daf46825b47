"""A small GoogLeNet-style network (Szegedy et al. 2015) for 28x28 inputs, with BatchNorm."""

from __future__ import annotations

import torch
from torch import nn

from onnxdns.models.layers import ConvBNAct, init_weights


class InceptionBlock(nn.Module):
    """Four parallel branches concatenated on channels: 1x1; 1x1 -> 3x3; 1x1 -> 5x5;
    3x3 max pool (stride 1) -> 1x1. Every conv is conv-BN-ReLU."""

    def __init__(self, in_channels: int, c1: int, c3_reduce: int, c3: int, c5_reduce: int, c5: int,
                 pool_proj: int) -> None:
        super().__init__()
        self.branch1 = ConvBNAct(in_channels, c1, 1)
        self.branch3 = nn.Sequential(ConvBNAct(in_channels, c3_reduce, 1), ConvBNAct(c3_reduce, c3, 3))
        self.branch5 = nn.Sequential(ConvBNAct(in_channels, c5_reduce, 1), ConvBNAct(c5_reduce, c5, 5))
        self.branch_pool = nn.Sequential(nn.MaxPool2d(3, 1, 1), ConvBNAct(in_channels, pool_proj, 1))
        self.out_channels = c1 + c3 + c5 + pool_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch3(x), self.branch5(x), self.branch_pool(x)], 1)


class Inception(nn.Module):
    """Stem conv3x3-BN-ReLU (32), max pool (14x14), two inception blocks, max pool (7x7), one
    inception block, global average pool, Linear."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = ConvBNAct(in_channels, 32, 3)
        self.pool1 = nn.MaxPool2d(2, 2)
        self.block1 = InceptionBlock(32, 16, 16, 32, 8, 8, 8)          # -> 64
        self.block2 = InceptionBlock(64, 32, 32, 48, 8, 16, 16)        # -> 112
        self.pool2 = nn.MaxPool2d(2, 2)
        self.block3 = InceptionBlock(112, 48, 32, 64, 8, 16, 16)       # -> 144
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.block3.out_channels, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.stem(x))
        x = self.pool2(self.block2(self.block1(x)))
        x = self.pool(self.block3(x))
        return self.fc(torch.flatten(x, 1))
