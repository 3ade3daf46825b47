"""Static shape and type inference (ONNX shape inference with data propagation)."""

from __future__ import annotations

import onnx
import onnx_ir as ir

from onnxdns.errors import OnnxdnsError
from onnxdns.framework import GraphPass, PassReport


class InferShapesPass(GraphPass):
    """Annotate every value with the shape and element type ONNX shape inference finds.

    Guarantee: exact (only type annotations change, never the computation).

    Runs ``onnx.shape_inference.infer_shapes`` with data propagation (so e.g. a ``Reshape`` fed
    by ``Shape -> Gather -> Concat`` gets a static shape) on the main graph and subgraphs, then
    copies every inferred shape/type that differs from the current one onto the value.
    ``modified`` is true only when some value's shape or type actually changed. With
    ``strict=True`` an inference error (an inconsistent model) raises :class:`OnnxdnsError`;
    otherwise inference is best-effort and a failure leaves the model unchanged.

    Weights are not copied for inference: initializers over 1 KiB are passed as typed inputs.
    Uses only public APIs of onnx (``onnx.shape_inference``) and onnx-ir (``serde``, graph
    inputs and initializers), so new releases of either do not break it.
    """

    name = "infer-shapes"
    exact = True
    summary = "annotate values with shapes/types from ONNX shape inference (data propagation on)"

    def __init__(self, strict: bool = False, data_prop: bool = True) -> None:
        super().__init__()
        self.strict = strict
        self.data_prop = data_prop

    def __repr__(self) -> str:
        return f"InferShapesPass(strict={self.strict}, data_prop={self.data_prop})"

    def call(self, model: ir.Model) -> PassReport:
        try:
            inferred = infer_proto(model, strict=self.strict, data_prop=self.data_prop)
        except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, RuntimeError) as e:
            if self.strict:
                raise OnnxdnsError(f"infer-shapes: shape inference failed: {str(e).strip().splitlines()[0]}") from None
            return PassReport(model, False, {"error": str(e).strip().splitlines()[0]})
        changed = _merge(model, ir.serde.deserialize_model(inferred))
        return PassReport(model, bool(changed), {"annotated_values": changed})


def infer_proto(model: ir.Model, *, strict: bool = False, data_prop: bool = True,
                trust_annotations: bool = True) -> onnx.ModelProto:
    """Run ONNX shape inference on ``model`` (left unchanged) and return the inferred proto.

    The returned proto lacks the values of initializers over 1 KiB (they appear as typed graph
    inputs). With ``trust_annotations=False`` the model's ``value_info`` and output shapes are
    ignored, so shapes derive from the graph inputs and initializers alone.
    """

    def infer(proto: onnx.ModelProto) -> onnx.ModelProto:
        if not trust_annotations:
            del proto.graph.value_info[:]
            for out in proto.graph.output:
                if out.type.HasField("tensor_type"):
                    out.type.tensor_type.ClearField("shape")
        return onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=strict, data_prop=data_prop)

    return infer(_proto_without_large_weights(model))


#: Initializers larger than this (bytes) go to shape inference as typed graph inputs, not values.
LARGE_WEIGHT_BYTES = 1024


def _proto_without_large_weights(model: ir.Model) -> onnx.ModelProto:
    """Serialize ``model`` with every initializer over :data:`LARGE_WEIGHT_BYTES` turned into a typed
    graph input (shape inference needs the types and shapes, not the values); ``model`` is
    restored before returning: same inputs, initializers, order and values."""
    graph = model.graph
    initializers = list(graph.initializers.values())
    large = [v for v in initializers if v.const_value is not None and v.const_value.nbytes > LARGE_WEIGHT_BYTES]
    if not large:
        return ir.serde.serialize_model(model)
    annotations = [(v.shape, v.type) for v in large]
    n_inputs = len(graph.inputs)
    try:
        for value in large:
            if value.shape is None:
                value.shape = value.const_value.shape
            if value.type is None:
                value.dtype = value.const_value.dtype
            graph.initializers.pop(value.name)
            if value not in graph.inputs:
                graph.inputs.append(value)
        return ir.serde.serialize_model(model)
    finally:
        while len(graph.inputs) > n_inputs:
            graph.inputs.pop()
        for name in list(graph.initializers):
            graph.initializers.pop(name)
        for value in initializers:
            graph.initializers[value.name] = value
        for value, (shape, type_) in zip(large, annotations):
            value.shape, value.type = shape, type_


def _merge(model: ir.Model, inferred: ir.Model) -> int:
    """Copy inferred shapes/types that differ onto the model's values; returns how many changed."""
    changed = 0
    for graph, inferred_graph in zip(model.graphs(), inferred.graphs()):
        known = ir.convenience.create_value_mapping(inferred_graph, include_subgraphs=False)
        for name, value in ir.convenience.create_value_mapping(graph, include_subgraphs=False).items():
            other = known.get(name)
            if other is None:
                continue
            touched = False
            if other.type is not None and value.type != other.type:
                value.type = other.type
                touched = True
            if other.shape is not None and value.shape != other.shape:
                value.shape = other.shape
                touched = True
            changed += touched
    return changed
