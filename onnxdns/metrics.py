"""Quality metrics accumulated over batches (numpy only): accuracy against labels, and fidelity of a
model's outputs to a reference's (top-1 agreement, relative L2 error, cosine similarity).

Used by the training loop (validation of each epoch, the reference being the teacher) and by the
workflows' evaluator (:mod:`onnxdns.workflows.evaluate`, two ONNX files on onnxruntime).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np


def is_classifier(output: np.ndarray) -> bool:
    """A ``[batch, classes]`` output with more than one class: top-1 metrics apply."""
    return output.ndim == 2 and output.shape[1] > 1


class Accuracy:
    """Top-1 accuracy of ``[batch, classes]`` scores against integer labels."""

    def __init__(self) -> None:
        self.correct = 0
        self.count = 0

    def update(self, scores: np.ndarray, labels: np.ndarray) -> None:
        self.correct += int(np.count_nonzero(np.argmax(scores, axis=-1) == labels))
        self.count += int(len(labels))

    @property
    def value(self) -> float | None:
        return self.correct / self.count if self.count else None


class Fidelity:
    """How closely outputs follow a reference's, over every sample seen.

    Per output, in float64 over all elements: ``relative_l2 = ||y - r|| / ||r||`` and
    ``cosine = <y, r> / (||y|| ||r||)`` (1 when both are zero); for classifier outputs
    (see :func:`is_classifier`) also the fraction of samples whose arg-max agrees.
    """

    def __init__(self) -> None:
        self.sums: dict[str, np.ndarray] = {}  # name -> [sum (y-r)^2, sum r^2, sum y*r, sum y^2]
        self.agree: dict[str, int] = {}
        self.rows: dict[str, int] = {}

    def update(self, outputs: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> None:
        for name, y in outputs.items():
            r = np.asarray(reference[name], dtype=np.float64)
            y = np.asarray(y, dtype=np.float64)
            if y.shape != r.shape:
                raise ValueError(f"output {name}: shape {list(y.shape)} differs from the reference's {list(r.shape)}")
            s = self.sums.setdefault(name, np.zeros(4))
            s += [np.sum((y - r) ** 2), np.sum(r * r), np.sum(y * r), np.sum(y * y)]
            if is_classifier(r):
                self.agree[name] = self.agree.get(name, 0) + int(np.count_nonzero(y.argmax(-1) == r.argmax(-1)))
                self.rows[name] = self.rows.get(name, 0) + int(r.shape[0])

    def result(self) -> dict[str, Any]:
        """``{name: {"relative_l2", "cosine"[, "top1_agreement"]}}``."""
        out: dict[str, Any] = {}
        for name, (diff, ref, dot, own) in self.sums.items():
            row = {"relative_l2": math.sqrt(diff / ref) if ref > 0 else (0.0 if diff == 0 else math.inf),
                   "cosine": dot / math.sqrt(ref * own) if ref > 0 and own > 0 else float(ref == own)}
            if self.rows.get(name):
                row["top1_agreement"] = self.agree[name] / self.rows[name]
            out[name] = row
        return out
