"""Exact rewrites of operators onnxruntime-training 1.19 has no gradient for, applied to the copy
of a model its artifacts are generated from.

onnxruntime 1.19.2's gradient builder registry has no entry for ``HardSigmoid`` and ``HardSwish``
("The gradient builder has not been registered: HardSwish"): MobileNetV3 (torchvision's, and the
PP-OCR models') uses both, HardSigmoid as the gate of every squeeze-and-excitation block. Both are
rewritten with operators it can differentiate (checked on this stack: Mul, Add, Clip):

* ``HardSigmoid(x; alpha, beta)  = Clip(x * alpha + beta, 0, 1)``
* ``HardSwish(x)                 = x * Clip(x * (1/6) + 0.5, 0, 1)``

The same arithmetic in the same order as onnxruntime's kernels, so training and evaluation
compute the model's function; the model written at the end of a run is the input model with the
trained weights (``training.api.inference_model``), so it keeps the original operators.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxdns.graphutil import fresh_name

#: op type -> (alpha, beta) defaults of the ONNX operator
_HARD_OPS = {"HardSigmoid": (0.2, 0.5), "HardSwish": (1.0 / 6.0, 0.5)}


def differentiable(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` itself when it has nothing to rewrite, else a rewritten copy (the input is not changed)."""
    if not any(n.op_type in _HARD_OPS and n.domain in ("", "ai.onnx") for n in model.graph.node):
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    constants: dict[float, str] = {}
    taken = {v for n in out.graph.node for v in (*n.input, *n.output)} | {i.name for i in out.graph.initializer} \
        | {i.name for i in out.graph.input}

    def fresh(base: str) -> str:
        return fresh_name(base, taken)

    def constant(value: float) -> str:
        if value not in constants:
            constants[value] = fresh(f"onnxdns_hard_const_{len(constants)}")
            out.graph.initializer.append(numpy_helper.from_array(np.array(value, np.float32), constants[value]))
        return constants[value]

    nodes = []
    for node in out.graph.node:
        if node.op_type not in _HARD_OPS or node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        alpha, beta = _HARD_OPS[node.op_type]
        for a in node.attribute:
            if a.name == "alpha":
                alpha = a.f
            elif a.name == "beta":
                beta = a.f
        x, y = node.input[0], node.output[0]
        base = node.name or y
        scaled, shifted = fresh(f"{base}/scaled"), fresh(f"{base}/shifted")
        gate = y if node.op_type == "HardSigmoid" else fresh(f"{base}/gate")
        nodes += [
            helper.make_node("Mul", [x, constant(alpha)], [scaled], name=fresh(f"{base}/Mul_alpha")),
            helper.make_node("Add", [scaled, constant(beta)], [shifted], name=fresh(f"{base}/Add_beta")),
            helper.make_node("Clip", [shifted, constant(0.0), constant(1.0)], [gate], name=fresh(f"{base}/Clip")),
        ]
        if node.op_type == "HardSwish":
            nodes.append(helper.make_node("Mul", [x, gate], [y], name=fresh(f"{base}/Mul_x")))
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out
