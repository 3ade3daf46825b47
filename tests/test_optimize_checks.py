"""What optimize checks on its output besides the numeric comparison: exit 0 means it loads.

* The output must load in onnxruntime (a session with the default graph optimizations), also
  with ``validate=False`` / ``--no-validate``: if it does not, validation failed (exit 3).
* A structure-check (onnx full check) failure that the input has too, with the same message, is
  a property of the input: noted in the message, not a failure of the output.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxdns.passes
from onnxdns import api
from onnxdns.framework import GraphPass, PassReport


def save(model: onnx.ModelProto, path) -> str:
    onnx.save_model(model, path)
    return str(path)


def relu_model() -> onnx.ModelProto:
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def mvn_model() -> onnx.ModelProto:
    """onnx's node test test_mvn: one MeanVarianceNormalization (opset 13). Valid, and onnxruntime
    runs it, but onnx's full check rejects it: shape inference of the operator's own function body
    fails ("One and only one of the attributes 'value', 'value_*' or 'sparse_value' must be
    specified for a Constant node")."""
    graph = helper.make_graph([helper.make_node("MeanVarianceNormalization", ["x"], ["y"])], "test_mvn",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 3, 3, 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 3, 3, 1])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)


class Bfloat16NegPass(GraphPass):
    """Test only: y = -x computed in bfloat16. onnx's checks accept it; onnxruntime's CPU provider
    has no bfloat16 Neg kernel, so no session can be created."""

    name = "test-bf16-neg"
    exact = True
    summary = "negate the output in bfloat16 (test only)"

    def call(self, model: ir.Model) -> PassReport:
        proto = ir.serde.serialize_model(model)
        out = proto.graph.output[0].name
        for node in proto.graph.node:
            node.output[:] = [f"{o}_pre" if o == out else o for o in node.output]
        proto.graph.node.extend([
            helper.make_node("Cast", [f"{out}_pre"], [f"{out}_bf16"], to=TensorProto.BFLOAT16),
            helper.make_node("Neg", [f"{out}_bf16"], [f"{out}_neg"]),
            helper.make_node("Cast", [f"{out}_neg"], [out], to=TensorProto.FLOAT),
        ])
        new = ir.serde.deserialize_model(proto)
        model.graph = new.graph
        return PassReport(model, True, {})


class RetypeOutputPass(GraphPass):
    """Test only: declares the first graph output int64 (a structure error of the output's own)."""

    name = "test-retype-output"
    exact = True
    summary = "declare the first output int64 (test only)"

    def call(self, model: ir.Model) -> PassReport:
        model.graph.outputs[0].type = ir.TensorType(ir.DataType.INT64)
        return PassReport(model, True, {})


class BadAddPass(GraphPass):
    """Test only: prepends an unused ``Add(x, k)`` with ``k`` int64 and ``x`` float (a type error
    that onnx's shape inference reports before anything else)."""

    name = "test-bad-add"
    exact = True
    summary = "add a mistyped Add (test only)"

    def call(self, model: ir.Model) -> PassReport:
        k = ir.Value(name="k", shape=ir.Shape([1]), type=ir.TensorType(ir.DataType.INT64),
                     const_value=ir.tensor(np.array([1], np.int64), name="k"))
        model.graph.register_initializer(k)
        model.graph.insert_before(model.graph.node(0), ir.Node("", "Add", [model.graph.inputs[0], k], num_outputs=1))
        return PassReport(model, True, {})


@pytest.fixture
def test_passes(monkeypatch):
    monkeypatch.setattr(onnxdns.passes, "PASSES",
                        (*onnxdns.passes.PASSES, Bfloat16NegPass, RetypeOutputPass, BadAddPass))


@pytest.mark.parametrize("validate", [False, True])
def test_output_that_does_not_load_fails_even_without_validation(test_passes, tmp_path, validate):
    src = save(relu_model(), tmp_path / "in.onnx")
    result = api.optimize(src, tmp_path / "out.onnx", passes=["test-bf16-neg"], validate=validate)
    onnx.checker.check_model(onnx.load(tmp_path / "out.onnx"), full_check=True)  # onnx finds nothing wrong
    assert not result.ok and result.validation.status == "failed"
    assert result.validation.message.startswith("the output does not load in onnxruntime: ")
    assert "nor does the input" not in result.validation.message
    assert (tmp_path / "out.onnx").exists()  # kept, as for any failed validation


def test_an_input_that_does_not_load_either_is_named(tmp_path):
    model = Bfloat16NegPass()(relu_model())  # a valid model onnxruntime's CPU provider cannot load
    src = save(model, tmp_path / "in.onnx")
    result = api.optimize(src, tmp_path / "out.onnx", passes=["topo-sort"], validate=False)
    assert not result.ok
    assert result.validation.message.startswith("the output does not load in onnxruntime: ")
    assert "(nor does the input: [ONNXRuntimeError]" in result.validation.message


def test_no_validate_says_the_output_loads(tmp_path):
    src = save(relu_model(), tmp_path / "in.onnx")
    result = api.optimize(src, tmp_path / "out.onnx", validate=False)
    assert result.ok and result.validation.status == "structure-only"
    assert "loads in onnxruntime (CPU)" in result.validation.message


@pytest.mark.parametrize("validate", [False, True])
def test_structure_failure_of_the_input_is_not_blamed_on_the_output(tmp_path, validate):
    model = mvn_model()
    with pytest.raises(Exception, match="Constant"):
        onnx.checker.check_model(model, full_check=True)
    src = save(model, tmp_path / "mvn.onnx")
    result = api.optimize(src, tmp_path / "out.onnx", validate=validate)
    assert result.ok, result.validation.message
    assert result.validation.status == ("passed" if validate else "structure-only")
    assert "the input already fails onnx's full check (shape inference), and the output the same way: " \
           in result.validation.message


def test_a_structure_failure_of_the_outputs_own_still_fails(test_passes, tmp_path):
    src = save(mvn_model(), tmp_path / "mvn.onnx")
    result = api.optimize(src, tmp_path / "out.onnx", passes=["test-bad-add"], validate=False)
    assert not result.ok
    assert result.validation.message.startswith("structure check failed: ")
    assert "(the input fails it too, differently: " in result.validation.message


def test_an_output_problem_hidden_behind_the_inputs_structure_failure_still_fails(test_passes, tmp_path):
    """onnx's full check stops at the input's error, so the output's own (a mistyped graph output)
    gives the same message; onnxruntime's load check catches it."""
    src = save(mvn_model(), tmp_path / "mvn.onnx")
    result = api.optimize(src, tmp_path / "out.onnx", passes=["test-retype-output"], validate=False)
    assert not result.ok
    assert result.validation.message.startswith("the output does not load in onnxruntime: ")
    assert "tensor(int64)" in result.validation.message


def test_cli_exit_status(test_passes, tmp_path, capsys):
    from onnxdns.cli import main

    mvn = save(mvn_model(), tmp_path / "mvn.onnx")
    assert main(["optimize", mvn, "-o", str(tmp_path / "a.onnx"), "--no-validate"]) == 0
    assert main(["optimize", mvn, "-o", str(tmp_path / "b.onnx")]) == 0
    relu = save(relu_model(), tmp_path / "relu.onnx")
    assert main(["optimize", relu, "-o", str(tmp_path / "c.onnx"), "--passes", "test-bf16-neg", "--no-validate"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("onnxdns: error: validation failed (the output does not load")
