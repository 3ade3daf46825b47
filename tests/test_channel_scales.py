"""insert-channel-scales, fold-channel-scales and slim-channels on inserted scales: Network
Slimming of models whose BatchNorm was folded into the convolutions (the usual export)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from onnxdns import modelio
from onnxdns.channels.remove import build_channel_graph
from onnxdns.passes.fold_batchnorm import FoldBatchNormPass
from onnxdns.passes.fold_channel_scales import FoldChannelScalesPass
from onnxdns.passes.insert_channel_scales import InsertChannelScalesPass, is_scale_name
from onnxdns.passes.slim_channels import SlimChannelsPass
from passkit import (assert_exact, check_idempotent, feeds_for, init, initializer_arrays, make_model, op_types, run,
                     tensor_input)


# --------------------------------------------------------------------------- tiny graphs


def _conv(name, x, out, c_in, c_out, rng, *, k=3, group=1, bias=True):
    pad = k // 2
    w = (rng.standard_normal((c_out, c_in // group, k, k)) * 0.5).astype(np.float32)
    inputs, inits = [x, f"{name}.weight"], [init(f"{name}.weight", w)]
    if bias:
        inputs.append(f"{name}.bias")
        inits.append(init(f"{name}.bias", rng.standard_normal(c_out).astype(np.float32)))
    node = helper.make_node("Conv", inputs, [out], name=name, pads=[pad] * 4, group=group, kernel_shape=[k, k])
    return [node], inits


def _head(x, channels, rng):
    nodes = [helper.make_node("GlobalAveragePool", [x], ["gap"]), helper.make_node("Flatten", ["gap"], ["flat"]),
             helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], transB=1, name="fc")]
    return nodes, [init("fc.weight", rng.standard_normal((10, channels)).astype(np.float32)),
                   init("fc.bias", rng.standard_normal(10).astype(np.float32))]


def _build(layers, head_from, channels, rng):
    nodes, inits = [], []
    for n, i in layers:
        nodes += n
        inits += i
    n, i = _head(head_from, channels, rng)
    return make_model(nodes + n, [tensor_input("x", ["N", 3, 8, 8])], [tensor_input("logits", ["N", 10])], inits + i)


def conv_chain() -> onnx.ModelProto:
    """conv1-relu-conv2-relu (no BatchNorm), pool, Gemm."""
    rng = np.random.default_rng(0)
    relu = helper.make_node
    return _build([_conv("conv1", "x", "c1", 3, 8, rng), ([relu("Relu", ["c1"], ["r1"])], []),
                   _conv("conv2", "r1", "c2", 8, 8, rng, bias=False), ([relu("Relu", ["c2"], ["r2"])], [])],
                  "r2", 8, rng)


def residual() -> onnx.ModelProto:
    """h = relu(conv1 x); y = relu(h + conv3(relu(conv2 h))): conv1 and conv3 channels are one group."""
    rng = np.random.default_rng(1)
    mk = helper.make_node
    return _build([_conv("conv1", "x", "c1", 3, 8, rng), ([mk("Relu", ["c1"], ["h"])], []),
                   _conv("conv2", "h", "c2", 8, 6, rng), ([mk("Relu", ["c2"], ["r2"])], []),
                   _conv("conv3", "r2", "c3", 6, 8, rng), ([mk("Add", ["h", "c3"], ["s"]), mk("Relu", ["s"], ["y"])], [])],
                  "y", 8, rng)


def depthwise() -> onnx.ModelProto:
    """conv1-relu, depthwise 3x3-relu (channels tied to conv1's), pointwise conv2-relu."""
    rng = np.random.default_rng(2)
    mk = helper.make_node
    return _build([_conv("conv1", "x", "c1", 3, 8, rng), ([mk("Relu", ["c1"], ["r1"])], []),
                   _conv("dw", "r1", "d", 8, 8, rng, group=8), ([mk("Relu", ["d"], ["rd"])], []),
                   _conv("conv2", "rd", "c2", 8, 8, rng, k=1), ([mk("Relu", ["c2"], ["r2"])], [])],
                  "r2", 8, rng)


def se_block() -> onnx.ModelProto:
    """h = relu(conv1 x); y = h * sigmoid(excite(relu(squeeze(pool h)))); conv2-relu.
    The excite conv's channels are tied to conv1's by the channel Mul; squeeze's are its own."""
    rng = np.random.default_rng(3)
    mk = helper.make_node
    return _build([_conv("conv1", "x", "c1", 3, 8, rng), ([mk("Relu", ["c1"], ["h"]), mk("GlobalAveragePool", ["h"], ["p"])], []),
                   _conv("squeeze", "p", "q", 8, 4, rng, k=1), ([mk("Relu", ["q"], ["rq"])], []),
                   _conv("excite", "rq", "e", 4, 8, rng, k=1),
                   ([mk("Sigmoid", ["e"], ["g"]), mk("Mul", ["h", "g"], ["y"])], []),
                   _conv("conv2", "y", "c2", 8, 8, rng), ([mk("Relu", ["c2"], ["r2"])], [])],
                  "r2", 8, rng)


def reshaped_bias() -> onnx.ModelProto:
    """Paddle-style: conv1 without bias, then ``Add(conv, Reshape(Constant bias, [1, C, 1, 1]))``,
    an SE-like gate whose bias is ``Add(conv, Unsqueeze(bias, [0, 2, 3]))``, relu, conv2."""
    rng = np.random.default_rng(12)
    mk = helper.make_node
    values = rng.standard_normal(8).astype(np.float32)
    values[[1, 2]] = 0.0  # the channels the test prunes output 0 then (a bias would be a constant lost at padded borders)
    bias = onnx.numpy_helper.from_array(values)
    shape = onnx.numpy_helper.from_array(np.array([1, 8, 1, 1], np.int64))
    return _build([_conv("conv1", "x", "c1", 3, 8, rng, bias=False),
                   ([mk("Constant", [], ["b1"], value=bias), mk("Constant", [], ["s1"], value=shape),
                     mk("Reshape", ["b1", "s1"], ["b1r"]), mk("Add", ["c1", "b1r"], ["a1"]), mk("Relu", ["a1"], ["h"]),
                     mk("GlobalAveragePool", ["h"], ["p"])], []),
                   _conv("excite", "p", "e", 8, 8, rng, k=1, bias=False),
                   ([mk("Unsqueeze", ["eb", "axes"], ["ebu"]), mk("Add", ["e", "ebu"], ["ea"]),
                     mk("HardSigmoid", ["ea"], ["g"]), mk("Mul", ["h", "g"], ["y"])],
                    [init("eb", rng.standard_normal(8).astype(np.float32)), init("axes", np.array([0, 2, 3], np.int64))]),
                   _conv("conv2", "y", "c2", 8, 8, rng), ([mk("Relu", ["c2"], ["r2"])], [])],
                  "r2", 8, rng)


def sigmoid_chain() -> onnx.ModelProto:
    """conv1-sigmoid-conv2 (1x1, no padding)-relu."""
    rng = np.random.default_rng(10)
    mk = helper.make_node
    return _build([_conv("conv1", "x", "c1", 3, 8, rng), ([mk("Sigmoid", ["c1"], ["s1"])], []),
                   _conv("conv2", "s1", "c2", 8, 8, rng, k=1), ([mk("Relu", ["c2"], ["r2"])], [])], "r2", 8, rng)


def _scales(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {k: v for k, v in initializer_arrays(model).items() if is_scale_name(k)}


def _set(model: onnx.ModelProto, name: str, array: np.ndarray) -> None:
    for t in model.graph.initializer:
        if t.name == name:
            t.CopyFrom(onnx.numpy_helper.from_array(array.astype(np.float32), name))


def _widths(model: onnx.ModelProto) -> dict[str, int]:
    inits = initializer_arrays(model)
    return {n.name: inits[n.input[1]].shape[0] for n in model.graph.node if n.op_type == "Conv"}


def _bitwise_same(a: onnx.ModelProto, b: onnx.ModelProto, batch: int = 3) -> None:
    feeds = feeds_for(a, batch)
    for x, y in zip(run(a, feeds), run(b, feeds)):
        np.testing.assert_array_equal(x, y)


# (model, scales inserted, {scale: channels zeroed}, expected widths after slimming)
CASES = {
    "conv-chain": (conv_chain, {"conv1", "conv2"}, {"conv1": [1, 4, 6], "conv2": [0, 7]},
                   {"conv1": 5, "conv2": 6}),
    # channel 2 of the residual group goes only when both members' scales are 0; conv3's channel 5 alone stays
    "residual": (residual, {"conv1", "conv2", "conv3"}, {"conv1": [2, 5], "conv3": [2], "conv2": [0, 3]},
                 {"conv1": 7, "conv2": 4, "conv3": 7}),
    "depthwise": (depthwise, {"conv1", "dw", "conv2"}, {"conv1": [3, 5], "dw": [3, 5], "conv2": [1]},
                  {"conv1": 6, "dw": 6, "conv2": 7}),
    # a pruned channel is 0.5 after the Sigmoid: folded exactly into the unpadded 1x1 conv's bias
    "sigmoid": (sigmoid_chain, {"conv1", "conv2"}, {"conv1": [2, 3, 7]}, {"conv1": 5, "conv2": 8}),
    # biases added through Reshape / Unsqueeze of constants are sliced like any per-channel constant
    "reshaped-bias": (reshaped_bias, {"conv1", "excite", "conv2"}, {"conv1": [1, 2], "excite": [1, 2]},
                      {"conv1": 6, "excite": 6, "conv2": 8}),
    "se-block": (se_block, {"conv1", "squeeze", "excite", "conv2"}, {"conv1": [0, 6], "excite": [0, 6], "squeeze": [1]},
                 {"conv1": 6, "squeeze": 3, "excite": 6, "conv2": 8}),
}


@pytest.mark.parametrize("case", CASES)
def test_inserted_scales_are_exact_and_named(case):
    build, convs, _, _ = CASES[case]
    model = build()
    applied = InsertChannelScalesPass().apply(model)
    assert applied.modified
    assert set(_scales(applied.model)) == {f"{c}.slim_scale" for c in convs}
    for name, scale in _scales(applied.model).items():
        assert scale.shape == (1, _widths(model)[name.split(".")[0]], 1, 1) and np.all(scale == 1.0)
    _bitwise_same(model, applied.model)
    assert [o.name for o in applied.model.graph.output] == ["logits"]
    check_idempotent(InsertChannelScalesPass, model)


@pytest.mark.parametrize("case", CASES)
def test_zero_scales_are_slimmed_exactly_and_folded(case):
    """Scales 0 on some channels, 1 elsewhere: slim-channels removes the zeroed groups, every
    coupled member with them; the kept computation is exact; fold-channel-scales leaves no Mul."""
    build, _, zeroed, widths = CASES[case]
    scaled = InsertChannelScalesPass()(build())
    for conv, channels in zeroed.items():
        s = _scales(scaled)[f"{conv}.slim_scale"].copy()
        s[0, channels] = 0.0
        _set(scaled, f"{conv}.slim_scale", s)
    slimmed = check_idempotent(SlimChannelsPass, scaled, threshold=1e-6, min_keep_ratio=0.0)
    assert _widths(slimmed) == widths
    assert_exact(scaled, slimmed, rel=1e-5, batch=3)
    folded = FoldChannelScalesPass().apply(slimmed)
    assert folded.modified and not _scales(folded.model)
    assert op_types(folded.model).count("Mul") == (1 if case in ("se-block", "reshaped-bias") else 0)  # SE gates stay
    assert_exact(scaled, folded.model, rel=1e-5, batch=3)
    onnx.checker.check_model(folded.model, full_check=True)


def test_small_scales_are_scored_with_one_threshold_over_both_kinds():
    """A model with a BatchNorm after conv1 and an inserted scale after conv2: one global ratio
    threshold over gammas and scales together; gammas keep their BN, the scales their Mul."""
    rng = np.random.default_rng(4)
    mk = helper.make_node
    bn = [init("bn.gamma", np.linspace(0.05, 0.8, 8).astype(np.float32)), init("bn.beta", np.zeros(8, np.float32)),
          init("bn.mean", np.zeros(8, np.float32)), init("bn.var", np.ones(8, np.float32))]
    model = _build([_conv("conv1", "x", "c1", 3, 8, rng),
                    ([mk("BatchNormalization", ["c1", "bn.gamma", "bn.beta", "bn.mean", "bn.var"], ["b1"], name="bn"),
                      mk("Relu", ["b1"], ["r1"])], bn),
                    _conv("conv2", "r1", "c2", 8, 8, rng), ([mk("Relu", ["c2"], ["r2"])], [])], "r2", 8, rng)
    scaled = InsertChannelScalesPass()(model)
    assert set(_scales(scaled)) == {"conv2.slim_scale"}  # conv1 keeps using gamma
    _set(scaled, "conv2.slim_scale", np.linspace(0.1, 1.6, 8).reshape(1, 8, 1, 1))
    result = SlimChannelsPass(ratio=0.5, min_keep_ratio=0.0).apply(scaled)
    d = result.details
    assert (d["prunable_channels"], d["prunable_bn_channels"], d["prunable_scale_channels"]) == (16, 8, 8)
    values = np.concatenate([np.linspace(0.05, 0.8, 8), np.linspace(0.1, 1.6, 8)]).astype(np.float32)
    assert d["threshold"] == pytest.approx(float(np.sort(np.abs(values))[8]))  # the lowest kept: half pruned by rank
    expected = {"conv1": int(np.sum(np.linspace(0.05, 0.8, 8).astype(np.float32) >= d["threshold"])),
                "conv2": int(np.sum(np.linspace(0.1, 1.6, 8).astype(np.float32) >= d["threshold"]))}
    assert _widths(result.model) == expected and sum(expected.values()) == 8
    assert np.all(np.abs(_scales(result.model)["conv2.slim_scale"]) >= d["threshold"])


def test_convs_that_keep_their_channels_get_no_scale():
    """Skipped: a conv read by BatchNorm, a conv whose output is a graph output, a conv feeding
    an op without a channel handler (its channels are pinned), one output channel."""
    rng = np.random.default_rng(5)
    mk = helper.make_node
    nodes, inits = [], []
    for n, i in (_conv("a", "x", "ca", 3, 4, rng), _conv("b", "x", "cb", 3, 4, rng), _conv("c", "x", "cc", 3, 1, rng),
                 _conv("d", "x", "cd", 3, 4, rng)):
        nodes += n
        inits += i
    nodes += [mk("LRN", ["ca"], ["la"], size=3), mk("Relu", ["cc"], ["rc"]), mk("Relu", ["cd"], ["rd"])]
    outs = [tensor_input(n, None) for n in ("la", "cb", "rc", "rd")]
    model = make_model(nodes, [tensor_input("x", ["N", 3, 8, 8])], outs, inits)
    assert not InsertChannelScalesPass().apply(model).modified  # rd is a graph output: d is pinned too
    model.graph.output.pop()  # d's channels now reach a classifier head: d gets a scale
    head, head_inits = _head("rd", 4, rng)
    model.graph.node.extend(head)
    model.graph.initializer.extend(head_inits)
    model.graph.output.append(tensor_input("logits", ["N", 10]))
    applied = InsertChannelScalesPass().apply(model)
    assert set(_scales(applied.model)) == {"d.slim_scale"}
    assert applied.details["skipped_pinned"] == 1  # a (LRN); b is a graph output, c has one channel


# --------------------------------------------------------------------------- fold-channel-scales


def test_fold_is_exact_to_rounding_and_bitwise_for_ones():
    model = InsertChannelScalesPass()(conv_chain())
    before = FoldChannelScalesPass()(model)  # scales all 1: the original weights, the original outputs
    _bitwise_same(conv_chain(), before)
    assert initializer_arrays(before)["conv1.weight"].tobytes() == initializer_arrays(conv_chain())["conv1.weight"].tobytes()
    rng = np.random.default_rng(6)
    for name in _scales(model):
        _set(model, name, rng.uniform(-2, 2, (1, 8, 1, 1)))
    folded = FoldChannelScalesPass().apply(model)
    assert folded.details["folded_into"] == ["conv1", "conv2"]
    assert "Mul" not in op_types(folded.model) and not _scales(folded.model)
    assert "conv2.bias" not in initializer_arrays(folded.model) and len(folded.model.graph.node[2].input) == 2
    assert_exact(model, folded.model, rel=1e-6, batch=3)
    assert list(folded.model.graph.node[0].output) == ["c1"]  # the conv takes the Mul's name back


def test_fold_handles_operand_order_shapes_and_shared_weights():
    """``Mul(s, conv)`` and a ``[C, 1, 1]`` or scalar s fold; a weight another conv reads is copied."""
    rng = np.random.default_rng(7)
    mk = helper.make_node
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    nodes = [mk("Conv", ["x", "w"], ["c1"], pads=[1] * 4, name="c1"), mk("Mul", ["s1", "c1"], ["m1"]),
             mk("Conv", ["x", "w", "b"], ["c2"], pads=[1] * 4, name="c2"), mk("Mul", ["c2", "s2"], ["m2"]),
             mk("Conv", ["x", "w"], ["c3"], pads=[1] * 4, name="c3"), mk("Mul", ["c3", "s3"], ["m3"]),
             mk("Add", ["m1", "m2"], ["a"]), mk("Add", ["a", "m3"], ["y"])]
    inits = [init("w", w), init("b", rng.standard_normal(4).astype(np.float32)),
             init("s1", rng.uniform(0.5, 2, (4, 1, 1)).astype(np.float32)), init("s2", np.float32(-1.5)),
             init("s3", rng.uniform(0.5, 2, (1, 4, 8, 8)).astype(np.float32))]  # varies spatially: not folded
    model = make_model(nodes, [tensor_input("x", ["N", 3, 8, 8])], [tensor_input("y", ["N", 4, 8, 8])], inits)
    folded = FoldChannelScalesPass().apply(model)
    assert folded.details["folded_into"] == ["c1", "c2"]
    assert op_types(folded.model).count("Mul") == 1
    arrays = initializer_arrays(folded.model)
    np.testing.assert_array_equal(arrays["w"], w)  # c3 still reads the original weight
    assert_exact(model, folded.model, rel=1e-6)


def test_fold_leaves_a_conv_output_read_twice():
    rng = np.random.default_rng(8)
    mk = helper.make_node
    nodes = [mk("Conv", ["x", "w"], ["c"], name="c"), mk("Mul", ["c", "s"], ["m"]), mk("Add", ["m", "c"], ["y"])]
    model = make_model(nodes, [tensor_input("x", ["N", 3, 4, 4])], [tensor_input("y", None)],
                       [init("w", rng.standard_normal((2, 3, 1, 1)).astype(np.float32)),
                        init("s", np.full((1, 2, 1, 1), 3.0, np.float32))])
    assert not FoldChannelScalesPass().apply(model).modified


# --------------------------------------------------------------------------- zoo models, BN folded


@pytest.mark.torch
@pytest.mark.parametrize("name", ["vgg-bn", "resnet-20", "mobilenet-v2", "inception"])
def test_zoo_exported_with_batchnorm_folded(name):
    """Usual export (BN folded): insert -> zero some scales -> slim-channels -> fold. onnxruntime
    runs it with fewer channels, no scale left, and (kept scales exactly 1) exactly the outputs of
    the scaled model; small but non-zero scales are pruned by a ratio too."""
    import torch

    from onnxdns.models import INPUT_SHAPES, build
    from onnxdns.testing import export_folded

    torch.manual_seed(0)
    net = build(name)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    model = export_folded(net, INPUT_SHAPES[name])
    assert "BatchNormalization" not in op_types(model)
    scaled = InsertChannelScalesPass().apply(model)
    assert scaled.details["scales"]
    _bitwise_same(model, scaled.model, batch=2)

    rng = np.random.default_rng(0)
    zeroed = scaled.model
    for key, s in _scales(zeroed).items():
        s = s.copy()
        s[0, rng.random(s.shape[1]) < 0.3] = 0.0
        _set(zeroed, key, s)
    slimmed = SlimChannelsPass(threshold=1e-6, min_keep_ratio=0.0).apply(zeroed)
    assert slimmed.details["total_pruned_channels"] > 0
    folded = FoldChannelScalesPass()(slimmed.model)
    assert not _scales(folded) and sum(_widths(folded).values()) < sum(_widths(model).values())
    assert_exact(zeroed, folded, rel=1e-5, batch=2)

    small = scaled.model
    for key, s in _scales(small).items():
        _set(small, key, rng.uniform(1e-3, 1.0, s.shape))
    ratio = FoldChannelScalesPass()(SlimChannelsPass(ratio=0.4).apply(small).model)
    assert sum(_widths(ratio).values()) < sum(_widths(model).values()) and not _scales(ratio)
    out = run(ratio, feeds_for(model, 2))[0]
    assert out.shape == (2, 10) and np.isfinite(out).all()
    g = build_channel_graph(modelio.to_ir(ratio))  # residual adds and concats stayed consistent
    for node in g.graph:
        if node.op_type == "Add":
            assert len({len(g.layout(v)) for v in node.inputs if g.layout(v) is not None}) <= 1


def test_insert_then_fold_batchnorm_model_is_unchanged():
    """A model whose convs all feed BatchNorm gets no scale; fold-channel-scales changes nothing."""
    from test_pass_contract import generic_model

    model = generic_model()
    assert not InsertChannelScalesPass().apply(model).modified
    assert not FoldChannelScalesPass().apply(model).modified
    assert InsertChannelScalesPass().apply(FoldBatchNormPass()(model)).modified


def test_channels_a_batchnorm_scales_further_on_get_no_scale():
    """DenseNet-style: conv outputs concatenated, then BatchNorm: that gamma scores the channels."""
    rng = np.random.default_rng(9)
    mk = helper.make_node
    bn = [init("bn.gamma", rng.uniform(0.5, 1.5, 12).astype(np.float32)), init("bn.beta", np.zeros(12, np.float32)),
          init("bn.mean", np.zeros(12, np.float32)), init("bn.var", np.ones(12, np.float32))]
    model = _build([_conv("a", "x", "ca", 3, 6, rng), _conv("b", "x", "cb", 3, 6, rng), _conv("c", "x", "cc", 3, 4, rng),
                    ([mk("Concat", ["ca", "cb"], ["cat"], axis=1),
                      mk("BatchNormalization", ["cat", "bn.gamma", "bn.beta", "bn.mean", "bn.var"], ["n"], name="bn"),
                      mk("Relu", ["n"], ["r"]), mk("Relu", ["cc"], ["rc"]), mk("Concat", ["r", "rc"], ["y"], axis=1)], bn)],
                   "y", 16, rng)
    applied = InsertChannelScalesPass().apply(model)
    assert set(_scales(applied.model)) == {"c.slim_scale"}
    assert applied.details["skipped_batchnorm"] == 2


def test_optimize_pipeline_folds_leftover_scales(tmp_path):
    """``onnxdns optimize`` (cpu pipeline) folds scale Muls into the convs, validated exact."""
    from onnxdns import api

    model = InsertChannelScalesPass()(residual())
    rng = np.random.default_rng(11)
    for name in _scales(model):
        _set(model, name, rng.uniform(0.5, 2.0, _scales(model)[name].shape))
    src, out = tmp_path / "scaled.onnx", tmp_path / "out.onnx"
    modelio.save_model(model, src)
    result = api.optimize(src, out, target="cpu")
    assert result.ok and "fold-channel-scales" in [p.name for p in result.passes if p.modified]
    optimized = onnx.load(str(out))
    assert "Mul" not in op_types(optimized) and not _scales(optimized)
    assert_exact(model, optimized, rel=1e-5, batch=3)
