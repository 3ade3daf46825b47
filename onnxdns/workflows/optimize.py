"""``optimize``: the pass pipeline of a target (or named passes) run on a model, the output written,
checked and validated against the input with onnxruntime.

``optimize`` never touches its input file: the result is written atomically to another path,
then checked (onnx full check + shape inference), loaded in onnxruntime (always, even without
numeric validation) and compared with the input in onnxruntime.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import onnx
import onnx_ir as ir
from onnx import numpy_helper

from onnxdns import modelio, pipelines, runtime
from onnxdns.errors import OnnxdnsError
from onnxdns.stats import ModelStats, model_stats

if TYPE_CHECKING:
    from onnxdns.validate import Comparison

# onnxdns.validate and onnxdns.runtime are imported where used: importing onnxruntime-training
# takes seconds (it imports torch), which `onnxdns inspect` does not need.

#: Exact pipelines fail validation when max abs diff > EXACT_TOLERANCE x max(1, output scale).
EXACT_TOLERANCE = 1e-4
#: Bound for pipelines whose only inexact pass is ``convert-fp16`` (fp16 keeps ~3 decimal digits
#: per operation; errors add up over layers): max abs diff <= FP16_TOLERANCE x max(1, output scale).
FP16_TOLERANCE = 1e-2
FP16_PASS = "convert-fp16"


@dataclasses.dataclass(frozen=True)
class PassRun:
    """What one pass did in :func:`optimize`."""

    name: str
    modified: bool
    seconds: float
    details: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Validation:
    """How the optimized model was checked.

    ``status`` is ``"passed"``, ``"failed"``, ``"reported"`` (lossy passes ran: differences are
    reported, no bound applies), ``"structure-only"`` (no numeric comparison possible or asked
    for; the structure was checked and the output loads in onnxruntime). Whatever the status,
    an output that does not load in onnxruntime has failed; a structure-check failure the input
    shares (same message) is noted in ``message``, not failed.
    """

    status: str
    message: str
    comparison: Comparison | None = None
    #: The largest max abs diff allowed (None when no bound applies).
    bound: float | None = None

    @property
    def ok(self) -> bool:
        return self.status != "failed"


@dataclasses.dataclass(frozen=True)
class OptimizeResult:
    input_path: Path
    output_path: Path
    target: str
    precision: str
    passes: tuple[PassRun, ...]
    before: ModelStats
    after: ModelStats
    validation: Validation

    @property
    def ok(self) -> bool:
        return self.validation.ok


def optimize(
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    *,
    target: str = "cpu",
    precision: str = "fp32",
    passes: Sequence[str] | None = None,
    validate: bool = True,
    data: str = "random",
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    samples: int | None = None,
    pass_options: Mapping[str, Mapping[str, Any]] | None = None,
    external_data: bool | None = None,
) -> OptimizeResult:
    """Run the ``target`` pipeline (or the passes named in ``passes``) and save the result.

    ``pass_options`` gives constructor arguments per pass, keyed by the pass name with ``_`` for
    ``-`` (e.g. ``{"sparse_lowrank": {"calib_data": "fashion-mnist", "target_speedup": 2.5}}``).

    The saved model is validated against the input: exact pipelines must match within
    ``EXACT_TOLERANCE`` x max(1, output scale), fp16 ones within ``FP16_TOLERANCE`` x the same;
    pipelines with other lossy passes get their differences reported. With ``validate=False``
    the output is still checked: onnx's structure checks and an onnxruntime session. A failed
    validation is reported in the result (``result.ok`` is False); the output file is kept.

    ``data`` is ``"random"`` (inputs that fit the model, see :func:`onnxdns.inputs.plan_inputs`),
    a dataset name, a ``.npz`` file of real inputs (one array per model input), or any other data
    source of :func:`onnxdns.sources.open_source` (a folder of images, ``.npy``, ``module:function``,
    an opened :class:`~onnxdns.sources.Source`). The inputs are
    decided, and the input model run on them, before anything is written: a model that cannot
    run on them, or inputs over the memory budget, is an :class:`OnnxdnsError`.

    ``external_data``: True writes the output's initializers to ``<output>.data``; None (default)
    does so when the input has external data or the output would exceed protobuf's 2 GB limit.
    Initializers the passes do not change are not copied in memory (external ones stay mapped).
    """
    from onnxdns.inputs import InputPlan
    from onnxdns.runtime import has_cuda
    from onnxdns.validate import DATA_CHOICES, check_effort, is_inputs_file, is_user_source

    src, out = Path(input_path), Path(output_path)
    modelio.check_output(out, src)
    pipelines.check_target(target, precision)
    if passes is None:
        pipeline = pipelines.get_pipeline(target, precision, **(pass_options or {}))
    else:
        pipeline = pipelines.custom_pipeline(list(passes), target, **(pass_options or {}))
        if precision == "fp16" and FP16_PASS not in passes:
            raise OnnxdnsError(f"--precision fp16 with --passes needs '{FP16_PASS}' in the pass list")
    if data not in DATA_CHOICES and not is_inputs_file(data) and not is_user_source(data):
        raise OnnxdnsError(f"unknown data '{data}'; choose one of: {', '.join(DATA_CHOICES)}, or FILE.npz")
    if validate:
        check_effort(samples=samples)

    loaded = modelio.load_ir(src)
    before_files = tuple(loaded.data_files)
    before = model_stats(loaded.proto, file_bytes=loaded.disk_bytes, model_path=src)
    checked = _validation_inputs(src, loaded.proto, data, data_dir, download, samples, before.macs,
                                 numeric=validate and not (any(p.name == FP16_PASS for p in pipeline) and not has_cuda()),
                                 large=before.file_bytes >= runtime.NO_PREPACK_BYTES)
    if isinstance(checked, InputPlan):
        samples = _validation_effort(before.macs, "random", samples)["samples"]
    loaded.proto = None
    if external_data is None and loaded.external:
        external_data = True

    ir_model, applied = loaded.model, None
    del loaded
    runs = []
    for pass_ in pipeline:
        t0 = time.perf_counter()
        try:
            applied = pass_.apply(ir_model)
        except ir.passes.PreconditionError as e:
            raise OnnxdnsError(f"pass '{pass_.name}' cannot run on this model: {_reason(e)}") from None
        runs.append(PassRun(pass_.name, bool(applied.modified), time.perf_counter() - t0, dict(applied.details)))
        ir_model = applied.model
        modelio.release_mapped(ir_model)

    try:
        modelio.save_model(ir_model, out, protect=(src, *before_files), external_data=external_data)
    except OSError as e:
        raise OnnxdnsError(f"{out}: cannot write the output: {e.strerror or e}") from None
    del ir_model, applied
    if before.file_bytes >= COLLECT_BYTES:  # a full collection costs ~0.1 s: only where it frees much
        gc.collect()  # onnx-ir graphs hold reference cycles: free the weights' mappings before the sessions
    proto, out_bytes = modelio.parse_model(out)
    after = model_stats(proto, file_bytes=out_bytes, model_path=out)
    del proto

    exact = all(getattr(p, "exact", False) for p in pipeline)
    fp16 = any(p.name == FP16_PASS for p in pipeline)
    lossy = list(dict.fromkeys(p.name for p in pipeline if not getattr(p, "exact", False) and p.name != FP16_PASS))
    # Compared with the input file, untouched on disk (the in-memory proto shares buffers with the passes' model).
    validation = _validate_output(src, out, target=target, fp16=fp16, exact=exact, lossy=lossy,
                                  numeric=validate, data=checked, samples=samples,
                                  macs=before.macs, source_bytes=before.file_bytes)
    return OptimizeResult(src, out, target, precision, tuple(runs), before, after, validation)


# --------------------------------------------------------------------------- helpers


def _validation_inputs(path: Path, model: onnx.ModelProto, data: Any, data_dir: Any, download: bool,
                       samples: int | None, macs: int, numeric: bool, large: bool = False) -> Any:
    """What optimize validates on, decided before anything is written: a dataset, real inputs
    checked against the model, or an :class:`~onnxdns.inputs.InputPlan` of random inputs on
    which the input model runs (fallbacks noted); the unchanged ``data`` when not validating.
    Sessions are made from ``path`` (so external data is found; a ``large`` model's on its
    memory-mapped weights); ``model`` (its weights not read) gives the graph."""
    from onnxdns.inputs import plan_inputs
    from onnxdns import sources
    from onnxdns.validate import check_image_input, check_inputs, is_inputs_file, is_user_source, load_data, read_inputs

    if not numeric:
        return data
    if large and data == "random":
        # A session made now, even freed before the passes, raised VGG-16's peak from 2.1x to 3.0x
        # its bytes: large models get their random inputs planned (and probed) by the comparison,
        # on the sessions it makes anyway. A model that cannot run them then fails validation.
        return data
    if large:  # one session on the mapped weights for the checks below, not a copy per check
        path = runtime.mapped_session(path, spinning=False)
    if is_user_source(data):  # every sample validation reads is decoded once now: a bad file writes nothing
        source = sources.open_source(data, sources.model_inputs(model), split="test")
        source.check(samples)
        return source
    if is_inputs_file(data):
        feeds = read_inputs(data)
        if "labels" in feeds and "labels" not in {i.name for i in model.graph.input}:
            feeds.pop("labels")
        check_inputs(path, feeds, os.path.basename(os.fspath(data)))
        return data
    if data != "random":
        check_image_input(path, data)
        return load_data(data, data_dir, download)
    effort = _validation_effort(macs, "random", samples)
    return plan_inputs(path, batch=min(effort["batch"], effort["samples"]), probe=True, graph=model)



def _reason(e: BaseException) -> str:
    """The innermost non-empty message of an exception chain, as one line.

    onnx-ir wraps an exception raised in ``requires`` as "Pre-condition for pass ... failed"; the
    pass's own reason is its cause.
    """
    text = ""
    while e is not None:
        text = str(e).strip() or text
        e = e.__cause__
    return text.splitlines()[0] if text else "unknown reason"


#: Models of at least this many bytes on disk have their passes' graph collected (``gc``) before
#: the validation sessions, so that its weights and mappings are freed first.
COLLECT_BYTES = 64 * 2**20

#: Multiply-accumulates that optimize's validation may spend on random inputs (a few seconds).
VALIDATION_MACS = 4 * 10**10


def _validation_effort(macs: int, data: Any, samples: int | None) -> dict[str, Any]:
    """Samples and latency runs for validating a model of ``macs`` MACs per sample.

    Small models get 256 random samples (run 32 at a time) and latency at batch 1 and 32; large
    ones (VGG-16 on ImageNet: 15.5 GMACs) fewer samples, run one at a time, and latency at batch
    1 only, so validation stays within seconds and the activations' memory small.
    Dataset validation always uses the whole test split unless ``samples`` is given.
    """
    macs = max(int(macs), 1)
    if samples is None and data == "random":
        samples = int(min(256, max(8, VALIDATION_MACS // macs)))
    small = 32 * macs * 10 <= VALIDATION_MACS
    # large ones run one sample at a time: activations of a batch (VGG-16, 8 samples: ~0.5 GB
    # per session) would outweigh the shared, memory-mapped weights
    return {"samples": samples, "latency_batches": (1, 32) if small else (1,), "repeats": 10 if small else 3,
            "batch": 32 if small else 1}


def _check_structure(path: Path) -> str | None:
    """None when the saved model passes onnx's checker and its full check (strict shape inference).

    Large initializers are not read (see :func:`onnxdns.modelio.parse_model`): onnx.checker
    sees them as stubs (:func:`onnxdns.modelio.checker_view`), shape inference needs their dims only.
    onnx's shape inference types sparse initializers as ``sparse_tensor``, which no standard
    operator accepts (onnxruntime densifies them at load time), so the full check runs on a copy
    whose sparse initializers are stored densely.
    """
    try:
        model, _ = modelio.parse_model(path)  # large initializers stay on disk, unread
        onnx.checker.check_model(modelio.checker_view(model))
        if model.graph.sparse_initializer:
            for sp in model.graph.sparse_initializer:
                model.graph.initializer.append(numpy_helper.from_array(modelio.sparse_to_array(sp), sp.values.name))
            del model.graph.sparse_initializer[:]
        # the full check's second half (strict shape inference), on the weightless parse
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except Exception as e:  # the checker and shape inference raise several types
        return _reason(e)
    return None


#: What the structure note says when the output passes onnx's checks.
STRUCTURE_OK = "structure checked (onnx full check + shape inference)"


def _structure(source: Path, out: Path) -> tuple[str | None, str]:
    """(why the output fails its structure check, or None; the note for the validation message).

    A failure the input has too, with the same message, is a property of the input (e.g. onnx's
    node test test_mvn: the MeanVarianceNormalization function body fails onnx's own shape
    inference, in 1.16 and 1.23): noted, not a failure of the output. onnx's check stops at the
    first error, so an error of the output's own can hide behind the input's; the onnxruntime
    load check and the numeric comparison that follow still see it.
    """
    problem = _check_structure(out)
    if problem is None:
        return None, STRUCTURE_OK
    inherited = _check_structure(source)
    if inherited == problem:
        return None, f"the input already fails onnx's full check (shape inference), and the output the same way: {problem}"
    if inherited is not None:
        return f"structure check failed: {problem} (the input fails it too, differently: {inherited})", ""
    return f"structure check failed: {problem}", ""


def _load_check(source: Path, out: Path, providers: tuple[str, ...], threads: int,
                large: bool = False) -> tuple[Any, str | None]:
    """(an onnxruntime session of the output, or None; why it cannot be created).

    Made with the default graph optimizations, so what onnxruntime does at load time (constant
    folding, If inlining, fusions, and the shape inference after them) is checked too. ``large``
    models get a session on their memory-mapped weights (:func:`onnxdns.runtime.mapped_session`).
    """
    from onnxdns import runtime

    def why(e: OnnxdnsError) -> str:
        return _reason(e).removeprefix("onnxruntime cannot load the model: ")

    try:
        if large:
            return runtime.mapped_session(out, providers=providers, threads=threads, spinning=False), None
        return runtime.make_session(out, providers=providers, threads=threads, spinning=False), None
    except OnnxdnsError as e:
        problem = f"the output does not load in onnxruntime: {why(e)}"
    try:
        runtime.make_session(source, providers=providers, threads=threads, spinning=False)
    except OnnxdnsError as e:
        problem += f" (nor does the input: {why(e)})"
    return None, problem


def _validate_output(source: Path, out: Path, *, target: str, fp16: bool, exact: bool,
                     lossy: list[str], numeric: bool, data: Any, samples: int | None, macs: int,
                     source_bytes: int = 0) -> Validation:
    """Check the saved output: onnx's structure checks (failures the input shares are noted, not
    failed), an onnxruntime session (always: an output that does not load fails, with or without
    numeric validation), then the numeric comparison with the input when asked for."""
    from onnxdns import runtime
    from onnxdns.validate import compare

    problem, structure = _structure(source, out)
    if problem is not None:
        return Validation("failed", problem)
    cuda = runtime.has_cuda()
    providers = ("CUDAExecutionProvider", "CPUExecutionProvider") if target == "cuda" and cuda else ("CPUExecutionProvider",)
    where = "CUDA" if providers[0] == "CUDAExecutionProvider" else "CPU"
    # the session is the comparison's when there is one (onnxruntime picks the threads), else one thread
    large = source_bytes >= runtime.NO_PREPACK_BYTES
    session, problem = _load_check(source, out, providers, threads=0 if numeric else 1, large=large)
    if problem is not None:
        return Validation("failed", problem)
    loads = f"loads in onnxruntime ({where})"
    if not numeric:
        return Validation("structure-only", f"numeric validation skipped (--no-validate); {loads}; {structure}")
    if fp16 and not cuda:
        return Validation("structure-only",
                          f"fp16: numeric validation needs CUDA, which is not available here; {loads}; {structure}")
    note = " (CUDA absent: cuda-target model validated on the CPU provider)" if target == "cuda" and not cuda else ""
    inherited = "" if structure == STRUCTURE_OK else f"; {structure}"
    try:
        # a large input's session shares the weights the output holds unchanged
        reference = (runtime.mapped_session(source, session, providers=providers, spinning=False)
                     if large else source)
        comparison = compare(reference, session, data=data, providers=providers, **_validation_effort(macs, data, samples))
    except OnnxdnsError as e:
        return Validation("failed", f"cannot compare the output with the input in onnxruntime: {e}")
    scale = max(1.0, comparison.output_scale)
    if exact:
        tolerance, label = EXACT_TOLERANCE, "exact"
    elif fp16 and not lossy:
        tolerance, label = FP16_TOLERANCE, "fp16"
    else:
        return Validation("reported", f"lossy passes ({', '.join(lossy)}): differences reported, no bound applies; "
                                      f"{structure}; run on {where}{note}", comparison)
    bound = tolerance * scale
    verdict = "passed" if comparison.within(tolerance) else "failed"
    message = (f"max abs diff {comparison.max_abs_diff:.3g} {'<=' if verdict == 'passed' else '>'} {bound:.3g} "
               f"({label} bound {tolerance:g} x max(1, output scale {comparison.output_scale:.3g})), on {where}{note}"
               f"{inherited}")
    return Validation(verdict, message, comparison, bound)
