"""convert-fp16: float16 weights/compute, float32 I/O, sensitive ops in float32, bounded error.

onnxruntime 1.19's CPU provider runs every float16 graph here, but on x86 it has float16
kernels for almost nothing that computes: its mandatory cast-insertion transformer wraps Conv,
Gemm, MatMul, Relu, Add, BatchNormalization, Softmax ... in Casts to float32 (only data-movement
ops such as Flatten/Reshape run natively). So CPU results show the float16 rounding of weights
and of every intermediate value, and ``onnx.reference`` (numpy float16 arithmetic) shows
float16 compute; the CUDA test runs real float16 kernels when a GPU is there.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper
from onnx.reference import ReferenceEvaluator

from onnxdns import runtime
from onnxdns.passes.convert_fp16 import BLOCKED_OPS, ConvertFp16Pass
from passkit import all_call_styles, check_idempotent, feeds_for, init, make_model, op_types, run, tensor_input

F16, F32, I64 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT, onnx.TensorProto.INT64
RNG = np.random.default_rng(11)
BOUND = 1e-2  # max abs diff <= BOUND x max(1, max |float32 output|)


def f32(*shape, scale=1.0):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def chain_model() -> onnx.ModelProto:
    """Conv -> BatchNormalization -> Relu -> Flatten -> Gemm -> (logits, Softmax probabilities)."""
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "g", "be", "m", "v"], ["bn"]),
        helper.make_node("Relu", ["bn"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"]),
        helper.make_node("Gemm", ["f", "gw", "gb"], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], ["probs"]),
    ]
    positive = RNG.uniform(0.5, 2, (2, 8)).astype(np.float32)
    inits = [init("w", f32(8, 3, 3, 3, scale=0.5)), init("b", f32(8)), init("g", positive[0]),
             init("be", f32(8)), init("m", f32(8)), init("v", positive[1]),
             init("gw", f32(10, 8 * 6 * 6, scale=0.05)), init("gb", f32(10))]
    return make_model(nodes, [tensor_input("x", ["N", 3, 6, 6])],
                      [tensor_input("logits", ["N", 10]), tensor_input("probs", ["N", 10])], inits)


def elem_types(model: onnx.ModelProto) -> dict[str, int]:
    return {t.name: t.data_type for t in model.graph.initializer}


def assert_valid(model: onnx.ModelProto) -> None:
    onnx.checker.check_model(model, full_check=True)
    onnx.shape_inference.infer_shapes(model, strict_mode=True, check_type=True)


def assert_within_bound(reference: list[np.ndarray], converted: list[np.ndarray]) -> float:
    worst = 0.0
    for ref, out in zip(reference, converted):
        assert out.dtype == np.float32 and out.shape == ref.shape
        diff = float(np.max(np.abs(ref - out)))
        assert diff <= BOUND * max(1.0, float(np.max(np.abs(ref)))), diff
        worst = max(worst, diff)
    return worst


def test_chain_structure_and_validity():
    model = chain_model()
    result = ConvertFp16Pass().apply(model)
    assert result.modified
    out = result.model
    assert_valid(out)
    assert [o.type.tensor_type.elem_type for o in out.graph.input] == [F32]
    assert [(o.name, o.type.tensor_type.elem_type) for o in out.graph.output] == [("logits", F32), ("probs", F32)]
    assert op_types(out) == ["Cast", "Conv", "Cast", "BatchNormalization", "Cast", "Relu", "Flatten", "Gemm", "Cast",
                             "Softmax"]
    types = elem_types(out)
    assert {types[n] for n in ("w", "b", "gw", "gb")} == {F16}
    assert {types[n] for n in ("g", "be", "m", "v")} == {F32}  # BatchNormalization stays float32


def test_chain_error_bound_onnxruntime_cpu():
    model = chain_model()
    out = ConvertFp16Pass()(model)
    feeds = feeds_for(model, batch=8)
    worst = assert_within_bound(run(model, feeds), run(out, feeds))
    assert worst > 0  # it did compute in reduced precision


def test_chain_error_bound_reference_evaluator():
    model = chain_model()
    out = ConvertFp16Pass()(model)
    feeds = feeds_for(model, batch=4)
    assert_within_bound(ReferenceEvaluator(model).run(None, feeds), ReferenceEvaluator(out).run(None, feeds))


def test_initializer_and_constant_shared_with_blocked_ops():
    nodes = [
        helper.make_node("Mul", ["x", "s"], ["a"]),                      # float16
        helper.make_node("LayerNormalization", ["a", "s", "lb"], ["ln"]),  # blocked, shares "s"
        helper.make_node("Constant", [], ["two"], value_float=2.0),
        helper.make_node("Pow", ["ln", "two"], ["p"]),                     # blocked, shares "two"
        helper.make_node("Add", ["p", "two"], ["q"]),                      # float16
        helper.make_node("Constant", [], ["k"], value=onnx.numpy_helper.from_array(f32(6))),
        helper.make_node("Mul", ["q", "k"], ["y"]),                        # only user of "k"
    ]
    model = make_model(nodes, [tensor_input("x", [4, 6])], [tensor_input("y", [4, 6])],
                       [init("s", RNG.uniform(0.5, 1.5, 6).astype(np.float32)), init("lb", f32(6))])
    out = ConvertFp16Pass()(model)
    assert_valid(out)
    types = elem_types(out)
    assert types["s"] == F32 and types["s_fp16"] == F16 and types["two_fp16"] == F16
    constants = {n.output[0]: n for n in out.graph.node if n.op_type == "Constant"}
    assert constants["two"].attribute[0].name == "value_float"  # kept for Pow
    assert constants["k"].attribute[0].t.data_type == F16  # converted in place
    feeds = {"x": f32(4, 6)}
    assert_within_bound(run(model, feeds), run(out, feeds))


def test_casts_inputs_shapes_and_fixed_float_inputs():
    nodes = [
        helper.make_node("Cast", ["ids"], ["idf"], to=F32),  # int -> float becomes int -> float16
        helper.make_node("Shape", ["x"], ["sx"]),            # float32 input: no Cast needed
        helper.make_node("ConstantOfShape", ["sx"], ["ones"], value=init("one", np.ones(1, np.float32))),
        helper.make_node("Add", ["x", "ones"], ["a"]),
        helper.make_node("Mul", ["a", "idf"], ["m"]),
        helper.make_node("Resize", ["m", "", "scales"], ["y"], mode="nearest"),  # scales: tensor(float) only
    ]
    model = make_model(nodes, [tensor_input("x", [1, 1, 2, 3]), tensor_input("ids", [1, 1, 2, 3], I64)],
                       [tensor_input("y", [1, 1, 4, 6])], [init("scales", np.array([1, 1, 2, 2], np.float32))])
    out = ConvertFp16Pass()(model)
    assert_valid(out)
    by_op = {n.op_type: n for n in out.graph.node}
    by_output = {n.output[0]: n for n in out.graph.node}
    assert by_output["idf"].input == ["ids"] and by_output["idf"].attribute[0].i == F16
    assert by_op["Shape"].input == ["x"]
    assert by_op["ConstantOfShape"].attribute[0].t.data_type == F16
    assert elem_types(out)["scales"] == F32
    feeds = {"x": f32(1, 1, 2, 3), "ids": RNG.integers(0, 5, (1, 1, 2, 3))}
    assert_within_bound(run(model, feeds), run(out, feeds))


def test_out_of_range_weights_are_clamped():
    model = make_model([helper.make_node("Mul", ["x", "w"], ["y"])], [tensor_input("x", [3])], [tensor_input("y", [3])],
                       [init("w", np.array([1e5, -1e6, 0.5], np.float32))])
    result = ConvertFp16Pass().apply(model)
    assert result.details["clamped_values"] == 2
    w = onnx.numpy_helper.to_array(result.model.graph.initializer[0])
    np.testing.assert_array_equal(w, np.array([65504, -65504, 0.5], np.float16))


def test_subgraph_reads_get_float32():
    then = helper.make_graph([helper.make_node("Neg", ["r"], ["t"])], "then", [], [tensor_input("t", [2, 3])])
    other = helper.make_graph([helper.make_node("Abs", ["r"], ["e"])], "else", [], [tensor_input("e", [2, 3])])
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)]
    model = make_model(nodes, [tensor_input("x", [2, 3]), tensor_input("c", [], onnx.TensorProto.BOOL)],
                       [tensor_input("y", [2, 3])])
    out = ConvertFp16Pass()(model)
    assert_valid(out)
    assert op_types(out) == ["Cast", "Relu", "Cast", "If"]
    x = f32(2, 3)
    for c in (True, False):
        feeds = {"x": x, "c": np.array(c)}
        assert_within_bound(run(model, feeds), run(out, feeds))


def test_graph_input_with_default_initializer_is_cast_not_converted():
    nodes = [helper.make_node("Add", ["x", "bias"], ["y"])]
    model = make_model(nodes, [tensor_input("x", [3]), tensor_input("bias", [3])], [tensor_input("y", [3])],
                       [init("bias", np.ones(3, np.float32))])
    out = ConvertFp16Pass()(model)
    assert_valid(out)
    assert elem_types(out)["bias"] == F32 and op_types(out) == ["Cast", "Cast", "Add", "Cast"]


def test_block_list_covers_the_sensitive_ops():
    assert {"BatchNormalization", "LayerNormalization", "Softmax", "LogSoftmax", "ReduceMean", "ReduceSum", "Exp",
            "Log", "Pow"} <= BLOCKED_OPS


def test_call_styles_and_idempotence():
    model = chain_model()
    feeds = feeds_for(model)
    for style, out, modified in all_call_styles(ConvertFp16Pass, model):
        assert modified in (True, None), style
        assert_valid(out)
        assert_within_bound(run(model, feeds), run(out, feeds))
    check_idempotent(ConvertFp16Pass, model)


@pytest.mark.torch
def test_torch_exported_net():
    torch = pytest.importorskip("torch")
    from onnxdns.testing import export_module

    torch.manual_seed(0)
    nn = torch.nn
    net = nn.Sequential(nn.Conv2d(1, 6, 5), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(6 * 12 * 12, 32), nn.ReLU(), nn.Linear(32, 10), nn.LogSoftmax(dim=1))
    model = export_module(net, (1, 28, 28))
    out = ConvertFp16Pass()(model)
    assert_valid(out)
    feeds = feeds_for(model, batch=4)
    assert_within_bound(run(model, feeds), run(out, feeds))


@pytest.mark.cuda
@pytest.mark.skipif(not runtime.has_cuda(), reason="no CUDAExecutionProvider")
def test_runs_on_cuda_within_bound():
    model = chain_model()
    out = ConvertFp16Pass()(model)
    feeds = feeds_for(model, batch=8)
    session = runtime.make_session(out, providers=("CUDAExecutionProvider", "CPUExecutionProvider"))
    assert session.get_providers()[0] == "CUDAExecutionProvider"
    assert_within_bound(run(model, feeds), session.run(None, feeds))


def test_precondition_old_opset():
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [tensor_input("x", [2])], [tensor_input("y", [2])],
                       opset=5)
    with pytest.raises(ir.passes.PreconditionError, match="opset >= 6"):
        ConvertFp16Pass().apply(model)
