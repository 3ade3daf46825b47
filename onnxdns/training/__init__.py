"""Fine-tuning ONNX models with onnxruntime-training (masks as graph initializers).

``train`` (:mod:`onnxdns.training.api`) runs Dynamic Network Surgery, magnitude pruning or plain
training; ``onnxdns.training.cli`` provides ``onnxdns train``. Importing this package is cheap;
``train`` loads onnxruntime-training (and with it torch) on first use.
"""

from __future__ import annotations

from typing import Any

from onnxdns.training.config import METHODS, TrainConfig

__all__ = ["METHODS", "TrainConfig", "train"]


def train(*args: Any, **kwargs: Any):
    """See :func:`onnxdns.training.api.train`."""
    from onnxdns.training.api import train as _train

    return _train(*args, **kwargs)
