"""The Python API: one function per command, each a thin entry to its workflow (:mod:`onnxdns.workflows`).

* :func:`optimize` (:mod:`onnxdns.workflows.optimize`): a target's pass pipeline or named passes,
  the output written atomically, checked and validated against the input with onnxruntime;
* :func:`train` (:mod:`onnxdns.workflows.train`): fine-tune and prune (DNS, magnitude, Network
  Slimming's sparsity training) on any data, with resumable checkpoints;
* :func:`slim` (:mod:`onnxdns.workflows.slim`): Network Slimming end to end, restartable stages;
* :func:`inspect` and :func:`validate`: statistics of a file, comparison of two models.

Importing this module is cheap: onnxruntime (and onnxruntime-training's torch) load on first use.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import onnx

from onnxdns import modelio
from onnxdns.stats import ModelStats, model_stats
from onnxdns.workflows.optimize import (EXACT_TOLERANCE, FP16_TOLERANCE, OptimizeResult, PassRun, Validation,
                                        optimize)

if TYPE_CHECKING:
    from onnxdns.validate import Comparison
    from onnxdns.workflows.slim import SlimResult
    from onnxdns.workflows.train import TrainResult

__all__ = ["EXACT_TOLERANCE", "FP16_TOLERANCE", "OptimizeResult", "PassRun", "Validation", "inspect", "optimize",
           "slim", "train", "validate"]


def inspect(path: str | os.PathLike) -> ModelStats:
    """Statistics of the ONNX file at ``path`` (per-layer rows and totals)."""
    proto, files = modelio.load_unread(path)
    return model_stats(proto, file_bytes=modelio.disk_bytes(path, files), model_path=path)


def validate(model_a: str | os.PathLike | onnx.ModelProto, model_b: str | os.PathLike | onnx.ModelProto,
             **options: Any) -> Comparison:
    """Compare two models (paths are loaded and checked first); ``options`` go to
    :func:`onnxdns.validate.compare`."""
    from onnxdns.validate import compare

    a = model_a if isinstance(model_a, onnx.ModelProto) else modelio.load_model(model_a)
    b = model_b if isinstance(model_b, onnx.ModelProto) else modelio.load_model(model_b)
    return compare(a, b, **options)


def train(*args: Any, **kwargs: Any) -> TrainResult:
    """Fine-tune (and prune) a model on any data: see :func:`onnxdns.workflows.train.train`
    (needs ``onnxdns[train]``; imported on first use)."""
    from onnxdns.workflows.train import train as _train

    return _train(*args, **kwargs)


def slim(input_path: str | os.PathLike, output_path: str | os.PathLike, **options: Any) -> SlimResult:
    """Network Slimming: sparsity training, channel pruning, fine-tuning, optimize (restartable).
    See :func:`onnxdns.workflows.slim.slim` for the options."""
    from onnxdns.workflows.slim import slim as _slim

    return _slim(input_path, output_path, **options)
