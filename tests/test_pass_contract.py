"""The pass contract, checked for every class in ``PASSES`` on one small generic model.

Three call styles (ModelProto, onnx_graphsurgeon.Graph, onnx_ir PassManager) agree; exact passes
match onnxruntime before/after at tight tolerance (lossy ones keep output names, shapes and
finiteness; their bounds are tested in their own files); ``modified`` is honest; a second run
changes nothing; the output passes the ONNX checker. A pass added to ``PASSES`` is checked too.
"""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
from onnx import helper

from onnxdns import modelio
from onnxdns.passes import PASSES
from passkit import (all_call_styles, assert_exact, check_idempotent, feeds_for, init, make_model, roundtrip, run,
                     same_bytes, tensor_input)

def generic_model(shuffled: bool = False) -> onnx.ModelProto:
    """Conv-BN-Relu-Identity-Flatten-Dropout-Gemm-Relu-Gemm-Add, built so every pass has work:

    a conv weight with one all-zero filter (remove-channels, add-masks), BN statistics
    (fold-batchnorm), Identity and Dropout (eliminate-identity), a mostly-zero first Gemm weight
    (sparse-storage), a masked second Gemm weight ``Mul(fc2.weight, fc2.weight__mask)``
    (fold-masks, fold-constants), a Constant node, a dead node, an unused initializer and opset
    import (remove-dead-nodes), no value_info (infer-shapes), float32 everywhere (convert-fp16).
    ``shuffled`` moves the mask Mul after its consumer (topo-sort; the ONNX checker rejects that).
    """
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((6, 3, 3, 3)) * 0.5).astype(np.float32)
    w[2] = 0
    b = rng.standard_normal(6).astype(np.float32)
    b[2] = 0
    fc1 = (rng.standard_normal((16, 6 * 4 * 4)) * 0.3).astype(np.float32)
    fc1[rng.random(fc1.shape) < 0.9] = 0
    fc2 = (rng.standard_normal((10, 16)) * 0.3).astype(np.float32)
    mask = (rng.random(fc2.shape) > 0.3).astype(np.float32)
    mask_mul = helper.make_node("Mul", ["fc2.weight", "fc2.weight__mask"], ["fc2.masked"])
    nodes = [
        helper.make_node("Conv", ["x", "conv.weight", "conv.bias"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("BatchNormalization", ["c", "bn.gamma", "bn.beta", "bn.mean", "bn.var"], ["bn"], name="bn"),
        helper.make_node("Relu", ["bn"], ["r"]),
        helper.make_node("Identity", ["r"], ["i"]),
        helper.make_node("Neg", ["r"], ["dead"]),
        helper.make_node("Flatten", ["i"], ["f"]),
        helper.make_node("Dropout", ["f"], ["d"]),
        helper.make_node("Gemm", ["d", "fc1.weight", "fc1.bias"], ["h"], transB=1, name="fc1"),
        helper.make_node("Relu", ["h"], ["hr"]),
        mask_mul,
        helper.make_node("Gemm", ["hr", "fc2.masked", "fc2.bias"], ["g"], transB=1, name="fc2"),
        helper.make_node("Constant", [], ["offset"], value=onnx.numpy_helper.from_array(np.float32(0.5))),
        helper.make_node("Add", ["g", "offset"], ["logits"]),
    ]
    if shuffled:
        nodes.remove(mask_mul)
        nodes.append(mask_mul)
    normal = rng.standard_normal
    inits = [
        init("conv.weight", w), init("conv.bias", b),
        init("bn.gamma", rng.uniform(0.5, 2.0, 6).astype(np.float32)), init("bn.beta", normal(6).astype(np.float32)),
        init("bn.mean", normal(6).astype(np.float32)), init("bn.var", rng.uniform(0.2, 2.0, 6).astype(np.float32)),
        init("fc1.weight", fc1), init("fc1.bias", normal(16).astype(np.float32)),
        init("fc2.weight", fc2), init("fc2.weight__mask", mask), init("fc2.bias", normal(10).astype(np.float32)),
        init("unused", np.ones(4, np.float32)),
    ]
    model = make_model(nodes, [tensor_input("x", ["N", 3, 4, 4])], [tensor_input("logits", ["N", 10])], inits)
    model.opset_import.append(helper.make_opsetid("ai.onnx.ml", 3))
    return model


def model_for(pass_cls) -> onnx.ModelProto:
    if pass_cls.name in ("insert-channel-scales", "fold-channel-scales"):
        return scaled_model(inserted=pass_cls.name == "fold-channel-scales")
    return generic_model(shuffled=pass_cls.name == "topo-sort")


def options_for(pass_cls, model: onnx.ModelProto) -> dict:
    """Constructor options: none, except for a pass that applies a plan fitted by its workflow
    (sparse-lowrank: a plan fitted on ``model`` with random calibration inputs)."""
    if pass_cls.name == "sparse-lowrank":
        from onnxdns.workflows.sparse_lowrank import SparseLowRank

        plan = SparseLowRank(None, calib_samples=16, target_compression=1.5, iterations=1, threads=1,
                             speed_check=False).fit(modelio.to_ir(model))
        assert plan.fitted, "the generic model gives sparse-lowrank nothing to split"
        return {"plan": plan}
    return {}


def scaled_model(inserted: bool) -> onnx.ModelProto:
    """The generic model with its BatchNorm folded (the usual export: no BN after the conv), and
    with ``inserted`` a channel scale ``Mul(conv, conv.slim_scale)`` of values other than 1."""
    from onnxdns.passes.fold_batchnorm import FoldBatchNormPass
    from onnxdns.passes.insert_channel_scales import InsertChannelScalesPass

    model = FoldBatchNormPass()(generic_model())
    if inserted:
        model = InsertChannelScalesPass()(model)
        for t in model.graph.initializer:
            if t.name.endswith(".slim_scale"):
                values = np.linspace(0.25, 2.0, int(np.prod(t.dims)), dtype=np.float32).reshape(tuple(t.dims))
                t.CopyFrom(onnx.numpy_helper.from_array(values, t.name))
    return model


def assert_faithful(pass_cls, before: onnx.ModelProto, after: onnx.ModelProto) -> None:
    """Exact passes: onnxruntime outputs agree to 1e-5 x max(1, scale). Lossy passes state their
    own bound (tested in their own files): here the outputs keep names and shapes and stay finite."""
    if pass_cls.exact:
        assert_exact(before, after, rel=1e-5, batch=3)
        return
    assert [o.name for o in before.graph.output] == [o.name for o in after.graph.output]
    feeds = feeds_for(before, 3)
    for ref, out in zip(run(before, feeds), run(after, feeds)):
        assert ref.shape == out.shape and ref.dtype == out.dtype and np.all(np.isfinite(out))


def test_generic_model_runs():
    for shuffled in (False, True):
        model = generic_model(shuffled)
        out = run(model, feeds_for(model, 2))
        assert out[0].shape == (2, 10) and np.all(np.isfinite(out[0]))
    onnx.checker.check_model(generic_model(), full_check=True)


def test_registry_metadata():
    names = [cls.name for cls in PASSES]
    assert len(names) == len(set(names))
    for cls in PASSES:
        assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", cls.name), cls
        assert cls.summary and cls.__doc__ and cls.__name__.endswith("Pass")
        assert isinstance(cls.exact, bool)


@pytest.mark.parametrize("pass_cls", PASSES, ids=lambda cls: cls.name)
def test_three_call_styles_agree_and_are_faithful(pass_cls):
    model = model_for(pass_cls)
    (_, from_proto, modified), (_, from_gs, _), (_, from_manager, manager_modified) = all_call_styles(pass_cls, model,
                                                                                              **options_for(pass_cls, model))
    assert modified, f"{pass_cls.name} found nothing to do in the generic model"
    assert manager_modified == modified
    assert same_bytes(from_proto, from_manager)
    for out in (from_proto, from_gs):
        onnx.checker.check_model(out)
        assert_faithful(pass_cls, model, out)
    feeds = feeds_for(model, 3)
    for a, b in zip(run(from_proto, feeds), run(from_gs, feeds)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("pass_cls", PASSES, ids=lambda cls: cls.name)
def test_modified_is_honest_and_second_run_changes_nothing(pass_cls):
    model = model_for(pass_cls)
    options = options_for(pass_cls, model)
    result = pass_cls(**options).apply(model)
    assert result.modified == (not same_bytes(result.model, roundtrip(model)))
    check_idempotent(pass_cls, model, **options)
