"""Build the channel graph of a model, decide which channel groups go, and rewrite the graph.

Removal rule (exact mode). A group of tied channels is removed when

* nothing pins it (graph outputs, ops without a handler, ops that mix channels in ways we do not
  model), and
* at every *boundary* where a layer consumes it (a Conv/Gemm/MatMul input channel), the consumer
  either ignores it (its weights for that channel are all zero) or receives an input-independent
  constant ``v`` that is uniform over the tensor. ``v = 0`` needs nothing; ``v != 0`` is folded
  exactly into the consumer's bias (``b += v * sum(W[:, c])``), which is only exact when the
  consumer has no spatial zero padding; a constant reaching a zero-padded conv is kept.

Producers of the group (the Conv/Gemm/MatMul rows creating it) and every op inside it
(BatchNormalization, activations, pools, depthwise convs, residual adds, concats) are sliced.
Constants are computed from the original graph: a Conv output channel whose filter is zero
equals its bias; BatchNorm with gamma = 0 outputs beta; elementwise ops are evaluated by
onnxruntime on the constants.

Afterwards constraints are enforced by keeping more channels (always safe): at least
``min_keep`` channels per tensor, equal removal counts per group of a grouped conv, and kept
counts rounded up to a multiple of ``round_to`` per channel space (for the CUDA target).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Callable

import numpy as np
import onnx_ir as ir

from onnxdns.channels.constants import unknown
from onnxdns.channels.layout import Layout, SlotTable


@dataclasses.dataclass
class Decision:
    """What the analysis decided: removed groups, and why zeroed channels were kept."""

    removed_roots: set[int]
    kept_reasons: dict[int, str]  # root -> reason a candidate group was kept


class ChannelGraph:
    """Analysis state shared by the handlers (see :mod:`onnxdns.channels.handlers`)."""

    def __init__(self, model: ir.Model, shapes: dict[str, tuple[int | None, ...]]):
        self.model = model
        self.graph = model.graph
        self.opset = int(model.opset_imports.get("", 17))
        self.shapes = shapes
        self.slots = SlotTable()
        self.layouts: dict[ir.Value, Layout] = {}
        self.consts: dict[ir.Value, np.ndarray] = {}
        self.unknown_ops: collections.Counter[str] = collections.Counter()
        self.spaces: list[tuple[str, np.ndarray]] = []  # (source node, output slots): rounding units
        self.equal_counts: list[tuple[str, list[np.ndarray]]] = []  # grouped convs
        self.removed = np.zeros(0, dtype=bool)  # per slot, set by apply_decision
        self._names: dict[ir.Node, str] = {}

    # ------------------------------------------------------------------ helpers for handlers
    def node_name(self, node: ir.Node) -> str:
        """A stable name: the node's own, else its op and weight (stable across rewrites)."""
        if node not in self._names:
            weight = node.inputs[1] if len(node.inputs) > 1 and node.inputs[1] is not None else None
            if node.name:
                name = node.name
            elif weight is not None and weight.name:
                name = f"{node.op_type}({weight.name})"
            else:
                name = f"{node.op_type}#{len(self._names)}"
            self._names[node] = name
        return self._names[node]

    def shape(self, value: ir.Value | None) -> tuple[int | None, ...] | None:
        if value is None:
            return None
        if value.name in self.shapes:
            return self.shapes[value.name]
        if value.shape is not None:
            return tuple(d if isinstance(d, int) else None for d in value.shape)
        return None

    def rank(self, value: ir.Value | None) -> int | None:
        shape = self.shape(value)
        return None if shape is None else len(shape)

    def layout(self, value: ir.Value | None) -> Layout | None:
        return None if value is None else self.layouts.get(value)

    def set_layout(self, value: ir.Value, layout: Layout) -> None:
        self.layouts[value] = layout

    def new_slots(self, node: ir.Node, count: int) -> np.ndarray:
        return self.slots.new(self.node_name(node), count)

    def untracked(self, count: int) -> np.ndarray:
        return np.full(count, -1, dtype=np.int64)

    def pin(self, slots: np.ndarray, reason: str, *, soft: bool = False) -> None:
        self.slots.pin(slots, reason, soft=soft)

    def pin_value(self, value: ir.Value | None, reason: str) -> None:
        layout = self.layout(value)
        if layout is not None:
            self.pin(layout.slots, reason)

    def pin_inputs(self, node: ir.Node, reason: str) -> None:
        for value in node.inputs:
            self.pin_value(value, reason)

    def const(self, value: ir.Value | None, count: int | None = None) -> np.ndarray:
        """Per-channel constants of a tracked value (NaN: not constant; all NaN if untracked)."""
        if value is not None and value in self.consts:
            return self.consts[value]
        layout = self.layout(value)
        return unknown(len(layout) if layout is not None else int(count or 0))

    def set_const(self, value: ir.Value, values: np.ndarray | None) -> None:
        if values is not None:
            self.consts[value] = np.asarray(values, dtype=np.float64)

    def keep(self, value: ir.Value | None, count: int | None = None) -> np.ndarray:
        """Per-channel keep mask of a value after the decision (untracked: keep all)."""
        layout = self.layout(value)
        if layout is None:
            return np.ones(int(count or 0), dtype=bool)
        return ~self._removed_slots(layout.slots)

    def _removed_slots(self, slots: np.ndarray) -> np.ndarray:
        out = np.zeros(len(slots), dtype=bool)
        tracked = slots >= 0
        out[tracked] = self.removed[slots[tracked]]
        return out

    # ------------------------------------------------------------------ decision
    def decide(
        self,
        candidates: Callable[[int], bool] | None,
        *,
        min_keep: int = 1,
        min_keep_ratio: float = 0.0,
        round_to: int = 1,
        priority: Callable[[int], float] | None = None,
        lossy: bool = False,
    ) -> Decision:
        """Choose removed groups: candidates without pins (``lossy`` ignores soft, value-related
        pins), then enforce min_keep / equal counts / rounding by keeping the groups with the
        highest ``priority`` first."""
        n = len(self.slots)
        roots = np.array([self.slots.find(s) for s in range(n)], dtype=np.int64)
        pins = self.slots.group_pins(soft=not lossy)
        removed_root = np.zeros(n, dtype=bool)
        for r in set(roots.tolist()):
            if r not in pins and (candidates is None or candidates(r)):
                removed_root[r] = True
        kept_reasons: dict[int, str] = dict(pins)

        def keep_group(root: int, reason: str) -> bool:
            if removed_root[root]:
                removed_root[root] = False
                kept_reasons.setdefault(root, reason)
                return True
            return False

        def order(candidate_roots: list[int]) -> list[int]:
            # Keep the most important first (highest priority); stable by position otherwise.
            if priority is None:
                return candidate_roots
            return sorted(candidate_roots, key=lambda r: -priority(r))

        changed = True
        while changed:
            changed = False
            for value, layout in self.layouts.items():
                slot_roots = _roots_of(layout.slots, roots)
                removed = np.array([r >= 0 and removed_root[r] for r in slot_roots], dtype=bool)
                kept = len(slot_roots) - int(removed.sum())
                need = min(len(slot_roots), max(min_keep, int(np.ceil(min_keep_ratio * len(slot_roots)))))
                if kept < need:
                    gone = [int(r) for r in slot_roots[removed]]
                    for r in order(list(dict.fromkeys(gone)))[: need - kept]:
                        changed |= keep_group(r, f"keeps at least {need} channel(s) in {value.name}")
            for name, groups in self.equal_counts:
                per_group = [_roots_of(g, roots) for g in groups]
                counts = [sum(1 for r in g if r >= 0 and removed_root[r]) for g in per_group]
                target = min(counts) if counts else 0
                for g_roots, count in zip(per_group, counts):
                    extra = count - target
                    if extra > 0:
                        gone = [int(r) for r in g_roots if r >= 0 and removed_root[r]]
                        for r in order(gone)[:extra]:
                            changed |= keep_group(r, f"equal channel counts per group in grouped conv {name}")
            if round_to > 1:
                for name, slots in self.spaces:
                    slot_roots = _roots_of(slots, roots)
                    removed = np.array([r >= 0 and removed_root[r] for r in slot_roots], dtype=bool)
                    kept = len(slot_roots) - int(removed.sum())
                    target = min(len(slot_roots), -(-kept // round_to) * round_to)
                    if kept < target:
                        gone = list(dict.fromkeys(int(r) for r in slot_roots[removed]))
                        for r in order(gone)[: target - kept]:
                            changed |= keep_group(r, f"kept count of {name} rounded to a multiple of {round_to}")
        self.removed = removed_root[roots] if n else np.zeros(0, dtype=bool)
        removed_roots = {int(r) for r in np.flatnonzero(removed_root)}
        return Decision(removed_roots, kept_reasons)


def _roots_of(slots: np.ndarray, roots: np.ndarray) -> np.ndarray:
    out = np.full(len(slots), -1, dtype=np.int64)
    tracked = slots >= 0
    out[tracked] = roots[slots[tracked]]
    return out
