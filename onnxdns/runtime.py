"""onnxruntime sessions: the single place that creates them, so providers and threads are uniform."""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np
import onnx

from onnxdns.errors import OnnxdnsError
from onnxdns.extras import optional_import

# Any onnxruntime flavour (onnxdns[cpu], [cuda] or [train]); without one, the passes still import
# and running a model says which extra to install.
ort = optional_import("onnxruntime", "runtime", "running models")


def available_providers() -> list[str]:
    return list(ort.get_available_providers())


def has_cuda() -> bool:
    return "CUDAExecutionProvider" in available_providers()


def make_session(
    model: onnx.ModelProto | str | os.PathLike | bytes,
    *,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    threads: int = 0,
    optimization: str = "all",
    spinning: bool = True,
) -> ort.InferenceSession:
    """An ``InferenceSession`` for a model proto, serialized bytes or a path.

    ``threads=0`` lets onnxruntime pick (all cores); ``optimization`` is one of
    ``disable|basic|extended|all``. ``spinning=False`` makes the intra-op pool's threads sleep
    instead of spin-waiting for work after a run (needed when several sessions run in turn, see
    :func:`onnxdns.validate.measure_latency`).
    """
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    so.log_severity_level = 4  # fatal only: errors reach the caller as exceptions, in one line
    if isinstance(model, onnx.ModelProto):
        payload: bytes | str = model.SerializeToString()
    elif isinstance(model, bytes):
        payload = model
    else:
        payload = str(model)
        try:
            payload.encode("utf-8")
        except UnicodeEncodeError:  # a file name that is not UTF-8: onnxruntime takes str paths only
            with open(model, "rb") as fh:
                payload = fh.read()
    try:
        return ort.InferenceSession(payload, sess_options=so, providers=list(providers))
    except Exception as e:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
        msg = str(e).strip().splitlines()
        raise OnnxdnsError(f"onnxruntime cannot load the model: {msg[0] if msg else type(e).__name__}") from None


def run(model, feeds: Mapping[str, np.ndarray], **session_kwargs) -> list[np.ndarray]:
    """Run ``model`` once on ``feeds`` and return every output."""
    sess = model if isinstance(model, ort.InferenceSession) else make_session(model, **session_kwargs)
    return sess.run(None, dict(feeds))


_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int16)": np.int16,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def numpy_dtype(ort_type: str) -> np.dtype | None:
    """The numpy dtype of an onnxruntime type string (``"tensor(int64)"``), None when unsupported."""
    t = _ORT_TYPES.get(ort_type)
    return None if t is None else np.dtype(t)


def input_feeds(model: onnx.ModelProto | ort.InferenceSession, batch: int = 1, seed: int = 0, *,
                plan: Any = None) -> dict[str, np.ndarray]:
    """Random feeds for every graph input, shaped as :func:`onnxdns.inputs.plan_inputs` decides
    (batch dimensions become ``batch``; other dynamic dimensions get a size the model's hints
    allow); ``plan`` (an :class:`onnxdns.inputs.InputPlan`) gives them ready-made."""
    from onnxdns.inputs import plan_inputs

    plan = plan or plan_inputs(model, batch=batch)
    return plan.feeds(seed, batch=batch if plan.has_batch else None)


def ort_message(e: BaseException) -> str:
    """onnxruntime's whole message on one line (its messages name the node and the shapes)."""
    return " ".join(str(e).split()) or type(e).__name__
