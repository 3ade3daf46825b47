"""Shared helpers for the graph-pass tests: tiny models, onnxruntime comparisons, call styles."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnx_ir as ir
from onnx import helper, numpy_helper

from onnxdns import modelio, runtime

FLOAT = onnx.TensorProto.FLOAT


def make_model(nodes, inputs, outputs, initializers=(), *, opset: int = 17, value_info=()) -> onnx.ModelProto:
    """A model from node/value-info/initializer protos (IR 8, default domain ``opset``)."""
    graph = helper.make_graph(list(nodes), "g", list(inputs), list(outputs), list(initializers),
                              value_info=list(value_info))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def tensor_input(name: str, shape, dtype: int = FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def feeds_for(model: onnx.ModelProto, batch: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    return runtime.input_feeds(model, batch=batch, seed=seed)


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """onnxruntime outputs with graph optimizations off (so the runtime does not fold for us)."""
    return runtime.run(model, feeds, optimization="disable", threads=1)


def max_diff(before: onnx.ModelProto, after: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> tuple[float, float]:
    """(max abs output difference, output scale max |before|) over every output."""
    ref, out = run(before, feeds), run(after, feeds)
    assert [r.shape for r in ref] == [o.shape for o in out]
    diff = max((float(np.max(np.abs(r.astype(np.float64) - o.astype(np.float64)))) if r.size else 0.0)
               for r, o in zip(ref, out))
    scale = max((float(np.max(np.abs(r))) if r.size else 0.0) for r in ref)
    return diff, scale


def assert_exact(before: onnx.ModelProto, after: onnx.ModelProto, *, rel: float = 1e-5, batch: int = 2,
                 feeds: dict[str, np.ndarray] | None = None) -> float:
    """Outputs agree to ``rel`` x max(1, output scale); the output names are the same."""
    assert [o.name for o in before.graph.output] == [o.name for o in after.graph.output]
    feeds = feeds_for(before, batch) if feeds is None else feeds
    diff, scale = max_diff(before, after, feeds)
    assert diff <= rel * max(1.0, scale), f"max abs diff {diff:.3g} > {rel:g} x max(1, {scale:.3g})"
    return diff


def roundtrip(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model as it comes out of a pass that changes nothing (onnx-ir serialization)."""
    return modelio.to_proto(modelio.to_ir(model))


def same_bytes(a: onnx.ModelProto, b: onnx.ModelProto) -> bool:
    return a.SerializeToString(deterministic=True) == b.SerializeToString(deterministic=True)


def op_types(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def initializer_arrays(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def check_idempotent(pass_cls, model: onnx.ModelProto, **options) -> onnx.ModelProto:
    """Run twice: the second run reports ``modified=False`` and gives the same bytes."""
    first = pass_cls(**options).apply(model)
    second = pass_cls(**options).apply(first.model)
    assert not second.modified, f"{pass_cls.name}: second run modified the model: {second.details}"
    assert same_bytes(first.model, second.model)
    return first.model


def all_call_styles(pass_cls, model: onnx.ModelProto, **options) -> list[tuple[str, onnx.ModelProto, bool | None]]:
    """The pass applied to a ModelProto, a gs.Graph and inside a PassManager, each as a ModelProto.

    Each style gets its own copy: ``gs.export_onnx`` writes into tensors that ``gs.import_onnx``
    shares with the proto it came from (a Constant's tensor gains ``name: ""``).
    """
    original = model.SerializeToString()
    out_proto = pass_cls(**options)(model)
    assert model.SerializeToString() == original, "the input ModelProto was modified"
    applied = pass_cls(**options).apply(copy(model))
    graph_out = pass_cls(**options)(gs.import_onnx(copy(model)))
    assert isinstance(graph_out, gs.Graph)
    ir_model = modelio.to_ir(copy(model))
    result = ir.passes.PassManager([pass_cls(**options)])(ir_model)
    assert result.model is ir_model
    return [
        ("proto", out_proto, applied.modified),
        ("gs", gs.export_onnx(graph_out), None),
        ("pass-manager", modelio.to_proto(result.model), result.modified),
    ]


def copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out
