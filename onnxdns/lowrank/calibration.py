"""Calibration data for ``sparse-lowrank``: model inputs, and layer activations from onnxruntime.

Activations are read by exposing the needed values as extra graph outputs of a *pruned copy* of
the model (only the nodes those values depend on; the caller's model is never touched) and
running it in onnxruntime on the calibration inputs, batch by batch. Of each layer only sampled
rows are kept: for a convolution, the im2col patch of its input at a few random output positions
of every image, with the pre-activation output there (rows drawn from a generator seeded by
``(seed, layer, image)``); for a Gemm/MatMul, rows of its input with every leading axis flattened
(``[seq, batch, d]`` and ``[batch, seq, d]`` alike: only the last axis is the feature axis),
drawn per capture batch (seeded by ``(seed, layer, first sample)``; the batches are the same in
every capture). The original model and a partly split one are thus sampled at the same positions.
The last ``eval_fraction`` of the samples give held-out rows for reporting errors.

Model inputs (:class:`Inputs`): one array per graph input, of its dtype (float images, int64
token ids, bool masks, ...), the samples stacked on the input's batch axis, read from the graph
(:func:`input_specs`: the dimension named like ``batch``, else the first symbolic one, else 0).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from onnxdns import runtime
from onnxdns.errors import OnnxdnsError
from onnxdns.lowrank.layers import Geometry, Layer
from onnxdns.sources import ModelInput, Source, is_source_spec, open_source
from onnxdns.sources.model import batch_axis

#: Bytes of activations one capture batch may hold (sets the batch size).
BATCH_BYTES = 1 << 28
#: Largest float32 calibration input array (samples x input size) that calibration accepts.
MAX_CALIBRATION_BYTES = 1 << 32


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """One graph input: name, numpy dtype, dimensions (int, or the symbolic name / None) and the
    axis its samples are stacked on (the batch axis)."""

    name: str
    dtype: np.dtype
    dims: tuple[int | str | None, ...]
    batch_axis: int

    def describe(self) -> str:
        shown = ",".join(str(d) if d is not None else "?" for d in self.dims)
        return f"'{self.name}' {self.dtype.name} [{shown}]"


def input_specs(model: onnx.ModelProto | ir.Model) -> list[InputSpec]:
    """The graph inputs of ``model`` (initializers excluded) with their batch axis.

    The batch axis is the dimension whose symbolic name says so (``batch``, ``N``, ...), else the
    first symbolic dimension, else axis 0: a ``[seq, batch, d]`` input has its samples on axis 1.
    """
    specs = []
    if isinstance(model, onnx.ModelProto):
        inits = {i.name for i in model.graph.initializer}
        for value in model.graph.input:
            if value.name in inits:
                continue
            tensor = value.type.tensor_type
            if not value.type.HasField("tensor_type"):
                raise OnnxdnsError(f"sparse-lowrank: input '{value.name}' is not a tensor")
            dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim)
            specs.append(_spec(value.name, tensor.elem_type, dims))
    else:
        for value in model.graph.inputs:
            if value.is_initializer():
                continue
            if not isinstance(value.type, ir.TensorType):
                raise OnnxdnsError(f"sparse-lowrank: input '{value.name}' is not a tensor")
            dims = tuple(d if isinstance(d, int) else (d.value if isinstance(d, ir.SymbolicDim) else None)
                         for d in (value.shape or ()))
            specs.append(_spec(str(value.name), int(value.dtype), dims))
    if not specs:
        raise OnnxdnsError("sparse-lowrank: the model has no inputs to calibrate with")
    return specs


def _spec(name: str, elem_type: int, dims: tuple) -> InputSpec:
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))
    except (KeyError, TypeError, ValueError):
        raise OnnxdnsError(f"sparse-lowrank: input '{name}' has an unsupported type ({elem_type})") from None
    return InputSpec(name, dtype, dims, batch_axis(dims))


@dataclasses.dataclass
class Inputs:
    """Calibration inputs: one array per model input, the samples stacked on each input's batch
    axis (``axes``); every input holds the same number of samples. ``step``: the batch size the
    model takes when it is static (every run then feeds exactly that many samples), else None."""

    arrays: dict[str, np.ndarray]
    axes: dict[str, int]
    step: int | None = None

    def __len__(self) -> int:
        return min(int(a.shape[self.axes[n]]) for n, a in self.arrays.items())

    def feeds(self, start: int = 0, stop: int | None = None) -> dict[str, np.ndarray]:
        """The model feeds of samples ``start:stop``."""
        return {n: np.ascontiguousarray(_take(a, self.axes[n], start, stop)) for n, a in self.arrays.items()}

    def slice(self, start: int = 0, stop: int | None = None) -> "Inputs":
        return Inputs(self.feeds(start, stop), dict(self.axes), self.step)

    def repeat_to(self, n: int) -> dict[str, np.ndarray]:
        """Feeds of exactly ``n`` samples (the first ones, cycled when there are fewer)."""
        idx = np.arange(n) % max(len(self), 1)
        return {k: np.ascontiguousarray(np.take(a, idx, axis=self.axes[k])) for k, a in self.arrays.items()}

    @property
    def sample_bytes(self) -> int:
        return int(sum(a.nbytes // max(a.shape[self.axes[n]], 1) for n, a in self.arrays.items()))


def _take(array: np.ndarray, axis: int, start: int, stop: int | None) -> np.ndarray:
    index = [slice(None)] * array.ndim
    index[axis] = slice(start, stop)
    return array[tuple(index)]


def calibration_inputs(calib_data: Any, specs: Sequence[InputSpec], samples: int, *, seed: int = 0,
                       data_dir: str | None = None, model: onnx.ModelProto | None = None) -> tuple[Inputs, str]:
    """``samples`` model inputs and a description of where they came from.

    ``calib_data``: ``None`` (random inputs of the right dtypes from
    :func:`onnxdns.runtime.input_feeds`, needs ``model``: for tests only), a dataset name of
    :mod:`onnxdns.data` (a random subset of its train split; 1-channel 28x28 images are resized
    bilinearly to the model's H x W and repeated over its channels; one image input), an array of
    inputs for a one-input model (images ``[N, 1 or C, h, w]`` are resized the same way), or a
    mapping (a dict, or the ``NpzFile`` of an ``.npz``) from input names to arrays, samples
    stacked on each input's batch axis, or any data source of :func:`onnxdns.sources.open_source`
    (a folder of images, ``module:function``, an opened :class:`~onnxdns.sources.Source`: its
    first ``samples`` samples in the order of ``seed``). Arrays are cast to the input types
    (integers and booleans only from integer or boolean data).
    """
    if samples < 1:
        raise OnnxdnsError(f"calibration needs at least one sample, got {samples}")
    specs = list(specs)
    axes = {s.name: s.batch_axis for s in specs}
    step = static_batch(specs)
    if calib_data is None:
        if model is None:
            raise OnnxdnsError("random calibration inputs need the model")
        _check_size(samples, specs)
        runs = [runtime.input_feeds(model, batch=samples, seed=seed)] if step is None else \
            [runtime.input_feeds(model, batch=step, seed=seed + i) for i in range(-(-samples // step))]
        arrays = {s.name: np.concatenate([r[s.name] for r in runs], axis=axes[s.name]) for s in specs}
        return _whole(Inputs(arrays, axes, step).slice(0, samples)), "random (runtime.input_feeds)"
    if isinstance(calib_data, Source) or (isinstance(calib_data, str) and is_source_spec(calib_data)
                                          and not calib_data.endswith((".npz", ".npy"))):
        _check_size(samples, specs)
        calib_data, origin = _gather(calib_data, specs, samples, seed)
    else:
        origin = None
    if isinstance(calib_data, str):
        spec = _single(specs, f"the dataset '{calib_data}'")
        shape = tuple(spec.dims[1:])
        if spec.dtype.kind != "f" or len(spec.dims) != 4 or any(not isinstance(d, int) or d <= 0 for d in shape):
            raise OnnxdnsError(f"the dataset '{calib_data}' gives images [N, C, H, W]; model input "
                               f"{spec.describe()} needs static C, H, W; give an array or .npz of inputs")
        from onnxdns.data import load_dataset, subset

        ds = load_dataset(calib_data, "train", data_dir=data_dir)
        _check_size(min(samples, len(ds)), specs)
        ds = subset(ds, min(samples, len(ds)), seed)
        images = fit_images(np.asarray(ds.images, np.float32), shape).astype(spec.dtype, copy=False)
        return _whole(Inputs({spec.name: images}, {spec.name: 0}, step)), f"{calib_data} train ({len(ds)} images)"
    if isinstance(calib_data, Mapping) or hasattr(calib_data, "files"):
        names = list(calib_data.files) if hasattr(calib_data, "files") else list(calib_data)
        wanted = [s.name for s in specs]
        if sorted(names) != sorted(wanted):
            raise OnnxdnsError(f"calibration arrays {names} must be named after the model inputs {wanted}")
        arrays = {s.name: _cast(np.asarray(calib_data[s.name]), s) for s in specs}
    else:
        spec = _single(specs, "a single calibration array")
        array = np.asarray(calib_data)
        if array.ndim >= 2 and array.dtype.kind in "fiub" and spec.dtype.kind == "f" and len(spec.dims) == 4 \
                and spec.batch_axis == 0 and all(isinstance(d, int) and d > 0 for d in spec.dims[1:]) \
                and tuple(array.shape[1:]) != tuple(spec.dims[1:]):
            array = fit_images(array.astype(np.float32), tuple(spec.dims[1:]))
        arrays = {spec.name: _cast(array, spec)}
    counts = {n: a.shape[axes[n]] for n, a in arrays.items()}
    if len(set(counts.values())) != 1:
        raise OnnxdnsError(f"calibration arrays hold different numbers of samples on their batch axes: {counts}")
    if min(counts.values()) < 2:
        raise OnnxdnsError(f"calibration needs at least 2 samples, got {min(counts.values())}")
    for name, a in arrays.items():
        bad = int(np.count_nonzero(~np.isfinite(a))) if a.dtype.kind == "f" else 0
        if bad:
            raise OnnxdnsError(f"calibration array for input '{name}' holds {bad} NaN or infinite value(s) "
                               f"as {a.dtype.name}")
    inputs = _whole(Inputs(arrays, axes, step).slice(0, samples))
    kind = "array" if len(arrays) == 1 else "arrays"
    return inputs, f"{origin or kind} ({len(inputs)} samples)"


def _gather(data: Any, specs: Sequence[InputSpec], samples: int, seed: int) -> tuple[dict[str, np.ndarray], str]:
    """The first ``samples`` samples of a data source (shuffled by ``seed``), stacked per input."""
    inputs = [ModelInput(s.name, s.dtype, s.dims, s.batch_axis) for s in specs]
    source = open_source(data, inputs)
    parts: dict[str, list[np.ndarray]] = {s.name: [] for s in specs}
    have = 0
    for batch in source.batches(min(samples, 256), seed=seed):
        first = batch.take(min(samples - have, len(batch)))
        for s in specs:
            parts[s.name].append(first.inputs[s.name])
        have += len(first)
        if have >= samples:
            break
    if not have:
        raise OnnxdnsError(f"{source.name}: no calibration samples")
    return {s.name: np.concatenate(parts[s.name], axis=s.batch_axis) for s in specs}, source.name


def static_batch(specs: Sequence[InputSpec]) -> int | None:
    """The batch size the model takes when its inputs fix it (e.g. ``[1, 3, 224, 224]``), else None."""
    sizes = {s.dims[s.batch_axis] for s in specs if s.dims and isinstance(s.dims[s.batch_axis], int)
             and s.dims[s.batch_axis] > 0}
    if len(sizes) > 1:
        raise OnnxdnsError(f"sparse-lowrank: the model inputs fix different batch sizes {sorted(sizes)}")
    return sizes.pop() if sizes else None


def _whole(inputs: Inputs) -> Inputs:
    """``inputs`` cut to a whole number of the model's static batches."""
    if not inputs.step:
        return inputs
    n = len(inputs) // inputs.step * inputs.step
    if n < 2 * inputs.step:
        raise OnnxdnsError(f"the model takes batches of exactly {inputs.step} samples; calibration needs at least "
                           f"{2 * inputs.step} samples, got {len(inputs)}")
    return inputs.slice(0, n)


def _single(specs: list[InputSpec], what: str) -> InputSpec:
    if len(specs) != 1:
        names = ", ".join(s.name for s in specs)
        raise OnnxdnsError(f"{what} suits a model with one input; this one has {len(specs)} ({names}): give a "
                           f"dict or .npz of arrays named after them")
    return specs[0]


def _cast(array: np.ndarray, spec: InputSpec) -> np.ndarray:
    """``array`` as ``spec``'s dtype, checked against its kind, rank and static dimensions."""
    if array.dtype.fields is not None or array.dtype.kind not in "fiub":
        raise OnnxdnsError(f"model input {spec.describe()} needs numbers, got calibration data of dtype {array.dtype}")
    if spec.dtype.kind in "iub" and array.dtype.kind not in "iub":
        raise OnnxdnsError(f"model input {spec.describe()} needs integer or boolean data, got {array.dtype.name}")
    if array.ndim != len(spec.dims) or array.ndim == 0:
        raise OnnxdnsError(f"calibration array of shape {list(array.shape)} does not fit model input {spec.describe()}")
    for axis, (got, want) in enumerate(zip(array.shape, spec.dims)):
        if axis != spec.batch_axis and isinstance(want, int) and want > 0 and got != want:
            raise OnnxdnsError(f"calibration array of shape {list(array.shape)} does not fit model input "
                               f"{spec.describe()}")
    if array.dtype == spec.dtype:
        return array
    return array.astype(spec.dtype)


def _check_size(samples: int, specs: Sequence[InputSpec]) -> None:
    """Refuse calibration inputs that would not fit in memory (``samples`` samples of every input,
    at its dtype and static dimensions; a dynamic non-batch dimension counts as 1)."""
    per_sample = sum(np.dtype(s.dtype).itemsize * math.prod(d if isinstance(d, int) and d > 0 else 1
                                                            for a, d in enumerate(s.dims) if a != s.batch_axis)
                     for s in specs)
    size = samples * per_sample
    if size > MAX_CALIBRATION_BYTES:
        raise OnnxdnsError(f"{samples} calibration samples need {size / 2**30:.1f} GiB "
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
    def split(cls, n_images: int, eval_fraction: float, step: int = 1) -> "Plan":
        """``step``: the held-out part is a whole number of the model's static batches."""
        n_eval = int(round(n_images * eval_fraction / step)) * step
        n_eval = min(max(n_eval, step if n_images > step else 0), n_images - step)
        return cls(n_images - n_eval, n_eval)

    @staticmethod
    def per_image(target_rows: int, images: int, positions: int) -> int:
        return int(min(positions, max(1, math.ceil(target_rows / max(images, 1)))))


def chunks(inputs: Inputs, plan: Plan) -> list[tuple[int, int]]:
    """Capture batches ``(start, stop)``: sized by :data:`BATCH_BYTES`, never straddling the end of
    the fit images (a batch is all fit or all held-out)."""
    per_sample = max(inputs.sample_bytes, 4) * 64
    batch = inputs.step or int(max(1, min(256, BATCH_BYTES // per_sample)))
    bounds = []
    for lo, hi in ((0, plan.fit_images), (plan.fit_images, len(inputs))):
        bounds.extend((s, min(s + batch, hi)) for s in range(lo, hi, batch))
    return bounds


def capture(proto: onnx.ModelProto, layers: Sequence[Layer], inputs: Inputs, plan: Plan,
            target_rows: Callable[[Geometry], int], *, preact: bool = True, seed: int = 0, threads: int = 0,
            progress: Callable[[int], None] | None = None) -> dict[int, Rows]:
    """Rows of every layer in ``layers`` from one onnxruntime run over ``inputs`` per batch.

    ``target_rows(geometry)`` is the number of fit rows wanted for a layer (known once its
    positions per sample are seen); held-out rows are a quarter of that, from the last
    ``plan.eval_images`` samples. With ``preact=False`` only the layer inputs are read.

    A convolution's input is ``[batch, C, H, W]``: rows are drawn per image. A Gemm/MatMul input
    may hold its samples on any leading axis (``[seq, batch, d]`` or ``[batch, seq, d]``): its
    rows are all leading axes flattened (only the last axis is the feature axis), drawn per
    capture batch (the batches are the same in every capture).
    """
    names = []
    for layer in layers:
        names.append(layer.input_name)
        if preact:
            names.append(layer.output_name)
    names = list(dict.fromkeys(names))
    session = runtime.make_session(prefix_model(proto, names), threads=threads)
    collected: dict[int, dict[str, list[np.ndarray]]] = {
        layer.index: {"x": [], "z": [], "xe": [], "ze": []} for layer in layers}
    geometries: dict[int, Geometry] = {}
    counts: dict[int, tuple[int, int]] = {}
    for start, stop in chunks(inputs, plan):
        n = stop - start
        feeds = inputs.feeds(start, stop)
        outs = dict(zip(names, run(session, names, feeds)))
        # a graph input read as an output may come back aliasing the feed's memory: use the feed itself
        outs.update((name, feeds[name]) for name in names if name in feeds)
        held_out = start >= plan.fit_images
        for layer in layers:
            x = outs[layer.input_name]
            z = outs[layer.output_name] if preact else None
            if layer.index not in geometries:
                geometries[layer.index] = _observed(layer.geometry, x, n)
                geom = geometries[layer.index]
                want = target_rows(geom)
                counts[layer.index] = (Plan.per_image(want, plan.fit_images, geom.positions),
                                       Plan.per_image(max(want // 4, 1), plan.eval_images, geom.positions))
            geom = geometries[layer.index]
            k = counts[layer.index][1 if held_out else 0]
            bucket = collected[layer.index]
            if layer.geometry.op == "Conv":
                for b in range(x.shape[0]):
                    rng = np.random.default_rng([seed, layer.index, start + b])
                    pos = (rng.choice(geom.positions, size=k, replace=False) if k < geom.positions
                           else np.arange(geom.positions))
                    xs, zs = _rows(layer.geometry, x[b], None if z is None else z[b], pos)
                    bucket["xe" if held_out else "x"].append(xs)
                    if zs is not None:
                        bucket["ze" if held_out else "z"].append(zs)
            else:
                xr = x.reshape(-1, x.shape[-1])
                total = xr.shape[0]
                want_rows = k * n
                rng = np.random.default_rng([seed, layer.index, start])
                pos = np.sort(rng.choice(total, size=want_rows, replace=False)) if want_rows < total else slice(None)
                bucket["xe" if held_out else "x"].append(xr[pos])
                if z is not None:
                    bucket["ze" if held_out else "z"].append(z.reshape(-1, z.shape[-1])[pos])
        if progress is not None:
            progress(n)
    result = {}
    for layer in layers:
        bucket = collected[layer.index]
        cat = (lambda key: np.concatenate(bucket[key]).astype(np.float32) if bucket[key] else None)
        x_eval = cat("xe")
        result[layer.index] = Rows(cat("x"), cat("z"), x_eval if x_eval is not None else cat("x"),
                                   (cat("ze") if bucket["ze"] else cat("z")) if preact else None,
                                   geometries[layer.index])
    return result


def run(session, names: Sequence[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """``session.run`` on the feeds the session takes (a pruned copy may need fewer inputs); an
    onnxruntime failure on the calibration inputs is a user error."""
    wanted = {i.name for i in session.get_inputs()}
    feeds = {k: v for k, v in feeds.items() if k in wanted}
    try:
        return session.run(names, feeds)
    except Exception as e:  # onnxruntime raises its own exception types (RuntimeException, InvalidArgument, ...)
        shapes = ", ".join(f"{k} {v.dtype.name}{list(v.shape)}" for k, v in feeds.items())
        lines = str(e).strip().splitlines()
        raise OnnxdnsError(f"onnxruntime cannot run the model on the calibration inputs ({shapes}): "
                           f"{lines[0] if lines else type(e).__name__}") from None


def _observed(geometry: Geometry, x: np.ndarray, samples: int) -> Geometry:
    """``geometry`` with the per-sample input shape and output positions seen at run time
    (``x``: the layer input of ``samples`` model samples)."""
    if geometry.op == "Conv":
        h, w = x.shape[2:]
        kh, kw = geometry.kernel
        sh, sw = geometry.strides
        dh, dw = geometry.dilations
        pt, pl, pb, pr = geometry.pads
        oh = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
        ow = (w + pl + pr - dw * (kw - 1) - 1) // sw + 1
        positions = oh * ow
        shape = tuple(int(s) for s in x.shape[1:])
    else:
        positions = max(1, x.size // max(x.shape[-1], 1) // max(samples, 1))
        shape = (positions, int(x.shape[-1])) if positions > 1 else (int(x.shape[-1]),)
    return dataclasses.replace(geometry, input_shape=shape, positions=int(positions))


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
