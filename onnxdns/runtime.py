"""onnxruntime sessions: the single place that creates them, so providers and threads are uniform."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
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
    initializers: Mapping[str, np.ndarray] | None = None,
) -> ort.InferenceSession:
    """An ``InferenceSession`` for a model proto, serialized bytes or a path.

    ``threads=0`` lets onnxruntime pick (all cores); ``optimization`` is one of
    ``disable|basic|extended|all``. ``spinning=False`` makes the intra-op pool's threads sleep
    instead of spin-waiting for work after a run (needed when several sessions run in turn, see
    :func:`onnxdns.validate.measure_latency`). ``initializers`` replace the model's initializers
    of the same names by these arrays, which onnxruntime uses in place (see :func:`mapped_session`).
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
    if initializers or not isinstance(model, (onnx.ModelProto, bytes)) and _stored_bytes(model) >= NO_PREPACK_BYTES:
        # prepacked copies of the Gemm/MatMul weights would add ~the model's size again per
        # session, and an arena would keep each session's largest activations after its runs
        so.add_session_config_entry("session.disable_prepacking", "1")
        so.enable_cpu_mem_arena = False
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
    values = [ort.OrtValue.ortvalue_from_numpy(a) for a in (initializers or {}).values()]
    for name, value in zip(initializers or {}, values):
        so.add_initializer(name, value)
    try:
        session = ort.InferenceSession(payload, sess_options=so, providers=list(providers))
        session._onnxdns_initializers = (dict(initializers or {}), values)  # must outlive the session
        return session
    except Exception as e:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
        msg = str(e).strip().splitlines()
        raise OnnxdnsError(f"onnxruntime cannot load the model: {msg[0] if msg else type(e).__name__}") from None


#: Models of at least this many bytes on disk (file and data files) get sessions without weight
#: prepacking and without a memory arena (VGG-16, 553 MB: a session takes 1,077 MB with
#: prepacking, 567 MB without).
NO_PREPACK_BYTES = 256 * 2**20


def _stored_bytes(path: str | os.PathLike) -> int:
    """Bytes of the model file and the files beside it named after it (``<name>.data``)."""
    try:
        size = os.path.getsize(path)
        data = f"{path}.data"
        return size + (os.path.getsize(data) if os.path.exists(data) else 0)
    except OSError:
        return 0


#: Data types :func:`mapped_session` hands to onnxruntime as mapped arrays.
_MAPPED_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.INT8,
                 onnx.TensorProto.UINT8, onnx.TensorProto.INT32, onnx.TensorProto.INT64, onnx.TensorProto.BOOL}


def mapped_session(path: str | os.PathLike, share_with: ort.InferenceSession | None = None,
                   **options) -> ort.InferenceSession:
    """A session of the model at ``path`` whose external and large initializers are the
    memory-mapped bytes of their files, given to onnxruntime without a copy. With ``share_with``
    (another mapped session), initializers whose bytes equal that session's (checked) use its
    arrays, so both sessions hold one copy of the weights they share. For models too large for a
    session per copy of the weights (see :data:`NO_PREPACK_BYTES`); ``options`` go to
    :func:`make_session`.
    """
    shared = getattr(share_with, "_onnxdns_initializers", ({}, []))[0]
    return _mapped_session(path, shared, **options)


def _mapped_session(path, shared: Mapping[str, np.ndarray], **options) -> ort.InferenceSession:
    from onnxdns import modelio
    from onnxdns.external_data import memmap

    # large and external initializers stay references to their files; other external data is read
    proto, _ = modelio.load_unread(path, check=False)
    arrays: dict[str, np.ndarray] = {}
    for tensor in proto.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        if tensor.data_type not in _MAPPED_TYPES:
            return make_session(path, **options)
        array = memmap(tensor, path, f"initializer {tensor.name}")
        other = shared.get(tensor.name)
        arrays[tensor.name] = other if other is not None and _same_bytes(array, other) else array
        del array  # unmapped unless kept: the comparison's pages leave the resident set
    # onnxruntime's graph optimizers may still read an initializer's own data (and need the
    # model's folder to find it): the session is made from a file beside the model
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{Path(path).name}.", suffix=".session.onnx", dir=Path(path).parent)
    except OSError:  # a read-only folder: an ordinary session
        return make_session(path, **options)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(proto.SerializeToString())
        return make_session(tmp, initializers=arrays, **options)
    finally:
        os.unlink(tmp)


def _same_bytes(a: np.ndarray, b: np.ndarray, chunk: int = 16 * 2**20) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    from onnxdns.external_data import drop_pages

    x, y = a.reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8)
    for i in range(0, x.size, chunk):
        if not np.array_equal(x[i:i + chunk], y[i:i + chunk]):
            return False
        drop_pages(a)  # only one of the two files' pages needs to stay resident
        drop_pages(b)
    return True


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
