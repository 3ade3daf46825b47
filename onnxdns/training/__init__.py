"""Fine-tuning ONNX models with onnxruntime-training (masks as graph initializers).

The engine of the ``train`` workflow (:mod:`onnxdns.workflows.train`): training artifacts, the
loop, losses, methods (Dynamic Network Surgery, magnitude pruning, Network Slimming's penalty);
``onnxdns.training.cli`` provides ``onnxdns train``. Importing this package is cheap;
``train`` loads onnxruntime-training (and with it torch) on first use.
"""

from __future__ import annotations

from typing import Any

from onnxdns.training.config import METHODS, TrainConfig

__all__ = ["METHODS", "TrainConfig", "train"]


def train(*args: Any, **kwargs: Any):
    """See :func:`onnxdns.workflows.train.train`."""
    from onnxdns.workflows.train import train as _train

    return _train(*args, **kwargs)
