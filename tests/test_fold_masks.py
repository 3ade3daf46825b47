"""fold-masks: Mul(W, mask) folded exactly; masks dropped; shared weights left alone."""

from __future__ import annotations

import numpy as np
from onnx import helper, numpy_helper

from onnxdns.passes.fold_masks import FoldMasksPass
from onnxdns.testing import assert_exact


def _model(mask_first=False, mask_shape=(4, 3, 3, 3), shared=False, mask_as_constant=False):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    mask = (rng.random(mask_shape) > 0.5).astype(np.float32)
    mul_inputs = ["w__mask", "w"] if mask_first else ["w", "w__mask"]
    nodes = []
    inits = [numpy_helper.from_array(w, "w")]
    if mask_as_constant:
        nodes.append(helper.make_node("Constant", [], ["w__mask"], value=numpy_helper.from_array(mask)))
    else:
        inits.append(numpy_helper.from_array(mask, "w__mask"))
    nodes += [helper.make_node("Mul", mul_inputs, ["wm"]), helper.make_node("Conv", ["x", "wm"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", 1, None)]
    if shared:  # the raw weight is also used directly by another conv
        nodes.append(helper.make_node("Conv", ["x", "w"], ["y2"]))
        outputs.append(helper.make_tensor_value_info("y2", 1, None))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, ["N", 3, 6, 6])], outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), w, mask


def _inits(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_folds_exactly_and_drops_the_mask():
    for mask_first in (False, True):
        proto, w, mask = _model(mask_first=mask_first)
        result = FoldMasksPass().apply(proto)
        assert result.modified
        assert [n.op_type for n in result.model.graph.node] == ["Conv"]
        inits = _inits(result.model)
        assert set(inits) == {"w"}
        np.testing.assert_array_equal(inits["w"], w * mask)
        assert assert_exact(proto, result.model, rel=0.0) == 0.0


def test_broadcast_mask_per_output_channel():
    proto, w, mask = _model(mask_shape=(4, 1, 1, 1))
    result = FoldMasksPass().apply(proto)
    np.testing.assert_array_equal(_inits(result.model)["w"], w * mask)
    assert_exact(proto, result.model, rel=0.0)


def test_shared_weight_gets_a_new_initializer():
    proto, w, mask = _model(shared=True)
    result = FoldMasksPass().apply(proto)
    inits = _inits(result.model)
    np.testing.assert_array_equal(inits["w"], w)  # the other conv still sees the dense weight
    np.testing.assert_array_equal(inits["w_masked"], w * mask)
    assert_exact(proto, result.model, rel=0.0)


def test_mask_from_constant_node():
    proto, w, mask = _model(mask_as_constant=True)
    result = FoldMasksPass().apply(proto)
    assert [n.op_type for n in result.model.graph.node] == ["Conv"]
    assert_exact(proto, result.model, rel=0.0)


def test_second_run_changes_nothing():
    proto, _, _ = _model()
    once = FoldMasksPass().apply(proto)
    twice = FoldMasksPass().apply(once.model)
    assert not twice.modified
    assert twice.model.SerializeToString() == once.model.SerializeToString()


def test_non_binary_multiplier_is_not_a_mask():
    proto, _, _ = _model()
    for t in proto.graph.initializer:
        if t.name == "w__mask":
            t.CopyFrom(numpy_helper.from_array(np.full((4, 3, 3, 3), 0.5, np.float32), "w__mask"))
    result = FoldMasksPass().apply(proto)
    assert not result.modified
    assert [n.op_type for n in result.model.graph.node] == ["Mul", "Conv"]


def test_mul_feeding_a_graph_output_is_left_alone():
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Mul", ["w", "m"], ["y"])], "g", [], [helper.make_tensor_value_info("y", 1, None)],
        [numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "w"),
         numpy_helper.from_array(np.array([1, 0, 1], np.float32), "m")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    assert not FoldMasksPass().apply(proto).modified
