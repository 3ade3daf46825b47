"""Size and cost of a PyTorch model: parameter count and multiply-accumulates per input."""

from __future__ import annotations

import torch
from torch import nn


def param_count(model: nn.Module) -> int:
    """Number of trainable and frozen parameters (BatchNorm running statistics excluded)."""
    return sum(p.numel() for p in model.parameters())


def macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of the Conv2d and Linear layers for one input of shape ``input_shape``
    (C, H, W), measured by running the model once; BatchNorm, activations, pooling and additions
    are not counted."""
    total = 0

    def conv_hook(m: nn.Conv2d, _inp, out: torch.Tensor) -> None:
        nonlocal total
        kh, kw = m.kernel_size
        total += out.numel() * (m.in_channels // m.groups) * kh * kw

    def linear_hook(m: nn.Linear, _inp, out: torch.Tensor) -> None:
        nonlocal total
        total += out.numel() * m.in_features

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_shape))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total
