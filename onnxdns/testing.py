"""Helpers for tests and benchmarks: export small torch modules, compare models with onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx

from onnxdns import runtime


def export_module(module, input_shape: tuple[int, ...], *, opset: int = 17) -> onnx.ModelProto:
    """Export an eval-mode copy of a torch module to an in-memory ONNX model (see
    :func:`onnxdns.models.export.export_proto`: BatchNorm kept, no shared initializers)."""
    from onnxdns.models.export import export_proto

    return export_proto(module, tuple(input_shape), opset)


def output_difference(a: onnx.ModelProto, b: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> tuple[float, float]:
    """(max abs difference over all outputs, output scale = max |a|) on ``feeds``."""
    out_a = runtime.run(a, feeds)
    out_b = runtime.run(b, feeds)
    diff = max(float(np.max(np.abs(x - y))) if x.size else 0.0 for x, y in zip(out_a, out_b))
    scale = max(float(np.max(np.abs(x))) if x.size else 0.0 for x in out_a)
    return diff, scale


def assert_exact(a: onnx.ModelProto, b: onnx.ModelProto, *, batch: int = 4, rel: float = 1e-5, seed: int = 0) -> float:
    """Assert onnxruntime outputs of ``a`` and ``b`` agree within ``rel`` x max(1, output scale)."""
    feeds = runtime.input_feeds(a, batch=batch, seed=seed)
    diff, scale = output_difference(a, b, feeds)
    assert diff <= rel * max(1.0, scale), f"max abs diff {diff:.3g} > {rel:g} x max(1, {scale:.3g})"
    return diff


def export_folded(module, input_shape: tuple[int, ...], *, opset: int = 17) -> onnx.ModelProto:
    """Export an eval-mode torch module the usual way (``torch.onnx.export`` in eval mode with
    constant folding: every BatchNorm after a conv folded into it), one input ``input`` and one
    output ``logits`` with a dynamic batch; the module's mode is restored."""
    import io
    import warnings

    import torch

    was_training = module.training
    module.eval()
    buffer = io.BytesIO()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0)),),
                              buffer, dynamo=False, opset_version=opset, do_constant_folding=True,
                              input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    finally:
        module.train(was_training)
    return onnx.load_from_string(buffer.getvalue())
