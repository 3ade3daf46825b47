"""Constant folding: nodes computable from constants become initializers (evaluated with onnxruntime)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import numpy_helper

from onnxdns import graphutil, runtime
from onnxdns.errors import OnnxdnsError
from onnxdns.framework import GraphPass, PassReport
from onnxdns.passes.infer_shapes import infer_proto

#: Operators whose result is random: never folded.
NONDETERMINISTIC_OPS = frozenset(
    {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}
)
#: Operators left alone so quantized weights stay quantized (folding them inflates the model).
KEEP_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})
#: Default per-tensor size limit of a folded result.
DEFAULT_SIZE_LIMIT = 64 * 2**20


class FoldConstantsPass(GraphPass):
    """Replace nodes whose inputs are all constants by initializers holding their outputs.

    Guarantee: exact. Folded values are computed by onnxruntime's CPU kernels (graph
    optimizations off), the same kernels that compute them when the model runs.

    Constants are initializers that are no graph inputs (an initializer that is also a graph
    input is a default the caller may override) and outputs of ``Constant`` nodes. A node of
    the default domain folds when all its inputs are constants or folded values, except

    * random operators (:data:`NONDETERMINISTIC_OPS`) and ``Dropout`` with a true or unknown
      ``training_mode``, nor anything downstream of them;
    * ``QuantizeLinear``/``DequantizeLinear`` (quantized weights stay quantized), operators with
      subgraphs, sequence and optional operators, and results that are not numeric tensors;
    * results larger than ``size_limit`` bytes (checked from static shapes before evaluation and
      on the result after it).

    With ``fold_shapes`` a ``Shape`` (honouring ``start``/``end``) or ``Size`` of a value whose
    shape is static is folded too. Static shapes come from ONNX shape inference run from the
    graph inputs and initializers alone (existing ``value_info`` annotations are not trusted).

    ``Constant`` nodes that feed unfoldable nodes are left as they are. A folded graph output
    keeps its name (it becomes an initializer listed as a graph output). Nodes, ``Constant``
    nodes and initializers used only by folded nodes are removed. Only the main graph is folded.
    """

    name = "fold-constants"
    exact = True
    summary = "evaluate constant subgraphs (and static Shape/Size) into initializers"

    def __init__(self, size_limit: int = DEFAULT_SIZE_LIMIT, fold_shapes: bool = True) -> None:
        super().__init__()
        if size_limit < 0:
            raise OnnxdnsError(f"fold-constants: size_limit must be >= 0 bytes, got {size_limit}")
        self.size_limit = int(size_limit)
        self.fold_shapes = fold_shapes

    def __repr__(self) -> str:
        return f"FoldConstantsPass(size_limit={self.size_limit}, fold_shapes={self.fold_shapes})"

    def call(self, model: ir.Model) -> PassReport:
        graph = model.graph
        static = _static_types(model)
        excluded: set[ir.Node] = set()
        skipped_large: list[str] = []
        while True:
            plan = _Plan(graph, excluded, static if self.fold_shapes else {})
            too_large = [v for v in plan.targets if _static_nbytes(v, static) > self.size_limit]
            if too_large:
                excluded.update(v.producer() for v in too_large)
                skipped_large.extend(v.name for v in too_large)
                continue
            if not plan.targets:
                return PassReport(model, False, {"folded_nodes": 0, "skipped_too_large": skipped_large})
            results, failed = _evaluate(model, plan)
            for value, array in results.items():
                if array.nbytes > self.size_limit:
                    failed.add(value.producer())
                    skipped_large.append(value.name)
            if not failed:
                break
            excluded.update(failed)
        names = sorted(v.name for v in results)
        removed = _apply(graph, plan, results)
        details = {"folded_nodes": removed, "shape_folds": len(plan.shape_nodes), "new_initializers": names,
                   "skipped_too_large": skipped_large}
        return PassReport(model, True, details)


class _Plan:
    """What to fold: the foldable nodes, the statically folded Shape/Size nodes, the targets."""

    def __init__(self, graph: ir.Graph, excluded: set[ir.Node], static: dict[str, tuple]) -> None:
        consts: set[ir.Value] = {
            v for v in graph.initializers.values() if not v.is_graph_input() and v.const_value is not None
        }
        self.nodes: list[ir.Node] = []  # evaluated by onnxruntime, in graph order
        self.shape_nodes: dict[ir.Node, np.ndarray] = {}  # folded from static shapes
        folded: set[ir.Node] = set()
        changed = True
        while changed:  # a fixed point, so an unsorted graph is handled too
            changed = False
            for node in graph:
                if node in folded or node in excluded:
                    continue
                inputs = [v for v in node.inputs if v is not None]
                if all(v in consts for v in inputs) and _foldable(node):
                    self.nodes.append(node)
                elif static and (shape_value := _static_shape_op(node, static)) is not None:
                    self.shape_nodes[node] = shape_value
                else:
                    continue
                folded.add(node)
                consts.update(node.outputs)
                changed = True
        self.folded = folded
        order = {node: i for i, node in enumerate(graph)}
        self.nodes.sort(key=order.__getitem__)
        self.targets: list[ir.Value] = []
        for node in sorted(folded, key=order.__getitem__):
            if node.op_type == "Constant":  # already as constant as it gets
                continue
            for out in node.outputs:
                if out.is_graph_output() or any(use.node not in folded for use in out.uses()):
                    self.targets.append(out)


def _foldable(node: ir.Node) -> bool:
    if node.domain != "" or node.op_type in NONDETERMINISTIC_OPS or node.op_type in KEEP_OPS:
        return False
    if node.op_type.startswith(("Sequence", "Optional")) or node.op_type == "SplitToSequence":
        return False
    if any(out.name in (None, "") and (out.uses() or out.is_graph_output()) for out in node.outputs):
        return False
    for attr in node.attributes.values():
        if attr.is_ref() or attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
            return False
    if node.op_type == "Dropout" and len(node.inputs) > 2 and node.inputs[2] is not None:
        flag = graphutil.const_array(node.inputs[2])
        if flag is None or flag.size != 1 or bool(flag.reshape(-1)[0]):
            return False
    return True


def _static_shape_op(node: ir.Node, static: dict[str, tuple]) -> np.ndarray | None:
    """The value of ``Shape(x)`` / ``Size(x)`` when ``x`` has a static inferred shape."""
    if node.domain != "" or node.op_type not in ("Shape", "Size") or len(node.inputs) != 1:
        return None
    x = node.inputs[0]
    if x is None or x.name not in static:
        return None
    dims = static[x.name][0]
    if node.op_type == "Size":
        return np.array(int(np.prod(dims, dtype=np.int64)), dtype=np.int64)
    rank = len(dims)
    start = graphutil.attr_int(node, "start", 0)
    end = graphutil.attr_int(node, "end", rank)
    start = min(max(start + rank if start < 0 else start, 0), rank)
    end = min(max(end + rank if end < 0 else end, 0), rank)
    return np.array(dims[start:end], dtype=np.int64)


def _static_types(model: ir.Model) -> dict[str, tuple[tuple[int, ...], int]]:
    """Static shapes and element types (by value name) inferred from the inputs and initializers."""

    try:
        inferred = infer_proto(model, strict=False, data_prop=True, trust_annotations=False)
    except Exception:  # noqa: BLE001 - inference failure only means no shape folding
        return {}
    table: dict[str, tuple[tuple[int, ...], int]] = {}
    for info in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input):
        tt = info.type.tensor_type
        if not info.type.HasField("tensor_type") or not tt.HasField("shape"):
            continue
        if all(d.HasField("dim_value") for d in tt.shape.dim):
            table[info.name] = (tuple(int(d.dim_value) for d in tt.shape.dim), int(tt.elem_type))
    return table


def _static_nbytes(value: ir.Value, static: dict[str, tuple]) -> int:
    """Size in bytes of ``value`` if its shape and type are statically known, else 0."""
    entry = static.get(value.name)
    if entry is None or entry[1] == 0:
        return 0
    dims, elem_type = entry
    itemsize = onnx.helper.tensor_dtype_to_np_dtype(elem_type).itemsize if elem_type != onnx.TensorProto.STRING else 0
    return int(np.prod(dims, dtype=np.int64)) * itemsize


def _evaluate(model: ir.Model, plan: _Plan) -> tuple[dict[ir.Value, np.ndarray], set[ir.Node]]:
    """Compute the plan's targets; nodes whose targets cannot be computed are returned as failed."""
    results: dict[ir.Value, np.ndarray] = {}
    evaluated = [v for v in plan.targets if v.producer() not in plan.shape_nodes]
    for value in plan.targets:
        if value.producer() in plan.shape_nodes:
            results[value] = plan.shape_nodes[value.producer()]
    if not evaluated:
        return results, set()
    try:
        arrays = _run(model, plan, evaluated)
    except OnnxdnsError:
        arrays = None
    failed: set[ir.Node] = set()
    if arrays is None:  # find the culprits one target at a time
        arrays = []
        for value in evaluated:
            try:
                arrays.append(_run(model, plan, [value])[0])
            except OnnxdnsError:
                arrays.append(None)
    for value, array in zip(evaluated, arrays):
        if not isinstance(array, np.ndarray) or array.dtype.kind not in "biufc":
            failed.add(value.producer())
        else:
            results[value] = array
    return results, failed


def _run(model: ir.Model, plan: _Plan, targets: list[ir.Value]) -> list:
    """Run the foldable nodes that ``targets`` depend on in a fresh onnxruntime session."""
    needed = _ancestors(plan, targets)
    nodes = [n for n in plan.nodes if n in needed]
    produced = {out for n in nodes for out in n.outputs}
    initializers: dict[str, onnx.TensorProto] = {}
    for node in nodes:
        for value in node.inputs:
            if value is None or value in produced or value.name in initializers:
                continue
            producer = value.producer()
            if producer in plan.shape_nodes:
                initializers[value.name] = numpy_helper.from_array(plan.shape_nodes[producer], value.name)
            else:
                tensor = ir.serde.serialize_tensor(value.const_value)
                tensor.name = value.name
                initializers[value.name] = tensor
    graph = onnx.helper.make_graph(
        [ir.serde.serialize_node(n) for n in nodes], "fold_constants", [],
        [onnx.ValueInfoProto(name=v.name) for v in targets], list(initializers.values()),
    )
    proto = onnx.helper.make_model(
        graph, opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in model.opset_imports.items()],
        ir_version=model.ir_version,
    )
    session = runtime.make_session(proto, threads=1, optimization="disable")
    try:
        return session.run([v.name for v in targets], {})
    except Exception as e:  # onnxruntime raises its own exception types at run time
        raise OnnxdnsError(f"fold-constants: evaluation failed: {e}") from None


def _ancestors(plan: _Plan, values: list[ir.Value]) -> set[ir.Node]:
    """The folded nodes (ONNX-evaluated or static Shape/Size) that ``values`` depend on."""
    needed: set[ir.Node] = set()
    stack = [v.producer() for v in values]
    while stack:
        node = stack.pop()
        if node is None or node in needed or node not in plan.folded:
            continue
        needed.add(node)
        stack.extend(v.producer() for v in node.inputs if v is not None)
    return needed


def _apply(graph: ir.Graph, plan: _Plan, results: dict[ir.Value, np.ndarray]) -> int:
    """Swap the targets for initializers and drop what became unused; returns nodes removed."""
    new_values: dict[ir.Value, ir.Value] = {}
    for value, array in results.items():
        array = np.require(array, requirements="C")  # not np.ascontiguousarray: it makes a 0-d array 1-d
        new = ir.Value(shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                       const_value=ir.tensor(array))
        ir.convenience.replace_all_uses_with(value, new, replace_graph_outputs=True)
        new_values[value] = new
    needed = _ancestors(plan, list(results))
    candidates = [n for n in graph if n in needed]  # dead foldable nodes elsewhere are not ours to drop
    const_inputs = {v.name for n in candidates for v in n.inputs if v is not None and graphutil.is_initializer(v)}
    removed = 0
    changed = True
    while changed:
        changed = False
        for node in list(candidates):
            if all(not out.uses() and not out.is_graph_output() for out in node.outputs):
                graph.remove(node, safe=True)
                candidates.remove(node)
                removed += 1
                changed = True
    for old, new in new_values.items():
        name = old.name
        if old.producer() is not None and old.producer().graph is graph:  # its node is still needed
            old.name = graphutil.unique_name(graph, f"{name}_unfolded")
        new.name = name
        graph.register_initializer(new)
    graphutil.remove_unused_initializers(graph, const_inputs)
    return removed
