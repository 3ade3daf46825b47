"""fold-batchnorm: BN folded into Conv / ConvTranspose / Gemm exactly, with random BN statistics."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from onnxdns.passes.fold_batchnorm import FoldBatchNormPass
from passkit import (all_call_styles, assert_exact, check_idempotent, init, initializer_arrays, make_model,
                     op_types, roundtrip, same_bytes, tensor_input)

RNG = np.random.default_rng(42)


def bn_inits(prefix: str, channels: int) -> list[onnx.TensorProto]:
    """Non-trivial BN statistics: gamma, beta, mean random; var random positive."""
    return [
        init(f"{prefix}_gamma", (RNG.uniform(0.5, 2.0, channels) * RNG.choice([-1, 1], channels)).astype(np.float32)),
        init(f"{prefix}_beta", RNG.standard_normal(channels).astype(np.float32)),
        init(f"{prefix}_mean", RNG.standard_normal(channels).astype(np.float32)),
        init(f"{prefix}_var", RNG.uniform(0.1, 3.0, channels).astype(np.float32)),
    ]


def bn_node(x: str, y: str, prefix: str = "bn", epsilon: float = 1e-3) -> onnx.NodeProto:
    return helper.make_node("BatchNormalization", [x, f"{prefix}_gamma", f"{prefix}_beta", f"{prefix}_mean",
                                                   f"{prefix}_var"], [y], epsilon=epsilon, name=prefix)


def conv_model(op: str = "Conv", group: int = 1, bias: bool = True, c_in: int = 4, c_out: int = 6):
    if op == "Conv":
        w = RNG.standard_normal((c_out, c_in // group, 3, 3)).astype(np.float32)
    else:
        w = RNG.standard_normal((c_in, c_out // group, 3, 3)).astype(np.float32)
    inits = [init("w", w)] + bn_inits("bn", c_out)
    inputs = ["x", "w"]
    if bias:
        inits.append(init("b", RNG.standard_normal(c_out).astype(np.float32)))
        inputs.append("b")
    attrs = {"group": group, "pads": [1, 1, 1, 1]} if op == "Conv" else {"group": group, "strides": [2, 2]}
    nodes = [helper.make_node(op, inputs, ["c"], name="conv", **attrs), bn_node("c", "y"),
             helper.make_node("Relu", ["y"], ["out"])]
    return make_model(nodes, [tensor_input("x", ["N", c_in, 5, 5])], [tensor_input("out", None)], inits)


@pytest.mark.parametrize("op", ["Conv", "ConvTranspose"])
@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_and_conv_transpose_fold_exactly(op, group, bias):
    model = conv_model(op, group, bias)
    result = FoldBatchNormPass().apply(model)
    assert result.modified and result.details["folded_into"] == ["conv"]
    assert op_types(result.model) == [op, "Relu"]
    assert_exact(model, result.model, rel=1e-5, batch=3)
    assert set(initializer_arrays(result.model)) == ({"w", "b"} if bias else {"w", "conv_bias"})


@pytest.mark.parametrize("trans_a", [0, 1])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("c_shape", [None, (6,), (1, 6), (3, 6), (3, 1), ()])
def test_gemm_folds_exactly(trans_a, trans_b, c_shape):
    n, k, m = 3, 5, 6
    w = RNG.standard_normal((m, k) if trans_b else (k, m)).astype(np.float32)
    inits = [init("w", w)] + bn_inits("bn", m)
    inputs = ["a", "w"]
    if c_shape is not None:
        inits.append(init("c", RNG.standard_normal(c_shape).astype(np.float32)))
        inputs.append("c")
    nodes = [helper.make_node("Gemm", inputs, ["g"], name="gemm", transA=trans_a, transB=trans_b, alpha=0.7, beta=1.9),
             bn_node("g", "y")]
    model = make_model(nodes, [tensor_input("a", [k, n] if trans_a else [n, k])], [tensor_input("y", [n, m])], inits)
    result = FoldBatchNormPass().apply(model)
    assert result.modified
    assert op_types(result.model) == ["Gemm"]
    assert [o.name for o in result.model.graph.output] == ["y"]
    assert_exact(model, result.model, rel=1e-5)


def test_shared_weight_gets_its_own_initializer():
    model = conv_model()
    # a second Conv reads the same weight and bias without a BN after it
    model.graph.node.append(helper.make_node("Conv", ["x", "w", "b"], ["c2"], pads=[1, 1, 1, 1]))
    model.graph.output.append(tensor_input("c2", None))
    before = initializer_arrays(model)
    result = FoldBatchNormPass().apply(model)
    assert result.modified
    after = initializer_arrays(result.model)
    np.testing.assert_array_equal(after["w"], before["w"])
    np.testing.assert_array_equal(after["b"], before["b"])
    conv = result.model.graph.node[0]
    assert conv.input[1] not in ("w",) and conv.input[2] not in ("b",)
    assert_exact(model, result.model)


@pytest.mark.parametrize("case", ["graph_output", "two_users", "param_is_input", "training", "weight_is_input"])
def test_not_folded(case):
    model = conv_model()
    if case == "graph_output":
        model.graph.output.append(tensor_input("c", None))
    elif case == "two_users":
        model.graph.node.append(helper.make_node("Relu", ["c"], ["c_relu"]))
        model.graph.output.append(tensor_input("c_relu", None))
    elif case == "param_is_input":
        model.graph.input.append(tensor_input("bn_mean", [6]))
    elif case == "weight_is_input":
        model.graph.input.append(tensor_input("w", [6, 4, 3, 3]))
    else:  # a BN with training outputs
        bn = model.graph.node[1]
        bn.output.extend(["running_mean", "running_var"])
        bn.attribute.append(helper.make_attribute("training_mode", 1))
    result = FoldBatchNormPass().apply(model)
    assert not result.modified
    assert same_bytes(result.model, roundtrip(model))


def test_bn_output_name_is_kept_and_chains_fold_in_one_run():
    model = conv_model()
    # Conv -> BN -> BN2 -> (graph output "z")
    model.graph.node[2].CopyFrom(bn_node("y", "z", prefix="bn2", epsilon=1e-5))
    model.graph.initializer.extend(bn_inits("bn2", 6))
    del model.graph.output[:]
    model.graph.output.append(tensor_input("z", None))
    result = FoldBatchNormPass().apply(model)
    assert op_types(result.model) == ["Conv"]
    assert result.model.graph.node[0].output[0] == "z"
    assert sorted(initializer_arrays(result.model)) == ["b", "w"]
    assert_exact(model, result.model)
    check_idempotent(FoldBatchNormPass, model)


def test_float16_weights_fold():
    model = conv_model()
    for t in model.graph.initializer:
        arr = onnx.numpy_helper.to_array(t).astype(np.float16)
        t.CopyFrom(init(t.name, arr))
    model.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    model.graph.output[0].type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    result = FoldBatchNormPass().apply(model)
    assert result.modified
    assert {t.data_type for t in result.model.graph.initializer} == {onnx.TensorProto.FLOAT16}
    assert_exact(model, result.model, rel=2e-2)  # float16 rounding of the folded weights


def test_call_styles_and_idempotence():
    model = conv_model("ConvTranspose", group=2)
    results = all_call_styles(FoldBatchNormPass, model)
    for style, out, modified in results:
        assert modified in (True, None), style
        assert op_types(out) == ["ConvTranspose", "Relu"], style
        assert_exact(model, out)
    assert same_bytes(results[0][1], results[2][1])
    check_idempotent(FoldBatchNormPass, model)


@pytest.mark.torch
def test_torch_exported_conv_bn_net_folds_exactly():
    torch = pytest.importorskip("torch")
    from onnxdns.testing import export_module

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.ConvTranspose2d(8, 8, 2, stride=2, groups=2, bias=False), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(8 * 8 * 8, 10), torch.nn.BatchNorm1d(10),
    )
    for m in net.modules():
        if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm1d)):
            with torch.no_grad():
                m.weight.uniform_(0.5, 2.0)
                m.bias.normal_()
                m.running_mean.normal_()
                m.running_var.uniform_(0.1, 3.0)
    model = export_module(net, (3, 4, 4))
    assert op_types(model).count("BatchNormalization") == 3
    result = FoldBatchNormPass().apply(model)
    assert "BatchNormalization" not in op_types(result.model)
    assert len(result.details["folded_into"]) == 3
    assert_exact(model, result.model, batch=4)
    onnx.checker.check_model(result.model, full_check=True)
