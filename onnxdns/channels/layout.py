"""Channel layouts of tensors and the union-find of channel slots.

A *slot* is one channel identity, created where a layer produces new channels (a Conv, Gemm or
MatMul output channel). Every tensor that carries those channels gets a :class:`Layout`: along
its channel ``axis``, position ``i`` holds slot ``slots[i]`` (``-1``: a channel we do not track,
which is never removed). After a Flatten, each channel spans ``block`` consecutive features.

Ops that force channels of different tensors to be removed together (a residual ``Add``,
elementwise ops between two tracked tensors, depthwise convs) *tie* slots in a union-find; the
resulting sets are the *groups* that are kept or removed as one. A slot is *pinned* (kept) with
a reason when something needs it (a graph output, an op without a handler, ...).
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class Layout:
    """Which slot sits at each position of a tensor's channel axis."""

    axis: int
    slots: np.ndarray
    block: int = 1

    def __len__(self) -> int:
        return len(self.slots)

    def with_axis(self, axis: int) -> "Layout":
        return Layout(axis, self.slots, self.block)


class SlotTable:
    """Slots with their sources, a union-find over them, and pins with reasons."""

    def __init__(self) -> None:
        self._parent: list[int] = []
        self.source: list[tuple[str, int]] = []  # (node name, output channel)
        self.pin_reasons: dict[int, str] = {}  # slot -> first reason it was pinned
        self.soft_reasons: dict[int, str] = {}  # slot -> first value-related reason (lossy mode ignores)

    def __len__(self) -> int:
        return len(self._parent)

    def new(self, node_name: str, count: int) -> np.ndarray:
        start = len(self._parent)
        self._parent.extend(range(start, start + count))
        self.source.extend((node_name, i) for i in range(count))
        return np.arange(start, start + count, dtype=np.int64)

    def find(self, slot: int) -> int:
        parent = self._parent
        root = slot
        while parent[root] != root:
            root = parent[root]
        while parent[slot] != root:
            parent[slot], slot = root, parent[slot]
        return root

    def roots(self, slots: np.ndarray) -> np.ndarray:
        """Group id of each slot (``-1`` stays ``-1``)."""
        return np.array([self.find(int(s)) if s >= 0 else -1 for s in slots], dtype=np.int64)

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self._parent[rb] = ra

    def pin(self, slots, reason: str, *, soft: bool = False) -> None:
        """Keep these slots' groups. A *soft* pin says removal would change values (a consumer
        sees a non-constant or non-foldable channel): exact removal respects it, lossy removal
        of selected channels may override it. Structural pins are never overridden."""
        reasons = self.soft_reasons if soft else self.pin_reasons
        for s in np.atleast_1d(slots):
            s = int(s)
            if s >= 0 and s not in reasons:
                reasons[s] = reason

    def tie(self, a: np.ndarray, b: np.ndarray, reason: str) -> None:
        """Tie two equally long slot arrays position by position (untracked pins the other)."""
        if len(a) != len(b):
            raise ValueError("tie of layouts with different lengths")
        for x, y in zip(a.tolist(), b.tolist()):
            if x >= 0 and y >= 0:
                self.union(x, y)
            elif x >= 0:
                self.pin(x, reason)
            elif y >= 0:
                self.pin(y, reason)

    def group_pins(self, *, soft: bool = True) -> dict[int, str]:
        """Pinned groups: root -> a reason (structural pins first; soft ones when ``soft``)."""
        out: dict[int, str] = {}
        for slot, reason in self.pin_reasons.items():
            out.setdefault(self.find(slot), reason)
        if soft:
            for slot, reason in self.soft_reasons.items():
                out.setdefault(self.find(slot), reason)
        return out
