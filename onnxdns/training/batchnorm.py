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

from onnxdns.graphutil import fresh_name
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
    """A copy of ``model`` whose inference-mode BatchNormalization nodes (scale, bias and running
    statistics stored as initializers; 4-d inputs) become ``(x - mean) / sqrt(var + eps) * gamma +
    beta`` with ``gamma`` and ``beta`` reshaped to ``[C, 1, 1]`` under their names (still the
    trainable parameters: read by ``Mul`` / ``Add``) and the statistics constants (read by ``Sub``
    / ``Div``: never trained).

    onnxruntime-training 1.19 turns every BatchNormalization of a training graph into its training
    kernel (``BatchNormInternal``, batch statistics) whatever its mode: "frozen" BatchNorm
    (torch's ``model.eval()`` fine-tuning) needs this form.
    """
    import numpy as np
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    readers: dict[str, int] = {}
    for n in model.graph.node:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    nodes = [n for n in _batchnorms(model)
             if _training_mode(n) == 0 and len(n.output) == 1 and len(n.input) == 5
             and all(i in inits for i in n.input[1:]) and all(readers[i] == 1 for i in n.input[1:3])]
    if not nodes:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {i.name: i for i in out.graph.initializer}
    taken = set(inits) | {o for n in out.graph.node for o in n.output}

    def fresh(base: str) -> str:
        return fresh_name(base, taken)

    names = {n.output[0] for n in nodes}
    replaced = []
    for node in out.graph.node:
        if node.op_type != "BatchNormalization" or node.output[0] not in names:
            replaced.append(node)
            continue
        x, gamma, beta, mean, var = node.input
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        for name in (gamma, beta):  # [C] -> [C, 1, 1], same values and name
            value = numpy_helper.to_array(inits[name])
            inits[name].CopyFrom(numpy_helper.from_array(value.reshape(-1, 1, 1), name))
        m = numpy_helper.to_array(inits[mean]).astype(np.float32).reshape(-1, 1, 1)
        v = numpy_helper.to_array(inits[var]).astype(np.float32).reshape(-1, 1, 1)
        base = node.name or node.output[0]
        mean_c, std_c = fresh(f"{base}.mean"), fresh(f"{base}.std")
        out.graph.initializer.extend([numpy_helper.from_array(m, mean_c),
                                      numpy_helper.from_array(np.sqrt(v + np.float32(eps)), std_c)])
        centred, normed, scaled = fresh(f"{base}.centred"), fresh(f"{base}.normed"), fresh(f"{base}.scaled")
        replaced += [
            helper.make_node("Sub", [x, mean_c], [centred], name=fresh(f"{base}.sub")),
            helper.make_node("Div", [centred, std_c], [normed], name=fresh(f"{base}.div")),
            helper.make_node("Mul", [normed, gamma], [scaled], name=fresh(f"{base}.mul")),
            helper.make_node("Add", [scaled, beta], list(node.output), name=fresh(f"{base}.add")),
        ]
    del out.graph.node[:]
    out.graph.node.extend(replaced)
    reshaped = {n.input[k] for n in nodes for k in (1, 2)}
    for values in (out.graph.value_info, out.graph.input):  # annotations of the old [C] shape
        kept_values = [v for v in values if v.name not in reshaped]
        del values[:]
        values.extend(kept_values)
    used = {i for n in out.graph.node for i in n.input}
    kept = [i for i in out.graph.initializer if i.name in used or i.name in {o.name for o in out.graph.output}]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept)
    return out


def from_frozen_affine(model: onnx.ModelProto) -> onnx.ModelProto:
    """The inverse of :func:`to_frozen_affine` on a trained model: every ``Sub(x, mean) -> Div(std)
    -> Mul(gamma) -> Add(beta)`` chain it wrote (its node names end in ``.sub``/``.div``/``.mul``/
    ``.add``; operands ``[C, 1, 1]`` initializers) is a BatchNormalization again, with ``gamma`` and
    ``beta`` back to ``[C]``, ``var = std ** 2`` and ``epsilon`` 0 (what the trained graph computed,
    up to rounding), so that the optimize pipeline folds it into its conv."""
    import numpy as np
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    graph_outputs = {o.name for o in model.graph.output}

    def only(name: str, op: str) -> onnx.NodeProto | None:
        c = consumers.get(name, [])
        return c[0] if len(c) == 1 and c[0].op_type == op and name not in graph_outputs else None

    chains = []
    for sub in model.graph.node:
        if sub.op_type != "Sub" or not sub.name.endswith(".sub") or sub.input[1] not in inits:
            continue
        div = only(sub.output[0], "Div")
        mul = div and only(div.output[0], "Mul")
        add = mul and only(mul.output[0], "Add")
        if not (add and div.input[1] in inits and mul.input[1] in inits and add.input[1] in inits
                and all(n.name.endswith(t) for n, t in ((div, ".div"), (mul, ".mul"), (add, ".add")))):
            continue
        chains.append((sub, div, mul, add))
    if not chains:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {i.name: i for i in out.graph.initializer}
    drop = {id(n) for chain in chains for n in chain}
    by_sub = {chain[0].name: chain for chain in chains}
    nodes = []
    for node in model.graph.node:
        if node.name in by_sub and node.op_type == "Sub":
            sub, div, mul, add = by_sub[node.name]
            mean = numpy_helper.to_array(inits[sub.input[1]]).reshape(-1)
            std = numpy_helper.to_array(inits[div.input[1]]).reshape(-1).astype(np.float32)
            for name in (mul.input[1], add.input[1]):
                inits[name].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(inits[name]).reshape(-1), name))
            inits[sub.input[1]].CopyFrom(numpy_helper.from_array(mean, sub.input[1]))
            inits[div.input[1]].CopyFrom(numpy_helper.from_array(std * std, div.input[1]))
            nodes.append(helper.make_node("BatchNormalization", [sub.input[0], mul.input[1], add.input[1], sub.input[1],
                                                                 div.input[1]], list(add.output),
                                          name=sub.name[:-len(".sub")], epsilon=0.0))
        elif id(node) not in drop and not any(node.name == n.name and node.op_type == n.op_type
                                              for chain in chains for n in chain):
            nodes.append(node)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
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
