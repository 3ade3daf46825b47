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

    An ``If`` of the main graph whose condition is (or folds to) a constant is replaced by the
    nodes of the branch it takes, which then fold like the others (onnxruntime inlines such a
    branch itself when it loads the model, and its shape inference may then reject what was
    valid inside the branch; see :func:`_inline_constant_ifs`). Folded values keep their shape,
    0-d included.

    ``Constant`` nodes that feed unfoldable nodes are left as they are. A folded graph output
    keeps its name (it becomes an initializer listed as a graph output). Nodes, ``Constant``
    nodes and initializers used only by folded nodes are removed. Only the main graph is folded.
    """

    name = "fold-constants"
    exact = True
    summary = "evaluate constant subgraphs (and static Shape/Size) into initializers, inline constant Ifs"

    def __init__(self, size_limit: int = DEFAULT_SIZE_LIMIT, fold_shapes: bool = True) -> None:
        super().__init__()
        if size_limit < 0:
            raise OnnxdnsError(f"fold-constants: size_limit must be >= 0 bytes, got {size_limit}")
        self.size_limit = int(size_limit)
        self.fold_shapes = fold_shapes

    def __repr__(self) -> str:
        return f"FoldConstantsPass(size_limit={self.size_limit}, fold_shapes={self.fold_shapes})"

    def call(self, model: ir.Model) -> PassReport:
        totals = {"folded_nodes": 0, "shape_folds": 0, "new_initializers": [], "skipped_too_large": [],
                  "inlined_ifs": []}
        while True:
            details = self._fold(model)
            for key, value in details.items():
                totals[key] += value
            inlined = _inline_constant_ifs(model.graph)
            if not inlined:
                break
            totals["inlined_ifs"] += inlined
        totals["new_initializers"] = sorted(set(totals["new_initializers"]))
        modified = bool(totals["folded_nodes"] or totals["new_initializers"] or totals["inlined_ifs"])
        return PassReport(model, modified, totals)

    def _fold(self, model: ir.Model) -> dict:
        """One round of folding (what the pass did before If nodes were inlined)."""
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
                return {"skipped_too_large": skipped_large}
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
        return {"folded_nodes": removed, "shape_folds": len(plan.shape_nodes), "new_initializers": names,
                "skipped_too_large": skipped_large}


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
            arrays.append(_run_one(model, plan, value))
    for value, array in zip(evaluated, arrays):
        if not isinstance(array, np.ndarray) or array.dtype.kind not in "biufc":
            failed.add(value.producer())
        else:
            results[value] = array
    return results, failed


def _run_one(model: ir.Model, plan: _Plan, value: ir.Value) -> np.ndarray | None:
    """``value`` computed alone, or None.

    When the constants given as initializers fail, they are fed as inputs instead: onnxruntime's
    shape inference checks some operators' constant inputs more strictly than their kernels do
    (Range takes a 1-element 1-D limit at run time, but rejects it as an initializer).
    """
    for feed in (False, True):
        try:
            return _run(model, plan, [value], feed=feed)[0]
        except OnnxdnsError:
            continue
    return None


def _run(model: ir.Model, plan: _Plan, targets: list[ir.Value], feed: bool = False) -> list:
    """Run the foldable nodes that ``targets`` depend on in a fresh onnxruntime session; the
    constants they read are initializers, or with ``feed`` inputs (those numpy can hold)."""
    needed = _ancestors(plan, targets)
    nodes = [n for n in plan.nodes if n in needed]
    produced = {out for n in nodes for out in n.outputs}
    initializers: dict[str, onnx.TensorProto] = {}
    feeds: dict[str, np.ndarray] = {}
    for node in nodes:
        for value in node.inputs:
            if value is None or value in produced or value.name in initializers or value.name in feeds:
                continue
            producer = value.producer()
            if producer in plan.shape_nodes:
                tensor = numpy_helper.from_array(plan.shape_nodes[producer], value.name)
            else:
                const = value.const_value
                if isinstance(const, ir.ExternalTensor):  # memory-mapped: the session gets the data
                    const = ir.Tensor(const.numpy(), dtype=const.dtype)
                tensor = ir.serde.serialize_tensor(const)
                tensor.name = value.name
            array = numpy_helper.to_array(tensor) if feed else None
            if array is not None and array.dtype.kind in "biuf" and _tensor_type(array.dtype) == tensor.data_type:
                feeds[value.name] = array
            else:
                initializers[value.name] = tensor
    inputs = [onnx.helper.make_tensor_value_info(name, onnx.helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
              for name, a in feeds.items()]
    graph = onnx.helper.make_graph(
        [ir.serde.serialize_node(n) for n in nodes], "fold_constants", inputs,
        [onnx.ValueInfoProto(name=v.name) for v in targets], list(initializers.values()),
    )
    proto = onnx.helper.make_model(
        graph, opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in model.opset_imports.items()],
        ir_version=model.ir_version,
    )
    session = runtime.make_session(proto, threads=1, optimization="disable")
    try:
        return session.run([v.name for v in targets], feeds)
    except Exception as e:  # onnxruntime raises its own exception types at run time
        raise OnnxdnsError(f"fold-constants: evaluation failed: {e}") from None


def _tensor_type(dtype: np.dtype) -> int | None:
    try:
        return onnx.helper.np_dtype_to_tensor_dtype(dtype)
    except (KeyError, ValueError, TypeError):
        return None


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


# --------------------------------------------------------------------------- If with a constant condition


def _inline_constant_ifs(graph: ir.Graph) -> list[str]:
    """Replace each main-graph ``If`` whose condition is a constant by the nodes of the branch it
    takes; returns the names of the inlined If nodes' first outputs.

    onnxruntime inlines such a branch itself when it loads the model, after which its shape
    inference sees constants it never saw inside the branch, and may reject the model (the
    AffineGrid function body feeds Range a 1-element 1-D tensor from its 2-D branch: fine while
    the branch is a subgraph, "Input to 'Range' op should be scalars" once inlined and folded).
    Inlined here, the branch's constant parts fold like any others, with the same kernels.
    """
    inlined = []
    for node in list(graph):
        if node.domain != "" or node.op_type != "If" or not node.inputs:
            continue
        cond = graphutil.const_array(node.inputs[0])
        if cond is None or cond.size != 1 or cond.dtype != np.bool_:
            continue
        attr = node.attributes.get("then_branch" if bool(cond.reshape(-1)[0]) else "else_branch")
        if attr is None or attr.type != ir.AttributeType.GRAPH or len(attr.as_graph().outputs) != len(node.outputs):
            continue
        inlined.append(node.outputs[0].name if node.outputs else node.name)
        _inline_branch(graph, node, attr.as_graph())
    return inlined


def _inline_branch(graph: ir.Graph, node: ir.Node, branch: ir.Graph) -> None:
    """Move ``branch``'s nodes and initializers before ``node`` in ``graph``, make the If's
    outputs the branch's, drop the If and its other branch. Graph output names are kept."""
    taken = _all_names(graph, skip=branch)
    results = list(branch.outputs)
    branch.outputs.clear()  # they are no subgraph outputs any more
    for name in list(branch.initializers):
        value = branch.initializers.pop(name)
        value.name = graphutil.fresh_name(name, taken)
        graph.register_initializer(value)
    moved = list(branch)
    branch.remove(moved)  # not safe=True: the nodes keep their inputs
    for n in moved:
        for out in n.outputs:
            if out.name:
                out.name = graphutil.fresh_name(out.name, taken)
    graph.insert_before(node, moved)
    renames: list[tuple[ir.Value, str]] = []
    for if_out, value in zip(node.outputs, results):
        if value.type is None:
            value.type = if_out.type
        if value.shape is None and if_out.shape is not None:
            value.shape = if_out.shape
        if if_out.is_graph_output():
            if value.producer() not in moved or value.is_graph_output() or value in (v for v, _ in renames):
                copy = ir.Node("", "Identity", [value], num_outputs=1)  # a graph output needs its own value
                graph.insert_before(node, copy)
                copy.outputs[0].type, copy.outputs[0].shape = value.type, value.shape
                value = copy.outputs[0]
            renames.append((value, if_out.name))
        ir.convenience.replace_all_uses_with(if_out, value, replace_graph_outputs=True)
    for attr in node.attributes.values():  # the branch not taken must stop using outer values
        if attr.type == ir.AttributeType.GRAPH and attr.as_graph() is not branch:
            for inner in ir.traversal.RecursiveGraphIterator(attr.as_graph()):
                for i in range(len(inner.inputs)):
                    inner.replace_input_with(i, None)
    graph.remove(node, safe=True)
    for value, name in renames:
        value.name = name


def _all_names(graph: ir.Graph, skip: ir.Graph) -> set[str]:
    """Every value name of ``graph`` and its subgraphs except those ``skip`` itself defines (the
    names a value moved out of ``skip`` must not take)."""
    names = {v.name for v in graph.inputs} | set(graph.initializers)
    for node in ir.traversal.RecursiveGraphIterator(graph):
        for attr in node.attributes.values():
            subgraphs = [attr.as_graph()] if attr.type == ir.AttributeType.GRAPH else (
                list(attr.as_graphs()) if attr.type == ir.AttributeType.GRAPHS else [])
            for g in subgraphs:
                if g is skip:
                    continue
                names.update(v.name for v in g.inputs)
                names.update(g.initializers)
        if node.graph is not skip:
            names.update(v.name for v in node.outputs if v.name)
    return names
