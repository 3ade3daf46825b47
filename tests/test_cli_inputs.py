"""optimize and validate on models that are not image classifiers: several inputs and dtypes,
dynamic spatial or sequence dimensions, real inputs from .npz, trained models others made."""

from __future__ import annotations

import importlib.metadata
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxdns import inputs
from onnxdns.cli import main
from realmodels import model_path
from test_runtime import batch_one_model, make, multi_input_model, vi, yolo_like
from clikit import assert_user_error, run




def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


FAST_VALIDATE = ("--samples", "4", "--repeats", "2", "--batch", "2")


def test_multi_input_model_with_int64_input(tmp_path, capsys):
    src = save(multi_input_model(), tmp_path / "multi.onnx")
    out = tmp_path / "out.onnx"
    code, stdout, err = run(capsys, "optimize", src, "-o", out, "--samples", "40")
    assert code == 0, err
    assert "validation: passed: max abs diff 0 " in stdout and "40 samples" in stdout
    code, stdout, err = run(capsys, "validate", src, out, *FAST_VALIDATE)
    assert code == 0, err
    assert "max abs diff    0 " in stdout


def test_yolo_like_detector_with_dynamic_height_and_width(tmp_path, capsys):
    """Resize/upsampling with dynamic H/W: the latency run at batch 1 used to get a 1x1 image."""
    src = save(yolo_like(), tmp_path / "yolo.onnx")
    out = tmp_path / "out.onnx"
    code, stdout, err = run(capsys, "optimize", src, "-o", out, "--samples", "8")
    assert code == 0, err
    assert "validation: passed" in stdout and "batch 1 " in stdout and "batch 32" in stdout
    assert "inputs          images float32 [8, 3, 64, 64]" in stdout


def test_model_that_runs_only_at_batch_1(tmp_path, capsys):
    src = save(batch_one_model(), tmp_path / "b1.onnx")
    out = tmp_path / "out.onnx"
    code, stdout, err = run(capsys, "optimize", src, "-o", out, "--samples", "4")
    assert code == 0, err
    assert "validation: passed" in stdout and "note            the input model fails at batch 4 " in stdout
    code, stdout, err = run(capsys, "validate", src, out, *FAST_VALIDATE)
    assert code == 0, err
    assert "fails at batch 2" in stdout


def test_input_model_that_cannot_run_is_refused_before_writing(tmp_path, capsys):
    m = make([helper.make_node("Reshape", ["x", "shape"], ["y"])],
             [vi("x", TensorProto.FLOAT, ["N", 3])], [vi("y", TensorProto.FLOAT, [2, 2])],
             [onnx.numpy_helper.from_array(np.array([2, 2], np.int64), "shape")])
    src, out = save(m, tmp_path / "bad.onnx"), tmp_path / "out.onnx"
    code, _, err = run(capsys, "optimize", src, "-o", out)
    assert_user_error(code, err, "the input model fails on random inputs (x float32 [32, 3]; at batch 1 too)")
    assert "requested shape:{2,2}" in err and "--data FILE.npz" in err
    assert not out.exists()


@pytest.mark.parametrize("shape, fragment", [
    ([1, 2**40], "would need 4.1e+03 GiB for one sample"),
    (["N", 32768, 32768], "would need 4 GiB for one sample"),
])
def test_huge_input_is_refused_before_writing(shape, fragment, tmp_path, capsys):
    m = make([helper.make_node("Relu", ["x"], ["y"])], [vi("x", TensorProto.FLOAT, shape)],
             [vi("y", TensorProto.FLOAT, shape)])
    src, out = save(m, tmp_path / "huge.onnx"), tmp_path / "out.onnx"
    code, _, err = run(capsys, "optimize", src, "-o", out)
    assert_user_error(code, err, fragment)
    assert not out.exists()
    code, stdout, err = run(capsys, "optimize", src, "-o", out, "--no-validate")
    assert code == 0 and out.exists(), err


def test_absurd_counts_are_one_line_errors(tmp_path, capsys):
    src, out = save(multi_input_model(), tmp_path / "m.onnx"), tmp_path / "out.onnx"
    code, _, err = run(capsys, "optimize", src, "-o", out, "--samples", "1000000000")
    assert_user_error(code, err, "samples must be between 1 and 1,000,000")
    assert not out.exists()
    code, _, err = run(capsys, "validate", src, src, "--repeats", "1000000000")
    assert_user_error(code, err, "repeats must be between 1 and 10,000")


def test_real_inputs_from_npz(tmp_path, capsys):
    src, out = save(multi_input_model(), tmp_path / "m.onnx"), tmp_path / "out.onnx"
    rng = np.random.default_rng(0)
    data = tmp_path / "inputs.npz"
    np.savez(data, tokens=rng.integers(0, 50, (3, 7)), mask=rng.random((3, 7)) < 0.5,
             scale=rng.standard_normal((3, 8)).astype(np.float16))
    code, stdout, err = run(capsys, "optimize", src, "-o", out, "--data", data)
    assert code == 0, err
    assert "data            inputs.npz, 3 samples" in stdout and "validation: passed" in stdout
    code, stdout, err = run(capsys, "validate", src, out, "--data", data, "--repeats", "2")
    assert code == 0, err
    assert "inputs.npz, 3 samples" in stdout
    np.savez(tmp_path / "partial.npz", tokens=rng.integers(0, 50, (3, 7)))
    code, _, err = run(capsys, "optimize", src, "-o", out.with_name("o2.onnx"), "--data", tmp_path / "partial.npz")
    assert_user_error(code, err, "partial.npz must have one array per model input, named tokens, mask, scale; "
                                 "missing mask, scale")
    assert not out.with_name("o2.onnx").exists()
    code, _, err = run(capsys, "optimize", src, "-o", out, "--data", "cifar")
    assert_user_error(code, err, "or FILE.npz")


# --------------------------------------------------------------------------- trained models


@pytest.mark.parametrize("name", ["ocr-det", "ocr-cls", "ocr-rec", "silero-vad"])
def test_optimize_trained_models(name, tmp_path, capsys):
    out = tmp_path / "out.onnx"
    code, stdout, err = run(capsys, "optimize", model_path(name), "-o", out, "--samples", "2")
    assert code == 0, err
    assert "validation: passed" in stdout


def test_validate_trained_speech_model(tmp_path, capsys):
    src = model_path("silero-vad")
    code, stdout, err = run(capsys, "validate", src, src, *FAST_VALIDATE)
    assert code == 0, err
    assert "max abs diff    0 " in stdout and "they are" in stdout


_ORT_VERSION = tuple(int(p) for p in importlib.metadata.version(
    importlib.metadata.packages_distributions()["onnxruntime"][0]).split(".")[:2])


def test_recognizer_sigfpe_is_why_free_dims_start_at_64():
    """The PP-OCRv4 recognizer is killed by SIGFPE at height 32 (uncatchable, so validation must
    never feed it); at 64, the size plan_inputs gives, it runs. In a child process."""
    code = ("import sys, numpy as np, onnxruntime as ort; s = ort.InferenceSession(sys.argv[1], "
            "providers=['CPUExecutionProvider']); s.run(None, {'x': np.zeros((1, 3, int(sys.argv[2]), 64), np.float32)})")
    path = str(model_path("ocr-rec"))
    crashed = subprocess.run([sys.executable, "-c", code, path, "32"], capture_output=True)
    if _ORT_VERSION < (1, 20):  # seen with onnxruntime(-training) 1.19.2; 1.32 runs height 32
        assert crashed.returncode == -signal.SIGFPE, crashed.stderr[-500:]
    ran = subprocess.run([sys.executable, "-c", code, path, str(inputs.FREE_SIZE)], capture_output=True)
    assert ran.returncode == 0, ran.stderr[-500:]
