"""Arrays from ``FILE.npz`` (one per model input, named after it, plus optional ``labels``) or
``FILE.npy`` (the one input of a one-input model). Read with ``allow_pickle=False``; a ``.npy``
and the uncompressed members of a ``.npz`` (``numpy.savez``) are memory-mapped, so a batch reads
only its own rows; members of a compressed ``.npz`` (``numpy.savez_compressed``) are read whole."""

from __future__ import annotations

import os
import stat
import struct
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np

from onnxdns.errors import OnnxdnsError
from onnxdns.sources.base import Batch, IndexedSource, check_labels
from onnxdns.sources.model import ModelInput, check_arrays, check_feeds, single_input

LABELS = "labels"


def read_arrays(path: str | os.PathLike, what: str = "inputs") -> dict[str, np.ndarray]:
    """Name -> array of a ``.npz`` (members memory-mapped when stored uncompressed) or ``.npy``
    (named ``""``); a one-line :class:`OnnxdnsError` when the file cannot be read."""
    p = os.fspath(path)
    try:
        if not stat.S_ISREG(os.stat(p).st_mode):  # a FIFO would block forever, a device never end
            raise OnnxdnsError(f"{p}: {what} must be a regular .npy or .npz file (not a folder, FIFO or device)")
        if p.endswith(".npy"):
            return {"": np.load(p, mmap_mode="r", allow_pickle=False)}
        with np.load(p, allow_pickle=False) as npz:
            names = list(npz.files)
            arrays = {}
            with zipfile.ZipFile(p) as zf:
                for name in names:
                    mapped = _map_member(p, zf, name + ".npy")
                    arrays[name] = mapped if mapped is not None else npz[name]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise OnnxdnsError(f"{p}: cannot read {what}: {getattr(e, 'strerror', None) or e}") from None
    if not arrays:
        raise OnnxdnsError(f"{p}: no arrays; save one per model input, named after it (numpy.savez)")
    return arrays


def _map_member(path: str, zf: zipfile.ZipFile, member: str) -> np.ndarray | None:
    """A read-only memory map of a stored (uncompressed) ``.npy`` member, else None."""
    try:
        info = zf.getinfo(member)
    except KeyError:
        return None
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    with open(path, "rb") as fh:
        fh.seek(info.header_offset)
        local = fh.read(30)
        if local[:4] != b"PK\x03\x04":
            return None
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        fh.seek(info.header_offset + 30 + name_len + extra_len)
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
        else:
            return None
        offset = fh.tell()
    if dtype.hasobject or int(np.prod(shape)) == 0:
        return None
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")


class ArraySource(IndexedSource):
    def __init__(self, path: Path, inputs: Sequence[ModelInput]):
        self.name = path.name
        self.inputs = list(inputs)
        arrays = read_arrays(path)
        if path.suffix == ".npy":
            arrays = {single_input(self.inputs, f"a .npy file ({path.name})").name: arrays[""]}
        labels = arrays.pop(LABELS, None) if LABELS not in {i.name for i in self.inputs} else None
        check_arrays(self.inputs, arrays, self.name)
        counts = {i.name: arrays[i.name].shape[i.batch_axis] for i in self.inputs if arrays[i.name].ndim}
        if len(set(counts.values())) > 1:
            raise OnnxdnsError(f"{self.name}: arrays hold different numbers of samples on their batch axes: {counts}")
        n = next(iter(counts.values()), 0)
        if n < 1:
            raise OnnxdnsError(f"{self.name}: no samples")
        self.arrays = arrays
        self.labels = None if labels is None else check_labels(np.asarray(labels), n, None, self.name)
        self.has_labels = self.labels is not None
        self.indices = np.arange(n)

    def _read(self, indices: np.ndarray) -> Batch:
        feeds = {i.name: np.take(self.arrays[i.name], indices, axis=i.batch_axis) for i in self.inputs}
        return Batch(check_feeds(self.inputs, feeds, self.name), None if self.labels is None else self.labels[indices],
                     {i.name: i.batch_axis for i in self.inputs})
