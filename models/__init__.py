"""Model zoo: PyTorch definitions exported to ONNX (installed as ``onnxdns.models``).

=================  =========================================================================
name               architecture (1x28x28 input, 10 logits unless said)
=================  =========================================================================
lenet-300-100      784-300-100-10 fully connected, ReLU (266,610 parameters)
lenet-5            Caffe LeNet-5 used by Dynamic Network Surgery (431,080 parameters)
vgg-bn             conv-BN-ReLU VGG (``width``, ``cfg``, ``hidden``), global avg pool, Linear
resnet-20          CIFAR ResNet-20: 3x3 BasicBlocks, 16/32/64 channels, 1x1 conv+BN shortcuts
mobilenet-v2       small MobileNetV2: inverted residuals (one with expansion 1), ReLU6
densenet           DenseNet-BC: 3 dense blocks (growth 12, BN-ReLU-conv, Concat), transitions
inception          GoogLeNet-style: parallel 1x1 / 3x3 / 5x5 / pool branches, Concat
vgg16              VGG-16's 13 conv-BN-ReLU layers for 28x28 at 3/8 width (``width``, ``cfg``)
vgg16-imagenet     torchvision VGG-16 exactly: 3x224x224, 1000 classes, 138,357,544 parameters
=================  =========================================================================

``build(name, seed=0, **kwargs)`` constructs one deterministically (in training mode);
``export_model`` writes it as ONNX with BatchNormalization nodes kept.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from onnxdns.errors import OnnxdnsError
from onnxdns.models.densenet import DenseNet
from onnxdns.models.export import export_model
from onnxdns.models.inception import Inception
from onnxdns.models.lenet import LeNet5, LeNet300100
from onnxdns.models.mobilenet import MobileNetV2
from onnxdns.models.resnet import resnet20
from onnxdns.models.stats import macs, param_count
from onnxdns.models.vgg import vgg16, vgg16_imagenet, vgg_bn

MODELS: dict[str, Callable[..., nn.Module]] = {
    "lenet-300-100": LeNet300100,
    "lenet-5": LeNet5,
    "vgg-bn": vgg_bn,
    "resnet-20": resnet20,
    "mobilenet-v2": MobileNetV2,
    "densenet": DenseNet,
    "inception": Inception,
    "vgg16": vgg16,
    "vgg16-imagenet": vgg16_imagenet,
}

#: Input shape (C, H, W), without the batch dimension.
INPUT_SHAPES: dict[str, tuple[int, int, int]] = {name: (1, 28, 28) for name in MODELS}
INPUT_SHAPES["vgg16-imagenet"] = (3, 224, 224)


def build(name: str, *, seed: int = 0, **kwargs) -> nn.Module:
    """Construct zoo model ``name`` with weights drawn from ``seed`` (the global torch RNG is left
    untouched). ``kwargs`` go to the model's constructor (e.g. ``width=`` for the VGGs)."""
    if name not in MODELS:
        raise OnnxdnsError(f"unknown model '{name}'; known models: {', '.join(MODELS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            return MODELS[name](**kwargs)
        except (TypeError, ValueError) as e:
            raise OnnxdnsError(f"{name}: {e}") from None


__all__ = ["MODELS", "INPUT_SHAPES", "build", "export_model", "macs", "param_count"]
