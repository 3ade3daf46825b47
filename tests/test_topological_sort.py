"""topo-sort: unsorted graphs and subgraphs get sorted; modified is honest."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper
from onnx_ir.passes.common import TopologicalSortPass as IrTopologicalSortPass

from onnxdns.errors import OnnxdnsError
from onnxdns.passes.topological_sort import TopologicalSortPass
from passkit import (all_call_styles, assert_exact, check_idempotent, make_model, op_types, roundtrip, run,
                     same_bytes, tensor_input)


def unsorted_model() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Add", ["a", "b"], ["y"]),
        helper.make_node("Relu", ["x"], ["a"]),
        helper.make_node("Neg", ["a"], ["b"]),
    ]
    return make_model(nodes, [tensor_input("x", [2, 3])], [tensor_input("y", [2, 3])])


def test_sorts_and_stays_exact():
    model = unsorted_model()
    result = TopologicalSortPass().apply(model)
    assert result.modified
    assert op_types(result.model) == ["Relu", "Neg", "Add"]
    onnx.checker.check_model(result.model, full_check=True)
    assert_exact(model, result.model, rel=0)


def test_sorted_graph_is_untouched():
    model = unsorted_model()
    sorted_model = TopologicalSortPass()(model)
    result = TopologicalSortPass().apply(sorted_model)
    assert not result.modified
    assert same_bytes(result.model, roundtrip(sorted_model))


def unsorted_subgraph_model() -> onnx.ModelProto:
    then = helper.make_graph([helper.make_node("Neg", ["t0"], ["t"]), helper.make_node("Abs", ["x"], ["t0"])],
                             "then", [], [tensor_input("t", [2])])
    other = helper.make_graph([helper.make_node("Relu", ["x"], ["e"])], "else", [], [tensor_input("e", [2])])
    nodes = [helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)]
    return make_model(nodes, [tensor_input("x", [2]), tensor_input("c", [], onnx.TensorProto.BOOL)],
                      [tensor_input("y", [2])])


def test_subgraph_sort_counts_as_modified():
    model = unsorted_subgraph_model()
    assert not IrTopologicalSortPass()(ir.serde.deserialize_model(model)).modified  # onnx-ir misses it
    result = TopologicalSortPass().apply(model)
    assert result.modified and result.details["moved_nodes"] == 2
    then = next(a.g for a in result.model.graph.node[0].attribute if a.name == "then_branch")
    assert [n.op_type for n in then.node] == ["Abs", "Neg"]
    onnx.checker.check_model(result.model, full_check=True)
    x = np.array([-1.0, 2.0], np.float32)  # onnxruntime refuses the unsorted branch: compare with numpy
    for c, expected in ((True, -np.abs(x)), (False, np.maximum(x, 0))):
        np.testing.assert_array_equal(run(result.model, {"x": x, "c": np.array(c)})[0], expected)


def test_call_styles_and_idempotence():
    model = unsorted_model()
    for style, out, modified in all_call_styles(TopologicalSortPass, model):
        assert modified in (True, None), style
        assert op_types(out) == ["Relu", "Neg", "Add"], style
    check_idempotent(TopologicalSortPass, model)


def test_cycle_is_a_user_error():
    nodes = [helper.make_node("Add", ["x", "b"], ["a"]), helper.make_node("Neg", ["a"], ["b"]),
             helper.make_node("Relu", ["a"], ["y"])]
    model = make_model(nodes, [tensor_input("x", [2])], [tensor_input("y", [2])])
    with pytest.raises(OnnxdnsError, match="cannot be sorted"):
        TopologicalSortPass().apply(model)
