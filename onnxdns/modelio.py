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

import dataclasses
import functools
import hashlib
import importlib.metadata
import logging
import os
import re
import shutil
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
from onnxdns.external_data import check_external_data, disk_bytes, drop_pages, load_external_data
from onnxdns.lazyload import GRAPH_INITIALIZER, LAZY_BYTES, MODEL_GRAPH, TENSOR_RAW_DATA, encode_varint, parse_lazy

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
    p, model = _parse(path)
    load_external_data(model, p)
    if check:
        _check(model, p)
    return model


@dataclasses.dataclass
class Loaded:
    """A model read for the passes (:func:`load_ir`)."""

    #: The model; initializers stored externally stay on disk (memory-mapped when read).
    model: ir.Model
    #: Real paths of the external data files the model refers to.
    data_files: set[str]
    #: Bytes on disk: the model file and its data files.
    disk_bytes: int
    #: The parsed file (external initializers not read); the model's in-file tensors are views
    #: of it. Drop it (``loaded.proto = None``) once the statistics are taken.
    proto: onnx.ModelProto | None = None

    @property
    def external(self) -> bool:
        return bool(self.data_files)


def load_ir(path: str | os.PathLike, *, check: bool = True) -> Loaded:
    """Read and check an ONNX file into onnx-ir without reading external initializer data.

    External references are checked as :func:`load_model` checks them (folder, symbolic links,
    regular file, offset and length, size against the dims) but their data stays on disk: onnx-ir
    memory-maps it when a pass reads it. Other external tensors (sparse, attributes) are read.
    """
    proto, files = load_unread(path, check=check)
    p = Path(path)
    model = to_ir(proto)
    ir.external_data.set_base_dir(model.graph, str(p.parent))
    return Loaded(model, files - {os.path.realpath(p)}, disk_bytes(p, files), proto)


def load_unread(path: str | os.PathLike, *, check: bool = True) -> tuple[onnx.ModelProto, set[str]]:
    """(the checked model with its external initializers checked but not read, the real paths of
    its data files): :func:`load_model` without reading external initializer data."""
    p, proto = _parse(path, lazy=True, require_nodes=check)
    files = check_external_data(proto, p)
    load_external_data(proto, p, keep_initializers=True)
    if check:
        _check(proto, p)
    return proto, files


def parse_model(path: str | os.PathLike) -> tuple[onnx.ModelProto, int]:
    """(the model at ``path`` with external data references checked but not read, bytes on
    disk with its data files); no model checks (for files onnxdns wrote itself)."""
    p, proto = _parse(path, lazy=True, require_nodes=False)  # a fully folded output has no nodes
    return proto, disk_bytes(p, check_external_data(proto, p))


def _parse(path: str | os.PathLike, *, lazy: bool = False, require_nodes: bool = True) -> tuple[Path, onnx.ModelProto]:
    """The file checks and the protobuf parse, external data not read.

    ``lazy``: large initializers stored in the file become external references to the file
    itself (see :mod:`onnxdns.lazyload`), read by memory-mapping when used. ``require_nodes``
    refuses a graph without nodes (not a model a user means to optimize; onnxdns's own outputs
    may have none when every node folded into a constant)."""
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
        model = parse_lazy(p) if lazy else None
        if model is None:
            model = onnx.load_model(str(p), load_external_data=False)
    except OSError as e:
        raise OnnxdnsError(f"{p}: cannot read: {e.strerror or e}") from None
    except (DecodeError, RuntimeError, ValueError, UnicodeDecodeError) as e:
        raise OnnxdnsError(f"{p}: not a readable ONNX model (truncated or not ONNX): {_first_line(e)}") from None
    if model.ir_version == 0 or not model.opset_import or (require_nodes and not model.graph.node):
        raise OnnxdnsError(f"{p}: not an ONNX model (no IR version, opset or graph nodes)")
    return p, model


def _check(model: onnx.ModelProto, p: Path) -> None:
    check_supported(model, str(p))
    try:
        modelcheck.check_model(model)
    except OnnxdnsError as e:
        raise OnnxdnsError(f"{p}: {e}") from None
    try:
        onnx.checker.check_model(checker_view(model))
    except (onnx.checker.ValidationError, ValueError) as e:
        raise OnnxdnsError(f"{p}: invalid ONNX model: {_first_line(e)}") from None


#: Initializers larger than this are given to onnx.checker as empty tensors of the same name and
#: type: its check does not look at their values, and a copy of the model without them is cheap.
_CHECKER_STUB_BYTES = 1 << 20


def checker_view(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` for onnx.checker without its large or external initializers' data (which the
    checker would copy, or look for relative to the working directory). Their data are checked by
    :mod:`onnxdns.modelcheck` and :mod:`onnxdns.external_data`."""
    graph = model.graph
    if not any(t.data_location == onnx.TensorProto.EXTERNAL or t.ByteSize() > _CHECKER_STUB_BYTES
               for t in graph.initializer):
        return model
    view = onnx.ModelProto()
    _copy_fields(model, view, skip="graph")
    _copy_fields(graph, view.graph, skip="initializer")
    for t in graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL or t.ByteSize() > _CHECKER_STUB_BYTES:
            view.graph.initializer.add(name=t.name, data_type=t.data_type, dims=[0])
        else:
            view.graph.initializer.append(t)
    return view


def _copy_fields(src, dst, skip: str) -> None:
    for field, value in src.ListFields():
        if field.name == skip:
            continue
        repeated = getattr(field, "is_repeated", None)
        if repeated is None:
            repeated = field.label == field.LABEL_REPEATED
        if repeated:
            getattr(dst, field.name).extend(value)
        elif field.type == field.TYPE_MESSAGE:
            getattr(dst, field.name).CopyFrom(value)
        else:
            setattr(dst, field.name, value)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


#: Serialized size above which a model must be written with external data (protobuf's limit is 2 GiB).
PROTOBUF_LIMIT = 2_000_000_000
#: Initializers of at least this many bytes go to the data file of an external-data output.
EXTERNAL_THRESHOLD = 1024


def data_file_name(path: str | os.PathLike) -> str:
    """The external data file written beside ``path``: ``<name>.data``."""
    return Path(path).name + ".data"


def save_model(model: onnx.ModelProto | ir.Model, path: str | os.PathLike, *, protect: tuple = (),
               external_data: bool | None = False) -> Path:
    """Write ``model`` to ``path`` atomically (temporary files + rename in the same folder).

    ``protect`` lists paths (the inputs and their data files) that must never be overwritten.
    ``external_data``: True writes initializers of :data:`EXTERNAL_THRESHOLD` bytes or more to
    ``<name>.data`` beside the model; None decides: external when the model's tensors exceed
    :data:`PROTOBUF_LIMIT`. The model file and its data file are written in a temporary folder
    beside the output and renamed into place, data file first; a failure leaves neither.
    """
    out = Path(path)
    data_path = out.with_name(data_file_name(out))
    if external_data is None:
        external_data = isinstance(model, ir.Model) and _tensor_bytes(model) > PROTOBUF_LIMIT
    for src in protect:
        for target in (out, data_path) if external_data else (out,):
            if src is not None and target.exists() and Path(src).exists() and os.path.samefile(target, src):
                what = "the input model" if target == out else f"a file of the input model ({target.name})"
                raise OnnxdnsError(f"{out}: refusing to overwrite {what}; choose another output path")
    check_output_file(out)
    if external_data:
        check_output_file(data_path)
    try:
        _write(model, out, data_path, external_data)
    except OSError as e:  # a full disk, a read-only or vanished folder, a name too long...
        raise OnnxdnsError(f"{out}: cannot write the output: {e.strerror or e}") from None
    return out


def check_output(out: str | os.PathLike, *inputs: str | os.PathLike | None) -> None:
    """The one output check of every command, before any work: ``out`` is not one of ``inputs``
    (the same file, or the same path where none exists yet) and can be replaced by a model file
    (see :func:`check_output_file`). Raises a one-line :class:`OnnxdnsError`."""
    out = Path(out)
    for src in inputs:
        if src is None:
            continue
        src = Path(src)
        if (out.exists() and src.exists() and os.path.samefile(out, src)) or out.resolve() == src.resolve():
            raise OnnxdnsError(f"{out}: the output path is the input model; choose another output path")
    check_output_file(out)


def check_output_file(out: Path) -> None:
    """Raise unless ``out`` can be replaced by a model file: its folder exists, and it does not
    exist or is a regular file (a FIFO or a device such as /dev/null would be replaced by a file)."""
    try:
        st = os.stat(out)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise OnnxdnsError(f"{out}: unusable output path: {e.strerror or e}") from None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise OnnxdnsError(f"{out}: is a directory; give an output file name")
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise OnnxdnsError(f"{out}: exists and is not a regular file (a FIFO, socket or device); "
                           "give the path of a file")
    if not out.parent.is_dir():
        raise OnnxdnsError(f"{out.parent}: output folder does not exist")


def _write(model: onnx.ModelProto | ir.Model, out: Path, data_path: Path, external_data: bool) -> None:
    if external_data and not isinstance(model, ir.Model):
        model = to_ir(model)
    tmpdir = tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        tmp = Path(tmpdir) / out.name
        if external_data:
            _write_external(model, tmp)
        elif isinstance(model, ir.Model):
            if _write_streaming(model, tmp) > PROTOBUF_LIMIT:
                raise OnnxdnsError(f"{out}: model over 2 GB; write it with external data (--external-data)")
        else:
            if model.ByteSize() > PROTOBUF_LIMIT:
                raise OnnxdnsError(f"{out}: model over 2 GB; write it with external data (--external-data)")
            onnx.save_model(model, tmp)
        written = [tmp.with_name(data_file_name(tmp))] if external_data else []
        umask = os.umask(0)
        os.umask(umask)
        for f in (*written, tmp):
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
            os.chmod(f, 0o666 & ~umask)  # mkdtemp's folder is private; give the files the usual permissions
        if external_data:
            os.replace(written[0], data_path)
        try:
            os.replace(tmp, out)
        except OSError:
            if external_data:
                os.unlink(data_path)
            raise
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _tensor_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for g in model.graphs() for v in g.initializers.values()
               if v.const_value is not None)


def _write_streaming(model: ir.Model, tmp: Path) -> int:
    """Write ``model`` as one protobuf file without building it in memory; return its size.

    The model is serialized with its large main-graph initializers (:data:`LAZY_BYTES` or more,
    not tagged for sparse storage) as stubs; the file is then written field by field (protobuf
    accepts fields in any order) with each large tensor's bytes copied from its array in chunks,
    so no copy of the weights is made (memory-mapped ones are read from their file). Stops
    before writing anything past :data:`PROTOBUF_LIMIT` bytes.
    """
    values = [v for v in model.graph.initializers.values()
              if v.const_value is not None and v.meta.get(SPARSE_TAG) != "sparse"
              and v.const_value.nbytes >= LAZY_BYTES]
    tensors = [v.const_value for v in values]
    try:
        for value, tensor in zip(values, tensors):
            value.const_value = ir.ExternalTensor("onnxdns-stream", 0, tensor.nbytes, tensor.dtype,
                                                  shape=tensor.shape, name=value.name)
        proto = to_proto(model, keep_external=tuple(v.const_value for v in values))
    finally:
        for value, tensor in zip(values, tensors):
            value.const_value = tensor
    big = {v.name: t for v, t in zip(values, tensors)}
    entries = []  # (serialized TensorProto without raw_data, the tensor whose bytes follow, or None)
    for init in proto.graph.initializer:
        tensor = big.get(init.name)
        if tensor is not None:
            init.ClearField("data_location")
            del init.external_data[:]
        entries.append((init.SerializeToString(), tensor))
    del proto.graph.initializer[:]
    graph = proto.graph.SerializeToString()
    proto.ClearField("graph")
    head = proto.SerializeToString()

    def tensor_len(header: bytes, tensor) -> int:
        if tensor is None:
            return len(header)
        return len(header) + len(_key(TENSOR_RAW_DATA)) + len(encode_varint(tensor.nbytes)) + tensor.nbytes

    sizes = [tensor_len(h, t) for h, t in entries]
    graph_len = len(graph) + sum(len(_key(GRAPH_INITIALIZER)) + len(encode_varint(n)) + n for n in sizes)
    total = len(head) + len(_key(MODEL_GRAPH)) + len(encode_varint(graph_len)) + graph_len
    if total > PROTOBUF_LIMIT:
        return total
    with open(tmp, "wb") as fh:
        fh.write(head + _key(MODEL_GRAPH) + encode_varint(graph_len) + graph)
        for (header, tensor), size in zip(entries, sizes):
            fh.write(_key(GRAPH_INITIALIZER) + encode_varint(size) + header)
            if tensor is not None:
                fh.write(_key(TENSOR_RAW_DATA) + encode_varint(tensor.nbytes))
                _write_tensor_bytes(fh, tensor)
    return total


def _key(field: int) -> bytes:
    return encode_varint(field << 3 | 2)  # a length-delimited field's key


#: Bytes written at a time by :func:`_write_tensor_bytes`.
_WRITE_CHUNK = 16 * 2**20


def _write_tensor_bytes(fh, tensor) -> None:
    """Write ``tensor.tobytes()`` without making it (plain numeric dtypes are written in chunks)."""
    array = tensor.numpy() if tensor.dtype.bitwidth == 8 * tensor.dtype.itemsize else None
    if array is None or array.dtype.kind not in "biuf" or array.dtype.byteorder == ">":
        data = tensor.tobytes()
        if len(data) != tensor.nbytes:
            raise OnnxdnsError(f"initializer {tensor.name}: {len(data)} bytes, expected {tensor.nbytes}")
        fh.write(data)
        return
    flat = array.reshape(-1) if array.flags.c_contiguous else np.ascontiguousarray(array).reshape(-1)
    raw = flat.view(np.uint8)
    if raw.size != tensor.nbytes:
        raise OnnxdnsError(f"initializer {tensor.name}: {raw.size} bytes, expected {tensor.nbytes}")
    for i in range(0, raw.size, _WRITE_CHUNK):
        fh.write(raw[i:i + _WRITE_CHUNK].data)
        drop_pages(array)  # a memory-mapped weight does not stay resident once written


def _write_external(model: ir.Model, tmp: Path) -> None:
    """Save ``model`` as ``tmp`` + ``tmp.data`` (initializers tagged for sparse storage stay inline)."""
    values = [v for g in model.graphs() for v in g.initializers.values()
              if v.const_value is not None and v.meta.get(SPARSE_TAG) != "sparse"
              and v.const_value.nbytes >= EXTERNAL_THRESHOLD]
    tensors = [v.const_value for v in values]
    external: list[ir.ExternalTensor] = []
    try:
        external = ir.external_data.convert_tensors_to_external(tensors, str(tmp.parent), data_file_name(tmp))
        for value, ext in zip(values, external):
            value.const_value = ext
        onnx.save_model(to_proto(model, keep_external=tuple(external)), tmp)
    finally:
        for value, tensor in zip(values, tensors):
            value.const_value = tensor
    tmp.with_name(data_file_name(tmp)).touch()  # created empty when no initializer is large enough


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


def to_proto(model: ir.Model, *, keep_external: tuple[ir.ExternalTensor, ...] = ()) -> onnx.ModelProto:
    """Serialize from onnx-ir, storing initializers tagged by ``sparse-storage`` sparsely.

    A tagged initializer is stored densely when the sparse encoding would not be smaller.
    Initializers still on disk (read by :func:`load_ir`) are stored in the proto, except those
    in ``keep_external``, which stay references to their data file.
    """
    kept = {id(t) for t in keep_external}
    swapped = [(v, v.const_value) for g in model.graphs() for v in g.initializers.values()
               if isinstance(v.const_value, ir.ExternalTensor) and id(v.const_value) not in kept]
    try:
        for value, tensor in swapped:
            value.const_value = ir.Tensor(tensor.numpy(), dtype=tensor.dtype, name=tensor.name)
        return _to_proto(model)
    finally:
        for value, tensor in swapped:
            value.const_value = tensor


def release_mapped(model: ir.Model) -> None:
    """Close the memory mappings of ``model``'s external initializers whose data no one holds (a
    later read maps them again): the pages a pass read leave the process's resident set."""
    for g in model.graphs():
        for v in g.initializers.values():
            if isinstance(v.const_value, ir.ExternalTensor):
                try:
                    v.const_value.release()
                except BufferError:  # a view of the data is still alive: keep the mapping
                    pass


def shape_proto(model: ir.Model) -> onnx.ModelProto:
    """``model`` serialized for shape inference: initializers of :data:`~onnxdns.lazyload.LAZY_BYTES`
    bytes or more become external references to nowhere (their type and dims are all shape
    inference needs), so no weight is read or copied. Not a loadable model."""
    swapped = []
    for g in model.graphs():
        for v in g.initializers.values():
            t = v.const_value
            if t is not None and not isinstance(t, ir.ExternalTensor) and t.nbytes >= LAZY_BYTES:
                swapped.append((v, t))
    try:
        for value, tensor in swapped:
            value.const_value = ir.ExternalTensor("onnxdns-shape-stub", 0, tensor.nbytes, tensor.dtype,
                                                  shape=tensor.shape, name=value.name)
        return ir.serde.serialize_model(model)
    finally:
        for value, tensor in swapped:
            value.const_value = tensor


def _to_proto(model: ir.Model) -> onnx.ModelProto:
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
