"""``train``: fine-tune an ONNX model with onnxruntime-training, pruning it with DNS or by magnitude.

Data come from any :mod:`onnxdns.sources` source (built-in data sets, folders of images, arrays,
data functions), validated on ``val_data`` or a held-out ``val_fraction``; the loss is
cross-entropy with labels or distillation from the input model without them
(:mod:`onnxdns.training.losses`). Any number of inputs and outputs; the training graph is built for
the first training batch's shapes, the output keeps the model's dynamic dimensions.

Methods:

* ``dns``: Dynamic Network Surgery (:mod:`onnxdns.training.dns`), straight-through gradients;
* ``magnitude``: Han et al.'s iterative magnitude pruning (:mod:`onnxdns.training.magnitude`);
* ``slim``: Network Slimming sparsity training, an L1 penalty on BatchNorm scales
  (:mod:`onnxdns.training.slim`);
* ``none``: plain training (no masks are added; masks already in the model stay frozen).

The output is an inference model with the input's graph and its masks as initializers read through
``Mul(W, mask)``, so ``onnxdns optimize`` folds and sparsifies it. Training state lives in a
checkpoint folder (default ``<output stem>.ckpt`` beside the output): the artifacts, the masked
model, the run configuration, and a checkpoint after every epoch and on Ctrl-C, from which
``resume=`` continues exactly.

BatchNormalization trains with batch statistics (``batchnorm="train"``, the default of ``slim``;
running statistics are written back into the checkpoint after every step) or with its stored
statistics (``"frozen"``, the default of the other methods); the output runs it in inference mode.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from onnxdns import modelio
from onnxdns.errors import OnnxdnsError
from onnxdns.training import artifacts as artifacts_mod
from onnxdns.training import batchnorm as batchnorm_mod
from onnxdns.sources import Batch, IndexedSource, Source, model_inputs, open_source
from onnxdns.training import losses
from onnxdns.training.config import BATCHNORM_MODES, DATASETS, DEFAULT_EPOCHS, SCHEDULES, TrainConfig
from onnxdns.training.loop import STATE_DIR, EpochRecord, Feeder, Trainer, has_checkpoint, read_checkpoint, steps_for
from onnxdns.training.methods import ArtifactOptions, get_method
from onnxdns.training.optim import OPTIMIZERS, LRSchedule
from onnxdns.training.gradops import MIN_OPSET as MIN_GRAD_OPSET, expand_for_gradients
from onnxdns.training.gradops import restore as restore_gradient_rewrites
from onnxdns.training.params import ParameterSet, lift_parameter_constants, select_parameters
from onnxdns.training.session import TrainingSession
from onnxdns.workflows.stages import jsonable

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
LOCK_FILE = ".lock"
MODEL_FILE = "model.onnx"
ARTIFACTS_DIR = "artifacts"
#: ``config.data`` of a run trained from a :class:`Source` object (its name follows).
SOURCE_PREFIX = "python:"


@dataclasses.dataclass
class TrainResult:
    """What :func:`train` did."""

    output: Path | None
    checkpoint_dir: Path
    method: str
    steps: int
    total_steps: int
    history: list[EpochRecord]
    final_accuracy: float | None  # validation accuracy after the last epoch (None without labels)
    #: The last epoch's validation metrics (accuracy, agreement, rel_l2, cosine: see EpochRecord).
    final_metrics: dict[str, float]
    loss: str
    loss_outputs: tuple[str, ...]
    val_split: str
    density: dict[str, float]
    total_density: float
    method_summary: dict[str, Any]
    interrupted: bool
    seconds: float


def train(
    input_path: str | os.PathLike | None = None,
    output_path: str | os.PathLike | None = None,
    *,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: str | os.PathLike | None = None,
    progress: bool = True,
    threads: int = 0,
    data_dir: str | os.PathLike | None = None,
    eval_batch_size: int | None = None,
    teacher: str | os.PathLike | None = None,
    **options: Any,
) -> TrainResult:
    """Train ``input_path`` and write the result to ``output_path``.

    ``options`` are :class:`TrainConfig` fields (``method="dns"``, ``epochs=`` or ``iterations=``,
    ``batch_size=64``, ``lr``, ``momentum``, ``weight_decay``, ``schedule``, ``seed``, ``subset``,
    DNS and magnitude settings...). Data and loss: ``data=`` ``mnist|fashion-mnist|DIR|FILE.npz|
    FILE.npy|file.py:fn`` or a :class:`~onnxdns.sources.Source` (its name is recorded; give it
    again on resume), ``val_data=`` or ``val_fraction=``, ``loss="ce"|"distill"``,
    ``loss_outputs=[...]``, ``temperature=``, ``mean=``/``std=`` (see :class:`TrainConfig`).
    With ``resume=DIR`` the run stored in DIR continues: options default to the stored ones, and
    one that would change the trajectory is an error. ``teacher``: the model distillation learns
    from (default: ``input_path``). ``eval_batch_size``: validation batch size (default 1000 for
    the built-in data sets, else the training batch size).
    Bad input raises :class:`OnnxdnsError` with a one-line message.
    """
    start_time = time.perf_counter()
    options = dict(options)
    sources = {}
    for key in ("data", "val_data"):
        value = options.get(key)
        if isinstance(value, Source):
            sources[key] = value
            options[key] = f"{SOURCE_PREFIX}{value.name}"
        elif isinstance(value, (str, os.PathLike)) and value not in DATASETS and os.path.exists(value):
            options[key] = os.path.abspath(value)  # run.json names it wherever the run is resumed from
    config, input_path, output_path, ckpt_dir = _resolve(input_path, output_path, checkpoint_dir, resume, options)
    out = Path(output_path)
    modelio.check_output(out, input_path)
    locks = [_lock(ckpt_dir)] if ckpt_dir.is_dir() else []  # refuses a folder another run is using
    try:
        if resume is None and (ckpt_dir / RUN_FILE).exists():  # _resolve refused a folder with a checkpoint
            _clear_unstarted_run(ckpt_dir)
        return _train(config, input_path, out, ckpt_dir, resume, locks, start_time, progress=progress,
                      threads=threads, data_dir=data_dir, eval_batch_size=eval_batch_size, sources=sources,
                      teacher=Path(teacher) if teacher is not None else input_path)
    finally:
        for lock in locks:
            lock.close()


def _train(config: TrainConfig, input_path: Path, out: Path, ckpt_dir: Path, resume, locks: list, start_time: float, *,
           progress: bool, threads: int, data_dir, eval_batch_size: int | None, sources: dict,
           teacher: Path) -> TrainResult:
    """The body of :func:`train` once the run folder is resolved and locked."""
    method = get_method(config)
    if resume is None:
        original = modelio.load_model(input_path)
        _loss_spec(config, original, None)  # model misfits first, before any data is read
        # weights in Constant nodes are trained too; HardSigmoid has no gradient in onnxruntime 1.19;
        # BatchNorm in training mode needs opset 14 (older models are converted)
        bn_train = (config.batchnorm or method.batchnorm) == "train"
        model = method.prepare(expand_for_gradients(lift_parameter_constants(original),
                                                    batchnorm_mod.MIN_OPSET if bn_train else MIN_GRAD_OPSET))
        if bn_train:
            model = batchnorm_mod.to_training_mode(model)
        else:  # onnxruntime would train an inference-mode BN with batch statistics
            model = batchnorm_mod.to_frozen_affine(model)
        run_info = {"config": dataclasses.asdict(config), "input_sha256": modelio.file_sha256(input_path),
                    "input_path": str(input_path), "output_path": str(out)}
    else:
        model = modelio.load_model(ckpt_dir / MODEL_FILE)
    params = select_parameters(model)
    method_options = method.artifact_options(params)
    if method.needs_masks and not params.layers:
        raise OnnxdnsError(f"{input_path}: no Conv/Gemm/MatMul weight to prune")

    data = open_data(config, model, data_dir, sources)
    loss_spec = _loss_spec(config, model, data.train.has_labels)
    classes = losses.num_classes(model, loss_spec.outputs[0]) if loss_spec.kind == "ce" else None
    if loss_spec.kind == "ce":
        for src in (data.train, data.val):
            check_label_range(src, classes, loss_spec.outputs[0])
    teacher_session = _teacher(teacher, threads) if loss_spec.kind == "distill" else None
    feeder = Feeder([i.name for i in data.inputs], loss_spec, teacher=teacher_session, num_classes=classes,
                    data_name=data.train.name)
    first = data.first
    batch_size = len(first)
    steps_per_epoch = data.steps_per_epoch
    total_steps = steps_for(config.epochs if config.iterations is None else None, config.iterations, steps_per_epoch)
    feeder(first)  # the loss's feeds of a batch (labels in range, the teacher runs) before anything is written
    if data.val is not None:
        feeder(next(iter(data.val.batches(1))))
    if eval_batch_size is None:
        eval_batch_size = 1000 if config.data in DATASETS else batch_size

    if resume is None:
        created = not ckpt_dir.exists()
        try:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OnnxdnsError(f"{ckpt_dir}: cannot create the checkpoint folder: {e.strerror or e}") from None
        if not locks:
            locks.append(_lock(ckpt_dir))  # released by train()
        try:
            shapes = {name: tuple(first.inputs[name].shape) for name in (i.name for i in data.inputs)}
            art = artifacts_mod.generate(model, ckpt_dir / ARTIFACTS_DIR,
                                         artifact_spec(config, params, model, method_options, loss_spec),
                                         input_shapes=shapes)
            modelio.save_model(model, ckpt_dir / MODEL_FILE)
            (ckpt_dir / RUN_FILE).write_text(json.dumps(run_info, indent=1))
            session = TrainingSession(art, threads=threads)
        except BaseException:
            if created:  # no half-made run folder left behind
                for lock in locks:
                    lock.close()
                locks.clear()
                shutil.rmtree(ckpt_dir, ignore_errors=True)
            raise
    else:
        art = artifacts_mod.Artifacts.load(ckpt_dir / ARTIFACTS_DIR)
        ort_ckpt, state = read_checkpoint(ckpt_dir)  # verified (hashed) once, before onnxruntime reads it
        session = TrainingSession(art, ort_ckpt, threads=threads)

    schedule = LRSchedule(config.schedule, config.lr, total_steps, gamma=config.lr_gamma, step_size=config.lr_step)
    hooks = method.hooks(params, total_steps)
    trainer = Trainer(
        session, data.train, data.val, feeder=feeder, batch_size=batch_size, steps_per_epoch=steps_per_epoch,
        total_steps=total_steps, schedule=schedule, layers=params.layers, hooks=hooks,
        writeback={k: params.writeback[k] for k in art.train_only_outputs}, seed=config.seed, checkpoint_dir=ckpt_dir,
        eval_batch_size=eval_batch_size, progress=progress, val_split=data.val_split,
    )
    if resume is not None:
        trainer.load_state(ckpt_dir, state)
    outcome = trainer.run()

    written = None
    if not outcome.interrupted:
        final = restore_gradient_rewrites(batchnorm_mod.from_frozen_affine(
            batchnorm_mod.to_inference_mode(inference_model(model, session))))
        written = modelio.save_model(final, out, protect=(input_path,))
    summary: dict[str, Any] = {}
    for hook in hooks:
        summary.update(hook.summary())
    last = outcome.history[-1] if outcome.history else None
    return TrainResult(
        output=written, checkpoint_dir=ckpt_dir, method=config.method, steps=outcome.step, total_steps=total_steps,
        history=outcome.history, final_accuracy=last.val_accuracy if last else None,
        final_metrics=dict(last.metrics) if last else {}, loss=loss_spec.kind, loss_outputs=loss_spec.outputs,
        val_split=data.val_split,
        density=trainer.masks.density(), total_density=trainer.masks.total_density(), method_summary=summary,
        interrupted=outcome.interrupted, seconds=time.perf_counter() - start_time,
    )


# --------------------------------------------------------------------------- data


@dataclasses.dataclass
class RunData:
    """The sources of a run: ``train``, ``val`` (None: no validation), which split ``val`` is
    (``test`` for the built-in sets' test split, else ``validation``), the model's inputs, the
    first training batch (it fixes the training model's shapes) and the steps of one epoch."""

    train: Source
    val: Source | None
    val_split: str
    inputs: list
    first: Batch
    steps_per_epoch: int


def open_data(config: TrainConfig, model: onnx.ModelProto, data_dir=None, sources: dict | None = None) -> RunData:
    """Open the run's training and validation sources (see :class:`TrainConfig`)."""
    sources = sources or {}
    inputs = model_inputs(model)
    opts = {"mean": config.mean, "std": config.std, "data_dir": data_dir}

    def source(key: str, split: str) -> Source:
        spec = getattr(config, key)
        if spec.startswith(SOURCE_PREFIX):
            if key not in sources:
                raise OnnxdnsError(f"{key}: this run was trained from a Python source ({spec[len(SOURCE_PREFIX):]}); "
                                   f"pass it again as {key}=")
            return sources[key]
        return open_source(spec, inputs, split=split, **opts)

    builtin = config.data in DATASETS
    train_src = source("data", "train")
    if config.val_data is not None:
        val_src, split = source("val_data", "test"), "test" if config.val_data in DATASETS else "validation"
    elif config.val_fraction is not None or not builtin:
        fraction = 0.1 if config.val_fraction is None else config.val_fraction
        train_src, val_src = train_src.split(fraction, seed=config.seed)
        split = "validation"
    else:
        val_src, split = open_source(config.data, inputs, split="test", **opts), "test"
    if config.subset is not None:
        train_src = _sample(train_src, config.subset, config.seed, "subset")
    if config.test_subset is not None and val_src is not None:
        val_src = _sample(val_src, config.test_subset, config.seed, "test_subset")
    if train_src.has_labels and val_src is not None and not val_src.has_labels and (config.loss or "ce") == "ce":
        raise OnnxdnsError(f"{val_src.name}: the validation data has no labels, the training data has")

    n = train_src.length()
    if n is not None:
        if n < config.batch_size:
            raise OnnxdnsError(f"batch size {config.batch_size} is larger than the training set ({n} samples)")
        first = next(iter(train_src.batches(config.batch_size, seed=config.seed, epoch=0)))
        steps = n // config.batch_size
    else:  # a data function: its batches as they come, counted once (smaller ones, e.g. the last, dropped)
        first = next(iter(train_src.batches(config.batch_size)), None)
        if first is None:
            raise OnnxdnsError(f"{train_src.name}: gave no batches")
        steps = sum(1 for b in train_src.batches(config.batch_size) if len(b) == len(first))
        log.info("%s: %d batches of %d samples per epoch", train_src.name, steps, len(first))
    return RunData(train_src, val_src, split, inputs, first, steps)


def _sample(src: Source, count: int, seed: int, what: str) -> Source:
    if not isinstance(src, IndexedSource):
        raise OnnxdnsError(f"{what}: {src.name} is a data function; it cannot be subsampled")
    if count >= len(src):
        return src
    return src.sample(count, seed, f"{src.name} ({count} samples)")


def check_label_range(src: Source | None, classes: int | None, output: str) -> None:
    """Every label of an indexed source in ``0..classes-1`` (a data function's are checked per batch)."""
    if src is None or classes is None or not src.has_labels or not isinstance(src, IndexedSource):
        return
    labels = getattr(src, "labels", None)
    if labels is None and hasattr(src, "dataset"):
        labels = np.asarray(src.dataset.labels)
    if labels is None:
        return
    labels = np.asarray(labels)[src.indices]
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        bad = int(labels.min()) if labels.min() < 0 else int(labels.max())
        raise OnnxdnsError(f"{src.name}: label {bad} out of range 0..{classes - 1} (the model's output {output} has "
                           f"{classes} classes)")


def _loss_spec(config: TrainConfig, model: onnx.ModelProto, has_labels: bool | None) -> losses.LossSpec:
    """The run's loss; ``has_labels=None``: checks that do not need the data only."""
    if has_labels is None:  # labels unknown yet: check the outputs only (ce's label check waits for the data)
        return losses.choose(model, loss=config.loss or "distill", loss_outputs=config.loss_outputs, has_labels=True,
                             temperature=config.temperature)
    return losses.choose(model, loss=config.loss, loss_outputs=config.loss_outputs, has_labels=has_labels,
                         temperature=config.temperature)


def _teacher(path: Path, threads: int):
    from onnxdns.runtime import make_session, ort_message

    try:
        return make_session(path, threads=threads)
    except OnnxdnsError:
        raise
    except Exception as e:
        raise OnnxdnsError(f"{path}: cannot run the teacher model: {ort_message(e)}") from None


# --------------------------------------------------------------------------- pieces


def artifact_spec(config: TrainConfig, params: ParameterSet, model: onnx.ModelProto, options: ArtifactOptions,
                  loss_spec: losses.LossSpec | None = None) -> artifacts_mod.ArtifactSpec:
    """The artifacts a run of ``config`` needs for ``model``: the loss of ``loss_spec`` (default:
    cross-entropy on the classifier output) plus the method's penalty; both models return the
    loss outputs after the loss."""
    if loss_spec is None:
        loss_spec = _loss_spec(config, model, True)
    reach = reachable(model, loss_spec.outputs)
    penalty_inputs = set(getattr(options.penalty, "scales", ()))
    unused = [p for p in params.trainable if p not in reach and p not in penalty_inputs]
    if unused:  # onnxruntime refuses a gradient that does not reach the loss
        log.info("not trained (the loss outputs do not depend on them): %s", ", ".join(unused))
    trainable = tuple(p for p in params.trainable if p not in unused)
    return artifacts_mod.ArtifactSpec(
        trainable=trainable, frozen=tuple(params.frozen) + tuple(unused),
        straight_through={p: m for p, m in options.straight_through.items() if p in trainable},
        momentum=config.momentum, weight_decay=config.weight_decay, optimizer=config.optimizer,
        loss=losses.block_factory(loss_spec, options.penalty),
        outputs=tuple(loss_spec.outputs), train_only_outputs=tuple(params.writeback),
    )


def reachable(model: onnx.ModelProto, outputs) -> set[str]:
    """Names of the values (initializers included) that ``outputs`` depend on."""
    producer = {o: n for n in model.graph.node for o in n.output}
    seen: set[str] = set()
    todo = list(outputs)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        node = producer.get(name)
        if node is not None:
            todo.extend(i for i in node.input if i)
            for attr in node.attribute:  # a subgraph (If, Loop) reads outer values by name
                for g in [attr.g] if attr.HasField("g") else list(attr.graphs):
                    todo.extend(i for n in g.node for i in n.input if i)
    return seen


def inference_model(model: onnx.ModelProto, session: TrainingSession) -> onnx.ModelProto:
    """``model`` with every initializer the session trains or holds frozen replaced by its value."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for i, init in enumerate(out.graph.initializer):
        if init.name in session:
            dtype = numpy_helper.to_array(init).dtype
            out.graph.initializer[i].CopyFrom(numpy_helper.from_array(session.get(init.name).astype(dtype), init.name))
    return out


def _resolve(input_path, output_path, checkpoint_dir, resume, options) -> tuple[TrainConfig, Path, Path, Path]:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(options) - fields
    if unknown:
        raise TypeError(f"train() got unexpected option(s): {', '.join(sorted(unknown))}")
    given = {k: list(v) if isinstance(v, tuple) else v for k, v in options.items() if v is not None}
    if resume is None:
        if input_path is None or output_path is None:
            raise OnnxdnsError("train: an input model and an output path are required (or resume=DIR)")
        config = TrainConfig(**given)
        _validate(config)
        out = Path(output_path)
        ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else out.with_name(f"{out.stem}.ckpt")
        if ckpt.exists() and not ckpt.is_dir():
            raise OnnxdnsError(f"{ckpt}: exists and is not a folder; give a checkpoint folder")
        if (ckpt / RUN_FILE).exists() and has_checkpoint(ckpt):  # without one, train() starts it over
            raise OnnxdnsError(f"{ckpt}: already holds a training run; resume it, delete the folder, or choose "
                               "another checkpoint folder")
        return config, Path(input_path), out, ckpt
    ckpt = Path(resume)
    run_file = ckpt / RUN_FILE
    if not run_file.exists():
        raise OnnxdnsError(f"{ckpt}: not a training checkpoint folder (no {RUN_FILE})")
    if checkpoint_dir is not None and Path(checkpoint_dir).resolve() != ckpt.resolve():
        raise OnnxdnsError("resume: checkpoints continue in the resumed folder; do not give another checkpoint folder")
    if not has_checkpoint(ckpt):
        raise OnnxdnsError(f"{ckpt}: the run stopped before its first checkpoint, there is nothing to resume; "
                           "start it over with the same command without --resume (the folder is reused)")
    run, saved = _read_run(run_file)
    for key, value in given.items():
        if getattr(saved, key) != value:
            raise OnnxdnsError(f"resume: {key}={value!r} differs from the checkpoint's {getattr(saved, key)!r}")
    if input_path is not None and Path(input_path).exists() and modelio.file_sha256(input_path) != run["input_sha256"]:
        raise OnnxdnsError(f"resume: {input_path} is not the model this checkpoint was trained from")
    src = Path(input_path) if input_path is not None else Path(run["input_path"])
    out = Path(output_path) if output_path is not None else Path(run["output_path"])
    return saved, src, out, ckpt


def _read_run(run_file: Path) -> tuple[dict[str, Any], TrainConfig]:
    """``run.json`` of a checkpoint folder and its configuration, checked like a new run's."""
    try:
        run = json.loads(run_file.read_text())
        if not isinstance(run, dict) or not isinstance(run.get("config"), dict):
            raise ValueError("no 'config' object")
        for key in ("input_sha256", "input_path", "output_path"):
            if not isinstance(run.get(key), str):
                raise ValueError(f"'{key}' must be a string")
        saved = TrainConfig(**run["config"])
        _validate(saved)
    except (OSError, UnicodeDecodeError, ValueError, TypeError, OnnxdnsError) as e:
        raise OnnxdnsError(f"{run_file}: damaged run file ({e}); start the run over") from None
    return run, saved


def _lock(ckpt: Path):
    """An exclusive lock on the run folder ``ckpt`` (held by the returned open file; the
    operating system drops it when the process dies, even by SIGKILL)."""
    import fcntl

    try:
        fh = open(ckpt / LOCK_FILE, "a+b")
    except OSError as e:
        raise OnnxdnsError(f"{ckpt}: cannot use the checkpoint folder: {e.strerror or e}") from None
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.close()
        raise OnnxdnsError(f"{ckpt}: another onnxdns training run is using this folder; wait for it to end or "
                           "choose another checkpoint folder") from None
    return fh


def _clear_unstarted_run(ckpt: Path) -> None:
    """Remove what a run killed before its first checkpoint left in ``ckpt`` (only onnxdns's files)."""
    log.warning("%s: holds a run stopped before its first checkpoint; starting it over", ckpt)
    for name in (RUN_FILE, MODEL_FILE):
        (ckpt / name).unlink(missing_ok=True)
    for name in (ARTIFACTS_DIR, STATE_DIR, f"{STATE_DIR}.tmp", f"{STATE_DIR}.old"):
        shutil.rmtree(ckpt / name, ignore_errors=True)


def _validate(config: TrainConfig) -> None:
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise OnnxdnsError(f"{f.name} must be a finite number, got {value}")
    for name, low in (("seed", 0), ("iterations", 1), ("lr_step", 1), ("dns_iter_stop", 0), ("rounds", 1)):
        value = getattr(config, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise OnnxdnsError(f"{name} must be an integer >= {low}, got {value!r}")
    for name in ("lr", "lr_gamma", "smooth_l1", "epochs"):
        value = getattr(config, name)
        if value is not None and not value > 0:
            raise OnnxdnsError(f"{name} must be positive, got {value}")
    for name in ("dns_gamma", "dns_power", "slim_lambda", "quality"):
        value = getattr(config, name)
        if value is not None and value < 0:
            raise OnnxdnsError(f"{name} must be >= 0, got {value}")
    for name in ("data", "val_data"):
        value = getattr(config, name)
        if value is not None and (not isinstance(value, str) or not value):
            raise OnnxdnsError(f"{name} must be a data source (mnist, fashion-mnist, a folder, FILE.npz, FILE.npy, "
                               f"module:function), got {value!r}")
    if config.val_data is not None and config.val_fraction is not None:
        raise OnnxdnsError("give a validation source or a validation fraction, not both")
    if config.val_fraction is not None and not 0 < config.val_fraction < 1:
        raise OnnxdnsError(f"validation fraction must be between 0 and 1, got {config.val_fraction}")
    if config.loss is not None and config.loss not in losses.LOSSES:
        raise OnnxdnsError(f"unknown loss '{config.loss}'; choose one of: {', '.join(losses.LOSSES)}")
    if config.temperature is not None and not config.temperature > 0:
        raise OnnxdnsError(f"temperature must be positive, got {config.temperature}")
    for name in ("loss_outputs", "mean", "std"):
        value = getattr(config, name)
        if isinstance(value, (str, float, int)):
            value = [value]
        if value is not None:
            setattr(config, name, list(value))
    if config.batchnorm is not None and config.batchnorm not in BATCHNORM_MODES:
        raise OnnxdnsError(f"unknown batchnorm mode '{config.batchnorm}'; choose one of: {', '.join(BATCHNORM_MODES)}")
    if config.schedule not in SCHEDULES:
        raise OnnxdnsError(f"unknown schedule '{config.schedule}'; choose one of: {', '.join(SCHEDULES)}")
    if config.batch_size < 1:
        raise OnnxdnsError(f"batch size must be positive, got {config.batch_size}")
    if config.epochs is not None and config.iterations is not None:
        raise OnnxdnsError("give epochs or iterations, not both")
    if config.epochs is None and config.iterations is None:
        config.epochs = DEFAULT_EPOCHS
    if config.optimizer not in OPTIMIZERS:
        raise OnnxdnsError(f"unknown optimizer '{config.optimizer}'; choose one of: {', '.join(OPTIMIZERS)}")
    if not 0.0 <= config.momentum < 1.0:
        raise OnnxdnsError(f"momentum must be in [0, 1), got {config.momentum}")
    if config.weight_decay < 0:
        raise OnnxdnsError(f"weight decay must be >= 0, got {config.weight_decay}")
    if config.dns_ramp < 0:
        raise OnnxdnsError(f"dns ramp must be >= 0 steps, got {config.dns_ramp}")
    for name in ("subset", "test_subset"):
        value = getattr(config, name)
        if value is not None and value < 1:
            raise OnnxdnsError(f"{name} must be positive, got {value}")




# --------------------------------------------------------------------------- a cached stage


def train_stage(src: str | os.PathLike, dst: str | os.PathLike, ckpt: str | os.PathLike, options: Mapping[str, Any],
                **runtime: Any):
    """:func:`train` of ``src`` into ``dst`` with checkpoints in ``ckpt``, resumed
    when ``ckpt`` holds a run of the same model with the same ``options`` (``TrainConfig`` fields),
    started again otherwise. ``runtime``: ``progress``, ``threads``, ``data_dir``, ``teacher``."""
    src, ckpt = Path(src), Path(ckpt)
    run = ckpt / RUN_FILE
    if run.exists():
        try:
            info = json.loads(run.read_text())
            same = info["input_sha256"] == modelio.file_sha256(src) and all(
                info["config"].get(k) == v for k, v in jsonable(options).items())
        except (ValueError, KeyError, TypeError):
            same = False
        if same:
            return train(src, dst, resume=ckpt, **runtime)
    if ckpt.exists():
        shutil.rmtree(ckpt)
    return train(src, dst, checkpoint_dir=ckpt, **runtime, **options)
