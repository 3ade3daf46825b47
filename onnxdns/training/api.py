"""``train``: fine-tune an ONNX classifier with onnxruntime-training, pruning it with DNS or by magnitude.

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
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from onnxdns import modelio
from onnxdns.errors import OnnxdnsError
from onnxdns.training import artifacts as artifacts_mod
from onnxdns.training import batchnorm as batchnorm_mod
from onnxdns.training.config import BATCHNORM_MODES, DATASETS, DEFAULT_EPOCHS, SCHEDULES, TrainConfig
from onnxdns.training.loop import STATE_DIR, Dataset, EpochRecord, Trainer, has_checkpoint, read_checkpoint, steps_for
from onnxdns.training.methods import ArtifactOptions, get_method
from onnxdns.training.optim import LRSchedule
from onnxdns.training.params import ParameterSet, select_parameters
from onnxdns.training.session import TrainingSession

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
LOCK_FILE = ".lock"
MODEL_FILE = "model.onnx"
ARTIFACTS_DIR = "artifacts"


@dataclasses.dataclass
class TrainResult:
    """What :func:`train` did."""

    output: Path | None
    checkpoint_dir: Path
    method: str
    steps: int
    total_steps: int
    history: list[EpochRecord]
    final_accuracy: float | None
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
    eval_batch_size: int = 1000,
    **options: Any,
) -> TrainResult:
    """Train ``input_path`` and write the result to ``output_path``.

    ``options`` are :class:`TrainConfig` fields (``method="dns"``, ``epochs=`` or ``iterations=``,
    ``batch_size=64``, ``lr``, ``momentum``, ``weight_decay``, ``schedule``, ``seed``, ``subset``,
    DNS and magnitude settings...). With ``resume=DIR`` the run stored in DIR continues: options
    default to the stored ones, and one that would change the trajectory is an error.
    Bad input raises :class:`OnnxdnsError` with a one-line message.
    """
    start_time = time.perf_counter()
    config, input_path, output_path, ckpt_dir = _resolve(input_path, output_path, checkpoint_dir, resume, options)
    out = Path(output_path)
    _check_output(out, input_path)
    locks = [_lock(ckpt_dir)] if ckpt_dir.is_dir() else []  # refuses a folder another run is using
    try:
        if resume is None and (ckpt_dir / RUN_FILE).exists():  # _resolve refused a folder with a checkpoint
            _clear_unstarted_run(ckpt_dir)
        return _train(config, input_path, out, ckpt_dir, resume, locks, start_time, progress=progress,
                      threads=threads, data_dir=data_dir, eval_batch_size=eval_batch_size)
    finally:
        for lock in locks:
            lock.close()


def _train(config: TrainConfig, input_path: Path, out: Path, ckpt_dir: Path, resume, locks: list, start_time: float, *,
           progress: bool, threads: int, data_dir, eval_batch_size: int) -> TrainResult:
    """The body of :func:`train` once the run folder is resolved and locked."""
    method = get_method(config)
    if resume is None:
        model = method.prepare(modelio.load_model(input_path))
        if (config.batchnorm or method.batchnorm) == "train":
            model = batchnorm_mod.to_training_mode(model)
        run_info = {"config": dataclasses.asdict(config), "input_sha256": modelio.file_sha256(input_path),
                    "input_path": str(input_path), "output_path": str(out)}
    else:
        model = modelio.load_model(ckpt_dir / MODEL_FILE)
    params = select_parameters(model)
    method_options = method.artifact_options(params)
    if method.needs_masks and not params.layers:
        raise OnnxdnsError(f"{input_path}: no Conv/Gemm/MatMul weight to prune")

    train_set, test_set = _load_data(config, model, data_dir)
    steps_per_epoch = len(train_set) // config.batch_size
    if steps_per_epoch < 1:
        raise OnnxdnsError(f"batch size {config.batch_size} is larger than the training set ({len(train_set)} samples)")
    total_steps = steps_for(config.epochs if config.iterations is None else None, config.iterations, steps_per_epoch)

    if resume is None:
        try:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OnnxdnsError(f"{ckpt_dir}: cannot create the checkpoint folder: {e.strerror or e}") from None
        if not locks:
            locks.append(_lock(ckpt_dir))  # released by train()
        art = artifacts_mod.generate(model, ckpt_dir / ARTIFACTS_DIR, artifact_spec(config, params, model, method_options),
                                     batch_size=config.batch_size)
        modelio.save_model(model, ckpt_dir / MODEL_FILE)
        (ckpt_dir / RUN_FILE).write_text(json.dumps(run_info, indent=1))
        session = TrainingSession(art, threads=threads)
    else:
        art = artifacts_mod.Artifacts.load(ckpt_dir / ARTIFACTS_DIR)
        ort_ckpt, state = read_checkpoint(ckpt_dir)  # verified (hashed) once, before onnxruntime reads it
        session = TrainingSession(art, ort_ckpt, threads=threads)

    schedule = LRSchedule(config.schedule, config.lr, total_steps, gamma=config.lr_gamma, step_size=config.lr_step)
    hooks = method.hooks(params, total_steps)
    trainer = Trainer(
        session, train_set, test_set, batch_size=config.batch_size, total_steps=total_steps, schedule=schedule,
        layers=params.layers, hooks=hooks, writeback={k: params.writeback[k] for k in art.train_only_outputs},
        seed=config.seed, checkpoint_dir=ckpt_dir, eval_batch_size=eval_batch_size, progress=progress,
    )
    if resume is not None:
        trainer.load_state(ckpt_dir, state)
    outcome = trainer.run()

    written = None
    if not outcome.interrupted:
        final = batchnorm_mod.to_inference_mode(inference_model(model, session))
        written = modelio.save_model(final, out, protect=(input_path,))
    summary: dict[str, Any] = {}
    for hook in hooks:
        summary.update(hook.summary())
    return TrainResult(
        output=written, checkpoint_dir=ckpt_dir, method=config.method, steps=outcome.step, total_steps=total_steps,
        history=outcome.history, final_accuracy=outcome.history[-1].test_accuracy if outcome.history else None,
        density=trainer.masks.density(), total_density=trainer.masks.total_density(), method_summary=summary,
        interrupted=outcome.interrupted, seconds=time.perf_counter() - start_time,
    )


# --------------------------------------------------------------------------- pieces


def artifact_spec(config: TrainConfig, params: ParameterSet, model: onnx.ModelProto,
                  options: ArtifactOptions) -> artifacts_mod.ArtifactSpec:
    """The artifacts a run of ``config`` needs for ``model`` (its one output feeds the loss)."""
    return artifacts_mod.ArtifactSpec(
        trainable=tuple(params.trainable), frozen=tuple(params.frozen), straight_through=options.straight_through,
        momentum=config.momentum, weight_decay=config.weight_decay, loss=options.loss,
        outputs=(model.graph.output[0].name,), train_only_outputs=tuple(params.writeback),
    )


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
    given = {k: v for k, v in options.items() if v is not None}
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
    if config.data not in DATASETS:
        raise OnnxdnsError(f"unknown data '{config.data}'; choose one of: {', '.join(DATASETS)}")
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


def _check_output(out: Path, src: Path) -> None:
    if out.exists() and src.exists() and os.path.samefile(out, src):
        raise OnnxdnsError(f"{out}: refusing to overwrite the input model; choose another output path")
    modelio.check_output_file(out)


def _load_data(config: TrainConfig, model: onnx.ModelProto, data_dir) -> tuple[Dataset, Dataset]:
    from onnxdns.data import load_dataset, subset

    try:
        train_ds = load_dataset(config.data, split="train", data_dir=data_dir)
        test_ds = load_dataset(config.data, split="test", data_dir=data_dir)
    except OSError as e:
        raise OnnxdnsError(f"{config.data} data unavailable: {e.strerror or e}"
                           + (f": {e.filename}" if getattr(e, "filename", None) else "")) from None
    if config.subset is not None and config.subset < len(train_ds.labels):
        train_ds = subset(train_ds, config.subset, config.seed)
    if config.test_subset is not None and config.test_subset < len(test_ds.labels):
        test_ds = subset(test_ds, config.test_subset, config.seed)
    shape = _input_shape(model)
    classes = _num_classes(model)
    for ds in (train_ds, test_ds):
        if classes is not None and int(ds.labels.max()) >= classes:
            raise OnnxdnsError(f"model has {classes} outputs but {config.data} has labels up to {int(ds.labels.max())}")
    return _fit(train_ds, shape, config.data), _fit(test_ds, shape, config.data)


def _input_shape(model: onnx.ModelProto) -> tuple[int | None, ...]:
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise OnnxdnsError(f"training needs a model with one input (images), this one has {len(inputs)}")
    dims = inputs[0].type.tensor_type.shape.dim
    shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in dims)
    if shape and shape[0] not in (None, 0):
        raise OnnxdnsError(f"model input has a fixed batch size {shape[0]}; re-export it with a dynamic batch dimension")
    return shape


def _num_classes(model: onnx.ModelProto) -> int | None:
    dims = model.graph.output[0].type.tensor_type.shape.dim
    if len(dims) != 2:
        raise OnnxdnsError(f"training needs a classifier whose output is [batch, classes], this one has rank {len(dims)}")
    return dims[1].dim_value if dims[1].HasField("dim_value") else None


def _fit(ds, shape: tuple[int | None, ...], name: str) -> Dataset:
    images = np.ascontiguousarray(ds.images, dtype=np.float32)
    labels = np.ascontiguousarray(ds.labels, dtype=np.int64)
    sample = shape[1:]
    if all(d is not None for d in sample):
        if int(np.prod(sample)) != int(np.prod(images.shape[1:])):
            raise OnnxdnsError(f"model input {list(shape)} does not fit {name} images {list(images.shape[1:])}")
        images = images.reshape((images.shape[0], *sample))
    return Dataset(images, labels)
