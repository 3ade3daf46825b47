"""Convert float32 weights and compute to float16 (for the CUDA target), keeping float32 I/O."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from onnxdns import graphutil
from onnxdns.framework import GraphPass, PassReport
from onnxdns.passes.infer_shapes import infer_proto

#: Operators kept in float32 (their float inputs/outputs get Casts around them), and why.
BLOCKED_OPS = frozenset({
    # statistics over many elements: mean/variance lose precision or overflow in float16
    "BatchNormalization", "InstanceNormalization", "LayerNormalization", "GroupNormalization",
    "LpNormalization", "MeanVarianceNormalization", "LRN", "LpPool", "GlobalLpPool",
    # exp-based normalisation and losses: overflow past 65504, cancellation in log-sum-exp
    "Softmax", "LogSoftmax", "SoftmaxCrossEntropyLoss", "NegativeLogLikelihoodLoss",
    # accumulating reductions (ReduceMax/ReduceMin are exact and stay convertible)
    "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceProd", "ReduceL1", "ReduceL2",
    "ReduceLogSum", "ReduceLogSumExp", "CumSum",
    # exponentials, logarithms and powers: overflow or large relative error
    "Exp", "Log", "Pow", "Softplus",
    # index/window generation and ops whose output type comes from a dtype attribute
    "Range", "EyeLike", "HannWindow", "HammingWindow", "BlackmanWindow", "MelWeightMatrix",
    # random and quantization operators
    "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
    "Bernoulli", "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear",
})

_F32, _F16 = ir.DataType.FLOAT, ir.DataType.FLOAT16
_F16_MAX = float(np.finfo(np.float16).max)
_F16_STR = "tensor(float16)"


class ConvertFp16Pass(GraphPass):
    """Run float32 weights and compute in float16 (CUDA target); inputs and outputs stay float32.

    Lossy. Error bound (measured in ``tests/test_convert_fp16.py`` on Conv-BN-Relu-Gemm chains
    against the float32 model, with onnxruntime and with ``onnx.reference``): max abs output
    difference <= 1e-2 x max(1, max |float32 output|). Each float16 operation adds a relative
    rounding error of at most 2**-11 (~4.9e-4), growing with depth and accumulation length;
    weights beyond +-65504 are clamped to +-65504 and activations beyond it overflow to inf.

    What changes (main graph only; subgraph bodies and functions stay float32):

    * A standard-domain node computes in float16 when its type constraints allow
      ``tensor(float16)`` for every type parameter bound to float32, it is not in
      :data:`BLOCKED_OPS` and has no subgraph, and either a float type parameter binds one of its
      outputs or one of those inputs is already float16 (so ``Shape`` of a float32 graph input
      needs no Cast). Inputs of fixed type ``tensor(float)`` (e.g. ``Resize`` scales) stay float32.
    * ``Cast(to=FLOAT)`` becomes ``Cast(to=FLOAT16)`` unless its input was float16 already (an
      up-cast boundary), ``ConstantOfShape`` gets a float16 ``value``.
    * Float32 constants (initializers that are no graph inputs, ``Constant`` nodes) used by
      float16 nodes are converted (clamped to +-65504); one also used in float32 (a blocked
      op, a subgraph, a graph output) keeps its float32 version and gains a float16 copy.
    * Everything else meets at ``Cast`` nodes: graph inputs are cast to float16 where used in
      float16, blocked ops get Casts in and out, and a float16 graph output is cast back to
      float32 under its original name.

    Preconditions: default-domain opset >= 6. Element types come from annotations and ONNX shape
    inference; a node with a value of unknown type is left in float32.
    """

    name = "convert-fp16"
    exact = False
    summary = "float16 weights and compute (CUDA), float32 I/O; sensitive ops stay float32"

    def requires(self, model: ir.Model) -> None:
        opset = int(model.opset_imports.get("", 0))
        if opset < 6:
            raise ir.passes.PreconditionError(
                f"convert-fp16 needs default-domain opset >= 6 (Cast with an integer 'to'); the model has {opset}")

    def call(self, model: ir.Model) -> PassReport:
        graph = model.graph
        opset = int(model.opset_imports.get("", 0))
        dtypes = _element_types(model)
        editor = _Editor(graph)
        plans: dict[ir.Node, tuple[list[bool], list[bool]]] = {}
        fp16_values: set[ir.Value] = set()
        for node in graph:
            plan = _plan(node, opset, dtypes, fp16_values)
            if plan is not None:
                plans[node] = plan
                fp16_values.update(v for v, conv in zip(node.outputs, plan[1]) if conv)
        values = list(graph.inputs) + list(graph.initializers.values())
        values += [out for node in graph for out in node.outputs]
        uses = {v: list(v.uses()) for v in values}
        for node, (_, conv_out) in plans.items():
            _convert_node(node, conv_out)
        seen: set[ir.Value] = set()
        for value in values:
            if value in seen:
                continue
            seen.add(value)
            original = dtypes.get(value)
            if original is None:
                continue
            wants = {}
            for use in uses[value]:
                conv_in = plans.get(use.node, (None, None))[0]
                wants[use] = _F16 if conv_in is not None and conv_in[use.idx] else original
            array = _constant_array(value) if original == _F32 else None
            if array is not None:
                editor.convert_constant(value, array, [u for u, w in wants.items() if w == _F16])
            else:
                have = _F16 if value in fp16_values else original
                editor.cast_uses(value, have, original, [(u, w) for u, w in wants.items() if w != have])
        details = {"fp16_nodes": len(plans), "casts": editor.casts, "fp16_constants": editor.constants,
                   "clamped_values": editor.clamped}
        return PassReport(model, bool(plans or editor.casts or editor.constants), details)


def _element_types(model: ir.Model) -> dict[ir.Value, ir.DataType]:
    """Element type of every main-graph tensor value (annotations first, then shape inference)."""
    try:
        inferred = infer_proto(model, strict=False, data_prop=False)
        by_name = {
            info.name: ir.DataType(info.type.tensor_type.elem_type)
            for info in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input)
            if info.type.HasField("tensor_type") and info.type.tensor_type.elem_type
        }
    except Exception:  # noqa: BLE001 - without inference only annotated values are typed
        by_name = {}
    graph = model.graph
    values = list(graph.inputs) + list(graph.initializers.values()) + [o for n in graph for o in n.outputs]
    types: dict[ir.Value, ir.DataType] = {}
    for value in values:
        if isinstance(value.type, ir.TensorType):
            types[value] = value.dtype
        elif value.type is None and value.const_value is not None:
            types[value] = value.const_value.dtype
        elif value.type is None and value.name in by_name:
            types[value] = by_name[value.name]
    return types


def _formal(params: list, index: int):
    if index < len(params):
        return params[index]
    if params and params[-1].option == onnx.defs.OpSchema.FormalParameterOption.Variadic:
        return params[-1]
    return None


def _plan(node: ir.Node, opset: int, dtypes: dict[ir.Value, ir.DataType],
          fp16_values: set[ir.Value]) -> tuple[list[bool], list[bool]] | None:
    """Which inputs/outputs of ``node`` become float16, or None when it stays as it is."""
    if node.domain != "" or node.op_type in BLOCKED_OPS or node.op_type == "Constant":
        return None
    if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()):
        return None
    try:
        schema = onnx.defs.get_schema(node.op_type, node.version or opset, "")
    except onnx.defs.SchemaError:
        return None
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
    bound: dict[str, set] = {}
    in_params = [_formal(schema.inputs, i) for i in range(len(node.inputs))]
    out_params = [_formal(schema.outputs, i) for i in range(len(node.outputs))]
    for params, values in ((in_params, node.inputs), (out_params, node.outputs)):
        for param, value in zip(params, values):
            if value is None or param is None or param.type_str not in allowed:
                continue
            if value not in dtypes:
                if params is out_params and not value.uses() and not value.is_graph_output():
                    continue  # an unused optional output does not constrain anything
                return None
            bound.setdefault(param.type_str, set()).add(dtypes[value])
    is_cast = node.op_type == "Cast"
    convert = set()
    for type_str, types in bound.items():
        if types != {_F32} or (is_cast and type_str == "T1"):
            continue
        if _F16_STR not in allowed[type_str]:
            return None
        convert.add(type_str)
    if is_cast and "T2" in convert and dtypes.get(node.inputs[0]) == _F16:
        convert.discard("T2")  # Cast(float16 -> float): a float32 boundary, keep it
    if not convert:
        return None
    conv_in = [p is not None and v is not None and p.type_str in convert for p, v in zip(in_params, node.inputs)]
    conv_out = [p is not None and p.type_str in convert for p in out_params]
    feeds_fp16 = any(c and v in fp16_values for c, v in zip(conv_in, node.inputs))
    if not any(conv_out) and not feeds_fp16:
        return None
    return conv_in, conv_out


def _convert_node(node: ir.Node, conv_out: list[bool]) -> None:
    """Switch the node's float outputs (and dtype-carrying attributes) to float16."""
    for value, conv in zip(node.outputs, conv_out):
        if conv:
            value.type = ir.TensorType(_F16)
    if node.op_type == "Cast" and any(conv_out):
        node.attributes["to"] = ir.AttrInt64("to", int(_F16))
    if node.op_type == "ConstantOfShape" and any(conv_out):
        attr = node.attributes.get("value")
        fill = attr.as_tensor().numpy() if attr is not None else np.zeros(1, np.float32)
        node.attributes["value"] = ir.AttrTensor("value", ir.tensor(_to_fp16(fill)[0]))


def _constant_array(value: ir.Value) -> np.ndarray | None:
    """The float32 array of a constant (initializer that is no graph input, or Constant node)."""
    array = graphutil.const_array(value)
    if array is None:
        node = value.producer()
        if node is None or node.op_type != "Constant" or node.domain != "":
            return None
        if "value_float" in node.attributes:
            array = np.array(node.attributes["value_float"].as_float(), dtype=np.float32)
        elif "value_floats" in node.attributes:
            array = np.array(node.attributes["value_floats"].as_floats(), dtype=np.float32)
    return array if array is not None and array.dtype == np.float32 else None


def _to_fp16(array: np.ndarray) -> tuple[np.ndarray, int]:
    """``array`` as float16, finite values clamped to +-65504; also returns how many were clamped."""
    finite = np.isfinite(array)
    clamp = finite & (np.abs(array) > _F16_MAX)
    return np.where(clamp, np.sign(array) * _F16_MAX, array).astype(np.float16), int(np.count_nonzero(clamp))


class _Editor:
    """Inserts Casts and float16 constants, keeping node names and value names unique."""

    def __init__(self, graph: ir.Graph) -> None:
        self.graph = graph
        self.taken = set(graph.initializers) | {v.name for v in graph.inputs}
        for node in ir.traversal.RecursiveGraphIterator(graph):
            self.taken.update(o.name for o in node.outputs if o.name)
            if node.name:
                self.taken.add(node.name)
        self.casts = 0
        self.constants = 0
        self.clamped = 0

    def fresh(self, base: str) -> str:
        name, i = base, 0
        while name in self.taken:
            i += 1
            name = f"{base}_{i}"
        self.taken.add(name)
        return name

    def convert_constant(self, value: ir.Value, array: np.ndarray, fp16_uses: list[Any]) -> None:
        """Give the float16 users a float16 version of a float32 constant."""
        if not fp16_uses:
            return
        half, clamped = _to_fp16(array)
        self.clamped += clamped
        self.constants += 1
        keeps_fp32 = value.is_graph_output() or len(fp16_uses) < len(list(value.uses()))
        node = value.producer()
        if keeps_fp32:
            new = graphutil.add_initializer(self.graph, half, self.fresh(f"{value.name}_fp16"))
            for use in fp16_uses:
                use.node.replace_input_with(use.idx, new)
        elif node is not None:  # a Constant node
            for key in list(node.attributes):
                del node.attributes[key]
            node.attributes["value"] = ir.AttrTensor("value", ir.tensor(half))
            value.type = ir.TensorType(_F16)
        else:
            value.const_value = ir.tensor(half, name=value.name)
            value.type = ir.TensorType(_F16)

    def cast_uses(self, value: ir.Value, have: ir.DataType, original: ir.DataType,
                  mismatched: list[tuple[Any, ir.DataType]]) -> None:
        """Insert one Cast per wanted type; a float16 graph output is cast back under its name."""
        casts: dict[ir.DataType, ir.Value] = {}
        if value.is_graph_output() and have != original:
            out_name = value.name
            value.name = self.fresh(f"{out_name}_fp16")
            cast = self._cast(value, original, out_name)
            for i, out in enumerate(self.graph.outputs):
                if out is value:
                    self.graph.outputs[i] = cast
            casts[original] = cast
        for use, want in mismatched:
            if want not in casts:
                casts[want] = self._cast(value, want, self.fresh(f"{value.name}_{want.name.lower()}"))
            use.node.replace_input_with(use.idx, casts[want])

    def _cast(self, value: ir.Value, to: ir.DataType, name: str) -> ir.Value:
        out = ir.Value(name=name, shape=value.shape, type=ir.TensorType(to))
        node = ir.Node("", "Cast", [value], [ir.AttrInt64("to", int(to))], outputs=[out],
                       name=self.fresh(f"Cast_{name}"))
        producer = value.producer()
        if producer is not None and producer.graph is self.graph:
            self.graph.insert_after(producer, node)
        elif len(self.graph):
            self.graph.insert_before(self.graph.node(0), node)
        else:
            self.graph.append(node)
        self.casts += 1
        return out
