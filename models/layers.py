"""Building blocks shared by the zoo's BatchNorm networks."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn


class ConvBNAct(nn.Sequential):
    """Conv2d (no bias) -> BatchNorm2d -> activation (``relu``, ``relu6`` or ``None`` for linear)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 groups: int = 1, act: str | None = "relu") -> None:
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        layers["conv"] = nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2,
                                   groups=groups, bias=False)
        layers["bn"] = nn.BatchNorm2d(out_channels)
        if act == "relu":
            layers["act"] = nn.ReLU()
        elif act == "relu6":
            layers["act"] = nn.ReLU6()
        elif act is not None:
            raise ValueError(f"unknown activation {act!r}")
        super().__init__(layers)


def scaled(channels: int, width: float, minimum: int = 1) -> int:
    """``channels * width`` rounded to the nearest integer, at least ``minimum``."""
    return max(minimum, int(round(channels * width)))


def init_weights(module: nn.Module) -> None:
    """He-normal (fan-out) convolutions with zero bias, BatchNorm scale 1 / shift 0.

    Linear layers keep PyTorch's default initialisation.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
