"""Instrument prunable weights with frozen masks: ``op(X, W)`` becomes ``op(X, Mul(W, W__mask))``."""

from __future__ import annotations

from typing import ClassVar, Iterable

import numpy as np
import onnx_ir as ir

from onnxdns import graphutil
from onnxdns.errors import OnnxdnsError
from onnxdns.framework import GraphPass, PassReport

#: Weight / bias input positions of the operators this pass can mask.
WEIGHT_INPUT = {"Conv": 1, "Gemm": 1, "MatMul": 1}
BIAS_INPUT = {"Conv": 2, "Gemm": 2}
#: Suffix of a mask initializer: the mask of ``fc1.weight`` is ``fc1.weight__mask``.
MASK_SUFFIX = "__mask"
_FLOAT_TYPES = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16}


class AddMasksPass(GraphPass):
    """Route every prunable constant weight through ``Mul(W, mask)`` with a frozen mask initializer.

    For each ``Conv`` / ``Gemm`` / ``MatMul`` (configurable) whose weight input is a floating-point
    initializer, adds the initializer ``<weight>__mask`` (same shape and type) and a node
    ``Mul(<weight>, <weight>__mask)`` feeding the operator; with ``biases=True`` the bias input of
    ``Conv`` / ``Gemm`` is masked the same way. Masks are all ones (``from_sparsity=False``), so
    the pass is **exact** (``W * 1 == W`` bitwise), or ``W != 0`` (``from_sparsity=True``), which is
    also exact because masked entries are already zero.

    Masks are what DNS and magnitude pruning train (``onnxdns train``) and what the ``fold-masks``
    pass folds back (``W * mask`` becomes one constant, the masks disappear).

    A weight read through ``Identity`` (how torch's exporter shares equal initializers) is masked
    once for all its readers and the unused ``Identity`` nodes are removed.

    Idempotent: an operator whose input is already such a ``Mul`` is skipped, and a weight that
    already has a mask reuses its ``Mul`` for any operator still reading it directly.
    Preconditions: none (a model without prunable constant weights is left unchanged).
    """

    name: ClassVar[str] = "add-masks"
    exact: ClassVar[bool] = True
    summary: ClassVar[str] = "route Conv/Gemm/MatMul weights through Mul(W, W__mask) with frozen all-ones masks"

    def __init__(self, ops: Iterable[str] = ("Conv", "Gemm", "MatMul"), *, biases: bool = False,
                 from_sparsity: bool = False) -> None:
        super().__init__()
        self.ops = tuple(ops)
        unknown = [op for op in self.ops if op not in WEIGHT_INPUT]
        if unknown:
            raise OnnxdnsError(f"add-masks: cannot mask weights of {', '.join(unknown)}; "
                               f"supported: {', '.join(WEIGHT_INPUT)}")
        self.biases = biases
        self.from_sparsity = from_sparsity

    def __repr__(self) -> str:
        return f"AddMasksPass(ops={self.ops!r}, biases={self.biases}, from_sparsity={self.from_sparsity})"

    def call(self, model: ir.Model) -> PassReport:
        graph = model.graph
        masked: dict[str, str] = {}
        copies: list[ir.Node] = []
        for node, index in list(self._targets(graph)):
            weight, chain = _through_identities(node.inputs[index])
            copies += chain
            masked_value = self._masked_value(graph, node, weight)
            node.replace_input_with(index, masked_value)
            masked[weight.name] = masked_value.producer().inputs[1].name
        for copy in copies:  # Identity chains left without readers, reader side first
            if copy.graph is graph and not copy.outputs[0].uses() and not copy.outputs[0].is_graph_output():
                graph.remove(copy, safe=True)
        return PassReport(model, bool(masked), {"masked": masked})

    def _targets(self, graph: ir.Graph) -> Iterable[tuple[ir.Node, int]]:
        """(node, input index) of every prunable input that is still an unmasked initializer."""
        for node in graph:
            if node.domain not in ("", "ai.onnx") or node.op_type not in self.ops:
                continue
            indices = [WEIGHT_INPUT[node.op_type]]
            if self.biases and node.op_type in BIAS_INPUT:
                indices.append(BIAS_INPUT[node.op_type])
            if node.op_type == "MatMul" and graphutil.is_initializer(node.inputs[0]):
                continue  # constant on the left: not a layer weight
            for index in indices:
                value = node.inputs[index] if index < len(node.inputs) else None
                value = _through_identities(value)[0] if value is not None else None
                if (graphutil.is_initializer(value) and value.const_value is not None
                        and value.const_value.dtype in _FLOAT_TYPES and not _is_mask_name(value.name)):
                    yield node, index

    def _masked_value(self, graph: ir.Graph, node: ir.Node, weight: ir.Value) -> ir.Value:
        """The output of ``Mul(weight, mask)``: an existing one, or a new one before ``node``."""
        existing = mask_mul_of(weight)
        if existing is not None:
            return existing.outputs[0]
        array = weight.const_value.numpy()
        mask = (array != 0) if self.from_sparsity else np.ones(array.shape, dtype=bool)
        mask_value = graphutil.add_initializer(graph, mask.astype(array.dtype), f"{weight.name}{MASK_SUFFIX}")
        mul = ir.Node("", "Mul", [weight, mask_value], name=graphutil.unique_name(graph, f"{weight.name}__mask_mul"),
                      num_outputs=1)
        out = mul.outputs[0]
        out.name = graphutil.unique_name(graph, f"{weight.name}__masked")
        out.shape = ir.Shape(array.shape)
        out.type = weight.type
        first_user = _first_user(graph, weight, default=node)
        graph.insert_before(first_user, mul)
        return out


def mask_mul_of(weight: ir.Value) -> ir.Node | None:
    """The ``Mul(weight, <weight>__mask)`` node reading ``weight``, if the weight is masked."""
    for use in weight.uses():
        node = use.node
        if node.op_type == "Mul" and node.domain in ("", "ai.onnx") and use.idx == 0 and len(node.inputs) == 2:
            mask = node.inputs[1]
            if (graphutil.is_initializer(mask) and mask.name.startswith(f"{weight.name}{MASK_SUFFIX}")
                    and graphutil.static_shape(mask) == graphutil.static_shape(weight)):
                return node
    return None


def _through_identities(value: ir.Value) -> tuple[ir.Value, list[ir.Node]]:
    """The value an ``Identity`` chain copies and the chain's nodes (reader side first).

    torch's legacy exporter stores equal initializers once (all-zero biases of an untrained model,
    BN-folded biases) and gives the other readers ``Identity(B)``: those layers are masked through
    the same ``Mul(B, B__mask)``, so ``B`` keeps one consumer.
    """
    chain = []
    while (producer := value.producer()) is not None and producer.op_type == "Identity" \
            and producer.domain in ("", "ai.onnx") and len(producer.inputs) == 1 and producer.inputs[0] is not None:
        chain.append(producer)
        value = producer.inputs[0]
    return value, chain


def _is_mask_name(name: str | None) -> bool:
    return bool(name) and MASK_SUFFIX in name


def _first_user(graph: ir.Graph, value: ir.Value, default: ir.Node) -> ir.Node:
    users = {id(u.node) for u in value.uses()}
    for node in graph:
        if id(node) in users:
            return node
    return default
