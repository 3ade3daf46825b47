"""Which initializers a training run updates, which stay frozen, and which layers carry masks.

The masked layers are found by graph structure: a ``Conv`` / ``Gemm`` / ``MatMul`` whose weight (or
bias) input is ``Mul(W, W__mask)`` with both operands initializers, as the ``add-masks`` pass
writes them.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx

from onnxdns.passes.add_masks import BIAS_INPUT, MASK_SUFFIX, WEIGHT_INPUT
from onnxdns.passes.insert_channel_scales import is_scale_name

_FLOAT = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}


@dataclasses.dataclass(frozen=True)
class MaskedLayer:
    """One prunable layer: its weight (and optionally bias) with their mask initializers."""

    name: str
    kind: str  # "conv" or "fc"
    op_type: str
    weight: str
    weight_mask: str
    bias: str | None = None
    bias_mask: str | None = None

    @property
    def params(self) -> list[tuple[str, str]]:
        """(parameter, mask) pairs, weight first."""
        pairs = [(self.weight, self.weight_mask)]
        if self.bias is not None and self.bias_mask is not None:
            pairs.append((self.bias, self.bias_mask))
        return pairs


@dataclasses.dataclass(frozen=True)
class ParameterSet:
    """The split of a model's initializers for training."""

    trainable: list[str]
    frozen: list[str]
    layers: list[MaskedLayer]
    #: Training-graph output -> frozen parameter to overwrite with it after every step
    #: (running statistics of BatchNormalization nodes in training mode).
    writeback: dict[str, str]
    #: Trainable channel scales, in graph order (Network Slimming's penalty): BatchNormalization
    #: scales (gamma) and the per-channel scales ``insert-channel-scales`` puts after a Conv.
    scales: list[str] = dataclasses.field(default_factory=list)

    @property
    def masks(self) -> list[str]:
        return [m for layer in self.layers for _, m in layer.params]


def masked_layers(model: onnx.ModelProto) -> list[MaskedLayer]:
    """The masked layers of ``model`` in graph order."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    layers: list[MaskedLayer] = []
    for node in graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type not in WEIGHT_INPUT:
            continue
        weight = _mask_pair(node, WEIGHT_INPUT[node.op_type], producers, inits)
        if weight is None:
            continue
        bias = _mask_pair(node, BIAS_INPUT[node.op_type], producers, inits) if node.op_type in BIAS_INPUT else None
        kind = "conv" if node.op_type == "Conv" else "fc"
        layers.append(MaskedLayer(
            name=_layer_name(weight[0], node), kind=kind, op_type=node.op_type,
            weight=weight[0], weight_mask=weight[1],
            bias=bias[0] if bias else None, bias_mask=bias[1] if bias else None,
        ))
    names = [layer.name for layer in layers]
    if len(set(names)) != len(names):  # two layers sharing a name prefix: fall back to weight names
        layers = [dataclasses.replace(layer, name=layer.weight) for layer in layers]
    return layers


def _mask_pair(node: onnx.NodeProto, index: int, producers: dict, inits: dict) -> tuple[str, str] | None:
    if index >= len(node.input) or not node.input[index]:
        return None
    mul = producers.get(node.input[index])
    if mul is None or mul.op_type != "Mul" or mul.domain not in ("", "ai.onnx") or len(mul.input) != 2:
        return None
    w, m = mul.input
    if w in inits and m in inits and m.startswith(f"{w}{MASK_SUFFIX}") and list(inits[w].dims) == list(inits[m].dims):
        return w, m
    return None


def _layer_name(weight: str, node: onnx.NodeProto) -> str:
    for suffix in (".weight", "_weight", ".W"):
        if weight.endswith(suffix) and len(weight) > len(suffix):
            return weight[: -len(suffix)]
    return node.name or weight


def batchnorm_writeback(model: onnx.ModelProto) -> dict[str, str]:
    """Running mean/var outputs of training-mode BatchNormalization -> their running-stat inputs."""
    inits = {i.name for i in model.graph.initializer}
    mapping: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type != "BatchNormalization" or len(node.output) < 3:
            continue
        for out_index, in_index in ((1, 3), (2, 4)):
            if node.output[out_index] and node.input[in_index] in inits:
                mapping[node.output[out_index]] = node.input[in_index]
    return mapping


#: Operator inputs that hold learnable parameters when they are initializers. For the
#: element-wise ops only non-scalar constants count (a bias added after a MatMul, a learned scale).
PARAMETER_INPUTS: dict[str, tuple[int, ...]] = {
    "Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (0, 1, 2), "MatMul": (0, 1),
    "BatchNormalization": (1, 2), "InstanceNormalization": (1, 2), "LayerNormalization": (1, 2),
    "PRelu": (1,), "Add": (0, 1), "Mul": (0, 1),
}
_ELEMENTWISE = {"Add", "Mul"}


def lift_parameter_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with the floating-point ``Constant`` nodes of the main graph that are read at a
    parameter position (:data:`PARAMETER_INPUTS`; BatchNorm's running statistics too) turned into initializers of the same name and
    value (exact). Some exporters (paddle2onnx: the PP-OCR models) store every weight that way;
    only initializers are trained. ``model`` itself is not changed."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    at_parameter = {node.input[i] for node in graph.node if node.domain in ("", "ai.onnx")
                    for i in PARAMETER_INPUTS.get(node.op_type, ()) if i < len(node.input)}
    at_parameter |= {name for node in graph.node if node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx")
                     for name in node.input[3:5]}  # running statistics: frozen state
    lift = []
    for node in graph.node:
        if (node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.attribute) == 1
                and node.attribute[0].name == "value" and node.output[0] in at_parameter
                and node.output[0] not in outputs and node.attribute[0].t.data_type in _FLOAT):
            lift.append(node)
    if not lift:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    lifted = {n.output[0] for n in lift}
    keep = [n for n in out.graph.node if not (n.op_type == "Constant" and n.output and n.output[0] in lifted)]
    tensors = []
    for node in lift:
        tensor = onnx.TensorProto()
        tensor.CopyFrom(node.attribute[0].t)
        tensor.name = node.output[0]
        tensors.append(tensor)
    del out.graph.node[:]
    out.graph.node.extend(keep)
    out.graph.initializer.extend(tensors)
    return out


def select_parameters(model: onnx.ModelProto) -> ParameterSet:
    """Split the initializers for training.

    Trainable: floating-point initializers read at a parameter position of a parametric operator
    (:data:`PARAMETER_INPUTS`; a masked weight counts through its ``Mul``). Frozen: masks and
    BatchNormalization running statistics (they live in the checkpoint state and can be rewritten
    between steps). Every other initializer (shapes, scalars, indices) stays a
    constant of the graph.
    """
    layers = masked_layers(model)
    masks = {m for layer in layers for _, m in layer.params}
    inits = {i.name: i for i in model.graph.initializer}
    running_stats: set[str] = set()
    candidates: set[str] = set()
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type == "BatchNormalization":
            running_stats.update(n for n in node.input[3:5] if n in inits)
        for index in PARAMETER_INPUTS.get(node.op_type, ()):
            name = node.input[index] if index < len(node.input) else ""
            init = inits.get(name)
            if init is None or init.data_type not in _FLOAT:
                continue
            if node.op_type in _ELEMENTWISE and int(np.prod(init.dims)) <= 1:
                continue
            candidates.add(name)
    candidates.update(name for n in model.graph.node for name in _scale_inputs(n, inits))  # one channel too
    frozen_names = masks | running_stats
    trainable = [n for n in inits if n in candidates and n not in frozen_names]
    frozen = [n for n in inits if n in frozen_names]
    trainable_set = set(trainable)
    scales = list(dict.fromkeys(name for n in model.graph.node for name in _scale_inputs(n, inits)
                                if name in trainable_set))
    return ParameterSet(trainable=trainable, frozen=frozen, layers=layers, writeback=batchnorm_writeback(model),
                        scales=scales)


def _scale_inputs(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> list[str]:
    """The channel-scale initializer a node reads: BatchNormalization's gamma, or the floating-point
    operand of a ``Mul`` named as ``insert-channel-scales`` names its scales."""
    if node.domain not in ("", "ai.onnx"):
        return []
    if node.op_type == "BatchNormalization" and len(node.input) > 1:
        return [node.input[1]]
    if node.op_type == "Mul":
        return [n for n in node.input if is_scale_name(n) and n in inits and inits[n].data_type in _FLOAT]
    return []


def layer_density(masks: dict[str, np.ndarray], layer: MaskedLayer) -> float:
    """Fraction of kept entries over the layer's masked parameters (weight, and bias if masked)."""
    kept = sum(int(np.count_nonzero(masks[m])) for _, m in layer.params)
    total = sum(int(masks[m].size) for _, m in layer.params)
    return kept / total if total else 1.0
