"""Network Slimming sparsity training (Liu et al., ICCV 2017): an L1 penalty on BatchNorm scales.

The training loss becomes ``cross-entropy + lambda * sum |gamma|`` over the scale of every
BatchNormalization node whose scale is a trainable initializer. The penalty is part of the
onnxruntime-training graph (an ``onnxblock`` loss block: the scales concatenated, ``Abs -> ReduceSum``,
scaled, added to the cross-entropy), so onnxruntime's autodiff adds ``lambda * sign(gamma)`` to
each gamma gradient: the sub-gradient the reference implementation adds by hand (``sign(0) = 0``).
With ``smooth_l1 = beta`` the penalty is the smooth ``sqrt(gamma^2 + beta^2) - beta`` (gradient
``gamma / sqrt(gamma^2 + beta^2)``, no sign flip-flop around zero). The loss reported by the
training and eval models includes the penalty.

BatchNorm trains in training mode (batch statistics; running statistics written back after every
step, see :mod:`onnxdns.training.batchnorm`). After training, ``slim-channels`` removes the
channels whose |gamma| fell below a global threshold.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from onnxdns.errors import OnnxdnsError
from onnxdns.training.loop import Hook
#: |gamma| below this counts as "near zero" in the training summary.
SMALL_GAMMA = 1e-2


def penalty(gammas: Sequence[np.ndarray], lam: float, smooth_l1: float | None = None) -> float:
    """The value the loss block adds, computed with numpy (float64)."""
    total = 0.0
    for g in gammas:
        g = np.asarray(g, dtype=np.float64)
        total += float(np.sum(np.abs(g))) if smooth_l1 is None else float(np.sum(np.sqrt(g * g + smooth_l1 ** 2) - smooth_l1))
    return lam * total


def sparsity_loss(scales: Sequence[str], lam: float, smooth_l1: float | None = None) -> Callable[[], Any]:
    """A factory for the loss block (``ArtifactSpec.loss``): cross-entropy on the model output
    plus ``lam`` times the (smooth) L1 norm of the initializers ``scales``."""
    if lam < 0:
        raise OnnxdnsError(f"slim lambda must be >= 0, got {lam}")
    if smooth_l1 is not None and not smooth_l1 > 0:
        raise OnnxdnsError(f"smooth L1 beta must be positive, got {smooth_l1}")
    if not scales:
        raise OnnxdnsError("Network Slimming needs BatchNormalization nodes with trainable scales; the model has none")
    names, lam_value = tuple(scales), float(lam)

    def make():
        return _block_class()(names, lam_value, smooth_l1)

    return make


def _block_class():
    from onnx import helper, numpy_helper
    from onnxruntime.training import onnxblock  # imports torch: keep it lazy
    from onnxruntime.training.onnxblock import _graph_utils

    class ScaleSparsityLoss(onnxblock.Block):
        """``CrossEntropy(logits, labels) + lam * sum_i P(scale_i)``; ``P`` = |x| or the smooth form."""

        def __init__(self, scales: tuple[str, ...], lam: float, smooth_l1: float | None) -> None:
            super().__init__()
            self.scales, self.lam, self.smooth_l1 = scales, lam, smooth_l1
            self.cross_entropy = onnxblock.loss.CrossEntropyLoss()

        def build(self, scores_input_name: str, labels_name: str = "labels") -> str:
            ce = self.cross_entropy(scores_input_name, labels_name)
            graph = self.base.graph

            def name(base: str) -> str:
                return _graph_utils.generate_graph_name(f"slim.{base}")

            def const(base: str, value: float) -> str:
                tensor_name = name(base)
                graph.initializer.append(numpy_helper.from_array(np.array(value, dtype=np.float32), tensor_name))
                return tensor_name

            def node(op: str, inputs: list[str], **attrs) -> str:
                out = name(f"{op.lower()}_output")
                graph.node.append(helper.make_node(op, inputs, [out], name=name(op), **attrs))
                return out

            const_shape = name("flat_shape")
            graph.initializer.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), const_shape))
            beta = beta_sq = None
            if self.smooth_l1 is not None:
                beta, beta_sq = const("beta", self.smooth_l1), const("beta_sq", self.smooth_l1 ** 2)
            flat = [node("Reshape", [scale, const_shape]) for scale in self.scales]
            gammas = flat[0] if len(flat) == 1 else node("Concat", flat, axis=0)
            if beta is None:
                term = node("Abs", [gammas])
            else:
                term = node("Sub", [node("Sqrt", [node("Add", [node("Mul", [gammas, gammas]), beta_sq])]), beta])
            total = node("ReduceSum", [term], keepdims=0)
            return node("Add", [ce, node("Mul", [total, const("lambda", self.lam)])])

    return ScaleSparsityLoss


class ScaleMonitor(Hook):
    """Reports where the BatchNorm scales ended (no effect on training)."""

    def __init__(self, scales: Sequence[str], lam: float, smooth_l1: float | None) -> None:
        self.scales, self.lam, self.smooth_l1 = list(scales), lam, smooth_l1

    def summary(self) -> dict[str, Any]:
        session = self.trainer.session
        gammas = [session.get(s) for s in self.scales]
        flat = np.abs(np.concatenate([g.reshape(-1) for g in gammas])) if gammas else np.zeros(0)
        if not flat.size:
            return {}
        quantiles = {f"q{int(q * 100)}": float(np.quantile(flat, q)) for q in (0.1, 0.3, 0.5, 0.7, 0.9)}
        return {
            "slim": {
                "bn_channels": int(flat.size),
                "penalty": penalty(gammas, self.lam, self.smooth_l1),
                "small_fraction": float(np.mean(flat < SMALL_GAMMA)),
                "abs_gamma_quantiles": quantiles,
            }
        }
