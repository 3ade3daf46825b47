"""onnx's backend node tests through the cpu pipeline: an optimized model loads and matches, or
optimize refuses with one clean line.

The whole suite runs, no sample (about 20 s of CPU for 1,282 tests, both variants): every single-operator test
of the installed onnx, read by :func:`onnx.backend.test.loader.load_model_tests` (onnx <= 1.16
ships them as files under ``onnx/backend/test/data/node/``; newer releases generate them in
memory from ``onnx.backend.test.case.node``). A test is skipped, with the reason, when the
installed onnxruntime cannot run the original model or does not reproduce the test's expected
outputs itself, or when onnxdns's load check refuses the model as too new for this stack.
Otherwise :func:`onnxdns.api.optimize` (cpu pipeline, numeric validation off) must either

* succeed (its own checks passed), and the saved model must load in onnxruntime and give the
  expected outputs, with graph optimizations off and at onnxruntime's default level: same
  count, same shape and dtype per output (a ``[]`` that became ``[1]`` fails), values within the
  test's tolerances (onnx's own: rtol 1e-3, atol 1e-7 unless the test sets its own); or
* raise :class:`~onnxdns.errors.OnnxdnsError` with a one-line message (a clean refusal).

Each test runs twice: as written (the operator's inputs are graph inputs), and with its inputs
stored as initializers, so that fold-constants computes the operator and the folded result is
what is compared.

No torch and no onnxruntime.training: this runs in the pinned stack and in a core one.
"""

from __future__ import annotations

import glob
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxdns import api, runtime
from onnxdns.errors import OnnxdnsError, UnsupportedModelError


def _node_cases() -> list[Any]:
    from onnx.backend.test.loader import load_model_tests

    with warnings.catch_warnings():  # the in-memory generators of newer onnx divide by zero on purpose
        warnings.simplefilter("ignore")
        cases = load_model_tests(kind="node")
    return sorted(cases, key=lambda c: c.name)


CASES = _node_cases()
ONNX_DIR = Path(onnx.__file__).parent


def test_the_suite_is_there():
    """The installed onnx provides its node tests (a missing suite must not pass as all-skipped)."""
    assert len(CASES) > 1000, f"only {len(CASES)} node tests found (onnx {onnx.__version__} at {ONNX_DIR})"


# --------------------------------------------------------------------------- loading a test


def _to_value(item: Any) -> Any:
    """An input or expected output as onnxruntime takes and returns it (array, list, None)."""
    if isinstance(item, onnx.TensorProto):
        return numpy_helper.to_array(item)
    if isinstance(item, onnx.SequenceProto):
        return numpy_helper.to_list(item)
    if isinstance(item, onnx.OptionalProto):
        return numpy_helper.to_optional(item)
    if isinstance(item, (list, tuple)):
        return [_to_value(x) for x in item]
    if isinstance(item, np.generic):  # newer onnx's in-memory tests hold some inputs as numpy scalars
        return np.asarray(item)
    return item


def _read_proto(path: str, type_proto: onnx.TypeProto) -> Any:
    data = Path(path).read_bytes()
    if type_proto.HasField("sequence_type"):
        proto: Any = onnx.SequenceProto()
    elif type_proto.HasField("optional_type"):
        proto = onnx.OptionalProto()
    else:
        proto = onnx.TensorProto()
    proto.ParseFromString(data)
    return _to_value(proto)


def load_case(case: Any) -> tuple[onnx.ModelProto, list[tuple[list[Any], list[Any]]]]:
    """The model and its (inputs, expected outputs) data sets, from files or from memory."""
    if case.model_dir is None:
        data = [([_to_value(x) for x in ins], [_to_value(x) for x in outs]) for ins, outs in case.data_sets]
        return case.model, data
    model = onnx.load_model(os.path.join(case.model_dir, "model.onnx"))
    data = []
    for folder in sorted(glob.glob(os.path.join(case.model_dir, "test_data_set_*"))):
        n_in = len(glob.glob(os.path.join(folder, "input_*.pb")))
        n_out = len(glob.glob(os.path.join(folder, "output_*.pb")))
        ins = [_read_proto(os.path.join(folder, f"input_{i}.pb"), model.graph.input[i].type) for i in range(n_in)]
        outs = [_read_proto(os.path.join(folder, f"output_{i}.pb"), model.graph.output[i].type) for i in range(n_out)]
        data.append((ins, outs))
    return model, data


# --------------------------------------------------------------------------- comparing


def mismatch(got: Any, want: Any, rtol: float, atol: float, where: str = "output") -> str | None:
    """Why ``got`` is not ``want`` (type, shape, dtype, values), or None when it matches."""
    if want is None or got is None:
        return None if got is None and want is None else f"{where}: {got!r:.60} instead of {want!r:.60}"
    if isinstance(want, (list, tuple)):
        if not isinstance(got, (list, tuple)) or len(got) != len(want):
            return f"{where}: a {type(got).__name__} instead of a sequence of {len(want)}"
        for i, (g, w) in enumerate(zip(got, want)):
            if (why := mismatch(g, w, rtol, atol, f"{where}[{i}]")) is not None:
                return why
        return None
    got, want = np.asarray(got), np.asarray(want)
    if got.shape != want.shape:
        return f"{where}: shape {list(got.shape)} instead of {list(want.shape)}"
    if want.dtype == object or want.dtype.kind in "US":
        return None if np.array_equal(got.astype(object), want.astype(object)) else f"{where}: strings differ"
    if got.dtype != want.dtype:
        return f"{where}: dtype {got.dtype} instead of {want.dtype}"
    if want.dtype.kind not in "biufc":  # bfloat16, float8, int4 ... (ml_dtypes)
        rtol = max(rtol, 2**-6) if want.dtype.name == "bfloat16" else rtol
        got, want = got.astype(np.float32), want.astype(np.float32)
    try:
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)
    except AssertionError as e:
        return f"{where}: values differ: {' '.join(str(e).split())[:200]}"
    return None


#: onnxruntime graph-optimization levels a model is run at: none (the graph as written) and all
#: (the default: onnxruntime folds constants, inlines If branches with constant conditions, fuses).
LEVELS = ("disable", "all")


def run_model(model: onnx.ModelProto | str, data: list[tuple[list[Any], list[Any]]], rtol: float,
              atol: float) -> str | None:
    """Load ``model`` in onnxruntime at each of :data:`LEVELS` and run every data set; why it
    failed, or None."""
    for level in LEVELS:
        try:
            session = runtime.make_session(model, threads=1, optimization=level)
        except OnnxdnsError as e:
            return f"{e} (optimization level {level})"
        names = [i.name for i in session.get_inputs()]
        for ins, want in data:
            try:
                got = session.run(None, dict(zip(names, ins)))
            except Exception as e:  # noqa: BLE001 - onnxruntime's own exception types
                return f"onnxruntime cannot run it: {' '.join(str(e).split())[:200]} (optimization level {level})"
            if len(got) != len(want):
                return f"{len(got)} outputs instead of {len(want)}"
            for k, (g, w) in enumerate(zip(got, want)):
                if (why := mismatch(g, w, rtol, atol, f"output {k}")) is not None:
                    return f"{why} (optimization level {level})"
    return None


# --------------------------------------------------------------------------- one case

#: Outcomes of :func:`check_case`.
MATCHED, REFUSED, SKIPPED, SILENTLY_WRONG, BROKEN, FAILED_VALIDATION, CRASHED = (
    "matched", "refused", "skipped", "silently-wrong", "broken-exit-0", "validation-failed", "crashed")


def as_constants(model: onnx.ModelProto, data: list[tuple[list[Any], list[Any]]]
                 ) -> tuple[onnx.ModelProto | None, list[tuple[list[Any], list[Any]]], str]:
    """The model with its test inputs stored as initializers (no graph inputs left), so that
    fold-constants computes the operator; or None and why that cannot be done."""
    if len(data) != 1 or not data[0][0] or not all(isinstance(x, np.ndarray) for x in data[0][0]):
        return None, data, "not one data set of tensor inputs"
    ins, outs = data[0]
    try:
        inits = [numpy_helper.from_array(x, vi.name) for x, vi in zip(ins, model.graph.input)]
    except Exception as e:  # noqa: BLE001 - numpy_helper raises several types for exotic dtypes
        return None, data, f"an input cannot be stored as an initializer: {e}"
    constant = onnx.ModelProto()
    constant.CopyFrom(model)
    del constant.graph.input[:]
    constant.graph.initializer.extend(inits)
    constant.ir_version = max(constant.ir_version, 4)  # IR < 4: every initializer must be a graph input
    return constant, [([], outs)], ""


def check_case(case: Any, tmp: Path, constant_inputs: bool = False) -> tuple[str, str]:
    """(outcome, detail) of the cpu pipeline on one node test, with its inputs as graph inputs or,
    with ``constant_inputs``, as initializers (then fold-constants evaluates the operator)."""
    model, data = load_case(case)
    if constant_inputs:
        model, data, why = as_constants(model, data)
        if model is None:
            return SKIPPED, why
    why = run_model(model, data, case.rtol, case.atol)
    if why is not None:
        return SKIPPED, f"onnxruntime {_ort_version()} on the original{' with constant inputs' * constant_inputs}: {why}"
    src, out = tmp / f"{case.name}.onnx", tmp / f"{case.name}.opt.onnx"
    onnx.save_model(model, src)
    try:
        result = api.optimize(src, out, target="cpu", validate=False)
    except UnsupportedModelError as e:
        if "newer than" in str(e):
            return SKIPPED, f"onnxdns refuses it as too new: {str(e).replace(f'{src}: ', '')}"
        return REFUSED, str(e)
    except OnnxdnsError as e:
        return REFUSED, str(e)
    except Exception as e:  # noqa: BLE001 - any other exception is an internal error (exit 1)
        return CRASHED, f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
    if not result.ok:
        return FAILED_VALIDATION, result.validation.message
    why = run_model(str(out), data, case.rtol, case.atol)
    if why is None:
        return MATCHED, result.validation.message
    if why.startswith("onnxruntime cannot load"):
        return BROKEN, why
    return SILENTLY_WRONG, why


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
@pytest.mark.parametrize("constant_inputs", [False, True], ids=["inputs", "constants"])
def test_node_case(case, constant_inputs, tmp_path):
    outcome, detail = check_case(case, tmp_path, constant_inputs)
    if outcome == SKIPPED:
        pytest.skip(detail)
    if outcome == REFUSED:
        assert detail and "\n" not in detail and "Traceback" not in detail, f"refusal is not one clean line: {detail!r}"
        return
    assert outcome == MATCHED, f"{outcome}: {detail}"
