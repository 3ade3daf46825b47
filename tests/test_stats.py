"""model_stats on tiny graphs whose parameters, non-zeros and MACs are counted by hand."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxdns import modelio
from onnxdns.stats import model_stats


def make_model(nodes, inputs, outputs, initializers=(), sparse=(), opset=17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers), sparse_initializer=list(sparse))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def inp(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def out(name, rank):
    """A graph output of the given rank with unnamed dimensions (shape inference fills them)."""
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, [None] * rank)


def init(name, array):
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


def test_conv_params_nonzeros_macs():
    w = np.ones((4, 3, 3, 3), np.float32)
    w[0] = 0  # 27 zeros
    b = np.array([1, 0, 2, 3], np.float32)
    m = make_model([helper.make_node("Conv", ["x", "W", "B"], ["y"], pads=[1, 1, 1, 1], name="conv")],
                   [inp("x", ["N", 3, 8, 8])], [out("y", 4)], [init("W", w), init("B", b)])
    serialized = m.SerializeToString()
    s = model_stats(m)
    assert m.SerializeToString() == serialized  # the model is not modified
    (layer,) = s.layers
    assert (layer.name, layer.op, layer.weight_shape) == ("conv", "Conv", (4, 3, 3, 3))
    assert layer.params == 108 + 4
    assert layer.nonzeros == 81 + 3
    # output [1, 4, 8, 8] = 256 elements, each C_in * 3 * 3 = 27 MACs
    assert layer.macs == 256 * 27 == s.macs
    assert s.macs_complete
    assert (s.params, s.nonzeros, s.nodes) == (112, 84, 1)
    assert s.file_bytes == m.ByteSize()
    assert model_stats(m, file_bytes=1234).file_bytes == 1234


@pytest.mark.parametrize(
    "group, w_shape, out_channels, expected_macs",
    [
        (2, (6, 2, 3, 3), 6, 6 * 4 * 4 * 2 * 9),  # grouped: C_in/group = 2
        (4, (4, 1, 3, 3), 4, 4 * 4 * 4 * 1 * 9),  # depthwise: C_in/group = 1
    ],
)
def test_grouped_and_depthwise_conv(group, w_shape, out_channels, expected_macs):
    m = make_model([helper.make_node("Conv", ["x", "W"], ["y"], group=group)],
                   [inp("x", [1, 4, 6, 6])], [out("y", 4)], [init("W", np.ones(w_shape))])
    (layer,) = model_stats(m).layers
    assert layer.macs == expected_macs
    assert layer.params == int(np.prod(w_shape))
    assert layer.name == "Conv_0"


def test_conv_transpose_counts_input_elements():
    # C_in 2, C_out/group 3, kernel 2x2, stride 2: each of the 2*3*3 = 18 input elements feeds 3*4 MACs
    m = make_model([helper.make_node("ConvTranspose", ["x", "W"], ["y"], strides=[2, 2])],
                   [inp("x", ["N", 2, 3, 3])], [out("y", 4)], [init("W", np.ones((2, 3, 2, 2)))])
    (layer,) = model_stats(m).layers
    assert layer.macs == 18 * 3 * 4 == 216
    assert layer.weight_shape == (2, 3, 2, 2)


def test_gemm_trans_b_with_bias():
    w = np.arange(15, dtype=np.float32).reshape(3, 5)  # one zero (the first element)
    m = make_model([helper.make_node("Gemm", ["x", "W", "C"], ["y"], transB=1)],
                   [inp("x", ["batch", 5])], [out("y", 2)], [init("W", w), init("C", np.zeros(3))])
    (layer,) = model_stats(m).layers
    assert layer.macs == 1 * 3 * 5  # M x N x K at batch 1
    assert layer.params == 18
    assert layer.nonzeros == 14
    assert layer.weight_shape == (3, 5)


def test_matmul_batched_and_between_activations():
    # x [1, 2, 4, 5] @ W [5, 6] -> [1, 2, 4, 6]: 48 outputs x K=5; a [1,3,4] @ b [1,4,2]: 6 outputs x K=4
    m = make_model(
        [helper.make_node("MatMul", ["x", "W"], ["y"]), helper.make_node("MatMul", ["a", "b"], ["z"])],
        [inp("x", ["N", 2, 4, 5]), inp("a", ["N", 3, 4]), inp("b", ["N", 4, 2])], [out("y", 4), out("z", 3)],
        [init("W", np.ones((5, 6)))],
    )
    s = model_stats(m)
    weighted, activations = s.layers
    assert (weighted.macs, weighted.params, weighted.weight_shape) == (240, 30, (5, 6))
    assert (activations.macs, activations.params, activations.weight_shape) == (24, 0, (1, 4, 2))
    assert s.macs == 264
    assert s.params == 30


def test_batchnorm_row_not_in_mac_total():
    c = 4
    inits = [init("s", np.ones(c)), init("b", np.zeros(c)), init("m", np.zeros(c)), init("v", np.ones(c))]
    m = make_model([helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"])],
                   [inp("x", ["N", c, 2, 2])], [out("y", 4)], inits)
    s = model_stats(m)
    (layer,) = s.layers
    assert (layer.params, layer.nonzeros, layer.macs, layer.weight_shape) == (16, 8, 16, (4,))
    assert s.macs == 0 and s.macs_complete


def test_sparse_initializer_is_densified():
    w = np.zeros((10, 8), np.float32)
    w[1, 2], w[7, 7] = 3.0, -1.0
    sp = modelio.array_to_sparse("W", w)
    m = make_model([helper.make_node("MatMul", ["x", "W"], ["y"])], [inp("x", ["N", 10])], [out("y", 2)], sparse=[sp])
    s = model_stats(m)
    (layer,) = s.layers
    assert (layer.params, layer.nonzeros, layer.macs) == (80, 2, 80)
    assert (s.params, s.nonzeros) == (80, 2)


def test_masked_weight_counts_the_product_once_and_totals_count_every_float_tensor():
    w = np.full((3, 2, 1, 1), 2.0, np.float32)
    mask = np.ones_like(w)
    mask[0] = 0
    nodes = [
        helper.make_node("Mul", ["W", "W__mask"], ["Wm"]),
        helper.make_node("Conv", ["x", "Wm"], ["y"]),
        helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.array([0.0, 1.0], np.float32))),
        helper.make_node("Constant", [], ["shape"], value=numpy_helper.from_array(np.array([1, -1], np.int64))),
        helper.make_node("Reshape", ["y", "shape"], ["z"]),
        helper.make_node("Add", ["z", "k2"], ["out"]),
    ]
    m = make_model(nodes, [inp("x", ["N", 2, 1, 1])], [out("out", 2)],
                   [init("W", w), init("W__mask", mask), init("k2", np.zeros(3))])
    s = model_stats(m)
    (layer,) = s.layers
    assert (layer.params, layer.nonzeros, layer.weight_shape, layer.macs) == (6, 4, (3, 2, 1, 1), 3 * 2)
    # floats: W*mask 6 (the mask is not a parameter) + k2 3 + Constant k 2 (int64 shape not counted)
    assert s.params == 11
    assert s.nonzeros == 4 + 0 + 1
    assert s.nodes == 6


def test_lenet5_matches_the_paper_counts():
    """Caffe LeNet-5 (20-50-500): 431,080 parameters and 2,293,000 MACs per 1x28x28 image."""
    rng = np.random.default_rng(0)
    inits = [
        init("c1w", rng.standard_normal((20, 1, 5, 5))), init("c1b", rng.standard_normal(20)),
        init("c2w", rng.standard_normal((50, 20, 5, 5))), init("c2b", rng.standard_normal(50)),
        init("f1w", rng.standard_normal((500, 800))), init("f1b", rng.standard_normal(500)),
        init("f2w", rng.standard_normal((10, 500))), init("f2b", rng.standard_normal(10)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "c1w", "c1b"], ["c1"]),
        helper.make_node("MaxPool", ["c1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "c2w", "c2b"], ["c2"]),
        helper.make_node("MaxPool", ["c2"], ["p2"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p2"], ["f"]),
        helper.make_node("Gemm", ["f", "f1w", "f1b"], ["h"], transB=1),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Gemm", ["r", "f2w", "f2b"], ["logits"], transB=1),
    ]
    s = model_stats(make_model(nodes, [inp("x", ["N", 1, 28, 28])], [out("logits", 2)], inits))
    assert s.params == 431_080
    assert [layer.macs for layer in s.layers] == [24 * 24 * 20 * 25, 8 * 8 * 50 * 20 * 25, 800 * 500, 500 * 10]
    assert s.macs == 2_293_000


def test_unknown_shapes_give_unknown_macs_not_an_error():
    # Reshape to a shape computed from a graph input: shape inference cannot know the output.
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["r"]), helper.make_node("MatMul", ["r", "W"], ["y"])]
    m = make_model(nodes, [inp("x", ["N", 6]), helper.make_tensor_value_info("shape", TensorProto.INT64, [2])],
                   [out("y", 2)], [init("W", np.ones((3, 2)))])
    s = model_stats(m)
    assert s.layers[0].macs is None
    assert not s.macs_complete
    assert s.params == 6


@pytest.mark.torch
@pytest.mark.parametrize("name", ["resnet-20", "mobilenet-v2"])
def test_zoo_macs_match_the_pytorch_count(name, tmp_path):
    """Exported zoo models (residual adds, depthwise convs): ONNX MACs equal the PyTorch hook count."""
    from onnxdns import models

    path = models.export_model(name, tmp_path / f"{name}.onnx")
    stats = model_stats(onnx.load(path))
    assert stats.macs_complete
    assert stats.macs == models.macs(models.build(name), models.INPUT_SHAPES[name])


def test_a_batch_of_minus_one_counts_as_one_sample():
    """Paddle exports write the batch dimension as dim_value -1 (PP-OCR's classifier): MACs are
    per sample, never negative."""
    w = np.ones((4, 3, 3, 3), np.float32)
    x = inp("x", [1, 3, 8, 8])
    x.type.tensor_type.shape.dim[0].dim_value = -1
    m = make_model([helper.make_node("Conv", ["x", "W"], ["y"], pads=[1, 1, 1, 1], name="conv")], [x], [out("y", 4)],
                   [init("W", w)])
    assert model_stats(m).macs == 4 * 8 * 8 * 27
