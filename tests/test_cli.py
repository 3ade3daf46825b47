"""The command line: every user mistake is one line and exit 2; the input is never touched."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxdns.passes
from onnxdns import api, modelio, registry
from onnxdns.cli import main
from onnxdns.framework import GraphPass, PassReport
from clikit import assert_user_error, run


def tiny_model(opset: int = 17, ir_version: int = 8, op: str = "Relu") -> onnx.ModelProto:
    """x [N, 784] -> Gemm(10) -> op: a classifier small enough for every test."""
    w = np.random.default_rng(0).standard_normal((784, 10)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W"], ["h"]), helper.make_node(op, ["h"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 784])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(w, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    return model


def image_model() -> onnx.ModelProto:
    """x [N, 1, 28, 28] -> Identity -> Flatten -> Gemm(10): matches the MNIST data."""
    w = np.random.default_rng(1).standard_normal((10, 784)).astype(np.float32) * 0.05
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["xi"]), helper.make_node("Flatten", ["xi"], ["f"]),
         helper.make_node("Gemm", ["f", "W"], ["logits"], transB=1)],
        "img",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 28, 28])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(w, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()




@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.onnx"
    onnx.save_model(tiny_model(), path)
    return path


@pytest.fixture
def image_file(tmp_path: Path) -> Path:
    path = tmp_path / "img.onnx"
    onnx.save_model(image_model(), path)
    return path


# --------------------------------------------------------------------------- user mistakes


def bad_inputs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Broken input files, each with a fragment of the expected message."""
    good = tiny_model().SerializeToString()
    too_new_ir, too_new_opset = modelio.MAX_IR_VERSION + 1, modelio.MAX_OPSET + 1  # the installed stack's limits
    cases = {
        "missing": (tmp_path / "missing.onnx", "no such file"),
        "directory": (tmp_path / "adir", "is a directory"),
        "not-onnx": (tmp_path / "notes.onnx", "not"),
        "truncated": (tmp_path / "truncated.onnx", "not"),
        "ir-11": (tmp_path / "ir11.onnx", f"IR version {too_new_ir}"),
        "opset-22": (tmp_path / "opset22.onnx", f"opset {too_new_opset}"),
        "unsupported-op": (tmp_path / "unknown_op.onnx", "unsupported operator"),
    }
    (tmp_path / "adir").mkdir()
    (tmp_path / "notes.onnx").write_text("these are not the weights you are looking for\n" * 20)
    (tmp_path / "truncated.onnx").write_bytes(good[: len(good) // 2])
    (tmp_path / "ir11.onnx").write_bytes(tiny_model(ir_version=too_new_ir).SerializeToString())
    (tmp_path / "opset22.onnx").write_bytes(tiny_model(opset=too_new_opset).SerializeToString())
    (tmp_path / "unknown_op.onnx").write_bytes(tiny_model(op="FrobnicateNonexistent").SerializeToString())
    return cases


CASES = ["missing", "directory", "not-onnx", "truncated", "ir-11", "opset-22", "unsupported-op"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_file_is_one_line_exit_2(case, tmp_path, capsys, model_file):
    path, fragment = bad_inputs(tmp_path)[case]
    before = sha(path) if path.is_file() else None
    for args in (["inspect", path], ["validate", path, model_file], ["validate", model_file, path],
                 ["optimize", path, "-o", tmp_path / "out.onnx", "--passes", "add-masks"]):
        code, out, err = run(capsys, *args)
        assert_user_error(code, err, fragment)
    assert not (tmp_path / "out.onnx").exists()
    if before is not None:
        assert sha(path) == before


def test_bad_input_through_a_real_process(tmp_path):
    """The installed entry point and ``python -m onnxdns``: exit 2, one line, no traceback."""
    path, _ = bad_inputs(tmp_path)["truncated"]
    before = sha(path)
    script = Path(sys.executable).with_name("onnxdns")
    for cmd in ([str(script), "inspect", str(path)], [sys.executable, "-m", "onnxdns", "inspect", str(path)]):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("onnxdns: error: ")
        assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert sha(path) == before


def test_output_path_equal_to_input_is_refused(model_file, tmp_path, capsys):
    before = sha(model_file)
    (tmp_path / "sub").mkdir()
    link = tmp_path / "link.onnx"
    link.symlink_to(model_file)
    for out in (model_file, tmp_path / "sub" / ".." / model_file.name, link):
        code, _, err = run(capsys, "optimize", model_file, "-o", out)
        assert_user_error(code, err, "input model")
    assert sha(model_file) == before


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--passes", "no-such-pass"], "unknown pass 'no-such-pass'; known passes: "),
        (["--passes", ""], "empty pass name"),
        (["--target", "tpu"], "invalid choice: 'tpu'"),
        (["--precision", "fp16"], "fp16 is for --target cuda"),
        (["--data", "cifar"], "invalid choice: 'cifar'"),
    ],
)
def test_bad_optimize_options(args, fragment, model_file, tmp_path, capsys):
    before = sha(model_file)
    code, _, err = run(capsys, "optimize", model_file, "-o", tmp_path / "out.onnx", *args)
    assert_user_error(code, err, fragment)
    assert not (tmp_path / "out.onnx").exists()
    assert sha(model_file) == before


def test_output_folder_problems(model_file, tmp_path, capsys):
    code, _, err = run(capsys, "optimize", model_file, "-o", tmp_path / "nowhere" / "out.onnx")
    assert_user_error(code, err, "output folder does not exist")
    code, _, err = run(capsys, "optimize", model_file, "-o", tmp_path)
    assert_user_error(code, err, "is a directory")


def test_argument_mistakes_are_one_line(capsys, model_file):
    for args in ([], ["frobnicate"], ["inspect"], ["validate", model_file, model_file, "--batch", "0"],
                 ["optimize", model_file]):
        code, _, err = run(capsys, *args)
        assert_user_error(code, err)


def test_data_that_does_not_fit_the_model(model_file, capsys):
    before = sha(model_file)
    code, _, err = run(capsys, "validate", model_file, model_file, "--data", "mnist")
    assert_user_error(code, err, "[N,1,28,28]")
    assert sha(model_file) == before


def test_missing_data(image_file, tmp_path, capsys):
    code, _, err = run(capsys, "validate", image_file, image_file, "--data", "mnist", "--data-dir", tmp_path / "no-data")
    assert_user_error(code, err)


@pytest.mark.torch
def test_unknown_model_for_export(tmp_path, capsys):
    code, _, err = run(capsys, "export", "no-such-model", "-o", tmp_path / "m.onnx")
    assert_user_error(code, err, "unknown model 'no-such-model'")
    code, _, err = run(capsys, "export")
    assert_user_error(code, err, "--list")


# --------------------------------------------------------------------------- interrupts and internal errors


def test_keyboard_interrupt_exits_130(monkeypatch, model_file, capsys):
    def interrupted(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "inspect", interrupted)
    code, _, err = run(capsys, "inspect", model_file)
    assert code == 130 and err == "onnxdns: error: interrupted\n"


def test_internal_error_is_one_line_unless_debug(monkeypatch, model_file, capsys):
    def broken(path):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(api, "inspect", broken)
    code, _, err = run(capsys, "inspect", model_file)
    assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "ZeroDivisionError" in err and "--debug" in err
    code, _, err = run(capsys, "inspect", model_file, "--debug")
    assert code == 1 and "Traceback" in err
    code, _, err = run(capsys, "--debug", "inspect", model_file)
    assert code == 1 and "Traceback" in err


# --------------------------------------------------------------------------- commands that work


def test_inspect_prints_layers_and_totals(model_file, capsys):
    code, out, err = run(capsys, "inspect", model_file)
    assert code == 0 and err == ""
    assert "Gemm" in out and "784x10" in out
    assert "7,840" in out  # parameters and MACs of the Gemm
    assert f"{model_file.stat().st_size:,} bytes" in out


def test_passes_lists_every_registered_pass(capsys):
    code, out, _ = run(capsys, "passes")
    assert code == 0
    for cls in registry.pass_classes().values():
        line = next(line for line in out.splitlines() if line.split()[:1] == [cls.name])
        assert ("exact" if cls.exact else "lossy") in line
        assert cls.summary[:30] in line


def test_validate_prints_diffs_and_latency(model_file, capsys):
    code, out, err = run(capsys, "validate", model_file, model_file, "--samples", "8", "--batch", "4",
                         "--repeats", "2")
    assert code == 0, err
    assert "max abs diff    0" in out and "top-1 agreement 100.0%" in out
    assert "batch 1" in out and "batch 32" in out and "ratio" in out


def test_validate_on_mnist_reports_accuracy(image_file, capsys):
    code, out, err = run(capsys, "validate", image_file, image_file, "--data", "mnist", "--samples", "100",
                         "--repeats", "2")
    assert code == 0, err
    assert "accuracy" in out and "mnist, 100 samples" in out


@pytest.mark.torch
def test_export_list_and_export(tmp_path, capsys):
    from onnxdns import models

    code, out, _ = run(capsys, "export", "--list")
    assert code == 0
    names = list(models.MODELS)
    assert [line.split()[0] for line in out.strip().splitlines()[2:]] == names
    name = next((n for n in names if "lenet" in n.lower()), names[0])
    target = tmp_path / f"{name}.onnx"
    code, out, err = run(capsys, "export", name, "-o", target)
    assert code == 0, err
    code, out, err = run(capsys, "inspect", target)
    assert code == 0, err


# --------------------------------------------------------------------------- optimize


def test_optimize_default_pipeline_end_to_end(image_file, tmp_path, capsys):
    before = sha(image_file)
    out_file = tmp_path / "out.onnx"
    code, out, err = run(capsys, "optimize", image_file, "-o", out_file, "--target", "cpu")
    assert code == 0, err
    assert sha(image_file) == before
    for name in ("fold-masks", "eliminate-identity", "sparse-storage"):
        assert name in out
    assert "before" in out and "after" in out and "bytes on disk" in out
    assert "validation: passed" in out
    assert "Identity" not in [n.op_type for n in onnx.load(out_file).graph.node]


class ScaleWeightsPass(GraphPass):
    """Test-only pass that multiplies every float initializer by 1.5 while claiming to be exact,
    so that validation must catch it."""

    name = "test-scale-weights"
    summary = "scale weights (test only)"

    def call(self, model: ir.Model) -> PassReport:
        for value in model.graph.initializers.values():
            array = value.const_value.numpy()
            value.const_value = ir.tensor(array * np.float32(1.5), name=value.name)
        return PassReport(model, True, {"scaled": len(model.graph.initializers)})


@pytest.fixture
def scale_pass(monkeypatch):
    monkeypatch.setattr(onnxdns.passes, "PASSES", (*onnxdns.passes.PASSES, ScaleWeightsPass))


def test_failed_validation_keeps_output_and_exits_3(scale_pass, model_file, tmp_path, capsys):
    before = sha(model_file)
    out_file = tmp_path / "out.onnx"
    code, out, err = run(capsys, "optimize", model_file, "-o", out_file, "--passes", "test-scale-weights")
    assert code == 3
    assert "test-scale-weights  modified" in out and "scaled=1" in out
    assert "validation: failed" in out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnxdns: error: validation failed") and str(out_file) in lines[0]
    assert out_file.exists() and sha(model_file) == before


def test_no_validate_still_checks_structure(scale_pass, model_file, tmp_path, capsys):
    code, out, err = run(capsys, "optimize", model_file, "-o", tmp_path / "out.onnx", "--passes",
                         "test-scale-weights", "--no-validate")
    assert code == 0, err
    assert "validation: structure-only" in out


def test_failing_save_leaves_no_partial_file(scale_pass, monkeypatch, model_file, tmp_path, capsys):
    """A save that dies half-way (disk full) leaves neither the output nor a temporary file."""
    before = sha(model_file)

    def disk_full(model, path, *args, **kwargs):
        with open(path, "wb") as fh:
            fh.write(modelio.to_proto(model).SerializeToString()[:100])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(modelio, "_write_streaming", disk_full)  # the writer of single-file outputs
    out_file = tmp_path / "out.onnx"
    code, _, err = run(capsys, "optimize", model_file, "-o", out_file, "--passes", "test-scale-weights")
    assert_user_error(code, err, "No space left on device")
    assert sorted(os.listdir(tmp_path)) == [model_file.name]
    assert sha(model_file) == before


class NeedsMasksPass(GraphPass):
    """Test-only pass whose precondition never holds."""

    name = "test-needs-masks"
    summary = "precondition fails (test only)"

    def requires(self, model: ir.Model) -> None:
        raise ir.passes.PreconditionError("the model has no masks to fold")

    def call(self, model: ir.Model) -> PassReport:
        return PassReport(model, False)


def test_failed_precondition_is_a_user_error(monkeypatch, model_file, tmp_path, capsys):
    monkeypatch.setattr(onnxdns.passes, "PASSES", (*onnxdns.passes.PASSES, NeedsMasksPass))
    code, _, err = run(capsys, "optimize", model_file, "-o", tmp_path / "out.onnx", "--passes", "test-needs-masks")
    assert_user_error(code, err, "pass 'test-needs-masks' cannot run on this model: the model has no masks to fold")
    assert not (tmp_path / "out.onnx").exists()
