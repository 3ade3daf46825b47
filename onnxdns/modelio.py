"""Loading, checking and atomically saving ONNX models, and the ONNX <-> onnx-ir bridge.

Every model that enters onnxdns goes through :func:`load_model`, which turns the usual user
mistakes (missing or truncated file, not ONNX, too new for this stack, unknown operators) into a
one-line :class:`~onnxdns.errors.OnnxdnsError`. Every model that leaves goes through
:func:`save_model`, which never overwrites the input and writes atomically.

onnx-ir has no sparse tensors, so :func:`to_ir` densifies ``sparse_initializer`` entries and tags
them, and :func:`to_proto` stores tagged initializers sparsely again (see the ``sparse-storage``
pass).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import logging
import os
import re
import stat
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from onnxdns import modelcheck
from onnxdns.errors import OnnxdnsError, UnsupportedModelError
from onnxdns.external_data import load_external_data

logger = logging.getLogger(__name__)

#: Highest IR version and default-domain opset each onnxruntime release loads, from the release on:
#: measured by loading an Identity model with every IR version and opset into the released wheel
#: (1.17.3, 1.18.1, 1.19.2, 1.20.1, 1.21.1, 1.22.1, 1.23.2, 1.24.4, 1.26.0, 1.28.0, 1.30.0,
#: 1.31.1, 1.32.0; see docs/stack.md). A release between two rows gets the lower row.
RUNTIME_LIMITS = (
    ((1, 17), 9, 20),
    ((1, 18), 10, 21),
    ((1, 21), 10, 22),
    ((1, 23), 11, 23),
    ((1, 24), 13, 25),
    ((1, 26), 13, 26),
    ((1, 32), 14, 28),
)
#: Operator domains whose operators onnxruntime implements (beyond the standard schemas).
RUNTIME_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft", "ai.onnx.preview.training"}
#: Initializer tag (in ``ir.Value.meta``) asking :func:`to_proto` for sparse storage.
SPARSE_TAG = "onnxdns.storage"


def opset_version(model: onnx.ModelProto | ir.Model, domain: str = "") -> int:
    """The model's opset version for ``domain`` (0 when it imports none)."""
    if isinstance(model, ir.Model):
        return int(model.opset_imports.get(domain, 0))
    for imp in model.opset_import:
        if imp.domain in (domain, "ai.onnx" if domain == "" else domain):
            return int(imp.version)
    return 0


@functools.lru_cache(maxsize=1)
def runtime_limits() -> tuple[int, int, str]:
    """(max IR version, max default-domain opset, what sets them) for the installed stack.

    The installed onnxruntime flavour's row of :data:`RUNTIME_LIMITS`, capped by what the
    installed onnx package knows (its checker rejects newer models); onnx alone when no
    onnxruntime is installed. Reads distribution metadata only: onnxruntime is not imported.
    """
    onnx_ir, onnx_opset = onnx.IR_VERSION, onnx.defs.onnx_opset_version()
    dists = sorted(set(importlib.metadata.packages_distributions().get("onnxruntime", [])))
    if len(dists) > 1:
        logger.warning("several distributions install the onnxruntime module (%s): they overwrite each other's "
                       "files; uninstall all but one", ", ".join(dists))
    if not dists:
        return onnx_ir, onnx_opset, f"onnx {onnx.__version__}"
    version = importlib.metadata.version(dists[0])
    key = tuple(int(part) for part in re.findall(r"\d+", version)[:2])
    row = RUNTIME_LIMITS[0]
    for candidate in RUNTIME_LIMITS:
        if candidate[0] <= key:
            row = candidate
    what = f"{dists[0]} {version}"
    return min(row[1], onnx_ir), min(row[2], onnx_opset), what


def __getattr__(name: str) -> int:
    """``MAX_IR_VERSION`` and ``MAX_OPSET``: the installed stack's limits (see :func:`runtime_limits`)."""
    if name == "MAX_IR_VERSION":
        return runtime_limits()[0]
    if name == "MAX_OPSET":
        return runtime_limits()[1]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def check_supported(model: onnx.ModelProto, source: str = "model") -> None:
    """Raise :class:`UnsupportedModelError` unless this stack can run ``model``."""
    max_ir, max_opset, stack = runtime_limits()
    if model.ir_version > max_ir:
        raise UnsupportedModelError(
            f"{source}: IR version {model.ir_version} is newer than {stack} runs (max {max_ir})"
        )
    opset = opset_version(model)
    if opset > max_opset:
        raise UnsupportedModelError(
            f"{source}: opset {opset} is newer than {stack} runs (max {max_opset})"
        )
    local_functions = {(f.domain, f.name) for f in model.functions}
    imports = {imp.domain: imp.version for imp in model.opset_import}
    unknown: set[str] = set()
    for node in _all_nodes(model.graph):
        key = (node.domain, node.op_type)
        if key in local_functions:
            continue
        if node.domain not in RUNTIME_DOMAINS:
            unknown.add(f"{node.domain}::{node.op_type}")
            continue
        if node.domain in ("", "ai.onnx", "ai.onnx.ml"):
            version = imports.get(node.domain, imports.get("ai.onnx" if node.domain == "" else node.domain, opset))
            try:
                onnx.defs.get_schema(node.op_type, version, node.domain if node.domain != "ai.onnx" else "")
            except onnx.defs.SchemaError:
                unknown.add(node.op_type if not node.domain else f"{node.domain}::{node.op_type}")
    if unknown:
        raise UnsupportedModelError(f"{source}: unsupported operator(s): {', '.join(sorted(unknown))}")


def _all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _all_nodes(g)


def load_model(path: str | os.PathLike, *, check: bool = True) -> onnx.ModelProto:
    """Read and check an ONNX file; any user mistake becomes a one-line :class:`OnnxdnsError`.

    External tensor data is read from the model's folder only (see :mod:`onnxdns.external_data`);
    ``check`` also runs onnx.checker and :mod:`onnxdns.modelcheck`.
    """
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise OnnxdnsError(f"{p}: no such file") from None
    except OSError as e:
        raise OnnxdnsError(f"{p}: cannot read: {e.strerror or e}") from None
    if stat.S_ISDIR(st.st_mode):
        raise OnnxdnsError(f"{p}: is a directory, not an ONNX file")
    if not stat.S_ISREG(st.st_mode):
        raise OnnxdnsError(f"{p}: not a regular file (a FIFO, socket or device), not an ONNX file")
    if st.st_size == 0:
        raise OnnxdnsError(f"{p}: empty file, not an ONNX model")
    try:
        model = onnx.load_model(str(p), load_external_data=False)
    except OSError as e:
        raise OnnxdnsError(f"{p}: cannot read: {e.strerror or e}") from None
    except (DecodeError, RuntimeError, ValueError, UnicodeDecodeError) as e:
        raise OnnxdnsError(f"{p}: not a readable ONNX model (truncated or not ONNX): {_first_line(e)}") from None
    if model.ir_version == 0 or not model.opset_import or not model.graph.node:
        raise OnnxdnsError(f"{p}: not an ONNX model (no IR version, opset or graph nodes)")
    load_external_data(model, p)
    if check:
        check_supported(model, str(p))
        try:
            modelcheck.check_model(model)
        except OnnxdnsError as e:
            raise OnnxdnsError(f"{p}: {e}") from None
        try:
            onnx.checker.check_model(model)
        except (onnx.checker.ValidationError, ValueError) as e:
            raise OnnxdnsError(f"{p}: invalid ONNX model: {_first_line(e)}") from None
    return model


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def save_model(model: onnx.ModelProto | ir.Model, path: str | os.PathLike, *, protect: tuple = ()) -> Path:
    """Write ``model`` to ``path`` atomically (temporary file + rename in the same folder).

    ``protect`` lists paths (the inputs) that must never be overwritten.
    """
    if isinstance(model, ir.Model):
        model = to_proto(model)
    out = Path(path)
    for src in protect:
        if src is not None and out.exists() and Path(src).exists() and os.path.samefile(out, src):
            raise OnnxdnsError(f"{out}: refusing to overwrite the input model; choose another output path")
    if out.is_dir():
        raise OnnxdnsError(f"{out}: is a directory; give an output file name")
    if not out.parent.exists():
        raise OnnxdnsError(f"{out.parent}: output folder does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        if model.ByteSize() > 2_000_000_000:
            raise OnnxdnsError(f"{out}: model over 2 GB; external-data output is not supported")
        onnx.save_model(model, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


# --------------------------------------------------------------------------- ONNX <-> onnx-ir


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks (cache keys of training runs and stages)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sparse_to_array(sp: onnx.SparseTensorProto) -> np.ndarray:
    """Densify a ``SparseTensorProto`` (linear or coordinate indices)."""
    values = numpy_helper.to_array(sp.values)
    indices = numpy_helper.to_array(sp.indices).astype(np.int64)
    shape = tuple(int(d) for d in sp.dims)
    dense = np.zeros(int(np.prod(shape)), dtype=values.dtype)
    if indices.ndim == 2:
        indices = np.ravel_multi_index(tuple(indices.T), shape) if indices.size else indices.reshape(-1)
    dense[indices] = values
    return dense.reshape(shape)


def array_to_sparse(name: str, array: np.ndarray) -> onnx.SparseTensorProto:
    """Encode ``array`` as a ``SparseTensorProto`` with linear int64 indices (ONNX format (b)).

    An element is stored unless its bit pattern is all zeros, so ``-0.0`` survives the round
    trip. The indices go in the varint-packed ``int64_data`` field: 1 to 4 bytes per index for
    tensors under 2**28 elements instead of 8 in ``raw_data`` (onnx.checker accepts only int64
    indices; onnxruntime reads both fields).
    """
    flat = np.ascontiguousarray(array).reshape(-1)
    floating = flat.dtype.kind in "fc" and flat.dtype.itemsize in (2, 4, 8)
    bits = flat.view(np.dtype(f"u{flat.dtype.itemsize}")) if floating else flat
    idx = np.flatnonzero(bits)
    values = numpy_helper.from_array(flat[idx], name)
    indices = onnx.TensorProto(name=f"{name}__indices", data_type=onnx.TensorProto.INT64, dims=[idx.size])
    indices.int64_data.extend(idx.tolist())
    return onnx.helper.make_sparse_tensor(values, indices, list(array.shape))


def to_ir(model: onnx.ModelProto) -> ir.Model:
    """Deserialize into onnx-ir. Sparse initializers become dense ones tagged for sparse storage."""
    sparse_names: list[str] = []
    if model.graph.sparse_initializer:
        model = _copy(model)
        for sp in model.graph.sparse_initializer:
            arr = sparse_to_array(sp)
            model.graph.initializer.append(numpy_helper.from_array(arr, sp.values.name))
            sparse_names.append(sp.values.name)
        del model.graph.sparse_initializer[:]
    irm = ir.serde.deserialize_model(model)
    for name in sparse_names:
        if name in irm.graph.initializers:
            irm.graph.initializers[name].meta[SPARSE_TAG] = "sparse"
    return irm


def to_proto(model: ir.Model) -> onnx.ModelProto:
    """Serialize from onnx-ir, storing initializers tagged by ``sparse-storage`` sparsely.

    A tagged initializer is stored densely when the sparse encoding would not be smaller.
    """
    tagged = {
        name for name, v in model.graph.initializers.items() if v.meta.get(SPARSE_TAG) == "sparse"
    }
    proto = ir.serde.serialize_model(model)
    if tagged:
        keep = []
        for init in proto.graph.initializer:
            sparse = array_to_sparse(init.name, numpy_helper.to_array(init)) if init.name in tagged else None
            if sparse is not None and sparse.ByteSize() < init.ByteSize():
                proto.graph.sparse_initializer.append(sparse)
            else:  # untagged, or no longer smaller sparse (e.g. a later pass filled it in)
                keep.append(init)
        del proto.graph.initializer[:]
        proto.graph.initializer.extend(keep)
        # to_ir appends densified sparse initializers last: order their value_info the same way,
        # so that a load/save round trip writes identical bytes.
        stored = {sp.values.name for sp in proto.graph.sparse_initializer}
        infos = list(proto.graph.value_info)
        del proto.graph.value_info[:]
        proto.graph.value_info.extend([i for i in infos if i.name not in stored])
        proto.graph.value_info.extend([i for i in infos if i.name in stored])
    return proto


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out
