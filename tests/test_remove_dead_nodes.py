"""remove-dead-nodes: unused nodes, initializers and opset imports go; the signature stays."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from onnxdns.passes.remove_dead_nodes import RemoveDeadNodesPass
from passkit import (all_call_styles, assert_exact, check_idempotent, init, initializer_arrays, make_model,
                     op_types, roundtrip, same_bytes, tensor_input)

BOOL = onnx.TensorProto.BOOL


def dead_model() -> onnx.ModelProto:
    """y = Relu(x) + w; a dead Neg -> Abs chain, an unused initializer, an unused ai.onnx.ml import;
    ``d`` is an initializer that is also a graph input (kept although unused)."""
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Neg", ["r"], ["dead1"]),
        helper.make_node("Add", ["r", "w"], ["y"]),
        helper.make_node("Abs", ["dead1"], ["dead2"]),
        helper.make_node("Mul", ["unused_w", "unused_w"], ["dead3"]),
    ]
    inits = [init("w", np.arange(3, dtype=np.float32)), init("unused_w", np.ones(3, np.float32)),
             init("lonely", np.ones(2, np.float32)), init("d", np.zeros(3, np.float32))]
    model = make_model(nodes, [tensor_input("x", ["N", 3]), tensor_input("d", [3])], [tensor_input("y", ["N", 3])],
                       inits)
    model.opset_import.append(helper.make_opsetid("ai.onnx.ml", 3))
    return model


def test_removes_dead_nodes_initializers_and_opsets():
    model = dead_model()
    result = RemoveDeadNodesPass().apply(model)
    assert result.modified
    assert op_types(result.model) == ["Relu", "Add"]
    assert sorted(initializer_arrays(result.model)) == ["d", "w"]
    assert [i.domain for i in result.model.opset_import] == [""]
    assert [i.name for i in result.model.graph.input] == ["x", "d"]
    assert result.details["removed"]["nodes"] == 3
    assert_exact(model, result.model)
    onnx.checker.check_model(result.model, full_check=True)


def test_used_domain_is_kept():
    model = dead_model()
    model.graph.node.append(helper.make_node("Normalizer", ["r"], ["n"], domain="ai.onnx.ml", norm="MAX"))
    model.graph.output.append(tensor_input("n", None))
    result = RemoveDeadNodesPass().apply(model)
    assert sorted(i.domain for i in result.model.opset_import) == ["", "ai.onnx.ml"]
    assert_exact(model, result.model)


def test_dropping_an_unused_optional_output_counts_as_modified():
    nodes = [helper.make_node("Dropout", ["x"], ["y", "mask"])]
    model = make_model(nodes, [tensor_input("x", [2, 3])], [tensor_input("y", [2, 3])])
    result = RemoveDeadNodesPass().apply(model)
    assert result.modified
    assert list(result.model.graph.node[0].output) == ["y"]
    assert_exact(model, result.model)
    check_idempotent(RemoveDeadNodesPass, model)


def test_subgraph_dead_nodes_and_outer_uses():
    then = helper.make_graph([helper.make_node("Neg", ["s"], ["t"]), helper.make_node("Abs", ["t"], ["dead"])],
                             "then", [], [tensor_input("t", [2, 3])])
    other = helper.make_graph([helper.make_node("Identity", ["s"], ["e"])], "else", [], [tensor_input("e", [2, 3])])
    nodes = [helper.make_node("Sigmoid", ["x"], ["s"]),  # used only inside the branches
             helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)]
    model = make_model(nodes, [tensor_input("x", [2, 3]), tensor_input("c", [], BOOL)], [tensor_input("y", [2, 3])])
    result = RemoveDeadNodesPass().apply(model)
    assert result.modified
    assert op_types(result.model) == ["Sigmoid", "If"]
    then_out = next(a.g for a in result.model.graph.node[1].attribute if a.name == "then_branch")
    assert [n.op_type for n in then_out.node] == ["Neg"]
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    for c in (True, False):
        assert_exact(model, result.model, feeds={"x": x, "c": np.array(c)})


def test_clean_model_is_untouched():
    nodes = [helper.make_node("Relu", ["x"], ["y"])]
    model = make_model(nodes, [tensor_input("x", [2])], [tensor_input("y", [2])])
    result = RemoveDeadNodesPass().apply(model)
    assert not result.modified
    assert same_bytes(result.model, roundtrip(model))


def test_call_styles_and_idempotence():
    model = dead_model()
    for style, out, modified in all_call_styles(RemoveDeadNodesPass, model):
        assert modified in (True, None), style
        assert op_types(out) == ["Relu", "Add"], style
        assert_exact(model, out)
    check_idempotent(RemoveDeadNodesPass, model)
