"""``slim-channels``: Network Slimming channel pruning by BatchNorm scale (lossy)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxdns import graphutil
from onnxdns.channels.remove import apply_removal, build_channel_graph, compute_constants, summarise
from onnxdns.framework import GraphPass, PassReport

#: Model metadata key recording the threshold a slimmed model was pruned at.
METADATA_KEY = "onnxdns.slim-channels.threshold"


class SlimChannelsPass(GraphPass):
    """Removes the channels whose BatchNorm scales |gamma| are small (Liu et al., ICCV 2017).

    Guarantee: lossy. Pruned channels are first made exactly constant by setting their BN
    scale to 0 (their output becomes the BN shift beta, passed through the following ops); that
    constant is then folded into each consumer's bias, which is exact for Gemm/MatMul and for
    convolutions without zero padding, and exact away from the zero-padded border otherwise
    (the paper simply drops it). A pruned channel that is not constant where a consumer reads
    it (e.g. a residual member without BatchNorm) is dropped. The error is therefore that of
    zeroing the selected gammas (small after sparsity training) plus the border effect; the
    network is meant to be fine-tuned afterwards.

    Selection: a global threshold on |gamma|, given (``threshold``) or taken as the ``ratio``
    quantile over every prunable BN channel. Channels tied together (residual adds, concat
    members, depthwise convs, grouped convs) form groups scored by the mean |gamma| of their BN
    channels and are pruned whole or not at all; groups without a BatchNorm, or pinned by the
    graph (outputs, unknown ops), are never pruned. Every tensor keeps at least
    ``max(min_keep, ceil(min_keep_ratio x channels))`` channels and kept counts are rounded up
    to a multiple of ``round_to``, keeping the highest-scoring groups. All dependent slices go
    as in ``remove-channels``.

    The threshold used is recorded in the model metadata; a model slimmed before is slimmed
    at that recorded threshold (so a second run changes nothing) unless ``threshold`` is given.
    """

    name = "slim-channels"
    exact = False
    summary = "Network Slimming: prune channels with small BatchNorm |gamma| (groups kept whole), fold their shift (lossy)"

    def __init__(self, ratio: float | None = 0.5, threshold: float | None = None, *, min_keep: int = 1,
                 min_keep_ratio: float = 0.05, round_to: int = 1):
        if threshold is None and (ratio is None or not 0.0 <= ratio < 1.0):
            raise ValueError("slim-channels needs a threshold or a ratio in [0, 1)")
        if round_to < 1 or min_keep < 1 or not 0.0 <= min_keep_ratio <= 1.0:
            raise ValueError("round_to and min_keep must be >= 1 and min_keep_ratio in [0, 1]")
        self.ratio, self.threshold = ratio, threshold
        self.min_keep, self.min_keep_ratio, self.round_to = min_keep, min_keep_ratio, round_to

    def __repr__(self) -> str:
        return (f"SlimChannelsPass(ratio={self.ratio}, threshold={self.threshold}, min_keep={self.min_keep}, "
                f"min_keep_ratio={self.min_keep_ratio}, round_to={self.round_to})")

    def call(self, model: ir.Model) -> PassReport:
        g = build_channel_graph(model)
        scores, bn_members = _group_scores(g)
        hard_pins = g.slots.group_pins(soft=False)
        prunable = [abs(v) for root, values in bn_members.items() if root not in hard_pins for v in values]
        threshold = self._threshold(model, prunable)
        if threshold is None:
            return PassReport(model, False, {"threshold": None, "pruned_channels": {}, "reason": "no prunable BatchNorm channels"})
        decision = g.decide(
            lambda root: root in scores and scores[root] < threshold,
            min_keep=self.min_keep, min_keep_ratio=self.min_keep_ratio, round_to=self.round_to,
            priority=lambda root: scores.get(root, np.inf), lossy=True,
        )
        details = {"threshold": float(threshold), "prunable_bn_channels": len(prunable)}
        if decision.removed_roots:
            _zero_gammas(g, decision.removed_roots)
            compute_constants(g)  # pruned channels are now the constant BN shift
            result = summarise(g, decision)
            apply_removal(g)
            details["pruned_channels"] = {k: len(v) for k, v in result.removed.items()}
            details["total_pruned_channels"] = int(sum(len(v) for v in result.removed.values()))
        else:
            details["pruned_channels"], details["total_pruned_channels"] = {}, 0
        recorded = model.metadata_props.get(METADATA_KEY)
        if recorded != repr(float(threshold)):
            model.metadata_props[METADATA_KEY] = repr(float(threshold))
        modified = bool(decision.removed_roots) or recorded != repr(float(threshold))
        return PassReport(model, modified, details)

    def _threshold(self, model: ir.Model, values: list[float]) -> float | None:
        if self.threshold is not None:
            return float(self.threshold)
        recorded = model.metadata_props.get(METADATA_KEY)
        if recorded is not None:
            return float(recorded)
        if not values:
            return None
        return float(np.quantile(np.asarray(values), self.ratio))


def _batchnorms(g):
    for node in g.graph:
        if node.op_type == "BatchNormalization" and node.domain == "" and g.layout(node.outputs[0]) is not None:
            yield node


def _group_scores(g) -> tuple[dict[int, float], dict[int, list[float]]]:
    """Mean |gamma| per channel group over its BatchNorm channels, and the gammas themselves."""
    members: dict[int, list[float]] = {}
    for node in _batchnorms(g):
        gamma = graphutil.const_array(node.inputs[1])
        for slot, value in zip(g.layout(node.outputs[0]).slots.tolist(), gamma.tolist()):
            if slot >= 0:
                members.setdefault(g.slots.find(slot), []).append(float(value))
    return {root: float(np.mean(np.abs(v))) for root, v in members.items()}, members


def _zero_gammas(g, removed_roots: set[int]) -> None:
    for node in list(_batchnorms(g)):
        roots = g.slots.roots(g.layout(node.outputs[0]).slots)
        hit = np.isin(roots, list(removed_roots))
        if hit.any():
            gamma = graphutil.const_array(node.inputs[1]).copy()
            gamma[hit] = 0
            graphutil.set_input_constant(g.graph, node, 1, gamma)


__all__ = ["SlimChannelsPass", "METADATA_KEY"]
