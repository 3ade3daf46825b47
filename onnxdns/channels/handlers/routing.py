"""Ops that route channels between tensors: Concat (offsets), Split and Slice (ranges)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxdns import graphutil
from onnxdns.channels.constants import unknown
from onnxdns.channels.handlers.base import Handler
from onnxdns.channels.layout import Layout


class ConcatHandler(Handler):
    """Concat along the channel axis maps channels through offsets; along another axis it ties."""

    def propagate(self, node, g):
        if not any(g.layout(v) is not None for v in node.inputs):
            return
        rank = g.rank(node.outputs[0]) or g.rank(next(v for v in node.inputs if g.layout(v) is not None))
        axis = graphutil.attr_int(node, "axis", 0) % rank
        parts = []
        layouts = [g.layout(v) for v in node.inputs]
        channel_axis = next(l.axis for l in layouts if l is not None)
        if any(l is not None and (l.axis != channel_axis or l.block != 1) for l in layouts):
            return Handler.propagate(self, node, g)
        if axis == channel_axis:
            for v, l in zip(node.inputs, layouts):
                if l is not None:
                    parts.append(l.slots)
                    continue
                shape = g.shape(v)
                if shape is None or shape[axis] is None:
                    return Handler.propagate(self, node, g)
                parts.append(g.untracked(shape[axis]))
            g.set_layout(node.outputs[0], Layout(axis, np.concatenate(parts)))
            return
        main = next(l for l in layouts if l is not None)
        for v, l in zip(node.inputs, layouts):
            if l is None:
                g.pin(main.slots, f"Concat {g.node_name(node)} joins an untracked tensor")
            elif len(l) != len(main):
                return Handler.propagate(self, node, g)
            else:
                g.slots.tie(main.slots, l.slots, f"Concat {g.node_name(node)}")
        g.set_layout(node.outputs[0], main)

    def constants(self, node, g):
        layout = g.layout(node.outputs[0])
        if layout is None:
            return
        rank = g.rank(node.outputs[0]) or 4
        if graphutil.attr_int(node, "axis", 0) % rank == layout.axis:
            parts = []
            for v in node.inputs:
                l = g.layout(v)
                parts.append(g.const(v) if l is not None else unknown(g.shape(v)[layout.axis]))
            g.set_const(node.outputs[0], np.concatenate(parts))
        else:
            consts = [g.const(v) if g.layout(v) is not None else unknown(len(layout)) for v in node.inputs]
            same = np.all([np.array_equal(c, consts[0], equal_nan=True) for c in consts], axis=0)
            g.set_const(node.outputs[0], consts[0] if same else unknown(len(layout)))


class SplitHandler(Handler):
    """Split along the channel axis gives each output its range of slots; split sizes rewritten."""

    def _sizes(self, node, g, layout):
        axis = graphutil.attr_int(node, "axis", 0) % (g.rank(node.inputs[0]) or 1)
        if len(node.inputs) > 1 and node.inputs[1] is not None:
            sizes = graphutil.const_array(node.inputs[1])
        else:
            sizes = graphutil.attr_ints(node, "split")
            if sizes is None:
                n = len(node.outputs)
                total = len(layout) if axis == layout.axis else None
                if total is None or total % n:
                    return axis, None
                sizes = [total // n] * n
        return axis, None if sizes is None else [int(s) for s in sizes]

    def propagate(self, node, g):
        layout = g.layout(node.inputs[0])
        if layout is None:
            return
        axis, sizes = self._sizes(node, g, layout)
        if axis != layout.axis:
            for o in node.outputs:
                g.set_layout(o, layout)
            return
        if sizes is None or sum(sizes) != len(layout) or layout.block != 1:
            return Handler.propagate(self, node, g)
        offsets = np.cumsum([0] + sizes)
        for o, start, stop in zip(node.outputs, offsets[:-1], offsets[1:]):
            g.set_layout(o, Layout(axis, layout.slots[start:stop]))

    def constants(self, node, g):
        src = g.layout(node.inputs[0])
        if src is None:
            return
        v = g.const(node.inputs[0])
        axis, _ = self._sizes(node, g, src)
        start = 0
        for o in node.outputs:
            layout = g.layout(o)
            if layout is None:
                continue
            if axis == src.axis:
                g.set_const(o, v[start:start + len(layout)])
                start += len(layout)
            else:
                g.set_const(o, v)

    def rewrite(self, node, g):
        layout = g.layout(node.inputs[0])
        if layout is None:
            return
        axis, sizes = self._sizes(node, g, layout)
        if axis != layout.axis:
            return
        new_sizes = np.array([int(g.keep(o).sum()) for o in node.outputs], dtype=np.int64)
        if list(new_sizes) == sizes:
            return
        if len(node.inputs) > 1 and node.inputs[1] is not None:
            graphutil.set_input_constant(g.graph, node, 1, new_sizes)
        elif g.opset >= 13:
            node.attributes.pop("num_outputs", None)
            node.attributes.pop("split", None)
            value = graphutil.add_initializer(g.graph, new_sizes, f"{g.node_name(node)}_split")
            node.resize_inputs(2)
            node.replace_input_with(1, value)
        else:
            node.attributes["split"] = ir.AttrInt64s("split", [int(s) for s in new_sizes])


class SliceHandler(Handler):
    """Slice (opset >= 10) of a contiguous channel range with step 1; other axes pass through."""

    def _params(self, node, g):
        inputs = list(node.inputs) + [None] * (5 - len(node.inputs))
        _, starts, ends, axes, steps = (graphutil.const_array(v) for v in inputs[:5])
        rank = g.rank(node.inputs[0])
        if starts is None or ends is None or rank is None:
            return None
        axes = np.arange(len(starts)) if axes is None else axes % rank
        steps = np.ones(len(starts), dtype=np.int64) if steps is None else steps
        return starts, ends, axes, steps

    def propagate(self, node, g):
        layout = g.layout(node.inputs[0])
        if layout is None:
            return
        params = self._params(node, g)
        if params is None:
            return Handler.propagate(self, node, g)
        starts, ends, axes, steps = params
        if layout.axis not in axes.tolist():
            g.set_layout(node.outputs[0], layout)
            return
        i = axes.tolist().index(layout.axis)
        if steps[i] != 1 or layout.block != 1:
            return Handler.propagate(self, node, g)
        lo, hi, _ = slice(int(starts[i]), int(ends[i])).indices(len(layout))
        g.set_layout(node.outputs[0], Layout(layout.axis, layout.slots[lo:hi]))

    def constants(self, node, g):
        out = g.layout(node.outputs[0])
        if out is None:
            return
        starts, ends, axes, steps = self._params(node, g)
        src = g.layout(node.inputs[0])
        if src.axis in axes.tolist():
            i = axes.tolist().index(src.axis)
            lo, hi, _ = slice(int(starts[i]), int(ends[i])).indices(len(src))
            g.set_const(node.outputs[0], g.const(node.inputs[0])[lo:hi])
        else:
            g.set_const(node.outputs[0], g.const(node.inputs[0]))

    def rewrite(self, node, g):
        src = g.layout(node.inputs[0])
        if src is None or g.layout(node.outputs[0]) is None:
            return
        starts, ends, axes, steps = self._params(node, g)
        if src.axis not in axes.tolist():
            return
        i = axes.tolist().index(src.axis)
        keep = g.keep(node.inputs[0])
        if keep.all():
            return
        lo, hi, _ = slice(int(starts[i]), int(ends[i])).indices(len(src))
        new_lo = int(keep[:lo].sum())
        new_hi = new_lo + int(keep[lo:hi].sum())
        new_starts, new_ends = starts.copy(), ends.copy()
        new_starts[i], new_ends[i] = new_lo, new_hi
        graphutil.set_input_constant(g.graph, node, 1, new_starts)
        graphutil.set_input_constant(g.graph, node, 2, new_ends)


class GatherHandler(Handler):
    """Gather of constant, distinct channel indices (1-D) along the channel axis: output channel
    ``j`` is input channel ``indices[j]``; input channels no index names are read by nobody here.
    Along another axis channels pass through; anything else (computed, repeated or scalar
    indices) pins the input."""

    def _indices(self, node, g, layout):
        rank = g.rank(node.inputs[0])
        if rank is None or len(node.inputs) < 2:
            return None, None
        axis = graphutil.attr_int(node, "axis", 0) % rank
        idx = graphutil.const_array(node.inputs[1])
        if idx is None or idx.ndim != 1:
            return axis, None
        n = len(layout)
        idx = np.where(idx < 0, idx + n, idx).astype(np.int64)
        if idx.size == 0 or idx.min() < 0 or idx.max() >= n or len(np.unique(idx)) != idx.size:
            return axis, None
        return axis, idx

    def propagate(self, node, g):
        layout = g.layout(node.inputs[0])
        if len(node.inputs) > 1 and g.layout(node.inputs[1]) is not None:
            return Handler.propagate(self, node, g)  # tracked channels used as indices
        if layout is None:
            return
        axis, idx = self._indices(node, g, layout)
        if axis is None:
            return Handler.propagate(self, node, g)
        if axis != layout.axis:
            const = graphutil.const_array(node.inputs[1])
            if const is not None and const.ndim == 1:  # same rank: the channel axis keeps its place
                g.set_layout(node.outputs[0], layout)
                return
            return Handler.propagate(self, node, g)
        if idx is None or layout.block != 1:
            return Handler.propagate(self, node, g)
        g.set_layout(node.outputs[0], Layout(layout.axis, layout.slots[idx]))

    def constants(self, node, g):
        out, src = g.layout(node.outputs[0]), g.layout(node.inputs[0])
        if out is None or src is None:
            return
        axis, idx = self._indices(node, g, src)
        v = g.const(node.inputs[0])
        g.set_const(node.outputs[0], v[idx] if axis == src.axis else v)

    def rewrite(self, node, g):
        src = g.layout(node.inputs[0])
        if src is None or g.layout(node.outputs[0]) is None:
            return
        axis, idx = self._indices(node, g, src)
        keep = g.keep(node.inputs[0])
        if axis != src.axis or keep.all():
            return
        position = np.cumsum(keep) - 1  # new index of every kept input channel
        new_idx = position[idx[keep[idx]]].astype(np.int64)
        graphutil.set_input_constant(g.graph, node, 1, new_idx)
