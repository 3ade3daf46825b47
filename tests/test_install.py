"""The compiler without the optional parts: no torch, any onnxruntime flavour, one-line refusals.

Runs in both test environments (scripts/test.sh): the core one (Python 3.13, newest onnx, onnx-ir
and onnxruntime, no torch) proves the compiler needs none of the training stack, the full one
that nothing regressed on the pinned stack.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxdns import extras, modelio, runtime
from onnxdns.cli import main
from onnxdns.testing import assert_exact

#: IR version and opset of the test model: old enough for onnxruntime 1.17 (IR 9, opset 20).
IR_VERSION, OPSET = 7, 13
_TRAINING_RUNTIME = any("training" in d for d in importlib.metadata.packages_distributions().get("onnxruntime", []))


def residual_concat_model(seed: int = 0) -> onnx.ModelProto:
    """Conv a -> Relu -> (+ Conv c) residual add -> Relu, concatenated with Conv d(x), -> Conv e ->
    global pool -> Gemm; a and c zero the same 8 of 16 channels (the add's channels stay zero) and
    d zeroes 8 of its 16, so remove-channels can drop 8 channels of the add group, 8 of d and the
    16 matching input channels of e. IR 7, opset 13."""
    rng = np.random.default_rng(seed)

    def conv(name: str, cout: int, cin: int, zero=()) -> list[onnx.TensorProto]:
        w = rng.standard_normal((cout, cin, 3, 3)).astype(np.float32) * 0.2
        b = rng.standard_normal(cout).astype(np.float32) * 0.1
        w[list(zero)], b[list(zero)] = 0, 0
        return [numpy_helper.from_array(w, f"{name}.w"), numpy_helper.from_array(b, f"{name}.b")]

    zeroed = [1, 2, 4, 7, 8, 11, 13, 14]
    inits = [*conv("a", 16, 3, zeroed), *conv("c", 16, 16, zeroed), *conv("d", 16, 3, range(8, 16)),
             *conv("e", 16, 32),
             numpy_helper.from_array(rng.standard_normal((10, 16)).astype(np.float32), "fc.w"),
             numpy_helper.from_array(np.zeros(10, np.float32), "fc.b")]
    pads = [1, 1, 1, 1]
    nodes = [
        helper.make_node("Conv", ["x", "a.w", "a.b"], ["a"], pads=pads),
        helper.make_node("Relu", ["a"], ["ra"]),
        helper.make_node("Conv", ["ra", "c.w", "c.b"], ["c"], pads=pads),
        helper.make_node("Add", ["ra", "c"], ["sum"]),
        helper.make_node("Relu", ["sum"], ["rs"]),
        helper.make_node("Conv", ["x", "d.w", "d.b"], ["d"], pads=pads),
        helper.make_node("Concat", ["rs", "d"], ["cat"], axis=1),
        helper.make_node("Conv", ["cat", "e.w", "e.b"], ["e"], pads=pads),
        helper.make_node("Relu", ["e"], ["re"]),
        helper.make_node("GlobalAveragePool", ["re"], ["pool"]),
        helper.make_node("Flatten", ["pool"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["y"], transB=1),
    ]
    graph = helper.make_graph(nodes, "residual_concat", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION,
                              producer_name="onnxdns-tests")
    onnx.checker.check_model(model)
    return model


def _python(code: str, *args: str, block: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter with the modules in ``block`` made unimportable (as if that
    part were not installed; parts that really are missing need no blocking)."""
    prelude = textwrap.dedent(f"""
        import importlib.abc, sys
        BLOCK = {tuple(block)!r}
        class _Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if any(name == m or name.startswith(m + ".") for m in BLOCK):
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        sys.meta_path.insert(0, _Block())
    """)
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code), *args],
                          capture_output=True, text=True, timeout=300)


_RUN_CLI = """
    import sys
    from onnxdns.cli import main
    rc = main(sys.argv[1:])
    print("torch imported:", "torch" in sys.modules, file=sys.stderr)
    sys.exit(rc)
"""


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "residual_concat.onnx"
    onnx.save_model(residual_concat_model(), path)
    return path


def test_optimize_removes_zeroed_channels_across_add_and_concat_exactly(model_file, tmp_path, capsys):
    """The issue's acceptance check, run with whatever onnx/onnxruntime the environment has: the
    CPU pipeline removes the zeroed channels through the residual add and the concat, the output
    matches the input in onnxruntime, the file is smaller, and IR version and opset are kept (so
    the model still loads in the onnxruntime releases that loaded the input)."""
    out = tmp_path / "small.onnx"
    assert main(["optimize", str(model_file), "-o", str(out)]) == 0, capsys.readouterr().err
    before, after = onnx.load(str(model_file)), onnx.load(str(out))
    assert (after.ir_version, [(o.domain, o.version) for o in after.opset_import]) == (IR_VERSION, [("", OPSET)])
    assert_exact(before, after, batch=3)
    assert out.stat().st_size < 0.6 * model_file.stat().st_size
    weights = {t.name: t for t in after.graph.initializer}
    assert list(weights["e.w"].dims) == [16, 16, 3, 3]  # 8 channels of the add group + 8 of d remain
    assert list(weights["a.w"].dims)[0] == list(weights["c.w"].dims)[0] == list(weights["d.w"].dims)[0] == 8


def test_import_onnxdns_does_not_import_torch():
    done = _python("""
        import sys
        import onnxdns, onnxdns.passes, onnxdns.api, onnxdns.cli, onnxdns.pipelines, onnxdns.stats
        print(sorted(m for m in ("torch", "onnxruntime") if m in sys.modules))
    """)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"  # not even onnxruntime until a model runs


@pytest.mark.skipif(_TRAINING_RUNTIME, reason="onnxruntime-training's own `import onnxruntime` imports torch")
def test_onnxdns_optimize_does_not_import_torch(model_file, tmp_path):
    done = _python(_RUN_CLI, "optimize", str(model_file), "-o", str(tmp_path / "small.onnx"))
    assert done.returncode == 0, done.stderr
    assert "torch imported: False" in done.stderr


def _assert_refused(done: subprocess.CompletedProcess, extra: str, output: Path | None = None) -> None:
    lines = [line for line in done.stderr.splitlines() if not line.startswith("torch imported:")]
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and lines[0].startswith("onnxdns: error: "), done.stderr
    assert f"pip install 'onnxdns[{extra}]'" in lines[0]
    assert "Traceback" not in done.stderr and done.stdout == ""
    assert output is None or not output.exists()


@pytest.mark.parametrize("command, block, extra", [
    (["train", "{model}", "-o", "{out}", "--method", "dns", "--data", "mnist"], ("onnxruntime.training", "torch"), "train"),
    (["slim", "{model}", "-o", "{out}"], ("onnxruntime.training", "torch"), "train"),
    (["optimize", "{model}", "-o", "{out}", "--passes", "sparse-lowrank", "--calib-data", "mnist",
      "--finetune-epochs", "1"], ("onnxruntime.training", "torch"), "train"),
    (["export", "lenet-5", "-o", "{out}"], ("torch",), "zoo"),
    (["optimize", "{model}", "-o", "{out}"], ("onnxruntime",), "cpu"),
    (["validate", "{model}", "{model}"], ("onnxruntime",), "cpu"),
    # no validation, but fold-constants runs the model: the missing runtime must not be swallowed
    (["optimize", "{model}", "-o", "{out}", "--no-validate"], ("onnxruntime",), "cpu"),
], ids=["train", "slim", "sparse-lowrank-finetune", "export", "optimize", "validate", "optimize-no-validate"])
def test_command_needing_a_missing_extra_names_it_in_one_line(command, block, extra, model_file, tmp_path):
    """In the core environment torch and onnxruntime-training are really absent (nothing to block);
    elsewhere they are made unimportable for the run."""
    out = tmp_path / "out.onnx"
    args = [a.format(model=model_file, out=out) for a in command]
    present = tuple(m for m in block if extras.is_installed(m))
    _assert_refused(_python(_RUN_CLI, *args, block=present), extra, out)


def test_passes_that_run_no_model_need_no_runtime(model_file, tmp_path):
    """Plain `pip install onnxdns` (no runtime flavour): graph-only passes run in the user's own
    pipeline and `inspect` works; `optimize`, which always loads its output in onnxruntime, names
    the extra."""
    out = tmp_path / "out.onnx"
    script = ("import sys, onnx; from onnxdns.passes import FoldMasksPass, RemoveDeadNodesPass; "
              "m = RemoveDeadNodesPass()(FoldMasksPass()(onnx.load(sys.argv[1]))); onnx.save(m, sys.argv[2])")
    done = _python(script, str(model_file), str(out), block=("onnxruntime",))
    assert done.returncode == 0 and out.exists(), done.stderr
    done = _python(_RUN_CLI, "inspect", str(out), block=("onnxruntime",))
    assert done.returncode == 0, done.stderr
    _assert_refused(_python(_RUN_CLI, "optimize", str(model_file), "-o", str(tmp_path / "o.onnx"), "--passes",
                            "fold-masks,remove-dead-nodes", "--no-validate", block=("onnxruntime",)),
                    "cpu", tmp_path / "o.onnx")


def test_runtime_limits_follow_the_installed_onnxruntime():
    """The limits come from the installed flavour's row, capped by onnx; a model at the limits loads."""
    rows = modelio.RUNTIME_LIMITS
    assert [r[0] for r in rows] == sorted(r[0] for r in rows)
    assert all(a[1] <= b[1] and a[2] <= b[2] for a, b in zip(rows, rows[1:]))  # never decreasing
    max_ir, max_opset, stack = modelio.runtime_limits()
    dist = importlib.metadata.packages_distributions()["onnxruntime"][0]
    assert stack == f"{dist} {importlib.metadata.version(dist)}"
    assert max_ir <= onnx.IR_VERSION and max_opset <= onnx.defs.onnx_opset_version()
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    newest = helper.make_model(graph, opset_imports=[helper.make_opsetid("", max_opset)], ir_version=max_ir)
    modelio.check_supported(newest)
    x = np.arange(2, dtype=np.float32)
    np.testing.assert_array_equal(runtime.run(newest, {"x": x})[0], x)
    assert extras.available("runtime")


def test_cuda_fp16_pipeline_keeps_ir_version_and_opset(model_file, tmp_path, capsys):
    out = tmp_path / "fp16.onnx"
    code = main(["optimize", str(model_file), "-o", str(out), "--target", "cuda", "--precision", "fp16", "--no-validate"])
    assert code == 0, capsys.readouterr().err
    after = onnx.load(str(out))
    assert (after.ir_version, [(o.domain, o.version) for o in after.opset_import]) == (IR_VERSION, [("", OPSET)])


def test_verbose_logs_each_pass_and_quiet_shows_nothing(model_file, tmp_path, capsys):
    assert main(["optimize", str(model_file), "-o", str(tmp_path / "a.onnx"), "--no-validate", "-v"]) == 0
    err = capsys.readouterr().err
    assert "onnxdns: remove-channels: modified in" in err and "onnxdns: fold-masks: unchanged in" in err
    assert main(["optimize", str(model_file), "-o", str(tmp_path / "b.onnx"), "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and out.strip()  # results still go to stdout
    assert main(["optimize", str(model_file), "-o", str(tmp_path / "c.onnx"), "--no-validate"]) == 0
    assert "modified in" not in capsys.readouterr().err  # default: warnings only
