"""fold-constants: constant subgraphs and static Shape/Size become initializers, exactly."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import helper

from onnxdns import runtime
from onnxdns.passes import fold_constants
from onnxdns.passes.fold_constants import FoldConstantsPass
from passkit import (all_call_styles, assert_exact, check_idempotent, init, initializer_arrays, make_model,
                     op_types, roundtrip, run, same_bytes, tensor_input)

INT64 = onnx.TensorProto.INT64
RNG = np.random.default_rng(3)


def const_node(name: str, array: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=onnx.numpy_helper.from_array(array, name))


def weight_chain_model() -> onnx.ModelProto:
    """y = x @ Transpose(w * Constant(scale) + b); z = Relu(Constant k) feeds a Mul with x @ ..."""
    nodes = [
        const_node("scale", np.float32(0.5)),
        helper.make_node("Mul", ["w", "scale"], ["ws"]),
        helper.make_node("Add", ["ws", "b"], ["wsb"]),
        helper.make_node("Transpose", ["wsb"], ["wt"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "wt"], ["h"]),
        const_node("k", np.full((1, 5), -2.0, np.float32)),
        helper.make_node("Mul", ["h", "k"], ["y"]),  # k stays a Constant node: nothing to fold
    ]
    inits = [init("w", RNG.standard_normal((5, 4)).astype(np.float32)),
             init("b", RNG.standard_normal(4).astype(np.float32))]
    return make_model(nodes, [tensor_input("x", ["N", 4])], [tensor_input("y", ["N", 5])], inits)


def test_constant_chain_becomes_one_initializer():
    model = weight_chain_model()
    result = FoldConstantsPass().apply(model)
    assert result.modified
    assert op_types(result.model) == ["MatMul", "Constant", "Mul"]
    assert sorted(initializer_arrays(result.model)) == ["wt"]
    assert result.details["new_initializers"] == ["wt"]
    assert_exact(model, result.model, rel=0)
    onnx.checker.check_model(result.model, full_check=True)


def test_graph_input_defaults_and_random_ops_are_not_constants():
    nodes = [
        helper.make_node("Add", ["d", "d"], ["d2"]),  # d is a graph input with a default initializer
        helper.make_node("RandomNormal", [], ["noise"], shape=[3], seed=1.0),
        helper.make_node("Mul", ["noise", "c"], ["n2"]),
        helper.make_node("Add", ["d2", "n2"], ["y"]),
    ]
    model = make_model(nodes, [tensor_input("d", [3])], [tensor_input("y", [3])],
                       [init("d", np.ones(3, np.float32)), init("c", np.ones(3, np.float32))])
    result = FoldConstantsPass().apply(model)
    assert not result.modified
    assert same_bytes(result.model, roundtrip(model))


@pytest.mark.parametrize("training, folds", [(None, True), (False, True), (True, False)])
def test_dropout_folds_only_in_inference_mode(training, folds):
    inputs = ["w"] if training is None else ["w", "", "t"]
    inits = [init("w", np.ones((2, 3), np.float32))]
    if training is not None:
        inits.append(init("t", np.array(training)))
    nodes = [helper.make_node("Dropout", inputs, ["wd"]), helper.make_node("Add", ["x", "wd"], ["y"])]
    model = make_model(nodes, [tensor_input("x", [2, 3])], [tensor_input("y", [2, 3])], inits)
    result = FoldConstantsPass().apply(model)
    assert result.modified == folds
    if folds:
        assert op_types(result.model) == ["Add"]
        assert_exact(model, result.model, rel=0)


def test_quantized_weights_stay_quantized():
    nodes = [helper.make_node("DequantizeLinear", ["q", "s"], ["w"]), helper.make_node("MatMul", ["x", "w"], ["y"])]
    inits = [init("q", RNG.integers(-100, 100, (4, 3)).astype(np.int8)), init("s", np.float32(0.1))]
    model = make_model(nodes, [tensor_input("x", [2, 4])], [tensor_input("y", [2, 3])], inits)
    assert not FoldConstantsPass().apply(model).modified


def shape_model(x_shape, start=None) -> onnx.ModelProto:
    """y = Reshape(x, Concat([-1], Shape(x)[start:])) + Size(x)."""
    kw = {} if start is None else {"start": start}
    nodes = [
        helper.make_node("Shape", ["x"], ["s"], **kw),
        helper.make_node("Concat", ["minus1", "s"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["r"]),
        helper.make_node("Size", ["x"], ["n"]),
        helper.make_node("Cast", ["n"], ["nf"], to=onnx.TensorProto.FLOAT),
        helper.make_node("Add", ["r", "nf"], ["y"]),
    ]
    return make_model(nodes, [tensor_input("x", x_shape)], [tensor_input("y", None)],
                      [init("minus1", np.array([-1], np.int64))])


@pytest.mark.parametrize("start", [None, 1, -1])
def test_static_shape_and_size_fold_exactly(start):
    model = shape_model([2, 3, 4], start)
    result = FoldConstantsPass().apply(model)
    assert result.modified and result.details["shape_folds"] == 2
    assert op_types(result.model) == ["Reshape", "Add"]
    assert_exact(model, result.model, rel=0)
    assert not FoldConstantsPass(fold_shapes=False).apply(model).modified


def test_dynamic_shape_is_not_folded():
    model = shape_model(["N", 3, 4], start=1)
    result = FoldConstantsPass().apply(model)
    assert not result.modified


def test_graphsurgeon_fold_constants_gets_shape_start_and_random_wrong():
    """Why this pass does not call gs.Graph.fold_constants (onnx-graphsurgeon 0.6.1)."""
    model = onnx.shape_inference.infer_shapes(shape_model([1, 2, 3], start=1))
    graph = gs.import_onnx(model)
    graph.fold_constants().cleanup()
    folded = gs.export_onnx(graph)
    feeds = {"x": np.ones((1, 2, 3), np.float32)}
    assert run(model, feeds)[0].shape == (1, 2, 3)
    assert run(folded, feeds)[0].shape == (1, 1, 2, 3)  # it ignored Shape's start attribute
    noisy = [helper.make_node("RandomNormal", [], ["r"], shape=[3]), helper.make_node("Add", ["x", "r"], ["y"])]
    random = make_model(noisy,
                        [tensor_input("x", [3])], [tensor_input("y", [3])])
    graph = gs.import_onnx(random)
    graph.fold_constants().cleanup()
    assert "RandomNormal" not in op_types(gs.export_onnx(graph))


def test_size_limit_checked_before_evaluation(monkeypatch):
    nodes = [helper.make_node("Expand", ["c", "shape"], ["big"]), helper.make_node("Add", ["x", "big"], ["y"])]
    inits = [init("c", np.float32(1.5)), init("shape", np.array([10, 10], np.int64))]
    model = make_model(nodes, [tensor_input("x", [10, 10])], [tensor_input("y", [10, 10])], inits)
    small = FoldConstantsPass(size_limit=399).apply(model)
    assert not small.modified and small.details["skipped_too_large"] == ["big"]
    assert FoldConstantsPass(size_limit=400).apply(model).modified
    # without static shapes the result is measured after evaluation and still rejected
    monkeypatch.setattr(fold_constants, "_static_types", lambda model: {})
    assert not FoldConstantsPass(size_limit=399).apply(model).modified
    assert FoldConstantsPass(size_limit=400).apply(model).modified


def test_folded_graph_output_keeps_its_name():
    nodes = [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Neg", ["c"], ["k"])]
    model = make_model(nodes, [tensor_input("x", [2])], [tensor_input("y", [2]), tensor_input("k", [2])],
                       [init("c", np.array([1.0, -2.0], np.float32))])
    result = FoldConstantsPass().apply(model)
    assert op_types(result.model) == ["Relu"]
    assert [o.name for o in result.model.graph.output] == ["y", "k"]
    assert_exact(model, result.model, rel=0)
    onnx.checker.check_model(result.model, full_check=True)


def test_folded_scalars_stay_scalars():
    """A folded 0-d result stays 0-d (onnx node test test_size: a scalar output came back as [1])."""
    nodes = [helper.make_node("Size", ["x"], ["n"]),  # static Size of a graph input
             helper.make_node("Add", ["a", "b"], ["s"]),  # evaluated in onnxruntime
             helper.make_node("Relu", ["x"], ["y"])]
    model = make_model(nodes, [tensor_input("x", [2, 3])],
                       [tensor_input("y", [2, 3]), tensor_input("n", [], INT64), tensor_input("s", [])],
                       [init("a", np.float32(1.5)), init("b", np.float32(2.0))])
    result = FoldConstantsPass().apply(model)
    assert op_types(result.model) == ["Relu"]
    assert {k: v.shape for k, v in initializer_arrays(result.model).items()} == {"n": (), "s": ()}
    y, n, s = run(result.model, {"x": np.ones((2, 3), np.float32)})
    assert n.shape == () and int(n) == 6 and s.shape == () and float(s) == 3.5
    onnx.checker.check_model(result.model, full_check=True)


def constant_if_model() -> onnx.ModelProto:
    """The shape of the AffineGrid function body (onnx node test test_affine_grid_2d_expanded):
    an If on the input's rank, whose 2-D branch gives Range a 1-element 1-D limit."""
    then = helper.make_graph([helper.make_node("Identity", ["one_1d"], ["d_then"])], "then", [],
                             [tensor_input("d_then", None, INT64)])
    other = helper.make_graph([helper.make_node("Identity", ["two_1d"], ["d_else"])], "else", [],
                              [tensor_input("d_else", None, INT64)])
    nodes = [helper.make_node("Size", ["x"], ["n"]),
             helper.make_node("Equal", ["n", "six"], ["is_six"]),
             helper.make_node("If", ["is_six"], ["d"], then_branch=then, else_branch=other),
             helper.make_node("Range", ["zero", "d", "one"], ["steps"]),
             helper.make_node("Cast", ["steps"], ["steps_f"], to=onnx.TensorProto.FLOAT),
             helper.make_node("Add", ["x", "steps_f"], ["y"])]
    inits = [init("zero", np.int64(0)), init("one", np.int64(1)), init("six", np.int64(6)),
             init("one_1d", np.array([1], np.int64)), init("two_1d", np.array([2], np.int64))]
    return make_model(nodes, [tensor_input("x", [2, 3])], [tensor_input("y", [2, 3])], inits)


def test_if_with_constant_condition_is_inlined_and_folded():
    """Folding the If's condition made onnxruntime (optimization on) inline the branch and reject
    Range's now-constant 1-D limit at load time. The pass inlines the branch itself and folds it."""
    model = constant_if_model()
    assert runtime.make_session(model)  # the input loads
    result = FoldConstantsPass().apply(model)
    assert result.details["inlined_ifs"] == ["d"]
    assert op_types(result.model) == ["Add"]
    assert initializer_arrays(result.model)["steps_f"].tolist() == [0.0]
    onnx.checker.check_model(result.model, full_check=True)
    feeds = {"x": RNG.standard_normal((2, 3)).astype(np.float32)}
    for level in ("disable", "all"):
        assert_exact(model, result.model, rel=0, feeds=feeds)
        assert runtime.run(result.model, feeds, optimization=level)[0].tolist() == feeds["x"].tolist()
    check_idempotent(FoldConstantsPass, model)


@pytest.mark.parametrize("cond", [True, False])
def test_inlined_branch_keeps_graph_output_names(cond):
    """The taken branch's nodes join the main graph (clashing names renamed); an If output that is a
    graph output keeps its name, also when the branch returns its own initializer; the other branch's
    reads are gone, so what only it used is dead."""
    then = helper.make_graph([helper.make_node("Mul", ["x", "a"], ["t"]), helper.make_node("Neg", ["t"], ["y2"])],
                             "then", [], [tensor_input("y2", [2]), tensor_input("k", [2])],
                             [init("k", np.float32([5, 6]))])
    other = helper.make_graph([helper.make_node("Sub", ["x", "b"], ["t_else"])], "else", [],
                              [tensor_input("t_else", [2]), tensor_input("k2", [2])], [init("k2", np.float32([7, 8]))])
    # a second If (on an input) whose branch uses the name "t" too
    clash = helper.make_graph([helper.make_node("Relu", ["x"], ["t"]), helper.make_node("Neg", ["t"], ["u"])],
                              "clash", [], [tensor_input("u", [2])])
    nodes = [helper.make_node("Not", ["c"], ["nc"]),
             helper.make_node("If", ["nc"], ["y", "z"], then_branch=then, else_branch=other),
             helper.make_node("If", ["d"], ["r"], then_branch=clash, else_branch=clash)]
    model = make_model(nodes, [tensor_input("x", [2]), tensor_input("d", [], onnx.TensorProto.BOOL)],
                       [tensor_input("y", [2]), tensor_input("z", [2]), tensor_input("r", [2])],
                       [init("c", np.array(not cond)), init("a", np.float32([2, 3])), init("b", np.float32([1, 1]))])
    result = FoldConstantsPass().apply(model)
    assert op_types(result.model) == (["Mul", "Neg", "If"] if cond else ["Sub", "If"])
    assert [o.name for o in result.model.graph.output] == ["y", "z", "r"]
    assert "t" not in {o for n in result.model.graph.node for o in n.output}
    for d in (True, False):
        assert_exact(model, result.model, rel=0, feeds={"x": np.float32([1, -2]), "d": np.array(d)})
    onnx.checker.check_model(result.model, full_check=True)
    unused = {"a", "b"} - {i for n in result.model.graph.node for i in n.input}
    assert unused == ({"b"} if cond else {"a"})
    check_idempotent(FoldConstantsPass, model)


def test_value_used_in_a_subgraph_and_unsorted_graph():
    then = helper.make_graph([helper.make_node("Add", ["x", "wt"], ["t"])], "then", [], [tensor_input("t", [2])])
    other = helper.make_graph([helper.make_node("Sub", ["x", "wt"], ["e"])], "else", [], [tensor_input("e", [2])])
    nodes = [  # deliberately out of order: the If comes before the node it reads
        helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other),
        helper.make_node("Neg", ["w"], ["wt"]),
    ]
    model = make_model(nodes, [tensor_input("x", [2]), tensor_input("c", [], onnx.TensorProto.BOOL)],
                       [tensor_input("y", [2])], [init("w", np.array([3.0, 4.0], np.float32))])
    result = FoldConstantsPass().apply(model)
    assert op_types(result.model) == ["If"]
    assert sorted(initializer_arrays(result.model)) == ["wt"]
    for c in (True, False):
        assert_exact(model, result.model, rel=0, feeds={"x": np.array([1.0, 2.0], np.float32), "c": np.array(c)})


def test_negative_size_limit_is_a_user_error():
    from onnxdns.errors import OnnxdnsError

    with pytest.raises(OnnxdnsError):
        FoldConstantsPass(size_limit=-1)


def test_call_styles_and_idempotence():
    model = weight_chain_model()
    for style, out, modified in all_call_styles(FoldConstantsPass, model):
        assert modified in (True, None), style
        assert op_types(out) == ["MatMul", "Constant", "Mul"], style
        assert_exact(model, out, rel=0)
    check_idempotent(FoldConstantsPass, model)
    check_idempotent(FoldConstantsPass, shape_model([2, 3, 4], 1))


def test_node_onnxruntime_cannot_evaluate_is_left_alone():
    """onnxruntime's CPU provider has no bfloat16 Neg: the node stays (a GPU may still run it)."""
    c = helper.make_tensor("c", onnx.TensorProto.BFLOAT16, [2], [1.0, 2.0])
    nodes = [helper.make_node("Neg", ["c"], ["nc"]), helper.make_node("Add", ["x", "nc"], ["y"])]
    bf16 = onnx.TensorProto.BFLOAT16
    model = make_model(nodes, [tensor_input("x", [2], bf16)], [tensor_input("y", [2], bf16)], [c])
    result = FoldConstantsPass().apply(model)
    assert not result.modified
    assert same_bytes(result.model, roundtrip(model))


def test_dead_foldable_nodes_are_left_to_remove_dead_nodes():
    model = weight_chain_model()
    model.graph.node.append(helper.make_node("Neg", ["b"], ["dead"]))
    result = FoldConstantsPass().apply(model)
    assert op_types(result.model) == ["MatMul", "Constant", "Mul", "Neg"]
    assert "b" in initializer_arrays(result.model)
