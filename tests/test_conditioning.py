"""The first-step check that one SGD learning rate can serve every layer (onnxdns.training.conditioning)."""

from __future__ import annotations

import numpy as np
import pytest

from onnxdns.training import conditioning


def test_spread_names_the_layer_whose_gradient_dwarfs_its_weights():
    rng = np.random.default_rng(0)
    weights = {f"w{i}": rng.normal(size=(4, 4)) for i in range(4)}
    grads = {name: 1e-3 * w for name, w in weights.items()}
    grads["w2"] = 10.0 * weights["w2"]  # 10x its norm, the others 1e-3x
    weights["bias"], grads["bias"] = np.ones(4), np.ones(4) * 1e6  # rank 1: not a weight tensor
    s = conditioning.spread(weights, grads)
    assert s.name == "w2" and s.ratio == pytest.approx(10.0) and s.median == pytest.approx(1e-3) and s.tensors == 4
    assert s.factor == pytest.approx(1e4)
    text = conditioning.advice(s)
    assert "w2" in text and "--optimizer adamw" in text and "\n" not in text
    grads["w2"] = 0.5 * weights["w2"]  # 500x the median: one learning rate still works
    assert conditioning.advice(conditioning.spread(weights, grads)) is None
    assert conditioning.spread({"a": np.ones((2, 2))}, {"a": np.ones((2, 2))}) is None  # nothing to compare
