"""The DNS rule as pure functions, phase and per-layer settings, and the magnitude-pruning rule."""

from __future__ import annotations

import numpy as np
import pytest

from onnxdns.errors import OnnxdnsError
from onnxdns.training.dns import (
    DNSPruner,
    LayerSettings,
    Phase,
    layer_statistics,
    parse_layer_values,
    parse_phases,
    ramp_factor,
    surgery_probability,
    thresholds,
    update_mask,
)
from onnxdns.training.magnitude import prune_below, prune_to_sparsity
from onnxdns.training.optim import LRSchedule, ort_learning_rate
from onnxdns.training.params import MaskedLayer

LAYERS = [MaskedLayer("conv1", "conv", "Conv", "conv1.weight", "conv1.weight__mask"),
          MaskedLayer("fc1", "fc", "Gemm", "fc1.weight", "fc1.weight__mask"),
          MaskedLayer("fc2", "fc", "Gemm", "fc2.weight", "fc2.weight__mask")]


def test_thresholds():
    assert thresholds(1.0, 0.5, 2.0) == pytest.approx((1.8, 2.2))
    assert thresholds(1.0, 0.5, -4.0) == (0.0, 0.0)  # max(mu + c*std, 0)


def test_update_mask_hysteresis():
    a, b = 1.0, 2.0
    w = np.array([0.5, -1.0, 1.5, -2.0, 2.5, 0.5, -1.0, 1.5, -2.0, 2.5], dtype=np.float32)
    mask = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0, 0], dtype=np.float32)
    new = update_mask(w, mask, a, b)
    # kept: pruned at |w| <= a (the boundary prunes), kept above; pruned: spliced only at |w| > b
    np.testing.assert_array_equal(new, [0, 0, 1, 1, 1, 0, 0, 0, 0, 1])
    assert new.dtype == mask.dtype
    zero = update_mask(w, mask, 0.0, 0.0)  # a = b = 0: every non-zero weight is kept / spliced
    np.testing.assert_array_equal(zero, np.ones(10))


def test_layer_statistics_over_nonzero_masked_entries():
    w = np.array([[0.5, -1.0], [0.0, 3.0]], dtype=np.float32)
    bias = np.array([-2.0, 7.0], dtype=np.float32)
    mask_w = np.array([[1, 1], [1, 0]], dtype=np.float32)  # 3.0 masked out, 0.0 not counted
    mask_b = np.array([1, 0], dtype=np.float32)
    mu, std = layer_statistics([(w, mask_w), (bias, mask_b)])
    values = np.array([0.5, 1.0, 2.0])
    assert mu == pytest.approx(values.mean())
    assert std == pytest.approx(values.std())  # population std of |w|, as the reference
    assert layer_statistics([(np.zeros(3), np.ones(3))]) == (0.0, 0.0)


def test_surgery_probability():
    assert surgery_probability(0, 1e-4, 1.0) == 1.0
    assert surgery_probability(10_000, 1e-4, 1.0) == pytest.approx(0.5)
    assert surgery_probability(10_000, 1e-4, 2.0) == pytest.approx(0.25)
    values = [surgery_probability(t, 1e-3, 1.0) for t in range(0, 5000, 500)]
    assert all(x > y for x, y in zip(values, values[1:]))


class _Masks:
    def __init__(self, arrays):
        self.arrays = arrays

    def set(self, name, value):
        self.arrays[name] = value


class _Trainer:
    """What DNSPruner reads: parameter values (fixed here) and the mask store."""

    def __init__(self, weights, masks):
        self.session = type("Session", (), {"get": staticmethod(lambda name: weights[name])})()
        self.masks = _Masks(masks)


def test_ramp_prunes_gradually_then_applies_the_full_thresholds():
    """With ``ramp`` the thresholds are ``(t + 1) / ramp`` of a_k, b_k: density falls step by step
    (never below the fixed rule's) and equals the fixed rule's from step ``ramp - 1`` on."""
    assert [ramp_factor(t, 4) for t in (0, 1, 3, 10)] == [0.25, 0.5, 1.0, 1.0]
    assert ramp_factor(0, 0) == 1.0
    w = np.random.default_rng(0).standard_normal(2000).astype(np.float32)
    layer = MaskedLayer("fc1", "fc", "Gemm", "w", "m")
    phase = [Phase(frozenset({"fc"}), 0, 100)]

    def densities(ramp):
        trainer = _Trainer({"w": w}, {"m": np.ones_like(w)})
        pruner = DNSPruner([layer], {"fc1": LayerSettings(c=0.5, gamma=0.0, ramp=ramp)}, phase)  # surgery every step
        pruner.trainer = trainer
        out = []
        for step in range(6):
            pruner.before_step(step)
            out.append(float(trainer.masks.arrays["m"].mean()))
        return out

    fixed, ramped = densities(0), densities(4)
    assert len(set(fixed)) == 1  # the paper's rule: final density at the first surgery
    assert all(x > y for x, y in zip(ramped[:4], ramped[1:4]))
    assert ramped[3:] == fixed[3:]


def test_phases():
    default = parse_phases(None, 1000, {"conv", "fc"})
    assert [(p.label(), p.start, p.end) for p in default] == [("conv", 0, 400), ("fc", 400, 800)]
    assert [(p.label(), p.start, p.end) for p in parse_phases(None, 1000, {"fc"})] == [("fc", 0, 800)]
    steps = parse_phases("fc:300,conv:200,all:100", 1000, {"conv", "fc"})
    assert [(p.label(), p.start, p.end) for p in steps] == [("fc", 0, 300), ("conv", 300, 500), ("conv+fc", 500, 600)]
    with pytest.raises(OnnxdnsError, match="more than the run"):
        parse_phases("conv:0.6,fc:0.6", 1000, {"conv", "fc"})
    with pytest.raises(OnnxdnsError, match="kind must be"):
        parse_phases("bn:0.5", 1000, {"conv"})
    with pytest.raises(OnnxdnsError, match="KIND:LENGTH"):
        parse_phases("conv", 1000, {"conv"})


def test_layer_values_precedence():
    values = parse_layer_values("fc=4,fc2=2.5", {"conv": 3.0, "fc": 1.0}, LAYERS, "c")
    assert values == {"conv1": 3.0, "fc1": 4.0, "fc2": 2.5}
    assert parse_layer_values("1.5", {"conv": 3.0, "fc": 4.0}, LAYERS, "c") == {"conv1": 1.5, "fc1": 1.5, "fc2": 1.5}
    assert parse_layer_values({"conv1": 0.5}, {"conv": 3.0, "fc": 4.0}, LAYERS, "c")["conv1"] == 0.5
    assert parse_layer_values(2, {"conv": 3.0, "fc": 4.0}, LAYERS, "c") == {"conv1": 2.0, "fc1": 2.0, "fc2": 2.0}
    with pytest.raises(OnnxdnsError, match="unknown layer"):
        parse_layer_values("fc9=1", {"conv": 3.0, "fc": 4.0}, LAYERS, "c")
    with pytest.raises(OnnxdnsError, match="not a number"):
        parse_layer_values("fc=x", {"conv": 3.0, "fc": 4.0}, LAYERS, "c")


def test_magnitude_rules():
    w = np.array([0.1, -0.5, 0.3, -0.05, 0.9, 0.2], dtype=np.float32)
    mask = np.array([1, 1, 1, 1, 1, 0], dtype=np.float32)
    kept = prune_to_sparsity(w, mask, 0.5)  # keep 3 of 6, among the 5 still kept
    np.testing.assert_array_equal(kept, [False, True, True, False, True, False])
    np.testing.assert_array_equal(prune_below(w, mask, 0.25), [False, True, True, False, True, False])


def test_lr_schedules_and_momentum_scaling():
    assert LRSchedule("constant", 0.1, 100)(57) == 0.1
    step = LRSchedule("step", 0.1, 90)
    assert [step(0), step(30), step(60)] == pytest.approx([0.1, 0.01, 0.001])
    cosine = LRSchedule("cosine", 0.1, 100)
    assert [cosine(0), cosine(50), cosine(100)] == pytest.approx([0.1, 0.05, 0.0])
    held = LRSchedule("cosine", 0.1, 100, step_size=60)  # full lr for 60 steps, then the half cosine
    assert [held(0), held(59), held(60), held(80), held(100)] == pytest.approx([0.1, 0.1, 0.1, 0.05, 0.0])
    assert LRSchedule("inv", 0.01, 100)(10_000) == pytest.approx(0.01 * 2 ** -0.75)
    assert ort_learning_rate(0.01, 0.9) == pytest.approx(0.1, rel=1e-6)
    with pytest.raises(OnnxdnsError, match="unknown learning-rate schedule"):
        LRSchedule("poly", 0.1, 10)
