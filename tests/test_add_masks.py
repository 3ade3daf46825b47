"""add-masks: exact, idempotent, masks named <weight>__mask, folded back by fold-masks."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxdns import runtime
from onnxdns.errors import OnnxdnsError
from onnxdns.passes.add_masks import AddMasksPass
from onnxdns.registry import get_pass
from onnxdns.testing import assert_exact, export_module


def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def _matmul_graph() -> onnx.ModelProto:
    """x @ W1 (+ b) -> Gemm(W2 shared twice) ; C @ x (constant on the left, not a weight)."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((8, 6)).astype(np.float32)
    w1[0, :3] = 0
    b1 = rng.standard_normal(6).astype(np.float32)
    w2 = rng.standard_normal((4, 6)).astype(np.float32)
    left = rng.standard_normal((3, 5)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Add", ["h", "b1"], ["h1"]),
        helper.make_node("Gemm", ["h1", "w2"], ["y1"], transB=1),
        helper.make_node("Gemm", ["h1", "w2"], ["y2"], transB=1),
        helper.make_node("MatMul", ["left", "z"], ["y3"]),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 8]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, [5, 2])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y1", "y2", "y3")],
        [numpy_helper.from_array(a, n) for n, a in (("w1", w1), ("b1", b1), ("w2", w2), ("left", left))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.torch
def test_lenet5_exact_and_idempotent():
    from onnxdns.models import build

    model = export_module(build("lenet-5"), (1, 28, 28))
    applied = AddMasksPass(biases=True).apply(model)
    assert applied.modified
    masked = applied.model
    inits = _inits(masked)
    weights = ["conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    assert sorted(applied.details["masked"]) == sorted(weights)
    for w in weights:
        assert inits[f"{w}__mask"].shape == inits[w].shape and (inits[f"{w}__mask"] == 1).all()
    onnx.checker.check_model(masked, full_check=True)
    assert masked.ir_version <= 10
    feeds = runtime.input_feeds(model, batch=4)
    np.testing.assert_array_equal(runtime.run(model, feeds)[0], runtime.run(masked, feeds)[0])

    again = AddMasksPass(biases=True).apply(masked)
    assert not again.modified
    assert again.model.SerializeToString() == masked.SerializeToString()


@pytest.mark.torch
def test_weights_only_by_default_and_op_selection():
    from onnxdns.models import build

    model = export_module(build("lenet-5"), (1, 28, 28))
    default = AddMasksPass().apply(model).details["masked"]
    assert sorted(default) == ["conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"]
    convs = AddMasksPass(ops=("Conv",)).apply(model).details["masked"]
    assert sorted(convs) == ["conv1.weight", "conv2.weight"]
    with pytest.raises(OnnxdnsError, match="cannot mask weights of Relu"):
        AddMasksPass(ops=("Relu",))


def test_matmul_shared_weight_and_left_constant():
    model = _matmul_graph()
    applied = AddMasksPass(from_sparsity=True).apply(model)
    masked = applied.model
    assert sorted(applied.details["masked"]) == ["w1", "w2"]  # not the left operand of a MatMul
    muls = [n for n in masked.graph.node if n.op_type == "Mul"]
    assert len(muls) == 2  # the shared w2 gets one mask and one Mul for both Gemms
    gemm_inputs = {n.input[1] for n in masked.graph.node if n.op_type == "Gemm"}
    assert len(gemm_inputs) == 1 and gemm_inputs != {"w2"}
    inits = _inits(masked)
    np.testing.assert_array_equal(inits["w1__mask"], (inits["w1"] != 0).astype(np.float32))
    assert_exact(model, masked, rel=0.0)
    assert not AddMasksPass(from_sparsity=True).apply(masked).modified


def test_weight_read_through_identity_is_masked_once():
    """torch's legacy exporter deduplicates equal initializers (the zero biases of an untrained
    model, BN-folded biases) and makes the other readers go through ``Identity(B)``. Those readers
    must get the same masked product, or ``B`` has two consumers and training's gradient of ``B``
    becomes a Sum that the straight-through edit cannot find (``onnxdns train --method dns`` on an
    untrained torchvision MobileNetV3 export)."""
    rng = np.random.default_rng(0)
    w1, w2 = (rng.standard_normal((4, 4)).astype(np.float32) for _ in range(2))
    b = rng.standard_normal(4).astype(np.float32)
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b"], ["h"], transB=1),
        helper.make_node("Identity", ["b"], ["b_copy"]),
        helper.make_node("Identity", ["b_copy"], ["b_copy2"]),
        helper.make_node("Gemm", ["h", "w2", "b_copy2"], ["y"], transB=1),
    ]
    model = helper.make_model(helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v, n) for n, v in (("w1", w1), ("w2", w2), ("b", b))]),
        opset_imports=[helper.make_opsetid("", 17)])
    applied = AddMasksPass(biases=True).apply(model)
    masked = applied.model
    assert sorted(applied.details["masked"]) == ["b", "w1", "w2"]
    readers = [n for n in masked.graph.node if "b" in n.input]
    assert [n.op_type for n in readers] == ["Mul"]  # the bias has one consumer: its mask product
    gemm_biases = [n.input[2] for n in masked.graph.node if n.op_type == "Gemm"]
    assert gemm_biases[0] == gemm_biases[1] == readers[0].output[0]
    assert "Identity" not in [n.op_type for n in masked.graph.node]
    assert_exact(model, masked, rel=0.0)


def test_partially_masked_weight_reuses_its_mask():
    """A weight read by a masked and an unmasked operator: the second run routes the rest."""
    model = _matmul_graph()
    once = AddMasksPass(ops=("Gemm",)).apply(model).model
    g = once.graph
    first_gemm = next(n for n in g.node if n.op_type == "Gemm")
    first_gemm.input[1] = "w2"  # now one Gemm reads the mask product, the other the raw weight
    again = AddMasksPass(ops=("Gemm",)).apply(once)
    assert again.modified
    assert sum(n.op_type == "Mul" for n in again.model.graph.node) == 1
    assert sum(i.name.startswith("w2__mask") for i in again.model.graph.initializer) == 1


@pytest.mark.torch
def test_registered_and_folded_back():
    from onnxdns.models import build

    model = export_module(build("lenet-300-100"), (1, 28, 28))
    masked = get_pass("add-masks")(model)
    assert isinstance(masked, onnx.ModelProto)
    folded = get_pass("fold-masks")(masked)
    assert not any(i.name.endswith("__mask") for i in folded.graph.initializer)
    assert not any(n.op_type == "Mul" for n in folded.graph.node)
    assert_exact(model, folded, rel=0.0)
