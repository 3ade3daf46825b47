"""``fold-masks``: fold ``Mul(W, mask)`` into the weight and drop the frozen mask initializers."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxdns import graphutil
from onnxdns.framework import GraphPass, PassReport

#: Suffix the training loop (``add-masks``) gives mask initializers.
MASK_SUFFIX = "__mask"


def is_mask(value: ir.Value, array: np.ndarray) -> bool:
    """A mask is a constant holding only 0 and 1 (any shape that broadcasts onto the weight)."""
    if not np.issubdtype(array.dtype, np.floating) and array.dtype != np.bool_:
        return False
    return bool(np.all((array == 0) | (array == 1)))


class FoldMasksPass(GraphPass):
    """Folds ``Mul(W, T)`` with constant W and a constant binary mask T into one weight ``W*T``.

    Guarantee: exact. The folded weight is the same float product the ``Mul`` node computes
    (negative zeros are normalised to +0, which compares equal), so onnxruntime outputs are
    unchanged bit for bit.

    Matches either input order and any mask shape that broadcasts onto W. A weight used only by
    the ``Mul`` is rewritten in place (keeping its name); a weight shared with other nodes is left
    alone and a new initializer ``<W>_masked`` is created. Masks that are no longer used
    afterwards (the ``<W>__mask`` initializers the training loop adds, or any other) are removed.
    A ``Mul`` whose output is a graph output is not folded (the output name must survive).
    """

    name = "fold-masks"
    summary = "fold Mul(weight, binary mask) into the weight; drop mask initializers"

    def call(self, model: ir.Model) -> PassReport:
        graph = model.graph
        folded: list[str] = []
        masks: list[str] = []
        mask_nodes: list[ir.Node] = []
        for node in list(graph):
            if node.op_type != "Mul" or node.domain != "" or len(node.inputs) != 2:
                continue
            out = node.outputs[0]
            if out.is_graph_output():
                continue
            a, b = node.inputs
            arr_a, arr_b = graphutil.const_array(a), graphutil.const_array(b)
            if arr_a is None or arr_b is None:
                continue
            if is_mask(b, arr_b):
                weight, w_arr, mask, m_arr = a, arr_a, b, arr_b
            elif is_mask(a, arr_a):
                weight, w_arr, mask, m_arr = b, arr_b, a, arr_a
            else:
                continue
            product = (w_arr * m_arr.astype(w_arr.dtype)).astype(w_arr.dtype) + w_arr.dtype.type(0)
            if (
                graphutil.is_initializer(weight)
                and graphutil.only_user(weight, node)
                and product.shape == w_arr.shape
                and weight is not mask
            ):
                weight.const_value = ir.tensor(product, name=weight.name)
                new_value = weight
            else:
                new_value = graphutil.add_initializer(graph, product, f"{weight.name or 'weight'}_masked")
            ir.convenience.replace_all_uses_with(out, new_value)
            graph.remove(node, safe=True)
            folded.append(new_value.name)
            if mask.producer() is not None:
                mask_nodes.append(mask.producer())
            elif mask.name:
                masks.append(mask.name)
        removed = graphutil.remove_unused_initializers(graph, masks)
        # Mask initializers the training loop added whose Mul was already folded elsewhere.
        leftover = [n for n in graph.initializers if n.endswith(MASK_SUFFIX)]
        removed += graphutil.remove_unused_initializers(graph, leftover)
        for mask_node in dict.fromkeys(mask_nodes):  # Constant nodes that produced folded masks
            if not any(o.uses() or o.is_graph_output() for o in mask_node.outputs):
                graph.remove(mask_node, safe=True)
        modified = bool(folded or removed)
        return PassReport(model, modified, {"folded": folded, "masks_removed": removed})
