"""Dynamic Network Surgery (Guo, Yao and Chen, NIPS 2016), as in the authors' Caffe layers.

Per masked layer k (weights and, by default, biases together, as ``CConvolution`` /
``CInnerProduct`` do):

* statistics ``mu_k``, ``std_k``: mean and (population) standard deviation of ``|w|`` over the
  non-zero entries of ``w * mask``, computed once, at the first iteration of the layer's phase;
* thresholds ``a_k = 0.9 * max(mu_k + c_k * std_k, 0)`` and ``b_k = 1.1 * max(mu_k + c_k * std_k, 0)``;
* surgery: an entry with mask 1 and ``|w| <= a_k`` is pruned, an entry with mask 0 and
  ``|w| > b_k`` is spliced back, anything else keeps its mask (hysteresis);
* the surgery runs at iteration ``t`` (counted from the phase start) only if
  ``(1 + gamma * t) ** -power > r`` for a fresh uniform ``r`` in [0, 1), and only while
  ``t < iter_stop``; it runs before the forward pass of that iteration;
* gradients pass straight through the mask (the training graph is edited, see
  :mod:`onnxdns.training.artifacts`), so pruned weights keep learning.

Convolutional and fully connected layers are pruned in separate phases (the paper's remedy for
vanishing gradients): by default a conv phase, then an fc phase, then fine-tuning with frozen masks.

One option goes beyond the reference: ``ramp`` (steps) lets the thresholds rise linearly from 0
to ``a_k``, ``b_k`` over the first ``ramp`` steps of a phase, so a layer is pruned gradually
instead of dropping to its final density at the phase's first surgery (``ramp=0``, the default,
is the paper's rule).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import numpy as np

from onnxdns.errors import OnnxdnsError
from onnxdns.training.config import DEFAULT_DNS_GAMMA, DEFAULT_DNS_POWER
from onnxdns.training.loop import Hook
from onnxdns.training.params import MaskedLayer

#: Per-kind sensitivity: 3 for conv (the ``CConvolutionParameter`` default), 4 for fc (the README's
#: LeNet-5 ip1 example, which also gives the default gamma 1e-4 and power 1, see ``TrainConfig``).
DEFAULT_C = {"conv": 3.0, "fc": 4.0}


# --------------------------------------------------------------------------- the rule (pure)


def layer_statistics(pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[float, float]:
    """(mean, std) of ``|w|`` over the non-zero entries of ``w * mask`` of all (w, mask) pairs.

    Population standard deviation, ``sqrt(E[w^2] - E[|w|]^2)``, as the reference computes it.
    Returns (0, 0) when every entry is zero.
    """
    values = [np.abs((w.astype(np.float64) * m).ravel()) for w, m in pairs]
    flat = np.concatenate(values) if values else np.zeros(0)
    nz = flat[flat != 0]
    if nz.size == 0:
        return 0.0, 0.0
    mu = float(nz.mean())
    var = float(np.mean(nz * nz) - mu * mu)
    return mu, math.sqrt(max(var, 0.0))


def thresholds(mu: float, std: float, c: float) -> tuple[float, float]:
    """(a, b): prune at ``|w| <= a``, splice at ``|w| > b``."""
    t = max(mu + c * std, 0.0)
    return 0.9 * t, 1.1 * t


def update_mask(w: np.ndarray, mask: np.ndarray, a: float, b: float) -> np.ndarray:
    """The surgery on one tensor: a new mask (same dtype as ``mask``).

    Kept entries stay kept while ``|w| > a`` (pruned at ``|w| <= a``); pruned entries come back
    when ``|w| > b``.
    """
    magnitude = np.abs(w)
    # b >= a, so ``|w| > b`` implies ``|w| > a``: one expression covers both cases.
    return (((magnitude > a) & (mask != 0)) | (magnitude > b)).astype(mask.dtype)


def ramp_factor(iteration: int, ramp: int) -> float:
    """The share of its thresholds a layer uses at ``iteration`` of its phase: ``(iteration + 1) /
    ramp``, capped at 1 (``ramp=0``: always 1)."""
    return 1.0 if ramp <= 0 else min(1.0, (iteration + 1) / ramp)


def surgery_probability(iteration: int, gamma: float, power: float) -> float:
    """``(1 + gamma * iteration) ** -power``: the chance that surgery runs at ``iteration``."""
    return float((1.0 + gamma * iteration) ** (-power))


# --------------------------------------------------------------------------- configuration


@dataclasses.dataclass(frozen=True)
class LayerSettings:
    """DNS hyper-parameters of one layer."""

    c: float
    gamma: float = DEFAULT_DNS_GAMMA
    power: float = DEFAULT_DNS_POWER
    iter_stop: int | None = None  # counted from the phase start; None: until the phase ends
    ramp: int = 0  # steps over which the thresholds rise linearly to their value (0: the paper's fixed ones)


@dataclasses.dataclass(frozen=True)
class Phase:
    """Steps ``[start, end)`` during which layers of ``kinds`` get surgery."""

    kinds: frozenset[str]
    start: int
    end: int

    def label(self) -> str:
        return "+".join(sorted(self.kinds))


def parse_phases(spec: str | None, total_steps: int, kinds_present: set[str]) -> list[Phase]:
    """Phases from ``"conv:0.4,fc:0.4"`` (fractions of the run) or ``"conv:6000,fc:6000"`` (steps);
    a kind ``all`` (or ``conv+fc``) prunes both at once. Steps after the last phase fine-tune with
    frozen masks. Default: conv then fc, 40% of the run each, when the model has both kinds;
    otherwise one phase over 80% of the run.
    """
    if spec is None or spec == "":
        kinds = [k for k in ("conv", "fc") if k in kinds_present]
        share = 0.4 if len(kinds) == 2 else 0.8
        spec = ",".join(f"{k}:{share}" for k in kinds)
        if not spec:
            return []
    phases: list[Phase] = []
    start = 0
    for item in spec.split(","):
        name, sep, amount = item.strip().partition(":")
        if not sep:
            raise OnnxdnsError(f"DNS phase '{item}': expected KIND:LENGTH (e.g. conv:0.4 or fc:6000)")
        kinds = {"conv", "fc"} if name in ("all", "conv+fc", "fc+conv") else {name}
        if not kinds <= {"conv", "fc"}:
            raise OnnxdnsError(f"DNS phase '{item}': kind must be conv, fc or all")
        try:
            value = float(amount)
        except ValueError:
            raise OnnxdnsError(f"DNS phase '{item}': length '{amount}' is not a number") from None
        length = round(value * total_steps) if value <= 1.0 and "." in amount else int(value)
        if length <= 0:
            raise OnnxdnsError(f"DNS phase '{item}': length must be positive")
        phases.append(Phase(frozenset(kinds), start, min(total_steps, start + length)))
        start += length
    if start > total_steps:
        raise OnnxdnsError(f"DNS phases last {start} steps, more than the run's {total_steps}")
    return phases


def parse_layer_values(spec: str | float | dict[str, float] | None, defaults: dict[str, float],
                       layers: Sequence[MaskedLayer], what: str) -> dict[str, float]:
    """Per-layer values from kind defaults overridden by ``"conv=3,fc=4,fc1=2.5"`` (or a dict, or
    one number for every layer): a layer name beats its kind, which beats ``all``, which beats the
    default."""
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        spec = {"all": float(spec)}
    if isinstance(spec, str):
        items: dict[str, float] = {}
        for item in filter(None, (s.strip() for s in spec.split(","))):
            key, sep, value = item.partition("=")
            if not sep:
                if len(spec.split(",")) == 1:  # a single number applies to every layer
                    key, value = "all", item
                else:
                    raise OnnxdnsError(f"{what} '{item}': expected NAME=VALUE (NAME a layer, conv, fc or all)")
            try:
                items[key.strip()] = float(value)
            except ValueError:
                raise OnnxdnsError(f"{what} '{item}': '{value}' is not a number") from None
        spec = items
    spec = dict(spec or {})
    names = {layer.name for layer in layers}
    unknown = set(spec) - names - {"conv", "fc", "all"}
    if unknown:
        raise OnnxdnsError(f"{what}: unknown layer(s) {', '.join(sorted(unknown))}; layers: {', '.join(sorted(names))}")
    values = {}
    for layer in layers:
        value = spec.get(layer.name, spec.get(layer.kind, spec.get("all", defaults.get(layer.kind))))
        if value is None:
            raise OnnxdnsError(f"{what}: no value for layer {layer.name}")
        values[layer.name] = float(value)
    return values


# --------------------------------------------------------------------------- the hook


class DNSPruner(Hook):
    """Runs the surgery before each step of a phase that covers the layer's kind."""

    def __init__(self, layers: Sequence[MaskedLayer], settings: dict[str, LayerSettings],
                 phases: Sequence[Phase], seed: int = 0) -> None:
        self.layers = list(layers)
        self.settings = settings
        self.phases = list(phases)
        self.rng = np.random.default_rng([seed, 0xD45])
        #: layer -> [phase index, mu, std, a, b]
        self.stats: dict[str, list[float]] = {}
        self.counts = {layer.name: {"updates": 0, "pruned": 0, "spliced": 0} for layer in self.layers}

    def phase_at(self, step: int) -> tuple[int, Phase] | None:
        for i, phase in enumerate(self.phases):
            if phase.start <= step < phase.end:
                return i, phase
        return None

    def before_step(self, step: int) -> None:
        current = self.phase_at(step)
        if current is None:
            return
        index, phase = current
        iteration = step - phase.start
        masks = self.trainer.masks
        session = self.trainer.session
        for layer in self.layers:
            if layer.kind not in phase.kinds:
                continue
            cfg = self.settings[layer.name]
            stats = self.stats.get(layer.name)
            if stats is None or int(stats[0]) != index:
                pairs = [(session.get(p), masks.arrays[m]) for p, m in layer.params]
                mu, std = layer_statistics(pairs)
                a, b = thresholds(mu, std, cfg.c)
                stats = self.stats[layer.name] = [index, mu, std, a, b]
            r = self.rng.random()
            if not (surgery_probability(iteration, cfg.gamma, cfg.power) > r
                    and (cfg.iter_stop is None or iteration < cfg.iter_stop)):
                continue
            count = self.counts[layer.name]
            count["updates"] += 1
            share = ramp_factor(iteration, cfg.ramp)
            for p, m in layer.params:
                old = masks.arrays[m]
                new = update_mask(session.get(p), old, share * stats[3], share * stats[4])
                if not np.array_equal(new, old):
                    kept_before = old != 0
                    count["pruned"] += int(np.count_nonzero(kept_before & (new == 0)))
                    count["spliced"] += int(np.count_nonzero(~kept_before & (new != 0)))
                    masks.set(m, new)

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state, "stats": self.stats, "counts": self.counts}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.stats = {k: list(v) for k, v in state["stats"].items()}
        self.counts = {k: dict(v) for k, v in state["counts"].items()}

    def summary(self) -> dict[str, Any]:
        return {
            "phases": [{"kinds": p.label(), "start": p.start, "end": p.end} for p in self.phases],
            "thresholds": {k: {"mu": v[1], "std": v[2], "a": v[3], "b": v[4]} for k, v in self.stats.items()},
            "surgery": self.counts,
            "spliced": sum(c["spliced"] for c in self.counts.values()),
            "pruned": sum(c["pruned"] for c in self.counts.values()),
        }
