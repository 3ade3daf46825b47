"""Emit a split layer as standard ONNX nodes: low-rank branch + structured-sparse branch, summed.

For a layer ``y = W x + b`` split as ``W = S + P Q`` (see :mod:`onnxdns.lowrank.fit`):

* low-rank branch (rank r): ``Conv`` with r output channels and the original kernel, strides,
  pads and dilations (``Q``), then a 1x1 ``Conv`` to the m outputs (``P``, with the bias); for
  ``Gemm`` two Gemms ``[N, d] -> [N, r] -> [N, m]``, for ``MatMul`` two MatMuls;
* sparse branch (g kept input groups): ``Gather`` of the kept input channels (axis 1; the last
  axis for MatMul; no Gather when every channel is kept), then a dense ``Conv`` / ``Gemm`` /
  ``MatMul`` over them, so it costs compute in proportion to what it keeps;
* ``Add`` of the two branches; the result takes over the original output value (same name), so
  the activation that followed the layer now follows the sum. A MatMul layer gets its bias from
  an extra ``Add`` when the fitted bias is not zero.

Every node's name contains :data:`onnxdns.lowrank.layers.MARK`.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxdns import graphutil
from onnxdns.lowrank.fit import Factors
from onnxdns.lowrank.layers import MARK, Geometry, Layer


def build(graph: ir.Graph, geometry: Geometry, x: ir.Value, factors: Factors, base: str,
          doc: str = "") -> tuple[list[ir.Node], ir.Value]:
    """The nodes computing the split layer from ``x`` (not yet in the graph) and their output.

    Initializers are registered in ``graph`` with unique names derived from ``base``.
    """
    if factors.rank == 0 and factors.kept == 0:
        raise ValueError("a split layer needs a rank or kept groups")
    nodes: list[ir.Node] = []
    op = geometry.op
    m = geometry.out_channels

    def const(array: np.ndarray, suffix: str) -> ir.Value:
        return graphutil.add_initializer(graph, np.ascontiguousarray(array), f"{base}{MARK}{suffix}")

    def add(op_type: str, inputs: list[ir.Value], suffix: str, **attrs) -> ir.Value:
        node = ir.node(op_type, inputs, attributes=attrs or None, name=f"{base}{MARK}{suffix}", doc_string=doc or None)
        node.outputs[0].name = graphutil.unique_name(graph, f"{base}{MARK}{suffix}_out")
        nodes.append(node)
        return node.outputs[0]

    bias = factors.bias.astype(np.float32)
    bias_used = op == "MatMul"
    branches = []
    if factors.rank:
        r = factors.rank
        p, q = balanced(factors.p, factors.q)
        if op == "Conv":
            t = add("Conv", [x, const(q.reshape(r, geometry.in_channels, *geometry.kernel), "q")], "lowrank_in",
                    **_conv_attrs(geometry))
            branches.append(add("Conv", [t, const(p.reshape(m, r, 1, 1), "p"), const(bias, "bias")], "lowrank_out",
                                kernel_shape=[1, 1]))
        elif op == "Gemm":
            t = add("Gemm", [x, const(q, "q")], "lowrank_in", transB=1)
            branches.append(add("Gemm", [t, const(p, "p"), const(bias, "bias")], "lowrank_out", transB=1))
        else:
            t = add("MatMul", [x, const(np.ascontiguousarray(q.T), "q")], "lowrank_in")
            branches.append(add("MatMul", [t, const(np.ascontiguousarray(p.T), "p")], "lowrank_out"))
        bias_used = True
    if factors.kept:
        s = factors.s.astype(np.float32)
        g = factors.kept
        xs = x
        if g < geometry.in_channels:
            axis = -1 if op == "MatMul" else 1
            xs = add("Gather", [x, const(factors.keep.astype(np.int64), "keep")], "gather", axis=axis)
        with_bias = [] if bias_used else [const(bias, "bias")]
        if op == "Conv":
            branches.append(add("Conv", [xs, const(s.reshape(m, g, *geometry.kernel), "s")] + with_bias, "sparse",
                                **_conv_attrs(geometry)))
        elif op == "Gemm":
            branches.append(add("Gemm", [xs, const(s, "s")] + with_bias, "sparse", transB=1))
        else:
            branches.append(add("MatMul", [xs, const(np.ascontiguousarray(s.T), "s")], "sparse"))
    out = branches[0] if len(branches) == 1 else add("Add", branches, "sum")
    if op == "MatMul" and np.any(bias != 0):
        out = add("Add", [out, const(bias, "bias")], "bias")
    return nodes, out


def balanced(p: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``P D, D^-1 Q`` (float32) with ``D`` diagonal so that column i of P and row i of Q have the
    same norm: the same product, and factors on one scale for fine-tuning."""
    pn = np.linalg.norm(p, axis=0)
    qn = np.linalg.norm(q, axis=1)
    scale = np.sqrt(np.where((pn > 0) & (qn > 0), qn / np.where(pn > 0, pn, 1), 1.0))
    return (p * scale).astype(np.float32), (q / scale[:, None]).astype(np.float32)


def replace(graph: ir.Graph, layer: Layer, factors: Factors, doc: str = "") -> list[str]:
    """Replace ``layer``'s node by its split form; returns the new node names.

    The new output takes over the old output's name, type and shape; the old weight and bias
    initializers go when nothing else uses them.
    """
    old = layer.node
    old_inputs = [v for v in old.inputs[1:] if v is not None]
    nodes, out = build(graph, layer.geometry, old.inputs[0], factors, layer.name, doc)
    ir.convenience.replace_nodes_and_values(graph, old, [old], nodes, [old.outputs[0]], [out])
    graphutil.remove_unused_initializers(graph, [v.name for v in old_inputs if graphutil.is_initializer(v)])
    return [n.name for n in nodes]


def _conv_attrs(geometry: Geometry) -> dict:
    return {"kernel_shape": list(geometry.kernel), "strides": list(geometry.strides), "pads": list(geometry.pads),
            "dilations": list(geometry.dilations)}
