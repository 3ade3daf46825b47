"""Synthetic sparsity for tests and benchmarks: zero random channels, randomise BatchNorm.

``zero_channels`` zeroes a random fraction of the output channels (filter rows) of every
prunable layer, the situation ``remove-channels`` must handle exactly; ``randomize_batchnorm``
gives BatchNorm layers non-trivial statistics so that zeroed channels become non-zero
constants (the hard case: folding into biases, or keeping them at zero-padded convs).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper


def _initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def _replace(model: onnx.ModelProto, name: str, array: np.ndarray) -> None:
    for i, t in enumerate(model.graph.initializer):
        if t.name == name:
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(array.astype(numpy_helper.to_array(t).dtype), name))
            return
    raise KeyError(name)


def prunable_layers(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, str, int]]:
    """(node, weight name, output-channel axis) of every Conv/ConvTranspose/Gemm/MatMul with a constant weight."""
    inits = _initializers(model)
    out = []
    for node in model.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        w = node.input[1]
        if w not in inits:
            continue
        if node.op_type == "Conv":
            axis = 0
        elif node.op_type == "ConvTranspose":
            axis = 1
        elif node.op_type == "Gemm":
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            axis = 0 if trans_b else 1
        else:
            axis = 1
        out.append((node, w, axis))
    return out


def zero_channels(model: onnx.ModelProto, fraction: float = 0.5, seed: int = 0, *, skip_depthwise: bool = True) -> tuple[onnx.ModelProto, dict[str, list[int]]]:
    """Zero ``fraction`` of the output channels of every prunable layer (a copy is returned).

    Depthwise convs are skipped by default: their channels are tied to their input's.
    Returns the model and ``{weight name: zeroed output channels}``.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    rng = np.random.default_rng(seed)
    inits = _initializers(out)
    zeroed: dict[str, list[int]] = {}
    for node, w_name, axis in prunable_layers(out):
        w = numpy_helper.to_array(inits[w_name]).copy()
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if skip_depthwise and node.op_type == "Conv" and group > 1 and w.shape[1] == 1:
            continue
        n = w.shape[axis]
        chosen = sorted(rng.choice(n, size=int(round(n * fraction)), replace=False).tolist())
        index = [slice(None)] * w.ndim
        index[axis] = chosen
        w[tuple(index)] = 0
        _replace(out, w_name, w)
        inits = _initializers(out)
        zeroed[w_name] = chosen
    return out, zeroed


def randomize_batchnorm(model: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto:
    """Give every BatchNormalization random scale, bias, mean and (positive) variance."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    rng = np.random.default_rng(seed)
    inits = _initializers(out)
    for node in out.graph.node:
        if node.op_type != "BatchNormalization":
            continue
        for name, kind in zip(node.input[1:5], ("scale", "bias", "mean", "var")):
            if name not in inits:
                continue
            shape = numpy_helper.to_array(inits[name]).shape
            if kind == "var":
                value = rng.uniform(0.5, 2.0, shape)
            elif kind == "scale":
                value = rng.uniform(0.5, 1.5, shape) * rng.choice([-1, 1], shape)
            else:
                value = rng.normal(0, 1, shape)
            _replace(out, name, value)
    return out
