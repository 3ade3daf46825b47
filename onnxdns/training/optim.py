"""SGD with momentum on onnxruntime-training 1.19, and learning-rate schedules.

onnxruntime-training 1.19 runs exactly two optimizer kernels: ``SGDOptimizerV2`` (plain
``w -= lr * g``: no momentum, no weight decay) and ``AdamWOptimizer``; the C++ ``Optimizer`` rejects
any other optimizer graph. Heavy-ball momentum is obtained exactly from ``AdamWOptimizer`` in its
Hugging Face mode (``adam_mode=1``) without bias correction, with ``beta1 = momentum``,
``beta2 = 1`` and ``epsilon = 1``:

* ``m <- momentum * m + (1 - momentum) * g``, so ``m = (1 - momentum) * buf`` where
  ``buf <- momentum * buf + g`` is torch's momentum buffer;
* ``v <- 1 * v + 0 * g^2`` stays 0, so the denominator ``sqrt(v) + epsilon`` is exactly 1;
* ``w <- w - lr' * m`` with ``lr' = lr / (1 - momentum)`` (:func:`ort_learning_rate`) is
  ``w - lr * buf``: ``torch.optim.SGD(momentum=..., dampening=0, nesterov=False)``.

Both moments are saved in the checkpoint (``include_optimizer_state=True``) and restored on load.
L2 weight decay (torch's coupled ``g + wd * w``) is added to the gradients inside the training
graph (see :mod:`onnxdns.training.artifacts`), since the AdamW kernel only decays decoupled.

``optimizer="adamw"`` is the same kernel as ``torch.optim.AdamW`` (``adam_mode=0``, bias
correction, ``betas=(momentum, 0.999)``, ``eps=1e-8``, decoupled weight decay ``w -= lr * wd * w``).
Its per-parameter step sizes suit models whose layers want very different learning rates, which
one SGD rate cannot serve: exports with BatchNorm folded into the weights, or factors whose input
activations differ by orders of magnitude (a sparse-lowrank split of the PP-OCR detector). It
moves every weight by about ``lr`` per step even where the gradient is only rounding noise (a
student still equal to its teacher), so its ``lr`` must sit well below the weights' scale.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from onnxdns.errors import OnnxdnsError
from onnxdns.training.config import SCHEDULES


OPTIMIZERS = ("sgd", "adamw")
#: AdamW's second-moment decay and epsilon: torch.optim.AdamW's defaults.
ADAMW_BETA2 = 0.999
ADAMW_EPS = 1e-8


def optimizer_block(optimizer: str, momentum: float, weight_decay: float):
    """The ``onnxblock`` optimizer block of ``optimizer`` (see the module docstring): heavy-ball
    SGD (its weight decay is in the training graph) or AdamW (decoupled weight decay)."""
    from onnxruntime.training import onnxblock  # imports torch: keep it lazy

    if not 0.0 <= momentum < 1.0:
        raise OnnxdnsError(f"momentum must be in [0, 1), got {momentum}")
    if optimizer == "sgd":
        return onnxblock.optim.AdamW(bias_correction=False, betas=(momentum, 1.0), eps=1.0, weight_decay=0.0)
    if optimizer == "adamw":
        return onnxblock.optim.AdamW(bias_correction=True, betas=(momentum, ADAMW_BETA2), eps=ADAMW_EPS,
                                     weight_decay=weight_decay)
    raise OnnxdnsError(f"unknown optimizer '{optimizer}'; choose one of: {', '.join(OPTIMIZERS)}")


def ort_learning_rate(lr: float, momentum: float, optimizer: str = "sgd") -> float:
    """The learning rate to give the optimizer kernel: for SGD ``lr / (1 - momentum)``, so that it
    steps ``lr * buf`` (float32 arithmetic, matching the kernel's ``1.f - alpha``); AdamW's is ``lr``."""
    if optimizer == "adamw":
        return float(lr)
    return float(np.float32(lr) / (np.float32(1.0) - np.float32(momentum)))


@dataclasses.dataclass(frozen=True)
class LRSchedule:
    """Learning rate as a pure function of the global step (so resuming needs only the step).

    * ``constant``: ``lr``;
    * ``step``: ``lr * gamma ** (step // step_size)`` (gamma 0.1; ``step_size`` defaults to a third
      of the run);
    * ``cosine``: from ``lr`` to ``min_lr`` over ``total_steps`` (half a cosine); with ``step_size``
      S, ``lr`` is held for the first S steps and the half cosine spans the remaining ones (e.g. DNS:
      constant while the masks change, then a decay over the fine-tuning);
    * ``inv``: Caffe's ``lr * (1 + gamma * step) ** -power`` (gamma 1e-4, power 0.75: the LeNet
      solver of Caffe).
    """

    kind: str = "constant"
    lr: float = 0.01
    total_steps: int = 1
    gamma: float | None = None  # step: 0.1, inv: 1e-4 when not given
    step_size: int | None = None
    power: float = 0.75
    min_lr: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise OnnxdnsError(f"unknown learning-rate schedule '{self.kind}'; known: {', '.join(SCHEDULES)}")
        if not self.lr > 0:
            raise OnnxdnsError(f"learning rate must be positive, got {self.lr}")
        if self.step_size is not None and self.step_size <= 0:
            raise OnnxdnsError(f"lr step size must be positive, got {self.step_size}")

    def __call__(self, step: int) -> float:
        if self.kind == "constant":
            return self.lr
        if self.kind == "step":
            size = self.step_size or max(1, self.total_steps // 3)
            return self.lr * (0.1 if self.gamma is None else self.gamma) ** (step // size)
        if self.kind == "cosine":
            hold = min(self.step_size or 0, self.total_steps)
            t = min(max(step - hold, 0), self.total_steps - hold) / max(1, self.total_steps - hold)
            return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + math.cos(math.pi * t))
        return self.lr * (1.0 + (1e-4 if self.gamma is None else self.gamma) * step) ** (-self.power)
