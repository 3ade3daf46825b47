"""Run the channel analysis and apply the removal (used by the ``remove-channels`` pass)."""

from __future__ import annotations

import dataclasses
import numpy as np
import onnx_ir as ir

from onnxdns import graphutil
from onnxdns.channels.analysis import ChannelGraph, Decision
from onnxdns.channels.handlers import handler_for


def build_channel_graph(model: ir.Model) -> ChannelGraph:
    """Propagate layouts, constants and boundary checks through the graph in order."""
    g = channel_layouts(model)
    compute_constants(g)
    for node in list(model.graph):
        handler_for(node).check(node, g)
    return g


def channel_layouts(model: ir.Model) -> ChannelGraph:
    """Layouts, ties and structural pins only (no constants, no boundary checks): enough to know
    which channel groups can never be removed (``g.slots.group_pins(soft=False)``), and cheap
    (no onnxruntime evaluation)."""
    g = ChannelGraph(model, graphutil.inferred_shapes(model))
    for node in list(model.graph):
        if any(attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for attr in node.attributes.values()):
            g.pin_inputs(node, f"consumed by {node.op_type} with subgraphs")
            g.unknown_ops[node.op_type] += 1
            continue
        handler_for(node).propagate(node, g)
    for value in model.graph.outputs:
        g.pin_value(value, f"graph output {value.name}")
    return g


def compute_constants(g: ChannelGraph) -> None:
    """(Re)compute the per-channel constants of every tracked value from the current weights."""
    g.consts.clear()
    for node in list(g.graph):
        handler_for(node).constants(node, g)


def apply_removal(g: ChannelGraph) -> None:
    """Rewrite the graph for the decision recorded in ``g`` (slices, folds, attributes, shapes)."""
    for node in list(g.graph):
        handler_for(node).rewrite(node, g)
    _update_shapes(g)


@dataclasses.dataclass
class RoundResult:
    """Per source layer (by name): its channel count this round, the channels removed, and the
    constant channels kept with the reason (indices as they were at the start of the round)."""

    channels: dict[str, int]
    removed: dict[str, list[int]]
    constant_kept: dict[str, dict[int, str]]
    unknown_ops: dict[str, int]


def remove_once(model: ir.Model, *, min_keep: int = 1, round_to: int = 1) -> RoundResult:
    """One exact analysis + rewrite round. Returns what it removed (empty when nothing could go)."""
    g = build_channel_graph(model)
    decision = g.decide(None, min_keep=min_keep, round_to=round_to)
    result = summarise(g, decision)
    if decision.removed_roots:
        apply_removal(g)
    return result


def summarise(g: ChannelGraph, decision: Decision) -> RoundResult:
    removed: dict[str, list[int]] = {}
    constant_kept: dict[str, dict[int, str]] = {}
    channels: dict[str, int] = {}
    for (name, out_slots) in g.spaces:
        channels[name] = len(out_slots)
        value = _space_value(g, name, out_slots)
        consts = g.const(value) if value is not None else np.full(len(out_slots), np.nan)
        for i, slot in enumerate(out_slots.tolist()):
            root = g.slots.find(slot)
            if root in decision.removed_roots:
                removed.setdefault(name, []).append(i)
            elif not np.isnan(consts[i]):
                constant_kept.setdefault(name, {})[i] = decision.kept_reasons.get(root, "kept")
    return RoundResult(channels, removed, constant_kept, dict(g.unknown_ops))


def _space_value(g: ChannelGraph, name: str, slots: np.ndarray) -> ir.Value | None:
    for value, layout in g.layouts.items():
        if layout.slots is slots:
            return value
    return None


def _update_shapes(g: ChannelGraph) -> None:
    """Give every value that lost channels its new channel dimension."""
    for value, layout in g.layouts.items():
        keep = g.keep(value)
        if keep.all() or value.shape is None:
            continue
        dims = list(value.shape)
        if layout.axis < len(dims):
            dims[layout.axis] = int(keep.sum()) * layout.block
            value.shape = ir.Shape(dims)
