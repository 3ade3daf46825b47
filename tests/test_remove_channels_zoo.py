"""Acceptance: remove-channels is exact on every zoo model with 50% of channels zeroed.

Every prunable layer gets a random half of its output channels zeroed (depthwise convs follow
their input). The removal must keep onnxruntime outputs (max abs diff <= 1e-5 x output scale),
account for every zeroed channel (removed, or reported as kept with a reason), and remove
exactly the zeroed weights of the channels it removed.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import numpy_helper

from onnxdns.models import MODELS, INPUT_SHAPES, build
from onnxdns.passes.remove_channels import RemoveChannelsPass
from onnxdns.synthetic import prunable_layers, randomize_batchnorm, zero_channels
from onnxdns.testing import assert_exact, export_module

pytestmark = pytest.mark.torch  # every test builds models with torch (onnxdns[zoo])

ZOO = [name for name in MODELS if name != "vgg16-imagenet"]


def _layer_names(model):
    return {w: node.name or f"{node.op_type}({w})" for node, w, _ in prunable_layers(model)}


def _zero_rows(model) -> int:
    """Number of all-zero output channels over every prunable layer."""
    count = 0
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for _, w, axis in prunable_layers(model):
        arr = np.moveaxis(inits[w], axis, 0).reshape(inits[w].shape[axis], -1)
        count += int((~arr.any(axis=1)).sum())
    return count


@pytest.mark.parametrize("batchnorm", ["fresh", "random"])
@pytest.mark.parametrize("name", ZOO)
def test_zoo_model_exact_and_accounted(name, batchnorm):
    proto = export_module(build(name), INPUT_SHAPES[name])
    if batchnorm == "random":
        proto = randomize_batchnorm(proto, seed=1)
    masked, zeroed = zero_channels(proto, 0.5, seed=0)
    result = RemoveChannelsPass().apply(masked)
    assert_exact(masked, result.model, batch=2)
    details = result.details
    layers = _layer_names(masked)
    kept_total = 0
    for weight, channels in zeroed.items():
        removed = set(details["removed_channels"].get(layers[weight], []))
        kept = set(details["constant_kept"].get(layers[weight], {}))
        assert set(channels) <= removed | kept, (weight, sorted(set(channels) - removed - kept))
        kept_total += len(set(channels) & kept)
    # the zeroed rows of removed channels are gone; exactly the reported kept ones remain
    assert _zero_rows(result.model) == kept_total
    if batchnorm == "fresh" and name != "resnet-20":
        assert details["total_removed_channels"] > 0
    again = RemoveChannelsPass().apply(result.model)
    assert not again.modified


@pytest.mark.parametrize("batchnorm", ["fresh", "random"])
def test_zeroed_depthwise_filters_take_their_whole_channel_along(batchnorm):
    """A zero depthwise filter makes its channel constant: the expand conv row feeding it, its
    BatchNorms and the projection's input column all go with it."""
    proto = export_module(build("mobilenet-v2"), INPUT_SHAPES["mobilenet-v2"])
    if batchnorm == "random":
        proto = randomize_batchnorm(proto, seed=1)
    masked, zeroed = zero_channels(proto, 0.5, seed=0, skip_depthwise=False)
    result = RemoveChannelsPass().apply(masked)
    assert_exact(masked, result.model, batch=2)
    depthwise_only = RemoveChannelsPass().apply(zero_channels(proto, 0.5, seed=0)[0])
    assert result.details["total_removed_channels"] > depthwise_only.details["total_removed_channels"]
