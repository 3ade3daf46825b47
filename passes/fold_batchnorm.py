"""Fold inference-mode BatchNormalization into the Conv, ConvTranspose or Gemm that feeds it."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxdns import graphutil
from onnxdns.framework import GraphPass, PassReport

#: Producers whose output channels a BatchNormalization can be folded into.
_FOLDABLE_PRODUCERS = ("Conv", "ConvTranspose", "Gemm")


class FoldBatchNormPass(GraphPass):
    """Fold ``BatchNormalization`` into the preceding ``Conv`` / ``ConvTranspose`` / ``Gemm``.

    Guarantee: exact up to float rounding (the folded weights are computed in float64 and
    rounded once to the weight dtype).

    A BatchNormalization ``y = gamma * (x - mean) / sqrt(var + eps) + beta`` is folded when

    * it is in inference mode: a single output, no ``training_mode=1`` (and no ``is_test=0``
      of opset <= 6); its scale, bias, mean and variance are constants of shape ``[C]``;
    * its input ``x`` is output 0 of a ``Conv`` (weight ``[C_out, C_in/group, k...]``),
      ``ConvTranspose`` (weight ``[C_in, C_out/group, k...]``, any ``group``) or ``Gemm`` (any
      ``transA``/``transB``/``alpha``/``beta``, with or without ``C``; the BN then normalises the
      2-D ``[N, C]`` output), whose weight and bias are constants;
    * that output feeds only the BatchNormalization and is not a graph output.

    The producer takes over the BatchNormalization's output value name, so graph output names
    and downstream names do not change. A weight or bias shared with another node is not
    mutated: a new initializer is created (:func:`onnxdns.graphutil.set_input_constant`).
    BatchNormalization parameters and replaced weights that nothing uses any more are removed.
    Only the main graph is processed (not subgraphs or functions).
    """

    name = "fold-batchnorm"
    exact = True
    summary = "fold inference BatchNormalization into the preceding Conv/ConvTranspose/Gemm"

    def call(self, model: ir.Model) -> PassReport:
        graph = model.graph
        opset = int(model.opset_imports.get("", 0))
        folded: list[str] = []
        maybe_unused: list[ir.Value] = []
        for bn in list(graph):
            if bn.op_type != "BatchNormalization" or bn.domain != "" or bn.graph is not graph:
                continue
            plan = _plan(bn, opset)
            if plan is None:
                continue
            producer, scale, shift = plan
            maybe_unused.extend(v for v in list(bn.inputs[1:]) + list(producer.inputs[1:]) if v is not None)
            _fold_into(graph, producer, scale, shift)
            graphutil.bypass(graph, bn, producer.outputs[0])  # the producer output takes over the BN's name
            folded.append(producer.name or producer.op_type)
        removed = _remove_dead_constants(graph, maybe_unused)
        return PassReport(model, bool(folded), {"folded_into": folded, "removed_constants": removed})


def _plan(bn: ir.Node, opset: int) -> tuple[ir.Node, np.ndarray, np.ndarray] | None:
    """The producer to fold into and the per-channel (scale, shift), or None when not foldable."""
    if len(bn.outputs) != 1 or len(bn.inputs) != 5 or any(v is None for v in bn.inputs):
        return None
    if graphutil.attr_int(bn, "training_mode", 0) != 0:
        return None
    if opset and opset <= 6 and graphutil.attr_int(bn, "is_test", 0) == 0:
        return None
    x = bn.inputs[0]
    producer = x.producer()
    if producer is None or producer.op_type not in _FOLDABLE_PRODUCERS or producer.domain != "":
        return None
    if producer.graph is not bn.graph or producer.outputs[0] is not x or not graphutil.only_user(x, bn):
        return None
    params = [graphutil.const_array(v) for v in bn.inputs[1:]]
    if any(p is None or p.ndim != 1 or not np.issubdtype(p.dtype, np.floating) for p in params):
        return None
    gamma, beta, mean, var = (p.astype(np.float64) for p in params)
    channels = gamma.shape[0]
    if any(p.shape[0] != channels for p in (beta, mean, var)):
        return None
    eps = graphutil.attr_float(bn, "epsilon", 1e-5)
    scale = gamma / np.sqrt(var + eps)
    shift = beta - mean * scale
    if _out_channels(producer) != channels:
        return None
    return producer, scale, shift


def _out_channels(producer: ir.Node) -> int | None:
    """Output channel count of a foldable producer with constant weight and bias, else None."""
    if len(producer.inputs) < 2:
        return None
    weight = graphutil.const_array(producer.inputs[1])
    if weight is None or not np.issubdtype(weight.dtype, np.floating):
        return None
    bias_value = producer.inputs[2] if len(producer.inputs) > 2 else None
    bias = graphutil.const_array(bias_value)
    if bias_value is not None and (bias is None or not np.issubdtype(bias.dtype, np.floating)):
        return None
    if producer.op_type == "Conv":
        channels = weight.shape[0] if weight.ndim >= 3 else None
    elif producer.op_type == "ConvTranspose":
        group = graphutil.attr_int(producer, "group", 1)
        channels = weight.shape[1] * group if weight.ndim >= 3 and weight.shape[0] % group == 0 else None
    else:  # Gemm
        if weight.ndim != 2:
            return None
        channels = weight.shape[0] if graphutil.attr_int(producer, "transB", 0) else weight.shape[1]
    if channels is None:
        return None
    if producer.op_type != "Gemm" and bias is not None and bias.shape != (channels,):
        return None
    if producer.op_type == "Gemm" and bias is not None:
        try:
            np.broadcast_shapes(bias.shape, (1, channels))
        except ValueError:
            return None
    return channels


def _fold_into(graph: ir.Graph, producer: ir.Node, scale: np.ndarray, shift: np.ndarray) -> None:
    """Rewrite the producer's weight and bias so that its output equals the BN output."""
    weight = graphutil.const_array(producer.inputs[1])
    assert weight is not None
    dtype = weight.dtype
    bias_value = producer.inputs[2] if len(producer.inputs) > 2 else None
    bias = graphutil.const_array(bias_value)
    w64 = weight.astype(np.float64)
    op = producer.op_type
    if op == "Conv":
        new_w = w64 * scale.reshape((-1,) + (1,) * (w64.ndim - 1))
        new_b = (np.zeros_like(scale) if bias is None else bias.astype(np.float64)) * scale + shift
    elif op == "ConvTranspose":
        group = graphutil.attr_int(producer, "group", 1)
        c_in, c_out_g = w64.shape[0], w64.shape[1]
        grouped = w64.reshape((group, c_in // group, c_out_g) + w64.shape[2:])
        s = scale.reshape((group, 1, c_out_g) + (1,) * (w64.ndim - 2))
        new_w = (grouped * s).reshape(w64.shape)
        new_b = (np.zeros_like(scale) if bias is None else bias.astype(np.float64)) * scale + shift
    else:  # Gemm: Y = alpha * A' @ B' + beta * C, channels on the last axis of Y
        trans_b = graphutil.attr_int(producer, "transB", 0)
        new_w = w64 * (scale[:, None] if trans_b else scale[None, :])
        beta = graphutil.attr_float(producer, "beta", 1.0)
        # beta * C broadcasts to [N, M]: scaling along the last axis is right for every valid C shape.
        c = np.zeros(()) if bias is None else beta * bias.astype(np.float64)
        new_b = c * scale + shift
        producer.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
    bias_dtype = bias.dtype if bias is not None else dtype
    base = producer.name or producer.op_type
    graphutil.set_input_constant(graph, producer, 1, new_w.astype(dtype))
    graphutil.set_input_constant(graph, producer, 2, np.asarray(new_b).astype(bias_dtype),
                                 name=None if bias is not None else f"{base}_bias")


def _remove_dead_constants(graph: ir.Graph, values: list[ir.Value]) -> list[str]:
    """Drop initializers and ``Constant`` nodes among ``values`` that nothing uses any more."""
    unique = list({id(v): v for v in values}.values())
    removed = graphutil.remove_unused_initializers(graph, [v.name for v in unique if graphutil.is_initializer(v)])
    for value in unique:
        node = value.producer()
        if node is not None and node.op_type == "Constant" and node.graph is graph and not value.uses() \
                and not value.is_graph_output():
            graph.remove(node, safe=True)
            removed.append(value.name)
    return removed
