"""VGG family: small BatchNorm VGGs for 28x28 inputs and torchvision's VGG-16 for ImageNet.

A configuration is a sequence of output channel counts (a 3x3 conv, pad 1) and ``"M"`` (2x2 max
pool, stride 2). Layer indices in ``features`` and ``classifier`` follow torchvision's layout
(``features.<i>.weight``, ``classifier.<i>.weight``), so its state dicts load into
:func:`vgg16_imagenet`.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from onnxdns.models.layers import init_weights, scaled

#: torchvision's configuration "D" (VGG-16): 13 convolutions, 5 pools.
VGG16_CFG: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
                                    512, 512, 512, "M", 512, 512, 512, "M")
#: Default of ``vgg-bn``: VGG-11's first 6 convolutions and 3 pools.
VGG_BN_CFG: tuple[int | str, ...] = (64, "M", 128, "M", 256, 256, "M", 512, 512)


def make_features(cfg: Sequence[int | str], in_channels: int, *, width: float = 1.0, batch_norm: bool,
                  ceil_mode: bool = False) -> nn.Sequential:
    """Conv 3x3 (-> BatchNorm) -> ReLU for each number in ``cfg``, MaxPool 2x2 for each ``"M"``."""
    layers: list[nn.Module] = []
    channels = in_channels
    for item in cfg:
        if item == "M":
            layers.append(nn.MaxPool2d(2, 2, ceil_mode=ceil_mode))
            continue
        if not isinstance(item, int) or item <= 0:
            raise ValueError(f"VGG cfg entries are positive channel counts or 'M', got {item!r}")
        out = scaled(item, width)
        layers.append(nn.Conv2d(channels, out, 3, padding=1, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(out))
        layers.append(nn.ReLU(inplace=True))
        channels = out
    return nn.Sequential(*layers)


def feature_channels(features: nn.Sequential) -> int:
    return [m for m in features if isinstance(m, nn.Conv2d)][-1].out_channels


class VGG(nn.Module):
    """``features`` -> ``avgpool`` -> flatten -> ``classifier``."""

    def __init__(self, features: nn.Sequential, avgpool: nn.Module, classifier: nn.Sequential) -> None:
        super().__init__()
        self.features = features
        self.avgpool = avgpool
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def _small_vgg(cfg: Sequence[int | str], width: float, hidden: Sequence[int], in_channels: int,
               num_classes: int) -> VGG:
    """BatchNorm VGG for small images: ceil-mode pools (28 -> 14 -> 7 -> 4 -> 2 -> 1), global
    average pool, then ``Linear -> ReLU`` per ``hidden`` size (scaled by ``width``) and a last Linear."""
    if width <= 0:
        raise ValueError(f"width must be positive, got {width}")
    features = make_features(cfg, in_channels, width=width, batch_norm=True, ceil_mode=True)
    layers: list[nn.Module] = []
    channels = feature_channels(features)
    for h in hidden:
        layers += [nn.Linear(channels, scaled(h, width)), nn.ReLU(inplace=True)]
        channels = scaled(h, width)
    layers.append(nn.Linear(channels, num_classes))
    model = VGG(features, nn.AdaptiveAvgPool2d(1), nn.Sequential(*layers))
    init_weights(model)
    return model


def vgg_bn(width: float = 0.5, cfg: Sequence[int | str] = VGG_BN_CFG, hidden: Sequence[int] = (),
           in_channels: int = 1, num_classes: int = 10) -> VGG:
    """``vgg-bn``: conv-BN-ReLU stack (default: VGG-11's first 6 convs at half width, 32..256
    channels), global average pool, one Linear. About 29M MACs and 1.1M parameters per 28x28 image."""
    return _small_vgg(cfg, width, hidden, in_channels, num_classes)


def vgg16(width: float = 0.375, cfg: Sequence[int | str] = VGG16_CFG, hidden: Sequence[int] = (512,),
          in_channels: int = 1, num_classes: int = 10) -> VGG:
    """``vgg16``: VGG-16's 13 conv-BN-ReLU layers and 5 pools for 28x28 images, channel widths
    scaled by ``width`` (default 3/8: 24..192 channels), global average pool, Linear-ReLU-Linear.
    About 38M MACs and 2.1M parameters per 28x28 image."""
    return _small_vgg(cfg, width, hidden, in_channels, num_classes)


def vgg16_imagenet(num_classes: int = 1000, dropout: float = 0.5) -> VGG:
    """torchvision's ``vgg16`` (no BatchNorm, 3x224x224, 138,357,544 parameters), with its
    initialisation: He-normal convolutions, N(0, 0.01) linear weights, zero biases."""
    features = make_features(VGG16_CFG, 3, batch_norm=False)
    classifier = nn.Sequential(
        nn.Linear(512 * 7 * 7, 4096), nn.ReLU(inplace=True), nn.Dropout(dropout),
        nn.Linear(4096, 4096), nn.ReLU(inplace=True), nn.Dropout(dropout),
        nn.Linear(4096, num_classes),
    )
    model = VGG(features, nn.AdaptiveAvgPool2d((7, 7)), classifier)
    init_weights(model)
    for m in model.classifier:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)
    return model
