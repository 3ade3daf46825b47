"""Reading a model's external tensor data safely, from its own folder only.

``onnx.load_external_data_for_model`` follows symbolic links out of the model's folder (a
``w.bin -> /etc/passwd`` would be copied into the optimized model), skips sparse initializers
(whose data numpy_helper then resolves against the current directory) and reports a bad location
as an internal ``ValidationError``. :func:`load_external_data` replaces it: every external tensor
(dense, sparse, attribute, in subgraphs and functions) is resolved against the model's folder and
refused, with a one-line :class:`~onnxdns.errors.OnnxdnsError`, when its location is empty,
absolute or has a ``..`` part, when its real path leaves the folder, when it is not a regular
file (a FIFO or device would block or never end), or when offset and length fall outside it.
"""

from __future__ import annotations

import mmap
import os
import stat
from pathlib import Path, PurePosixPath, PureWindowsPath

import onnx
from onnx import TensorProto

from onnxdns.errors import OnnxdnsError
from onnxdns.modelcheck import raw_bytes, stored_tensors


def load_external_data(model: onnx.ModelProto, model_path: str | os.PathLike, *,
                       keep_initializers: bool = False) -> None:
    """Read every external tensor of ``model`` (loaded from ``model_path``) into ``raw_data``.

    ``keep_initializers`` leaves the main graph's (dense) initializers external, for onnx-ir to
    memory-map lazily; check them with :func:`check_external_data`.
    """
    folder = Path(model_path).parent
    real_folder = os.path.realpath(folder)
    kept = len(model.graph.initializer) if keep_initializers else 0  # stored_tensors yields these first
    for i, (where, tensor) in enumerate(stored_tensors(model)):
        if tensor.data_location != TensorProto.EXTERNAL or i < kept:
            continue
        tensor.raw_data = _read(_resolve(folder, real_folder, tensor, model_path, where))
        tensor.data_location = TensorProto.DEFAULT
        del tensor.external_data[:]


def check_external_data(model: onnx.ModelProto, model_path: str | os.PathLike) -> set[str]:
    """Check every external reference of ``model`` without reading data; return the data files.

    The same refusals as :func:`load_external_data` (location, symbolic links, not a regular
    file, offset and length past the end), and the length must be the bytes the dims declare.
    Returns the real paths of the distinct data files (for counting bytes on disk).
    """
    folder = Path(model_path).parent
    real_folder = os.path.realpath(folder)
    files: set[str] = set()
    for where, tensor in stored_tensors(model):
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        ref = _resolve(folder, real_folder, tensor, model_path, where)
        want = raw_bytes(tensor)
        if want is not None and ref.size != want:
            dtype = TensorProto.DataType.Name(tensor.data_type)
            raise OnnxdnsError(f"{ref.prefix}: {dtype} dims {list(tensor.dims)} need {want} bytes, "
                               f"the file holds {ref.size}")
        if os.stat(ref.real).st_nlink > 1:  # onnx-ir refuses to map these (a hard link can point anywhere)
            raise OnnxdnsError(f"{ref.prefix}: the file has several hard links; refusing to map it")
        files.add(ref.real)
    return files


def memmap(tensor: TensorProto, model_path: str | os.PathLike, where: str = "tensor"):
    """A read-only numpy view of an external tensor's data (memory-mapped, checked as above)."""
    import numpy as np
    from onnx.helper import tensor_dtype_to_np_dtype

    folder = Path(model_path).parent
    ref = _resolve(folder, os.path.realpath(folder), tensor, model_path, where)
    dtype = np.dtype(tensor_dtype_to_np_dtype(tensor.data_type)).newbyteorder("<")
    shape = tuple(int(d) for d in tensor.dims)
    if ref.size == 0:
        return np.zeros(shape, dtype)
    return np.memmap(ref.real, dtype=dtype, mode="r", offset=ref.start, shape=shape)


def drop_pages(array) -> None:
    """Take a memory-mapped array's pages out of the process's resident set (they stay in the
    page cache; a later read maps them again), so reading every weight once does not make the
    process hold the whole model. Arrays that are not memory-mapped are left alone."""
    raw = getattr(array, "_mmap", None)  # np.memmap
    base = array
    while raw is None and base is not None:  # np.frombuffer(mmap) (onnx-ir), views of it
        raw = base if isinstance(base, mmap.mmap) else None
        base = getattr(base, "base", None) if not isinstance(base, memoryview) else base.obj
    if raw is not None and hasattr(raw, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        try:
            raw.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):
            pass


def disk_bytes(model_path: str | os.PathLike, data_files: set[str] | frozenset[str] = frozenset()) -> int:
    """Bytes on disk of a model: its file plus each distinct external data file once."""
    real_model = os.path.realpath(model_path)
    return os.stat(real_model).st_size + sum(os.stat(f).st_size for f in set(data_files) - {real_model})


class _Ref:
    """A checked external reference: real path of the data file, offset and size in bytes."""

    __slots__ = ("real", "start", "size", "prefix")

    def __init__(self, real: str, start: int, size: int, prefix: str):
        self.real, self.start, self.size, self.prefix = real, start, size, prefix


def _resolve(folder: Path, real_folder: str, tensor: TensorProto, model_path, where: str) -> _Ref:
    info = {e.key: e.value for e in tensor.external_data}
    location = info.get("location", "")
    prefix = f"{model_path}: {where}: external data '{location}'"
    _check_location(location, prefix)
    path = folder / location
    real = os.path.realpath(path)
    if os.path.commonpath([real_folder, real]) != real_folder:
        raise OnnxdnsError(f"{prefix}: leaves the model's folder (through a symbolic link); refusing to read {real}")
    offset, length = _number(info, "offset", prefix), _number(info, "length", prefix)
    try:
        st = os.stat(real)
    except OSError as e:
        raise OnnxdnsError(f"{prefix}: cannot open: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise OnnxdnsError(f"{prefix}: not a regular file")
    start = offset or 0
    if start > st.st_size:
        raise OnnxdnsError(f"{prefix}: offset {start} is past the end of the file ({st.st_size} bytes)")
    size = st.st_size - start if length is None else length
    if start + size > st.st_size:
        raise OnnxdnsError(f"{prefix}: offset {start} + length {size} is past the end of the file "
                           f"({st.st_size} bytes)")
    return _Ref(real, start, size, prefix)


def _read(ref: _Ref) -> bytes:
    prefix = ref.prefix
    try:
        fd = os.open(ref.real, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0))
    except OSError as e:
        raise OnnxdnsError(f"{prefix}: cannot open: {e.strerror}") from None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OnnxdnsError(f"{prefix}: not a regular file")
        if ref.start + ref.size > st.st_size:
            raise OnnxdnsError(f"{prefix}: offset {ref.start} + length {ref.size} is past the end of the file "
                               f"({st.st_size} bytes)")
        fh.seek(ref.start)
        data = fh.read(ref.size)
    if len(data) != ref.size:
        raise OnnxdnsError(f"{prefix}: read {len(data)} of {ref.size} bytes (the file changed while reading)")
    return data


def _check_location(location: str, prefix: str) -> None:
    if not location:
        raise OnnxdnsError(f"{prefix}: no file location given")
    if "\0" in location:
        raise OnnxdnsError(f"{prefix}: the location holds a NUL character")
    if os.path.isabs(location) or PureWindowsPath(location).is_absolute() or PureWindowsPath(location).drive:
        raise OnnxdnsError(f"{prefix}: absolute locations are refused; the data must be in the model's folder")
    parts = set(PurePosixPath(location).parts) | set(PureWindowsPath(location).parts)
    if ".." in parts:
        raise OnnxdnsError(f"{prefix}: locations with '..' are refused; the data must be in the model's folder")


def _number(info: dict[str, str], key: str, prefix: str) -> int | None:
    if key not in info or info[key] == "":
        return None
    try:
        value = int(info[key])
    except ValueError:
        raise OnnxdnsError(f"{prefix}: {key} '{info[key]}' is not an integer") from None
    if value < 0:
        raise OnnxdnsError(f"{prefix}: negative {key} {value}")
    return value
