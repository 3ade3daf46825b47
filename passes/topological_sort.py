"""Topological sort of the graph, its subgraphs and functions."""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes import common as ir_common

from onnxdns.errors import OnnxdnsError
from onnxdns.framework import GraphPass, PassReport


class TopologicalSortPass(GraphPass):
    """Order nodes so every node comes after the producers of its inputs (ONNX requires it).

    Guarantee: exact (only the node order changes). The sort is onnx-ir's stable
    ``TopologicalSortPass``: an already sorted graph keeps its order. ``modified`` compares the
    node order of the main graph, every subgraph and every function before and after (onnx-ir's
    own flag ignores subgraphs). A cyclic graph raises :class:`OnnxdnsError`.
    """

    name = "topo-sort"
    exact = True
    summary = "stable topological sort of the graph, subgraphs and functions"

    def call(self, model: ir.Model) -> PassReport:
        before = _node_order(model)
        try:
            ir_common.TopologicalSortPass()(model)
        except ValueError as e:
            raise OnnxdnsError(f"topo-sort: the graph cannot be sorted: {str(e).splitlines()[0]}") from None
        after = _node_order(model)
        moved = sum(1 for a, b in zip(before, after) if a is not b)
        return PassReport(model, moved > 0, {"moved_nodes": moved})


def _node_order(model: ir.Model) -> list[ir.Node]:
    graphs: list[ir.Graph | ir.Function] = [model.graph, *model.functions.values()]
    return [node for graph in graphs for node in ir.traversal.RecursiveGraphIterator(graph)]
