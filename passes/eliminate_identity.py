"""Remove Identity nodes, inference-time Dropout nodes and Gathers that select everything in order."""

from __future__ import annotations

import functools
from typing import Callable

import numpy as np
import onnx_ir as ir

from onnxdns import graphutil
from onnxdns.framework import GraphPass, PassReport


class EliminateIdentityPass(GraphPass):
    """Remove ``Identity`` nodes, inference-time ``Dropout`` nodes and no-op ``Gather`` nodes; graph
    output names stay.

    Guarantee: exact (the removed nodes copy their input).

    ``y = Identity(x)`` and ``y, [mask] = Dropout(x, [ratio], [training_mode])`` are removed when

    * Dropout is in inference mode: no ``training_mode`` input or a constant false one (opset
      <= 6: ``is_test=1``), and its ``mask`` output is unused and no graph output;
    * Gather's indices are the constant ``0, 1, ..., n-1`` (1-D) and ``n`` is the input's static
      size along the gather axis (left behind when channel removal narrows the gathered tensor);
    * ``y`` is no graph output, in which case the users of ``y`` read ``x``; or ``y`` is an
      output of the graph holding the node and ``x`` is produced by a node of that same graph and
      is no graph input, initializer or graph output: then ``x`` is renamed ``y``.

    Otherwise (for example ``y`` a graph output that merely copies a graph input, or two graph
    outputs that copy the same value) the node stays, so every graph output keeps its name and
    its own value. Works in the main graph, subgraphs and model-local functions.

    onnx-ir's ``IdentityEliminationPass`` is not used: on onnx-ir 1.1.0 it renames graph outputs
    when one value feeds two output Identities, or when ``y`` copies another graph output
    (``tests/test_eliminate_identity.py`` shows both).
    """

    name = "eliminate-identity"
    exact = True
    summary = "remove Identity, inference-mode Dropout and no-op Gather nodes (graph output names kept)"

    def call(self, model: ir.Model) -> PassReport:
        opset = int(model.opset_imports.get("", 0))
        removed: dict[str, int] = {}
        graphs: list[ir.Graph | ir.Function] = [model.graph, *model.functions.values()]
        inferred = functools.cache(lambda: graphutil.inferred_shapes(model))  # run once, on demand

        def main_graph_shape(name: str) -> tuple[int | None, ...] | None:
            """Shape of a main-graph value without a declared one, from shape inference."""
            return inferred().get(name)

        for graph_like in graphs:
            for node in list(ir.traversal.RecursiveGraphIterator(graph_like)):
                shape_of = main_graph_shape if node.graph is model.graph else _no_shape
                if _try_remove(node, opset, shape_of):
                    removed[node.op_type] = removed.get(node.op_type, 0) + 1
        return PassReport(model, bool(removed), {"removed": removed})


ShapeLookup = Callable[[str], "tuple[int | None, ...] | None"]


def _no_shape(name: str) -> None:
    return None


def _copied_input(node: ir.Node, opset: int, shape_of: ShapeLookup) -> ir.Value | None:
    """The value that ``node``'s first output copies, if the node is a removable copy."""
    if node.domain != "" or not node.inputs or node.inputs[0] is None or not node.outputs:
        return None
    if node.op_type == "Identity":
        if len(node.inputs) != 1 or len(node.outputs) != 1:
            return None
        return node.inputs[0]
    if node.op_type == "Gather":
        return node.inputs[0] if _gathers_everything(node, shape_of) else None
    if node.op_type != "Dropout":
        return None
    if opset and opset <= 6 and graphutil.attr_int(node, "is_test", 0) == 0:
        return None
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        flag = graphutil.const_array(node.inputs[2])
        if flag is None or flag.size != 1 or bool(flag.reshape(-1)[0]):
            return None
    for extra in node.outputs[1:]:
        if extra.uses() or extra.is_graph_output():
            return None
    return node.inputs[0]


def _gathers_everything(node: ir.Node, shape_of: ShapeLookup) -> bool:
    """Gather with constant 1-D indices 0..n-1 over an axis of static size n (the declared shape,
    else ``shape_of(name)``, asked only for indices that may select everything)."""
    if len(node.inputs) != 2 or node.inputs[1] is None:
        return False
    idx = graphutil.const_array(node.inputs[1])
    if idx is None or idx.ndim != 1 or (np.all(idx >= 0) and not np.array_equal(idx, np.arange(idx.size))):
        return False
    data = node.inputs[0]
    shape = tuple(data.shape) if data.shape is not None else shape_of(data.name)
    if shape is None or len(shape) == 0:
        return False
    size = shape[graphutil.attr_int(node, "axis", 0) % len(shape)]
    if not isinstance(size, int):
        return False
    idx = np.where(idx < 0, idx + size, idx)
    return idx.size == size and bool(np.array_equal(idx, np.arange(size)))


def _try_remove(node: ir.Node, opset: int, shape_of: ShapeLookup) -> bool:
    x = _copied_input(node, opset, shape_of)
    if x is None:
        return False
    y = node.outputs[0]
    graph = node.graph
    assert graph is not None
    if y.is_graph_output():
        producer = x.producer()
        if (producer is None or producer.graph is not graph or x.is_graph_output()
                or x.is_graph_input() or x.is_initializer()):
            return False
    if x.shape is None and y.shape is not None:
        x.shape = y.shape
    if x.type is None and y.type is not None:
        x.type = y.type
    name = y.name
    ir.convenience.replace_all_uses_with(y, x, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    if x.is_graph_output():
        x.name = name
    return True
