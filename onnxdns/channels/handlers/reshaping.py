"""Ops that move or reshape the channel axis: Flatten, Reshape, Transpose, Squeeze/Unsqueeze,
reductions, Resize, and Shape (harmless when only other dimensions are read)."""

from __future__ import annotations

import numpy as np

from onnxdns import graphutil
from onnxdns.channels.handlers.base import Handler, SameChannels, _axes_input
from onnxdns.channels.layout import Layout


class FlattenHandler(SameChannels):
    """Flatten(axis=1) of a [N, C, ...] tensor: channel c becomes a block of prod(spatial) features."""

    def propagate(self, node, g):
        layout = g.layout(node.inputs[0])
        if layout is None:
            return
        shape = g.shape(node.inputs[0])
        axis = graphutil.attr_int(node, "axis", 1)
        if shape is None or axis != 1 or layout.axis != 1 or any(d is None for d in shape[2:]):
            return Handler.propagate(self, node, g)
        block = layout.block * int(np.prod(shape[2:], dtype=np.int64))
        g.set_layout(node.outputs[0], Layout(1, layout.slots, block))


class ReshapeHandler(SameChannels):
    """Reshape that keeps the channel axis or flattens [N, C, ...] into [N, C*...]."""

    def _plan(self, node, g):
        layout = g.layout(node.inputs[0])
        shape_in = g.shape(node.inputs[0])
        target = graphutil.const_array(node.inputs[1])
        if layout is None or shape_in is None or target is None or layout.block != 1:
            return None
        a = layout.axis
        if any(d is None for d in shape_in[a:]) or len(target) <= a:
            return None
        lead = list(target[:a])
        if not all(t == 0 or (shape_in[i] is not None and t == shape_in[i]) or (t == -1 and i == 0 and a == 1) for i, t in enumerate(lead)):
            return None
        rest = int(np.prod(shape_in[a + 1:], dtype=np.int64))
        tail_in = list(shape_in[a + 1:])
        if len(target) == a + 1 and target[a] in (-1, shape_in[a] * rest):
            return Layout(a, layout.slots, rest)  # flatten channels with everything after them
        if target[a] in (0, shape_in[a]) and (list(target[a + 1:]) == tail_in or (len(target) > a + 1 and int(np.prod([t for t in target[a + 1:]])) in (rest, -rest))):
            return Layout(a, layout.slots, 1)  # channel axis kept, trailing dims reshaped
        return None

    def propagate(self, node, g):
        if g.layout(node.inputs[0]) is None:
            return
        out = self._plan(node, g)
        if out is None:
            return Handler.propagate(self, node, g)
        g.set_layout(node.outputs[0], out)

    def rewrite(self, node, g):
        layout = g.layout(node.outputs[0])
        if layout is None:
            return
        keep = g.keep(node.outputs[0])
        target = graphutil.const_array(node.inputs[1])
        a = layout.axis
        if keep.all() or target[a] in (-1, 0):
            return
        new = target.copy()
        new[a] = int(keep.sum()) * layout.block
        graphutil.set_input_constant(g.graph, node, 1, new)


class ShapeHandler(Handler):
    """Shape of a tracked tensor is harmless when only non-channel dimensions are read."""

    def propagate(self, node, g):
        layout = g.layout(node.inputs[0])
        if layout is None:
            return
        start = graphutil.attr_int(node, "start", 0)
        rank = g.rank(node.inputs[0])
        ok = rank is not None
        for use in node.outputs[0].uses():
            idx = graphutil.const_array(use.node.inputs[1]) if use.node.op_type == "Gather" and use.idx == 0 else None
            if idx is None or idx.ndim != 0 or (int(idx) + start) % rank == layout.axis:
                ok = False
        if not ok or node.outputs[0].is_graph_output():
            return Handler.propagate(self, node, g)


class TransposeHandler(SameChannels):
    """Transpose moves the channel axis."""

    def propagate(self, node, g):
        layout = g.layout(node.inputs[0])
        if layout is None:
            return
        perm = graphutil.attr_ints(node, "perm")
        rank = g.rank(node.inputs[0])
        if rank is None or layout.block != 1:
            return Handler.propagate(self, node, g)
        perm = list(reversed(range(rank))) if perm is None else perm
        g.set_layout(node.outputs[0], layout.with_axis(perm.index(layout.axis)))


class SqueezeHandler(SameChannels):
    """Squeeze/Unsqueeze of axes other than the channel axis shift it."""

    def propagate(self, node, g):
        layout = g.layout(node.inputs[0])
        if layout is None:
            return
        rank = g.rank(node.inputs[0])
        axes = _axes_input(node)
        if rank is None or axes is None or layout.block != 1:
            return Handler.propagate(self, node, g)
        if node.op_type == "Squeeze":
            axes = [a % rank for a in axes]
            if layout.axis in axes:
                return Handler.propagate(self, node, g)
            new_axis = layout.axis - sum(a < layout.axis for a in axes)
        else:
            out_rank = rank + len(axes)
            axes = sorted(a % out_rank for a in axes)
            new_axis = layout.axis
            for a in axes:
                if a <= new_axis:
                    new_axis += 1
        g.set_layout(node.outputs[0], layout.with_axis(new_axis))


class ReduceHandler(SameChannels):
    """ReduceMean/Max/Min over axes other than the channel axis (constants unchanged)."""

    def propagate(self, node, g):
        layout = g.layout(node.inputs[0])
        if layout is None:
            return
        rank = g.rank(node.inputs[0])
        axes = _axes_input(node)
        if rank is None or axes is None or layout.block != 1:
            return Handler.propagate(self, node, g)
        axes = [a % rank for a in axes]
        if layout.axis in axes:
            return Handler.propagate(self, node, g)
        keepdims = graphutil.attr_int(node, "keepdims", 1)
        new_axis = layout.axis if keepdims else layout.axis - sum(a < layout.axis for a in axes)
        g.set_layout(node.outputs[0], layout.with_axis(new_axis))


class ResizeHandler(SameChannels):
    """Resize/Upsample with scale 1 on the channel axis; interpolating a constant keeps it."""

    def propagate(self, node, g):
        layout = g.layout(node.inputs[0])
        if layout is None:
            return
        scales = graphutil.const_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
        if node.op_type == "Upsample":
            scales = graphutil.const_array(node.inputs[1]) if len(node.inputs) > 1 else None
        sizes = graphutil.const_array(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
        ok = layout.block == 1 and (
            (scales is not None and scales.size > layout.axis and scales[layout.axis] == 1)
            or (sizes is not None and sizes.size > layout.axis and sizes[layout.axis] == len(layout))
        )
        if not ok:
            return Handler.propagate(self, node, g)
        g.set_layout(node.outputs[0], layout)

    def rewrite(self, node, g):
        layout = g.layout(node.outputs[0])
        sizes = graphutil.const_array(node.inputs[3]) if layout is not None and len(node.inputs) > 3 and node.inputs[3] is not None else None
        if sizes is None or sizes.size == 0:
            return
        keep = g.keep(node.outputs[0])
        if not keep.all():
            new = sizes.copy()
            new[layout.axis] = int(keep.sum())
            graphutil.set_input_constant(g.graph, node, 3, new)
