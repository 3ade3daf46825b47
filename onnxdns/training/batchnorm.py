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


def to_frozen_affine(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose inference-mode BatchNormalization nodes over 4-d inputs (running
    statistics stored as initializers) become ``x * s + t`` with ``s = gamma / sqrt(var + eps)``
    and ``t = beta - mean * s`` computed in the graph from ``gamma`` and ``beta`` (still trainable
    initializers of the same names) and the stored statistics (constants).

    onnxruntime-training 1.19 turns every BatchNormalization of a training graph into its training
    kernel (``BatchNormInternal``, batch statistics) whatever its mode: "frozen" BatchNorm
    (torch's ``model.eval()`` fine-tuning) needs this form. onnxruntime folds ``s`` and ``t`` into
    constants (and into a preceding Conv) when it loads the trained model.
    """
    import numpy as np
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    nodes = [n for n in _batchnorms(model)
             if _training_mode(n) == 0 and len(n.output) == 1 and len(n.input) == 5
             and all(i in inits for i in n.input[1:])]
    if not nodes:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    taken = {i.name for i in out.graph.initializer} | {o for n in out.graph.node for o in n.output}

    def fresh(base: str) -> str:
        name, k = base, 0
        while name in taken:
            k += 1
            name = f"{base}_{k}"
        taken.add(name)
        return name

    targets = {id(n) for n in nodes}
    names = {n.output[0] for n in nodes}
    replaced = []
    for node in out.graph.node:
        if node.op_type != "BatchNormalization" or node.output[0] not in names:
            replaced.append(node)
            continue
        x, gamma, beta, mean, var = node.input
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        m = numpy_helper.to_array(inits[mean]).astype(np.float32)
        v = numpy_helper.to_array(inits[var]).astype(np.float32)
        base = node.name or node.output[0]

        def const(tag: str, value) -> str:
            name = fresh(f"{base}.{tag}")
            out.graph.initializer.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
            return name

        shape = fresh(f"{base}.channel_shape")
        out.graph.initializer.append(numpy_helper.from_array(np.array([-1, 1, 1], np.int64), shape))
        inv, neg_mean = const("inv_std", 1.0 / np.sqrt(v + np.float32(eps))), const("neg_mean", -m)
        scale, shift_t = fresh(f"{base}.scale"), fresh(f"{base}.shift")
        scale_r, shift_r, scaled = fresh(f"{base}.scale_c"), fresh(f"{base}.shift_c"), fresh(f"{base}.scaled")
        mean_s = fresh(f"{base}.mean_scaled")
        replaced += [
            helper.make_node("Mul", [gamma, inv], [scale], name=fresh(f"{base}.scale")),
            helper.make_node("Mul", [neg_mean, scale], [mean_s], name=fresh(f"{base}.mean_scaled")),
            helper.make_node("Add", [beta, mean_s], [shift_t], name=fresh(f"{base}.shift")),
            helper.make_node("Reshape", [scale, shape], [scale_r], name=fresh(f"{base}.scale_c")),
            helper.make_node("Reshape", [shift_t, shape], [shift_r], name=fresh(f"{base}.shift_c")),
            helper.make_node("Mul", [x, scale_r], [scaled], name=fresh(f"{base}.mul")),
            helper.make_node("Add", [scaled, shift_r], list(node.output), name=fresh(f"{base}.add")),
        ]
    del out.graph.node[:]
    out.graph.node.extend(replaced)
    used = {i for n in out.graph.node for i in n.input}
    kept = [i for i in out.graph.initializer if i.name in used or i.name in {o.name for o in out.graph.output}]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept)
    del targets
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
