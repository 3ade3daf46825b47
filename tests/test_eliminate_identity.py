"""eliminate-identity: Identity, inference Dropout and no-op Gather removed, graph output names stable."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper
from onnx_ir.passes.common import IdentityEliminationPass

from onnxdns.passes.eliminate_identity import EliminateIdentityPass
from passkit import (all_call_styles, assert_exact, check_idempotent, init, make_model, op_types, roundtrip,
                     same_bytes, tensor_input)

BOOL = onnx.TensorProto.BOOL


def chain(*middle: onnx.NodeProto, inits=(), extra_inputs=(), outputs=("y",)) -> onnx.ModelProto:
    """x -> Relu -> r -> <middle> -> m -> Neg -> y."""
    nodes = [helper.make_node("Relu", ["x"], ["r"]), *middle, helper.make_node("Neg", ["m"], ["y"])]
    return make_model(nodes, [tensor_input("x", ["N", 4]), *extra_inputs], [tensor_input(o, None) for o in outputs],
                      inits)


def output_names(model: onnx.ModelProto) -> list[str]:
    return [o.name for o in model.graph.output]


@pytest.mark.parametrize("middle, inits", [
    ([helper.make_node("Identity", ["r"], ["m"])], []),
    ([helper.make_node("Identity", ["r"], ["i"]), helper.make_node("Identity", ["i"], ["m"])], []),
    ([helper.make_node("Dropout", ["r"], ["m"])], []),
    ([helper.make_node("Dropout", ["r", "ratio"], ["m", "mask"])], [init("ratio", np.float32(0.3))]),
    ([helper.make_node("Dropout", ["r", "ratio", "train"], ["m"])],
     [init("ratio", np.float32(0.3)), init("train", np.array(False))]),
])
def test_removed_exactly(middle, inits):
    model = chain(*middle, inits=inits)
    result = EliminateIdentityPass().apply(model)
    assert result.modified
    assert op_types(result.model) == ["Relu", "Neg"]
    assert output_names(result.model) == ["y"]
    assert_exact(model, result.model)


@pytest.mark.parametrize("indices, axis, removed", [
    ([0, 1, 2, 3], 1, True),        # everything in order: a copy
    ([0, 1, -2, -1], -1, True),     # negative indices name the same positions
    ([1, 0, 2, 3], 1, False),       # a permutation
    ([0, 1, 2], 1, False),          # a subset
])
def test_gather_selecting_everything(indices, axis, removed):
    model = chain(helper.make_node("Gather", ["r", "idx"], ["m"], axis=axis),
                  inits=[init("idx", np.array(indices, np.int64))])
    result = EliminateIdentityPass().apply(model)
    assert result.modified is removed
    assert ("Gather" in op_types(result.model)) is not removed
    assert_exact(model, result.model)


def test_gather_over_an_axis_of_unknown_size_is_kept():
    model = make_model([helper.make_node("Gather", ["x", "idx"], ["y"], axis=1)], [tensor_input("x", ["N", "C"])],
                       [tensor_input("y", None)], [init("idx", np.arange(4, dtype=np.int64))])
    assert not EliminateIdentityPass().apply(model).modified


@pytest.mark.parametrize("case", ["training_input", "training_true", "mask_used"])
def test_training_dropout_is_kept(case):
    if case == "training_input":
        model = chain(helper.make_node("Dropout", ["r", "", "train"], ["m"]),
                      extra_inputs=[tensor_input("train", [], BOOL)])
    elif case == "training_true":
        model = chain(helper.make_node("Dropout", ["r", "", "train"], ["m"]), inits=[init("train", np.array(True))])
    else:
        model = chain(helper.make_node("Dropout", ["r"], ["m", "mask"]), outputs=("y", "mask"))
        model.graph.output[1].type.tensor_type.elem_type = BOOL
    result = EliminateIdentityPass().apply(model)
    assert not result.modified
    assert same_bytes(result.model, roundtrip(model))


def test_old_opset_dropout_needs_is_test():
    kept = chain(helper.make_node("Dropout", ["r"], ["m"], is_test=0))
    removed = chain(helper.make_node("Dropout", ["r"], ["m"], is_test=1))
    for model in (kept, removed):
        model.opset_import[0].version = 6
    assert not EliminateIdentityPass().apply(kept).modified
    assert op_types(EliminateIdentityPass().apply(removed).model) == ["Relu", "Neg"]


def output_identity_model(kind: str) -> onnx.ModelProto:
    relu = helper.make_node("Relu", ["x"], ["r"])
    if kind == "renames_producer":  # y = Identity(r): r becomes y
        return make_model([relu, helper.make_node("Identity", ["r"], ["y"])], [tensor_input("x", [2, 3])],
                          [tensor_input("y", [2, 3])])
    if kind == "two_outputs_one_value":
        copies = [helper.make_node("Identity", ["r"], ["y1"]), helper.make_node("Identity", ["r"], ["y2"])]
        return make_model([relu, *copies],
                          [tensor_input("x", [2, 3])], [tensor_input("y1", [2, 3]), tensor_input("y2", [2, 3])])
    if kind == "copy_of_output":
        return make_model([relu, helper.make_node("Identity", ["r"], ["y"])], [tensor_input("x", [2, 3])],
                          [tensor_input("r", [2, 3]), tensor_input("y", [2, 3])])
    if kind == "copy_of_input":
        return make_model([helper.make_node("Identity", ["x"], ["y"]), relu], [tensor_input("x", [2, 3])],
                          [tensor_input("y", [2, 3]), tensor_input("r", [2, 3])])
    assert kind == "copy_of_initializer"
    return make_model([relu, helper.make_node("Identity", ["c"], ["y"])], [tensor_input("x", [2, 3])],
                      [tensor_input("r", [2, 3]), tensor_input("y", [3])], [init("c", np.ones(3, np.float32))])


@pytest.mark.parametrize("kind, ops_after", [
    ("renames_producer", ["Relu"]),
    ("two_outputs_one_value", ["Relu", "Identity"]),
    ("copy_of_output", ["Relu", "Identity"]),
    ("copy_of_input", ["Identity", "Relu"]),
    ("copy_of_initializer", ["Relu", "Identity"]),
])
def test_graph_output_names_and_values_stay(kind, ops_after):
    model = output_identity_model(kind)
    result = EliminateIdentityPass().apply(model)
    assert op_types(result.model) == ops_after
    assert result.modified == (len(ops_after) < len(model.graph.node))
    assert_exact(model, result.model)  # checks the output names too
    onnx.checker.check_model(result.model, full_check=True)


@pytest.mark.parametrize("kind", ["two_outputs_one_value", "copy_of_output"])
def test_onnx_ir_identity_elimination_loses_output_names(kind):
    """Why the pass has its own rules: onnx-ir 1.1.0's pass renames graph outputs here."""
    model = output_identity_model(kind)
    ir_model = ir.serde.deserialize_model(model)
    IdentityEliminationPass()(ir_model)
    names = [o.name for o in ir_model.graph.outputs]
    assert names != output_names(model) and len(set(names)) == 1


def if_model(inner_local: bool) -> onnx.ModelProto:
    """An If whose branches end in Identity: of a local value, or of an outer one."""
    src = "t" if inner_local else "r"
    then_nodes = ([helper.make_node("Neg", ["r"], ["t"])] if inner_local else []) + \
        [helper.make_node("Identity", [src], ["then_out"])]
    then = helper.make_graph(then_nodes, "then", [], [tensor_input("then_out", [2, 3])])
    other = helper.make_graph([helper.make_node("Abs", ["r"], ["else_out"])], "else", [],
                              [tensor_input("else_out", [2, 3])])
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)]
    return make_model(nodes, [tensor_input("x", [2, 3]), tensor_input("c", [], BOOL)],
                      [tensor_input("r", [2, 3]), tensor_input("y", [2, 3])])


@pytest.mark.parametrize("inner_local", [True, False])
def test_subgraph_identities(inner_local):
    model = if_model(inner_local)
    result = EliminateIdentityPass().apply(model)
    assert result.modified == inner_local
    then = next(a.g for a in result.model.graph.node[1].attribute if a.name == "then_branch")
    assert [n.op_type for n in then.node] == (["Neg"] if inner_local else ["Identity"])
    assert [o.name for o in then.output] == ["then_out"]
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    for c in (True, False):
        assert_exact(model, result.model, feeds={"x": x, "c": np.array(c)})


def test_call_styles_and_idempotence():
    model = chain(helper.make_node("Identity", ["r"], ["i"]), helper.make_node("Dropout", ["i"], ["m"]))
    for style, out, modified in all_call_styles(EliminateIdentityPass, model):
        assert modified in (True, None), style
        assert op_types(out) == ["Relu", "Neg"], style
        assert_exact(model, out)
    check_idempotent(EliminateIdentityPass, model)
