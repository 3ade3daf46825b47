"""The training loop shared by every method: data order, steps, hooks, evaluation, checkpoints.

A method (DNS, magnitude pruning, later Network Slimming) plugs in as :class:`Hook` objects that
run before and after each optimizer step and whose state is saved in every checkpoint. The loop
itself knows nothing about pruning beyond displaying mask densities.

Everything that decides the trajectory is a function of the global step or saved with it, so a run
resumed from a checkpoint continues bit for bit: the data order of epoch ``e`` is the source's
order for ``(seed, e)`` (for indexed sources a permutation drawn from
``numpy.random.default_rng([seed, e])``; a resumed epoch starts at its batch without reading the
ones before it), the learning rate is ``schedule(step)``, the
parameters, masks and momentum are in the onnxruntime checkpoint, and hooks save their own state
(random generators included).

Ctrl-C (SIGINT) is deferred to the end of the current step: the loop then saves a checkpoint,
reports where, and returns with ``interrupted=True``. A second Ctrl-C aborts at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from onnxdns.errors import OnnxdnsError
from onnxdns.training import conditioning
from onnxdns.metrics import Accuracy, Fidelity
from onnxdns.sources.base import Batch, Source
from onnxdns.training.losses import LossSpec
from onnxdns.training.optim import LRSchedule
from onnxdns.training.params import MaskedLayer, layer_density
from onnxdns.training.session import TrainingSession

logger = logging.getLogger(__name__)

STATE_DIR = "state"
ORT_CHECKPOINT = "ort_checkpoint"
TRAINER_STATE = "trainer.json"
#: Key of the onnxruntime checkpoint's SHA-256 in the trainer state (verified on resume).
CHECKSUM_KEY = "ort_checkpoint_sha256"


class Masks:
    """Numpy copies of the masks in the session state, kept in sync by :meth:`set`."""

    def __init__(self, session: TrainingSession, layers: Sequence[MaskedLayer]) -> None:
        self.session = session
        self.layers = list(layers)
        self.arrays = {m: session.get(m) for layer in self.layers for _, m in layer.params}

    def set(self, name: str, mask: np.ndarray) -> None:
        self.arrays[name] = mask
        self.session.set(name, mask)

    def density(self) -> dict[str, float]:
        return {layer.name: layer_density(self.arrays, layer) for layer in self.layers}

    def total_density(self) -> float:
        kept = sum(int(np.count_nonzero(a)) for a in self.arrays.values())
        total = sum(int(a.size) for a in self.arrays.values())
        return kept / total if total else 1.0


class Hook:
    """Runs around every optimizer step. Subclasses override what they need."""

    def bind(self, trainer: "Trainer") -> None:
        """Called once before the first step (after any checkpoint state was loaded)."""
        self.trainer = trainer

    def before_step(self, step: int) -> None:
        """Before the forward pass of global step ``step`` (0-based)."""

    def after_step(self, step: int, outputs: list[np.ndarray]) -> None:
        """After the update of step ``step``; ``outputs`` are the training model's outputs."""

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state saved in checkpoints."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def summary(self) -> dict[str, Any]:
        """Counters for the training result (e.g. weights pruned / spliced)."""
        return {}


@dataclasses.dataclass
class EpochRecord:
    """Metrics at the end of one epoch (or of the last, partial one). ``val_*`` and ``metrics`` are
    measured on the validation source (the built-in data sets' test split when no validation data
    is given: ``val_split`` says which). ``train_accuracy``/``val_accuracy`` are None without labels
    or without a classifier output; ``metrics`` holds ``accuracy`` (labels) and, when the teacher
    (the input model) runs, per loss output ``agreement/<out>`` (top-1, classifiers),
    ``rel_l2/<out>`` (||s - t|| / ||t|| over the set) and ``cosine/<out>`` (mean per sample)."""

    epoch: int
    step: int
    lr: float
    train_loss: float
    train_accuracy: float | None
    val_loss: float
    val_accuracy: float | None
    metrics: dict[str, float]
    val_split: str
    density: dict[str, float]
    total_density: float
    seconds: float

    @property
    def test_accuracy(self) -> float | None:
        """``val_accuracy`` (the old name: it was always measured on the test split)."""
        return self.val_accuracy

    @property
    def test_loss(self) -> float:
        return self.val_loss


class Feeder:
    """Turns a source's :class:`~onnxdns.sources.Batch` into the training model's feeds: the
    model's inputs, then the loss's (``labels``, or the teacher's outputs computed by running the
    input model with onnxruntime on the same batch)."""

    def __init__(self, input_names: Sequence[str], loss: LossSpec, *, teacher: Any = None,
                 num_classes: int | None = None, data_name: str = "data") -> None:
        self.input_names = list(input_names)
        self.loss = loss
        self.teacher = teacher  # an onnxruntime.InferenceSession of the input model, or None
        self.num_classes = num_classes
        self.data_name = data_name

    def teacher_outputs(self, batch: Batch) -> dict[str, np.ndarray] | None:
        if self.teacher is None:
            return None
        values = self.teacher.run(list(self.loss.outputs), {n: batch.inputs[n] for n in self.input_names})
        return dict(zip(self.loss.outputs, values))

    def labels(self, batch: Batch) -> np.ndarray:
        y = batch.labels
        if y is None:
            raise OnnxdnsError(f"{self.data_name}: a batch without labels; --loss ce needs labels on every batch")
        if y.size and self.num_classes is not None and (y.min() < 0 or y.max() >= self.num_classes):
            bad = int(y.min()) if y.min() < 0 else int(y.max())
            raise OnnxdnsError(f"{self.data_name}: label {bad} out of range 0..{self.num_classes - 1} (the model's "
                               f"output {self.loss.outputs[0]} has {self.num_classes} classes)")
        return y

    def __call__(self, batch: Batch) -> tuple[list[np.ndarray], dict[str, np.ndarray] | None]:
        """(feeds, teacher outputs or None)."""
        feeds = [np.ascontiguousarray(batch.inputs[n]) for n in self.input_names]
        teacher = self.teacher_outputs(batch)
        if self.loss.kind == "ce":
            feeds.append(self.labels(batch))
        else:
            feeds.extend(teacher[o] for o in self.loss.outputs)
        return feeds, teacher


@dataclasses.dataclass
class LoopOutcome:
    step: int
    history: list[EpochRecord]
    interrupted: bool
    checkpoint: Path | None


class Trainer:
    """Runs ``total_steps`` optimizer steps of ``session`` over batches of ``train`` (see the module doc)."""

    def __init__(
        self,
        session: TrainingSession,
        train: Source,
        val: Source | None,
        *,
        feeder: Feeder,
        batch_size: int,
        total_steps: int,
        schedule: LRSchedule,
        steps_per_epoch: int | None = None,
        layers: Sequence[MaskedLayer] = (),
        hooks: Sequence[Hook] = (),
        writeback: dict[str, str] | None = None,
        seed: int = 0,
        checkpoint_dir: str | os.PathLike | None = None,
        eval_batch_size: int = 1000,
        progress: bool = True,
        val_split: str = "validation",
    ) -> None:
        if steps_per_epoch is None:
            n = train.length()
            if batch_size < 1 or n is None or n < batch_size:
                raise OnnxdnsError(f"batch size {batch_size} needs at least that many training samples (have {n})")
            steps_per_epoch = n // batch_size  # the last partial batch is dropped
        self.session = session
        self.train_data, self.val_data = train, val
        self.feeder = feeder
        self.batch_size = batch_size
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = total_steps
        self.schedule = schedule
        self.masks = Masks(session, layers)
        self.hooks = list(hooks)
        self.writeback = dict(writeback or {})
        self.seed = seed
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.eval_batch_size = eval_batch_size
        self.progress = progress
        self.val_split = val_split
        self.step = 0
        self.history: list[EpochRecord] = []
        self._epoch_stats = {"loss": 0.0, "correct": 0, "count": 0, "seconds": 0.0}
        outputs = list(session.artifacts.outputs)
        loss = feeder.loss
        #: Position in the fetched outputs of the classifier output accuracy is measured on (labels only).
        classifier = next((o for o, c in zip(loss.outputs, loss.classifier) if c), None)
        self._logits_index = 1 + outputs.index(classifier) if classifier in outputs and train.has_labels else None
        self._output_index = {o: 1 + outputs.index(o) for o in loss.outputs if o in outputs}
        n_out = len(outputs)
        self._writeback_index = {name: 1 + n_out + i for i, name in enumerate(session.artifacts.train_only_outputs)}
        missing = set(self.writeback) - set(self._writeback_index)
        if missing:
            raise OnnxdnsError(f"write-back output(s) not produced by the training model: {', '.join(sorted(missing))}")
        shapes = session.artifacts.input_shapes
        self._shapes = None if shapes is None else {k: tuple(v) for k, v in shapes.items()}

    # ------------------------------------------------------------------ checkpoints

    def load_state(self, directory: str | os.PathLike, data: dict[str, Any] | None = None) -> None:
        """Restore loop and hook state saved by :meth:`save_checkpoint` (the session must have been
        opened on the same directory's onnxruntime checkpoint, see :func:`read_checkpoint`);
        ``data``: what :func:`read_checkpoint` already returned for it (else it is read here)."""
        if data is None:
            _, data = read_checkpoint(directory)
        trainer_json = checkpoint_paths(directory)[1]
        if data["step"] > self.total_steps:
            raise OnnxdnsError(f"{trainer_json}: step {data['step']} is beyond this run's {self.total_steps} steps; "
                               "the checkpoint does not belong to this run")
        if data["step"] < 1 or any(r.step > data["step"] for r in data["history"]):
            raise OnnxdnsError(f"{trainer_json}: damaged checkpoint (step {data['step']} and its history disagree)")
        hook_states = data["hooks"]
        if len(hook_states) != len(self.hooks):
            raise OnnxdnsError(f"{directory}: checkpoint has state for {len(hook_states)} hooks, this run has {len(self.hooks)}")
        try:
            for hook, state in zip(self.hooks, hook_states):
                hook.load_state_dict(state)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            raise OnnxdnsError(f"{trainer_json}: damaged checkpoint (method state: {type(e).__name__}: {e})") from None
        self.step, self.history, self._epoch_stats = data["step"], data["history"], data["epoch_stats"]

    def save_checkpoint(self) -> Path | None:
        """Write ``<checkpoint_dir>/state`` atomically (a temporary folder renamed into place)."""
        if self.checkpoint_dir is None:
            return None
        final = self.checkpoint_dir / STATE_DIR
        tmp = self.checkpoint_dir / f"{STATE_DIR}.tmp"
        old = self.checkpoint_dir / f"{STATE_DIR}.old"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        self.session.save(tmp / ORT_CHECKPOINT)
        data = {
            "step": self.step,
            "history": [dataclasses.asdict(r) for r in self.history],
            "epoch_stats": self._epoch_stats,
            "hooks": [h.state_dict() for h in self.hooks],
            CHECKSUM_KEY: _sha256(tmp / ORT_CHECKPOINT),
        }
        (tmp / TRAINER_STATE).write_text(json.dumps(data, indent=1))
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
        return final

    # ------------------------------------------------------------------ running

    def run(self) -> LoopOutcome:
        for hook in self.hooks:
            hook.bind(self)
        interrupted = False
        saved: Path | None = None
        saved_step = -1
        bar = _progress_bar(self.total_steps, self.step, self.progress)
        batches: Iterator[Batch] | None = None
        batches_epoch = -1
        tick = time.perf_counter()
        try:
            with _deferred_interrupt() as interrupt:
                while self.step < self.total_steps:
                    epoch, index = divmod(self.step, self.steps_per_epoch)
                    if epoch != batches_epoch:
                        batches, batches_epoch = self.epoch_batches(epoch, index), epoch
                    self._train_step(next(batches))
                    bar.update(1)
                    if self.step % 20 == 0:
                        bar.set_postfix_str(self._postfix(), refresh=False)
                    if self.step % self.steps_per_epoch == 0 or self.step == self.total_steps:
                        self._epoch_stats["seconds"] += time.perf_counter() - tick
                        self._end_epoch(epoch)
                        tick = time.perf_counter()
                        bar.set_postfix_str(self._postfix(), refresh=True)
                        saved, saved_step = self.save_checkpoint(), self.step
                    if interrupt.requested:
                        if saved_step != self.step:
                            self._epoch_stats["seconds"] += time.perf_counter() - tick
                            saved, saved_step = self.save_checkpoint(), self.step
                        interrupted = True
                        where = f"checkpoint saved in {self.checkpoint_dir}" if saved else "no checkpoint folder: nothing saved"
                        logger.warning("interrupted after step %d of %d; %s", self.step, self.total_steps, where)
                        break
        finally:
            bar.close()
        return LoopOutcome(step=self.step, history=self.history, interrupted=interrupted, checkpoint=saved)

    def epoch_batches(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """The full training batches of ``epoch`` from batch ``start`` on: a pure function of
        (seed, epoch); a smaller (last) batch is dropped."""
        k = start
        for batch in self.train_data.batches(self.batch_size, seed=self.seed, epoch=epoch, start=start):
            if len(batch) != self.batch_size:
                continue
            yield batch
            k += 1
        if k < self.steps_per_epoch:
            raise OnnxdnsError(f"{self.train_data.name}: epoch {epoch + 1} gave {k} full batches of {self.batch_size}, "
                               f"the first gave {self.steps_per_epoch} (a data function must give the same batches "
                               "every time it is called)")

    def _check_shapes(self, batch: Batch) -> None:
        if self._shapes is None:
            return
        for name, shape in self._shapes.items():
            got = tuple(batch.inputs[name].shape)
            if got != shape:
                raise OnnxdnsError(f"{self.train_data.name}: a training batch gives input {name} shape {list(got)}; "
                                   f"the training model was built for the first batch's {list(shape)} (every "
                                   "training batch must have the same shape)")

    def _train_step(self, batch: Batch) -> list[np.ndarray]:
        """Hooks, one optimizer step on ``batch``, write-back, statistics."""
        step = self.step
        for hook in self.hooks:
            hook.before_step(step)
        self._check_shapes(batch)
        feeds, _ = self.feeder(batch)
        check = step == 0 and self.session.artifacts.optimizer == "sgd"  # can one SGD rate serve every layer?
        before = {n: self.session.get(n) for n in self.session.artifacts.trainable} if check else {}
        outputs = self.session.train_step(feeds, self.schedule(step))
        warning = conditioning.advice(conditioning.spread(before, self.session.gradients())) if check else None
        if warning:
            logger.warning("%s", warning)
        for name, param in self.writeback.items():
            self.session.set(param, outputs[self._writeback_index[name]])
        loss = float(outputs[0])
        if not math.isfinite(loss):
            raise OnnxdnsError(f"training diverged: the loss is {loss} at step {step + 1}; the model would output "
                               "NaN or infinity, so nothing is written (start over with a lower learning rate, "
                               "or check the input model's weights)")
        self.step = step + 1
        stats = self._epoch_stats
        n = len(batch)
        stats["loss"] += loss * n
        stats["count"] += n
        if self._logits_index is not None:
            stats["correct"] += int(np.count_nonzero(outputs[self._logits_index].argmax(axis=-1) == batch.labels))
        for hook in self.hooks:
            hook.after_step(step, outputs)
        return outputs

    def evaluate(self) -> tuple[float, float | None, dict[str, float]]:
        """(mean loss, accuracy or None, metrics) of the eval model on the validation source."""
        metrics = Metrics(self.feeder.loss)
        loss_sum, count = 0.0, 0
        if self.val_data is None:
            return float("nan"), None, {}
        for batch in self.val_data.batches(self.eval_batch_size):
            feeds, teacher = self.feeder(batch)
            outputs = self.session.eval_step(feeds)
            n = len(batch)
            loss_sum += float(outputs[0]) * n
            count += n
            if self._logits_index is not None and batch.labels is not None:
                metrics.add_accuracy(outputs[self._logits_index], batch.labels)
            if teacher is not None:
                metrics.add_fidelity({o: outputs[i] for o, i in self._output_index.items()}, teacher)
        values = metrics.values()
        return loss_sum / max(1, count), values.get("accuracy"), values

    def _end_epoch(self, epoch: int) -> None:
        stats = self._epoch_stats
        val_loss, val_acc, metrics = self.evaluate()
        count = max(1, stats["count"])
        self.history.append(EpochRecord(
            epoch=epoch + 1, step=self.step, lr=self.schedule(self.step - 1),
            train_loss=stats["loss"] / count,
            train_accuracy=stats["correct"] / count if self._logits_index is not None else None,
            val_loss=val_loss, val_accuracy=val_acc, metrics=metrics, val_split=self.val_split,
            density=self.masks.density(), total_density=self.masks.total_density(),
            seconds=stats["seconds"],
        ))
        self._epoch_stats = {"loss": 0.0, "correct": 0, "count": 0, "seconds": 0.0}

    def _postfix(self) -> str:
        parts = []
        stats = self._epoch_stats
        if stats["count"]:
            loss, train_acc = stats["loss"] / stats["count"], stats["correct"] / stats["count"]
        elif self.history:
            loss, train_acc = self.history[-1].train_loss, self.history[-1].train_accuracy
        if stats["count"] or self.history:
            parts.append(f"loss {loss:.3f}")
            if self._logits_index is not None and train_acc is not None:
                parts.append(f"train {train_acc:.1%}")
        if self.history:
            parts.append(headline(self.history[-1]))
        parts.append(f"lr {self.schedule(max(0, self.step - 1)):.3g}")
        if self.masks.layers:
            dens = " ".join(f"{_short(name)}:{d:.3f}".replace("0.", ".", 1) for name, d in self.masks.density().items())
            parts.append(f"dens {dens}")
        return " | ".join(parts)


def headline(record: EpochRecord) -> str:
    """The epoch's main validation figure: accuracy with labels, else agreement or cosine with the teacher."""
    short = "test" if record.val_split == "test" else "val"
    if record.val_accuracy is not None:
        return f"{short} {record.val_accuracy:.2%}"
    for key in ("agreement", "cosine"):
        found = [v for k, v in record.metrics.items() if k.startswith(key + "/")]
        if found:
            return f"{short} {key} {min(found):.4f}" if key == "cosine" else f"{short} {key} {min(found):.2%}"
    return f"{short} loss {record.val_loss:.4f}"


class Metrics:
    """Validation metrics of an epoch (see :class:`EpochRecord`), accumulated over batches with
    :mod:`onnxdns.metrics` (the definitions the evaluator of ONNX files uses too)."""

    def __init__(self, loss: LossSpec) -> None:
        self.loss = loss
        self.accuracy = Accuracy()
        self.fidelity = Fidelity(classifiers={o for o, c in zip(loss.outputs, loss.classifier) if c})

    def add_accuracy(self, logits: np.ndarray, labels: np.ndarray) -> None:
        self.accuracy.update(logits, labels)

    def add_fidelity(self, student: dict[str, np.ndarray], teacher: dict[str, np.ndarray]) -> None:
        self.fidelity.update({o: student[o] for o in self.loss.outputs}, teacher)

    def values(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.accuracy.value is not None:
            out["accuracy"] = self.accuracy.value
        for o, row in self.fidelity.result().items():
            if "top1_agreement" in row:
                out[f"agreement/{o}"] = row["top1_agreement"]
            out[f"rel_l2/{o}"] = row["relative_l2"]
            out[f"cosine/{o}"] = row["cosine"]
        return out


def checkpoint_paths(directory: str | os.PathLike) -> tuple[Path, Path]:
    """(onnxruntime checkpoint, trainer state) saved under ``directory`` by :meth:`Trainer.save_checkpoint`.

    Falls back to the previous checkpoint if a save was cut between its two renames.
    """
    base = Path(directory)
    for name in (STATE_DIR, f"{STATE_DIR}.old"):
        ort_ckpt, trainer_json = base / name / ORT_CHECKPOINT, base / name / TRAINER_STATE
        if ort_ckpt.exists() and trainer_json.exists():
            return ort_ckpt, trainer_json
    raise OnnxdnsError(f"{base}: no training checkpoint in this folder (expected {STATE_DIR}/{TRAINER_STATE})")


def has_checkpoint(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds a complete checkpoint (see :func:`checkpoint_paths`)."""
    try:
        checkpoint_paths(directory)
    except OnnxdnsError:
        return False
    return True


def read_checkpoint(directory: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """(onnxruntime checkpoint, trainer state) of ``directory``, verified: the state file is
    well-formed (known keys, right types) and the onnxruntime checkpoint has the SHA-256 recorded
    when it was saved. A damaged or tampered checkpoint is a one-line :class:`OnnxdnsError`."""
    ort_ckpt, trainer_json = checkpoint_paths(directory)

    def damaged(why: str) -> OnnxdnsError:
        return OnnxdnsError(f"{trainer_json}: damaged checkpoint ({why}); resume from a copy or start the run over")

    try:
        data = json.loads(trainer_json.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise damaged(f"unreadable JSON: {e}") from None
    if not isinstance(data, dict):
        raise damaged(f"expected a JSON object, got {type(data).__name__}")
    keys = {"step", "history", "epoch_stats", "hooks"}
    unknown, missing = set(data) - keys - {CHECKSUM_KEY}, keys - set(data)
    if unknown or missing:
        raise damaged("; ".join(filter(None, [f"unknown key(s) {', '.join(sorted(unknown))}" if unknown else "",
                                              f"missing key(s) {', '.join(sorted(missing))}" if missing else ""])))
    if type(data["step"]) is not int:
        raise damaged(f"step must be an integer, got {data['step']!r}")
    stats = data["epoch_stats"]
    if not isinstance(stats, dict) or set(stats) != {"loss", "correct", "count", "seconds"} or not all(
            type(v) in (int, float) for v in stats.values()):
        raise damaged("epoch_stats must hold the numbers loss, correct, count and seconds")
    if not isinstance(data["hooks"], list) or not isinstance(data["history"], list):
        raise damaged("history and hooks must be lists")
    try:
        data["history"] = [EpochRecord(**r) for r in data["history"]]
    except TypeError as e:
        raise damaged(f"history: {e}") from None
    if any(type(r.step) is not int for r in data["history"]):
        raise damaged("history steps must be integers")
    if CHECKSUM_KEY in data and data[CHECKSUM_KEY] != _sha256(ort_ckpt):
        raise OnnxdnsError(f"{ort_ckpt}: checkpoint weights do not match the checksum in {trainer_json.name} "
                           "(the file was changed or damaged); resume from a copy or start the run over")
    return ort_ckpt, data


def _sha256(path: Path) -> str:
    from onnxdns.modelio import file_sha256

    return file_sha256(path)


def _short(name: str) -> str:
    return name.rsplit("/", 1)[-1].rsplit(".", 1)[-1] if len(name) > 10 else name


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True,
                file=sys.stderr, smoothing=0.05, mininterval=0.5)


class _Interrupt:
    requested = False


@contextlib.contextmanager
def _deferred_interrupt() -> Iterator[_Interrupt]:
    """Turn the first SIGINT into a flag checked between steps; a second one raises at once."""
    flag = _Interrupt()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):  # noqa: ARG001 - signal handler signature
        if flag.requested:
            raise KeyboardInterrupt
        flag.requested = True
        logger.warning("interrupt: finishing the current step, then saving a checkpoint (Ctrl-C again to abort)")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def steps_for(epochs: float | None, iterations: int | None, steps_per_epoch: int) -> int:
    """Total optimizer steps from ``epochs`` or ``iterations`` (exactly one may be given)."""
    if epochs is not None and iterations is not None:
        raise OnnxdnsError("give epochs or iterations, not both")
    if iterations is not None:
        if iterations < 1:
            raise OnnxdnsError(f"iterations must be positive, got {iterations}")
        return int(iterations)
    if epochs is None or epochs <= 0:
        raise OnnxdnsError(f"epochs must be positive, got {epochs}")
    return max(1, math.ceil(epochs * steps_per_epoch))
