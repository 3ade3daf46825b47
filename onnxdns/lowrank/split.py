"""The ``sparse-lowrank`` driver: calibrate, allocate the budget, fit layer by layer, rewrite.

1. Candidate layers are found (:mod:`onnxdns.lowrank.layers`); layers with an input dimension
   above ``max_dim`` or fewer calibration rows than ``dim + 1`` stay dense (reported).
2. Phase 1, on the original model: each layer's input rows and pre-activations are captured
   (:mod:`onnxdns.lowrank.calibration`), the error of every (rank, kept groups) option is
   estimated with the linear S + L fit on held-out rows, and :func:`~onnxdns.lowrank.budget.allocate`
   picks one option per layer for the global target.
3. Phase 2, layer by layer in graph order: the layer's input rows are captured again from the
   model *as split so far* (so each fit compensates the errors of the layers before it), ADMM
   fits the chosen option against the original model's post-activation outputs, and the layer is
   replaced by its split form (:mod:`onnxdns.lowrank.emit`).
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import time
from typing import Any, Callable, Sequence

import numpy as np
import onnx_ir as ir

from onnxdns import modelio
from onnxdns.lowrank import budget as budget_mod
from onnxdns.lowrank import calibration, emit
from onnxdns.lowrank.calibration import Inputs
from onnxdns.lowrank.cost import NODE_US, PEAK_MACS, option_cost
from onnxdns.lowrank.fit import Factors, LayerData, Problem, admm, post_activation_error, truncated_svd
from onnxdns.lowrank.layers import Geometry, Layer, find_layers
from onnxdns.lowrank.sensitivity import sensitivities
from onnxdns.stats import model_stats


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything the driver needs besides the model and the calibration inputs."""

    target_speedup: float | None = None
    target_compression: float | None = None
    cost: str = "latency"
    cost_batch: int = 8
    round_to: int = 1
    iterations: int = 10
    ridge: float = 1e-3
    rows_per_dim: float = 8.0
    min_rows: int = 1024
    max_rows: int = 16384
    eval_fraction: float = 0.2
    max_dim: int = 8192
    skip: tuple[str, ...] = ()
    sensitivity: bool = True
    capture_bytes: int = 1 << 29
    seed: int = 0
    threads: int = 0
    compare: bool = False

    @property
    def cost_kind(self) -> str:
        """The allocation's primary cost: ``params`` when only a compression target is given."""
        return self.cost if self.target_speedup is not None else "params"

    @property
    def ratio(self) -> float:
        """The target ratio of the primary cost."""
        return float(self.target_speedup if self.target_speedup is not None else self.target_compression)

    @property
    def params_ratio(self) -> float | None:
        """A second target on parameters, when both a speed-up and a compression are asked."""
        return self.target_compression if self.target_speedup is not None else None

    def target_rows(self, geometry: Geometry) -> int:
        return int(min(self.max_rows, max(self.min_rows, self.rows_per_dim * (geometry.dim + 1))))


#: ``progress(stage, n, total)``: ``n`` more items of a stage done, out of ``total``.
Progress = Callable[[str, int, int], None]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Planned:
    layer: Layer
    geometry: Geometry
    table: list[budget_mod.Option]
    z: np.ndarray
    z_eval: np.ndarray


@dataclasses.dataclass
class Fitted:
    """A split layer's fitted factors, enough to split it again in a fresh copy of the model."""

    index: int  # the layer's position among the candidates of find_layers (names may repeat)
    name: str
    geometry: Geometry
    factors: Factors
    doc: str


def split_model(model: ir.Model, inputs: Inputs, settings: Settings,
                progress: Progress | None = None, fitted: dict[str, Fitted] | None = None) -> dict[str, Any]:
    """Split the layers of ``model`` (in place) and return the report details.

    ``fitted``, when given, receives the factors of every split layer by layer name (see
    :func:`apply_fitted`).
    """
    tick = progress or (lambda stage, n, total: None)
    t_start = time.perf_counter()
    layers, skipped = find_layers(model.graph)
    chosen_layers = []
    for layer in layers:
        if layer.name in settings.skip:
            skipped[layer.name] = "skipped on request"
        elif layer.geometry.dim > settings.max_dim:
            skipped[layer.name] = f"input dimension {layer.geometry.dim} > max_dim {settings.max_dim}"
        else:
            chosen_layers.append(layer)
    log.info("sparse-lowrank: %d candidate layers, %d left dense (%d calibration samples)",
             len(chosen_layers), len(skipped), len(inputs))
    proto = modelio.to_proto(model)
    stats = model_stats(proto)
    plan = calibration.Plan.split(len(inputs), settings.eval_fraction, inputs.step or 1)

    # ---- phase 1: errors of every option on the original model
    planned: list[_Planned] = []
    groups = _groups(chosen_layers, settings)
    for gi, group in enumerate(groups):
        log.info("sparse-lowrank: calibration pass %d/%d (%d layers)", gi + 1, len(groups), len(group))
        rows = calibration.capture(proto, group, inputs, plan, settings.target_rows, preact=True, seed=settings.seed,
                                   threads=settings.threads,
                                   progress=lambda n: tick("calibrate", n, len(inputs) * len(groups)))
        for layer in group:
            r = rows.pop(layer.index)
            geometry = r.geometry
            layer.geometry = geometry
            reason = _unusable(r, geometry)
            if reason:
                skipped[layer.name] = reason
                tick("estimate", 1, len(chosen_layers))
                continue
            data = LayerData(r.x, r.z, r.x_eval, r.z_eval, geometry.group_size, layer.activation)
            problem = Problem(data, layer.weight, settings.ridge)
            try:
                table = _table(problem, geometry, settings)
            except np.linalg.LinAlgError as e:
                skipped[layer.name] = f"the fit failed on its calibration rows ({e})"
                continue
            finally:
                tick("estimate", 1, len(chosen_layers))
            planned.append(_Planned(layer, geometry, table, r.z, r.z_eval))
            del data, problem, r
        gc.collect()
    weights = {p.layer.index: 1.0 for p in planned}
    if settings.sensitivity and planned and plan.eval_images:
        log.info("sparse-lowrank: measuring the output sensitivity of %d layers", len(planned))
        sens = sensitivities(proto, [p.layer for p in planned], inputs.slice(plan.fit_images), seed=settings.seed,
                             threads=settings.threads, batch=inputs.step or 64)
        mean = float(np.mean(list(sens.values()))) or 1.0
        weights = {i: max(v / mean, 1e-6) for i, v in sens.items()}
        for p in planned:
            p.table = [dataclasses.replace(o, error=o.error * weights[p.layer.index]) for o in p.table]
    proto = None  # free the copy before phase 2 makes its own

    dense_total = sum(p.table[-1].cost for p in planned)
    fixed = _fixed_cost(settings, stats, planned)
    budget = (dense_total + fixed) / settings.ratio - fixed
    params_budget = None
    if settings.params_ratio is not None:
        params_fixed = _fixed_cost(dataclasses.replace(settings, target_speedup=None), stats, planned)
        params_dense = sum(p.table[-1].params for p in planned)
        params_budget = (params_dense + params_fixed) / settings.params_ratio - params_fixed
    choice, feasible = budget_mod.allocate([p.table for p in planned], budget, params_budget=params_budget)
    estimated = (dense_total + fixed) / max(sum(p.table[i].cost for p, i in zip(planned, choice)) + fixed, 1e-12)
    params_total = stats.params - sum(p.geometry.params(None, 0) for p in planned)
    params_after = params_total + sum(p.table[i].params for p, i in zip(planned, choice))
    t_alloc = time.perf_counter()
    to_fit = sum(1 for p, i in zip(planned, choice) if not p.table[i].dense)
    log.info("sparse-lowrank: allocation done (estimated %.2fx, target %s); fitting %d layers",
             estimated, "reached" if feasible else "not reachable", to_fit)

    # ---- phase 2: ADMM fit of the chosen options, layer by layer, on the model split so far
    reports = []
    current = None  # the model as split so far, serialized for onnxruntime
    for p, i in zip(planned, choice):
        option = p.table[i]
        layer, geometry = p.layer, p.geometry
        row = _row(layer, geometry, option, weights[layer.index], settings.cost_batch)
        if option.dense:
            row.update(status="dense", reason="the allocation kept this layer dense")
            reports.append(row)
            continue
        t0 = time.perf_counter()
        log.info("sparse-lowrank: fitting %s (rank %s, %d/%d input groups kept)", layer.name, option.rank,
                 option.keep, geometry.in_channels)
        if current is None:
            current = modelio.to_proto(model)
        rows = calibration.capture(current, [layer], inputs, plan, settings.target_rows, preact=False,
                                   seed=settings.seed, threads=settings.threads)[layer.index]
        data = LayerData(rows.x, p.z, rows.x_eval, p.z_eval, geometry.group_size, layer.activation)
        problem = Problem(data, layer.weight, settings.ridge)
        try:
            result = admm(problem, option.rank, option.keep, iterations=settings.iterations)
        except np.linalg.LinAlgError as e:
            row.update(status="dense", reason=f"the fit failed ({e})", macs_after=row["macs_before"],
                       params_after=row["params_before"], est_us_after=row["est_us_before"])
            reports.append(row)
            tick("fit", 1, to_fit)
            continue
        row.update(status="split", rel_error=result.eval_error, rel_error_fit=result.fit_error,
                   rel_error_fit_linear=result.history[0], admm_history=[round(h, 6) for h in result.history],
                   best_iteration=result.best_iteration, kept_groups=[int(c) for c in result.factors.keep])
        if settings.compare:
            row["baselines"] = _baselines(problem, layer, geometry, option, settings)
        doc = (f"onnxdns sparse-lowrank: rank {option.rank}, {option.keep}/{geometry.in_channels} "
               f"input groups kept, relative error {result.eval_error:.4f}")
        nodes = emit.replace(model.graph, layer, result.factors, doc=doc)
        if fitted is not None:
            fitted[layer.name] = Fitted(layer.index, layer.name, geometry, result.factors, doc)
        row["nodes"] = nodes
        row["seconds"] = round(time.perf_counter() - t0, 3)
        reports.append(row)
        current = None
        del data, problem, rows
        gc.collect()
        tick("fit", 1, to_fit)
    split = [r for r in reports if r["status"] == "split"]
    return {
        "target": {"speedup": settings.target_speedup, "compression": settings.target_compression,
                   "cost": settings.cost_kind,
                   "cost_batch": settings.cost_batch if settings.cost_kind == "latency" else None,
                   "reached": feasible, "estimated_ratio": round(estimated, 3),
                   "params_ratio": round(stats.params / max(params_after, 1), 3)},
        "layers": reports,
        "split_layers": len(split),
        "skipped": skipped,
        "macs": {"before": int(sum(r["macs_before"] for r in reports)),
                 "after": int(sum(r["macs_after"] for r in reports))},
        "params": {"before": int(sum(r["params_before"] for r in reports)),
                   "after": int(sum(r["params_after"] for r in reports))},
        "calibration": {"images": len(inputs), "fit_images": plan.fit_images, "eval_images": plan.eval_images},
        "seconds": {"estimate_and_allocate": round(t_alloc - t_start, 2),
                    "fit": round(time.perf_counter() - t_alloc, 2)},
    }


def apply_fitted(model: ir.Model, fitted: Sequence[Fitted]) -> list[str]:
    """Split, in ``model`` (a copy of the model :func:`split_model` started from), the layers of
    ``fitted`` with their factors; returns the names of the layers split."""
    by_index = {f.index: f for f in fitted}
    done = []
    for layer in find_layers(model.graph)[0]:
        f = by_index.get(layer.index)
        if f is None:
            continue
        if f.name != layer.name:
            raise ValueError(f"layer {layer.index} is {layer.name}, not {f.name}: not the model that was split")
        layer.geometry = f.geometry
        emit.replace(model.graph, layer, f.factors, doc=f.doc)
        done.append(layer.name)
    return done


def _unusable(rows: calibration.Rows, geometry: Geometry) -> str:
    """Why a layer's calibration rows cannot be fitted ('' when they can)."""
    if rows.x is None or rows.z is None or rows.x.shape[0] < geometry.dim + 1:
        got = 0 if rows.x is None else rows.x.shape[0]
        return f"{got} calibration rows < input dimension + 1 = {geometry.dim + 1}"
    if rows.x.shape[1] != geometry.dim or rows.z.shape[1] != geometry.out_channels:
        return (f"its input/output rows have {rows.x.shape[1]}/{rows.z.shape[1]} features, "
                f"expected {geometry.dim}/{geometry.out_channels}")
    if not (np.all(np.isfinite(rows.x)) and np.all(np.isfinite(rows.z))):
        return "its calibration inputs or outputs hold NaN or infinite values"
    return ""


def _groups(layers: list[Layer], settings: Settings) -> list[list[Layer]]:
    """Consecutive layers whose captured rows fit in ``settings.capture_bytes`` together."""
    groups: list[list[Layer]] = []
    size = 0
    for layer in layers:
        rows = settings.target_rows(layer.geometry) * 1.25
        need = 4 * rows * (layer.geometry.dim + layer.geometry.out_channels)
        if groups and size + need <= settings.capture_bytes:
            groups[-1].append(layer)
            size += need
        else:
            groups.append([layer])
            size = need
    return groups


def _table(problem: Problem, geometry: Geometry, settings: Settings) -> list[budget_mod.Option]:
    """The layer's options with their costs and estimated errors; the dense option last."""
    kind, batch = settings.cost_kind, settings.cost_batch

    def cost(g: Geometry, rank: int | None, keep: int) -> float:
        return option_cost(kind, g, rank, keep, batch)

    pairs = budget_mod.grid(geometry, cost, settings.round_to)
    hint = geometry.macs(None, 0) / settings.ratio
    errors = budget_mod.candidate_errors(problem, geometry, pairs, hint) if pairs else {}
    table = [budget_mod.Option(r, g, cost(geometry, r, g), errors[(r, g)], geometry.macs(r, g), geometry.params(r, g))
             for r, g in pairs if (r, g) in errors]
    table.append(budget_mod.Option(None, 0, cost(geometry, None, 0), 0.0, geometry.macs(None, 0),
                                   geometry.params(None, 0)))
    return table


def _fixed_cost(settings: Settings, stats, planned: list[_Planned]) -> float:
    """Cost of everything the allocation does not control, in the allocation's unit."""
    kind = settings.cost_kind
    if kind == "params":
        return float(max(0, stats.params - sum(p.geometry.params(None, 0) for p in planned)))
    other_macs = max(0, stats.macs - sum(p.geometry.macs(None, 0) for p in planned))
    if kind == "macs":
        return float(other_macs)
    fused = sum(1 for p in planned if p.layer.activation == "relu")  # onnxruntime fuses them into the layer
    other_nodes = max(0, stats.nodes - len(planned) - fused)
    return other_macs * settings.cost_batch / PEAK_MACS + NODE_US * other_nodes


def _row(layer: Layer, geometry: Geometry, option: budget_mod.Option, weight: float, batch: int) -> dict[str, Any]:
    g = geometry
    dense_us = option_cost("latency", g, None, 0, batch)
    return {
        "name": layer.name, "op": g.op, "in_channels": g.in_channels, "out_channels": g.out_channels,
        "kernel": list(g.kernel), "activation": layer.activation,
        "rank": option.rank, "keep": option.keep if not option.dense else g.in_channels,
        "macs_before": g.macs(None, 0), "macs_after": option.macs,
        "params_before": g.params(None, 0), "params_after": option.params,
        "estimated_error": round(float(np.sqrt(option.error / weight)), 6), "sensitivity": round(weight, 4),
        "est_us_before": round(dense_us, 2),
        "est_us_after": round(dense_us if option.dense else option_cost("latency", g, option.rank, option.keep, batch), 2),
    }


#: Shares of the MACs given to the low-rank part in the mixed comparison splits (small shares
#: matter: on trained VGG layers the best member of the family is often near the sparse end).
MIXED_SHARES = (0.05, 0.1, 0.15, 0.25, 0.5, 0.75)


def _baselines(problem: Problem, layer: Layer, geometry: Geometry, option: budget_mod.Option,
               settings: Settings) -> dict[str, Any]:
    """Errors at (at least) the chosen option's MACs of low-rank only (truncated SVD; ADMM), sparse only
    (ADMM) and the best of the mixed splits whose low-rank part takes :data:`MIXED_SHARES` of the
    MACs (ADMM; duplicates skipped)."""
    data = problem.data
    target = option.macs
    out: dict[str, Any] = {}
    rank = next((r for r in range(1, geometry.full_rank + 1) if geometry.macs(r, 0) >= target), None)
    if rank is not None:
        svd = truncated_svd(layer.weight, layer.bias, rank, geometry.group_size)
        res = admm(problem, rank, 0, iterations=settings.iterations)
        out["lowrank_svd"] = {"rank": rank, "macs": geometry.macs(rank, 0),
                              "rel_error": post_activation_error(svd, data.x_eval, data.z_eval, data.activation)}
        out["lowrank_admm"] = {"rank": rank, "macs": geometry.macs(rank, 0), "rel_error": res.eval_error}
    keep = next((g for g in range(1, geometry.in_channels + 1) if geometry.macs(0, g) >= target), None)
    if keep is not None:
        res = admm(problem, 0, keep, iterations=settings.iterations)
        out["sparse_admm"] = {"keep": keep, "macs": geometry.macs(0, keep), "rel_error": res.eval_error}
    tried: set[tuple[int, int]] = set()
    for share in MIXED_SHARES:  # both parts: the low-rank part takes this share of the MACs
        rank = max((r for r in range(1, geometry.full_rank + 1) if geometry.macs(r, 0) <= share * target), default=None)
        if rank is None:
            continue
        keep = next((g for g in range(1, geometry.in_channels) if geometry.macs(rank, g) >= target), None)
        if keep is None or (rank, keep) in tried:
            continue
        tried.add((rank, keep))
        res = admm(problem, rank, keep, iterations=settings.iterations)
        if "mixed_admm" not in out or res.eval_error < out["mixed_admm"]["rel_error"]:
            out["mixed_admm"] = {"rank": rank, "keep": keep, "macs": geometry.macs(rank, keep),
                                 "rel_error": res.eval_error}
    return out
