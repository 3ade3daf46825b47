"""Inputs that fit a model: dtype, shape and values of random validation inputs
(:func:`plan_inputs`), decided from what onnxruntime reports, the graph's own hints and, when
asked, trial runs of the model."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import numpy as np
import onnx


from onnxdns.errors import OnnxdnsError
from onnxdns.runtime import make_session, numpy_dtype, ort, ort_message

#: Size of a dynamic dimension that is neither a batch dimension nor fixed by a hint (see
#: :func:`plan_inputs` for why 64).
FREE_SIZE = 64
#: Sizes tried, in order, for those dimensions when the model fails on ``FREE_SIZE``.
FREE_SIZES = (FREE_SIZE, 128, 256, 512, 1024)
#: Random integer inputs without a hint are drawn from ``[0, INT_HIGH)`` (token ids, indices).
INT_HIGH = 10
#: Largest size, in bytes, of the random inputs of one run.
INPUT_BUDGET = 1 << 30

BATCH = "batch"  # marker of a batch dimension in InputSpec.dims


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """How to make one graph input: its dtype, its dims (ints, or ``BATCH``) and its values."""

    name: str
    dtype: np.dtype
    #: One entry per axis: a size, or ``BATCH`` (the plan's batch size).
    dims: tuple[int | str, ...]
    #: Declared shape as onnxruntime reports it (ints, names, None), for messages.
    declared: tuple[Any, ...]
    #: Integer inputs: values are drawn from ``[low, high)``; ``value`` fills the whole input instead.
    low: int = 0
    high: int = INT_HIGH
    value: float | int | None = None

    def shape(self, batch: int) -> tuple[int, ...]:
        return tuple(batch if d == BATCH else int(d) for d in self.dims)


@dataclasses.dataclass(frozen=True)
class InputPlan:
    """Random inputs that fit a model: see :func:`plan_inputs`."""

    specs: tuple[InputSpec, ...]
    #: Size of the batch dimensions (None when no input has one: the model takes fixed shapes).
    batch: int | None
    #: What was decided and why (fallbacks), one sentence each.
    notes: tuple[str, ...] = ()
    #: True when ``batch`` is smaller than asked for (the model failed at it, or its inputs did
    #: not fit the memory budget): larger batches are not to be used.
    batch_limited: bool = False

    @property
    def has_batch(self) -> bool:
        return any(BATCH in s.dims for s in self.specs)

    def shapes(self, batch: int | None = None) -> dict[str, tuple[int, ...]]:
        b = self.batch if batch is None else batch
        return {s.name: s.shape(b or 1) for s in self.specs}

    def nbytes(self, batch: int | None = None) -> int:
        return sum(int(np.prod(shape, dtype=object)) * s.dtype.itemsize
                   for s, shape in zip(self.specs, self.shapes(batch).values()))

    def describe(self, batch: int | None = None) -> str:
        """``name dtype [shape]`` of every input, e.g. ``x float32 [32, 3, 64, 64]``."""
        return ", ".join(f"{s.name} {s.dtype.name} {list(shape)}" for s, shape in zip(self.specs, self.shapes(batch).values()))

    def feeds(self, seed: int = 0, batch: int | None = None) -> dict[str, np.ndarray]:
        """Random arrays: standard normal floats, integers in each spec's range, fair bools."""
        rng = np.random.default_rng(seed)
        feeds = {}
        for spec, shape in zip(self.specs, self.shapes(batch).values()):
            if spec.value is not None:
                feeds[spec.name] = np.full(shape, spec.value, dtype=spec.dtype)
            elif spec.dtype == np.bool_:
                feeds[spec.name] = rng.random(shape) < 0.5
            elif np.issubdtype(spec.dtype, np.floating):
                feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
            else:
                feeds[spec.name] = rng.integers(spec.low, spec.high, size=shape).astype(spec.dtype)
        return feeds

    def with_batch(self, batch: int | None, note: str | None = None) -> InputPlan:
        """This plan at another batch size; a ``note`` says why it is smaller than asked for."""
        return dataclasses.replace(self, batch=batch, notes=self.notes + ((note,) if note else ()),
                                   batch_limited=self.batch_limited or note is not None)


def plan_inputs(model: onnx.ModelProto | ort.InferenceSession | str | os.PathLike | bytes, batch: int = 1, *,
                probe: bool = False, budget: int = INPUT_BUDGET, graph: Any = None) -> InputPlan:
    """Decide the random inputs of ``model``: dtype, shape and value range of every graph input.

    Rules, per input as onnxruntime reports it:

    * dtype: float inputs get standard-normal values (float16 and double too), integer inputs
      values in ``[0, INT_HIGH)`` (token ids, class indices), bool inputs fair coin flips.
    * Fixed dimensions are kept. Dynamic dimensions that share a name get one size, across inputs.
    * The model's own hints (graph nodes that read the input directly): a Conv fixes the
      channel dimension to its weight's input channels x group (a BatchNormalization to its
      scale's size), a MatMul or Gemm with a constant weight fixes the contracted dimension, an
      Add/Sub/Mul/Div with a constant fixes the dimensions the constant does not broadcast, a
      Gather with a constant table bounds integer indices to the table's size, and an Equal
      with a constant scalar gives the value (a speech model's ``sr == 16000`` selects its
      16 kHz branch; the input may reach the Equal through Reshape, Squeeze, Unsqueeze,
      Flatten, Cast, Gather or Identity).
    * Batch dimensions get ``batch``: an input's first dynamic dimension that no hint fixes (the
      usual N, or the batch axis of a recurrent state laid out [layers, N, hidden]) and any
      dimension whose name contains "batch" or that shares its name with one.
    * Remaining dynamic dimensions (height, width, sequence length) get ``FREE_SIZE`` = 64: a
      multiple of 32, which detectors with stride-32 feature maps need (the PP-OCRv4 text
      detector fails at 40), and larger than 32, because a net that downsamples by 32 has one
      row left at 32 and then divides by zero: onnxruntime kills the process with SIGFPE, which
      cannot be caught (measured with the PP-OCRv4 text recognizer, input [1, 3, H, 64]: SIGFPE
      for H = 8, 16, 24, 32; runs for H = 40..64; a Concat error for H >= 96; the PP-OCR direction
      classifier fails with an empty GlobalAveragePool at 32x32 and runs at 40x40 and 64x64).

    The inputs of one run must fit in ``budget`` bytes: a batch that does not is reduced; when
    even one sample does not fit, :class:`OnnxdnsError` says so (nothing is allocated).

    ``probe=True`` runs the model once on the planned inputs. When it fails at ``batch`` > 1 the
    batch size falls back to 1, then free dimensions try the other ``FREE_SIZES`` (sizes never
    go below 64, see above); each fallback is recorded in ``notes``. When every try fails,
    :class:`OnnxdnsError` gives onnxruntime's message, untruncated.

    ``graph`` (a proto, path or bytes) gives the hints when ``model`` is a session.
    """
    sess = model if isinstance(model, ort.InferenceSession) else make_session(model)
    proto = _proto_for_hints(model if graph is None else graph)
    specs, free = _plan_specs(sess.get_inputs(), proto)
    plan = InputPlan(tuple(specs), batch)
    if not plan.has_batch:
        plan = plan.with_batch(None)
    plan = _fit_budget(plan, budget)
    if probe:
        plan = _probe(sess, plan, free, budget)
    return plan


def _proto_for_hints(model: Any) -> onnx.ModelProto | None:
    if isinstance(model, onnx.ModelProto):
        return model
    try:
        if isinstance(model, bytes):
            return onnx.load_model_from_string(model)
        if isinstance(model, (str, os.PathLike)):
            return onnx.load_model(str(model), load_external_data=False)
    except Exception:  # hints are optional: a file onnx cannot parse still runs in onnxruntime
        return None
    return None


def _plan_specs(inputs: Sequence[Any], proto: onnx.ModelProto | None) -> tuple[list[InputSpec], list[tuple[int, int]]]:
    """Input specs and the (input index, axis) of every free dimension."""
    hints = _graph_hints(proto)
    batch_names = set()
    for inp in inputs:
        dyn = [d for d in inp.shape if not (isinstance(d, int) and d > 0)]
        if dyn and isinstance(dyn[0], str):
            batch_names.add(dyn[0])
        batch_names.update(d for d in inp.shape if isinstance(d, str) and "batch" in d.lower())
    named: dict[str, int | str] = {}  # dim name -> size or BATCH
    specs, free = [], []
    for idx, inp in enumerate(inputs):
        dtype = numpy_dtype(inp.type)
        if dtype is None:
            raise OnnxdnsError(f"input {inp.name}: cannot make random data of type {inp.type}; give real inputs with --data FILE.npz")
        shape = list(inp.shape)
        hint = hints.get(inp.name, {})
        dims: list[int | str] = []
        first_dynamic = True
        for axis, d in enumerate(shape):
            if isinstance(d, int) and d > 0:
                dims.append(d)
                continue
            hinted = hint.get("dims", {}).get(axis - len(shape)) or hint.get("dims", {}).get(axis)
            size: int | str | None = None
            if isinstance(d, str) and d in named:
                size = named[d]
            elif hinted:
                size = hinted
            elif first_dynamic or (isinstance(d, str) and d in batch_names):
                size = BATCH
            first_dynamic = False
            if size is None:
                size = FREE_SIZE
                free.append((idx, axis))
            if isinstance(d, str):
                named[d] = size
            dims.append(size)
        specs.append(InputSpec(inp.name, dtype, tuple(dims), tuple(shape),
                               low=hint.get("low", 0), high=hint.get("high", INT_HIGH), value=hint.get("value")))
    return specs, free


def _graph_hints(proto: onnx.ModelProto | None) -> dict[str, dict[str, Any]]:
    """Per graph input: sizes of some axes (keys: axis, or axis - rank when counted from the end),
    integer ranges and constant values, read from the nodes that consume the input directly."""
    if proto is None:
        return {}
    g = proto.graph
    shapes = {t.name: tuple(t.dims) for t in g.initializer}
    values: dict[str, np.ndarray] = {}
    for n in g.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            values[n.output[0]] = onnx.numpy_helper.to_array(n.attribute[0].t)
            shapes[n.output[0]] = tuple(n.attribute[0].t.dims)
    for t in g.initializer:
        if int(np.prod(t.dims)) == 1 and not t.data_location:
            values[t.name] = onnx.numpy_helper.to_array(t)
    inputs = {i.name for i in g.input} - {t.name for t in g.initializer}
    hints: dict[str, dict[str, Any]] = {}

    def put(name: str, axis: int, size: int) -> None:
        if size > 0:
            hints.setdefault(name, {}).setdefault("dims", {}).setdefault(axis, int(size))

    # values that carry a graph input's elements unchanged (a scalar reshaped, picked, cast)
    origin = {name: name for name in inputs}
    for n in g.node:
        if n.op_type in _VALUE_PRESERVING and n.input and n.input[0] in origin:
            origin.update((o, origin[n.input[0]]) for o in n.output)
    for n in g.node:
        if n.op_type == "Equal" and len(n.input) == 2:
            for x, c in (list(n.input), list(n.input)[::-1]):
                if x in origin and c in values and values[c].size == 1:
                    hints.setdefault(origin[x], {}).setdefault("value", values[c].reshape(()).item())

    for n in g.node:
        ins = list(n.input)
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        if n.op_type == "Conv" and len(ins) > 1 and ins[0] in inputs and ins[1] in shapes and len(shapes[ins[1]]) > 1:
            put(ins[0], 1, shapes[ins[1]][1] * int(attrs.get("group", 1)))
        elif n.op_type in ("BatchNormalization", "InstanceNormalization") and ins[0] in inputs and ins[1] in shapes:
            put(ins[0], 1, shapes[ins[1]][0] if shapes[ins[1]] else 0)
        elif n.op_type == "MatMul" and len(ins) == 2 and ins[0] in inputs and len(shapes.get(ins[1], ())) == 2:
            put(ins[0], -1, shapes[ins[1]][0])
        elif n.op_type == "Gemm" and ins[0] in inputs and len(shapes.get(ins[1], ())) == 2:
            put(ins[0], 0 if attrs.get("transA", 0) else -1, shapes[ins[1]][1 if attrs.get("transB", 0) else 0])
        elif n.op_type in ("Add", "Sub", "Mul", "Div") and len(ins) == 2:
            for x, c in (ins, ins[::-1]):
                if x in inputs and c in shapes:
                    for k, size in enumerate(reversed(shapes[c])):
                        if size > 1:
                            put(x, -1 - k, size)
        elif n.op_type == "Gather" and len(ins) == 2 and ins[1] in inputs and ins[0] in shapes and shapes[ins[0]]:
            table, axis = shapes[ins[0]], int(attrs.get("axis", 0))
            if -len(table) <= axis < len(table) and table[axis] > 0:
                hints.setdefault(ins[1], {}).setdefault("high", int(table[axis]))
    return hints


_VALUE_PRESERVING = {"Identity", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Cast", "Gather"}


def _fit_budget(plan: InputPlan, budget: int) -> InputPlan:
    """``plan`` with a batch reduced so the inputs of one run fit in ``budget`` bytes."""
    if plan.nbytes() <= budget:
        return plan
    one = plan.nbytes(1)
    if one > budget:
        raise OnnxdnsError(
            f"random validation inputs would need {_gib(one)} for one sample ({plan.describe(1)}), over the "
            f"{_gib(budget)} budget; give smaller real inputs with --data FILE.npz or skip validation with --no-validate")
    fit = max(1, budget // one)
    return plan.with_batch(fit, f"batch {plan.batch} would need {_gib(plan.nbytes())} of inputs; batch {fit} fits the "
                                f"{_gib(budget)} budget")


def _gib(n: int) -> str:
    return f"{n / 2**30:.3g} GiB" if n >= 2**30 else f"{n / 2**20:.3g} MiB"


def _probe(sess: ort.InferenceSession, plan: InputPlan, free: list[tuple[int, int]], budget: int) -> InputPlan:
    """``plan``, or the first fallback on which ``sess`` runs (see :func:`plan_inputs`)."""
    error = _try_run(sess, plan)
    if error is None:
        return plan
    first_error = error
    batches = [plan.batch] + ([1] if plan.batch is not None and plan.batch > 1 else [])
    names = ", ".join(f"{plan.specs[i].name}[{a}]" for i, a in free)
    for size in FREE_SIZES if free else FREE_SIZES[:1]:
        specs = list(plan.specs)
        for idx, axis in free:
            dims = list(specs[idx].dims)
            dims[axis] = size
            specs[idx] = dataclasses.replace(specs[idx], dims=tuple(dims))
        for batch in batches:
            candidate = dataclasses.replace(plan, specs=tuple(specs), batch=batch)
            if candidate.nbytes() > budget or (size == FREE_SIZE and batch == plan.batch):
                continue
            error = _try_run(sess, candidate)
            if error is None:
                notes = []
                if batch != plan.batch:
                    notes.append(f"the input model fails at batch {plan.batch} ({first_error}); validating at batch 1")
                if size != FREE_SIZE:
                    notes.append(f"the input model fails with dynamic dimensions {names} = {FREE_SIZE}; they are {size}"
                                 + ("" if batch != plan.batch else f" ({first_error})"))
                return dataclasses.replace(candidate, notes=plan.notes + tuple(notes),
                                           batch_limited=plan.batch_limited or batch != plan.batch)
    also = "; at batch 1 too" if len(batches) > 1 else ""
    raise OnnxdnsError(f"the input model fails on random inputs ({plan.describe()}{also}): {first_error}; "
                       f"give real inputs with --data FILE.npz")


def _try_run(sess: ort.InferenceSession, plan: InputPlan) -> str | None:
    """None when ``sess`` runs on one batch of ``plan``'s inputs, else onnxruntime's message."""
    quiet = ort.RunOptions()
    quiet.log_severity_level = 4  # the failure is reported by the caller, or a fallback works
    try:
        sess.run(None, plan.feeds(0), quiet)
    except Exception as e:  # onnxruntime's own exception types
        return ort_message(e)
    return None
