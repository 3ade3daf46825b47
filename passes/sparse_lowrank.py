"""``sparse-lowrank``: split layers into structured-sparse plus low-rank factors from a fitted plan."""

from __future__ import annotations

import copy
import dataclasses
import logging
from typing import Any, Sequence

import onnx_ir as ir

from onnxdns import modelio
from onnxdns.errors import OnnxdnsError
from onnxdns.framework import GraphPass, PassReport
from onnxdns.lowrank import split
from onnxdns.lowrank.layers import is_split
from onnxdns.passes.fold_batchnorm import FoldBatchNormPass

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SplitPlan:
    """What to split and with which factors: fitted by :class:`onnxdns.workflows.sparse_lowrank.SparseLowRank`
    (calibration, ADMM, allocation, speed check) on a model; applied by :class:`SparseLowRankPass`.

    ``fitted``: the factors of every layer to split (positions and names in the cleaned-up model);
    ``details``: the fit's report (per-layer rows, calibration, speed check), returned by the pass;
    ``round_to`` / ``narrow_inputs``: how unread input channels are removed after the split.
    """

    fitted: tuple[split.Fitted, ...]
    details: dict[str, Any] = dataclasses.field(default_factory=dict)
    round_to: int = 1
    narrow_inputs: bool = True

    def only(self, names: Sequence[str]) -> "SplitPlan":
        """The plan restricted to the layers ``names``."""
        keep = set(names)
        return dataclasses.replace(self, fitted=tuple(f for f in self.fitted if f.name in keep))


class SparseLowRankPass(GraphPass):
    """Replaces Conv / Gemm / MatMul weights ``W`` by ``S + L``: a structured-sparse part ``S``
    (whole input channels or features of the residual kept) plus a low-rank part ``L = P Q``,
    with the factors of a :class:`SplitPlan`.

    A pure rewrite: the plan (ranks, kept groups, factors) is fitted outside the pass, by the
    workflow :class:`onnxdns.workflows.sparse_lowrank.SparseLowRank`, which calibrates on data,
    fits each layer with ADMM on its post-activation error, allocates a global budget and times
    the result against its input (``docs/sparse_lowrank.md``). Guarantee: lossy, with the error
    the plan reports per layer (``details["layers"]``: relative post-activation error on held-out
    calibration samples); with full rank (or every group kept) a split layer equals the original
    up to float rounding.

    The pass runs the exact clean-up the fit ran (``eliminate-identity``, ``fold-constants``,
    ``fold-batchnorm``, ``remove-dead-nodes``), splits the plan's layers (a plan fitted on another
    model is refused: the layer at a planned position must carry the planned name and shape), then,
    with ``narrow_inputs``, removes input channels no split layer reads any more from the layers
    producing them, exactly, with ``remove-channels``. A model already split is left unchanged;
    an empty plan leaves the model as the clean-up made it.

    Emitted (standard ONNX, opset of the model): ``L`` as a Conv with ``r`` output channels and
    the original kernel followed by a 1x1 Conv (two Gemms / MatMuls for dense layers); ``S`` as a
    Gather of the kept input channels and a narrow dense Conv/Gemm/MatMul over them; the two
    summed with ``Add`` before the original activation.
    """

    name = "sparse-lowrank"
    exact = False
    summary = ("split Conv/Gemm/MatMul into structured-sparse + low-rank factors fitted by ADMM on calibration "
               "data (the fit: onnxdns.workflows.sparse_lowrank; lossy)")

    def __init__(self, plan: SplitPlan | None = None):
        self.plan = plan if plan is not None else SplitPlan(fitted=())

    def __repr__(self) -> str:
        return f"SparseLowRankPass(<plan of {len(self.plan.fitted)} layer(s)>)"

    def call(self, model: ir.Model) -> PassReport:
        if is_split(model.graph):
            return PassReport(model, False, {"note": "the model is already split by sparse-lowrank; nothing done"})
        details = copy.deepcopy(self.plan.details)
        cleaned = clean_up(model)
        details["clean_up"] = cleaned
        details["folded_batchnorm"] = cleaned.get("fold-batchnorm", {}).get("folded_into", [])
        modified = any(c["modified"] for c in cleaned.values())
        if not self.plan.fitted:
            details.pop("narrowed", None)
            return PassReport(model, modified, details)
        try:
            split.apply_fitted(model, self.plan.fitted)
        except (ValueError, KeyError, IndexError) as e:
            raise OnnxdnsError(f"sparse-lowrank: the plan does not fit this model ({e}); fit it on this model") from None
        if self.plan.narrow_inputs:
            log.info("sparse-lowrank: narrowing the producers of unread input channels")
            details["narrowed"] = narrow_inputs(model, self.plan.round_to)
        return PassReport(model, True, details)


def clean_up(model: ir.Model) -> dict[str, dict]:
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


def narrow_inputs(model: ir.Model, round_to: int) -> dict:
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


__all__ = ["SparseLowRankPass", "SplitPlan", "clean_up", "narrow_inputs"]
