"""Small onnx-ir helpers shared by the passes: constants, initializers, uses."""

from __future__ import annotations

from typing import Iterable

import numpy as np
import onnx_ir as ir


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The constant behind ``value`` (an initializer or a ``Constant`` node's output), or None.

    Graph inputs are never constant, even when an initializer of the same name gives a default.
    """
    if value is None:
        return None
    if value.is_graph_input():
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    node = value.producer()
    if node is not None and node.op_type == "Constant" and node.domain == "" and "value" in node.attributes:
        return node.attributes["value"].as_tensor().numpy()
    return None


def is_initializer(value: ir.Value | None) -> bool:
    return value is not None and value.is_initializer() and not value.is_graph_input()


def add_initializer(graph: ir.Graph, array: np.ndarray, name: str) -> ir.Value:
    """Register ``array`` as a new initializer with a unique name derived from ``name``."""
    unique = unique_name(graph, name)
    value = ir.Value(name=unique, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=ir.tensor(array, name=unique))
    graph.register_initializer(value)
    return value


def unique_name(graph: ir.Graph, base: str) -> str:
    taken = set(graph.initializers)
    taken.update(v.name for v in graph.inputs)
    for node in graph:
        taken.update(o.name for o in node.outputs if o.name)
    if base not in taken:
        return base
    i = 1
    while f"{base}_{i}" in taken:
        i += 1
    return f"{base}_{i}"


def fresh_name(base: str, taken: set[str]) -> str:
    """``base``, or ``base_1``, ``base_2``, ... if taken; the result is added to ``taken``."""
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    taken.add(name)
    return name


def bypass(graph: ir.Graph, node: ir.Node, replacement: ir.Value) -> None:
    """Remove ``node`` (one output) and route its users to ``replacement``, which takes over the
    output's name, shape and type (so graph outputs keep their names)."""
    old = node.outputs[0]
    name, shape, typ = old.name, old.shape, old.type
    ir.convenience.replace_all_uses_with(old, replacement, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    replacement.name = name
    if shape is not None:
        replacement.shape = shape
    if typ is not None:
        replacement.type = typ


def set_input_constant(graph: ir.Graph, node: ir.Node, index: int, array: np.ndarray, name: str | None = None) -> ir.Value:
    """Make ``node.inputs[index]`` the constant ``array``.

    An initializer used only here is updated in place; one shared with other nodes (or a graph
    output) is left alone and a new initializer is created for this node.
    """
    old = node.inputs[index] if index < len(node.inputs) else None
    if old is not None and is_initializer(old) and only_user(old, node, index):
        old.const_value = ir.tensor(array.astype(array.dtype, copy=False), name=old.name)
        old.shape = ir.Shape(array.shape)
        old.type = ir.TensorType(ir.DataType.from_numpy(array.dtype))
        return old
    base = name or (old.name if old is not None and old.name else f"{node.name or node.op_type}_in{index}")
    new = add_initializer(graph, array, base)
    if index >= len(node.inputs):
        node.resize_inputs(index + 1)
    node.replace_input_with(index, new)
    return new


def only_user(value: ir.Value, node: ir.Node, index: int | None = None) -> bool:
    """True when ``node`` (at ``index`` if given) is the only use of ``value`` and it is no graph output."""
    if value.is_graph_output():
        return False
    uses = list(value.uses())
    return all(u.node is node and (index is None or u.idx == index) for u in uses)


def remove_unused_initializers(graph: ir.Graph, names: Iterable[str] | None = None) -> list[str]:
    """Drop initializers that nothing uses (restricted to ``names`` when given)."""
    removed = []
    candidates = list(graph.initializers) if names is None else [n for n in names if n in graph.initializers]
    for name in candidates:
        value = graph.initializers[name]
        if not value.uses() and not value.is_graph_output() and not value.is_graph_input():
            graph.initializers.pop(name)
            removed.append(name)
    return removed


def attr_int(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_int()


def attr_ints(node: ir.Node, name: str, default: list[int] | None = None) -> list[int] | None:
    attr = node.attributes.get(name)
    return default if attr is None else list(attr.as_ints())


def attr_float(node: ir.Node, name: str, default: float) -> float:
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_float()


def static_shape(value: ir.Value | None) -> tuple[int, ...] | None:
    """The value's shape if every dimension is a known integer, else None."""
    if value is None or value.shape is None:
        return None
    dims = []
    for d in value.shape:
        if not isinstance(d, int):
            return None
        dims.append(d)
    return tuple(dims)


def inferred_shapes(model: ir.Model) -> dict[str, tuple[int | None, ...]]:
    """Shapes of every value, from ONNX shape inference on a serialized copy without the large
    weights' data (model untouched; see :func:`onnxdns.modelio.shape_proto`).

    Symbolic or unknown dimensions are ``None``. Values whose rank is unknown are absent.
    """
    import onnx

    from onnxdns import modelio

    proto = modelio.shape_proto(model)
    try:
        proto = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception:  # inference failures leave what the model already declares  # noqa: BLE001
        pass
    shapes: dict[str, tuple[int | None, ...]] = {}
    graph = proto.graph
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        t = vi.type.tensor_type
        if not t.HasField("shape"):
            continue
        shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)
    for init in graph.initializer:
        shapes[init.name] = tuple(init.dims)
    return shapes
