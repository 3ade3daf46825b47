"""Training graphs for activations onnxruntime-training 1.19 cannot differentiate (HardSwish,
HardSigmoid: MobileNetV3's activations and its squeeze-and-excitation gate)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from onnxdns.training import artifacts
from onnxdns.training.differentiable import differentiable
from onnxdns.training.params import select_parameters
from onnxdns.training.session import TrainingSession

pytestmark = pytest.mark.train  # every test needs onnxruntime-training (onnxdns[train])

ALPHA, BETA = 0.2, 0.4  # HardSigmoid's attributes (not ONNX's defaults, so that they are read)


def _hard_model(rng) -> onnx.ModelProto:
    """x [N, 6] -> Gemm -> HardSwish -> Gemm -> HardSigmoid(alpha, beta) -> Mul by a Gemm branch
    (a squeeze-and-excitation gate) -> logits [N, 3]."""
    w = {n: rng.standard_normal(s).astype(np.float32) for n, s in
         (("w1", (8, 6)), ("b1", (8,)), ("w2", (8, 8)), ("b2", (8,)), ("w3", (3, 8)), ("b3", (3,)))}
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h1"], transB=1),
        helper.make_node("HardSwish", ["h1"], ["a1"]),
        helper.make_node("Gemm", ["a1", "w2", "b2"], ["h2"], transB=1),
        helper.make_node("HardSigmoid", ["h2"], ["gate"], alpha=ALPHA, beta=BETA),
        helper.make_node("Mul", ["a1", "gate"], ["se"]),
        helper.make_node("Gemm", ["se", "w3", "b3"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(nodes, "hard", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
                              [numpy_helper.from_array(v, n) for n, v in w.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _torch_forward(x, p):
    a1 = F.hardswish(x @ p["w1"].T + p["b1"])
    gate = torch.clamp(ALPHA * (a1 @ p["w2"].T + p["b2"]) + BETA, 0, 1)
    return (a1 * gate) @ p["w3"].T + p["b3"]


def test_rewrite_is_exact_and_leaves_the_input_alone():
    rng = np.random.default_rng(0)
    model = _hard_model(rng)
    before = model.SerializeToString()
    rewritten = differentiable(model)
    assert model.SerializeToString() == before
    ops = [n.op_type for n in rewritten.graph.node]
    assert "HardSwish" not in ops and "HardSigmoid" not in ops
    onnx.checker.check_model(rewritten, full_check=True)
    # inputs around every kink of both activations (HardSwish at -3 and 3)
    x = np.concatenate([rng.standard_normal((64, 6)) * 4, np.zeros((1, 6))]).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = ort.InferenceSession(rewritten.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_model_without_those_ops_is_returned_unchanged():
    model = _hard_model(np.random.default_rng(0))
    del model.graph.node[3:5]
    model.graph.node[-1].input[0] = "a1"
    model.graph.node.remove(model.graph.node[1])
    model.graph.node[1].input[0] = "h1"
    assert differentiable(model) is model


def test_hardswish_and_hardsigmoid_train_with_torch_gradients(tmp_path):
    """Before the rewrite onnxruntime refused: 'The gradient builder has not been registered: HardSwish'."""
    model = _hard_model(np.random.default_rng(1))
    params = select_parameters(model)
    spec = artifacts.ArtifactSpec(trainable=tuple(params.trainable), frozen=tuple(params.frozen),
                                  outputs=("logits",))
    session = TrainingSession(artifacts.generate(model, tmp_path, spec), threads=1)
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((16, 6)) * 3).astype(np.float32)
    y = rng.integers(0, 3, 16).astype(np.int64)
    session.module.train()
    loss = session.module(x, y)[0]
    ref = {n: torch.tensor(numpy_helper.to_array(i)).requires_grad_() for i in model.graph.initializer
           for n in [i.name]}
    ref_loss = F.cross_entropy(_torch_forward(torch.tensor(x), ref), torch.tensor(y))
    ref_loss.backward()
    assert abs(float(loss) - ref_loss.item()) < 1e-5
    for name in params.trainable:
        np.testing.assert_allclose(session.state.parameters[name].grad, ref[name].grad.numpy(), rtol=1e-4, atol=1e-5,
                                   err_msg=name)
    # the eval model still computes the original function
    session.module.eval()
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(session.module(x, y)[1], want, rtol=1e-5, atol=1e-5)
