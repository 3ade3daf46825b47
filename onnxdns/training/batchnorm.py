"""BatchNormalization in training mode for onnxruntime-training, and back to inference mode.

Models exported for inference carry ``BatchNormalization`` in inference mode (``training_mode=0``,
one output): trained like that, BN normalises with its stored running statistics and only its
scale and shift learn (torch's ``model.eval()`` fine-tuning). :func:`to_training_mode` switches
every BN whose running statistics are initializers to training mode (opset >= 14): it normalises
with the batch statistics and returns the updated running mean and variance as outputs 1 and 2,
which the training loop copies back into the checkpoint after every step
(:func:`onnxdns.training.params.batchnorm_writeback`). :func:`to_inference_mode` turns a trained
model back into an inference model.

onnxruntime updates the running variance with the biased batch variance (torch uses the unbiased
one: a factor ``n / (n - 1)``, with ``n = batch x height x width`` values per channel).
"""

from __future__ import annotations

import onnx
from onnx import helper

from onnxdns.errors import OnnxdnsError

#: Suffixes of the running-statistics outputs added by :func:`to_training_mode`.
MEAN_SUFFIX, VAR_SUFFIX = ".running_mean_out", ".running_var_out"
#: First opset whose BatchNormalization has the ``training_mode`` attribute.
MIN_OPSET = 14


def _batchnorms(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == "BatchNormalization" and n.domain in ("", "ai.onnx")]


def _training_mode(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "training_mode"), 0)


def _set_training_mode(node: onnx.NodeProto, value: int) -> None:
    kept = [a for a in node.attribute if a.name != "training_mode"]
    del node.attribute[:]
    node.attribute.extend(kept)
    if value:
        node.attribute.append(helper.make_attribute("training_mode", value))


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def to_training_mode(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose inference-mode BatchNormalization nodes (with running statistics
    stored as initializers) train with batch statistics and output their new running statistics.

    Raises :class:`OnnxdnsError` when the model has such nodes but an opset below 14.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {i.name for i in out.graph.initializer}
    nodes = [n for n in _batchnorms(out)
             if _training_mode(n) == 0 and len(n.output) == 1 and len(n.input) == 5
             and n.input[3] in inits and n.input[4] in inits]
    if nodes and _opset(out) < MIN_OPSET:
        raise OnnxdnsError(f"BatchNormalization training needs opset >= {MIN_OPSET}, the model has opset {_opset(out)}; "
                           "re-export it with a newer opset (or train with batchnorm='frozen')")
    for node in nodes:
        _set_training_mode(node, 1)
        node.output.extend([f"{node.output[0]}{MEAN_SUFFIX}", f"{node.output[0]}{VAR_SUFFIX}"])
    return out


def to_inference_mode(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose BatchNormalization nodes run in inference mode (one output).

    Raises :class:`OnnxdnsError` when a running-statistics output is read by another node or is a
    graph output.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    used = {i for n in out.graph.node for i in n.input} | {o.name for o in out.graph.output}
    for node in _batchnorms(out):
        if _training_mode(node) == 0 and len(node.output) == 1:
            continue
        extra = [o for o in node.output[1:] if o]
        if any(o in used for o in extra):
            raise OnnxdnsError(f"BatchNormalization {node.name or node.output[0]}: its running statistics are read by "
                               "the graph; cannot switch it to inference mode")
        _set_training_mode(node, 0)
        del node.output[1:]
    stale = {o for n in model.graph.node if n.op_type == "BatchNormalization" for o in n.output[1:] if o}
    kept = [v for v in out.graph.value_info if v.name not in stale]
    del out.graph.value_info[:]
    out.graph.value_info.extend(kept)
    return out


def has_training_mode(model: onnx.ModelProto) -> bool:
    """True when some BatchNormalization node runs in training mode."""
    return any(_training_mode(n) != 0 or len(n.output) > 1 for n in _batchnorms(model))
