"""A small MobileNetV2 (Sandler et al. 2018) for 28x28 inputs."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from onnxdns.models.layers import ConvBNAct, init_weights, scaled

#: (expansion t, output channels c, repeats n, first stride s) per stage, as in the paper's table 2.
MOBILENET_CFG: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 2, 1),
)


class InvertedResidual(nn.Module):
    """1x1 expand conv-BN-ReLU6 (absent when ``expansion == 1``) -> 3x3 depthwise conv-BN-ReLU6
    -> 1x1 linear projection conv-BN, plus the input when ``stride == 1`` and shapes match."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers.append(ConvBNAct(in_channels, hidden, 1, act="relu6"))
        layers.append(ConvBNAct(hidden, hidden, 3, stride, groups=hidden, act="relu6"))
        layers.append(ConvBNAct(hidden, out_channels, 1, act=None))
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.residual else y


class MobileNetV2(nn.Module):
    """Stem conv3x3-BN-ReLU6, inverted residual stages from ``cfg``, 1x1 conv-BN-ReLU6 to
    ``last_channels``, global average pool, Linear. Channel counts scale with ``width``."""

    def __init__(self, cfg: Sequence[tuple[int, int, int, int]] = MOBILENET_CFG, width: float = 1.0,
                 stem_channels: int = 16, last_channels: int = 256, in_channels: int = 1,
                 num_classes: int = 10) -> None:
        super().__init__()
        if width <= 0:
            raise ValueError(f"width must be positive, got {width}")
        channels = scaled(stem_channels, width)
        self.stem = ConvBNAct(in_channels, channels, 3, act="relu6")
        blocks: list[nn.Module] = []
        for expansion, out, repeats, stride in cfg:
            out = scaled(out, width)
            for i in range(repeats):
                blocks.append(InvertedResidual(channels, out, stride if i == 0 else 1, expansion))
                channels = out
        self.blocks = nn.Sequential(*blocks)
        last = scaled(last_channels, width)
        self.head = ConvBNAct(channels, last, 1, act="relu6")
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(last, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.head(self.blocks(self.stem(x))))
        return self.fc(torch.flatten(x, 1))
