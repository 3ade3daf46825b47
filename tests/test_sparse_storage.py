"""sparse-storage: mostly-zero weights stored sparsely; smaller file, bit-identical outputs."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from onnxdns import modelio, runtime
from onnxdns.passes.sparse_storage import SparseStoragePass
from passkit import (all_call_styles, check_idempotent, feeds_for, init, make_model, roundtrip, run, same_bytes,
                     tensor_input)

RNG = np.random.default_rng(7)


def pruned(shape, density: float, dtype=np.float32) -> np.ndarray:
    w = RNG.standard_normal(shape).astype(dtype)
    w[RNG.random(shape) >= density] = 0
    return w


def gemm_model(w: np.ndarray) -> onnx.ModelProto:
    k, m = w.shape
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])]
    return make_model(nodes, [tensor_input("x", ["N", k])], [tensor_input("y", ["N", m])], [init("w", w)])


def bit_identical(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return all(x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes() for x, y in zip(a, b))


def test_file_shrinks_and_outputs_are_bit_identical(tmp_path):
    w = pruned((256, 256), 0.05)
    w[0, :8] = -0.0  # signed zeros must survive
    model = gemm_model(w)
    result = SparseStoragePass().apply(model)
    assert result.modified and result.details["sparse"] == ["w"]
    out = result.model
    assert [s.values.name for s in out.graph.sparse_initializer] == ["w"] and not out.graph.initializer
    dense_path = modelio.save_model(model, tmp_path / "dense.onnx")
    sparse_path = modelio.save_model(out, tmp_path / "sparse.onnx")
    dense_size, sparse_size = dense_path.stat().st_size, sparse_path.stat().st_size
    nnz = int(np.count_nonzero(w.view(np.uint32)))
    assert sparse_size < 0.15 * dense_size
    stored = out.graph.sparse_initializer[0].ByteSize()
    assert stored / nnz < 7.1  # 4 value bytes + a varint index of <= 3 bytes (65,536 elements)
    # onnxruntime loads the file and gives bit-identical outputs
    feeds = feeds_for(model, batch=5)
    assert bit_identical(runtime.run(str(sparse_path), feeds), runtime.run(str(dense_path), feeds))
    # the checked loader and the onnx-ir bridge round-trip it; signed zeros are kept
    loaded = modelio.load_model(sparse_path)
    back = modelio.to_proto(modelio.to_ir(loaded))
    assert same_bytes(back, loaded)
    dense_again = modelio.sparse_to_array(loaded.graph.sparse_initializer[0])
    assert dense_again.tobytes() == w.tobytes()


def test_idempotent_and_call_styles():
    model = gemm_model(pruned((64, 48), 0.2))
    check_idempotent(SparseStoragePass, model)
    feeds = feeds_for(model)
    for style, out, modified in all_call_styles(SparseStoragePass, model):
        assert modified in (True, None), style
        assert len(out.graph.sparse_initializer) == 1, style
        assert bit_identical(run(out, feeds), run(model, feeds)), style


@pytest.mark.parametrize("case", ["tiny", "integer", "too_dense", "not_smaller", "graph_input", "graph_output"])
def test_left_dense(case):
    options = {"min_sparsity": 0.0} if case == "not_smaller" else {}
    density = {"tiny": 0.1, "integer": 0.6, "too_dense": 0.6, "not_smaller": 0.9}.get(case, 0.1)
    model = gemm_model(pruned((8, 8) if case == "tiny" else (64, 48), density))  # 0.6: 40 % zeros < 0.5
    if case == "integer":  # a mostly-zero int64 tensor stays dense
        model.graph.initializer.append(init("ids", np.where(RNG.random(4096) < 0.05, 3, 0).astype(np.int64)))
    elif case == "graph_input":
        model.graph.input.append(tensor_input("w", [64, 48]))
    elif case == "graph_output":
        model.graph.output.append(tensor_input("w", [64, 48]))
    result = SparseStoragePass(**options).apply(model)
    assert not result.modified
    assert not result.model.graph.sparse_initializer
    assert same_bytes(result.model, roundtrip(model))


def test_min_sparsity_option():
    model = gemm_model(pruned((64, 48), 0.45))
    assert SparseStoragePass().apply(model).modified
    assert not SparseStoragePass(min_sparsity=0.6).apply(model).modified


def test_weight_filled_in_by_a_later_edit_goes_back_to_dense():
    sparse = SparseStoragePass()(gemm_model(pruned((64, 48), 0.1)))
    ir_model = modelio.to_ir(sparse)
    weight = ir_model.graph.initializers["w"]
    assert weight.meta[modelio.SPARSE_TAG] == "sparse"
    weight.const_value = ir.tensor(RNG.standard_normal((64, 48)).astype(np.float32), name="w")
    # modelio.to_proto alone already refuses a sparse encoding that is larger ...
    assert not modelio.to_proto(ir_model).graph.sparse_initializer
    # ... and the pass drops the stale tag
    result = SparseStoragePass().apply(ir_model)
    assert result.modified and result.details["dense_again"] == ["w"]
    assert modelio.SPARSE_TAG not in weight.meta


def test_float16_and_float64_weights():
    for dtype in (np.float16, np.float64):
        w = pruned((128, 64), 0.05, dtype)
        elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        model = gemm_model(w)
        model.graph.input[0].type.tensor_type.elem_type = elem
        model.graph.output[0].type.tensor_type.elem_type = elem
        result = SparseStoragePass().apply(model)
        assert result.modified
        feeds = {"x": RNG.standard_normal((3, 128)).astype(dtype)}
        assert bit_identical(run(result.model, feeds), run(model, feeds))


def _index_model(indices: np.ndarray, w: np.ndarray) -> onnx.ModelProto:
    values = w[tuple(indices.astype(np.int64).T)] if indices.ndim == 2 else w.reshape(-1)[indices.astype(np.int64)]
    sparse = helper.make_sparse_tensor(numpy_helper.from_array(values, "w"), numpy_helper.from_array(indices, "i"),
                                       list(w.shape))
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [tensor_input("x", [1, 40])],
                              [tensor_input("y", [1, 30])], sparse_initializer=[sparse])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("layout", ["linear", "coordinates"])
@pytest.mark.parametrize("dtype, ort_loads", [(np.int64, True), (np.int32, True), (np.int16, True),
                                              (np.uint16, False), (np.uint8, False)])
def test_index_encodings_onnxruntime_and_checker(layout, dtype, ort_loads):
    """The facts behind the encoding choice (onnxruntime 1.19.2, onnx 1.16.2): onnxruntime reads
    signed linear or coordinate indices of any width but no unsigned ones; onnx.checker accepts
    int64 only; full_check rejects any sparse initializer feeding a dense op."""
    w = np.zeros((40, 30), np.float32)
    w[RNG.random(w.shape) < 0.1] = 1.25
    flat = np.flatnonzero(w)
    indices = (flat if layout == "linear" else np.argwhere(w)).astype(dtype)
    if dtype == np.uint8 and layout == "linear":
        indices = indices[flat < 256]
    model = _index_model(indices, w)
    if dtype == np.int64:
        onnx.checker.check_model(model)
        with pytest.raises(onnx.shape_inference.InferenceError, match="wrong rank"):
            onnx.checker.check_model(model, full_check=True)
    else:
        with pytest.raises(onnx.checker.ValidationError, match="must have INT64 type"):
            onnx.checker.check_model(model)
    so = ort.SessionOptions()
    so.log_severity_level = 4
    x = np.ones((1, 40), np.float32)
    if ort_loads:
        y = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})
        np.testing.assert_array_equal(y[0], x @ w)
    else:
        # onnxruntime 1.19: INVALID_ARGUMENT; newer: INVALID_GRAPH "... int8, int16, int32 or int64"
        with pytest.raises(Exception, match="INVALID_ARGUMENT|INVALID_GRAPH"):
            ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
