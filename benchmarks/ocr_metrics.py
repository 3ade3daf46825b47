"""Fidelity metrics of the OCR proof benchmark (issue 11), measured with onnxruntime.

* Direction classifier: accuracy on a labelled folder (``DIR/0``, ``DIR/180``) read by the
  onnxdns folder source with the model's normalisation (:data:`ocr_data.CLS_MEAN`/``CLS_STD``).
* Text detector: the probability map (output ``[N, 1, H, W]``) binarised at ``THRESH`` = 0.3, the
  threshold of rapidocr's DB post-processing (``config.yaml`` ``Det.thresh: 0.3``,
  ``DBPostProcess``: ``segmentation = pred > thresh``). Two models are compared by the mean over
  pages of the IoU of their binarised maps, and by box agreement: the connected components of
  each binarised map (8-connected, after rapidocr's 2 x 2 dilation) become axis-aligned boxes,
  kept as rapidocr keeps its boxes (shorter side at least ``MIN_SIDE`` = 3 px and mean
  probability inside at least ``BOX_THRESH`` = 0.5); the candidate's boxes are matched one to one
  to the original's at IoU >= 0.5 (greedy, highest IoU first) and precision, recall and F1 of the
  candidate against the original are counted over all pages. rapidocr fits rotated rectangles
  (OpenCV ``minAreaRect``) and expands them (``unclip``); the rendered text is axis-aligned, so
  axis-aligned boxes of the unexpanded components compare the same regions without OpenCV.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterator, Sequence

import numpy as np

from ocr_data import CLS_MEAN, CLS_STD, DET_MEAN, DET_STD

THRESH = 0.3       # rapidocr DBPostProcess thresh (config.yaml Det.thresh)
BOX_THRESH = 0.5   # rapidocr config.yaml Det.box_thresh
MIN_SIDE = 3       # rapidocr DBPostProcess.min_size
MATCH_IOU = 0.5


def session(model: Any, threads: int = 0):
    """An onnxruntime CPU session of a path, bytes or ``onnx.ModelProto`` (a session as is)."""
    import onnxruntime as ort

    if isinstance(model, ort.InferenceSession):
        return model
    if hasattr(model, "SerializeToString"):
        model = model.SerializeToString()
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(os.fspath(model) if isinstance(model, os.PathLike) else model, options,
                                providers=["CPUExecutionProvider"])


def open_folder(folder: Any, model: Any, kind: str):
    """The onnxdns folder source of ``folder`` for ``model`` with the normalisation of ``kind``
    (``cls`` or ``det``)."""
    from onnxdns.sources import model_inputs, open_source

    mean, std = (CLS_MEAN, CLS_STD) if kind == "cls" else (DET_MEAN, DET_STD)
    return open_source(os.fspath(folder), model_inputs(session(model)), mean=mean, std=std)


def _outputs(sess, source, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    for batch in source.batches(batch_size):
        yield sess.run(None, batch.inputs)[0], batch.labels


# --------------------------------------------------------------------------- classifier


def classifier_accuracy(model: Any, folder: Any, *, batch_size: int = 64, threads: int = 0) -> dict:
    """Top-1 accuracy of the direction classifier on a labelled folder, and per-class counts."""
    sess = session(model, threads)
    source = open_folder(folder, sess, "cls")
    if not source.has_labels:
        raise ValueError(f"{folder}: no class subfolders, no labels")
    correct = total = 0
    per_class = {c: [0, 0] for c in source.classes}
    for probs, labels in _outputs(sess, source, batch_size):
        pred = probs.argmax(axis=1)
        correct += int((pred == labels).sum())
        total += len(labels)
        for k, c in enumerate(source.classes):
            mask = labels == k
            per_class[c][0] += int((pred[mask] == k).sum())
            per_class[c][1] += int(mask.sum())
    return {"accuracy": correct / total, "correct": correct, "samples": total,
            "per_class": {c: v[0] / v[1] if v[1] else None for c, v in per_class.items()},
            "class_samples": {c: v[1] for c, v in per_class.items()}}


def classifier_agreement(model_a: Any, model_b: Any, folder: Any, *, batch_size: int = 64) -> float:
    """Fraction of lines on which both classifiers predict the same class."""
    a, b = session(model_a), session(model_b)
    source = open_folder(folder, a, "cls")
    same = total = 0
    for batch in source.batches(batch_size):
        pa = a.run(None, batch.inputs)[0].argmax(axis=1)
        pb = b.run(None, batch.inputs)[0].argmax(axis=1)
        same += int((pa == pb).sum())
        total += len(pa)
    return same / total


# --------------------------------------------------------------------------- detector


def detector_maps(model: Any, folder: Any, *, batch_size: int = 4, threads: int = 0) -> np.ndarray:
    """Probability maps ``[pages, H, W]`` (float32) of the detector on a flat folder of pages."""
    sess = session(model, threads)
    source = open_folder(folder, sess, "det")
    return np.concatenate([out[:, 0] for out, _ in _outputs(sess, source, batch_size)], axis=0)


def binarize(prob: np.ndarray, thresh: float = THRESH) -> np.ndarray:
    return prob > thresh


def map_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two boolean maps (1.0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def mean_map_iou(prob_a: np.ndarray, prob_b: np.ndarray, thresh: float = THRESH) -> float:
    """Mean over pages of the IoU of the binarised maps of two models ``[pages, H, W]``."""
    if prob_a.shape != prob_b.shape:
        raise ValueError(f"maps of different shapes {prob_a.shape} and {prob_b.shape}")
    return float(np.mean([map_iou(binarize(a, thresh), binarize(b, thresh)) for a, b in zip(prob_a, prob_b)]))


def _dilate2x2(mask: np.ndarray) -> np.ndarray:
    """OpenCV's ``dilate`` with a 2 x 2 kernel of ones (anchor at its centre, i.e. (1, 1) -> the
    output pixel (y, x) is the max over (y-1..y, x-1..x))."""
    out = mask.copy()
    out[1:, :] |= mask[:-1, :]
    out[:, 1:] |= mask[:, :-1]
    out[1:, 1:] |= mask[:-1, :-1]
    return out


def _find(parent: list[int], i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def components(mask: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Bounding boxes ``(x0, y0, x1, y1)`` (inclusive-exclusive) of the 8-connected components of
    a boolean map, found over horizontal runs with a union-find (no OpenCV, no SciPy)."""
    runs: list[tuple[int, int, int]] = []  # (row, start, stop)
    parent: list[int] = []
    prev: list[int] = []  # run ids of the previous row
    for y in range(mask.shape[0]):
        row = mask[y].astype(np.int8)
        edges = np.flatnonzero(np.diff(np.concatenate(([0], row, [0]))))
        cur = []
        j = 0
        for s, e in zip(edges[::2].tolist(), edges[1::2].tolist()):
            rid = len(runs)
            runs.append((y, s, e))
            parent.append(rid)
            cur.append(rid)
            # 8-connectivity: previous-row runs overlapping [s - 1, e + 1)
            while j < len(prev) and runs[prev[j]][2] < s:  # ends before s - 1 + 1
                j += 1
            k = j
            while k < len(prev) and runs[prev[k]][1] <= e:
                ra, rb = _find(parent, rid), _find(parent, prev[k])
                if ra != rb:
                    parent[max(ra, rb)] = min(ra, rb)
                k += 1
        prev = cur
    boxes: dict[int, list[int]] = {}
    for rid, (y, s, e) in enumerate(runs):
        root = _find(parent, rid)
        b = boxes.get(root)
        if b is None:
            boxes[root] = [s, y, e, y + 1]
        else:
            b[0], b[1], b[2], b[3] = min(b[0], s), min(b[1], y), max(b[2], e), max(b[3], y + 1)
    return [tuple(b) for b in boxes.values()]


def detect_boxes(prob: np.ndarray, thresh: float = THRESH, box_thresh: float = BOX_THRESH,
                 min_side: int = MIN_SIDE) -> list[tuple[int, int, int, int]]:
    """Text boxes of one probability map ``[H, W]`` (see the module docstring)."""
    out = []
    for x0, y0, x1, y1 in components(_dilate2x2(binarize(prob, thresh))):
        if min(x1 - x0, y1 - y0) < min_side:
            continue
        if float(prob[y0:y1, x0:x1].mean()) < box_thresh:
            continue
        out.append((x0, y0, x1, y1))
    return out


def box_iou(a: Sequence[int], b: Sequence[int]) -> float:
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def match(candidate: Sequence[Sequence[int]], reference: Sequence[Sequence[int]], min_iou: float = MATCH_IOU) -> int:
    """Number of one-to-one matches at IoU >= ``min_iou`` (greedy, highest IoU first)."""
    pairs = sorted(((box_iou(c, r), i, j) for i, c in enumerate(candidate) for j, r in enumerate(reference)),
                   reverse=True)
    used_c, used_r, n = set(), set(), 0
    for iou, i, j in pairs:
        if iou < min_iou:
            break
        if i in used_c or j in used_r:
            continue
        used_c.add(i)
        used_r.add(j)
        n += 1
    return n


@dataclasses.dataclass(frozen=True)
class BoxAgreement:
    matched: int
    candidate_boxes: int
    reference_boxes: int

    @property
    def precision(self) -> float:
        return self.matched / self.candidate_boxes if self.candidate_boxes else 1.0

    @property
    def recall(self) -> float:
        return self.matched / self.reference_boxes if self.reference_boxes else 1.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0

    def as_dict(self) -> dict:
        return {"matched": self.matched, "candidate_boxes": self.candidate_boxes,
                "reference_boxes": self.reference_boxes, "precision": round(self.precision, 4),
                "recall": round(self.recall, 4), "f1": round(self.f1, 4)}


def box_agreement(candidate_boxes: Sequence[Sequence[Sequence[int]]],
                  reference_boxes: Sequence[Sequence[Sequence[int]]]) -> BoxAgreement:
    """Boxes of the candidate against the reference's, page by page, counted over all pages."""
    if len(candidate_boxes) != len(reference_boxes):
        raise ValueError(f"{len(candidate_boxes)} pages against {len(reference_boxes)}")
    return BoxAgreement(sum(match(c, r) for c, r in zip(candidate_boxes, reference_boxes)),
                        sum(len(c) for c in candidate_boxes), sum(len(r) for r in reference_boxes))


def detector_fidelity(prob_candidate: np.ndarray, prob_reference: np.ndarray) -> dict:
    """Mean map IoU and box agreement of a candidate detector's maps against the original's."""
    cand = [detect_boxes(p) for p in prob_candidate]
    ref = [detect_boxes(p) for p in prob_reference]
    return {"mean_map_iou": round(mean_map_iou(prob_candidate, prob_reference), 4),
            "boxes": box_agreement(cand, ref).as_dict()}
