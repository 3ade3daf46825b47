"""Model statistics: parameters, non-zeros and multiply-accumulates per layer and in total.

Counting rules (batch 1; symbolic dimensions of graph inputs are set to 1 before shape inference):

* ``Conv``: output elements x C_in/group x kernel area (``prod(W.shape[1:])``).
* ``ConvTranspose``: input elements x C_out/group x kernel area (``prod(W.shape[1:])``).
* ``Gemm`` / ``MatMul``: M x N x K, i.e. output elements x K (batched MatMul included).
* ``BatchNormalization``: its row shows one multiply-add per output element (inference form
  ``x * s + t``), but the model total leaves it out, as is usual (and as ``onnxdns.models``
  counts PyTorch models): ``fold-batchnorm`` removes it anyway.

A layer's parameters are its constant weight and bias inputs (a weight computed as
``Mul(W, mask)`` of two constants counts as the product, so masked models show their real
non-zeros). Model totals count every float tensor stored in the model: initializers (sparse
ones densified) and ``Constant`` nodes' values, except that a ``Mul`` of two stored constants
(a weight and its training mask) counts once, as its product: a masked model has as many
parameters as the dense one, and the non-zeros of ``W * mask``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Iterable

import numpy as np
import onnx
from onnx import numpy_helper

from onnxdns.errors import OnnxdnsError
from onnxdns.external_data import drop_pages, memmap
from onnxdns.modelio import sparse_to_array

#: Operators that get a row of their own in the per-layer table.
LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization")
#: Operators whose MACs make up the model total.
COUNTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")

_FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.BFLOAT16,
}


@dataclasses.dataclass(frozen=True)
class LayerStats:
    """One Conv / ConvTranspose / Gemm / MatMul / BatchNormalization node."""

    name: str
    op: str
    weight_shape: tuple[int, ...] | None
    params: int
    nonzeros: int
    #: Multiply-accumulates at batch 1; None when shapes could not be inferred.
    macs: int | None

    @property
    def density(self) -> float | None:
        return self.nonzeros / self.params if self.params else None


@dataclasses.dataclass(frozen=True)
class ModelStats:
    """Per-layer rows and model totals (see the module docstring for the counting rules)."""

    layers: tuple[LayerStats, ...]
    params: int
    nonzeros: int
    #: Sum of the known MACs of the Conv / ConvTranspose / Gemm / MatMul rows.
    macs: int
    #: False when some of those rows' MACs are unknown (shapes not inferable).
    macs_complete: bool
    nodes: int
    #: Size of the file on disk when given, else of the serialized model.
    file_bytes: int

    @property
    def density(self) -> float | None:
        return self.nonzeros / self.params if self.params else None


def model_stats(model: onnx.ModelProto, *, file_bytes: int | None = None,
                model_path: str | os.PathLike | None = None) -> ModelStats:
    """Count parameters, non-zeros, MACs and nodes of ``model`` (which is not modified).

    Tensors stored externally are memory-mapped from ``model_path``'s folder (checked as
    :mod:`onnxdns.external_data` checks them), not copied.
    """
    stored = _stored_tensors(model.graph, model_path)
    graph_inputs = {i.name for i in model.graph.input}
    constants = {name: array for name, array in stored.items() if name not in graph_inputs}
    producers = {out: node for node in model.graph.node for out in node.output if out}
    shapes = _inferred_shapes(model, model_path)
    layers = tuple(
        _layer(node, i, constants, producers, shapes)
        for i, node in enumerate(model.graph.node)
        if node.domain in ("", "ai.onnx") and node.op_type in LAYER_OPS
    )
    floats = _model_tensors(model.graph, constants, stored)
    counted = [layer for layer in layers if layer.op in COUNTED_OPS]
    known = [layer.macs for layer in counted if layer.macs is not None]
    return ModelStats(
        layers=layers,
        params=sum(int(a.size) for a in floats),
        nonzeros=sum(_count_nonzero(a) for a in floats),
        macs=int(sum(known)),
        macs_complete=len(known) == len(counted),
        nodes=len(model.graph.node),
        file_bytes=int(file_bytes if file_bytes is not None else model.ByteSize()),
    )


# --------------------------------------------------------------------------- constants


def _model_tensors(graph: onnx.GraphProto, constants: dict[str, np.ndarray],
                   stored: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The float tensors the model totals count: stored tensors, with each ``Mul`` of two stored
    float constants (weight x mask) replaced by its product when the operands are read nowhere
    else."""
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    merged: dict[str, np.ndarray] = {}
    replaced: set[str] = set()
    for node in graph.node:
        if node.op_type != "Mul" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
            continue
        a, b = node.input
        if a == b or a not in constants or b not in constants or a in replaced or b in replaced:
            continue
        x, y = constants[a], constants[b]
        if x.dtype.kind != "f" or y.dtype.kind != "f" or readers.get(a) != 1 or readers.get(b) != 1:
            continue
        try:
            product = x * y
        except ValueError:
            continue
        if product.size != max(x.size, y.size):
            continue
        merged[node.output[0]] = product
        replaced.update((a, b))
    kept = [array for name, array in stored.items() if name not in replaced and array.dtype.kind == "f"]
    return kept + list(merged.values())


def _array(tensor: onnx.TensorProto, model_path: str | os.PathLike | None) -> np.ndarray:
    """A tensor's values; external data memory-mapped from the model's folder."""
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return numpy_helper.to_array(tensor)
    if model_path is None:
        raise OnnxdnsError(f"tensor '{tensor.name}' is stored externally; its model's path is needed")
    return memmap(tensor, model_path, f"initializer '{tensor.name}'")


def _stored_tensors(graph: onnx.GraphProto, model_path: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """Every tensor stored in the graph by name: initializers (sparse ones densified) and the
    values of ``Constant`` nodes (keyed by their output)."""
    out: dict[str, np.ndarray] = {}
    for init in graph.initializer:
        out[init.name] = _array(init, model_path)
    for sp in graph.sparse_initializer:
        out[sp.values.name] = sparse_to_array(sp)
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output:
            for attr in node.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    out[node.output[0]] = numpy_helper.to_array(attr.t)
                elif attr.name == "sparse_value" and attr.type == onnx.AttributeProto.SPARSE_TENSOR:
                    out[node.output[0]] = sparse_to_array(attr.sparse_tensor)
    return out


def _effective_constant(name: str, constants: dict[str, np.ndarray], producers: dict[str, onnx.NodeProto]) -> np.ndarray | None:
    """The constant value of ``name``, looking through ``Identity`` and ``Mul`` of constants (masks)."""
    if not name:
        return None
    if name in constants:
        return constants[name]
    node = producers.get(name)
    if node is None or node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "Identity":
        return _effective_constant(node.input[0], constants, producers)
    if node.op_type == "Mul" and len(node.input) == 2:
        a = _effective_constant(node.input[0], constants, producers)
        b = _effective_constant(node.input[1], constants, producers)
        if a is not None and b is not None:
            try:
                return np.multiply(a, b)
            except ValueError:
                return None
    return None


# --------------------------------------------------------------------------- shapes


#: Float initializers larger than this are given to shape inference as typed inputs, not data.
_SHAPE_ONLY_ELEMENTS = 1024


def _inferred_shapes(model: onnx.ModelProto, model_path: str | os.PathLike | None = None
                     ) -> dict[str, tuple[int, ...] | None]:
    """Static shapes of every value after shape inference at batch 1 (None when unknown).

    Inference runs on a light copy: large float initializers become typed graph inputs (their
    values never matter for shapes), small and integer ones (shape constants) stay.
    """
    work = onnx.ModelProto()
    work.ir_version = model.ir_version
    work.opset_import.extend(model.opset_import)
    work.functions.extend(model.functions)
    graph = work.graph
    graph.name = model.graph.name
    graph.node.extend(model.graph.node)
    graph.input.extend(model.graph.input)
    graph.output.extend(model.graph.output)
    declared = {i.name for i in graph.input}
    tensors = [(t.name, t.data_type, list(t.dims), t) for t in model.graph.initializer]
    tensors += [(sp.values.name, sp.values.data_type, list(sp.dims), sp) for sp in model.graph.sparse_initializer]
    shapes: dict[str, tuple[int, ...] | None] = {}
    for name, dtype, dims, tensor in tensors:
        shapes[name] = tuple(int(d) for d in dims)
        if dtype not in _FLOAT_TYPES or _prod(dims) <= _SHAPE_ONLY_ELEMENTS:
            if isinstance(tensor, onnx.SparseTensorProto):
                tensor = numpy_helper.from_array(sparse_to_array(tensor), name)
            elif tensor.data_location == onnx.TensorProto.EXTERNAL:
                tensor = numpy_helper.from_array(np.asarray(_array(tensor, model_path)), name)
            graph.initializer.append(tensor)
        elif name not in declared:
            graph.input.append(onnx.helper.make_tensor_value_info(name, dtype, dims))
    initializer_names = {name for name, *_ in tensors}
    for inp in graph.input:
        if inp.name in initializer_names or not inp.type.HasField("tensor_type"):
            continue
        if inp.type.tensor_type.HasField("shape"):
            for dim in inp.type.tensor_type.shape.dim:
                if not dim.HasField("dim_value") or dim.dim_value <= 0:  # symbolic, or -1 (Paddle's exports)
                    dim.Clear()
                    dim.dim_value = 1
    try:
        work = onnx.shape_inference.infer_shapes(work, data_prop=True)
    except Exception:  # shape inference is best-effort here: unknown shapes give unknown MACs
        pass
    for vi in (*work.graph.input, *work.graph.value_info, *work.graph.output):
        if vi.name not in shapes:
            shapes[vi.name] = _static(vi.type)
    return shapes


def _static(tp: onnx.TypeProto) -> tuple[int, ...] | None:
    if not tp.HasField("tensor_type") or not tp.tensor_type.HasField("shape"):
        return None
    dims = []
    for d in tp.tensor_type.shape.dim:
        if not d.HasField("dim_value"):
            return None
        dims.append(int(d.dim_value))
    return tuple(dims)


# --------------------------------------------------------------------------- layers


def _layer(node: onnx.NodeProto, index: int, constants: dict[str, np.ndarray],
           producers: dict[str, onnx.NodeProto], shapes: dict[str, tuple[int, ...] | None]) -> LayerStats:
    inputs = list(node.input)

    def shape(i: int) -> tuple[int, ...] | None:
        return shapes.get(inputs[i]) if i < len(inputs) and inputs[i] else None

    def const(i: int) -> np.ndarray | None:
        return _effective_constant(inputs[i], constants, producers) if i < len(inputs) else None

    out_shape = shapes.get(node.output[0]) if node.output else None
    op = node.op_type
    macs: int | None = None
    if op in ("Conv", "ConvTranspose"):
        param_slots, weight_slot = (1, 2), 1
        weight = const(1)
        w_shape = tuple(weight.shape) if weight is not None else shape(1)
        basis = out_shape if op == "Conv" else shape(0)
        if w_shape is not None and basis is not None:
            macs = _prod(basis) * _prod(w_shape[1:])
    elif op in ("Gemm", "MatMul"):
        # The weight is whichever matrix input is constant (normally B); the bias C counts too.
        weight_slot = 1 if const(1) is not None or const(0) is None else 0
        param_slots = (0, 1, 2) if op == "Gemm" else (0, 1)
        a_shape = shape(0)
        if out_shape is not None and a_shape:
            if op == "Gemm":
                trans_a = next((a.i for a in node.attribute if a.name == "transA"), 0)
                k = a_shape[0] if trans_a else a_shape[-1]
            else:
                k = a_shape[-1]
            macs = _prod(out_shape) * k
    else:  # BatchNormalization
        param_slots, weight_slot = (1, 2, 3, 4), 1
        if out_shape is not None:
            macs = _prod(out_shape)
    params = nonzeros = 0
    for slot in param_slots:
        value = const(slot)
        if value is not None:
            params += int(value.size)
            nonzeros += _count_nonzero(value)
    weight = const(weight_slot)
    weight_shape = tuple(int(d) for d in weight.shape) if weight is not None else shape(weight_slot)
    return LayerStats(
        name=node.name or f"{op}_{index}",
        op=op,
        weight_shape=weight_shape,
        params=params,
        nonzeros=nonzeros,
        macs=macs,
    )


def _prod(dims: Iterable[int]) -> int:
    out = 1
    for d in dims:
        out *= int(d)
    return out



def _count_nonzero(array: np.ndarray) -> int:
    """Non-zeros of ``array``; a memory-mapped one is read 16 MiB at a time, each part leaving
    the resident set once counted (the process never holds the whole weight)."""
    if getattr(array, "_mmap", None) is None:
        return int(np.count_nonzero(array))
    flat = array.reshape(-1)
    step = max(1, (16 << 20) // max(1, flat.itemsize))
    count = 0
    for i in range(0, flat.size, step):
        count += int(np.count_nonzero(flat[i:i + step]))
        drop_pages(array)
    return count
