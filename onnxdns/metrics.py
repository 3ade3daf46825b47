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
    """How closely outputs follow a reference's, over every sample seen (samples on axis 0).

    Per output: ``relative_l2 = ||y - r|| / ||r||`` over all elements (float64), ``cosine`` the mean
    over samples of ``<y_i, r_i> / (||y_i|| ||r_i||)`` (1 when both are zero, 0 when only one is),
    ``max_abs_diff`` (the largest ``|y - r|``) and ``reference_max_abs`` (the largest ``|r|``: the
    scale the difference compares with) and, for classifier outputs, ``top1_agreement``: the fraction of samples whose arg-max agrees.
    Classifier outputs are the names in ``classifiers``, or by default those of shape
    ``[batch, classes]`` (see :func:`is_classifier`).
    """

    def __init__(self, classifiers: set[str] | None = None) -> None:
        self.classifiers = classifiers
        self.sums: dict[str, np.ndarray] = {}  # name -> [sum (y-r)^2, sum r^2, sum of per-sample cosines, samples]
        self.max_abs: dict[str, np.ndarray] = {}  # name -> [max |y - r|, max |r|]
        self.agree: dict[str, int] = {}

    def update(self, outputs: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> None:
        for name, y in outputs.items():
            r = np.asarray(reference[name], dtype=np.float64)
            y = np.asarray(y, dtype=np.float64)
            if y.shape != r.shape:
                raise ValueError(f"output {name}: shape {list(y.shape)} differs from the reference's {list(r.shape)}")
            n = len(y) if y.ndim else 1
            y2, r2 = y.reshape(n, -1), r.reshape(n, -1)
            ny, nr = np.linalg.norm(y2, axis=1), np.linalg.norm(r2, axis=1)
            norms = ny * nr
            cos = np.where(norms > 0, np.sum(y2 * r2, axis=1) / np.where(norms > 0, norms, 1),
                           np.where((ny == 0) & (nr == 0), 1.0, 0.0))
            s = self.sums.setdefault(name, np.zeros(4))
            s += [np.sum((y - r) ** 2), np.sum(r * r), np.sum(cos), n]
            m = self.max_abs.setdefault(name, np.zeros(2))
            if y.size:
                m[:] = np.maximum(m, [np.max(np.abs(y - r)), np.max(np.abs(r))])
            if (name in self.classifiers) if self.classifiers is not None else is_classifier(r):
                self.agree[name] = self.agree.get(name, 0) + int(np.count_nonzero(y.argmax(-1) == r.argmax(-1)))

    def result(self) -> dict[str, dict[str, float]]:
        """``{name: {"relative_l2", "cosine", "max_abs_diff", "reference_max_abs"[, "top1_agreement"]}}``."""
        out: dict[str, dict[str, float]] = {}
        for name, (diff, ref, cos, n) in self.sums.items():
            row = {"relative_l2": math.sqrt(diff / ref) if ref > 0 else (0.0 if diff == 0 else math.inf),
                   "cosine": float(cos / n) if n else 1.0,
                   "max_abs_diff": float(self.max_abs[name][0]), "reference_max_abs": float(self.max_abs[name][1])}
            if name in self.agree:
                row["top1_agreement"] = self.agree[name] / n
            out[name] = row
        return out
