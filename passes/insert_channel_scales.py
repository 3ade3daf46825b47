"""``insert-channel-scales``: a trainable per-channel scale after each prunable Conv without BatchNorm."""

from __future__ import annotations

import re
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from onnxdns import graphutil
from onnxdns.channels.handlers.base import const_input
from onnxdns.framework import GraphPass, PassReport

#: Name suffix of an inserted scale: the scale after Conv ``features.0`` is ``features.0.slim_scale``
#: (``_1``, ``_2``, ... appended when that name is taken).
SCALE_SUFFIX = ".slim_scale"
_SCALE_NAME = re.compile(re.escape(SCALE_SUFFIX) + r"(_\d+)?$")


def is_scale_name(name: str) -> bool:
    """True for the name of a scale initializer this pass creates."""
    return bool(_SCALE_NAME.search(name))


class InsertChannelScalesPass(GraphPass):
    """Insert ``Mul(conv_out, scale)`` after every prunable Conv whose output no BatchNormalization reads.

    Network Slimming trains BatchNorm's gamma with an L1 penalty and prunes the channels whose
    |gamma| is small; a model exported in eval mode has its BatchNorms folded into the
    convolutions and no gamma left. This pass gives such convolutions the scale back: an
    initializer ``<conv>.slim_scale`` of shape ``[1, C, 1, ...]`` (the rank of the conv output,
    the weight's dtype), all ones. ``slim-channels`` scores channels by these scales as by
    gamma, ``onnxdns train --method slim`` trains them with the penalty, and
    ``fold-channel-scales`` folds them back into the convolution.

    Guarantee: exact, bitwise (``x * 1.0 == x``). The ``Mul`` takes over the conv output's name
    (downstream names and value infos keep theirs; the conv output becomes ``<name>_unscaled``).

    Skipped convs: a weight that is not a floating-point constant; an output read by a
    BatchNormalization (Network Slimming uses its gamma) or already scaled by this pass; a graph
    output; one output channel; output channels that can never be removed (pinned by the channel
    analysis: graph outputs further on, ops without a channel handler); and output channels that
    all reach a BatchNorm further on (DenseNet's concat-then-BN: that gamma scores them).
    Only the main graph is processed.
    """

    name: ClassVar[str] = "insert-channel-scales"
    exact: ClassVar[bool] = True
    summary: ClassVar[str] = "insert a per-channel scale Mul (all ones) after each prunable Conv without BatchNorm"

    def call(self, model: ir.Model) -> PassReport:
        graph = model.graph
        convs = [node for node in graph if _candidate(node)]
        pinned, covered = _skipped(model, convs) if convs else (set(), set())
        inserted: list[str] = []
        for conv in convs:
            if conv in pinned or conv in covered:
                continue
            inserted.append(_insert(graph, conv).name)
        return PassReport(model, bool(inserted), {"scales": inserted, "skipped_pinned": len(pinned),
                                                  "skipped_batchnorm": len(covered)})


def _candidate(node: ir.Node) -> bool:
    if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
        return False
    w = node.inputs[1]
    arr = const_input(w)
    if arr is None or arr.ndim < 3 or arr.shape[0] < 2 or not np.issubdtype(arr.dtype, np.floating):
        return False
    out = node.outputs[0]
    if out.is_graph_output():
        return False
    for use in out.uses():
        if use.node.op_type == "BatchNormalization" or scale_of(use.node) is not None:
            return False
    return True


def scale_of(mul: ir.Node) -> tuple[ir.Node, ir.Value] | None:
    """(conv, scale) when ``mul`` is a scale this pass inserted: ``Mul(conv_out, <...>.slim_scale)``
    with the conv output read by nothing else and the scale of shape ``[1, C, 1, ...]``."""
    if mul.op_type != "Mul" or mul.domain not in ("", "ai.onnx") or len(mul.inputs) != 2:
        return None
    x, scale = mul.inputs
    if x is None or scale is None or not is_scale_name(scale.name or "") or not graphutil.is_initializer(scale):
        return None
    conv = x.producer()
    if conv is None or conv.op_type != "Conv" or conv.outputs[0] is not x or not graphutil.only_user(x, mul):
        return None
    w = const_input(conv.inputs[1]) if len(conv.inputs) > 1 else None
    shape = graphutil.static_shape(scale)
    if w is None or shape != (1, w.shape[0]) + (1,) * (w.ndim - 2):
        return None
    return conv, scale


def channel_scales(graph: ir.Graph) -> list[tuple[ir.Node, ir.Node, ir.Value]]:
    """Every inserted scale of ``graph`` as (conv, mul, scale initializer), in graph order."""
    found = []
    for node in graph:
        hit = scale_of(node)
        if hit is not None:
            found.append((hit[0], node, hit[1]))
    return found


def _skipped(model: ir.Model, convs: list[ir.Node]) -> tuple[set[ir.Node], set[ir.Node]]:
    """The convs none of whose output channels the channel engine could ever remove, and those
    whose every output channel is in a group a BatchNorm scales further on (after a Concat, a
    residual Add, ...: its gamma scores them)."""
    from onnxdns.channels.remove import channel_layouts

    g = channel_layouts(model)
    pins = g.slots.group_pins(soft=False)
    scaled_by_bn: set[int] = set()
    for node in model.graph:
        if node.op_type == "BatchNormalization" and g.layout(node.outputs[0]) is not None:
            scaled_by_bn.update(int(r) for r in g.slots.roots(g.layout(node.outputs[0]).slots) if r >= 0)
    pinned, covered = set(), set()
    for conv in convs:
        layout = g.layout(conv.outputs[0])
        roots = [] if layout is None else [g.slots.find(int(s)) for s in layout.slots.tolist() if s >= 0]
        if all(r in pins for r in roots):  # also: no tracked channel at all
            pinned.add(conv)
        elif all(r in scaled_by_bn for r in roots):
            covered.add(conv)
    return pinned, covered



def _insert(graph: ir.Graph, conv: ir.Node) -> ir.Value:
    w = const_input(conv.inputs[1])
    base = conv.name or _strip_weight(conv.inputs[1].name) or "Conv"
    scale = graphutil.add_initializer(graph, np.ones((1, w.shape[0]) + (1,) * (w.ndim - 2), dtype=w.dtype),
                                      f"{base}{SCALE_SUFFIX}")
    out = conv.outputs[0]
    name = out.name
    out.name = graphutil.unique_name(graph, f"{name}_unscaled")
    scaled = ir.Value(name=name, shape=out.shape, type=out.type)
    mul = ir.Node("", "Mul", [out, scale], outputs=[scaled],
                  name=graphutil.unique_name(graph, f"{base}{SCALE_SUFFIX}_mul"))
    ir.convenience.replace_all_uses_with(out, scaled)
    mul.replace_input_with(0, out)
    graph.insert_after(conv, mul)
    return scale


def _strip_weight(name: str | None) -> str:
    for suffix in (".weight", "_weight", ".W"):
        if name and name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name or ""


__all__ = ["InsertChannelScalesPass", "SCALE_SUFFIX", "channel_scales", "is_scale_name", "scale_of"]
