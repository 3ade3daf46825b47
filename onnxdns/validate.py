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
from onnxdns import inputs, runtime, sources
from onnxdns.runtime import ort  # imported on first use: onnxdns[cpu], [cuda] or [train]
from onnxdns.errors import OnnxdnsError

#: Dataset names accepted by ``data=`` besides ``"random"``.
DATASETS = data_module.DATASET_NAMES
DATA_CHOICES = data_module.VALIDATION_CHOICES
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
    #: How the inputs were chosen when it was not the obvious way (fallbacks), one sentence each.
    notes: tuple[str, ...] = ()
    #: The random inputs of one run (``name dtype [shape], ...``); empty for other data.
    inputs: str = ""

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
    plan: inputs.InputPlan | None = None,
) -> Comparison:
    """Run ``model_a`` and ``model_b`` on the same inputs and compare them.

    ``data`` is ``"random"`` (random inputs that fit model A, see
    :func:`onnxdns.inputs.plan_inputs`; ``plan``, or an ``InputPlan`` as ``data``, gives them
    ready-made), a dataset name
    (``"mnist"``, ``"fashion-mnist"``: the test split, models need one input [N, 1, 28, 28]), a
    loaded dataset (an object with ``.images`` and ``.labels``), the path of a ``.npz`` file or
    a mapping of arrays named after the inputs (real inputs, given to the models as they are, in
    one run; see :func:`read_inputs`), or another data source of
    :func:`onnxdns.sources.open_source` (a folder of images, ``.npy``, ``module:function``, a
    :class:`~onnxdns.sources.Source`: run batch by batch in its own order; labels give accuracy).
    ``samples`` limits the number of inputs (default: the
    whole test split, or 256 random ones; at most ``MAX_SAMPLES``). ``latency_batches=()`` skips
    the latency measurement. ``data_dir`` and ``download`` go to :func:`onnxdns.data.load_dataset`.

    Model A is taken as the reference: when it fails on the inputs, the error says so. Outputs
    are compared run by run (shapes and dtypes first); NaN at the same position in both models
    counts as equal, NaN in one only as an infinite difference.
    """
    check_effort(batch=batch, samples=samples, repeats=repeats, warmup=warmup)
    sess_a = _session(model_a, providers, threads, spinning=False)
    sess_b = _session(model_b, providers, threads, spinning=False)
    _check_signatures(sess_a, sess_b)
    if isinstance(data, inputs.InputPlan):
        plan, data = data, "random"
    acc = _Accumulator(sess_a, sess_b)
    real = None if is_user_source(data) else _real_inputs(data, sess_a)
    dataset = None
    if is_user_source(data):
        source = sources.open_source(data, sources.model_inputs(sess_a), split="test")
        data_name = source.name
        step, notes, lat_runs = _compare_source(acc, source, samples, batch, latency_batches)
    elif real is not None:
        data_name, feeds, labels = real
        acc.add(feeds, "the given inputs", _samples_in(feeds), labels)
        step, notes = acc.samples, ()
        lat_runs: list[tuple[int, Any]] = [(step, feeds)] if latency_batches else []
    else:
        dataset, data_name = _resolve_data(data, data_dir, download, (sess_a, sess_b))
        if dataset is None:
            plan = plan or inputs.plan_inputs(sess_a, batch=batch, probe=True, graph=model_a)
            step, notes, lat_runs = _compare_random(acc, plan, samples or RANDOM_SAMPLES, latency_batches)
        else:
            from onnxdns.sources.datasets import DatasetSource

            source = DatasetSource(data_name, sources.model_inputs(sess_a), dataset=dataset)
            step, notes, lat_runs = _compare_source(acc, source, samples, batch, latency_batches)
    rows = []
    for lb, lat_feeds in lat_runs:
        lat = measure_latency({"a": sess_a, "b": sess_b}, lat_feeds, repeats=repeats, warmup=warmup)
        rows.append(LatencyRow(lb, lat["a"], lat["b"]))

    max_abs, mean_abs, scale = acc.max_abs, acc.mean_abs, acc.scale
    return Comparison(
        data=data_name,
        samples=int(acc.samples),
        batch=step,
        providers=tuple(sess_a.get_providers()),
        max_abs_diff=max_abs,
        mean_abs_diff=mean_abs,
        output_scale=scale,
        max_rel_diff=max_abs / scale if scale > 0 else max_abs,
        top1_agreement=acc.agreement,
        accuracy_a=acc.accuracy(acc.correct_a),
        accuracy_b=acc.accuracy(acc.correct_b),
        latency=tuple(rows),
        notes=notes,
        inputs=plan.describe() if plan is not None and real is None and dataset is None else "",
    )


LatencyRuns = list[tuple[int, Any]]


def _compare_random(acc: _Accumulator, plan: inputs.InputPlan, n: int,
                    latency_batches: Sequence[int]) -> tuple[int, tuple[str, ...], LatencyRuns]:
    """Compare on ``n`` random samples made by ``plan``: (batch size, notes, latency runs)."""
    step = plan.batch if plan.batch is not None else _samples_in(plan.feeds(0))
    for i in range(0, n, step):
        size = min(step, n - i) if plan.batch is not None else None
        acc.add(plan.feeds(seed=i, batch=size), plan.describe(size), size or step)
    notes = plan.notes
    if plan.batch is None:  # fixed shapes: one latency row at the model's own size
        return step, notes, [(step, plan.feeds(seed=12345))] if latency_batches else []
    wanted = sorted(set(int(b) for b in latency_batches))
    # a batch the model failed at, or whose inputs exceed the memory budget, is not timed
    kept = [b for b in wanted if (b <= plan.batch or not plan.batch_limited) and plan.nbytes(b) <= inputs.INPUT_BUDGET]
    if kept != wanted:
        notes += (f"latency measured at batch {', '.join(map(str, kept)) or 'none'} only: the inputs use "
                  f"batch {plan.batch}",)
    return step, notes, [(lb, plan.feeds(seed=12345, batch=lb)) for lb in kept]


def _compare_source(acc: _Accumulator, source: sources.Source, samples: int | None, batch: int,
                    latency_batches: Sequence[int]) -> tuple[int, tuple[str, ...], LatencyRuns]:
    """Compare on a :class:`~onnxdns.sources.Source`'s batches, in its own order, up to ``samples``
    samples (a fixed-batch model gets batches of its size; a short last batch is zero-padded when
    it has labels to count, else left out). Latency is timed on the first samples at each of
    ``latency_batches`` (repeated when the source has fewer)."""
    fixed_batch = _fixed_batch(acc.sess_a)
    step = fixed_batch or batch
    wanted = samples or MAX_SAMPLES
    first = None
    notes: tuple[str, ...] = ()
    for b in source.batches(step):
        count = min(len(b), wanted - acc.samples)
        b = b.take(count)
        feeds, labels = b.inputs, b.labels
        if fixed_batch is not None and count < fixed_batch:
            if labels is None:
                notes = (f"the last {count} samples are left out: the model takes batches of exactly {fixed_batch}",)
                break
            feeds = {k: _pad(v, b.axis(k), fixed_batch) for k, v in feeds.items()}
        acc.add(feeds, f"{source.name} {source.unit}", count, labels)
        first = len(b) if first is None else first
        if acc.samples >= wanted:
            break
    if first is None:
        raise OnnxdnsError(f"{source.name}: no samples to compare on")
    if not isinstance(source, sources.IndexedSource):
        step = first  # a function's batches are its own
    return step, notes, [(lb, _first_samples(source, lb)) for lb in _latency_batches(latency_batches, fixed_batch)]


def _pad(array: np.ndarray, axis: int, size: int) -> np.ndarray:
    """``array`` zero-padded to ``size`` samples on ``axis``."""
    shape = list(array.shape)
    shape[axis] = size - shape[axis]
    return np.concatenate([array, np.zeros(shape, array.dtype)], axis=axis)


def _first_samples(source: sources.Source, n: int) -> dict[str, np.ndarray]:
    """Feeds of exactly ``n`` samples: the source's first ones, repeated when it has fewer."""
    parts: list[sources.Batch] = []
    have = 0
    for b in source.batches(n):
        parts.append(b)
        have += len(b)
        if have >= n:
            break
    feeds = {}
    for k in parts[0].inputs:
        axis = parts[0].axis(k)
        v = np.concatenate([p.inputs[k] for p in parts], axis=axis)
        feeds[k] = np.take(v, np.arange(n) % v.shape[axis], axis=axis)
    return feeds


def is_user_source(data: Any) -> bool:
    """True for a :class:`~onnxdns.sources.Source`, or a folder, ``.npy`` or ``module:function``
    spec (a ``.npz`` runs as given, in one run: see :func:`read_inputs`)."""
    return sources.is_source_spec(data) and not is_inputs_file(data)


#: Largest ``samples`` and ``repeats`` accepted (beyond them a run takes hours, not a validation).
MAX_SAMPLES = 10**6
MAX_REPEATS = 10**4


def check_effort(*, batch: int = 1, samples: int | None = None, repeats: int = 1, warmup: int = 0) -> None:
    """One-line :class:`OnnxdnsError` for a batch, sample count or repeat count out of bounds."""
    if batch < 1 or batch > MAX_SAMPLES:
        raise OnnxdnsError(f"batch must be between 1 and {MAX_SAMPLES:,}, got {batch}")
    if samples is not None and not 1 <= samples <= MAX_SAMPLES:
        raise OnnxdnsError(f"samples must be between 1 and {MAX_SAMPLES:,}, got {samples}")
    if not 1 <= repeats <= MAX_REPEATS or not 0 <= warmup <= MAX_REPEATS:
        raise OnnxdnsError(f"repeats must be between 1 and {MAX_REPEATS:,} and warmup between 0 and "
                           f"{MAX_REPEATS:,} (got {repeats}, {warmup})")


class _Accumulator:
    """Runs both models and accumulates differences, output scale, top-1 agreement and accuracy,
    run by run (nothing is concatenated: memory stays one run's outputs)."""

    def __init__(self, sess_a: ort.InferenceSession, sess_b: ort.InferenceSession):
        self.sess_a, self.sess_b = sess_a, sess_b
        self.names = [o.name for o in sess_a.get_outputs()]
        self.max_abs = 0.0
        self.sum_abs = 0.0
        self.count = 0
        self.scale = 0.0
        self.samples = 0
        self.agree = 0
        self.top1_rows = 0
        self.top1 = True
        self.labelled = 0
        self.correct_a = 0
        self.correct_b = 0

    def add(self, feeds: Mapping[str, np.ndarray] | Sequence[np.ndarray], what: str, samples: int,
            labels: np.ndarray | None = None) -> None:
        """Run both models on ``feeds`` (``what`` names them in errors); the first ``samples``
        rows count (the rest is padding)."""
        a = _run(self.sess_a, feeds, f"model A (the reference) fails on {what}")  # about the inputs, not B
        b = _run(self.sess_b, feeds)
        if labels is not None:  # dataset images: drop the padding of a fixed batch
            a, b = [o[:samples] for o in a], [o[:samples] for o in b]
        for name, x, y in zip(self.names, a, b):
            x, y = np.asarray(x), np.asarray(y)
            if x.shape != y.shape:
                raise OnnxdnsError(f"output {name}: shapes differ between the models ({list(x.shape)} vs {list(y.shape)})")
            if x.dtype != y.dtype and not (x.dtype.kind == y.dtype.kind == "f"):
                raise OnnxdnsError(f"output {name}: types differ between the models ({x.dtype} vs {y.dtype})")
            d = output_difference(x, y)
            if d.size:
                self.max_abs = max(self.max_abs, float(d.max()))
                self.sum_abs += float(d.sum())
                self.count += d.size
            finite = np.abs(x[np.isfinite(x)].astype(np.float64)) if x.dtype.kind in "fc" else np.abs(x.astype(np.float64))
            if finite.size:
                self.scale = max(self.scale, float(finite.max()))
        self.samples += samples
        top_a, top_b = _top1(a[0]) if a else None, _top1(b[0]) if b else None
        if top_a is None or top_b is None:
            self.top1 = False
            return
        if labels is not None and len(labels) and int(labels.max()) >= a[0].shape[1]:
            raise OnnxdnsError(f"label {int(labels.max())} out of range 0..{a[0].shape[1] - 1} (the model's "
                               f"{a[0].shape[1]} outputs per sample)")
        self.agree += int(np.sum(top_a == top_b))
        self.top1_rows += len(top_a)
        if labels is not None and len(labels) == len(top_a):
            self.labelled += len(labels)
            self.correct_a += int(np.sum(top_a == labels))
            self.correct_b += int(np.sum(top_b == labels))

    @property
    def mean_abs(self) -> float:
        return self.sum_abs / self.count if self.count else 0.0

    @property
    def agreement(self) -> float | None:
        return self.agree / self.top1_rows if self.top1 and self.top1_rows else None

    def accuracy(self, correct: int) -> float | None:
        return correct / self.labelled if self.top1 and self.labelled else None


def output_difference(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """|y - x| per element in float64: 0 where both are equal (the same infinity, or NaN in
    both), infinite where only one is NaN."""
    xa, yb = x.astype(np.float64), y.astype(np.float64)
    same = (xa == yb) | (np.isnan(xa) & np.isnan(yb))
    with np.errstate(invalid="ignore"):
        d = np.where(same, 0.0, np.abs(xa - yb))
    d[np.isnan(d)] = np.inf
    return d


def _samples_in(feeds: Mapping[str, np.ndarray]) -> int:
    """Samples in one run: the first input's leading dimension, else 1."""
    first = next(iter(feeds.values()), None)
    return int(first.shape[0]) if first is not None and first.ndim else 1


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
    check_effort(repeats=repeats, warmup=warmup)
    sessions = {label: _session(m, providers, threads, spinning=False) for label, m in models.items()}
    bound = {label: _bind(sess, feeds) for label, sess in sessions.items()}
    times: dict[str, list[float]] = {label: [] for label in sessions}
    order = list(sessions)
    label = order[0] if order else ""
    try:
        for _ in range(warmup):
            for label, sess in sessions.items():
                sess.run(None, bound[label])
        for r in range(repeats):
            for label in (order if r % 2 == 0 else order[::-1]):
                t0 = time.perf_counter()
                sessions[label].run(None, bound[label])
                times[label].append((time.perf_counter() - t0) * 1e3)
    except Exception as e:  # onnxruntime's own exception types
        shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in bound[label].items())
        raise OnnxdnsError(f"model {label} fails in the latency measurement on inputs {shapes}: "
                           f"{runtime.ort_message(e)}") from None
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


def read_inputs(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Real model inputs from a ``.npz`` file: one array per graph input, named after it, and an
    optional ``labels`` (read by :func:`onnxdns.sources.arrays.read_arrays`: no pickle, members
    memory-mapped). Other sources (folders, ``.npy``, functions) go through
    :func:`onnxdns.sources.open_source`.
    """
    from onnxdns.sources.arrays import read_arrays

    return read_arrays(path, "inputs (a .npz file with one array per model input)")


def is_inputs_file(data: Any) -> bool:
    """True when ``data`` names a file of real inputs (``FILE.npz``) rather than a dataset."""
    return isinstance(data, (str, os.PathLike)) and os.fspath(data).endswith(".npz")


def check_inputs(model: ModelLike, feeds: Mapping[str, np.ndarray], origin: str = "the data") -> None:
    """One-line :class:`OnnxdnsError` unless ``feeds`` has an array of the right kind and shape
    (rank, fixed dimensions, a fixed batch size included: the arrays run in one pass) for every
    input of ``model``, and nothing else."""
    from onnxdns.sources.model import check_arrays, model_inputs

    sess = model if isinstance(model, ort.InferenceSession) else _session(model, ("CPUExecutionProvider",), 1)
    inputs = model_inputs(sess)
    arrays = check_arrays(inputs, feeds, origin)
    for inp in inputs:
        fixed = inp.dims[inp.batch_axis] if inp.dims else None
        if isinstance(fixed, int) and fixed > 0 and arrays[inp.name].shape[inp.batch_axis] != fixed:
            raise OnnxdnsError(f"{origin}: array {inp.name} has shape {list(arrays[inp.name].shape)}, the model "
                               f"input is {inp.describe()}")


def _real_inputs(data: Any, sess: ort.InferenceSession) -> tuple[str, dict[str, np.ndarray], np.ndarray | None] | None:
    """(name, feeds, labels or None) for real inputs (a ``.npz`` path, optionally with an array
    ``labels``, or a mapping of arrays), else None."""
    labels = None
    if is_inputs_file(data):
        feeds = read_inputs(data)
        name = os.path.basename(os.fspath(data))
        if "labels" in feeds and "labels" not in [i.name for i in sess.get_inputs()]:
            labels = feeds.pop("labels")
    elif isinstance(data, Mapping):
        feeds, name = {k: np.asarray(v) for k, v in data.items()}, "given inputs"
    else:
        return None
    check_inputs(sess, feeds, name)
    types = {i.name: runtime.numpy_dtype(i.type) for i in sess.get_inputs()}
    feeds = {k: np.asarray(v if types[k] is None else v.astype(types[k], copy=False)) for k, v in feeds.items()}
    if labels is not None:
        from onnxdns.sources.base import check_labels

        labels = check_labels(np.asarray(labels), _samples_in(feeds), None, name)
    return name, feeds, labels


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


def _run(sess: ort.InferenceSession, feeds: Mapping[str, np.ndarray] | Sequence[np.ndarray],
         failure: str = "onnxruntime failed to run the model") -> list[np.ndarray]:
    """All outputs of ``sess`` on ``feeds``; an onnxruntime failure is an :class:`OnnxdnsError`
    that starts with ``failure``."""
    try:
        return sess.run(None, _bind(sess, feeds))
    except OnnxdnsError:
        raise
    except Exception as e:  # onnxruntime's own exception types
        raise OnnxdnsError(f"{failure}: {runtime.ort_message(e)}") from None


def _fixed_batch(sess: ort.InferenceSession) -> int | None:
    """The first input's batch dimension (:func:`onnxdns.sources.model.batch_axis`: N of
    [N, C, H, W], batch of [seq, batch, d]) when it is a fixed integer, else None."""
    first = sources.model_inputs(sess)[:1]
    size = first[0].dims[first[0].batch_axis] if first and first[0].dims else None
    return size if isinstance(size, int) and size > 0 else None


def _latency_batches(requested: Sequence[int], fixed: int | None) -> list[int]:
    if not requested:
        return []
    return [fixed] if fixed else sorted(set(int(b) for b in requested))


def _top1(out: np.ndarray) -> np.ndarray | None:
    """Arg-max per sample for [N, classes] outputs (classes > 1), else None."""
    if out.ndim != 2 or out.shape[1] < 2:
        return None
    return np.argmax(out, axis=1)
