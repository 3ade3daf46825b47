"""Model checks that ``onnx.checker`` misses, run by :func:`onnxdns.modelio.load_model`.

* every tensor stored in the model (initializers, sparse initializers, ``Constant`` values, in
  subgraphs and functions too) has a known data type and exactly the bytes its dims declare;
* every ``Conv`` with an initializer weight has a positive ``group`` that divides its output
  channels, at least one output channel, and (when the input's channel count is declared) input
  channels equal to ``group`` times the weight's.

Each violation is a one-line :class:`~onnxdns.errors.OnnxdnsError` naming the tensor or node;
without these checks onnxruntime fails later with a C++ message, or reads past the declared data.
"""

from __future__ import annotations

import math
from typing import Iterator

import onnx
from onnx import AttributeProto, TensorProto

from onnxdns.errors import OnnxdnsError

#: Bytes per element in ``raw_data`` (0.5: 4-bit types, two per byte); STRING has no raw form.
_RAW_BYTES = {
    TensorProto.FLOAT: 4, TensorProto.UINT8: 1, TensorProto.INT8: 1, TensorProto.UINT16: 2, TensorProto.INT16: 2,
    TensorProto.INT32: 4, TensorProto.INT64: 8, TensorProto.BOOL: 1, TensorProto.FLOAT16: 2, TensorProto.DOUBLE: 8,
    TensorProto.UINT32: 4, TensorProto.UINT64: 8, TensorProto.COMPLEX64: 8, TensorProto.COMPLEX128: 16,
    TensorProto.BFLOAT16: 2, TensorProto.FLOAT8E4M3FN: 1, TensorProto.FLOAT8E4M3FNUZ: 1, TensorProto.FLOAT8E5M2: 1,
    TensorProto.FLOAT8E5M2FNUZ: 1, TensorProto.UINT4: 0.5, TensorProto.INT4: 0.5,
}
#: The typed field holding each data type's values, and how many field entries one element takes
#: (0.5: 4-bit types, two per int32 entry).
_FIELDS = {
    TensorProto.FLOAT: ("float_data", 1), TensorProto.COMPLEX64: ("float_data", 2),
    TensorProto.DOUBLE: ("double_data", 1), TensorProto.COMPLEX128: ("double_data", 2),
    TensorProto.INT64: ("int64_data", 1), TensorProto.UINT32: ("uint64_data", 1), TensorProto.UINT64: ("uint64_data", 1),
    TensorProto.STRING: ("string_data", 1), TensorProto.UINT4: ("int32_data", 0.5), TensorProto.INT4: ("int32_data", 0.5),
    **{t: ("int32_data", 1) for t in (
        TensorProto.INT32, TensorProto.INT16, TensorProto.INT8, TensorProto.UINT16, TensorProto.UINT8, TensorProto.BOOL,
        TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT8E4M3FNUZ,
        TensorProto.FLOAT8E5M2, TensorProto.FLOAT8E5M2FNUZ)},
}


def stored_tensors(model: onnx.ModelProto) -> Iterator[tuple[str, TensorProto]]:
    """Every tensor stored in ``model``, with a description ("initializer 'W'", ...).

    Covers initializers, both tensors of sparse initializers, tensor attributes (``Constant``
    values...) and sparse tensor attributes, in the main graph, its subgraphs and the functions.
    """
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            yield from _node_tensors(node)


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[tuple[str, TensorProto]]:
    for t in graph.initializer:
        yield f"initializer '{t.name}'", t
    for sp in graph.sparse_initializer:
        yield f"sparse initializer '{sp.values.name}' (values)", sp.values
        yield f"sparse initializer '{sp.values.name}' (indices)", sp.indices
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node: onnx.NodeProto) -> Iterator[tuple[str, TensorProto]]:
    where = f"node '{node.name or node.op_type}'"
    for attr in node.attribute:
        if attr.HasField("t"):
            yield f"{where} attribute '{attr.name}'", attr.t
        for t in attr.tensors:
            yield f"{where} attribute '{attr.name}'", t
        sparse = ([attr.sparse_tensor] if attr.HasField("sparse_tensor") else []) + list(attr.sparse_tensors)
        for sp in sparse:
            yield f"{where} attribute '{attr.name}' (values)", sp.values
            yield f"{where} attribute '{attr.name}' (indices)", sp.indices
        if attr.type == AttributeProto.GRAPH or attr.HasField("g"):
            yield from _graph_tensors(attr.g)
        for g in attr.graphs:
            yield from _graph_tensors(g)


def raw_bytes(t: TensorProto) -> int | None:
    """Bytes of ``t``'s data in raw (or external) form, None for STRING or unknown types."""
    per = _RAW_BYTES.get(t.data_type)
    return None if per is None else math.ceil(math.prod(int(d) for d in t.dims) * per)


def check_tensor(where: str, t: TensorProto) -> None:
    """Known data type, non-negative dims, and exactly as much data as the dims declare."""
    if t.data_type not in _FIELDS:
        name = TensorProto.DataType.Name(t.data_type) if t.data_type in TensorProto.DataType.values() else t.data_type
        raise OnnxdnsError(f"{where}: unsupported or unknown data type {name}")
    if any(d < 0 for d in t.dims):
        raise OnnxdnsError(f"{where}: negative dimension in {list(t.dims)}")
    if t.data_location == TensorProto.EXTERNAL:
        return  # not loaded yet (see onnxdns.external_data); checked once it is
    count = math.prod(int(d) for d in t.dims)
    field, per = _FIELDS[t.data_type]
    if t.HasField("raw_data"):
        if t.data_type == TensorProto.STRING:
            raise OnnxdnsError(f"{where}: a STRING tensor cannot hold raw data")
        have, want, unit = len(t.raw_data), math.ceil(count * _RAW_BYTES[t.data_type]), "bytes"
    else:
        have, want, unit = len(getattr(t, field)), math.ceil(count * per), f"{field} values"
    if have != want:
        dtype = TensorProto.DataType.Name(t.data_type)
        raise OnnxdnsError(f"{where}: {dtype} dims {list(t.dims)} need {want} {unit}, the file holds {have}")


def check_conv(graph: onnx.GraphProto, known: dict[str, list[int | None]] | None = None) -> None:
    """Conv ``group`` and channel counts against the weight initializers (recursing into subgraphs)."""
    inits = {t.name: list(t.dims) for t in graph.initializer}
    inits.update({sp.values.name: list(sp.dims) for sp in graph.sparse_initializer})
    shapes = dict(known or {})
    for vi in (*graph.input, *graph.value_info):
        tt = vi.type.tensor_type
        if tt.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
    for node in graph.node:
        for attr in node.attribute:
            for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                check_conv(g, shapes)
        if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        w = inits.get(node.input[1])
        if w is None or len(w) < 3:
            continue
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        where = f"Conv '{node.name or node.output[0]}'"
        if group < 1:
            raise OnnxdnsError(f"{where}: group must be at least 1, got {group}")
        if w[0] < 1:
            raise OnnxdnsError(f"{where}: weight '{node.input[1]}' has {w[0]} output channels")
        if w[0] % group:
            raise OnnxdnsError(f"{where}: group {group} does not divide the weight's {w[0]} output channels")
        x = shapes.get(node.input[0])
        if x is not None and len(x) >= 2 and x[1] is not None and x[1] != w[1] * group:
            raise OnnxdnsError(f"{where}: input '{node.input[0]}' has {x[1]} channels, weight "
                               f"'{node.input[1]}' with group {group} expects {w[1] * group}")


def check_model(model: onnx.ModelProto) -> None:
    """Every check of this module on ``model`` (external data must be loaded already)."""
    for where, t in stored_tensors(model):
        check_tensor(where, t)
    check_conv(model.graph)
