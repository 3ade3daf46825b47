"""infer-shapes: values get static shapes (data propagation), modified only on real changes."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper

from onnxdns.errors import OnnxdnsError
from onnxdns.passes.infer_shapes import InferShapesPass, infer_proto
from passkit import (all_call_styles, assert_exact, check_idempotent, init, make_model, roundtrip, same_bytes,
                     tensor_input)


def reshape_model() -> onnx.ModelProto:
    """A big weight first, then Reshape(x, Concat(Shape(x)[0:1], [-1])): needs data propagation."""
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Shape", ["h"], ["s"], end=1),
        helper.make_node("Concat", ["s", "minus1"], ["target"], axis=0),
        helper.make_node("Reshape", ["h", "target"], ["y"]),
    ]
    inits = [init("w", np.ones((3, 300), np.float32)), init("minus1", np.array([-1], np.int64))]
    return make_model(nodes, [tensor_input("x", [2, 4, 3])], [tensor_input("y", None)], inits)


def shapes(model: onnx.ModelProto) -> dict[str, list]:
    """Annotated shapes of the node outputs (onnx-ir also writes value_info for initializers)."""
    weights = {t.name for t in model.graph.initializer}
    infos = [i for i in list(model.graph.value_info) + list(model.graph.output) if i.name not in weights]
    return {i.name: [d.dim_value if d.HasField("dim_value") else d.dim_param for d in i.type.tensor_type.shape.dim]
            for i in infos if i.type.tensor_type.HasField("shape")}


def test_infers_static_shapes_with_data_propagation():
    model = reshape_model()
    result = InferShapesPass().apply(model)
    assert result.modified and result.details["annotated_values"] == 4
    assert shapes(result.model) == {"h": [2, 4, 300], "s": [1], "target": [2], "y": [2, 1200]}
    assert [t.name for t in result.model.graph.initializer] == ["w", "minus1"]  # order kept
    assert_exact(model, result.model, rel=0)


@pytest.mark.parametrize("weight_is_input", [False, True])
def test_infer_proto_leaves_the_model_unchanged_and_sends_no_large_weights(weight_is_input):
    """Large weights go to ONNX shape inference as typed inputs, without their values; afterwards the
    model has the same inputs, initializers (order, values) and annotations as before."""
    proto = reshape_model()
    if weight_is_input:  # as torch's keep_initializers_as_inputs exports write them
        proto.graph.input.append(tensor_input("w", [3, 300]))
    ir_model = ir.serde.deserialize_model(proto)
    before = ir.serde.serialize_model(ir_model).SerializeToString(deterministic=True)
    inferred = infer_proto(ir_model)
    assert ir.serde.serialize_model(ir_model).SerializeToString(deterministic=True) == before
    assert [t.name for t in inferred.graph.initializer] == ["minus1"]  # 3600 bytes of "w" not copied
    assert [i.name for i in inferred.graph.input] == ["x", "w"]
    assert {i.name for i in inferred.graph.value_info} >= {"h", "s", "target"}


def test_already_annotated_model_is_untouched():
    annotated = InferShapesPass()(reshape_model())
    result = InferShapesPass().apply(annotated)
    assert not result.modified
    assert same_bytes(result.model, roundtrip(annotated))


def test_symbolic_dimensions_survive():
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Transpose", ["r"], ["y"], perm=[1, 0])]
    model = make_model(nodes, [tensor_input("x", ["N", 3])], [tensor_input("y", None)])
    result = InferShapesPass().apply(model)
    assert shapes(result.model) == {"r": ["N", 3], "y": [3, "N"]}
    check_idempotent(InferShapesPass, model)


def test_inconsistent_annotation():
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Neg", ["r"], ["y"])]
    model = make_model(nodes, [tensor_input("x", [2, 3])], [tensor_input("y", [2, 3])],
                       value_info=[tensor_input("r", [5])])
    with pytest.raises(OnnxdnsError, match="shape inference failed"):
        InferShapesPass(strict=True).apply(model)
    assert not InferShapesPass().apply(model).modified  # best effort leaves it


def test_subgraph_values_are_annotated():
    then = helper.make_graph([helper.make_node("Neg", ["x"], ["t0"]), helper.make_node("Abs", ["t0"], ["t"])],
                             "then", [], [tensor_input("t", None)])
    other = helper.make_graph([helper.make_node("Relu", ["x"], ["e"])], "else", [], [tensor_input("e", None)])
    nodes = [helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)]
    model = make_model(nodes, [tensor_input("x", [2, 5]), tensor_input("c", [], onnx.TensorProto.BOOL)],
                       [tensor_input("y", None)])
    out = InferShapesPass()(model)
    then_out = next(a.g for a in out.graph.node[0].attribute if a.name == "then_branch")
    assert shapes(onnx.helper.make_model(then_out)) == {"t0": [2, 5], "t": [2, 5]}


def test_call_styles_and_idempotence():
    model = reshape_model()
    for style, out, modified in all_call_styles(InferShapesPass, model):
        assert modified in (True, None), style
        assert shapes(out)["y"] == [2, 1200], style
    check_idempotent(InferShapesPass, model)
