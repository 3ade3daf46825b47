"""Parse an ONNX file without copying its large initializers: they become references into the file.

``onnx.load_model`` reads the whole file and parses every weight into the protobuf message, and
each read of a ``raw_data`` field copies it again. :func:`parse_lazy` walks the protobuf wire
format of the memory-mapped file instead: every main-graph initializer whose ``raw_data`` holds
at least :data:`LAZY_BYTES` bytes is given to the parsed message as an *external data reference
to the model file itself* (location = the file's name, offset and length of its ``raw_data``), so
onnx-ir memory-maps it on first use and passes that do not change a weight never copy it. The
rest of the message (nodes, small tensors, subgraphs) is parsed as usual.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import onnx

#: Initializers with at least this many bytes of ``raw_data`` stay in the file (memory-mapped).
LAZY_BYTES = 64 * 1024

_LEN = 2
#: Field numbers of ModelProto.graph, GraphProto.initializer and TensorProto.raw_data.
MODEL_GRAPH, GRAPH_INITIALIZER, TENSOR_RAW_DATA = 7, 5, 9


class _Malformed(Exception):
    pass


def parse_lazy(path: str | os.PathLike) -> onnx.ModelProto | None:
    """The model at ``path`` with its large main-graph initializers as references into the file,
    or None when the file cannot be handled this way (not protobuf as expected, no large
    initializer, several hard links): the caller then parses it as usual."""
    p = Path(path)
    with open(p, "rb") as fh:
        if os.fstat(fh.fileno()).st_nlink != 1 or os.fstat(fh.fileno()).st_size < LAZY_BYTES:
            return None
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            try:
                light, refs = _strip(memoryview(buf), p.name)
            except _Malformed:
                return None
    if not refs:
        return None
    try:
        return onnx.ModelProto.FromString(light)
    except Exception:  # noqa: BLE001 - the usual parse reports the problem
        return None


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Malformed
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf: memoryview, start: int, end: int):
    """(field number, wire type, start of the field's tag, start of its value, end of the field)."""
    pos = start
    while pos < end:
        tag_start = pos
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, nxt = _varint(buf, pos, end)
        elif wire == 1:
            nxt = pos + 8
        elif wire == _LEN:
            length, pos = _varint(buf, pos, end)
            nxt = pos + length
        elif wire == 5:
            nxt = pos + 4
        else:
            raise _Malformed
        if nxt > end or number == 0:
            raise _Malformed
        yield number, wire, tag_start, pos, nxt
        pos = nxt


def encode_varint(n: int) -> bytes:
    """Protobuf's base-128 varint of ``n`` (>= 0)."""
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _len_field(number: int, payload: bytes) -> bytes:
    return encode_varint(number << 3 | _LEN) + encode_varint(len(payload)) + payload


def _strip(buf: memoryview, location: str) -> tuple[bytes, int]:
    """(the model's bytes with large initializers' raw_data replaced by references, their count)."""
    model = bytearray()
    refs = 0
    for number, wire, tag, start, end in _fields(buf, 0, len(buf)):
        if number != MODEL_GRAPH or wire != _LEN:
            model += buf[tag:end]
            continue
        graph = bytearray()
        for g_number, g_wire, g_tag, g_start, g_end in _fields(buf, start, end):
            if g_number == GRAPH_INITIALIZER and g_wire == _LEN:
                tensor = _tensor(buf, g_start, g_end, location)
                if tensor is not None:
                    graph += _len_field(GRAPH_INITIALIZER, tensor)
                    refs += 1
                    continue
            graph += buf[g_tag:g_end]
        model += _len_field(MODEL_GRAPH, bytes(graph))
    return bytes(model), refs


def _tensor(buf: memoryview, start: int, end: int, location: str) -> bytes | None:
    """The TensorProto at buf[start:end] as an external reference to its raw_data, or None to keep it."""
    raw = None
    rest = bytearray()
    for number, wire, tag, v_start, v_end in _fields(buf, start, end):
        if number == TENSOR_RAW_DATA and wire == _LEN:
            raw = (v_start, v_end - v_start)
        else:
            rest += buf[tag:v_end]
    if raw is None or raw[1] < LAZY_BYTES:
        return None
    tensor = onnx.TensorProto.FromString(bytes(rest))
    if tensor.data_location == onnx.TensorProto.EXTERNAL or tensor.external_data:
        raise _Malformed  # raw_data and an external reference at once: let the usual checks speak
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(raw[0])), ("length", str(raw[1]))):
        tensor.external_data.add(key=key, value=value)
    return tensor.SerializeToString()
