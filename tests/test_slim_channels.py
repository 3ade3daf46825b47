"""slim-channels: Network Slimming selection by |gamma|, coupled groups, folding of BN shifts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
from onnx import numpy_helper

from onnxdns import modelio, runtime
from onnxdns.channels.remove import build_channel_graph
from onnxdns.models import INPUT_SHAPES, build
from onnxdns.passes.slim_channels import SlimChannelsPass
from onnxdns.synthetic import randomize_batchnorm
from onnxdns.testing import assert_exact, export_module

pytestmark = pytest.mark.torch  # every test builds models with torch (onnxdns[zoo])


def _inits(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _set(model, name, array):
    for t in model.graph.initializer:
        if t.name == name:
            t.CopyFrom(numpy_helper.from_array(array.astype(np.float32), name))


def _bns(model):
    return [n for n in model.graph.node if n.op_type == "BatchNormalization"]


def _conv_widths(model):
    inits = _inits(model)
    return [inits[n.input[1]].shape[0] for n in model.graph.node if n.op_type == "Conv"]


def test_channels_with_zero_gamma_and_beta_are_removed_exactly():
    """When the selected channels output exactly zero, slimming is exact (through padded convs)."""
    proto = randomize_batchnorm(export_module(build("vgg-bn"), INPUT_SHAPES["vgg-bn"]), seed=3)
    rng = np.random.default_rng(0)
    for bn in _bns(proto):
        gamma, beta = _inits(proto)[bn.input[1]].copy(), _inits(proto)[bn.input[2]].copy()
        dead = rng.random(len(gamma)) < 0.4
        gamma[dead], beta[dead] = 0.0, 0.0
        gamma[~dead] = np.sign(gamma[~dead]) * (np.abs(gamma[~dead]) + 0.5)
        _set(proto, bn.input[1], gamma)
        _set(proto, bn.input[2], beta)
    result = SlimChannelsPass(threshold=1e-3, min_keep_ratio=0.0).apply(proto)
    assert result.details["total_pruned_channels"] > 0
    assert_exact(proto, result.model)


def test_shift_is_folded_exactly_into_an_unpadded_consumer():
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.fc = nn.Linear(8, 10)

        def forward(self, x):
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(torch.relu(self.bn(self.conv(x))), 1), 1))

    proto = randomize_batchnorm(export_module(Net(), (1, 8, 8)), seed=0)
    bn = _bns(proto)[0]
    gamma = _inits(proto)[bn.input[1]].copy()
    gamma[[1, 4, 6]] = 0.0  # beta stays non-zero: relu(beta) is folded into the Gemm's bias
    _set(proto, bn.input[1], gamma)
    beta = _inits(proto)[bn.input[2]].copy()
    beta[[1, 4, 6]] = [0.7, 1.3, -0.2]
    _set(proto, bn.input[2], beta)
    result = SlimChannelsPass(threshold=1e-6, min_keep_ratio=0.0).apply(proto)
    assert result.details["total_pruned_channels"] == 3
    assert _conv_widths(result.model) == [5]
    assert_exact(proto, result.model)


def test_ratio_prunes_that_share_of_prunable_channels():
    proto = randomize_batchnorm(export_module(build("vgg-bn"), INPUT_SHAPES["vgg-bn"]), seed=1)
    total = sum(len(_inits(proto)[bn.input[1]]) for bn in _bns(proto))
    result = SlimChannelsPass(ratio=0.3, min_keep_ratio=0.0).apply(proto)
    assert result.details["prunable_bn_channels"] == total
    assert abs(result.details["total_pruned_channels"] - 0.3 * total) <= 2
    gammas = np.concatenate([np.abs(_inits(proto)[bn.input[1]]) for bn in _bns(proto)])
    kept = np.concatenate([np.abs(_inits(result.model)[bn.input[1]]) for bn in _bns(result.model)])
    assert kept.min() >= result.details["threshold"] >= np.sort(gammas)[int(0.3 * total) - 2]


@pytest.mark.parametrize("name", ["resnet-20", "mobilenet-v2", "densenet", "inception"])
def test_coupled_groups_are_pruned_whole(name):
    proto = randomize_batchnorm(export_module(build(name), INPUT_SHAPES[name]), seed=2)
    result = SlimChannelsPass(ratio=0.5).apply(proto)
    assert result.details["total_pruned_channels"] > 0
    # the pruned model runs (residual adds, concats and depthwise groups stayed consistent) ...
    feeds = runtime.input_feeds(proto, batch=2)
    out = runtime.run(result.model, feeds)[0]
    assert out.shape == (2, 10) and np.isfinite(out).all()
    # ... and every residual Add still adds tensors with the same channel count
    g = build_channel_graph(modelio.to_ir(result.model))
    for node in g.graph:
        if node.op_type == "Add":
            widths = {len(g.layout(v)) for v in node.inputs if g.layout(v) is not None}
            assert len(widths) <= 1


def test_min_keep_ratio_and_round_to():
    proto = randomize_batchnorm(export_module(build("vgg-bn"), INPUT_SHAPES["vgg-bn"]), seed=1)
    before = _conv_widths(proto)
    result = SlimChannelsPass(ratio=0.9, min_keep_ratio=0.25, round_to=8).apply(proto)
    after = _conv_widths(result.model)
    for b, a in zip(before, after):
        assert a >= np.ceil(0.25 * b) and a % 8 == 0


def test_second_run_uses_the_recorded_threshold():
    proto = randomize_batchnorm(export_module(build("resnet-20"), INPUT_SHAPES["resnet-20"]), seed=1)
    once = SlimChannelsPass(ratio=0.4).apply(proto)
    twice = SlimChannelsPass(ratio=0.4).apply(once.model)
    assert not twice.modified
    assert twice.model.SerializeToString() == once.model.SerializeToString()
    further = SlimChannelsPass(threshold=once.details["threshold"] * 3).apply(once.model)
    assert further.modified


def test_model_without_batchnorm_is_left_alone():
    proto = export_module(build("lenet-5"), INPUT_SHAPES["lenet-5"])
    result = SlimChannelsPass().apply(proto)
    assert not result.modified


def test_a_ratio_prunes_its_share_even_when_every_scale_is_equal():
    """After a few steps of sparsity training every gamma can still be equal: a quantile threshold
    would prune nothing; the ratio is a share of the channels, ties broken by graph order."""
    from onnx import numpy_helper

    from onnxdns.passes.insert_channel_scales import InsertChannelScalesPass
    from test_sources import conv_model

    model = InsertChannelScalesPass()(conv_model(16))
    for t in model.graph.initializer:
        if t.name.endswith(".slim_scale"):
            t.CopyFrom(numpy_helper.from_array(np.full(tuple(t.dims), 0.99, np.float32), t.name))
    result = SlimChannelsPass(0.5, min_keep_ratio=0.0).apply(model)
    assert 10 <= result.details["total_pruned_channels"] <= 12  # about half of 8 + 16 (not none)
    again = SlimChannelsPass(0.5, min_keep_ratio=0.0).apply(result.model)
    assert not again.modified  # the recorded threshold keeps every remaining channel
