"""Network Slimming end to end (Liu et al., ICCV 2017): sparsity training, pruning, fine-tuning, optimize.

:func:`slim` runs four stages on an ONNX classifier with BatchNormalization or convolutions (whose
BatchNorm an eval-mode export folded), each writing one
model into a work folder (default ``<output stem>.slim`` beside the output):

1. ``sparse``: train with ``loss + slim_lambda * sum |gamma|`` over every BatchNorm scale
   (:mod:`onnxdns.training.slim`; BatchNorm in training mode), and over the per-channel scales
   ``insert-channel-scales`` puts after each Conv without BatchNorm (the usual eval-mode export
   folds BatchNorm into the convs) -> ``sparse.onnx``;
2. ``prune``: ``slim-channels`` removes the channel groups whose |gamma| is below a global
   threshold (the ``prune_ratio`` quantile of all prunable BN channels, or ``threshold``), keeping
   coupled channels (residual adds, concat, depthwise, grouped convs) whole, at least
   ``max(min_keep, ceil(min_keep_ratio x channels))`` per layer, counts rounded up to a multiple
   of ``round_to``; then ``fold-channel-scales`` folds the inserted scales into the convs ->
   ``pruned.onnx`` (no scale left to fine-tune or to ship);
3. ``finetune``: plain training of the slimmed model in the same loop (BatchNorm in training
   mode) -> ``finetuned.onnx``;
4. ``optimize``: the target pipeline (``onnxdns optimize``: BatchNorm folded, cleaned up),
   validated against the fine-tuned model -> the output.

Stages are restartable: a stage whose settings (and those of the stages before it) match the
ones recorded in ``<work>/slim.json`` and whose model exists is skipped; an interrupted training
stage resumes from its checkpoint; a stage whose settings changed is redone with every stage
after it (so several prune ratios can share one sparsity training). ``fresh=True`` starts over.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnx

from onnxdns import modelio, pipelines
from onnxdns.errors import OnnxdnsError
from onnxdns.stats import model_stats
from onnxdns.training.config import DATASETS, DEFAULT_SLIM_LAMBDA

MANIFEST = "slim.json"
#: The stages whose models are kept and reused (``optimize`` always runs: it writes the output).
CACHED_STAGES = ("sparse", "prune", "finetune")
#: Training settings of both training stages unless given (the reference's CIFAR recipe:
#: SGD lr 0.1, momentum 0.9, weight decay 1e-4, batch 64; cosine instead of step decay).
TRAIN_DEFAULTS: dict[str, Any] = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "batch_size": 64,
                                  "schedule": "cosine"}
#: Channel-count multiple per target when ``round_to`` is not given: the targets' own
#: (``onnxdns.pipelines.ROUND_TO``, 8: onnxruntime's CPU convolutions are much faster at multiples
#: of the NCHWc block, 8 floats with AVX2 and 16 with AVX-512; see docs/slimming.md).
ROUND_TO = pipelines.ROUND_TO
#: Training options that belong to the pipeline, not to ``train_options``.
_OWN = {"method", "epochs", "iterations", "lr", "slim_lambda", "smooth_l1", "batchnorm", "data"}


@dataclasses.dataclass
class StageRecord:
    """One stage's model and what it measured (``reused``: taken from an earlier run)."""

    name: str
    path: Path
    reused: bool
    seconds: float
    params: int
    macs: int
    accuracy: float | None
    details: dict[str, Any]


@dataclasses.dataclass
class SlimResult:
    """What :func:`slim` did. ``output`` is None when a training stage was interrupted."""

    input_path: Path
    output: Path | None
    work_dir: Path
    input_params: int
    input_macs: int
    stages: list[StageRecord]
    optimize: Any  # onnxdns.api.OptimizeResult of the last stage (None when not reached)
    interrupted: bool
    seconds: float

    def stage(self, name: str) -> StageRecord | None:
        return next((s for s in self.stages if s.name == name), None)


def slim(
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    *,
    data: str = "fashion-mnist",
    slim_lambda: float = DEFAULT_SLIM_LAMBDA,
    smooth_l1: float | None = None,
    prune_ratio: float | None = 0.5,
    threshold: float | None = None,
    min_keep: int = 1,
    min_keep_ratio: float = 0.05,
    round_to: int | None = None,
    target: str = "cpu",
    epochs: float = 10.0,
    finetune_epochs: float | None = None,
    lr: float | None = None,
    finetune_lr: float | None = None,
    work_dir: str | os.PathLike | None = None,
    fresh: bool = False,
    validate: bool = True,
    evaluate: bool = True,
    progress: bool = True,
    threads: int = 0,
    data_dir: str | os.PathLike | None = None,
    **train_options: Any,
) -> SlimResult:
    """Slim ``input_path`` (see the module docstring) and write the optimized model to ``output_path``.

    ``epochs`` is the sparsity training length, ``finetune_epochs`` the fine-tuning one (default:
    the same); ``lr`` / ``finetune_lr`` default to 0.1 / ``lr``. ``train_options`` are further
    :class:`onnxdns.training.TrainConfig` fields used by both training stages (``batch_size``,
    ``momentum``, ``weight_decay``, ``schedule``, ``seed``, ``subset``, ``test_subset``, and the data
    and loss options ``val_data``, ``val_fraction``, ``loss``, ``loss_outputs``, ``temperature``,
    ``mean``, ``std``; see :data:`TRAIN_DEFAULTS`). ``data`` is any data source spec
    (``mnist|fashion-mnist|DIR|FILE.npz|FILE.npy|file.py:fn``); distillation in the fine-tuning
    stage learns from the input model. ``round_to`` defaults to :data:`ROUND_TO` of the target.
    ``evaluate`` measures each stage's test accuracy with onnxruntime. Bad input raises
    :class:`OnnxdnsError`.
    """
    from onnxdns import api
    from onnxdns.passes.fold_channel_scales import FoldChannelScalesPass
    from onnxdns.passes.slim_channels import SlimChannelsPass
    from onnxdns.training import TrainConfig

    start = time.perf_counter()
    src, out = Path(input_path), Path(output_path)
    if not isinstance(data, (str, os.PathLike)):  # the stage cache records its settings as JSON
        raise OnnxdnsError("slim: data must be a data set name, a folder, FILE.npz, FILE.npy or module:function "
                           "(a Source object cannot be recorded in the work folder's settings)")
    data = os.path.abspath(data) if data not in DATASETS and os.path.exists(data) else os.fspath(data)
    if not src.is_file():
        raise OnnxdnsError(f"{src}: no such model file")
    pipelines.check_target(target, "fp32")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(train_options) - fields)
    if unknown:
        raise TypeError(f"slim() got unexpected option(s): {', '.join(unknown)}")
    clash = sorted(set(train_options) & _OWN)
    if clash:
        raise OnnxdnsError(f"slim: set {', '.join(clash)} through slim's own arguments")
    if threshold is None and (prune_ratio is None or not 0.0 <= prune_ratio < 1.0):
        raise OnnxdnsError(f"prune ratio must be in [0, 1), got {prune_ratio}")
    if threshold is not None and threshold < 0:
        raise OnnxdnsError(f"threshold must be >= 0, got {threshold}")
    round_to = ROUND_TO[target] if round_to is None else round_to
    if round_to < 1 or min_keep < 1 or not 0.0 <= min_keep_ratio <= 1.0:
        raise OnnxdnsError("round_to and min_keep must be >= 1, min_keep_ratio in [0, 1]")
    if out.is_dir():
        raise OnnxdnsError(f"{out}: is a directory; give an output file name")
    if not out.parent.exists():
        raise OnnxdnsError(f"{out.parent}: output folder does not exist")
    if out.resolve() == src.resolve():
        raise OnnxdnsError(f"{out}: the output path is the input model; choose another output path")
    modelio.check_output_file(out)
    work = Path(work_dir) if work_dir is not None else out.with_name(f"{out.stem}.slim")

    shared = {**TRAIN_DEFAULTS, **{k: v for k, v in train_options.items() if v is not None}, "data": data}
    lr = TRAIN_DEFAULTS["lr"] if lr is None else lr
    settings = {
        "sparse": {"input_sha256": modelio.file_sha256(src), **shared, "method": "slim", "epochs": epochs, "lr": lr,
                   "slim_lambda": slim_lambda, "smooth_l1": smooth_l1},
        "prune": {"ratio": None if threshold is not None else prune_ratio, "threshold": threshold,
                  "min_keep": min_keep, "min_keep_ratio": min_keep_ratio, "round_to": round_to},
        "finetune": {**shared, "method": "none", "batchnorm": "train",
                     "epochs": epochs if finetune_epochs is None else finetune_epochs,
                     "lr": lr if finetune_lr is None else finetune_lr},
    }
    stages = _Stages(work, settings, fresh=fresh)
    runtime_opts = {"progress": progress, "threads": threads, "data_dir": data_dir}
    # per-stage test accuracy: the built-in data sets' test split (user data: the training stages'
    # validation figures are in each stage's history)
    dataset = _test_set(data, data_dir) if evaluate and data in DATASETS else None
    input_model = modelio.load_model(src)
    input_stats = model_stats(input_model)
    records: list[StageRecord] = []

    def finish(interrupted: bool, optimized=None) -> SlimResult:
        return SlimResult(src, None if interrupted else out, work, input_stats.params, input_stats.macs, records,
                          optimized, interrupted, time.perf_counter() - start)

    # 1. sparsity training
    sparse = work / "sparse.onnx"
    record = stages.reuse("sparse", sparse)
    if record is None:
        t0 = time.perf_counter()
        options = {k: v for k, v in settings["sparse"].items() if k != "input_sha256"}
        result = train_stage(src, sparse, work / "sparse.ckpt", options, **runtime_opts)
        if result.interrupted:
            return finish(True)
        record = stages.done("sparse", sparse, time.perf_counter() - t0, dataset,
                             {"steps": result.steps, **result.method_summary.get("slim", {}),
                              "history": [dataclasses.asdict(h) for h in result.history]})
    records.append(record)

    # 2. channel pruning
    pruned = work / "pruned.onnx"
    record = stages.reuse("prune", pruned)
    if record is None:
        t0 = time.perf_counter()
        p = settings["prune"]
        pass_ = SlimChannelsPass(p["ratio"], p["threshold"], min_keep=min_keep, min_keep_ratio=min_keep_ratio,
                                 round_to=round_to)
        applied = pass_.apply(modelio.load_model(sparse))
        if not applied.details.get("total_pruned_channels"):
            raise OnnxdnsError(f"slim-channels pruned no channel of {src} ({applied.details.get('reason', 'threshold too low')})")
        # the inserted channel scales (convs without BatchNorm) go into their convs' weights
        modelio.save_model(FoldChannelScalesPass()(applied.model), pruned)
        record = stages.done("prune", pruned, time.perf_counter() - t0, dataset, applied.details)
    records.append(record)

    # 3. fine-tuning
    finetuned = work / "finetuned.onnx"
    record = stages.reuse("finetune", finetuned)
    if record is None:
        t0 = time.perf_counter()
        # distillation learns from the input model, not from the pruned one
        result = train_stage(pruned, finetuned, work / "finetune.ckpt", settings["finetune"], teacher=src,
                             **runtime_opts)
        if result.interrupted:
            return finish(True)
        record = stages.done("finetune", finetuned, time.perf_counter() - t0, dataset,
                             {"steps": result.steps, "history": [dataclasses.asdict(h) for h in result.history]})
    records.append(record)

    # 4. optimize (always rerun: cheap, and it writes the output)
    t0 = time.perf_counter()
    optimized = api.optimize(finetuned, out, target=target, validate=validate,
                             data=_validation_data(data, finetuned, shared) if validate else "random", data_dir=data_dir,
                             pass_options={"remove_channels": {"round_to": round_to}})
    details = {"validation": optimized.validation.status, "message": optimized.validation.message,
               "passes": [p.name for p in optimized.passes if p.modified]}
    comparison = optimized.validation.comparison
    known = comparison.accuracy_b if comparison is not None and comparison.accuracy_b is not None else None
    records.append(stages.done("optimize", out, time.perf_counter() - t0, dataset, details, remember=False,
                               accuracy=known))
    return finish(False, optimized)


# --------------------------------------------------------------------------- stages


class _Stages:
    """The work folder's manifest: per stage its settings, model and measurements."""

    def __init__(self, work: Path, settings: dict[str, dict[str, Any]], *, fresh: bool) -> None:
        self.work, self.settings = work, settings
        self.path = work / MANIFEST
        if fresh and work.exists():
            if not self.path.exists() and any(work.iterdir()):
                raise OnnxdnsError(f"{work}: not a slim work folder (no {MANIFEST}); refusing to empty it")
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        self.manifest: dict[str, Any] = {"stages": {}}
        if self.path.exists():
            try:
                self.manifest = json.loads(self.path.read_text())
            except ValueError as e:
                raise OnnxdnsError(f"{self.path}: unreadable ({e}); use fresh=True to start over") from None
        self.valid = True  # False once a stage is redone: every later stage is redone too

    def key(self, name: str) -> dict[str, Any]:
        """The settings of ``name`` and of every stage before it."""
        upto = CACHED_STAGES[: CACHED_STAGES.index(name) + 1]
        return {stage: self.settings[stage] for stage in upto}

    def reuse(self, name: str, path: Path) -> StageRecord | None:
        saved = self.manifest["stages"].get(name)
        if self.valid and saved is not None and saved.get("key") == _jsonable(self.key(name)) and path.exists():
            return StageRecord(name=name, path=path, reused=True, **saved["record"])
        self.valid = False
        self.manifest["stages"].pop(name, None)
        path.unlink(missing_ok=True)
        return None

    def done(self, name: str, path: Path, seconds: float, dataset, details: dict[str, Any], *,
             remember: bool = True, accuracy: float | None = None) -> StageRecord:
        """Measure the stage's model (test accuracy unless given or no ``dataset``) and, with
        ``remember``, record it in the manifest."""
        model = modelio.load_model(path)
        stats = model_stats(model)
        acc = accuracy if accuracy is not None or dataset is None else evaluate_accuracy(model, dataset)
        record = {"seconds": round(seconds, 2), "params": stats.params, "macs": stats.macs, "accuracy": acc,
                  "details": _jsonable(details)}
        if remember:
            self.manifest["stages"][name] = {"key": _jsonable(self.key(name)), "record": record}
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.manifest, indent=1))
            os.replace(tmp, self.path)
        return StageRecord(name=name, path=path, reused=False, **record)


def train_stage(src: str | os.PathLike, dst: str | os.PathLike, ckpt: str | os.PathLike, options: Mapping[str, Any],
                **runtime: Any):
    """:func:`onnxdns.training.train` of ``src`` into ``dst`` with checkpoints in ``ckpt``, resumed
    when ``ckpt`` holds a run of the same model with the same ``options`` (``TrainConfig`` fields),
    started again otherwise. ``runtime``: ``progress``, ``threads``, ``data_dir``, ``teacher``."""
    from onnxdns.workflows.train import RUN_FILE, train

    src, ckpt = Path(src), Path(ckpt)
    run = ckpt / RUN_FILE
    if run.exists():
        try:
            info = json.loads(run.read_text())
            same = info["input_sha256"] == modelio.file_sha256(src) and all(
                info["config"].get(k) == v for k, v in _jsonable(options).items())
        except (ValueError, KeyError, TypeError):
            same = False
        if same:
            return train(src, dst, resume=ckpt, **runtime)
    if ckpt.exists():
        shutil.rmtree(ckpt)
    return train(src, dst, checkpoint_dir=ckpt, **runtime, **options)


# --------------------------------------------------------------------------- measurements


def _validation_data(data: str, model: Path, options: Mapping[str, Any]):
    """``data`` for optimize's comparison: opened here when ``--mean``/``--std`` normalise a folder."""
    if options.get("mean") is None and options.get("std") is None or not os.path.isdir(data):
        return data
    from onnxdns.sources import model_inputs, open_source

    return open_source(data, model_inputs(model), split="test", mean=options.get("mean"), std=options.get("std"))


def _test_set(data: str, data_dir):
    from onnxdns.data import load_dataset

    try:
        return load_dataset(data, split="test", data_dir=data_dir)
    except OSError as e:
        raise OnnxdnsError(f"{data} data unavailable: {e.strerror or e}") from None


def evaluate_accuracy(model: onnx.ModelProto | str | os.PathLike, dataset, *, batch: int = 500, threads: int = 0) -> float:
    """Top-1 accuracy of ``model`` (one input, [N, classes] output) on ``dataset`` (``.images``,
    ``.labels``) with onnxruntime."""
    from onnxdns import runtime

    session = runtime.make_session(model, threads=threads)
    name = session.get_inputs()[0].name
    hits = 0
    for i in range(0, len(dataset.labels), batch):
        logits = session.run(None, {name: np.asarray(dataset.images[i:i + batch], dtype=np.float32)})[0]
        hits += int(np.count_nonzero(logits.argmax(axis=1) == dataset.labels[i:i + batch]))
    return hits / max(1, len(dataset.labels))


def _jsonable(value: Any) -> Any:
    """``value`` as JSON reads it back (tuples become lists, numpy scalars numbers, NaN None)."""
    def default(o):
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, (Path, os.PathLike)):
            return str(o)
        if isinstance(o, Mapping):
            return dict(o)
        return repr(o)

    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v

    return clean(json.loads(json.dumps(value, default=default)))
