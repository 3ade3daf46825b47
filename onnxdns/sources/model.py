"""What a data source must fit: the model's inputs (name, dtype, dimensions, batch axis) and, for
images, their layout (NCHW or NHWC), channels and size."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Sequence

import numpy as np
import onnx

from onnxdns.errors import OnnxdnsError

_BATCH_NAMES = ("batch", "n", "b", "bs", "batch_size", "n_batch", "unk__0")


@dataclasses.dataclass(frozen=True)
class ModelInput:
    """One graph input: name, numpy dtype, dimensions (int, or the symbolic name / None) and the
    axis its samples are stacked on."""

    name: str
    dtype: np.dtype
    dims: tuple[int | str | None, ...]
    batch_axis: int = 0

    def describe(self) -> str:
        shown = ",".join(str(d) if d is not None else "?" for d in self.dims)
        return f"'{self.name}' {self.dtype.name} [{shown}]"


def batch_axis(dims: Sequence[Any]) -> int:
    """The dimension whose symbolic name says batch (``batch``, ``N``, ...), else the first
    symbolic one, else 0: a ``[seq, batch, d]`` input has its samples on axis 1."""
    axis = next((i for i, d in enumerate(dims) if isinstance(d, str) and d.lower() in _BATCH_NAMES), None)
    if axis is None:
        axis = next((i for i, d in enumerate(dims) if "batch" in str(d).lower() and not isinstance(d, int)), None)
    if axis is None:
        axis = next((i for i, d in enumerate(dims) if not isinstance(d, int) or d <= 0), 0)
    return axis if dims else 0


def model_inputs(model: Any) -> list[ModelInput]:
    """The inputs of ``model``: an ``onnxruntime.InferenceSession``, an ``onnx.ModelProto``, or a path."""
    if hasattr(model, "get_inputs"):
        from onnxdns.runtime import numpy_dtype

        out = []
        for i in model.get_inputs():
            dtype = numpy_dtype(i.type)
            if dtype is None:
                raise OnnxdnsError(f"input {i.name}: type {i.type} cannot be read from data")
            dims = tuple(d if isinstance(d, int) and d > 0 else (d if isinstance(d, str) else None) for d in i.shape)
            out.append(ModelInput(i.name, np.dtype(dtype), dims, batch_axis(dims)))
        return out
    if isinstance(model, (str, os.PathLike)):
        model = onnx.load_model(os.fspath(model), load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    out = []
    for value in model.graph.input:
        if value.name in inits:
            continue
        tensor = value.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim)
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type))
        out.append(ModelInput(value.name, dtype, dims, batch_axis(dims)))
    return out


def describe_inputs(inputs: Sequence[ModelInput]) -> str:
    return ", ".join(i.describe() for i in inputs)


def single_input(inputs: Sequence[ModelInput], what: str) -> ModelInput:
    if len(inputs) != 1:
        raise OnnxdnsError(f"{what} suits a model with one input; this one has {len(inputs)} "
                           f"({', '.join(i.name for i in inputs)}): give a .npz of arrays named after them")
    return inputs[0]


@dataclasses.dataclass(frozen=True)
class ImageLayout:
    """How images feed one model input: ``layout`` NCHW or NHWC, ``channels`` 1 or 3, ``size``
    (height, width) or None where the model leaves it open."""

    layout: str
    channels: int
    height: int | None
    width: int | None


def image_layout(inp: ModelInput, what: str) -> ImageLayout:
    """The image layout of ``inp``: a float input [N, C, H, W] or [N, H, W, C] with C = 1 or 3."""
    d = inp.dims
    fixed = [x if isinstance(x, int) and x > 0 else None for x in d]
    if inp.dtype.kind != "f" or len(d) != 4:
        raise OnnxdnsError(f"{what} gives images; model input {inp.describe()} is not a float image input "
                           f"[N,C,H,W] or [N,H,W,C]")
    if fixed[1] in (1, 3):
        return ImageLayout("NCHW", fixed[1], fixed[2], fixed[3])
    if fixed[3] in (1, 3):
        return ImageLayout("NHWC", fixed[3], fixed[1], fixed[2])
    raise OnnxdnsError(f"{what} gives images with 1 or 3 channels; model input {inp.describe()} fixes neither "
                       f"axis 1 (NCHW) nor axis 3 (NHWC) to 1 or 3")


def check_feeds(inputs: Sequence[ModelInput], feeds: Mapping[str, np.ndarray], origin: str) -> dict[str, np.ndarray]:
    """``feeds`` checked (see :func:`check_arrays`) and cast to the input dtypes."""
    arrays = check_arrays(inputs, feeds, origin)
    return {i.name: arrays[i.name] if arrays[i.name].dtype == i.dtype else arrays[i.name].astype(i.dtype)
            for i in inputs}


def check_arrays(inputs: Sequence[ModelInput], feeds: Mapping[str, Any], origin: str) -> dict[str, np.ndarray]:
    """``feeds`` as arrays, checked against ``inputs`` (names, kind, rank, fixed dimensions off the
    batch axis; no data is read); a one-line :class:`OnnxdnsError` names the first misfit."""
    names = [i.name for i in inputs]
    missing = [n for n in names if n not in feeds]
    extra = [n for n in feeds if n not in names]
    if missing or extra:
        raise OnnxdnsError(f"{origin} must have one array per model input, named {', '.join(names)}"
                           + (f"; missing {', '.join(missing)}" if missing else "")
                           + (f"; unknown {', '.join(extra)}" if extra else ""))
    out = {}
    for inp in inputs:
        arr = feeds[inp.name]
        if not isinstance(arr, np.ndarray):
            try:
                arr = np.asarray(arr)
            except Exception as e:
                raise OnnxdnsError(f"{origin}: {inp.name} is not an array: {e}") from None
        if arr.dtype.kind not in "biuf" or (inp.dtype.kind in "biu" and arr.dtype.kind not in "biu") \
                or (inp.dtype.kind == "b" and arr.dtype.kind != "b"):
            raise OnnxdnsError(f"{origin}: array {inp.name} is {arr.dtype}, the model input is {inp.describe()}")
        fits = arr.ndim == len(inp.dims) and all(
            k == inp.batch_axis or not isinstance(d, int) or d <= 0 or d == n
            for k, (d, n) in enumerate(zip(inp.dims, arr.shape)))
        if not fits:
            raise OnnxdnsError(f"{origin}: array {inp.name} has shape {list(arr.shape)}, the model input is "
                               f"{inp.describe()}")
        out[inp.name] = arr
    return out
