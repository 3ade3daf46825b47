"""Compare two models with onnxruntime: output differences, top-1 agreement, accuracy, latency.

Both models run in the same process on the same inputs. Latency is measured side by side
(:func:`measure_latency`): warm-up runs, then interleaved A/B repeats (the order alternates
every repeat so neither model always runs on a warmer cache), reporting the median. Sessions
made for a comparison do not spin-wait: each session owns an intra-op thread pool, and a pool
still spinning after its run takes cores from the next session (measured on this 2-core
machine, the Fashion-MNIST VGG-16 of benchmarks/sparse_lowrank.py at batch 64 on two threads:
68 ms per run interleaved with two other sessions when they spin, 31 ms when they do not).
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from typing import Any, Mapping, Sequence, TypeAlias

import numpy as np
import onnx

from onnxdns import data as data_module
from onnxdns import runtime
from onnxdns.runtime import ort  # imported on first use: onnxdns[cpu], [cuda] or [train]
from onnxdns.errors import OnnxdnsError

#: Dataset names accepted by ``data=`` besides ``"random"``.
DATASETS = tuple(data_module.DATASETS)
DATA_CHOICES = ("random", *DATASETS)
#: Input shape (after the batch dimension) that the datasets provide.
IMAGE_SHAPE = (1, 28, 28)
#: Samples compared when ``data="random"`` and no count is given.
RANDOM_SAMPLES = 256

#: Float input types that feeds are cast to (an fp16 model gets the same data as its fp32 source).
_FLOAT_INPUTS = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}

ModelLike: TypeAlias = "onnx.ModelProto | str | os.PathLike | bytes | ort.InferenceSession"


@dataclasses.dataclass(frozen=True)
class Latency:
    """Wall-clock time of one ``InferenceSession.run`` call, in milliseconds."""

    median_ms: float
    min_ms: float
    repeats: int


@dataclasses.dataclass(frozen=True)
class LatencyRow:
    """Latency of model A and model B at one batch size."""

    batch: int
    a: Latency
    b: Latency

    @property
    def ratio(self) -> float:
        """Median latency of A over B: above 1 means B is faster."""
        return self.a.median_ms / self.b.median_ms if self.b.median_ms > 0 else float("inf")


@dataclasses.dataclass(frozen=True)
class Comparison:
    """Outcome of :func:`compare` (differences are B minus A over every output element)."""

    data: str
    samples: int
    batch: int
    providers: tuple[str, ...]
    max_abs_diff: float
    mean_abs_diff: float
    #: Largest absolute value in A's outputs.
    output_scale: float
    #: ``max_abs_diff / output_scale``.
    max_rel_diff: float
    #: Fraction of samples whose arg-max agrees (None when the output is not [N, classes]).
    top1_agreement: float | None
    #: Accuracy on the dataset's test split (None for random data).
    accuracy_a: float | None
    accuracy_b: float | None
    latency: tuple[LatencyRow, ...]

    def within(self, tolerance: float) -> bool:
        """True when ``max_abs_diff <= tolerance * max(1, output_scale)`` (NaN never is)."""
        return bool(self.max_abs_diff <= tolerance * max(1.0, self.output_scale))


# --------------------------------------------------------------------------- comparison


def compare(
    model_a: ModelLike,
    model_b: ModelLike,
    *,
    data: str | Any = "random",
    batch: int = 32,
    samples: int | None = None,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    latency_batches: Sequence[int] = (1, 32),
    repeats: int = 20,
    warmup: int = 3,
    threads: int = 0,
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
) -> Comparison:
    """Run ``model_a`` and ``model_b`` on the same inputs and compare them.

    ``data`` is ``"random"`` (standard-normal inputs for every graph input), a dataset name
    (``"mnist"``, ``"fashion-mnist"``: the test split, models need one input [N, 1, 28, 28]) or a
    loaded dataset (an object with ``.images`` and ``.labels``). ``samples`` limits the number of
    inputs (default: the whole test split, or 256 random ones). ``latency_batches=()`` skips
    the latency measurement. ``data_dir`` and ``download`` go to :func:`onnxdns.data.load_dataset`.
    """
    if batch < 1:
        raise OnnxdnsError(f"batch must be a positive integer, got {batch}")
    if samples is not None and samples < 1:
        raise OnnxdnsError(f"samples must be a positive integer, got {samples}")
    sess_a = _session(model_a, providers, threads, spinning=False)
    sess_b = _session(model_b, providers, threads, spinning=False)
    _check_signatures(sess_a, sess_b)
    dataset, data_name = _resolve_data(data, data_dir, download, (sess_a, sess_b))
    fixed_batch = _fixed_batch(sess_a)
    step = fixed_batch or batch

    labels: np.ndarray | None = None
    if dataset is None:
        a, b, n = _outputs_on_random(sess_a, sess_b, samples or RANDOM_SAMPLES, step, fixed=fixed_batch is not None)
    else:
        images = np.asarray(dataset.images, dtype=np.float32)
        n = min(samples or len(images), len(images))
        labels = np.asarray(dataset.labels)[:n]
        a, b = _outputs_on_images(sess_a, sess_b, images[:n], step, fixed=fixed_batch is not None)
    for k, (x, y) in enumerate(zip(a, b)):
        if x.shape != y.shape:
            raise OnnxdnsError(f"output {k}: shapes differ between the models ({list(x.shape)} vs {list(y.shape)})")
    diffs = [np.abs(x.astype(np.float64) - y.astype(np.float64)).reshape(-1) for x, y in zip(a, b)]
    all_diff = np.concatenate(diffs) if diffs else np.zeros(1)
    max_abs = float(np.max(all_diff)) if all_diff.size else 0.0
    mean_abs = float(np.mean(all_diff)) if all_diff.size else 0.0
    scale = max((float(np.max(np.abs(x.astype(np.float64)))) if x.size else 0.0) for x in a)
    top_a = _top1(a[0])
    top_b = _top1(b[0])
    agreement = float(np.mean(top_a == top_b)) if top_a is not None and top_b is not None else None
    acc_a = acc_b = None
    if labels is not None and top_a is not None and top_b is not None and len(top_a) == len(labels):
        acc_a = float(np.mean(top_a == labels))
        acc_b = float(np.mean(top_b == labels))

    rows = []
    for lb in _latency_batches(latency_batches, fixed_batch):
        if dataset is not None:
            feeds: Any = [_latency_images(dataset, lb)]
        else:
            feeds = runtime.input_feeds(sess_a, batch=lb, seed=12345)
        lat = measure_latency({"a": sess_a, "b": sess_b}, feeds, repeats=repeats, warmup=warmup)
        rows.append(LatencyRow(lb, lat["a"], lat["b"]))

    return Comparison(
        data=data_name,
        samples=int(n),
        batch=step,
        providers=tuple(sess_a.get_providers()),
        max_abs_diff=max_abs,
        mean_abs_diff=mean_abs,
        output_scale=scale,
        max_rel_diff=max_abs / scale if scale > 0 else max_abs,
        top1_agreement=agreement,
        accuracy_a=acc_a,
        accuracy_b=acc_b,
        latency=tuple(rows),
    )


def _outputs_on_random(sess_a: ort.InferenceSession, sess_b: ort.InferenceSession, n: int, step: int,
                       fixed: bool) -> tuple[list[np.ndarray], list[np.ndarray], int]:
    """Outputs of both models on ``n`` standard-normal samples (whole batches for a fixed batch)."""
    outs_a, outs_b, count = [], [], 0
    for i in range(0, n, step):
        size = step if fixed else min(step, n - i)
        feeds = runtime.input_feeds(sess_a, batch=size, seed=i)
        outs_a.append(_run(sess_a, feeds))
        outs_b.append(_run(sess_b, feeds))
        first = next(iter(feeds.values()), None)
        count += int(first.shape[0]) if first is not None and first.ndim else size
    return _concat(outs_a), _concat(outs_b), count


def _outputs_on_images(sess_a: ort.InferenceSession, sess_b: ort.InferenceSession, images: np.ndarray,
                       step: int, fixed: bool) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Outputs of both models on ``images``; a fixed-batch model gets its last batch zero-padded."""
    outs_a, outs_b = [], []
    for i in range(0, len(images), step):
        chunk = images[i:i + step]
        real = len(chunk)
        if fixed and real < step:
            chunk = np.concatenate([chunk, np.zeros((step - real, *IMAGE_SHAPE), np.float32)])
        outs_a.append([o[:real] for o in _run(sess_a, [chunk])])
        outs_b.append([o[:real] for o in _run(sess_b, [chunk])])
    return _concat(outs_a), _concat(outs_b)


def _concat(batches: list[list[np.ndarray]]) -> list[np.ndarray]:
    """Per output, the batches joined along the first axis (scalar outputs stacked)."""
    return [np.concatenate([b[k] for b in batches]) if batches[0][k].ndim else np.stack([b[k] for b in batches])
            for k in range(len(batches[0]))]


# --------------------------------------------------------------------------- latency


def measure_latency(
    models: Mapping[str, ModelLike],
    feeds: Mapping[str, np.ndarray] | Sequence[np.ndarray],
    *,
    repeats: int = 20,
    warmup: int = 3,
    threads: int = 0,
    providers: Sequence[str] = ("CPUExecutionProvider",),
) -> dict[str, Latency]:
    """Median latency of each model on the same ``feeds``, measured side by side.

    ``models`` maps a label to a model (proto, path, bytes or an existing ``InferenceSession``,
    used as is). ``feeds`` is a name -> array mapping, or a sequence of arrays given to the
    inputs in order (for models whose input names differ); arrays are cast to each model's input
    type. Each repeat runs every model once, alternating the order between repeats.
    ``threads`` fixes onnxruntime's intra-op thread count (0: onnxruntime decides) for the
    sessions created here; they do not spin-wait (see the module docstring; a session passed in
    is used as it is).
    """
    if repeats < 1 or warmup < 0:
        raise OnnxdnsError(f"repeats must be >= 1 and warmup >= 0 (got {repeats}, {warmup})")
    sessions = {label: _session(m, providers, threads, spinning=False) for label, m in models.items()}
    bound = {label: _bind(sess, feeds) for label, sess in sessions.items()}
    for _ in range(warmup):
        for label, sess in sessions.items():
            sess.run(None, bound[label])
    times: dict[str, list[float]] = {label: [] for label in sessions}
    order = list(sessions)
    for r in range(repeats):
        for label in (order if r % 2 == 0 else order[::-1]):
            t0 = time.perf_counter()
            sessions[label].run(None, bound[label])
            times[label].append((time.perf_counter() - t0) * 1e3)
    return {label: Latency(statistics.median(t), min(t), repeats) for label, t in times.items()}


# --------------------------------------------------------------------------- inputs and data


def check_image_input(model: ModelLike, data: str) -> None:
    """Raise :class:`OnnxdnsError` unless the model takes one float input [N, 1, 28, 28]."""
    sess = model if isinstance(model, ort.InferenceSession) else _session(model, ("CPUExecutionProvider",), 1)
    inputs = sess.get_inputs()
    if len(inputs) != 1:
        names = ", ".join(i.name for i in inputs)
        raise OnnxdnsError(f"--data {data} needs a model with one image input [N,1,28,28]; this one has {len(inputs)} inputs ({names})")
    inp = inputs[0]
    shape = list(inp.shape)
    ok = (
        inp.type in ("tensor(float)", "tensor(float16)")
        and len(shape) == 4
        and all(not isinstance(d, int) or d == e for d, e in zip(shape[1:], IMAGE_SHAPE))
    )
    if not ok:
        shown = ",".join(str(d) if isinstance(d, int) else "N" for d in shape)
        raise OnnxdnsError(
            f"--data {data} gives [N,1,28,28] float images, but model input '{inp.name}' is {inp.type} [{shown}]; "
            f"use --data random"
        )


def load_data(name: str, data_dir: str | os.PathLike | None = None, download: bool = False) -> data_module.Dataset:
    """The test split of a dataset, with a one-line error when it is unknown or missing."""
    if name not in DATASETS:
        raise OnnxdnsError(f"unknown data '{name}'; choose one of: {', '.join(DATA_CHOICES)}")
    try:
        return data_module.load_dataset(name, split="test", data_dir=data_dir, download=download)
    except OSError as e:
        raise OnnxdnsError(f"{name} test data unavailable: {e.strerror or e}"
                           + (f": {e.filename}" if getattr(e, "filename", None) else "")) from None


def _resolve_data(data: str | Any, data_dir: str | os.PathLike | None, download: bool,
                  sessions: Sequence[ort.InferenceSession]) -> tuple[Any, str]:
    """(dataset or None for random inputs, its name); the models' inputs are checked first."""
    if isinstance(data, str):
        if data == "random":
            return None, "random"
        if data not in DATASETS:
            raise OnnxdnsError(f"unknown data '{data}'; choose one of: {', '.join(DATA_CHOICES)}")
        name = data
    elif hasattr(data, "images") and hasattr(data, "labels"):
        name = str(getattr(data, "name", "dataset"))
    else:
        raise TypeError("data must be 'random', a dataset name, or an object with .images and .labels")
    for sess in sessions:
        check_image_input(sess, name)
    return (load_data(data, data_dir, download) if isinstance(data, str) else data), name


def _latency_images(dataset: Any, n: int) -> np.ndarray:
    images = np.asarray(dataset.images[:n], dtype=np.float32)
    if len(images) < n:
        images = np.resize(images, (n, *IMAGE_SHAPE))
    return images


def _session(model: ModelLike, providers: Sequence[str], threads: int, *, spinning: bool = True) -> ort.InferenceSession:
    if isinstance(model, ort.InferenceSession):
        return model
    return runtime.make_session(model, providers=providers, threads=threads, spinning=spinning)


def _check_signatures(a: ort.InferenceSession, b: ort.InferenceSession) -> None:
    ia, ib = a.get_inputs(), b.get_inputs()
    if len(ia) != len(ib):
        raise OnnxdnsError(f"the models take different numbers of inputs ({len(ia)} vs {len(ib)})")
    oa, ob = a.get_outputs(), b.get_outputs()
    if len(oa) != len(ob):
        raise OnnxdnsError(f"the models give different numbers of outputs ({len(oa)} vs {len(ob)})")


def _bind(sess: ort.InferenceSession, feeds: Mapping[str, np.ndarray] | Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """Feeds for ``sess``: by name when the names match, else by position; cast to its input types."""
    inputs = sess.get_inputs()
    if isinstance(feeds, Mapping):
        if all(i.name in feeds for i in inputs):
            arrays = [feeds[i.name] for i in inputs]
        elif len(feeds) == len(inputs):
            arrays = list(feeds.values())
        else:
            raise OnnxdnsError(f"model inputs {[i.name for i in inputs]} do not match the data {list(feeds)}")
    else:
        arrays = list(feeds)
        if len(arrays) != len(inputs):
            raise OnnxdnsError(f"model takes {len(inputs)} inputs, data has {len(arrays)}")
    bound = {}
    for inp, arr in zip(inputs, arrays):
        dtype = _FLOAT_INPUTS.get(inp.type)
        bound[inp.name] = arr.astype(dtype, copy=False) if dtype is not None and arr.dtype.kind == "f" else arr
    return bound


def _run(sess: ort.InferenceSession, feeds: Mapping[str, np.ndarray] | Sequence[np.ndarray]) -> list[np.ndarray]:
    try:
        return sess.run(None, _bind(sess, feeds))
    except OnnxdnsError:
        raise
    except Exception as e:  # onnxruntime's own exception types
        msg = str(e).strip().splitlines()
        raise OnnxdnsError(f"onnxruntime failed to run the model: {msg[0] if msg else type(e).__name__}") from None


def _fixed_batch(sess: ort.InferenceSession) -> int | None:
    """The first input's leading dimension when it is a fixed integer, else None."""
    shape = sess.get_inputs()[0].shape if sess.get_inputs() else []
    return shape[0] if shape and isinstance(shape[0], int) and shape[0] > 0 else None


def _latency_batches(requested: Sequence[int], fixed: int | None) -> list[int]:
    if not requested:
        return []
    return [fixed] if fixed else sorted(set(int(b) for b in requested))


def _top1(out: np.ndarray) -> np.ndarray | None:
    """Arg-max per sample for [N, classes] outputs (classes > 1), else None."""
    if out.ndim != 2 or out.shape[1] < 2:
        return None
    return np.argmax(out, axis=1)
