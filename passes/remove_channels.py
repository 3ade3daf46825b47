"""``remove-channels``: remove channels whose effect is constant, with every dependent slice."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxdns.channels.handlers import HANDLERS
from onnxdns.channels.remove import remove_once
from onnxdns.framework import GraphPass, PassReport


def _param_count(model: ir.Model) -> int:
    return int(sum(np.prod(v.const_value.shape.numpy(), dtype=np.int64) for v in model.graph.initializers.values() if v.const_value is not None))


class RemoveChannelsPass(GraphPass):
    """Removes output channels of Conv / ConvTranspose / Gemm / MatMul that cannot affect the output.

    Guarantee: exact (onnxruntime outputs before and after agree to float rounding).

    A channel goes when its value is an input-independent constant (all its weights are zero,
    so it equals its bias; or a BatchNorm with gamma = 0 makes it beta) or when every consumer
    ignores it (zero weights), and it is removed everywhere it flows: BatchNormalization and
    per-channel Mul/Add/PRelu parameters, activations, pools, the next layer's input channels,
    Flatten/Reshape into Gemm/MatMul (the channel's block of features), residual Add groups (a
    channel goes only if every member of the group can go), Concat (offsets), Split/Slice
    (sizes, starts/ends), depthwise and grouped Conv (``group`` kept consistent; grouped convs
    lose the same number of channels in every group).

    Constant rule: a removed channel whose value is a non-zero constant ``v`` is folded into the
    consumer's bias (``b += v * sum of the consumer's weights for that channel``; a bias input
    or an ``Add`` is created when needed). That is exact for Gemm/MatMul and for Conv without
    spatial zero padding; a non-zero constant reaching a zero-padded Conv (whose border outputs
    would see it only partly) or a ConvTranspose keeps its channel. Zero constants need no fold.

    Propagation is driven by the per-op handler table ``onnxdns.channels.handlers.HANDLERS``
    keyed by ``(domain, op_type)``; an op without a handler keeps every channel reaching it and
    is counted in the report (``unknown_ops``), as are constant channels that had to be kept
    (``constant_kept``, with the reason). Options: ``round_to`` rounds kept channel counts up to
    a multiple (8 for the CUDA target), ``min_keep`` keeps at least that many channels per
    tensor. The pass repeats until nothing more can go (removals can make more channels
    constant or ignored), so a second run changes nothing.
    """

    name = "remove-channels"
    summary = "remove constant or ignored channels of Conv/Gemm/MatMul and every dependent slice (exact)"

    def __init__(self, round_to: int = 1, min_keep: int = 1, max_rounds: int = 20):
        if round_to < 1 or min_keep < 1:
            raise ValueError("round_to and min_keep must be >= 1")
        self.round_to = round_to
        self.min_keep = min_keep
        self.max_rounds = max_rounds

    def __repr__(self) -> str:
        return f"RemoveChannelsPass(round_to={self.round_to}, min_keep={self.min_keep})"

    def call(self, model: ir.Model) -> PassReport:
        params_before = _param_count(model)
        alive: dict[str, list[int]] = {}  # source layer -> original indices of its live channels
        removed: dict[str, list[int]] = {}
        rounds = 0
        while True:
            rounds += 1
            result = remove_once(model, min_keep=self.min_keep, round_to=self.round_to)
            for name, count in result.channels.items():
                alive.setdefault(name, list(range(count)))
            for name, channels in result.removed.items():
                gone = set(channels)
                removed.setdefault(name, []).extend(alive[name][i] for i in channels)
                alive[name] = [c for i, c in enumerate(alive[name]) if i not in gone]
            if not result.removed or rounds >= self.max_rounds:
                break
        details = {
            "removed_channels": {k: sorted(v) for k, v in removed.items()},
            "total_removed_channels": int(sum(len(v) for v in removed.values())),
            "constant_kept": {
                name: {alive[name][i]: reason for i, reason in kept.items()}
                for name, kept in result.constant_kept.items()
            },
            "unknown_ops": result.unknown_ops,
            "params_removed": params_before - _param_count(model),
            "rounds": rounds,
        }
        return PassReport(model, bool(removed), details)


__all__ = ["RemoveChannelsPass", "HANDLERS"]
