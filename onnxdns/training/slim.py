"""Network Slimming sparsity training (Liu et al., ICCV 2017): an L1 penalty on BatchNorm scales.

The training loss becomes ``loss + lambda * sum |gamma|`` (``loss``: cross-entropy or distillation,
:mod:`onnxdns.training.losses`) over the scale of every
BatchNormalization node whose scale is a trainable initializer. The penalty is part of the
onnxruntime-training graph (an ``onnxblock`` loss block: the scales concatenated, ``Abs -> ReduceSum``,
scaled, added to the base loss), so onnxruntime's autodiff adds ``lambda * sign(gamma)`` to
each gamma gradient: the sub-gradient the reference implementation adds by hand (``sign(0) = 0``).
With ``smooth_l1 = beta`` the penalty is the smooth ``sqrt(gamma^2 + beta^2) - beta`` (gradient
``gamma / sqrt(gamma^2 + beta^2)``, no sign flip-flop around zero). The loss reported by the
training and eval models includes the penalty.

BatchNorm trains in training mode (batch statistics; running statistics written back after every
step, see :mod:`onnxdns.training.batchnorm`). After training, ``slim-channels`` removes the
channels whose |gamma| fell below a global threshold.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

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


def sparsity_loss(scales: Sequence[str], lam: float, smooth_l1: float | None = None) -> "L1Penalty":
    """The penalty term ``lam`` times the (smooth) L1 norm of the initializers ``scales``, added
    to whatever base loss the run uses (see :func:`onnxdns.training.losses.block_factory`)."""
    if lam < 0:
        raise OnnxdnsError(f"slim lambda must be >= 0, got {lam}")
    if smooth_l1 is not None and not smooth_l1 > 0:
        raise OnnxdnsError(f"smooth L1 beta must be positive, got {smooth_l1}")
    if not scales:
        raise OnnxdnsError("Network Slimming needs BatchNormalization nodes with trainable scales; the model has none")
    return L1Penalty(tuple(scales), float(lam), smooth_l1)


@dataclasses.dataclass(frozen=True)
class L1Penalty:
    """``lam * sum_i P(scale_i)``; ``P`` = |x| or ``sqrt(x^2 + beta^2) - beta``."""

    scales: tuple[str, ...]
    lam: float
    smooth_l1: float | None = None

    def build(self, emit) -> str:
        """Append the term to the graph through ``emit`` (a :class:`onnxdns.training.losses.Emit`);
        returns the name of its scalar."""
        flat_shape = emit.const("flat_shape", [-1], np.int64)
        flat = [emit.node("Reshape", [scale, flat_shape]) for scale in self.scales]
        gammas = flat[0] if len(flat) == 1 else emit.node("Concat", flat, axis=0)
        if self.smooth_l1 is None:
            term = emit.node("Abs", [gammas])
        else:
            beta, beta_sq = emit.const("beta", self.smooth_l1), emit.const("beta_sq", self.smooth_l1 ** 2)
            term = emit.node("Sub", [emit.node("Sqrt", [emit.node("Add", [emit.node("Mul", [gammas, gammas]), beta_sq])]),
                                     beta])
        total = emit.node("ReduceSum", [term], keepdims=0)
        return emit.node("Mul", [total, emit.const("lambda", self.lam)])


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
