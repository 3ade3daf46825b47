"""Large models (issue 13): weights stored in a single-file model are memory-mapped, not copied
(read as references into the file), shape inference and structure checks do not read them, and
single-file outputs are written field by field without building the protobuf in memory."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxdns import api, graphutil, lazyload, modelio
from onnxdns.channels.handlers.layers import _any_nonzero


def mlp(rows: int = 256, cols: int = 128) -> onnx.ModelProto:
    """x[N, rows] -> Gemm (W: 128 KiB, transB) -> Relu -> MatMul (V, small) -> y; a sparse-looking
    small bias stays inline."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((cols, rows)).astype(np.float32)
    w[:, 3] = 0.0
    v = rng.standard_normal((cols, 4)).astype(np.float32)
    b = np.zeros(cols, np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W", "b"], ["h"], transB=1), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "V"], ["y"])],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", rows])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b"), numpy_helper.from_array(v, "V")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_large_initializers_of_a_single_file_are_mapped_from_the_file(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save_model(mlp(), path)
    loaded = modelio.load_ir(path)
    w = loaded.model.graph.initializers["W"].const_value
    assert isinstance(w, ir.ExternalTensor)  # 128 KiB >= LAZY_BYTES: a reference into m.onnx
    assert not isinstance(loaded.model.graph.initializers["V"].const_value, ir.ExternalTensor)  # small: parsed
    assert np.array_equal(w.numpy(), numpy_helper.to_array(mlp().graph.initializer[0]))
    assert not loaded.external and loaded.data_files == set()  # the model's own file is no data file
    assert loaded.disk_bytes == path.stat().st_size


def test_a_hard_linked_file_is_parsed_as_usual(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save_model(mlp(), path)
    os.link(path, tmp_path / "other.onnx")
    assert lazyload.parse_lazy(path) is None  # onnx-ir refuses to map files with several links
    loaded = modelio.load_ir(path)
    assert not isinstance(loaded.model.graph.initializers["W"].const_value, ir.ExternalTensor)


def test_a_truncated_file_is_still_refused_in_one_line(tmp_path):
    path = tmp_path / "m.onnx"
    data = mlp().SerializeToString()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(modelio.OnnxdnsError, match="not a readable ONNX model"):
        modelio.load_ir(path)


def test_streaming_save_writes_the_same_model(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save_model(mlp(), src)
    model = modelio.load_ir(src).model
    model.graph.initializers["b"].meta[modelio.SPARSE_TAG] = "sparse"  # stored sparsely, inline
    out = modelio.save_model(model, tmp_path / "out.onnx")
    expected = modelio.to_proto(model)
    written = onnx.load_model(str(out))
    assert written.ByteSize() == expected.ByteSize() == out.stat().st_size
    onnx.checker.check_model(written)
    assert [t.name for t in written.graph.initializer] == [t.name for t in expected.graph.initializer]
    for a, b in zip(written.graph.initializer, expected.graph.initializer):
        assert a == b
    assert [sp.values.name for sp in written.graph.sparse_initializer] == ["b"]
    assert written.graph.node == expected.graph.node and written.opset_import == expected.opset_import


def test_shape_inference_does_not_serialize_the_weights(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save_model(mlp(), src)
    model = modelio.load_ir(src).model
    proto = modelio.shape_proto(model)
    assert proto.ByteSize() < 64 * 1024  # W (128 KiB) is a reference, V (2 KiB) inline
    assert graphutil.inferred_shapes(model)["h"] == (None, 128)


def test_optimize_a_single_file_model_reads_weights_lazily_and_validates(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save_model(mlp(), src)
    result = api.optimize(src, tmp_path / "out.onnx")
    assert result.validation.status == "passed", result.validation.message
    assert not (tmp_path / "out.onnx.data").exists()
    removed = {r.name: r.details for r in result.passes}["remove-channels"]
    assert removed["total_removed_channels"] == 0  # W's zero column is an input feature, x is no constant


@pytest.mark.parametrize("transpose", [False, True])
def test_any_nonzero_matches_numpy(transpose, monkeypatch):
    monkeypatch.setattr("onnxdns.channels.handlers.layers._CHUNK_ELEMENTS", 7)  # many chunks
    a = np.random.default_rng(1).standard_normal((13, 9)) * (np.random.default_rng(2).random((13, 9)) < 0.2)
    a = a.T if transpose else a
    for keep in (0, 1):
        assert np.array_equal(_any_nonzero(a, keep), (a != 0).any(axis=1 - keep))


def test_large_model_sessions_share_the_mapped_weights(tmp_path, monkeypatch):
    """Above NO_PREPACK_BYTES (lowered here), validation runs on memory-mapped weights and the
    input's session uses the output's arrays for weights whose bytes are equal."""
    from onnxdns import runtime

    src = tmp_path / "m.onnx"
    onnx.save_model(mlp(), src)
    out = tmp_path / "out.onnx"
    monkeypatch.setattr(runtime, "NO_PREPACK_BYTES", 0)
    result = api.optimize(src, out)
    assert result.validation.status == "passed", result.validation.message
    assert result.validation.comparison.max_abs_diff == 0.0
    out_session = runtime.mapped_session(out)
    in_session = runtime.mapped_session(src, out_session)
    shared_out, shared_in = out_session._onnxdns_initializers[0], in_session._onnxdns_initializers[0]
    assert set(shared_in) == {"W"}  # the only initializer large enough to stay in the file
    assert shared_in["W"] is shared_out["W"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the sessions' files are gone


def test_different_weights_are_not_shared(tmp_path):
    from onnxdns import runtime

    a, b = mlp(), mlp()
    w = numpy_helper.to_array(b.graph.initializer[0]).copy()
    w[0, 0] += 1.0
    b.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "W"))
    onnx.save_model(a, tmp_path / "a.onnx")
    onnx.save_model(b, tmp_path / "b.onnx")
    out_session = runtime.mapped_session(tmp_path / "b.onnx")
    in_session = runtime.mapped_session(tmp_path / "a.onnx", out_session)
    assert in_session._onnxdns_initializers[0]["W"] is not out_session._onnxdns_initializers[0]["W"]
    x = {"x": np.ones((2, 256), np.float32)}
    assert not np.array_equal(out_session.run(None, x)[0], in_session.run(None, x)[0])


def test_a_large_constant_folds_and_the_node_less_output_is_accepted(tmp_path):
    """fold-constants evaluates a node on a memory-mapped constant (it used to hand onnxruntime
    a reference to the file), and the fully folded output, which has no node, is not refused."""
    c = np.linspace(-1, 1, 32 * 1024, dtype=np.float32).reshape(32, 1024)  # 128 KiB: mapped
    graph = helper.make_graph([helper.make_node("Relu", ["C"], ["y"])], "folded", [],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [32, 1024])],
                              [numpy_helper.from_array(c, "C")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    src, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save_model(model, src)
    result = api.optimize(src, out, validate=False)
    assert result.ok, result.validation.message
    written = onnx.load_model(str(out))
    assert not written.graph.node
    assert np.array_equal(numpy_helper.to_array(written.graph.initializer[0]), np.maximum(c, 0))
