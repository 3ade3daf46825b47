"""Per-channel constants: the value a channel takes whatever the model input is.

A channel is *constant* when it is the same number at every position of the tensor for every
input (a Conv output channel whose filter is all zero equals its bias). Constants are carried as
float arrays with one entry per channel and ``NaN`` for channels that are not constant.

Elementwise ops are evaluated with onnxruntime itself on a ``[1, C, 1, ...]`` tensor, so folded
constants follow the runtime's exact semantics for every op and attribute.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from onnxdns import runtime
from onnxdns.extras import MissingExtraError


def unknown(n: int) -> np.ndarray:
    return np.full(n, np.nan)


def evaluate_node(
    node: ir.Node,
    inputs: list[tuple[np.ndarray, int, int] | np.ndarray | None],
    out_axis: int,
    out_rank: int,
    opset: int,
) -> np.ndarray | None:
    """Evaluate one elementwise ``node`` on per-channel constants.

    ``inputs[i]`` is ``(values_per_channel, axis, rank)`` for a tracked tensor, a numpy array for
    a constant operand, or None for an absent optional input. Returns the output's per-channel
    constants (NaN where a tracked input is NaN or the result is not uniform along the other
    axes), or None when onnxruntime cannot evaluate the node on this input.
    """
    graph_inputs, initializers, feeds, names, nan_masks = [], [], {}, [], []
    for i, inp in enumerate(inputs):
        if inp is None:
            names.append("")
            continue
        name = f"in{i}"
        names.append(name)
        if isinstance(inp, tuple):
            values, axis, rank = inp
            shape = [1] * rank
            shape[axis] = len(values)
            feeds[name] = np.nan_to_num(values, nan=0.0).astype(np.float32).reshape(shape)
            graph_inputs.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, shape))
            nan_masks.append(np.isnan(values))
        else:
            initializers.append(onnx.numpy_helper.from_array(np.asarray(inp), name))
    proto_node = ir.serde.serialize_node(node)
    del proto_node.input[:]
    proto_node.input.extend(names)
    del proto_node.output[:]
    proto_node.output.extend(["out"] + [f"unused{i}" for i in range(1, len(node.outputs))])
    graph = onnx.helper.make_graph(
        [proto_node],
        "channel_constants",
        graph_inputs,
        [onnx.helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, None)],
        initializers,
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)], ir_version=8)
    try:
        (out, *_) = runtime.run(model, feeds, optimization="disable")
    except MissingExtraError:
        raise
    except Exception:  # an op/attribute combination onnxruntime rejects on this input  # noqa: BLE001
        return None
    out = np.asarray(out, dtype=np.float64)
    if out.ndim != out_rank:
        return None
    moved = np.moveaxis(out, out_axis, 0).reshape(out.shape[out_axis], -1)
    result = moved[:, 0].copy()
    result[~np.all(moved == moved[:, :1], axis=1)] = np.nan
    for mask in nan_masks:  # a channel is constant only where every tracked input is
        result[np.broadcast_to(mask, result.shape)] = np.nan
    return result
