"""The handler interface, the default for unknown ops, and helpers shared by the handlers."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxdns import graphutil
from onnxdns.channels.analysis import ChannelGraph


class Handler:
    """Default behaviour: an op we know nothing about (pins its inputs, outputs untracked)."""

    def propagate(self, node: ir.Node, g: ChannelGraph) -> None:
        if any(g.layout(v) is not None for v in node.inputs):
            g.unknown_ops[f"{node.domain + '::' if node.domain else ''}{node.op_type}"] += 1
        g.pin_inputs(node, f"consumed by {node.op_type} node {g.node_name(node)} (no channel handler)")

    def constants(self, node: ir.Node, g: ChannelGraph) -> None:
        pass

    def check(self, node: ir.Node, g: ChannelGraph) -> None:
        pass

    def rewrite(self, node: ir.Node, g: ChannelGraph) -> None:
        pass


UNKNOWN = Handler()


def const_input(value: ir.Value | None, depth: int = 0) -> np.ndarray | None:
    """:func:`graphutil.const_array`, also behind ``Identity`` nodes (the torch exporter reads
    initializers of equal values, the zero biases of an untrained net say, through them) and
    ``Reshape`` / ``Unsqueeze`` / ``Squeeze`` of constants (Paddle's exports add conv biases as
    ``Add(conv, Reshape(bias, shape))``)."""
    if value is None or depth > 16:
        return None
    arr = graphutil.const_array(value)
    node = value.producer()
    if arr is not None or node is None or node.domain not in ("", "ai.onnx") or not node.inputs:
        return arr
    if node.op_type == "Identity":
        return const_input(node.inputs[0], depth + 1)
    if node.op_type not in ("Reshape", "Unsqueeze", "Squeeze") or node.outputs[0] is not value:
        return None
    data = const_input(node.inputs[0], depth + 1)
    if data is None:
        return None
    second = const_input(node.inputs[1], depth + 1) if len(node.inputs) > 1 and node.inputs[1] is not None else None
    try:
        if node.op_type == "Reshape":
            if second is None:
                return None
            shape = [int(d) for d in second.reshape(-1)]
            if not graphutil.attr_int(node, "allowzero", 0):
                shape = [data.shape[i] if d == 0 and i < data.ndim else d for i, d in enumerate(shape)]
            return data.reshape(shape)
        axes = [int(a) for a in second.reshape(-1)] if second is not None else graphutil.attr_ints(node, "axes")
        if node.op_type == "Unsqueeze":
            if not axes:
                return None
            rank = data.ndim + len(axes)
            out = data
            for a in sorted(a % rank for a in axes):
                out = np.expand_dims(out, a)
            return out
        return np.squeeze(data) if not axes else np.squeeze(data, axis=tuple(a % data.ndim for a in axes))
    except ValueError:
        return None


def _padded(node: ir.Node) -> bool:
    auto_pad = node.attributes.get("auto_pad")
    if auto_pad is not None and auto_pad.as_string() not in ("NOTSET", "VALID"):
        return True
    return any(p != 0 for p in (graphutil.attr_ints(node, "pads") or []))


def _changed(*masks: np.ndarray) -> bool:
    return any(not m.all() for m in masks)


def _fold_value(v: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """Constants of removed channels with NaN (ignored channels) read as 0."""
    return np.where(removed & ~np.isnan(v), v, 0.0)


class SameChannels(Handler):
    """Base for ops whose output channel ``i`` carries the constant of input channel ``i``."""

    def constants(self, node: ir.Node, g: ChannelGraph) -> None:
        if g.layout(node.outputs[0]) is not None:
            g.set_const(node.outputs[0], g.const(node.inputs[0]))


def _axes_input(node: ir.Node) -> list[int] | None:
    """Axes given as the second input (newer opsets) or the ``axes`` attribute (older ones)."""
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        axes = graphutil.const_array(node.inputs[1])
        return None if axes is None else [int(a) for a in np.atleast_1d(axes)]
    return graphutil.attr_ints(node, "axes")
