"""``slim-channels``: Network Slimming channel pruning by BatchNorm scale or inserted channel scale (lossy)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxdns import graphutil
from onnxdns.channels.handlers.base import const_input
from onnxdns.channels.remove import apply_removal, build_channel_graph, compute_constants, summarise
from onnxdns.framework import GraphPass, PassReport
from onnxdns.passes.insert_channel_scales import channel_scales

#: Model metadata key recording the threshold a slimmed model was pruned at.
METADATA_KEY = "onnxdns.slim-channels.threshold"


class SlimChannelsPass(GraphPass):
    """Removes the channels whose BatchNorm scales |gamma| are small (Liu et al., ICCV 2017).

    Where BatchNorm was folded into a Conv, the scales are the ``Mul(conv_out, <conv>.slim_scale)``
    that ``insert-channel-scales`` adds (trained by ``onnxdns train --method slim``); both kinds
    count alike below (|scale| for |gamma|), in one model too, with one global threshold.

    Guarantee: lossy. Pruned channels are first made exactly constant by setting their BN
    scale to 0 (their output becomes the BN shift beta, passed through the following ops) or
    their inserted scale to 0 (their output becomes 0: 0 after Relu or HardSwish, 0.5 after
    Sigmoid, ...); that
    constant is then folded into each consumer's bias, which is exact for Gemm/MatMul and for
    convolutions without zero padding, and exact away from the zero-padded border otherwise
    (the paper simply drops it). A pruned channel that is not constant where a consumer reads
    it (e.g. a residual member without BatchNorm) is dropped. The error is therefore that of
    zeroing the selected gammas (small after sparsity training) plus the border effect; the
    network is meant to be fine-tuned afterwards.

    Selection: a global threshold on |gamma|, given (``threshold``), or by rank: the lowest-scoring
    groups holding the ``ratio`` share of every prunable BN or scale channel (ties broken by graph
    order; the threshold recorded is then the lowest kept score). Channels tied together (residual adds,
    concat members, depthwise convs, grouped convs, SE-style channel Muls) form groups scored by
    the mean |gamma| of their BN and scale channels and are pruned whole or not at all; groups
    without a BatchNorm or scale, or pinned by the
    graph (outputs, unknown ops), are never pruned. Every tensor keeps at least
    ``max(min_keep, ceil(min_keep_ratio x channels))`` channels and kept counts are rounded up
    to a multiple of ``round_to``, keeping the highest-scoring groups. All dependent slices go
    as in ``remove-channels``.

    The threshold used is recorded in the model metadata; a model slimmed before is slimmed
    at that recorded threshold (so a second run changes nothing) unless ``threshold`` is given.
    """

    name = "slim-channels"
    exact = False
    summary = "Network Slimming: prune channels with small BatchNorm |gamma| or inserted |scale| (groups kept whole; lossy)"

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
        scores, members, kinds = _group_scores(g)
        hard_pins = g.slots.group_pins(soft=False)
        prunable = [abs(v) for root, values in members.items() if root not in hard_pins for v in values]
        threshold = self._threshold(model, prunable)
        if threshold is None:
            return PassReport(model, False, {"threshold": None, "pruned_channels": {},
                                             "reason": "no prunable BatchNorm or channel-scale channels"})
        chosen = None
        if self.threshold is None and model.metadata_props.get(METADATA_KEY) is None:
            # by rank: the lowest-scoring groups holding a `ratio` share of the channels, ties broken
            # by graph order (a quantile threshold prunes nothing when many scales are equal)
            chosen, count = set(), 0
            for root in sorted((r for r in members if r not in hard_pins), key=lambda r: (scores[r], r)):
                if count >= self.ratio * len(prunable):
                    break
                chosen.add(root)
                count += len(members[root])
            if chosen:
                ranked = max(scores[r] for r in chosen)
                kept = [scores[r] for r in members if r not in hard_pins and r not in chosen]
                # recorded for a second run (which prunes scores strictly below it): the lowest kept score
                threshold = float(min(kept)) if kept else float(np.nextafter(np.float32(ranked), np.float32(np.inf)))
        decision = g.decide(
            lambda root: root in scores and (root in chosen if chosen is not None else scores[root] < threshold),
            min_keep=self.min_keep, min_keep_ratio=self.min_keep_ratio, round_to=self.round_to,
            priority=lambda root: scores.get(root, np.inf), lossy=True,
        )
        counts = {kind: sum(1 for root, k in kinds if k == kind and root not in hard_pins) for kind in ("bn", "scale")}
        details = {"threshold": float(threshold), "prunable_channels": len(prunable),
                   "prunable_bn_channels": counts["bn"], "prunable_scale_channels": counts["scale"]}
        if decision.removed_roots:
            _zero_scales(g, decision.removed_roots)
            compute_constants(g)  # pruned channels are now the constant BN shift (or 0 after a scale)
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


def _scaled(g):
    """(node, index of its scale input, scale values [C]) of every BatchNorm and inserted scale
    whose output channels are tracked."""
    for node in _batchnorms(g):
        yield node, 1, const_input(node.inputs[1])
    for _, mul, scale in channel_scales(g.graph):
        if g.layout(mul.outputs[0]) is not None:
            yield mul, list(mul.inputs).index(scale), const_input(scale).reshape(-1)


def _group_scores(g) -> tuple[dict[int, float], dict[int, list[float]], list[tuple[int, str]]]:
    """Mean |scale| per channel group over its BatchNorm and inserted-scale channels, the scales
    themselves, and (group, "bn" | "scale") per scale channel."""
    members: dict[int, list[float]] = {}
    kinds: list[tuple[int, str]] = []
    for node, _, values in _scaled(g):
        kind = "bn" if node.op_type == "BatchNormalization" else "scale"
        for slot, value in zip(g.layout(node.outputs[0]).slots.tolist(), values.tolist()):
            if slot >= 0:
                root = g.slots.find(slot)
                members.setdefault(root, []).append(float(value))
                kinds.append((root, kind))
    return {root: float(np.mean(np.abs(v))) for root, v in members.items()}, members, kinds


def _zero_scales(g, removed_roots: set[int]) -> None:
    """Set the gamma or inserted scale of every removed channel to 0."""
    for node, index, values in list(_scaled(g)):
        roots = g.slots.roots(g.layout(node.outputs[0]).slots)
        hit = np.isin(roots, list(removed_roots))
        if hit.any():
            array = const_input(node.inputs[index])
            new = array.reshape(-1).copy()
            new[hit] = 0
            graphutil.set_input_constant(g.graph, node, index, new.reshape(array.shape))


__all__ = ["SlimChannelsPass", "METADATA_KEY"]
