"""Target pipelines: their pass lists, option handling, and whole runs through ``api.optimize``."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxdns import api, pipelines, runtime
from onnxdns.errors import OnnxdnsError
from onnxdns.framework import GraphPass

CPU = ["fold-masks", "eliminate-identity", "fold-constants", "fold-channel-scales", "fold-batchnorm", "remove-channels",
       "fold-batchnorm", "remove-dead-nodes", "topo-sort", "infer-shapes", "sparse-storage"]


def test_pipeline_names():
    assert pipelines.pipeline_names("cpu") == CPU
    assert pipelines.pipeline_names("cuda") == CPU
    fp16 = pipelines.pipeline_names("cuda", "fp16")
    assert fp16 == CPU[:-1] + ["convert-fp16", "sparse-storage"]


@pytest.mark.parametrize(
    "target, precision, message",
    [
        ("cpu", "fp16", "fp16 is for --target cuda"),
        ("tpu", "fp32", "unknown target 'tpu'"),
        ("cuda", "int8", "unknown precision 'int8'"),
    ],
)
def test_bad_target_or_precision_is_one_line(target, precision, message):
    with pytest.raises(OnnxdnsError, match=message) as info:
        pipelines.get_pipeline(target, precision)
    assert "\n" not in str(info.value)


def test_custom_pipeline_rejects_unknown_names_listing_known_ones():
    with pytest.raises(OnnxdnsError, match="unknown pass 'no-such-pass'; known passes: .*add-masks") as info:
        pipelines.custom_pipeline(["no-such-pass"], "cpu")
    assert "\n" not in str(info.value)
    with pytest.raises(OnnxdnsError, match="empty pass name"):
        pipelines.custom_pipeline(["add-masks", ""], "cpu")


@pytest.mark.parametrize("target, precision", [("cpu", "fp32"), ("cuda", "fp32"), ("cuda", "fp16")])
def test_get_pipeline_builds_registered_passes(target, precision):
    passes = pipelines.get_pipeline(target, precision)
    assert [p.name for p in passes] == pipelines.pipeline_names(target, precision)
    assert all(isinstance(p, GraphPass) for p in passes)
    with pytest.raises(OnnxdnsError, match="not in this pipeline"):
        pipelines.get_pipeline(target, precision, no_such_pass={"x": 1})


def test_custom_pipeline_keeps_order_and_target_defaults():
    passes = pipelines.custom_pipeline(["topo-sort", "fold-masks", "topo-sort"], "cuda")
    assert [p.name for p in passes] == ["topo-sort", "fold-masks", "topo-sort"]


# --------------------------------------------------------------------------- whole pipelines


def slimmed_net(kept: int, channels: int = 16) -> onnx.ModelProto:
    """Conv(16) -> BN -> Relu -> Conv(4) -> GlobalAveragePool -> Flatten, with DNS masks on both
    convs and BN channels >= ``kept`` zeroed (gamma = beta = 0), so they output exactly 0."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((channels, 3, 3, 3)).astype(np.float32)
    m1 = (rng.random(w1.shape) > 0.5).astype(np.float32)
    w2 = rng.standard_normal((4, channels, 3, 3)).astype(np.float32)
    m2 = (rng.random(w2.shape) > 0.5).astype(np.float32)
    gamma = rng.random(channels).astype(np.float32) + 0.5
    beta = rng.standard_normal(channels).astype(np.float32)
    gamma[kept:] = 0
    beta[kept:] = 0
    inits = [
        numpy_helper.from_array(a, n) for n, a in [
            ("w1", w1), ("w1__mask", m1), ("b1", rng.standard_normal(channels).astype(np.float32)),
            ("w2", w2), ("w2__mask", m2), ("b2", np.zeros(4, np.float32)),
            ("gamma", gamma), ("beta", beta), ("mean", rng.standard_normal(channels).astype(np.float32)),
            ("var", rng.random(channels).astype(np.float32) + 0.5),
        ]
    ]
    nodes = [
        helper.make_node("Mul", ["w1", "w1__mask"], ["w1m"]),
        helper.make_node("Conv", ["x", "w1m", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("BatchNormalization", ["c1", "gamma", "beta", "mean", "var"], ["bn"], name="bn1"),
        helper.make_node("Relu", ["bn"], ["r"]),
        helper.make_node("Identity", ["r"], ["r_id"]),
        helper.make_node("Mul", ["w2", "w2__mask"], ["w2m"]),
        helper.make_node("Conv", ["r_id", "w2m", "b2"], ["c2"], name="conv2"),
        helper.make_node("GlobalAveragePool", ["c2"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["logits"]),
    ]
    graph = helper.make_graph(nodes, "slim", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def conv_out_channels(model: onnx.ModelProto) -> list[int]:
    weights = {i.name: tuple(i.dims) for i in model.graph.initializer}
    weights.update({s.values.name: tuple(s.dims) for s in model.graph.sparse_initializer})
    return [weights[n.input[1]][0] for n in model.graph.node if n.op_type == "Conv"]


@pytest.fixture
def slim_file(tmp_path: Path) -> Path:
    path = tmp_path / "slim.onnx"
    onnx.save_model(slimmed_net(kept=3), path)
    return path


@pytest.mark.parametrize("target, kept", [("cpu", 8), ("cuda", 8)])
def test_target_pipeline_is_exact_and_rounds_channels(slim_file, tmp_path, target, kept):
    digest = hashlib.sha256(slim_file.read_bytes()).hexdigest()
    out = tmp_path / f"slim-{target}.onnx"
    result = api.optimize(slim_file, out, target=target)
    assert hashlib.sha256(slim_file.read_bytes()).hexdigest() == digest
    assert [r.name for r in result.passes] == CPU
    assert result.ok and result.validation.status == "passed", result.validation.message
    assert result.validation.comparison.max_abs_diff <= 1e-4 * max(1.0, result.validation.comparison.output_scale)
    if target == "cuda" and not runtime.has_cuda():
        assert "CPU provider" in result.validation.message
    optimized = onnx.load(out)
    ops = [n.op_type for n in optimized.graph.node]
    assert "BatchNormalization" not in ops and "Identity" not in ops and "Mul" not in ops
    assert conv_out_channels(optimized) == [kept, 4]
    assert result.after.params < result.before.params
    assert result.after.macs < result.before.macs


def test_round_to_option_overrides_the_cuda_default(slim_file, tmp_path):
    passes = pipelines.get_pipeline("cuda", remove_channels={"round_to": 4})
    model = onnx.load(slim_file)
    for p in passes:
        model = p(model)
    assert conv_out_channels(model) == [4, 4]


def test_fp16_pipeline_without_cuda_checks_structure_only(slim_file, tmp_path):
    out = tmp_path / "slim-fp16.onnx"
    result = api.optimize(slim_file, out, target="cuda", precision="fp16")
    assert result.passes[-2].name == "convert-fp16"
    if runtime.has_cuda():
        assert result.validation.status == "passed", result.validation.message
        assert result.validation.bound is not None
    else:
        assert result.validation.status == "structure-only"
        assert "needs CUDA" in result.validation.message
    assert result.ok  # "structure-only" means onnx's checker and full check passed
    assert "float16" in {onnx.helper.tensor_dtype_to_np_dtype(t.data_type).name for t in onnx.load(out).graph.initializer}
