"""Target pipelines: the ordered pass lists behind ``onnxdns optimize --target cpu|cuda``.

``cpu``: fold-masks, eliminate-identity, fold-constants, fold-channel-scales, fold-batchnorm,
remove-channels, fold-batchnorm, remove-dead-nodes, topo-sort, infer-shapes, sparse-storage
(fold-channel-scales folds the per-channel scales Network Slimming without BatchNorm leaves
after a Conv; a model without them is unchanged by it).

``cuda``: the same, and with ``precision="fp16"`` a ``convert-fp16`` pass before
``sparse-storage``.

Both round the channel counts ``remove-channels`` keeps up to multiples of 8: tensor-core
friendly on CUDA, and on the CPU onnxruntime's convolutions switch to their fast blocked
(NCHWc) kernels only at multiples of the vector width. Measured here (resnet-20 with half its
channels zeroed, batch 32, one thread): kept counts as they fall 23.0 ms, rounded to 8
14.3 ms, original 21.6 ms (see docs/channel_removal.md). The extra channels are zero ones.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from onnxdns import registry
from onnxdns.errors import OnnxdnsError
from onnxdns.framework import GraphPass

TARGETS = ("cpu", "cuda")
PRECISIONS = ("fp32", "fp16")

#: The cpu pipeline, by pass name.
CPU_PASSES = (
    "fold-masks",
    "eliminate-identity",
    "fold-constants",
    "fold-channel-scales",
    "fold-batchnorm",
    "remove-channels",
    "fold-batchnorm",
    "remove-dead-nodes",
    "topo-sort",
    "infer-shapes",
    "sparse-storage",
)
#: Channel-count multiple that ``remove-channels`` keeps, per target.
ROUND_TO = {"cpu": 8, "cuda": 8}
#: Multiple for counts other passes choose (ranks of ``sparse-lowrank``) on the cuda target.
CUDA_ROUND_TO = 8


def _sparse_lowrank():
    from onnxdns.workflows.sparse_lowrank import SparseLowRank

    return SparseLowRank


#: Passes whose plan is fitted on data first: the pipeline runs the workflow step (calibration,
#: fitting, the pass, fine-tuning) in the pass's place; its options are the step's.
FITTED = {"sparse-lowrank": _sparse_lowrank}


def option_classes() -> dict[str, type]:
    """Per pass name, the class whose constructor takes the pass's options in a pipeline (the
    workflow step for a fitted pass; ``--pass-option`` and ``onnxdns passes`` read them)."""
    classes: dict[str, type] = dict(registry.pass_classes())
    classes.update({name: factory() for name, factory in FITTED.items()})
    return classes


def pipeline_names(target: str, precision: str = "fp32") -> list[str]:
    """The pass names of a target pipeline, in order."""
    check_target(target, precision)
    names = list(CPU_PASSES)
    if target == "cuda" and precision == "fp16":
        names.insert(names.index("sparse-storage"), "convert-fp16")
    return names


def get_pipeline(target: str, precision: str = "fp32", **options: Mapping[str, Any]) -> list[GraphPass]:
    """The passes of the ``target`` pipeline, ready to run in order.

    ``options`` gives constructor arguments per pass, keyed by the pass name with ``_`` for
    ``-``, e.g. ``get_pipeline("cuda", remove_channels={"round_to": 16})``; they apply to every
    occurrence of that pass and override the target's defaults.
    """
    return _build(pipeline_names(target, precision), target, options)


def custom_pipeline(names: Sequence[str], target: str = "cpu", **options: Mapping[str, Any]) -> list[GraphPass]:
    """The passes ``names`` in the given order (``--passes a,b,c``), with the target's defaults.

    Unknown names raise :class:`OnnxdnsError` listing the known ones.
    """
    check_target(target, "fp32")
    names = [n.strip() for n in names]
    if not names or any(not n for n in names):
        raise OnnxdnsError(f"empty pass name in --passes; known passes: {', '.join(registry.pass_classes())}")
    known = registry.pass_classes()
    unknown = [n for n in names if n not in known]
    if unknown:
        raise OnnxdnsError(f"unknown pass{'es' if len(unknown) > 1 else ''} {', '.join(repr(n) for n in unknown)}; "
                           f"known passes: {', '.join(known)}")
    return _build(names, target, options)


def check_target(target: str, precision: str) -> None:
    """Raise :class:`OnnxdnsError` for an unknown target or precision, or fp16 on cpu."""
    if target not in TARGETS:
        raise OnnxdnsError(f"unknown target '{target}'; choose one of: {', '.join(TARGETS)}")
    if precision not in PRECISIONS:
        raise OnnxdnsError(f"unknown precision '{precision}'; choose one of: {', '.join(PRECISIONS)}")
    if precision == "fp16" and target != "cuda":
        raise OnnxdnsError("fp16 is for --target cuda (onnxruntime's CPU provider runs fp32)")


def _build(names: Sequence[str], target: str, options: Mapping[str, Mapping[str, Any]]) -> list[GraphPass]:
    by_key = {n.replace("-", "_"): n for n in names}
    extra = sorted(set(options) - set(by_key))
    if extra:
        raise OnnxdnsError(f"options for passes not in this pipeline: {', '.join(e.replace('_', '-') for e in extra)}")
    passes = []
    for name in names:
        kwargs: dict[str, Any] = {}
        if name == "remove-channels":
            kwargs["round_to"] = ROUND_TO[target]
        elif target == "cuda" and name == "sparse-lowrank":
            kwargs["round_to"] = CUDA_ROUND_TO
            kwargs["provider"] = "CUDAExecutionProvider"  # its speed check times the split on the target
        kwargs.update(options.get(name.replace("-", "_"), {}))
        try:
            if name in FITTED:  # a workflow step: fits its plan on data, then runs its pass
                passes.append(FITTED[name]()(**kwargs))
            else:
                passes.append(registry.get_pass(name, **kwargs))
        except (TypeError, ValueError) as e:
            raise OnnxdnsError(f"pass '{name}': bad options {kwargs}: {e}") from None
    return passes
