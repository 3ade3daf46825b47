"""Magnitude pruning baseline (Han, Pool, Tran and Dally, NIPS 2015): prune, retrain, repeat.

Within the run's step budget, ``rounds`` pruning events happen at steps ``k * total / rounds``
(k = 0 .. rounds-1), each followed by retraining until the next one. At round k (1-based) every
layer is pruned by magnitude to ``sparsity * k / rounds`` of its masked entries (weights, and biases
when they carry masks, ranked together), or, in threshold mode, every kept entry with
``|w| < quality * k / rounds * std`` (std of the layer's kept entries) is removed. Pruned weights
are set to zero and never come back: the training graph keeps the masked gradient
``dL/dW = mask * dL/d(W*mask)``, and the forward pass always uses ``W * mask``. (The momentum
accumulated before a pruning event still moves a pruned weight a little, invisibly to the forward
pass; the last step sets pruned weights to exactly zero again.)
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from onnxdns.errors import OnnxdnsError
from onnxdns.training.loop import Hook
from onnxdns.training.params import MaskedLayer

#: Default final sparsity per kind (Han et al. keep about 8-12% of LeNet fc weights and more of
#: the convolutions).
DEFAULT_SPARSITY = {"conv": 0.6, "fc": 0.9}


def prune_to_sparsity(values: np.ndarray, mask: np.ndarray, sparsity: float) -> np.ndarray:
    """Mask keeping the ``round((1 - sparsity) * n)`` largest ``|values|`` among kept entries
    (already-pruned entries stay pruned)."""
    flat_mask = (mask.reshape(-1) != 0)
    keep = int(round((1.0 - sparsity) * flat_mask.size))
    keep = min(keep, int(flat_mask.sum()))
    magnitude = np.where(flat_mask, np.abs(values.reshape(-1)).astype(np.float64), -1.0)
    new = np.zeros(flat_mask.size, dtype=bool)
    if keep > 0:
        order = np.argsort(-magnitude, kind="stable")
        new[order[:keep]] = True
    return new.reshape(mask.shape)


def prune_below(values: np.ndarray, mask: np.ndarray, threshold: float) -> np.ndarray:
    """Mask removing kept entries with ``|values| < threshold``."""
    return (mask != 0) & (np.abs(values) >= threshold)


class MagnitudePruner(Hook):
    """Prunes at evenly spaced steps; ``sparsity`` (per layer) or ``quality`` selects the mode."""

    def __init__(self, layers: Sequence[MaskedLayer], total_steps: int, *, rounds: int = 3,
                 sparsity: dict[str, float] | None = None, quality: float | None = None) -> None:
        if rounds < 1:
            raise OnnxdnsError(f"magnitude pruning needs at least one round, got {rounds}")
        if rounds > total_steps:
            raise OnnxdnsError(f"{rounds} pruning rounds do not fit in {total_steps} steps")
        if (sparsity is None) == (quality is None):
            raise OnnxdnsError("magnitude pruning: give a sparsity or a quality parameter, not both")
        for name, s in (sparsity or {}).items():
            if not 0.0 <= s < 1.0:
                raise OnnxdnsError(f"magnitude pruning: sparsity of {name} must be in [0, 1), got {s}")
        if quality is not None and quality <= 0:
            raise OnnxdnsError(f"magnitude pruning: quality must be positive, got {quality}")
        self.layers = list(layers)
        self.rounds = rounds
        self.total_steps = total_steps
        self.events = [k * total_steps // rounds for k in range(rounds)]
        self.sparsity = sparsity
        self.quality = quality
        self.done = 0

    def before_step(self, step: int) -> None:
        if self.done >= self.rounds or step != self.events[self.done]:
            return
        self.done += 1
        fraction = self.done / self.rounds
        session, masks = self.trainer.session, self.trainer.masks
        for layer in self.layers:
            params = [(p, m, session.get(p)) for p, m in layer.params]
            values = np.concatenate([w.reshape(-1) for _, _, w in params])
            current = np.concatenate([masks.arrays[m].reshape(-1) for _, m, _ in params])
            if self.sparsity is not None:
                new = prune_to_sparsity(values, current, self.sparsity[layer.name] * fraction)
            else:
                kept = values[current != 0]
                std = float(np.std(kept)) if kept.size else 0.0
                new = prune_below(values, current, self.quality * fraction * std)
            offset = 0
            for p, m, w in params:
                part = new[offset:offset + w.size].reshape(w.shape)
                offset += w.size
                mask = part.astype(masks.arrays[m].dtype)
                masks.set(m, mask)
                session.set(p, w * mask)

    def after_step(self, step: int, outputs: list[np.ndarray]) -> None:
        if step == self.total_steps - 1:
            session, masks = self.trainer.session, self.trainer.masks
            for layer in self.layers:
                for p, m in layer.params:
                    session.set(p, session.get(p) * masks.arrays[m])

    def state_dict(self) -> dict[str, Any]:
        return {"done": self.done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.done = int(state["done"])

    def summary(self) -> dict[str, Any]:
        return {"rounds": self.rounds, "events": self.events, "rounds_done": self.done}
