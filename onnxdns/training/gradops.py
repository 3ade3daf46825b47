"""Operators onnxruntime-training 1.19 has no gradient for, rewritten (same values) into operators
it has, before the training graph is built.

* ``HardSigmoid`` and ``HardSwish`` (MobileNetV3-style models: the PP-OCR ones) are rewritten in
  the training graph only, by :mod:`onnxdns.training.differentiable` (the trained model keeps them).
* ``ConvTranspose`` whose kernel equals its stride (no padding, dilation or groups; weight an
  initializer: the PP-OCR detector's head) becomes a 1x1 ``Conv`` to ``C_out * s * s`` channels
  and a pixel shuffle (``Reshape``, ``Transpose``, ``Reshape``): the same products and sums
  (onnxruntime 1.19 has no CPU kernel for ``ConvTransposeGrad``). The trained model keeps that form.
* ``Resize`` nearest (``asymmetric``, ``floor``) by integer scales ``[1, 1, s_h, s_w]`` (the
  detector's FPN) becomes ``Reshape`` to ``[N, C, H, 1, W, 1]``, ``Expand`` to ``[N, C, H, s_h, W,
  s_w]`` and ``Reshape`` to ``[N, C, H s_h, W s_w]``: the same values (no ``ResizeGrad`` kernel either).
* :func:`restore` turns both back in the trained model (the ConvTranspose with its trained
  weights reordered): the rewrites exist for the gradient only, the operators run faster.
* A model below opset 12 is converted to opset 12 (``onnx.version_converter``): the gradient of
  ``Clip`` uses ``LessOrEqual``, which opset 12 introduced.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

#: ``doc_string`` prefix of the node that ends a rewrite: what :func:`restore` reads.
MARK = "onnxdns.gradops:"


def _mark(node: onnx.NodeProto, original: onnx.NodeProto, **info) -> None:
    import json

    node.doc_string = MARK + json.dumps({"node": original.SerializeToString().hex(), **info})


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


#: The lowest opset whose operators the gradient graphs of onnxruntime-training 1.19 use.
MIN_OPSET = 12


def expand_for_gradients(model: onnx.ModelProto, min_opset: int = MIN_OPSET) -> onnx.ModelProto:
    """``model`` at opset ``min_opset`` (at least :data:`MIN_OPSET`) or above, with its
    kernel-equals-stride ConvTransposes and integer nearest Resizes rewritten (see the module
    docstring); ``model`` itself is not changed. (BatchNorm in training mode needs opset 14: pass that.)"""
    min_opset = max(min_opset, MIN_OPSET)
    if 0 < _opset(model) < min_opset:
        from onnx import version_converter

        from onnxdns.errors import OnnxdnsError

        try:
            model = version_converter.convert_version(model, min_opset)
        except Exception as e:  # the converter raises plain RuntimeErrors / ValueErrors
            raise OnnxdnsError(f"training needs opset {min_opset} or above; converting the model from opset "
                               f"{_opset(model)} failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return _nearest_resize_as_expand(_conv_transpose_as_shuffle(model))


def _constant_values(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    values = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx") and len(n.attribute) == 1 \
                and n.attribute[0].name == "value":
            values[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return values


def _integer_nearest_scales(node: onnx.NodeProto, values: dict) -> tuple[int, int] | None:
    if node.op_type != "Resize" or node.domain not in ("", "ai.onnx") or len(node.input) < 3:
        return None
    if len(node.input) > 3 and node.input[3]:  # sizes
        return None
    a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
    text = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in a.items()}
    if (text.get("mode", "nearest") != "nearest" or text.get("coordinate_transformation_mode", "half_pixel") != "asymmetric"
            or text.get("nearest_mode", "round_prefer_floor") != "floor"):
        return None
    scales = values.get(node.input[2])
    if scales is None or scales.shape != (4,) or list(scales[:2]) != [1, 1]:
        return None
    sh, sw = float(scales[2]), float(scales[3])
    if sh != int(sh) or sw != int(sw) or sh < 1 or sw < 1:
        return None
    return int(sh), int(sw)


def _nearest_resize_as_expand(model: onnx.ModelProto) -> onnx.ModelProto:
    values = _constant_values(model.graph)

    def rewrite(node: onnx.NodeProto, scales: tuple[int, int], fresh, const) -> list[onnx.NodeProto]:
        nodes = []
        sh, sw = scales
        base = node.name or node.output[0]
        x = node.input[0]
        shape, nc, h, w = fresh(f"{base}.shape"), fresh(f"{base}.nc"), fresh(f"{base}.h"), fresh(f"{base}.w")
        nodes.append(helper.make_node("Shape", [x], [shape], name=fresh(f"{base}.shape")))
        for name, lo, hi in ((nc, 0, 2), (h, 2, 3), (w, 3, 4)):
            nodes.append(helper.make_node("Slice", [shape, const(f"{base}.lo", np.array([lo], np.int64)),
                                                    const(f"{base}.hi", np.array([hi], np.int64))], [name],
                                          name=fresh(f"{base}.slice")))
        one = const(f"{base}.one", np.array([1], np.int64))
        split_shape, wide_shape, merged_shape = fresh(f"{base}.split_shape"), fresh(f"{base}.wide_shape"), fresh(f"{base}.merged_shape")
        hs, ws = fresh(f"{base}.hs"), fresh(f"{base}.ws")
        nodes.append(helper.make_node("Concat", [nc, h, one, w, one], [split_shape], name=fresh(f"{base}.concat"), axis=0))
        nodes.append(helper.make_node("Concat", [nc, h, const(f"{base}.sh", np.array([sh], np.int64)), w,
                                                 const(f"{base}.sw", np.array([sw], np.int64))], [wide_shape],
                                      name=fresh(f"{base}.concat"), axis=0))
        nodes.append(helper.make_node("Mul", [h, const(f"{base}.sh", np.array([sh], np.int64))], [hs], name=fresh(f"{base}.mul")))
        nodes.append(helper.make_node("Mul", [w, const(f"{base}.sw", np.array([sw], np.int64))], [ws], name=fresh(f"{base}.mul")))
        nodes.append(helper.make_node("Concat", [nc, hs, ws], [merged_shape], name=fresh(f"{base}.concat"), axis=0))
        split, wide = fresh(f"{base}.split"), fresh(f"{base}.wide")
        nodes.append(helper.make_node("Reshape", [x, split_shape], [split], name=fresh(f"{base}.reshape")))
        nodes.append(helper.make_node("Expand", [split, wide_shape], [wide], name=fresh(f"{base}.expand")))
        nodes.append(helper.make_node("Reshape", [wide, merged_shape], list(node.output), name=fresh(f"{base}.reshape")))
        _mark(nodes[-1], node)
        return nodes

    return _rewrite_nodes(model, lambda node: _integer_nearest_scales(node, values), rewrite)


def _rewrite_nodes(model: onnx.ModelProto, match, rewrite) -> onnx.ModelProto:
    """``model`` itself when ``match(node)`` is falsy for every node, else a copy in which each
    matching node is replaced by the nodes ``rewrite(node, match(node), fresh, const)`` returns
    (``fresh`` and ``const`` of :func:`_namer` on the copy's graph)."""
    if not any(match(n) for n in model.graph.node):
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    fresh, const = _namer(graph)
    nodes = []
    for node in graph.node:
        found = match(node)
        nodes.extend(rewrite(node, found, fresh, const) if found else [node])
    del graph.node[:]
    graph.node.extend(nodes)
    return out


def _namer(graph: onnx.GraphProto):
    """``fresh(base)``: a name not used in ``graph``; ``const(base, value)``: a new initializer of
    ``graph`` holding ``value``, its name returned."""
    from onnxdns.graphutil import fresh_name

    taken = {n.name for n in graph.node} | {o for n in graph.node for o in n.output} | \
        {i.name for i in graph.initializer} | {i.name for i in graph.input}

    def fresh(base: str) -> str:
        return fresh_name(base, taken)

    def const(base: str, value: np.ndarray) -> str:
        name = fresh(base)
        graph.initializer.append(numpy_helper.from_array(value, name))
        return name

    return fresh, const


def _shuffle_conv_transpose(node: onnx.NodeProto, inits: dict) -> int | None:
    """The stride ``s`` when ``node`` is a ConvTranspose with kernel = stride = (s, s), no padding,
    dilation, groups or output padding, and initializer weight (and bias); else None."""
    if node.op_type != "ConvTranspose" or node.domain not in ("", "ai.onnx") or node.input[1] not in inits:
        return None
    if len(node.input) > 2 and node.input[2] and node.input[2] not in inits:
        return None
    a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
    kernel = list(a.get("kernel_shape", inits[node.input[1]].dims[2:]))
    strides = list(a.get("strides", [1] * len(kernel)))
    if len(kernel) != 2 or kernel != strides or kernel[0] != kernel[1] or kernel[0] < 2:
        return None
    if any(a.get("pads", [0])) or any(a.get("output_padding", [0])) or "output_shape" in a:
        return None
    if a.get("group", 1) != 1 or any(d != 1 for d in a.get("dilations", [1, 1])):
        return None
    if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", b"VALID", "VALID"):
        return None
    return int(kernel[0])


def _conv_transpose_as_shuffle(model: onnx.ModelProto) -> onnx.ModelProto:
    inits = {i.name: i for i in model.graph.initializer}

    def rewrite(node: onnx.NodeProto, s: int, fresh, const) -> list[onnx.NodeProto]:
        nodes = []
        base = node.name or node.output[0]
        w = numpy_helper.to_array(inits[node.input[1]])  # [C_in, C_out, s, s]
        c_in, c_out = w.shape[0], w.shape[1]
        conv_inputs = [node.input[0], const(f"{base}.conv_weight",
                                           np.ascontiguousarray(w.transpose(1, 2, 3, 0).reshape(c_out * s * s, c_in, 1, 1)))]
        if len(node.input) > 2 and node.input[2]:
            b = numpy_helper.to_array(inits[node.input[2]])
            conv_inputs.append(const(f"{base}.conv_bias", np.repeat(b, s * s)))
        z, shape = fresh(f"{base}.conv"), fresh(f"{base}.shape")
        nodes.append(helper.make_node("Conv", conv_inputs, [z], name=fresh(f"{base}.conv"), kernel_shape=[1, 1]))
        nodes.append(helper.make_node("Shape", [z], [shape], name=fresh(f"{base}.shape")))
        n, hw = fresh(f"{base}.n"), fresh(f"{base}.hw")
        nodes.append(helper.make_node("Slice", [shape, const(f"{base}.s0", np.array([0], np.int64)),
                                                const(f"{base}.s1", np.array([1], np.int64))], [n], name=fresh(f"{base}.slice_n")))
        nodes.append(helper.make_node("Slice", [shape, const(f"{base}.s2", np.array([2], np.int64)),
                                                const(f"{base}.s4", np.array([4], np.int64))], [hw], name=fresh(f"{base}.slice_hw")))
        split_shape, merged_hw, merged_shape = fresh(f"{base}.split_shape"), fresh(f"{base}.merged_hw"), fresh(f"{base}.merged_shape")
        nodes.append(helper.make_node("Concat", [n, const(f"{base}.cs", np.array([c_out, s, s], np.int64)), hw],
                                      [split_shape], name=fresh(f"{base}.concat_split"), axis=0))
        nodes.append(helper.make_node("Mul", [hw, const(f"{base}.stride", np.array([s], np.int64))], [merged_hw],
                                      name=fresh(f"{base}.mul_hw")))
        nodes.append(helper.make_node("Concat", [n, const(f"{base}.c", np.array([c_out], np.int64)), merged_hw],
                                      [merged_shape], name=fresh(f"{base}.concat_merged"), axis=0))
        split, moved = fresh(f"{base}.split"), fresh(f"{base}.moved")
        nodes.append(helper.make_node("Reshape", [z, split_shape], [split], name=fresh(f"{base}.reshape_split")))
        # [N, C, i, j, H, W] -> [N, C, H, i, W, j]
        nodes.append(helper.make_node("Transpose", [split], [moved], name=fresh(f"{base}.transpose"), perm=[0, 1, 4, 2, 5, 3]))
        nodes.append(helper.make_node("Reshape", [moved, merged_shape], list(node.output), name=fresh(f"{base}.reshape_merged")))
        _mark(nodes[-1], node, weight=conv_inputs[1], bias=conv_inputs[2] if len(conv_inputs) > 2 else None, stride=s)
        return nodes

    out = _rewrite_nodes(model, lambda node: _shuffle_conv_transpose(node, inits), rewrite)
    if out is model:
        return model
    graph = out.graph
    used = {i for n in graph.node for i in n.input}
    kept = [i for i in graph.initializer if i.name in used or i.name in {g.name for g in graph.output}]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return out


def restore(model: onnx.ModelProto) -> onnx.ModelProto:
    """The trained ``model`` with every rewrite of :func:`expand_for_gradients` that has an
    original node (``ConvTranspose``, ``Resize``) replaced by that node again: a ConvTranspose gets
    the trained 1x1 weights reordered to ``[C_in, C_out, s, s]`` under its weight's name (and the
    bias). Nodes only the rewrite used are removed. ``model`` itself is not changed."""
    import json

    if not any(n.doc_string.startswith(MARK) for n in model.graph.node):
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inits = {i.name: i for i in graph.initializer}
    nodes = []
    for node in graph.node:
        if not node.doc_string.startswith(MARK):
            nodes.append(node)
            continue
        info = json.loads(node.doc_string[len(MARK):])
        original = onnx.NodeProto.FromString(bytes.fromhex(info["node"]))
        if original.op_type == "ConvTranspose":
            s = int(info["stride"])
            w = numpy_helper.to_array(inits[info["weight"]])  # [C_out * s * s, C_in, 1, 1]
            c_in = w.shape[1]
            c_out = w.shape[0] // (s * s)
            weight = w.reshape(c_out, s, s, c_in).transpose(3, 0, 1, 2)
            graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight), original.input[1]))
            if info.get("bias"):
                bias = numpy_helper.to_array(inits[info["bias"]]).reshape(c_out, s * s)[:, 0]
                graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(bias), original.input[2]))
        nodes.append(original)
    del graph.node[:]
    graph.node.extend(nodes)
    # drop what only the rewrites read (they are dead now), then unused initializers
    outputs = {o.name for o in graph.output}
    while True:
        used = {i for n in graph.node for i in n.input} | outputs
        live = [n for n in graph.node if any(o in used for o in n.output)]
        if len(live) == len(graph.node):
            break
        del graph.node[:]
        graph.node.extend(live)
    used = {i for n in graph.node for i in n.input} | outputs
    kept = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return out
