"""inputs.plan_inputs / input_feeds: random inputs that fit the model (dtype, rank, fixed and
dynamic dimensions, the graph's own hints, memory budget, fallbacks), on tiny graphs run in
onnxruntime and on trained models others made."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxdns import inputs, runtime
from onnxdns.errors import OnnxdnsError
from realmodels import model_path


def make(nodes, inputs, outputs, inits=(), opset=17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def vi(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


def multi_input_model() -> onnx.ModelProto:
    """tokens int64 [N, S] -> embedding Gather(table 50x8); mask bool [N, S]; scale float16 [N, 8]:
    y = sum over S of (emb * mask) * float(scale)."""
    table = np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["table", "tokens"], ["emb"]),
        helper.make_node("Cast", ["mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "axis2"], ["mask3"]),
        helper.make_node("Mul", ["emb", "mask3"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "axis1"], ["pooled"], keepdims=0),
        helper.make_node("Cast", ["scale"], ["scalef"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["pooled", "scalef"], ["y"]),
    ]
    return make(nodes,
                [vi("tokens", TensorProto.INT64, ["N", "S"]), vi("mask", TensorProto.BOOL, ["N", "S"]),
                 vi("scale", TensorProto.FLOAT16, ["N", 8])],
                [vi("y", TensorProto.FLOAT, ["N", 8])],
                [numpy_helper.from_array(table, "table"), numpy_helper.from_array(np.array([2], np.int64), "axis2"),
                 numpy_helper.from_array(np.array([1], np.int64), "axis1")])


def test_dtypes_ranges_and_shared_dimension_names():
    m = multi_input_model()
    feeds = runtime.input_feeds(m, batch=3, seed=1)
    assert feeds["tokens"].dtype == np.int64 and feeds["mask"].dtype == np.bool_ and feeds["scale"].dtype == np.float16
    # N is the batch everywhere; S, shared by tokens and mask, has one size
    assert feeds["tokens"].shape == feeds["mask"].shape == (3, inputs.FREE_SIZE)
    assert feeds["scale"].shape == (3, 8)
    # token ids index the 50-row table (the Gather hint), and use more than the default range
    assert feeds["tokens"].min() >= 0 and feeds["tokens"].max() < 50 and feeds["tokens"].max() >= inputs.INT_HIGH
    assert feeds["mask"].any() and not feeds["mask"].all()
    runtime.run(m, feeds)  # the model runs on them
    np.testing.assert_array_equal(runtime.input_feeds(m, batch=3, seed=1)["tokens"], feeds["tokens"])


def test_spatial_dims_do_not_follow_the_batch_size():
    """[N, 3, H, W] at batch 1 was [1, 3, 1, 1] (every symbolic dim = batch): a Resize/upsample net
    then fails. H and W get FREE_SIZE whatever the batch."""
    m = yolo_like()
    for batch in (1, 5):
        assert runtime.input_feeds(m, batch=batch)["images"].shape == (batch, 3, 64, 64)


def test_symbolic_channel_dimension_comes_from_the_conv_weight():
    w = np.ones((4, 3, 3, 3), np.float32)
    m = make([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])],
             [vi("x", TensorProto.FLOAT, ["N", "C", 28, 28])], [vi("y", TensorProto.FLOAT, ["N", 4, 28, 28])],
             [numpy_helper.from_array(w, "w")])
    feeds = runtime.input_feeds(m, batch=2)
    assert feeds["x"].shape == (2, 3, 28, 28)
    runtime.run(m, feeds)


def test_symbolic_channel_dimension_comes_from_batchnorm():
    c = 5
    params = [numpy_helper.from_array(np.ones(c, np.float32), n) for n in ("s", "b", "m", "v")]
    m = make([helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"])],
             [vi("x", TensorProto.FLOAT, ["N", "C", "H", "W"])], [vi("y", TensorProto.FLOAT, ["N", "C", "H", "W"])], params)
    assert inputs.plan_inputs(m, batch=2, probe=True).shapes() == {"x": (2, c, 64, 64)}


def test_contracted_and_broadcast_dimensions_come_from_constants():
    w = np.ones((12, 5), np.float32)
    bias = np.ones((7, 1), np.float32)
    m = make([helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["z", "bias"], ["y2"])],
             [vi("x", TensorProto.FLOAT, ["N", "K"]), vi("z", TensorProto.FLOAT, ["N", "R", "Q"])],
             [vi("h", TensorProto.FLOAT, ["N", 5]), vi("y2", TensorProto.FLOAT, ["N", 7, "Q"])],
             [numpy_helper.from_array(w, "w"), numpy_helper.from_array(bias, "bias")])
    plan = inputs.plan_inputs(m, batch=2)
    assert plan.shapes() == {"x": (2, 12), "z": (2, 7, inputs.FREE_SIZE)}


def test_recurrent_state_batch_axis_and_equal_constant_value():
    """A speech model's layout: audio [N, T], state [2, N, 16] (batch on axis 1, unnamed), an int64
    scalar compared with 16000 (the sample rate that selects the branch)."""
    nodes = [
        helper.make_node("Equal", ["sr", "sr16k"], ["is16k"]),
        helper.make_node("Cast", ["is16k"], ["gate"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["audio"], ["level"], axes=[1], keepdims=1),  # [N, 1]
        helper.make_node("Mul", ["level", "gate"], ["out"]),
        helper.make_node("Add", ["state", "level"], ["state_n"]),  # [2, N, 16] + [N, 1]
    ]
    m = make(nodes,
             [vi("audio", TensorProto.FLOAT, [None, None]), vi("state", TensorProto.FLOAT, [2, None, 16]),
              vi("sr", TensorProto.INT64, [])],
             [vi("out", TensorProto.FLOAT, [None, 1]), vi("state_n", TensorProto.FLOAT, [2, None, 16])],
             [numpy_helper.from_array(np.array(16000, np.int64), "sr16k")], opset=17)
    feeds = runtime.input_feeds(m, batch=4)
    assert feeds["audio"].shape == (4, inputs.FREE_SIZE) and feeds["state"].shape == (2, 4, 16)
    assert feeds["sr"].shape == () and int(feeds["sr"]) == 16000
    out, _ = runtime.run(m, feeds)
    assert np.all(out != 0)  # the gate is open: sr selected the 16 kHz branch


def batch_one_model() -> onnx.ModelProto:
    """Declares [N, 4] but reshapes to a constant [1, 4]: runs only at batch 1 (like some
    exports that bake the traced batch size into a Reshape)."""
    return make([helper.make_node("Reshape", ["x", "shape"], ["r"]), helper.make_node("Relu", ["r"], ["y"])],
                [vi("x", TensorProto.FLOAT, ["N", 4])], [vi("y", TensorProto.FLOAT, [1, 4])],
                [numpy_helper.from_array(np.array([1, 4], np.int64), "shape")])


def test_probe_falls_back_to_batch_1_and_says_so(capfd):
    plan = inputs.plan_inputs(batch_one_model(), batch=32, probe=True)
    assert capfd.readouterr().err == ""  # onnxruntime's own error log is silenced while probing
    assert plan.batch == 1 and plan.batch_limited
    assert len(plan.notes) == 1 and "fails at batch 32" in plan.notes[0] and "Reshape" in plan.notes[0]
    assert inputs.plan_inputs(batch_one_model(), batch=32).batch == 32  # no probe: as asked


def test_probe_tries_larger_free_sizes():
    """A sequence model whose time axis must be 256 (a constant it is added to)."""
    # The Add hint would find 256 at once; a Reshape to [N, 2, 128] hides it from the hints.
    m = make([helper.make_node("Reshape", ["x", "shape"], ["y"])],
             [vi("x", TensorProto.FLOAT, ["N", "T"])], [vi("y", TensorProto.FLOAT, ["N", 2, 128])],
             [numpy_helper.from_array(np.array([-1, 2, 128], np.int64), "shape")])
    plan = inputs.plan_inputs(m, batch=1, probe=True)
    assert plan.shapes() == {"x": (1, 256)}
    assert any("= 64; they are 256" in n for n in plan.notes)


def test_input_model_that_fails_on_every_try_is_a_clear_error():
    m = make([helper.make_node("Reshape", ["x", "shape"], ["y"])],
             [vi("x", TensorProto.FLOAT, ["N", 3])], [vi("y", TensorProto.FLOAT, [2, 2])],
             [numpy_helper.from_array(np.array([2, 2], np.int64), "shape")])
    with pytest.raises(OnnxdnsError) as e:
        inputs.plan_inputs(m, batch=8, probe=True)
    text = str(e.value)
    assert text.startswith("the input model fails on random inputs (x float32 [8, 3]; at batch 1 too)")
    assert "Reshape" in text and "--data FILE.npz" in text and "..." not in text


@pytest.mark.parametrize("shape", [[1, 2**40], ["N", 32768, 32768]])
def test_inputs_over_the_memory_budget_are_refused_before_allocating(shape):
    m = make([helper.make_node("Relu", ["x"], ["y"])], [vi("x", TensorProto.FLOAT, shape)],
             [vi("y", TensorProto.FLOAT, shape)])
    with pytest.raises(OnnxdnsError, match=r"would need .* GiB for one sample .* budget"):
        inputs.plan_inputs(m, batch=32, probe=True)


def test_batch_is_reduced_to_fit_the_budget():
    m = make([helper.make_node("Relu", ["x"], ["y"])], [vi("x", TensorProto.FLOAT, ["N", 1000])],
             [vi("y", TensorProto.FLOAT, ["N", 1000])])
    plan = inputs.plan_inputs(m, batch=32, budget=10 * 4000)
    assert plan.batch == 10 and plan.batch_limited and "batch 10 fits" in plan.notes[0]


def test_unknown_input_type_is_a_clear_error():
    m = make([helper.make_node("Identity", ["s"], ["t"])], [vi("s", TensorProto.STRING, ["N"])],
             [vi("t", TensorProto.STRING, ["N"])])
    with pytest.raises(OnnxdnsError, match="cannot make random data of type tensor\\(string\\)"):
        runtime.input_feeds(m)


def yolo_like() -> onnx.ModelProto:
    """A small YOLO-style detector with dynamic H/W: stride-2 convs down to H/4, nearest Resize
    back up by 2, Concat with the stride-2 map (a feature-pyramid step), 1x1 head."""
    rng = np.random.default_rng(3)
    w1 = rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.2
    w2 = rng.standard_normal((8, 8, 3, 3)).astype(np.float32) * 0.2
    wh = rng.standard_normal((6, 16, 1, 1)).astype(np.float32) * 0.2
    nodes = [
        helper.make_node("Conv", ["images", "w1"], ["c1"], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Resize", ["r2", "", "scales"], ["up"], mode="nearest"),
        helper.make_node("Concat", ["up", "r1"], ["cat"], axis=1),
        helper.make_node("Conv", ["cat", "wh"], ["head"]),
        helper.make_node("Sigmoid", ["head"], ["detections"]),
    ]
    return make(nodes, [vi("images", TensorProto.FLOAT, ["batch", 3, "height", "width"])],
                [vi("detections", TensorProto.FLOAT, ["batch", 6, "h2", "w2"])],
                [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(wh, "wh"),
                 numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")])


# --------------------------------------------------------------------------- trained models


@pytest.mark.parametrize("name", ["ocr-det", "ocr-cls", "ocr-rec"])
def test_ocr_models_run_on_their_planned_inputs(name):
    """Dynamic H/W: 64x64 runs on all three (the recognizer is killed by SIGFPE at H <= 32)."""
    plan = inputs.plan_inputs(str(model_path(name)), batch=2, probe=True)
    assert plan.shapes() == {"x": (2, 3, 64, 64)} and plan.notes == ()


@pytest.mark.parametrize("name, sr", [("silero-vad", 16000), ("silero-vad-op15", None), ("silero-vad-op18", 16000)])
def test_silero_vad_plan(name, sr):
    """Audio [?, ?], state [2, ?, 128], sr int64 scalar: sr = 16000 from the graph, the state's
    unnamed axis 1 follows the batch, the chunk length is found by probing (64 fails). The 16 kHz
    only export (op15) multiplies sr by a constant instead of comparing it: no value hint."""
    plan = inputs.plan_inputs(str(model_path(name)), batch=4, probe=True)
    shapes = plan.shapes()
    assert shapes["state"] == (2, 4, 128) and shapes["sr"] == () and shapes["input"][0] == 4
    assert shapes["input"][1] in inputs.FREE_SIZES[1:]
    if sr is not None:
        assert int(plan.feeds()["sr"]) == sr
    assert plan.batch == 4 and not plan.batch_limited
