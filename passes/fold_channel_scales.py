"""``fold-channel-scales``: fold a per-channel constant ``Mul`` after a Conv into the Conv."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import onnx_ir as ir

from onnxdns import graphutil
from onnxdns.channels.handlers.base import const_input
from onnxdns.framework import GraphPass, PassReport


class FoldChannelScalesPass(GraphPass):
    """Fold ``Mul(conv_out, s)`` into the Conv: ``W[o] *= s[o]``, ``b[o] *= s[o]``.

    Folded when ``s`` is a floating-point constant that varies at most along the channel axis
    (shape ``[1, C, 1, ...]``, ``[C, 1, ...]`` aligned to the output's rank, or one value for all
    channels; ``Mul(s, conv_out)`` too), the Conv's weight and bias are constants, and the conv
    output is read by that Mul only and is no graph output. Such Muls are the scales
    ``insert-channel-scales`` adds for Network Slimming; a model without them is unchanged. The
    Conv takes over the Mul's output name; a weight or bias shared with another node is copied,
    not changed; a Conv without bias stays without (``0 * s = 0``).

    Guarantee: exact up to float rounding. The new weights and bias are computed in float64 and
    rounded once to their dtype, so each differs from the exact ``W * s`` by at most half an ulp
    (relative ``2^-24`` in float32); an output therefore differs from the original
    ``conv(x) * s`` by at most about ``2^-24 * |s| * (sum |W x| + |b|)`` beyond the rounding the
    convolution already does. With ``s == 1`` the folded weights are the original ones bitwise
    and the outputs are identical.
    """

    name: ClassVar[str] = "fold-channel-scales"
    exact: ClassVar[bool] = True
    summary: ClassVar[str] = "fold a per-channel constant Mul after a Conv (e.g. inserted slim scales) into its weights"

    def call(self, model: ir.Model) -> PassReport:
        graph = model.graph
        folded: list[str] = []
        maybe_unused: list[str] = []
        for mul in list(graph):
            plan = _plan(mul)
            if plan is None:
                continue
            conv, scale_value, scale = plan
            replaced = [v for v in (scale_value, *conv.inputs[1:]) if v is not None]
            maybe_unused.extend(v.name for v in replaced if v.name)
            _fold(graph, conv, scale)
            graphutil.bypass(graph, mul, conv.outputs[0])  # the conv output takes over the Mul's name
            maybe_unused.extend(_remove_dead_identities(graph, replaced))
            folded.append(conv.name or conv.op_type)
        removed = graphutil.remove_unused_initializers(graph, maybe_unused)
        return PassReport(model, bool(folded), {"folded_into": folded, "removed_constants": removed})


def _plan(mul: ir.Node) -> tuple[ir.Node, ir.Value, np.ndarray] | None:
    """(conv, scale value, one scale per output channel in float64) or None when not foldable."""
    if mul.op_type != "Mul" or mul.domain not in ("", "ai.onnx") or len(mul.inputs) != 2 or len(mul.outputs) != 1:
        return None
    for i in (0, 1):
        x, s = mul.inputs[i], mul.inputs[1 - i]
        conv = x.producer() if x is not None else None
        if conv is None or conv.op_type != "Conv" or conv.domain not in ("", "ai.onnx") or conv.graph is not mul.graph:
            continue
        if conv.outputs[0] is not x or not graphutil.only_user(x, mul):
            continue
        w = const_input(conv.inputs[1]) if len(conv.inputs) > 1 else None
        arr = const_input(s)
        if w is None or arr is None or w.ndim < 3 or not np.issubdtype(w.dtype, np.floating) \
                or arr.dtype != w.dtype:
            continue
        bias_value = conv.inputs[2] if len(conv.inputs) > 2 else None
        if bias_value is not None and const_input(bias_value) is None:
            continue
        scale = _per_channel(arr, w.ndim, w.shape[0])
        if scale is not None:
            return conv, s, scale
    return None


def _per_channel(arr: np.ndarray, rank: int, channels: int) -> np.ndarray | None:
    """``arr`` as one value per output channel if it broadcasts against ``[N, C, ...]`` (rank
    ``rank``) along the channel axis only, without growing the output."""
    if arr.ndim > rank:
        return None
    shape = (1,) * (rank - arr.ndim) + arr.shape
    if shape[0] != 1 or shape[1] not in (1, channels) or any(d != 1 for d in shape[2:]):
        return None
    return np.broadcast_to(arr.reshape(-1).astype(np.float64), (channels,))


def _fold(graph: ir.Graph, conv: ir.Node, scale: np.ndarray) -> None:
    w = const_input(conv.inputs[1])
    new_w = (w.astype(np.float64) * scale.reshape((-1,) + (1,) * (w.ndim - 1))).astype(w.dtype)
    graphutil.set_input_constant(graph, conv, 1, new_w)
    if len(conv.inputs) > 2 and conv.inputs[2] is not None:
        b = const_input(conv.inputs[2])
        graphutil.set_input_constant(graph, conv, 2, (b.astype(np.float64) * scale).astype(b.dtype))


def _remove_dead_identities(graph: ir.Graph, values: list[ir.Value]) -> list[str]:
    """Drop the Identity nodes (reading a constant, see ``const_input``) that fed the replaced inputs
    and are read by nothing any more; returns the names of the values they read."""
    reached = []
    for value in values:
        node = value.producer()
        while node is not None and node.op_type == "Identity" and node.graph is graph and not value.uses() \
                and not value.is_graph_output():
            value = node.inputs[0]
            graph.remove(node, safe=True)
            if value is not None:
                reached.append(value.name)
            node = value.producer() if value is not None else None
    return reached


__all__ = ["FoldChannelScalesPass"]
