"""``sparse-lowrank``: split layers into structured-sparse plus low-rank factors fitted with ADMM."""

from __future__ import annotations

import logging
from typing import Any, Sequence

import onnx_ir as ir

from onnxdns import modelio, runtime
from onnxdns.errors import OnnxdnsError
from onnxdns.framework import GraphPass, PassReport
from onnxdns.lowrank import blas, calibration, speed, split
from onnxdns.lowrank.cost import COSTS
from onnxdns.lowrank.layers import is_split
from onnxdns.passes.fold_batchnorm import FoldBatchNormPass

log = logging.getLogger(__name__)


class SparseLowRankPass(GraphPass):
    """Replaces Conv / Gemm / MatMul weights ``W`` by ``S + L``: a structured-sparse part ``S``
    (whole input channels or features of the residual kept) plus a low-rank part ``L = P Q``.

    Guarantee: none in general (lossy). Error model: for each split layer the pass minimises the
    reconstruction error of the layer's output *after its activation* (ReLU when the layer feeds
    one ReLU, else the layer output itself), ``||h(X_hat W^T + b) - h(Z)||_F``, over calibration
    rows: ``X_hat`` is the layer's input computed by the model as split so far, ``Z`` the original
    model's pre-activation, both read with onnxruntime on the calibration inputs. It reports, per
    layer, the relative error ``||.||_F / ||h(Z)||_F`` on held-out calibration images. With full
    rank (or every group kept) the split layer equals the original up to float rounding.

    Emitted (standard ONNX, opset of the model): ``L`` as a Conv with ``r`` output channels and
    the original kernel followed by a 1x1 Conv (two Gemms / MatMuls for dense layers); ``S`` as a
    Gather of the kept input channels and a narrow dense Conv/Gemm/MatMul over them; the two
    summed with ``Add`` before the original activation. Per-layer ranks and kept groups come from
    a global target: ``target_speedup`` (estimated with ``cost``: ``latency``, a model of
    onnxruntime's CPU provider, or ``macs``), ``target_compression`` (parameters), or both,
    choosing the options with the least measured error per unit of cost (see
    ``docs/sparse_lowrank.md``).

    Preconditions: tensor inputs of any dtype (several allowed: token ids, masks). The pass first
    runs the exact clean-up it needs: ``eliminate-identity`` (exporter Identity nodes in front of
    weights and biases), ``fold-constants``, ``fold-batchnorm``, ``remove-dead-nodes``. Layers
    eligible: 2-D Conv with ``group=1``, Gemm with ``transA=0``, MatMul with a constant 2-D weight
    (its input ``[..., d]`` with samples on any leading axis), float32 weights; every other
    Conv/Gemm/MatMul, and every layer it cannot fit, stays dense with its reason in ``skipped``.

    Never slower (``speed_check``, default on): the split model is timed against the input on
    ``provider`` (onnxruntime CPU by default; ``--target cuda`` gives CUDA), side by side, at batch 1 and ``cost_batch``; unless it is at least
    ``min_speedup`` times faster at both, the splits with the least estimated saving are undone
    (half, then a quarter, ..., then all) and the candidate re-measured; the measurements and the
    outcome are in ``details["speed_check"]`` (:mod:`onnxdns.lowrank.speed`). With
    ``speed_check=False`` the report says that the model was not timed.

    Options: ``calib_data`` (dataset name of :mod:`onnxdns.data`, an array of model inputs for a
    one-input model, a dict or ``.npz`` ``NpzFile`` of arrays named after the inputs, or None for
    random inputs of the right dtypes, which only suit tests), ``calib_samples``, ``max_rows``
    (calibration rows per layer, at most), ``round_to`` (ranks and kept counts in multiples, 8 for
    ``--target cuda``), ``iterations`` (ADMM), ``sensitivity`` (weight layer errors by their
    measured effect on the outputs), ``compare`` (also fit low-rank-only, sparse-only and mixed
    baselines at the same MACs, for reports), ``narrow_inputs`` (default on: input channels a split
    layer no longer reads are removed from the layers producing them, exactly, with
    ``remove-channels``; the Gathers then left selecting everything are dropped),
    ``finetune_epochs`` (fine-tune the split model with onnxruntime-training on the calibration
    dataset, labels needed; needs onnxruntime-training and torch, which the pass imports only
    then), ``progress`` (tqdm bars with rate and ETA; every stage is also logged with
    :mod:`logging`). Without the speed check the result is deterministic for given inputs and
    options; with it, it depends on the measured latencies. A model already split by this pass
    is left unchanged.
    """

    name = "sparse-lowrank"
    exact = False
    summary = "split Conv/Gemm/MatMul into structured-sparse + low-rank factors (ADMM, calibration data; lossy)"

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
        if min(calib_samples - 2, max_rows - 16, round_to - 1, iterations, cost_batch - 1, finetune_epochs) < 0:
            raise OnnxdnsError("sparse-lowrank: calib_samples >= 2, max_rows >= 16, round_to >= 1, iterations >= 0, "
                               "cost_batch >= 1 and finetune_epochs >= 0 are required")
        if finetune_epochs and not isinstance(calib_data, str):
            raise OnnxdnsError("sparse-lowrank: fine-tuning needs calib_data to be a dataset name (labels are needed)")
        self.calib_data = calib_data
        self.calib_samples = int(calib_samples)
        self.finetune_epochs = float(finetune_epochs)
        self.finetune_lr = float(finetune_lr)
        self.narrow_inputs = bool(narrow_inputs)
        if not min_speedup >= 1.0:
            raise OnnxdnsError(f"sparse-lowrank: min_speedup must be at least 1, got {min_speedup}")
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
        return (f"SparseLowRankPass(calib_data={data!r}, target_speedup={s.target_speedup}, "
                f"target_compression={s.target_compression}, cost={s.cost!r}, round_to={s.round_to})")

    def requires(self, model: ir.Model) -> None:
        if is_split(model.graph):
            return
        try:
            calibration.input_specs(model)
        except OnnxdnsError as e:
            raise ir.passes.PreconditionError(str(e)) from e

    def call(self, model: ir.Model) -> PassReport:
        if is_split(model.graph):
            return PassReport(model, False, {"note": "the model is already split by sparse-lowrank; nothing done"})
        original = modelio.to_proto(model)  # the input: the speed check's reference
        cleaned = _clean_up(model)
        specs = calibration.input_specs(model)
        inputs, source = calibration.calibration_inputs(self.calib_data, specs, self.calib_samples,
                                                        seed=self.settings.seed, data_dir=self.data_dir,
                                                        model=original)
        log.info("sparse-lowrank: calibration inputs: %s", source)
        if self.calib_data is None:
            log.warning("sparse-lowrank: no calibration data given: random inputs (for tests only); the fitted "
                        "errors say nothing about real data")
        # cleaned up, not split: the start of every fallback candidate (the input itself when the clean-up did nothing)
        base = modelio.to_proto(model) if any(c["modified"] for c in cleaned.values()) else original
        fitted: dict[str, split.Fitted] = {}
        with blas.blas_threads(self.settings.threads), _Progress(self.progress) as tick:
            details = split.split_model(model, inputs, self.settings, progress=tick, fitted=fitted)
            details["calibration"]["data"] = source
            details["clean_up"] = cleaned
            details["folded_batchnorm"] = cleaned.get("fold-batchnorm", {}).get("folded_into", [])
            if self.narrow_inputs and details["split_layers"]:
                log.info("sparse-lowrank: narrowing the producers of unread input channels")
                details["narrowed"] = _narrow_inputs(model, self.settings.round_to)
            if not details["split_layers"]:
                details["speed_check"] = {"skipped": True, "reason": "no layer was split"}
            elif not self.speed_check:
                details["speed_check"] = {"skipped": True, "reason": "disabled (speed_check=False): the split model "
                                                                     "was not timed against its input"}
            elif self.provider not in runtime.available_providers():
                details["speed_check"] = {"skipped": True, "reason": f"{self.provider} is not available here: the "
                                          "split model was not timed on its target"}
            else:
                details["speed_check"] = self._speed_check(model, original, base, fitted, details, inputs, specs, tick)
        if not details["split_layers"]:  # nothing split, or every split undone: the input after the exact clean-up
            model.graph = modelio.to_ir(base).graph
            details.pop("narrowed", None)
            return PassReport(model, any(c["modified"] for c in cleaned.values()), details)
        if self.finetune_epochs:
            from onnxdns.lowrank.finetune import finetune

            details["finetune"] = finetune(model, self.calib_data, epochs=self.finetune_epochs, lr=self.finetune_lr,
                                           seed=self.settings.seed, threads=self.settings.threads,
                                           progress=self.progress, data_dir=self.data_dir)
        return PassReport(model, True, details)

    def _speed_check(self, model: ir.Model, original, base, fitted: dict[str, split.Fitted], details: dict,
                     inputs: calibration.Inputs, specs, tick) -> dict:
        """Time the split model against the input; undo the splits that do not pay (see
        :mod:`onnxdns.lowrank.speed`). Updates ``model`` and ``details`` to the accepted candidate."""
        rows = {r["name"]: r for r in details["layers"] if r["status"] == "split"}
        benefit = {name: r["est_us_before"] - r["est_us_after"] for name, r in rows.items()}
        full = modelio.to_proto(model)
        built: dict[tuple[str, ...], tuple[ir.Model, dict | None]] = {}

        def build(kept):
            if set(kept) == set(rows):
                return full
            work = modelio.to_ir(base)
            split.apply_fitted(work, [fitted[name] for name in kept])
            narrowed = _narrow_inputs(work, self.settings.round_to) if self.narrow_inputs and kept else None
            built[tuple(kept)] = (work, narrowed)
            return modelio.to_proto(work)

        static = calibration.static_batch(specs)
        batches = [static] if static else sorted({1, self.settings.cost_batch})
        providers = tuple(dict.fromkeys([self.provider, "CPUExecutionProvider"]))
        report = speed.check(original, list(rows), benefit, build, inputs, batches, min_speedup=self.min_speedup,
                             threads=self.settings.threads, providers=providers,
                             progress=lambda n, total: tick("speed check", n, total))
        kept = set(report["kept"])
        if kept == set(rows):
            return report
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
        if kept:
            work, narrowed = built[tuple(report["kept"])]
            model.graph = work.graph
            if narrowed is not None:
                details["narrowed"] = narrowed
        return report


def _clean_up(model: ir.Model) -> dict[str, dict]:
    """The exact clean-up the split needs, in place: exporter ``Identity`` nodes removed (weights
    and biases read through them become constants), constant subgraphs folded (``Transpose`` of a
    weight, ``Constant`` nodes), BatchNormalization folded into the layer before it, dead nodes
    removed. Returns what each pass did (a pass that cannot run is reported and skipped)."""
    from onnxdns.passes.eliminate_identity import EliminateIdentityPass
    from onnxdns.passes.fold_constants import FoldConstantsPass
    from onnxdns.passes.remove_dead_nodes import RemoveDeadNodesPass

    done: dict[str, dict] = {}
    for cls in (EliminateIdentityPass, FoldConstantsPass, FoldBatchNormPass, RemoveDeadNodesPass):
        try:
            result = cls().call(model)
        except OnnxdnsError as e:
            done[cls.name] = {"modified": False, "error": str(e)}
            log.warning("sparse-lowrank: clean-up %s skipped: %s", cls.name, e)
            continue
        done[cls.name] = {"modified": bool(result.modified), **_jsonable(result.details)}
        log.info("sparse-lowrank: clean-up %s: %s", cls.name, "changed the model" if result.modified else "nothing to do")
    return done


def _jsonable(details: dict) -> dict:
    return {k: v for k, v in details.items() if isinstance(v, (int, float, str, bool, list, dict, type(None)))}


def _narrow_inputs(model: ir.Model, round_to: int) -> dict:
    """Exact clean-up after the split: input channels that no split layer reads any more (its
    sparse part gathers a subset, it has no low-rank part) are removed from the layers producing
    them (``remove-channels``), Gathers left selecting everything are dropped, then unused
    initializers. Returns the channels removed per producing layer, and the MACs before/after."""
    from onnxdns.passes.eliminate_identity import EliminateIdentityPass
    from onnxdns.passes.remove_channels import RemoveChannelsPass
    from onnxdns.passes.remove_dead_nodes import RemoveDeadNodesPass
    from onnxdns.stats import model_stats

    macs_before = model_stats(modelio.to_proto(model)).macs
    removal = RemoveChannelsPass(round_to=round_to).call(model)
    EliminateIdentityPass().call(model)
    RemoveDeadNodesPass().call(model)
    removed = removal.details.get("removed_channels", {})
    return {"removed_channels": {name: len(idx) for name, idx in removed.items()},
            "params_removed": removal.details.get("params_removed", 0),
            "macs_before": macs_before, "macs_after": model_stats(modelio.to_proto(model)).macs}


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


__all__ = ["SparseLowRankPass"]
