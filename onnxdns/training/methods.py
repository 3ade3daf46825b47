"""Training methods: what each one changes in the model, the training graph and the loop.

A method answers three questions; the shared machinery (artifacts, loop, checkpoints) does the rest:

* :meth:`Method.prepare`: the forward model to train (e.g. with masks added);
* :meth:`Method.artifact_options`: straight-through masks and a penalty added to the run's loss;
* :meth:`Method.hooks`: what runs around each optimizer step.

A method also says how BatchNormalization trains by default (:attr:`Method.batchnorm`: ``"train"``,
batch statistics with running statistics written back by the loop, or ``"frozen"``). Network
Slimming (``slim``: an L1 penalty on BatchNorm scales in the loss, BatchNorm in training mode) is
one more subclass in :data:`METHOD_CLASSES`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import onnx

from onnxdns.errors import OnnxdnsError
from onnxdns.passes.add_masks import AddMasksPass
from onnxdns.training.config import TrainConfig
from onnxdns.training.dns import DEFAULT_C, DNSPruner, LayerSettings, parse_layer_values, parse_phases
from onnxdns.training.loop import Hook
from onnxdns.training.magnitude import DEFAULT_SPARSITY, MagnitudePruner
from onnxdns.training.params import ParameterSet
from onnxdns.training.slim import ScaleMonitor, sparsity_loss


@dataclasses.dataclass(frozen=True)
class ArtifactOptions:
    """A method's contribution to :class:`onnxdns.training.artifacts.ArtifactSpec`."""

    straight_through: dict[str, str] = dataclasses.field(default_factory=dict)
    #: A term added to the run's loss (an object with ``build(emit) -> name``, e.g. :class:`L1Penalty`).
    penalty: Any = None


class Method:
    """Base: plain training, masks (if the model has any) frozen."""

    name: ClassVar[str] = ""
    needs_masks: ClassVar[bool] = False
    #: BatchNormalization mode when the configuration does not choose (see ``TrainConfig.batchnorm``).
    batchnorm: ClassVar[str] = "frozen"

    def __init__(self, config: TrainConfig) -> None:
        self.config = config

    def prepare(self, model: onnx.ModelProto) -> onnx.ModelProto:
        return model

    def artifact_options(self, params: ParameterSet) -> ArtifactOptions:
        return ArtifactOptions()

    def hooks(self, params: ParameterSet, total_steps: int) -> list[Hook]:
        return []


class Dense(Method):
    """``none``: dense training or fine-tuning; no masks are added."""

    name = "none"


class _Pruning(Method):
    needs_masks = True
    prune_biases_default: ClassVar[bool] = False

    def prepare(self, model: onnx.ModelProto) -> onnx.ModelProto:
        biases = self.config.prune_biases if self.config.prune_biases is not None else self.prune_biases_default
        return AddMasksPass(biases=biases).apply(model).model


class DNS(_Pruning):
    """``dns``: Dynamic Network Surgery; biases pruned too by default, as in the reference."""

    name = "dns"
    prune_biases_default = True

    def artifact_options(self, params: ParameterSet) -> ArtifactOptions:
        return ArtifactOptions(straight_through={p: m for layer in params.layers for p, m in layer.params})

    def hooks(self, params: ParameterSet, total_steps: int) -> list[Hook]:
        cfg, layers = self.config, params.layers
        c = parse_layer_values(cfg.dns_c, DEFAULT_C, layers, "DNS c")
        settings = {layer.name: LayerSettings(c=c[layer.name], gamma=cfg.dns_gamma, power=cfg.dns_power,
                                              iter_stop=cfg.dns_iter_stop, ramp=cfg.dns_ramp) for layer in layers}
        phases = parse_phases(cfg.dns_phases, total_steps, {layer.kind for layer in layers})
        return [DNSPruner(layers, settings, phases, seed=cfg.seed)]


class Magnitude(_Pruning):
    """``magnitude``: Han et al.'s prune-retrain rounds; masked gradients, no splicing."""

    name = "magnitude"

    def hooks(self, params: ParameterSet, total_steps: int) -> list[Hook]:
        cfg = self.config
        if cfg.quality is not None and cfg.sparsity is not None:
            raise OnnxdnsError("magnitude pruning: give a sparsity or a quality parameter, not both")
        sparsity = None
        if cfg.quality is None:
            sparsity = parse_layer_values(cfg.sparsity, DEFAULT_SPARSITY, params.layers, "sparsity")
        return [MagnitudePruner(params.layers, total_steps, rounds=cfg.rounds, sparsity=sparsity, quality=cfg.quality)]


class Slim(Method):
    """``slim``: Network Slimming sparsity training, ``loss + slim_lambda * sum |gamma|`` over every
    trainable BatchNorm scale and inserted channel scale (or the smooth form), BatchNorm in
    training mode; no masks."""

    name = "slim"
    batchnorm = "train"

    def prepare(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """Convs without BatchNorm (folded by the usual export) get a per-channel scale to train
        (``insert-channel-scales``: exact, all ones); BatchNorm's gamma serves the others."""
        from onnxdns.passes.insert_channel_scales import InsertChannelScalesPass

        return InsertChannelScalesPass().apply(model).model

    def artifact_options(self, params: ParameterSet) -> ArtifactOptions:
        return ArtifactOptions(penalty=sparsity_loss(params.scales, self.config.slim_lambda, self.config.smooth_l1))

    def hooks(self, params: ParameterSet, total_steps: int) -> list[Hook]:
        return [ScaleMonitor(params.scales, self.config.slim_lambda, self.config.smooth_l1)]


METHOD_CLASSES: dict[str, type[Method]] = {cls.name: cls for cls in (DNS, Magnitude, Slim, Dense)}


def get_method(config: TrainConfig) -> Method:
    if config.method not in METHOD_CLASSES:
        raise OnnxdnsError(f"unknown method '{config.method}'; choose one of: {', '.join(METHOD_CLASSES)}")
    return METHOD_CLASSES[config.method](config)
