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

Stages are restartable (:mod:`onnxdns.workflows.stages`, records in ``<work>/stages/``): a stage
whose settings and input files match its record and whose model is unchanged is skipped; an
interrupted training stage resumes from its checkpoint; a stage whose settings changed is redone,
and so is every stage that reads its model (so several prune ratios share one sparsity training).
``fresh=True`` starts over.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path
from typing import Any, Mapping

from onnxdns import modelio, pipelines
from onnxdns.errors import OnnxdnsError
from onnxdns.stats import model_stats
from onnxdns.training.config import DATASETS, DEFAULT_SLIM_LAMBDA
from onnxdns.workflows.evaluate import evaluate as evaluate_model
from onnxdns.workflows.optimize import optimize
from onnxdns.workflows.stages import Stage

#: Stage records of a work folder (``<work>/stages/<stage>.json``); ``optimize`` always runs.
STAGES_DIR = "stages"
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
    from onnxdns.passes.fold_channel_scales import FoldChannelScalesPass
    from onnxdns.workflows.train import train_stage
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
    modelio.check_output(out, src)
    work = Path(work_dir) if work_dir is not None else out.with_name(f"{out.stem}.slim")

    shared = {**TRAIN_DEFAULTS, **{k: v for k, v in train_options.items() if v is not None}, "data": data}
    lr = TRAIN_DEFAULTS["lr"] if lr is None else lr
    settings = {
        "sparse": {**shared, "method": "slim", "epochs": epochs, "lr": lr,
                   "slim_lambda": slim_lambda, "smooth_l1": smooth_l1},
        "prune": {"ratio": None if threshold is not None else prune_ratio, "threshold": threshold,
                  "min_keep": min_keep, "min_keep_ratio": min_keep_ratio, "round_to": round_to},
        "finetune": {**shared, "method": "none", "batchnorm": "train",
                     "epochs": epochs if finetune_epochs is None else finetune_epochs,
                     "lr": lr if finetune_lr is None else finetune_lr},
    }
    _prepare_work_dir(work, fresh)
    runtime_opts = {"progress": progress, "threads": threads, "data_dir": data_dir}
    # per-stage test accuracy: the built-in data sets' test split (user data: the training stages'
    # validation figures are in each stage's history)
    test_data = data if evaluate and data in DATASETS else None
    input_model = modelio.load_model(src)
    input_stats = model_stats(input_model)
    records: list[StageRecord] = []
    sparse, pruned, finetuned = work / "sparse.onnx", work / "pruned.onnx", work / "finetuned.onnx"

    def measured(path: Path, details: dict[str, Any], seconds: float, accuracy: float | None = None) -> dict:
        stats = model_stats(modelio.load_model(path))
        if accuracy is None and test_data is not None:
            accuracy = evaluate_model(path, test_data, split="test", data_dir=data_dir, batch_size=500,
                                threads=threads).accuracy
        return {"seconds": round(seconds, 2), "params": stats.params, "macs": stats.macs, "accuracy": accuracy,
                "details": details}

    def training(name: str, src_model: Path, dst: Path, **teacher: Any):
        def run() -> dict:
            t0 = time.perf_counter()
            result = train_stage(src_model, dst, work / f"{name}.ckpt", settings[name], **teacher, **runtime_opts)
            if result.interrupted:
                raise _Interrupted
            details = {"steps": result.steps, **result.method_summary.get("slim", {}),
                       "history": [dataclasses.asdict(h) for h in result.history]}
            return measured(dst, details, time.perf_counter() - t0)
        return run

    def prune() -> dict:
        t0 = time.perf_counter()
        p = settings["prune"]
        applied = SlimChannelsPass(p["ratio"], p["threshold"], min_keep=min_keep, min_keep_ratio=min_keep_ratio,
                                   round_to=round_to).apply(modelio.load_model(sparse))
        if not applied.details.get("total_pruned_channels"):
            raise OnnxdnsError(f"slim-channels pruned no channel of {src} ({applied.details.get('reason', 'threshold too low')})")
        # the inserted channel scales (convs without BatchNorm) go into their convs' weights
        modelio.save_model(FoldChannelScalesPass()(applied.model), pruned)
        return measured(pruned, applied.details, time.perf_counter() - t0)

    folder = work / STAGES_DIR
    plan = [
        # 1. sparsity training; 2. channel pruning; 3. fine-tuning (distillation learns from the
        # input model, not from the pruned one)
        Stage("sparse", settings["sparse"], [src], [sparse], training("sparse", src, sparse), folder),
        Stage("prune", settings["prune"], [sparse], [pruned], prune, folder),
        Stage("finetune", settings["finetune"], [pruned, src], [finetuned],
              training("finetune", pruned, finetuned, teacher=src), folder),
    ]
    for stage in plan:
        try:
            record = stage()
        except _Interrupted:
            return SlimResult(src, None, work, input_stats.params, input_stats.macs, records, None, True,
                              time.perf_counter() - start)
        records.append(StageRecord(name=stage.name, path=stage.outputs[0], reused=bool(stage.reused),
                                   **{k: record[k] for k in ("seconds", "params", "macs", "accuracy", "details")}))

    # 4. optimize (always rerun: cheap, and it writes the output)
    t0 = time.perf_counter()
    optimized = optimize(finetuned, out, target=target, validate=validate,
                         data=_validation_data(data, finetuned, shared) if validate else "random", data_dir=data_dir,
                         pass_options={"remove_channels": {"round_to": round_to}})
    details = {"validation": optimized.validation.status, "message": optimized.validation.message,
               "passes": [p.name for p in optimized.passes if p.modified]}
    comparison = optimized.validation.comparison
    known = comparison.accuracy_b if comparison is not None and comparison.accuracy_b is not None else None
    record = measured(out, details, time.perf_counter() - t0, accuracy=known)
    records.append(StageRecord(name="optimize", path=out, reused=False, **record))
    return SlimResult(src, out, work, input_stats.params, input_stats.macs, records, optimized, False,
                      time.perf_counter() - start)


# --------------------------------------------------------------------------- stages


class _Interrupted(Exception):
    """A training stage was interrupted (Ctrl-C): its checkpoint is saved, nothing recorded."""


def _prepare_work_dir(work: Path, fresh: bool) -> None:
    """Create the work folder; with ``fresh`` empty it first (only a folder this workflow made)."""
    if fresh and work.exists():
        if not (work / STAGES_DIR).is_dir() and any(work.iterdir()):
            raise OnnxdnsError(f"{work}: not a slim work folder (no {STAGES_DIR}/); refusing to empty it")
        shutil.rmtree(work)
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OnnxdnsError(f"{work}: cannot create the work folder: {e.strerror or e}") from None


# --------------------------------------------------------------------------- measurements


def _validation_data(data: str, model: Path, options: Mapping[str, Any]):
    """What optimize compares the output with the fine-tuned model on: the validation data when
    given (its accuracy is the table's last figure), else ``data`` (a built-in set's test split);
    a folder is opened here when ``--mean``/``--std`` normalise it."""
    data = options.get("val_data") or data
    if options.get("mean") is None and options.get("std") is None or not os.path.isdir(data):
        return data
    from onnxdns.sources import model_inputs, open_source

    return open_source(data, model_inputs(model), split="test", mean=options.get("mean"), std=options.get("std"))
