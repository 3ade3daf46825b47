"""Sparse plus low-rank (Ma et al. 2019) as a workflow: calibrate, fit, time, split, fine-tune.

:class:`SparseLowRank` holds the options. :meth:`SparseLowRank.fit` reads calibration inputs,
runs the exact clean-up, fits every eligible layer with ADMM on its post-activation error under a
global budget (:mod:`onnxdns.lowrank.split`) and times the split model against its input
(:mod:`onnxdns.lowrank.speed`), undoing the splits that do not pay; it returns a
:class:`~onnxdns.passes.sparse_lowrank.SplitPlan`. The pure pass
:class:`~onnxdns.passes.sparse_lowrank.SparseLowRankPass` applies a plan. :meth:`SparseLowRank.apply`
does both and then, with ``finetune_epochs``, fine-tunes the split model with onnxruntime-training.
``onnxdns optimize --passes ...,sparse-lowrank,...`` runs :meth:`SparseLowRank.apply` at that
position of the pipeline (see :mod:`onnxdns.pipelines`).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping, Sequence

import onnx
import onnx_ir as ir

from onnxdns import modelio, runtime
from onnxdns.errors import OnnxdnsError
from onnxdns.framework import Applied
from onnxdns.lowrank import blas, calibration, speed, split
from onnxdns.lowrank.cost import COSTS
from onnxdns.lowrank.layers import is_split
from onnxdns.passes.sparse_lowrank import SparseLowRankPass, SplitPlan, clean_up
from onnxdns.sources import Source

log = logging.getLogger(__name__)


class SparseLowRank:
    """Fit and apply the sparse + low-rank split of a model (see the module docstring).

    Per-layer ranks and kept groups come from a global target: ``target_speedup`` (estimated with
    ``cost``: ``latency``, a model of onnxruntime's CPU provider, or ``macs``),
    ``target_compression`` (parameters), or both, choosing the options with the least measured
    error per unit of cost (``docs/sparse_lowrank.md``).

    Options: ``calib_data`` (dataset name of :mod:`onnxdns.data`, an array of model inputs for a
    one-input model, a dict or ``.npz`` ``NpzFile`` of arrays named after the inputs, an opened
    :class:`~onnxdns.sources.Source`, or None for random inputs of the right dtypes, which only
    suit tests), ``calib_samples``, ``max_rows`` (calibration rows per layer, at most),
    ``round_to`` (ranks and kept counts in multiples, 8 for ``--target cuda``), ``iterations``
    (ADMM), ``sensitivity`` (weight layer errors by their measured effect on the outputs),
    ``compare`` (also fit low-rank-only, sparse-only and mixed baselines at the same MACs, for
    reports), ``narrow_inputs`` (input channels a split layer no longer reads are removed from
    the layers producing them, exactly), ``finetune_epochs`` (fine-tune the split model with
    onnxruntime-training on ``finetune_data``, default ``calib_data`` when it names data (not
    arrays): cross-entropy with labels, else distillation from the model before the split;
    ``finetune_lr``, ``finetune_batch_size``; ``finetune_options``: further :func:`onnxdns.training.train` options such as ``mean``/``std``;
    needs the ``[train]`` extra),
    ``progress`` (tqdm bars with rate and ETA; every stage is also logged).

    Never slower (``speed_check``, default on): the split model is timed against the input on
    ``provider`` (onnxruntime CPU by default; CUDA for ``--target cuda``), side by side, at batch 1
    and ``cost_batch``; unless it is at least ``min_speedup`` times faster at both, the splits with
    the least estimated saving are undone (half, then a quarter, ..., then all) and the candidate
    re-measured; the measurements and the outcome are in ``details["speed_check"]``. With
    ``speed_check=False`` the report says that the model was not timed. Without the speed check
    the plan is deterministic for given inputs and options.
    """

    name = SparseLowRankPass.name
    exact = False

    def __init__(
        self,
        calib_data: Any = None,
        *,
        target_speedup: float | None = None,
        target_compression: float | None = None,
        calib_samples: int = 512,
        max_rows: int = 16384,
        cost: str = "latency",
        cost_batch: int = 8,
        round_to: int = 1,
        iterations: int = 10,
        ridge: float = 1e-3,
        max_dim: int = 8192,
        skip: Sequence[str] = (),
        sensitivity: bool = True,
        compare: bool = False,
        finetune_epochs: float = 0.0,
        finetune_lr: float = 0.005,
        finetune_batch_size: int = 64,
        finetune_data: Any = None,
        finetune_options: Mapping[str, Any] | None = None,
        narrow_inputs: bool = True,
        speed_check: bool = True,
        min_speedup: float = 1.05,
        provider: str = "CPUExecutionProvider",
        seed: int = 0,
        threads: int = 0,
        progress: bool = False,
        data_dir: str | None = None,
    ):
        if target_speedup is None and target_compression is None:
            target_speedup = 2.0
        for ratio in (target_speedup, target_compression):
            if ratio is not None and not ratio > 1.0:
                raise OnnxdnsError(f"sparse-lowrank: a target ratio must be above 1, got {ratio}")
        if cost not in COSTS[:2]:
            raise OnnxdnsError(f"sparse-lowrank: cost must be one of {', '.join(COSTS[:2])}, got '{cost}'")
        if min(calib_samples - 2, max_rows - 16, round_to - 1, iterations, cost_batch - 1, finetune_epochs,
               finetune_batch_size - 1) < 0:
            raise OnnxdnsError("sparse-lowrank: calib_samples >= 2, max_rows >= 16, round_to >= 1, iterations >= 0, "
                               "cost_batch >= 1, finetune_epochs >= 0 and finetune_batch_size >= 1 are required")
        if finetune_data is None and isinstance(calib_data, (str, os.PathLike, Source)):
            finetune_data = calib_data
        if finetune_epochs and finetune_data is None:
            raise OnnxdnsError("sparse-lowrank: fine-tuning reads its data by name: give finetune_data (a data set "
                               "name, a folder, a .npz/.npy file, module:function or a Source)")
        if not min_speedup >= 1.0:
            raise OnnxdnsError(f"sparse-lowrank: min_speedup must be at least 1, got {min_speedup}")
        self.calib_data = calib_data
        self.calib_samples = int(calib_samples)
        self.finetune_epochs = float(finetune_epochs)
        self.finetune_lr = float(finetune_lr)
        self.finetune_batch_size = int(finetune_batch_size)
        self.finetune_data = finetune_data
        if finetune_options is not None and not isinstance(finetune_options, Mapping):
            raise OnnxdnsError("sparse-lowrank: finetune_options must be a mapping of train() options (Python API)")
        self.finetune_options = dict(finetune_options or {})
        self.narrow_inputs = bool(narrow_inputs)
        self.speed_check = bool(speed_check)
        self.min_speedup = float(min_speedup)
        self.provider = str(provider)
        self.progress = progress
        self.data_dir = data_dir
        self.settings = split.Settings(
            target_speedup=target_speedup, target_compression=target_compression, cost=cost, cost_batch=cost_batch,
            round_to=round_to, iterations=iterations, ridge=ridge, max_rows=max_rows, max_dim=max_dim,
            skip=tuple(skip), sensitivity=sensitivity, seed=seed, threads=threads, compare=compare)

    def __repr__(self) -> str:
        s = self.settings
        data = self.calib_data if isinstance(self.calib_data, str) or self.calib_data is None else "<array>"
        return (f"SparseLowRank(calib_data={data!r}, target_speedup={s.target_speedup}, "
                f"target_compression={s.target_compression}, cost={s.cost!r}, round_to={s.round_to})")

    # ------------------------------------------------------------------ the workflow

    def apply(self, model: Any) -> Applied:
        """Fit a plan on ``model`` and apply it with :class:`SparseLowRankPass` (same representations
        and semantics as :meth:`onnxdns.framework.GraphPass.apply`: a ``ModelProto`` is not
        modified, an ``onnx_ir.Model`` is rewritten in place), then fine-tune when asked."""
        target = model.model if isinstance(model, ir.passes.PassResult) else model
        if isinstance(target, ir.Model):
            view = target
        elif isinstance(target, onnx.ModelProto):
            view = modelio.to_ir(target)
        else:
            raise TypeError(f"sparse-lowrank: expected onnx.ModelProto or onnx_ir.Model, got {type(target).__name__}")
        plan = self.fit(view)
        teacher = modelio.to_proto(view) if self.finetune_epochs and plan.fitted else None  # before the split
        applied = SparseLowRankPass(plan).apply(target)
        if self.finetune_epochs and plan.fitted:
            from onnxdns.lowrank.finetune import finetune

            work = applied.model if isinstance(applied.model, ir.Model) else modelio.to_ir(applied.model)
            applied.details["finetune"] = finetune(work, self.finetune_data, teacher=teacher,
                                                   epochs=self.finetune_epochs, lr=self.finetune_lr,
                                                   batch_size=self.finetune_batch_size,
                                                   seed=self.settings.seed, threads=self.settings.threads,
                                                   progress=self.progress, data_dir=self.data_dir,
                                                   **self.finetune_options)
            if not isinstance(applied.model, ir.Model):
                applied.model = modelio.to_proto(work)
        return applied

    def fit(self, model: ir.Model) -> SplitPlan:
        """The plan for ``model`` (not modified): calibration, clean-up, ADMM fits under the global
        budget, and the speed check."""
        if is_split(model.graph):
            return SplitPlan(fitted=(), details={"note": "the model is already split by sparse-lowrank; nothing done"})
        original = modelio.to_proto(model)  # the input: the speed check's reference
        work = modelio.to_ir(original)  # fitting splits this copy layer by layer
        cleaned = clean_up(work)
        # cleaned up, not split: what every candidate of the speed check starts from
        base = modelio.to_proto(work) if any(c["modified"] for c in cleaned.values()) else original
        try:
            specs = calibration.input_specs(work)
        except OnnxdnsError as e:
            raise ir.passes.PreconditionError(str(e)) from e
        inputs, source = calibration.calibration_inputs(self.calib_data, specs, self.calib_samples,
                                                        seed=self.settings.seed, data_dir=self.data_dir,
                                                        model=original)
        log.info("sparse-lowrank: calibration inputs: %s", source)
        if self.calib_data is None:
            log.warning("sparse-lowrank: no calibration data given: random inputs (for tests only); the fitted "
                        "errors say nothing about real data")
        fitted: dict[str, split.Fitted] = {}
        with blas.blas_threads(self.settings.threads), _Progress(self.progress) as tick:
            details = split.split_model(work, inputs, self.settings, progress=tick, fitted=fitted)
            details["calibration"]["data"] = source
            plan = SplitPlan(tuple(fitted.values()), details, self.settings.round_to, self.narrow_inputs)
            if not details["split_layers"]:
                details["speed_check"] = {"skipped": True, "reason": "no layer was split"}
            elif not self.speed_check:
                details["speed_check"] = {"skipped": True, "reason": "disabled (speed_check=False): the split model "
                                                                     "was not timed against its input"}
            elif self.provider not in runtime.available_providers():
                details["speed_check"] = {"skipped": True, "reason": f"{self.provider} is not available here: the "
                                          "split model was not timed on its target"}
            else:
                plan = self._speed_check(plan, original, base, inputs, specs, tick)
        return plan

    def _speed_check(self, plan: SplitPlan, original: onnx.ModelProto, base: onnx.ModelProto,
                     inputs: calibration.Inputs, specs, tick) -> SplitPlan:
        """Time the split model against the input; the plan of the accepted candidate (the splits
        that do not pay undone, its details updated; see :mod:`onnxdns.lowrank.speed`)."""
        details = plan.details
        rows = {r["name"]: r for r in details["layers"] if r["status"] == "split"}
        benefit = {name: r["est_us_before"] - r["est_us_after"] for name, r in rows.items()}

        def build(kept: Sequence[str]) -> onnx.ModelProto:
            return SparseLowRankPass(plan.only(kept)).apply(base).model

        static = calibration.static_batch(specs)
        batches = [static] if static else sorted({1, self.settings.cost_batch})
        providers = tuple(dict.fromkeys([self.provider, "CPUExecutionProvider"]))
        report = speed.check(original, list(rows), benefit, build, inputs, batches, min_speedup=self.min_speedup,
                             threads=self.settings.threads, providers=providers,
                             progress=lambda n, total: tick("speed check", n, total))
        details["speed_check"] = report
        kept = set(report["kept"])
        for name in set(rows) - kept:
            row = rows[name]
            row.update(status="undone", reason="split undone: the measured latency did not improve",
                       planned_rank=row["rank"], planned_keep=row["keep"], rank=None, keep=row["in_channels"],
                       macs_after=row["macs_before"], params_after=row["params_before"],
                       est_us_after=row["est_us_before"])
            row.pop("nodes", None)
        details["split_layers"] = len(kept)
        for key in ("macs", "params"):
            details[key]["after"] = int(sum(r[f"{key}_after"] for r in details["layers"]))
        return plan.only(kept)


class _Progress:
    """A context manager yielding ``tick(stage, n, total)``: a tqdm bar per stage (count, rate and
    ETA) when enabled."""

    UNITS = {"calibrate": "sample", "speed check": "try"}

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bars: dict[str, Any] = {}

    def __enter__(self):
        def tick(stage: str, n: int, total: int | None = None) -> None:
            if not self.enabled:
                return
            if stage not in self.bars:
                from tqdm import tqdm

                self.bars[stage] = tqdm(desc=f"sparse-lowrank {stage}", total=total,
                                        unit=self.UNITS.get(stage, "layer"), leave=False)
            self.bars[stage].update(n)
        return tick

    def __exit__(self, *exc) -> None:
        for bar in self.bars.values():
            bar.close()


__all__ = ["SparseLowRank"]
