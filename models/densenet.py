"""A small DenseNet-BC (Huang et al. 2017) for 28x28 inputs."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from onnxdns.models.layers import init_weights


class DenseLayer(nn.Module):
    """BN-ReLU-conv3x3 producing ``growth`` channels, concatenated after its input."""

    def __init__(self, in_channels: int, growth: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(in_channels, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.conv(self.relu(self.bn(x)))], 1)


class Transition(nn.Sequential):
    """BN-ReLU-conv1x1 (channel compression) -> 2x2 average pool."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.pool = nn.AvgPool2d(2, 2)


class DenseNet(nn.Module):
    """Stem conv3x3 (``2 * growth`` channels), dense blocks of ``blocks[i]`` layers separated by
    transitions that keep ``compression`` of the channels, final BN-ReLU, global average pool, Linear."""

    def __init__(self, growth: int = 12, blocks: Sequence[int] = (4, 4, 4), compression: float = 0.5,
                 in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        if growth <= 0 or not blocks or min(blocks) <= 0 or not 0 < compression <= 1:
            raise ValueError("DenseNet needs growth > 0, non-empty positive blocks, 0 < compression <= 1")
        channels = 2 * growth
        self.stem = nn.Conv2d(in_channels, channels, 3, padding=1, bias=False)
        stages: list[nn.Module] = []
        for i, layers in enumerate(blocks):
            block = []
            for _ in range(layers):
                block.append(DenseLayer(channels, growth))
                channels += growth
            stages.append(nn.Sequential(*block))
            if i < len(blocks) - 1:
                out = max(1, int(channels * compression))
                stages.append(Transition(channels, out))
                channels = out
        self.stages = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu(self.bn(self.stages(self.stem(x)))))
        return self.fc(torch.flatten(x, 1))
