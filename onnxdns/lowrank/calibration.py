"""Calibration data for ``sparse-lowrank``: model inputs, and layer activations from onnxruntime.

Activations are read by exposing the needed values as extra graph outputs of a *pruned copy* of
the model (only the nodes those values depend on; the caller's model is never touched) and
running it in onnxruntime on the calibration inputs, batch by batch. Of each layer only sampled
rows are kept: for a convolution, the im2col patch of its input at a few random output positions
of every image, with the pre-activation output there; for a Gemm/MatMul, input rows. The rows of
an image are drawn from a generator seeded by ``(seed, layer, image)``, so the original model and
a partly split one are sampled at the same positions, whatever the batch size.
The last ``eval_fraction`` of the images give held-out rows for reporting errors.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from onnxdns import runtime
from onnxdns.errors import OnnxdnsError
from onnxdns.lowrank.layers import Geometry, Layer

#: Bytes of activations one capture batch may hold (sets the batch size).
BATCH_BYTES = 1 << 28
#: Largest float32 calibration input array (samples x input size) that calibration accepts.
MAX_CALIBRATION_BYTES = 1 << 32


def model_input(proto: onnx.ModelProto) -> tuple[str, tuple[int, ...]]:
    """Name and per-sample shape of the model's single input (static apart from the batch)."""
    inits = {i.name for i in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise OnnxdnsError(f"sparse-lowrank calibrates models with one input; this one has {len(inputs)}")
    dims = inputs[0].type.tensor_type.shape.dim
    shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in dims)[1:]
    if any(d is None or d <= 0 for d in shape):
        raise OnnxdnsError(f"input '{inputs[0].name}' needs static dimensions after the batch, got {list(shape)}")
    return inputs[0].name, shape


def ir_model_input(model: ir.Model) -> tuple[str, tuple[int, ...]]:
    """:func:`model_input` for an onnx-ir model (no serialization)."""
    inputs = [v for v in model.graph.inputs if not v.is_initializer()]
    if len(inputs) != 1:
        raise OnnxdnsError(f"sparse-lowrank calibrates models with one input; this one has {len(inputs)}")
    dims = list(inputs[0].shape) if inputs[0].shape is not None else []
    shape = tuple(dims[1:])
    if not dims or any(not isinstance(d, int) or d <= 0 for d in shape):
        raise OnnxdnsError(f"input '{inputs[0].name}' needs static dimensions after the batch, got {list(shape)}")
    return str(inputs[0].name), tuple(int(d) for d in shape)


def calibration_inputs(calib_data: Any, shape: tuple[int, ...], samples: int, *, seed: int = 0,
                       data_dir: str | None = None) -> tuple[np.ndarray, str]:
    """``samples`` model inputs of per-sample ``shape`` and a description of where they came from.

    ``calib_data``: ``None`` (standard-normal inputs: for tests only), a dataset name of
    :mod:`onnxdns.data` (a random subset of its train split; 1-channel 28x28 images are resized
    bilinearly to the model's H x W and repeated over its channels), or an array ``[N, ...]`` of
    inputs (images ``[N, 1 or C, h, w]`` are resized the same way).
    """
    if samples < 1:
        raise OnnxdnsError(f"calibration needs at least one sample, got {samples}")
    if calib_data is None:
        _check_size(samples, shape)
        rng = np.random.default_rng(seed)
        return rng.standard_normal((samples, *shape)).astype(np.float32), "random (standard normal)"
    if isinstance(calib_data, str):
        from onnxdns.data import load_dataset, subset

        ds = load_dataset(calib_data, "train", data_dir=data_dir)
        _check_size(min(samples, len(ds)), shape)
        ds = subset(ds, min(samples, len(ds)), seed)
        return fit_images(np.asarray(ds.images, np.float32), shape), f"{calib_data} train ({len(ds)} images)"
    array = _checked_array(calib_data, samples)
    _check_size(len(array), shape)
    if tuple(array.shape[1:]) != tuple(shape):
        array = fit_images(array, shape)
    return np.ascontiguousarray(array), f"array ({len(array)} samples)"


def _checked_array(calib_data: Any, samples: int) -> np.ndarray:
    """The first ``samples`` rows of a user's calibration array as float32, refusing what would
    make calibration fail or silently wrong: strings, objects, structured records, no samples,
    NaN or infinity (also after the float32 conversion, e.g. 1e300)."""
    array = np.asarray(calib_data)
    if array.dtype.fields is not None or array.dtype.kind not in "biuf":
        raise OnnxdnsError(f"calibration array must hold numbers, got dtype {array.dtype}")
    if array.ndim < 2:
        raise OnnxdnsError(f"calibration array must be [N, ...], got shape {list(array.shape)}")
    if array.size == 0:
        raise OnnxdnsError(f"calibration array is empty (shape {list(array.shape)})")
    array = array[:samples].astype(np.float32)
    bad = ~np.isfinite(array)
    if bad.any():
        raise OnnxdnsError(f"calibration array holds {int(bad.sum())} NaN or infinite value(s) in float32 "
                           f"(first at index {list(map(int, np.argwhere(bad)[0]))})")
    return array


def _check_size(samples: int, shape: tuple[int, ...]) -> None:
    """Refuse calibration inputs that would not fit in memory (float32 at the model's input size)."""
    size = samples * math.prod(shape) * 4
    if size > MAX_CALIBRATION_BYTES:
        raise OnnxdnsError(f"{samples} calibration inputs of shape {list(shape)} need {size / 2**30:.1f} GiB "
                           f"(at most {MAX_CALIBRATION_BYTES / 2**30:.0f} GiB); use fewer calibration samples")


def fit_images(images: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Resize images ``[N, c, h, w]`` to ``shape`` = (C, H, W): bilinear, channels repeated if c = 1."""
    if images.ndim != 4 or len(shape) != 3 or images.shape[1] not in (1, shape[0]):
        raise OnnxdnsError(f"calibration inputs of shape {list(images.shape[1:])} do not fit "
                           f"the model input {list(shape)}")
    c, h, w = shape
    ah = _interpolation(images.shape[2], h)
    aw = _interpolation(images.shape[3], w)
    out = np.einsum("hi,ncij,wj->nchw", ah, images, aw, optimize=True).astype(np.float32)
    return np.ascontiguousarray(np.broadcast_to(out, (out.shape[0], c, h, w)) if out.shape[1] != c else out)


def _interpolation(n_in: int, n_out: int) -> np.ndarray:
    """Bilinear interpolation matrix (n_out, n_in), half-pixel centres (torch align_corners=False)."""
    a = np.zeros((n_out, n_in), np.float32)
    pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = (pos - lo).astype(np.float32)
    a[np.arange(n_out), lo] += 1 - frac
    a[np.arange(n_out), hi] += frac
    return a


def prefix_model(proto: onnx.ModelProto, outputs: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``proto`` whose outputs are ``outputs``, keeping only the nodes they depend on."""
    graph = proto.graph
    needed = set(outputs)
    kept = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
    kept.reverse()
    out = onnx.ModelProto()
    out.ir_version = proto.ir_version
    out.opset_import.extend(proto.opset_import)
    out.functions.extend(proto.functions)
    g = out.graph
    g.name = graph.name
    g.node.extend(kept)
    g.input.extend(i for i in graph.input if i.name in needed)
    g.initializer.extend(t for t in graph.initializer if t.name in needed)
    g.sparse_initializer.extend(t for t in graph.sparse_initializer if t.values.name in needed)
    for name in outputs:
        g.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return out


@dataclasses.dataclass
class Rows:
    """Sampled rows of one layer: inputs ``x`` and (when captured) pre-activations ``z``."""

    x: np.ndarray
    z: np.ndarray | None
    x_eval: np.ndarray
    z_eval: np.ndarray | None
    geometry: Geometry


@dataclasses.dataclass(frozen=True)
class Plan:
    """How many images are for fitting and how many rows each image gives per layer."""

    fit_images: int
    eval_images: int

    @classmethod
    def split(cls, n_images: int, eval_fraction: float) -> "Plan":
        n_eval = int(round(n_images * eval_fraction))
        n_eval = min(max(n_eval, 1 if n_images > 1 else 0), n_images - 1)
        return cls(n_images - n_eval, n_eval)

    @staticmethod
    def per_image(target_rows: int, images: int, positions: int) -> int:
        return int(min(positions, max(1, math.ceil(target_rows / max(images, 1)))))


def capture(proto: onnx.ModelProto, layers: Sequence[Layer], images: np.ndarray, plan: Plan,
            target_rows: Callable[[Geometry], int], *, preact: bool = True, seed: int = 0, threads: int = 0,
            progress: Callable[[int], None] | None = None) -> dict[int, Rows]:
    """Rows of every layer in ``layers`` from one onnxruntime run over ``images`` per batch.

    ``target_rows(geometry)`` is the number of fit rows wanted for a layer (known once its
    positions per sample are seen); held-out rows are a quarter of that, from the last
    ``plan.eval_images`` images. With ``preact=False`` only the layer inputs are read.
    """
    input_name, _ = model_input(proto)
    names = []
    for layer in layers:
        names.append(layer.input_name)
        if preact:
            names.append(layer.output_name)
    names = list(dict.fromkeys(names))
    session = runtime.make_session(prefix_model(proto, names), threads=threads)
    per_sample = images[0].size * 4 * 64
    batch = int(max(1, min(256, BATCH_BYTES // max(per_sample, 1))))
    collected: dict[int, dict[str, list[np.ndarray]]] = {
        layer.index: {"x": [], "z": [], "xe": [], "ze": []} for layer in layers}
    geometries: dict[int, Geometry] = {}
    counts: dict[int, tuple[int, int]] = {}
    for start in range(0, len(images), batch):
        chunk = images[start:start + batch]
        outs = dict(zip(names, session.run(names, {input_name: chunk})))
        for layer in layers:
            x = outs[layer.input_name]
            z = outs[layer.output_name] if preact else None
            if layer.index not in geometries:
                geometries[layer.index] = _observed(layer.geometry, x)
                geom = geometries[layer.index]
                want = target_rows(geom)
                counts[layer.index] = (Plan.per_image(want, plan.fit_images, geom.positions),
                                       Plan.per_image(max(want // 4, 1), plan.eval_images, geom.positions))
            geom = geometries[layer.index]
            for b in range(len(chunk)):
                image = start + b
                held_out = image >= plan.fit_images
                k = counts[layer.index][1 if held_out else 0]
                rng = np.random.default_rng([seed, layer.index, image])
                pos = (rng.choice(geom.positions, size=k, replace=False) if k < geom.positions
                       else np.arange(geom.positions))
                xs, zs = _rows(layer.geometry, x[b], None if z is None else z[b], pos)
                bucket = collected[layer.index]
                bucket["xe" if held_out else "x"].append(xs)
                if zs is not None:
                    bucket["ze" if held_out else "z"].append(zs)
        if progress is not None:
            progress(len(chunk))
    result = {}
    for layer in layers:
        bucket = collected[layer.index]
        cat = (lambda key: np.concatenate(bucket[key]).astype(np.float32) if bucket[key] else None)
        x_eval = cat("xe")
        result[layer.index] = Rows(cat("x"), cat("z"), x_eval if x_eval is not None else cat("x"),
                                   (cat("ze") if bucket["ze"] else cat("z")) if preact else None,
                                   geometries[layer.index])
    return result


def _observed(geometry: Geometry, x: np.ndarray) -> Geometry:
    """``geometry`` with the per-sample input shape and output positions seen at run time."""
    if geometry.op == "Conv":
        h, w = x.shape[2:]
        kh, kw = geometry.kernel
        sh, sw = geometry.strides
        dh, dw = geometry.dilations
        pt, pl, pb, pr = geometry.pads
        oh = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
        ow = (w + pl + pr - dw * (kw - 1) - 1) // sw + 1
        positions = oh * ow
    else:
        positions = int(math.prod(x.shape[1:-1])) if x.ndim > 2 else 1
    return dataclasses.replace(geometry, input_shape=tuple(int(s) for s in x.shape[1:]), positions=int(positions))


def _rows(geometry: Geometry, x: np.ndarray, z: np.ndarray | None,
          pos: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Input rows (and pre-activation rows) of one sample at output positions ``pos``."""
    if geometry.op != "Conv":
        xr = x.reshape(-1, x.shape[-1])[pos]
        zr = None if z is None else z.reshape(-1, z.shape[-1])[pos]
        return xr, zr
    c, h, w = x.shape
    kh, kw = geometry.kernel
    sh, sw = geometry.strides
    dh, dw = geometry.dilations
    pt, pl, pb, pr = geometry.pads
    xp = np.pad(x, ((0, 0), (pt, pb), (pl, pr))) if any(geometry.pads) else x
    ow = (w + pl + pr - dw * (kw - 1) - 1) // sw + 1
    oi, oj = pos // ow, pos % ow
    ii = oi[:, None] * sh + np.arange(kh)[None, :] * dh  # (n, kh)
    jj = oj[:, None] * sw + np.arange(kw)[None, :] * dw  # (n, kw)
    patches = xp[:, ii[:, :, None], jj[:, None, :]]  # (C, n, kh, kw)
    xr = patches.transpose(1, 0, 2, 3).reshape(len(pos), c * kh * kw)
    zr = None if z is None else z.reshape(z.shape[0], -1)[:, pos].T
    return xr, zr
