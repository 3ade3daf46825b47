"""One onnxruntime-training session: checkpoint state, training/eval module and optimizer."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import onnxruntime as ort

from onnxdns.errors import OnnxdnsError
from onnxdns.training.artifacts import Artifacts
from onnxdns.training.optim import ort_learning_rate


class TrainingSession:
    """``CheckpointState`` + ``Module`` + ``Optimizer`` over generated :class:`Artifacts`.

    ``checkpoint`` (default: the artifacts' initial checkpoint) may be one saved by :meth:`save`,
    which includes the optimizer's momentum. ``threads=0`` lets onnxruntime use every core.
    """

    def __init__(self, artifacts: Artifacts, checkpoint: str | os.PathLike | None = None, *, threads: int = 0) -> None:
        from onnxruntime.training.api import CheckpointState, Module, Optimizer

        self.artifacts = artifacts
        path = Path(checkpoint) if checkpoint is not None else artifacts.checkpoint
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 4  # errors reach the user as exceptions (one line), not as C++ log
        try:
            self.state = CheckpointState.load_checkpoint(path)
            self.module = Module(artifacts.training_model, self.state, artifacts.eval_model, session_options=options)
            self.optimizer = Optimizer(artifacts.optimizer_model, self.module)
        except Exception as e:  # onnxruntime's own exception types
            msg = str(e).strip().splitlines()
            raise OnnxdnsError(f"cannot open the training session in {artifacts.directory}: {msg[0] if msg else type(e).__name__}") from None
        self._parameter_names = {name for name, _ in self.state.parameters}

    # ------------------------------------------------------------------ steps

    def train_step(self, feeds: Sequence[np.ndarray], lr: float) -> list[np.ndarray]:
        """Forward, backward and one optimizer update (momentum SGD or AdamW) at learning rate ``lr``. ``feeds``: one
        array per training-model input, in the order of ``artifacts.inputs`` (the model's inputs,
        then the loss's: labels or the teacher's outputs).

        Returns ``[loss, *outputs, *train_only_outputs]`` of the forward pass (before the update).
        """
        self._check(feeds)
        try:
            self.module.train()
            fetched = self.module(*feeds)
            self.optimizer.set_learning_rate(ort_learning_rate(lr, self.artifacts.momentum, self.artifacts.optimizer))
            self.optimizer.step()
            self.module.lazy_reset_grad()
        except Exception as e:  # onnxruntime's own exception types: a misfit the checks before did not catch
            raise OnnxdnsError(f"onnxruntime failed in a training step: {_first_line(e)}") from None
        return list(fetched) if isinstance(fetched, tuple) else [fetched]

    def eval_step(self, feeds: Sequence[np.ndarray]) -> list[np.ndarray]:
        """``[loss, *outputs]`` of the eval model (no update); ``feeds`` as for :meth:`train_step`."""
        self._check(feeds)
        try:
            self.module.eval()
            fetched = self.module(*feeds)
        except Exception as e:
            raise OnnxdnsError(f"onnxruntime failed in an evaluation step: {_first_line(e)}") from None
        return list(fetched) if isinstance(fetched, tuple) else [fetched]

    def _check(self, feeds: Sequence[np.ndarray]) -> None:
        if len(feeds) != len(self.artifacts.inputs):
            raise OnnxdnsError(f"the training model takes {len(self.artifacts.inputs)} inputs "
                               f"({', '.join(self.artifacts.inputs)}), got {len(feeds)} arrays")

    # ------------------------------------------------------------------ parameters

    def get(self, name: str) -> np.ndarray:
        """A copy of parameter (trainable or frozen) ``name``."""
        return self.state.parameters[name].data

    def set(self, name: str, value: np.ndarray) -> None:
        """Overwrite parameter ``name``; takes effect at the next step."""
        self.state.parameters[name].data = np.ascontiguousarray(value, dtype=np.float32)

    def gradients(self) -> dict[str, np.ndarray]:
        """Copies of the trainable parameters' gradients of the last step (including any weight
        decay term the training graph adds)."""
        return {name: p.grad for name, p in self.state.parameters if p.requires_grad}

    def parameters(self) -> dict[str, np.ndarray]:
        """Copies of every parameter, trainable and frozen."""
        return {name: p.data for name, p in self.state.parameters}

    def __contains__(self, name: str) -> bool:
        return name in self._parameter_names

    def save(self, path: str | os.PathLike) -> None:
        """Save parameters and optimizer state (momentum) to an onnxruntime checkpoint file."""
        from onnxruntime.training.api import CheckpointState

        CheckpointState.save_checkpoint(self.state, os.fspath(path), include_optimizer_state=True)


def _first_line(e: BaseException) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__
