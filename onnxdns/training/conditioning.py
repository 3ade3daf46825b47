"""Whether one SGD learning rate can serve every layer of a model, read from its first gradients.

SGD moves a weight tensor ``W`` by ``lr * |dL/dW|`` per step, a relative change of
``lr * |dL/dW| / |W|``. When that ratio differs by orders of magnitude between layers, no
learning rate suits them all: small enough for the most sensitive layer, it leaves the others
untouched; large enough to train the others, it wrecks that layer (the loss rises from step 1).
Exports that fold BatchNorm into the weights, or factorised layers on very different scales (a
sparse-lowrank split of the PP-OCR detector: one gradient 1,565x its weights' norm, every other
below 0.04x), do this. AdamW divides each weight's step by its own gradient scale.

:func:`spread` measures the ratio per weight tensor (rank >= 2, non-zero) after the first step;
:func:`advice` words a warning when the largest ratio exceeds :data:`SPREAD_LIMIT` times the median.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

#: Largest / median relative gradient above which one SGD learning rate is not enough.
SPREAD_LIMIT = 1000.0


@dataclasses.dataclass(frozen=True)
class Spread:
    """The weight tensor with the largest ``|grad| / |weight|`` (``name``, ``ratio``), the median
    ratio over all weight tensors, and how many there are."""

    name: str
    ratio: float
    median: float
    tensors: int

    @property
    def factor(self) -> float:
        return self.ratio / self.median if self.median > 0 else float("inf")


def spread(weights: Mapping[str, np.ndarray], gradients: Mapping[str, np.ndarray]) -> Spread | None:
    """The :class:`Spread` of the weight tensors (rank >= 2, non-zero norm) present in both
    mappings; None with fewer than three (nothing to compare)."""
    ratios = {}
    for name, w in weights.items():
        g = gradients.get(name)
        if g is None or w.ndim < 2:
            continue
        norm = float(np.linalg.norm(w))
        if norm > 0 and np.isfinite(norm):
            ratios[name] = float(np.linalg.norm(g)) / norm
    if len(ratios) < 3:
        return None
    name = max(ratios, key=ratios.get)
    return Spread(name, ratios[name], float(np.median(list(ratios.values()))), len(ratios))


def advice(s: Spread | None) -> str | None:
    """A one-paragraph warning when ``s`` says one learning rate cannot serve the model, else None."""
    if s is None or s.factor <= SPREAD_LIMIT:
        return None
    return (f"one SGD learning rate cannot serve this model's layers: the gradient of {s.name} is "
            f"{s.ratio:.3g}x its weights' norm, the median of {s.tensors} weight tensors {s.median:.3g}x "
            f"({s.factor:.3g} times less); a learning rate that trains the others will wreck it. "
            "--optimizer adamw scales each weight's step; it moves every weight by about --lr per step, "
            "so give an --lr well below the smallest weights (1e-5 on the PP-OCR detector)")
