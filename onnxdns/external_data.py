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

import os
import stat
from pathlib import Path, PurePosixPath, PureWindowsPath

import onnx
from onnx import TensorProto

from onnxdns.errors import OnnxdnsError
from onnxdns.modelcheck import stored_tensors


def load_external_data(model: onnx.ModelProto, model_path: str | os.PathLike) -> None:
    """Read every external tensor of ``model`` (loaded from ``model_path``) into ``raw_data``."""
    folder = Path(model_path).parent
    real_folder = os.path.realpath(folder)
    for where, tensor in stored_tensors(model):
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        prefix = f"{model_path}: {where}: external data '{location}'"
        tensor.raw_data = _read(folder, real_folder, location, info, prefix)
        tensor.data_location = TensorProto.DEFAULT
        del tensor.external_data[:]


def _read(folder: Path, real_folder: str, location: str, info: dict[str, str], prefix: str) -> bytes:
    _check_location(location, prefix)
    path = folder / location
    real = os.path.realpath(path)
    if os.path.commonpath([real_folder, real]) != real_folder:
        raise OnnxdnsError(f"{prefix}: leaves the model's folder (through a symbolic link); refusing to read {real}")
    offset, length = _number(info, "offset", prefix), _number(info, "length", prefix)
    try:
        fd = os.open(real, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0))
    except OSError as e:
        raise OnnxdnsError(f"{prefix}: cannot open: {e.strerror}") from None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OnnxdnsError(f"{prefix}: not a regular file")
        start = offset or 0
        if start > st.st_size:
            raise OnnxdnsError(f"{prefix}: offset {start} is past the end of the file ({st.st_size} bytes)")
        size = st.st_size - start if length is None else length
        if start + size > st.st_size:
            raise OnnxdnsError(f"{prefix}: offset {start} + length {size} is past the end of the file "
                               f"({st.st_size} bytes)")
        fh.seek(start)
        data = fh.read(size)
    if len(data) != size:
        raise OnnxdnsError(f"{prefix}: read {len(data)} of {size} bytes (the file changed while reading)")
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
