"""The evaluator (``onnxdns.workflows.evaluate``) and its metrics (``onnxdns.metrics``), on tiny
models built here, run by onnxruntime, checked against numpy."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from onnxdns.errors import OnnxdnsError
from onnxdns.metrics import Fidelity
from onnxdns.workflows.evaluate import evaluate
from passkit import init, make_model, tensor_input


def two_output_net(w: np.ndarray) -> "onnx.ModelProto":
    """logits = x @ w ([N, 3]), map = Relu(x) as [N, 4, 1] (not a classifier output)."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["logits"]), helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Unsqueeze", ["r", "axis"], ["map"])]
    return make_model(nodes, [tensor_input("x", ["N", 4])],
                      [tensor_input("logits", ["N", 3]), tensor_input("map", ["N", 4, 1])],
                      [init("w", w), init("axis", np.array([2], np.int64))])


@pytest.fixture
def data(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 4)).astype(np.float32)
    labels = rng.integers(0, 3, 50)
    path = tmp_path / "data.npz"
    np.savez(path, x=x, labels=labels)
    return path, x, labels


def test_accuracy_and_fidelity_match_numpy(tmp_path, data):
    path, x, labels = data
    rng = np.random.default_rng(1)
    w = rng.standard_normal((4, 3)).astype(np.float32)
    w2 = w + 0.3 * rng.standard_normal((4, 3)).astype(np.float32)
    result = evaluate(two_output_net(w2), path, reference=two_output_net(w), batch_size=16)

    ref, got = x.astype(np.float64) @ w, x.astype(np.float64) @ w2
    assert result.samples == 50
    assert result.accuracy == pytest.approx(np.mean(got.argmax(1) == labels))
    assert result.reference_accuracy == pytest.approx(np.mean(ref.argmax(1) == labels))
    row = result.fidelity["logits"]
    assert row["relative_l2"] == pytest.approx(np.linalg.norm(got - ref) / np.linalg.norm(ref), rel=1e-5)
    per_sample = np.sum(got * ref, axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    assert row["cosine"] == pytest.approx(per_sample.mean(), rel=1e-5)
    assert result.top1_agreement == pytest.approx(np.mean(got.argmax(1) == ref.argmax(1)))
    assert result.fidelity["map"]["relative_l2"] == 0.0 and result.fidelity["map"]["max_abs_diff"] == 0.0  # same Relu
    assert result.fidelity["map"]["cosine"] == pytest.approx(1.0)
    assert row["max_abs_diff"] == pytest.approx(np.max(np.abs(got - ref)), rel=1e-5)
    assert 0 < row["relative_l2"] and row["cosine"] < 1


def test_samples_and_chosen_outputs(data):
    path, x, _ = data
    w = np.eye(4, 3, dtype=np.float32)
    result = evaluate(two_output_net(w), path, reference=two_output_net(w), outputs=["map"], samples=20, batch_size=16)
    assert result.samples == 20 and list(result.fidelity) == ["map"] and result.accuracy is None  # no scores chosen
    assert result.fidelity["map"]["relative_l2"] == 0.0


def test_without_labels_or_reference(tmp_path):
    np.save(tmp_path / "x.npy", np.ones((5, 4), np.float32))
    result = evaluate(two_output_net(np.ones((4, 3), np.float32)), tmp_path / "x.npy")
    assert result.samples == 5 and result.accuracy is None and result.fidelity == {}


def test_bad_input_is_one_line(data):
    path, _, _ = data
    model = two_output_net(np.ones((4, 3), np.float32))
    with pytest.raises(OnnxdnsError, match="no output nope"):
        evaluate(model, path, outputs=["nope"])


def test_fidelity_of_zero_outputs_and_shape_mismatch():
    f = Fidelity()
    f.update({"y": np.zeros((2, 3))}, {"y": np.zeros((2, 3))})
    assert f.result()["y"]["relative_l2"] == 0.0 and f.result()["y"]["cosine"] == 1.0
    with pytest.raises(ValueError, match="shape"):
        f.update({"y": np.zeros((2, 3))}, {"y": np.zeros((3, 2))})
