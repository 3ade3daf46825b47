"""remove-channels: exact removal through every structure the handler table knows."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from onnx import helper, numpy_helper

from onnxdns.passes.remove_channels import RemoveChannelsPass
from onnxdns.synthetic import randomize_batchnorm, zero_channels
from onnxdns.testing import assert_exact, export_module

pytestmark = pytest.mark.torch  # every test builds models with torch (onnxdns[zoo])


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _edit(model: onnx.ModelProto, name: str, change) -> None:
    """Replace initializer ``name`` by ``change(copy of its array)``."""
    for t in model.graph.initializer:
        if t.name == name:
            arr = numpy_helper.to_array(t).copy()
            out = change(arr)
            t.CopyFrom(numpy_helper.from_array(arr if out is None else out, name))
            return
    raise KeyError(name)


def _layer_of(model: onnx.ModelProto, weight: str) -> str:
    node = next(n for n in model.graph.node if len(n.input) > 1 and n.input[1] == weight)
    return node.name or f"{node.op_type}({weight})"


def run_removal(proto, **options):
    result = RemoveChannelsPass(**options).apply(proto)
    assert_exact(proto, result.model)
    again = RemoveChannelsPass(**options).apply(result.model)
    assert not again.modified
    assert again.model.SerializeToString() == result.model.SerializeToString()
    return result


def accounted(proto, zeroed, details):
    """Every zeroed channel was removed or reported as kept, and nothing else was removed."""
    for weight, channels in zeroed.items():
        layer = _layer_of(proto, weight)
        removed = set(details["removed_channels"].get(layer, []))
        kept = set(details["constant_kept"].get(layer, {}))
        assert removed | kept == set(channels), (layer, sorted(removed), sorted(kept), channels)


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 8, 3, bias=False), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.fc1, self.fc2 = nn.Linear(16 * 6 * 6, 20), nn.Linear(20, 10)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.b1(self.c1(x))), 2)
        x = torch.relu(self.b2(self.c2(x)))
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


def test_chain_zero_channels_removed_and_accounted():
    torch.manual_seed(0)
    proto = randomize_batchnorm(export_module(Chain(), (1, 14, 14)), seed=1)
    masked, zeroed = zero_channels(proto, 0.5, seed=0)
    result = run_removal(masked)
    accounted(masked, zeroed, result.details)
    # the classifier feeds the graph output: its zeroed channels are kept, with that reason
    last = _layer_of(masked, list(zeroed)[-1])
    assert all("graph output" in r for r in result.details["constant_kept"][last].values())
    assert result.details["total_removed_channels"] > 0
    # a constant reaching the zero-padded conv c2 is kept unless it is exactly zero
    reasons = [r for kept in result.details["constant_kept"].values() for r in kept.values()]
    assert all(("zero-padded" in r) or ("graph output" in r) for r in reasons)


def test_chain_parameter_count_matches_removed_slices():
    torch.manual_seed(0)
    proto = export_module(Chain(), (1, 14, 14))  # fresh BN: constants are 0, everything can go
    masked, zeroed = zero_channels(proto, 0.5, seed=3)
    result = run_removal(masked)
    removed = {k: len(v) for k, v in result.details["removed_channels"].items()}
    names = list(zeroed)
    r1, r2, r3 = (removed.get(_layer_of(masked, n), 0) for n in names[:3])
    kept1, kept2, kept3 = 8 - r1, 16 - r2, 20 - r3
    expected = (
        r1 * 9 + r1 * 4  # c1 filters + b1 (scale, bias, mean, var)
        + (8 * 16 - kept1 * kept2) * 9 + r2 * 4  # c2 in and out slices + b2
        + (16 * 36 * 20 - kept2 * 36 * kept3) + r3  # fc1 in (blocks of 36) and out + bias
        + r3 * 10  # fc2 input columns
    )
    assert result.details["params_removed"] == expected


class Residual(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.stem, self.bs = nn.Conv2d(1, c, 3, bias=False), nn.BatchNorm2d(c)
        self.a, self.ba = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.b, self.bb = nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        x = torch.relu(self.bs(self.stem(x)))
        y = self.bb(self.b(torch.relu(self.ba(self.a(x)))))
        x = torch.relu(x + y)
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def test_residual_group_removed_only_when_every_member_can_go():
    torch.manual_seed(0)
    proto = export_module(Residual(), (1, 10, 10))
    w = _weights(proto)
    stem, a, b = (n.input[1] for n in proto.graph.node if n.op_type == "Conv")
    # zero channel 2 in both residual members, channel 5 only in the stem: 5 must stay
    masked, _ = zero_channels(proto, 0.0)
    for name, rows in ((stem, [2, 5]), (b, [2]), (a, [1])):
        arr = w[name].copy()
        arr[rows] = 0
        for t in masked.graph.initializer:
            if t.name == name:
                t.CopyFrom(numpy_helper.from_array(arr, name))
    result = run_removal(masked)
    removed = result.details["removed_channels"]
    assert removed[_layer_of(masked, stem)] == [2]
    assert removed[_layer_of(masked, b)] == [2]
    assert removed[_layer_of(masked, a)] == [1]
    assert 5 in result.details["constant_kept"][_layer_of(masked, stem)]


class DenseConcat(nn.Module):
    def __init__(self):
        super().__init__()
        self.c0 = nn.Conv2d(1, 6, 3)
        self.c1, self.b1 = nn.Conv2d(6, 4, 1, bias=False), nn.BatchNorm2d(10)
        self.c2 = nn.Conv2d(10, 8, 1)
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        x = torch.relu(self.c0(x))
        x = torch.relu(self.b1(torch.cat([x, self.c1(x)], 1)))  # BN after a concat
        return self.fc(torch.flatten(torch.relu(self.c2(x)), 1))


def test_concat_offsets():
    torch.manual_seed(0)
    proto = randomize_batchnorm(export_module(DenseConcat(), (1, 10, 10)), seed=2)
    masked, zeroed = zero_channels(proto, 0.5, seed=4)
    result = run_removal(masked)
    accounted(masked, zeroed, result.details)
    assert result.details["removed_channels"]


class Depthwise(nn.Module):
    def __init__(self, multiplier=1, pad=1):
        super().__init__()
        self.expand, self.be = nn.Conv2d(3, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.dw, self.bd = nn.Conv2d(8, 8 * multiplier, 3, padding=pad, groups=8, bias=False), nn.BatchNorm2d(8 * multiplier)
        self.project = nn.Conv2d(8 * multiplier, 4, 1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        x = nn.functional.relu6(self.be(self.expand(x)))
        x = nn.functional.relu6(self.bd(self.dw(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.project(x), 1), 1))


@pytest.mark.parametrize("multiplier", [1, 2])
def test_depthwise_group_attribute_follows(multiplier):
    torch.manual_seed(0)
    proto = export_module(Depthwise(multiplier), (3, 8, 8))  # fresh BN: zero constants stay zero
    masked, zeroed = zero_channels(proto, 0.5, seed=5)
    result = run_removal(masked)
    accounted(masked, zeroed, result.details)
    expand = _layer_of(masked, next(iter(zeroed)))
    gone = len(result.details["removed_channels"][expand])
    dw = next(n for n in result.model.graph.node if n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute))
    group = next(a.i for a in dw.attribute if a.name == "group")
    assert group == 8 - gone
    assert _weights(result.model)[dw.input[1]].shape[0] == (8 - gone) * multiplier


def test_depthwise_with_padding_keeps_nonzero_constants():
    torch.manual_seed(0)
    proto = randomize_batchnorm(export_module(Depthwise(1), (3, 8, 8)), seed=7)
    masked, zeroed = zero_channels(proto, 0.5, seed=5)
    result = run_removal(masked)
    accounted(masked, zeroed, result.details)


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 8, 1)
        self.g = nn.Conv2d(8, 8, 3, groups=2)  # 4 in / 4 out per group, no padding
        self.c3 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.c3(torch.relu(self.g(torch.relu(self.c1(x)))))


def test_grouped_conv_loses_equal_counts_per_group():
    torch.manual_seed(0)
    proto = export_module(Grouped(), (2, 6, 6))
    c1 = next(n for n in proto.graph.node if n.op_type == "Conv")
    # group 0 of the grouped conv would lose 2 inputs, group 1 only 1: one per group can go
    _edit(proto, c1.input[1], lambda w: w.__setitem__([0, 1, 5], 0))
    _edit(proto, c1.input[2], lambda b: b.__setitem__(slice(None), -1.0))  # relu(-1) = 0
    result = run_removal(proto)
    gconv = next(n for n in result.model.graph.node if any(a.name == "group" and a.i == 2 for a in n.attribute))
    assert _weights(result.model)[gconv.input[1]].shape[1] == 3  # 4 - 1 per group
    layer = _layer_of(proto, c1.input[1])
    assert len(result.details["removed_channels"][layer]) == 2
    assert any("grouped conv" in r for r in result.details["constant_kept"][layer].values())


class SplitSlice(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 12, 3)
        self.a, self.b = nn.Conv2d(5, 4, 1), nn.Conv2d(7, 4, 1)
        self.c = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        p, q = torch.split(x, [5, 7], dim=1)
        s = x[:, 2:6]
        return self.a(p) + self.b(q) + self.c(s)


def test_split_and_slice_map_channel_ranges():
    torch.manual_seed(0)
    proto = export_module(SplitSlice(), (1, 8, 8))
    masked, zeroed = zero_channels(proto, 0.5, seed=1)
    result = run_removal(masked)
    c1 = _layer_of(masked, next(iter(zeroed)))
    assert result.details["removed_channels"][c1]


class TokenMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 16), nn.Linear(16, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def test_matmul_on_3d_input_and_bias_folding():
    torch.manual_seed(0)
    model = TokenMLP()
    with torch.no_grad():
        model.fc1.bias[:] = 0.5  # zeroed rows become constant 0.5 after relu: folded downstream
    proto = export_module(model, (5, 6))
    assert any(n.op_type == "MatMul" for n in proto.graph.node)
    masked, zeroed = zero_channels(proto, 0.5, seed=2)
    result = run_removal(masked)
    accounted(masked, zeroed, result.details)
    assert result.details["total_removed_channels"] >= 8


def _gemm_model(trans_b: int) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((6, 8)).astype(np.float32)
    w1[:, [1, 4]] = 0
    b1 = np.full(8, 0.25, np.float32)
    w2 = rng.standard_normal((8, 3)).astype(np.float32)
    w2_stored = w2.T.copy() if trans_b else w2
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], alpha=0.5, beta=2.0),
        helper.make_node("Sigmoid", ["h"], ["s"]),
        helper.make_node("Gemm", ["s", "w2"], ["y"], transB=trans_b, alpha=1.5),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 6])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(b1, "b1"), numpy_helper.from_array(w2_stored, "w2")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_alpha_beta_and_new_bias(trans_b):
    proto = _gemm_model(trans_b)
    result = run_removal(proto)  # sigmoid(0.5) = constant, second Gemm gains a bias input
    assert result.details["removed_channels"] == {"Gemm(w1)": [1, 4]}
    second = result.model.graph.node[-1]
    assert len(second.input) == 3


def test_batchnorm_gamma_zero_makes_channel_constant():
    torch.manual_seed(0)
    model = Residual()
    proto = export_module(model, (1, 10, 10))
    bn = next(n for n in proto.graph.node if n.op_type == "BatchNormalization")
    for t in proto.graph.initializer:
        if t.name == bn.input[1]:
            gamma = numpy_helper.to_array(t).copy()
            gamma[[0, 3]] = 0
            t.CopyFrom(numpy_helper.from_array(gamma, t.name))
        if t.name == bn.input[2]:
            beta = numpy_helper.to_array(t).copy()
            beta[[0, 3]] = -1.0  # relu(-1) = 0: removable although the conv weights are non-zero
            t.CopyFrom(numpy_helper.from_array(beta, t.name))
    result = RemoveChannelsPass().apply(proto)
    assert_exact(proto, result.model)
    # the stem's channels are tied to the residual stream, which has non-constant members
    assert result.details["total_removed_channels"] == 0
    # the first BN inside a residual branch (a's) is not tied: make its gamma zero instead
    bn_a = [n for n in proto.graph.node if n.op_type == "BatchNormalization"][1]
    for t in proto.graph.initializer:
        if t.name in (bn_a.input[1], bn_a.input[2]):
            arr = numpy_helper.to_array(t).copy()
            arr[[0, 3]] = 0.0 if t.name == bn_a.input[1] else -1.0
            t.CopyFrom(numpy_helper.from_array(arr, t.name))
    result = run_removal(proto)
    conv_a = [n for n in proto.graph.node if n.op_type == "Conv"][1]
    assert result.details["removed_channels"][_layer_of(proto, conv_a.input[1])] == [0, 3]


def test_dead_channels_ignored_by_every_consumer_are_removed():
    torch.manual_seed(0)
    proto = export_module(Chain(), (1, 14, 14))
    fc1 = next(n for n in proto.graph.node if n.op_type == "Gemm")
    for t in proto.graph.initializer:
        if t.name == fc1.input[1]:
            w = numpy_helper.to_array(t).copy()
            w[:, 36 * 3:36 * 5] = 0  # channels 3 and 4 of c2 are never read
            t.CopyFrom(numpy_helper.from_array(w, t.name))
    result = run_removal(proto)
    c2 = [n for n in proto.graph.node if n.op_type == "Conv"][1]
    assert result.details["removed_channels"][_layer_of(proto, c2.input[1])] == [3, 4]


def test_unknown_op_stops_propagation_and_is_reported():
    torch.manual_seed(0)

    class WithSoftmax(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(1, 6, 3), nn.Conv2d(6, 4, 1)

        def forward(self, x):
            return self.c2(torch.softmax(self.c1(x), dim=1))

    proto = export_module(WithSoftmax(), (1, 6, 6))
    masked, zeroed = zero_channels(proto, 0.5, seed=0)
    result = run_removal(masked)
    assert result.details["unknown_ops"] == {"Softmax": 1}
    c1 = _layer_of(masked, next(iter(zeroed)))
    assert c1 not in result.details["removed_channels"]
    assert all("Softmax" in r for r in result.details["constant_kept"][c1].values())


def test_round_to_and_min_keep():
    torch.manual_seed(0)
    proto = export_module(Chain(), (1, 14, 14))
    masked, zeroed = zero_channels(proto, 0.5, seed=0)
    result = run_removal(masked, round_to=4)
    w = _weights(result.model)
    for node in result.model.graph.node:
        if node.op_type == "Conv":
            assert w[node.input[1]].shape[0] % 4 == 0
    # a layer with every channel zero keeps one
    c1 = next(n for n in proto.graph.node if n.op_type == "Conv").input[1]
    for t in proto.graph.initializer:
        if t.name == c1:
            t.CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(t)), t.name))
    result = run_removal(proto)
    assert _weights(result.model)[next(n for n in result.model.graph.node if n.op_type == "Conv").input[1]].shape[0] == 1


def test_shared_weight_is_not_mutated_for_one_user():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 1, 1)).astype(np.float32)
    w[1] = 0
    head = rng.standard_normal((4, 2, 1, 1)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["a"]),
        helper.make_node("Relu", ["a"], ["ra"]),
        helper.make_node("Conv", ["ra", "shared"], ["y1"]),
        helper.make_node("Conv", ["x2", "shared"], ["y2"]),  # same weight, other input: must stay whole
    ]
    shared = rng.standard_normal((2, 4, 1, 1)).astype(np.float32)
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", 1, ["N", 3, 4, 4]), helper.make_tensor_value_info("x2", 1, ["N", 4, 4, 4])],
        [helper.make_tensor_value_info("y1", 1, ["N", 2, 4, 4]), helper.make_tensor_value_info("y2", 1, ["N", 2, 4, 4])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(shared, "shared")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    del head
    result = run_removal(proto)
    weights = _weights(result.model)
    assert weights["shared"].shape == (2, 4, 1, 1)
    assert any(v.shape == (2, 3, 1, 1) for v in weights.values())


def test_constant_into_matmul_that_is_a_graph_output_gets_a_named_bias_add():
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((4, 6)).astype(np.float32)
    w1[:, [0, 2]] = 0
    w2 = rng.standard_normal((6, 3)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Add", ["h", "b1"], ["hb"]),
        helper.make_node("Sigmoid", ["hb"], ["s"]),  # sigmoid(b1) of the zero columns: constant
        helper.make_node("MatMul", ["s", "w2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", 1, ["N", 4])], [helper.make_tensor_value_info("y", 1, ["N", 3])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(rng.standard_normal(6).astype(np.float32), "b1"),
         numpy_helper.from_array(w2, "w2")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    result = run_removal(proto)
    assert result.details["removed_channels"] == {"MatMul(w1)": [0, 2]}
    assert result.model.graph.output[0].name == "y"
    assert result.model.graph.node[-1].op_type == "Add"


def gather_model(indices, *, second_reader: bool = False, axis: int = 1) -> onnx.ModelProto:
    """x -> Conv 3->8 -> Relu -> Gather(indices, axis) -> Conv 3x3 -> y [; Relu output also read
    by a 1x1 Conv -> z]."""
    rng = np.random.default_rng(3)
    k = len(indices) if axis == 1 else 8
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Gather", ["r1", "idx"], ["g"], axis=axis),
        helper.make_node("Conv", ["g", "w2", "b2"], ["y"], name="conv2"),
    ]
    inits = [numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b1"),
             numpy_helper.from_array(np.array(indices, np.int64), "idx"),
             numpy_helper.from_array(rng.standard_normal((4, k, 3, 3)).astype(np.float32), "w2"),
             numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b2")]
    outputs = [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)]
    if second_reader:
        nodes.append(helper.make_node("Conv", ["r1", "w3"], ["z"], name="conv3"))
        inits.append(numpy_helper.from_array(rng.standard_normal((2, 8, 1, 1)).astype(np.float32), "w3"))
        outputs.append(helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3, 10, 10])],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_channels_no_gather_selects_are_removed_from_the_producer():
    """A Gather of channels 6, 1, 3 leaves the other five unread: conv1 keeps three filters and the
    Gather's indices are renumbered (order kept)."""
    proto = gather_model([6, 1, 3])
    result = run_removal(proto)
    assert result.details["removed_channels"] == {"conv1": [0, 2, 4, 5, 7]}
    w = _weights(result.model)
    assert w["w1"].shape == (3, 3, 3, 3)
    np.testing.assert_array_equal(w["idx"], [2, 0, 1])
    np.testing.assert_array_equal(w["w1"], _weights(proto)["w1"][[1, 3, 6]])


@pytest.mark.parametrize("case", ["second_reader", "repeated", "other_axis"])
def test_gather_channels_stay_when_read_elsewhere_or_not_a_channel_subset(case):
    if case == "second_reader":  # conv3 reads every channel of the Relu
        proto = gather_model([6, 1, 3], second_reader=True)
    elif case == "repeated":  # a channel gathered twice: not modelled, so pinned
        proto = gather_model([6, 1, 1])
    else:  # gathering rows (axis 2) keeps every channel
        proto = gather_model([0, 2, 4, 6, 8, 9], axis=2)
    result = RemoveChannelsPass().apply(proto)
    assert not result.modified
    assert result.details["removed_channels"] == {}
