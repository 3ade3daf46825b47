"""Dead-code elimination: unused nodes, initializers and opset imports."""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, RemoveUnusedOpsetsPass

from onnxdns.framework import GraphPass, PassReport


class RemoveDeadNodesPass(GraphPass):
    """Remove nodes whose outputs nothing uses, unused initializers and unused opset imports.

    Guarantee: exact; the model signature (graph inputs and outputs) is unchanged.

    Built on onnx-ir's ``RemoveUnusedNodesPass`` (main graph, subgraphs and functions; a value
    read inside a subgraph counts as used; initializers that are graph inputs stay; unused
    optional trailing node outputs, e.g. a Dropout mask, are dropped) and
    ``RemoveUnusedOpsetsPass`` (a domain is dropped only when no node of the graph, its subgraphs
    or any function uses it and no function is defined in it; the default domain always stays).
    ``modified`` is computed here from what actually changed, since onnx-ir's count misses
    dropped node outputs and inputs.
    """

    name = "remove-dead-nodes"
    exact = True
    summary = "remove unused nodes, initializers and opset imports"

    def call(self, model: ir.Model) -> PassReport:
        before = _inventory(model)
        RemoveUnusedNodesPass()(model)
        RemoveUnusedOpsetsPass()(model)
        after = _inventory(model)
        details = {key: before[key] - after[key] for key in before if before[key] != after[key]}
        return PassReport(model, before != after, {"removed": details})


def _inventory(model: ir.Model) -> dict[str, int]:
    """Counts that any removal by the two onnx-ir passes changes."""
    counts = {"nodes": 0, "node_inputs": 0, "node_outputs": 0, "named_outputs": 0, "attributes": 0,
              "initializers": len(model.graph.initializers), "opset_imports": len(model.opset_imports)}
    graphs: list[ir.Graph | ir.Function] = [model.graph, *model.functions.values()]
    for graph_like in graphs:
        if isinstance(graph_like, ir.Function):
            counts["opset_imports"] += len(graph_like.opset_imports)
        for node in ir.traversal.RecursiveGraphIterator(graph_like):
            counts["nodes"] += 1
            counts["node_inputs"] += len(node.inputs)
            counts["node_outputs"] += len(node.outputs)
            counts["named_outputs"] += sum(1 for o in node.outputs if o.name)
            counts["attributes"] += len(node.attributes)
    return counts
