"""Channel-preserving ops: BatchNormalization, elementwise ops, pools, Identity and Dropout."""

from __future__ import annotations

import numpy as np

from onnxdns import graphutil
from onnxdns.channels.constants import evaluate_node
from onnxdns.channels.handlers.base import const_input, Handler, _padded
from onnxdns.channels.layout import Layout


class BatchNormHandler(Handler):
    """BatchNormalization (inference form, one output). gamma = 0 makes a channel constant beta."""

    def propagate(self, node, g):
        layout = g.layout(node.inputs[0])
        params = [const_input(v) for v in node.inputs[1:5]]
        if len(node.outputs) != 1 or any(p is None for p in params):
            return Handler.propagate(self, node, g)
        if layout is None:
            return
        if layout.axis != 1 or layout.block != 1:
            return Handler.propagate(self, node, g)
        g.set_layout(node.outputs[0], layout)

    def constants(self, node, g):
        layout = g.layout(node.outputs[0])
        if layout is None:
            return
        v = g.const(node.inputs[0])
        rank = g.rank(node.inputs[0]) or 4
        params = [const_input(x) for x in node.inputs[1:5]]
        out = evaluate_node(node, [(v, 1, rank), *params], 1, rank, g.opset)
        if out is None:
            return
        gamma, beta = params[0], params[1]
        absorbed = gamma == 0
        out[absorbed] = beta[absorbed]
        g.set_const(node.outputs[0], out)

    def rewrite(self, node, g):
        if g.layout(node.outputs[0]) is None:
            return
        keep = g.keep(node.outputs[0])
        if keep.all():
            return
        for i in range(1, 5):
            graphutil.set_input_constant(g.graph, node, i, const_input(node.inputs[i])[keep])


def _aligned_axis(out_axis: int, out_rank: int, rank: int) -> int:
    return out_axis - (out_rank - rank)


class ElementwiseHandler(Handler):
    """Unary, binary and variadic elementwise ops with numpy-style broadcasting.

    Tracked inputs of full channel length are tied; constant operands with one value per
    channel are sliced; a tracked input broadcast along channels (length 1) is pinned. A
    non-constant untracked input of full channel length pins the output's channels.
    """

    def _classify(self, node, g):
        ranks = []
        for v in node.inputs:
            if v is None:
                continue
            arr = const_input(v)
            r = arr.ndim if arr is not None else g.rank(v)
            if r is None:
                return None
            ranks.append(r)
        out_rank = max(ranks) if ranks else 0
        axis = None
        for v in node.inputs:
            layout = g.layout(v)
            if layout is not None:
                a = layout.axis + out_rank - g.rank(v)
                if (axis is not None and a != axis) or layout.block != 1:
                    return None
                axis = a
        return out_rank, axis

    def propagate(self, node, g):
        tracked = [v for v in node.inputs if g.layout(v) is not None]
        if not tracked:
            return
        info = self._classify(node, g)
        if info is None or len([o for o in node.outputs if o.uses() or o.is_graph_output()]) > 1:
            return Handler.propagate(self, node, g)
        out_rank, axis = info
        channels = max(len(g.layout(v)) for v in tracked)
        main = next(g.layout(v) for v in tracked if len(g.layout(v)) == channels)
        reason = f"combined elementwise in {node.op_type} {g.node_name(node)}"
        for v in node.inputs:
            if v is None:
                continue
            layout = g.layout(v)
            if layout is not None:
                if len(layout) == channels:
                    g.slots.tie(main.slots, layout.slots, reason)
                else:
                    g.pin(layout.slots, f"broadcast along channels in {node.op_type} {g.node_name(node)}")
                continue
            arr = const_input(v)
            shape = arr.shape if arr is not None else g.shape(v)
            a = _aligned_axis(axis, out_rank, len(shape))
            dim = shape[a] if a >= 0 else 1
            if arr is None and dim != 1:
                g.pin(main.slots, f"{node.op_type} {g.node_name(node)} adds a non-constant untracked tensor")
            elif arr is not None and dim not in (1, channels):
                return Handler.propagate(self, node, g)
        g.set_layout(node.outputs[0], Layout(axis, main.slots))

    def constants(self, node, g):
        layout = g.layout(node.outputs[0])
        if layout is None:
            return
        out_rank, axis = self._classify(node, g)
        inputs = []
        for v in node.inputs:
            if v is None:
                inputs.append(None)
            elif g.layout(v) is not None:
                inputs.append((g.const(v), g.layout(v).axis, g.rank(v)))
            else:
                arr = const_input(v)
                if arr is None:
                    return  # a non-constant operand: nothing is constant
                inputs.append(arr)
        out = evaluate_node(node, inputs, axis, out_rank, g.opset)
        if out is not None and len(out) == len(layout):
            if node.op_type == "Mul":  # x * 0 is 0 whatever x is
                for arr in inputs:
                    if isinstance(arr, np.ndarray):
                        zero = _per_channel(arr, axis, out_rank, len(out))
                        if zero is not None:
                            out[zero == 0] = 0.0
            g.set_const(node.outputs[0], out)

    def rewrite(self, node, g):
        layout = g.layout(node.outputs[0])
        if layout is None:
            return
        keep = g.keep(node.outputs[0])
        if keep.all():
            return
        out_rank, axis = self._classify(node, g)
        for i, v in enumerate(node.inputs):
            if v is None or g.layout(v) is not None:
                continue
            arr = const_input(v)
            if arr is None:
                continue
            a = _aligned_axis(axis, out_rank, arr.ndim)
            if a >= 0 and arr.shape[a] == len(keep) and len(keep) > 1:
                graphutil.set_input_constant(g.graph, node, i, np.compress(keep, arr, axis=a))


def _per_channel(arr: np.ndarray, axis: int, out_rank: int, channels: int) -> np.ndarray | None:
    """A constant operand as one value per channel, if it is uniform along the other axes."""
    a = _aligned_axis(axis, out_rank, arr.ndim)
    moved = np.moveaxis(arr, a, 0).reshape(arr.shape[a], -1) if a >= 0 else arr.reshape(1, -1)
    if not np.all(moved == moved[:, :1]):
        return None
    return np.broadcast_to(moved[:, 0], (channels,))


class PassThroughHandler(Handler):
    """Identity, inference Dropout, pools: output channel i is input channel i."""

    def __init__(self, keeps_constants: bool = True):
        self.keeps_constants = keeps_constants

    def propagate(self, node, g):
        layout = g.layout(node.inputs[0])
        if layout is None:
            return
        used = [o for o in node.outputs[1:] if o.uses() or o.is_graph_output()]
        pooling = node.op_type not in ("Identity", "Dropout")
        if used or (pooling and (layout.axis != 1 or layout.block != 1)):
            return Handler.propagate(self, node, g)
        g.set_layout(node.outputs[0], layout)

    def constants(self, node, g):
        if g.layout(node.outputs[0]) is None:
            return
        v = g.const(node.inputs[0])
        if node.op_type == "AveragePool" and _padded(node) and graphutil.attr_int(node, "count_include_pad", 0):
            v = np.where(v == 0, 0.0, np.nan)  # padded zeros enter the average at the borders
        g.set_const(node.outputs[0], v)
