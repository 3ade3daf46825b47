"""How much a relative error at each layer's output moves the model's outputs (allocation weights).

The allocation adds up per-layer squared relative errors; layers differ in how much the rest of
the network amplifies an error made there. :func:`sensitivities` measures it with onnxruntime on
a copy of the model in which every candidate layer's activated output is multiplied by a new
input ``1 + delta * noise`` (one layer at a time): the sensitivity of a layer is the resulting
squared relative change of the model outputs divided by ``delta^2``. For a convolution the noise
is drawn per sample and *channel* (constant over the spatial positions): the errors of a split
layer are structured and would not average out in a later pooling as white noise does. For a
Gemm/MatMul, whose output may hold its samples on any leading axis (``[seq, batch, d]``), it is
drawn per element.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx
from onnx import helper

from onnxdns import runtime
from onnxdns.lowrank.calibration import Inputs, run
from onnxdns.lowrank.layers import Layer

NOISE_SUFFIX = "__slr_noise"


def noisy_model(proto: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``proto`` with each value in ``names`` multiplied by a new float input ``<name>__slr_noise``."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    graph = out.graph
    renamed = {name: f"{name}__slr_clean" for name in names}
    nodes = []
    for original in graph.node:  # each noise Mul right after the node producing its value: still sorted
        node = onnx.NodeProto()
        node.CopyFrom(original)
        nodes.append(node)
        for i, o in enumerate(node.output):
            if o in renamed:
                node.output[i] = renamed[o]
                nodes.append(helper.make_node("Mul", [renamed[o], o + NOISE_SUFFIX], [o]))
    del graph.node[:]
    graph.node.extend(nodes)
    for name in names:
        graph.input.append(helper.make_tensor_value_info(name + NOISE_SUFFIX, onnx.TensorProto.FLOAT, None))
    return out


def sensitivities(proto: onnx.ModelProto, layers: Sequence[Layer], inputs: Inputs, *, delta: float = 0.1,
                  seed: int = 0, threads: int = 0, batch: int = 64) -> dict[int, float]:
    """Layer index -> mean squared relative output change per unit squared relative error.

    The noise of a convolution's output ``[N, C, H, W]`` is drawn per sample and channel; that of
    a Gemm/MatMul output per element (its samples may sit on any leading axis).
    """
    names = [layer.activated_name for layer in layers]
    convs = {layer.activated_name for layer in layers if layer.geometry.op == "Conv"}
    model = noisy_model(proto, names)
    session = runtime.make_session(model, threads=threads)
    probe = runtime.make_session(_with_outputs(proto, names), threads=threads)
    rng = np.random.default_rng(seed)
    change = np.zeros(len(layers))
    total = 0.0
    for start in range(0, len(inputs), batch):
        feeds = inputs.feeds(start, start + batch)
        shapes = {}
        for name, value in zip(names, run(probe, names, feeds)):
            shapes[name] = value.shape[:2] + (1,) * (value.ndim - 2) if name in convs else value.shape
        ones = {n + NOISE_SUFFIX: np.ones(shapes[n], np.float32) for n in names}
        clean = run(session, None, {**feeds, **ones})
        total += sum(float(np.sum(np.square(o.astype(np.float64)))) for o in clean)
        for i, name in enumerate(names):
            noise_feeds = dict(ones)
            noise = rng.standard_normal(shapes[name])
            noise_feeds[name + NOISE_SUFFIX] = (1 + delta * noise).astype(np.float32)
            noisy = run(session, None, {**feeds, **noise_feeds})
            change[i] += sum(float(np.sum(np.square(a.astype(np.float64) - b))) for a, b in zip(noisy, clean))
    return {layer.index: float(change[i] / max(total, 1e-30) / delta ** 2) for i, layer in enumerate(layers)}


def _with_outputs(proto: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    from onnxdns.lowrank.calibration import prefix_model

    return prefix_model(proto, list(names))
