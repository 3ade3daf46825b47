"""compare() and measure_latency() on tiny classifiers run in onnxruntime."""

from __future__ import annotations

import types

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxdns import runtime
from onnxdns.errors import OnnxdnsError
from onnxdns.validate import compare, measure_latency

FAST = dict(repeats=3, warmup=1)


def classifier(weight: np.ndarray, in_shape=("N", 1, 28, 28), batch_dim=None) -> onnx.ModelProto:
    """Flatten -> Gemm(weight^T): an image classifier with len(weight) classes."""
    shape = list(in_shape)
    if batch_dim is not None:
        shape[0] = batch_dim
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("Gemm", ["f", "W"], ["logits"], transB=1)],
        "clf",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [shape[0], weight.shape[0]])],
        [numpy_helper.from_array(weight.astype(np.float32), "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@pytest.fixture(scope="module")
def weight() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((10, 784)).astype(np.float32) * 0.05


def test_identical_models(weight):
    m = classifier(weight)
    cmp = compare(m, m, samples=64, batch=16, latency_batches=(1, 8), **FAST)
    assert cmp.max_abs_diff == 0.0 and cmp.mean_abs_diff == 0.0 and cmp.max_rel_diff == 0.0
    assert cmp.top1_agreement == 1.0
    assert cmp.samples == 64 and cmp.batch == 16
    assert cmp.accuracy_a is None and cmp.accuracy_b is None  # random data has no labels
    assert [row.batch for row in cmp.latency] == [1, 8]
    for row in cmp.latency:
        assert row.a.median_ms > 0 and row.b.median_ms > 0 and row.a.repeats == 3
        assert row.ratio > 0
    assert cmp.within(1e-6)


def test_random_samples_need_not_fill_the_last_batch(weight):
    m = classifier(weight)
    assert compare(m, m, samples=10, batch=4, latency_batches=(), **FAST).samples == 10


def test_perturbed_model_is_detected(weight):
    delta = np.zeros_like(weight)
    delta[3, 100] = 0.5
    cmp = compare(classifier(weight), classifier(weight + delta), samples=32, latency_batches=(), **FAST)
    assert cmp.max_abs_diff > 1e-2
    assert cmp.mean_abs_diff > 0
    assert 0 < cmp.max_rel_diff
    assert cmp.output_scale > 0
    assert not cmp.within(1e-4)
    assert cmp.latency == ()


def test_diff_matches_numpy(weight):
    """The reported differences are those of the outputs, computed independently here."""
    w2 = weight * 1.01
    a, b = classifier(weight), classifier(w2)
    cmp = compare(a, b, samples=32, batch=32, latency_batches=(), **FAST)
    x = runtime.input_feeds(a, batch=32, seed=0)["x"].reshape(32, -1).astype(np.float64)
    ya, yb = x @ weight.T.astype(np.float64), x @ w2.T.astype(np.float64)
    assert cmp.max_abs_diff == pytest.approx(np.abs(ya - yb).max(), rel=1e-4)
    assert cmp.output_scale == pytest.approx(np.abs(ya).max(), rel=1e-4)


def test_accuracy_with_labels(weight):
    """Labels equal to model A's predictions on half the samples: accuracy exactly 0.5 for A."""
    rng = np.random.default_rng(1)
    images = rng.random((40, 1, 28, 28), dtype=np.float32)
    predictions = np.argmax(images.reshape(40, -1) @ weight.T, axis=1)
    labels = predictions.copy()
    labels[::2] = (labels[::2] + 1) % 10
    data = types.SimpleNamespace(images=images, labels=labels, name="labelled")
    cmp = compare(classifier(weight), classifier(weight), data=data, batch=16, latency_batches=(2,), **FAST)
    assert cmp.samples == 40 and cmp.data == "labelled"
    assert cmp.accuracy_a == cmp.accuracy_b == 0.5
    assert cmp.top1_agreement == 1.0


def test_fixed_batch_model_pads_the_last_chunk(weight):
    data = types.SimpleNamespace(images=np.random.default_rng(2).random((10, 1, 28, 28), dtype=np.float32),
                                 labels=np.zeros(10, np.int64))
    fixed = classifier(weight, batch_dim=4)
    cmp = compare(fixed, classifier(weight), data=data, batch=32, latency_batches=(1, 32), **FAST)
    assert cmp.samples == 10 and cmp.batch == 4
    assert cmp.max_abs_diff == 0.0
    assert [row.batch for row in cmp.latency] == [4]


def test_mnist_test_split(weight):
    m = classifier(weight)
    cmp = compare(m, m, data="mnist", samples=200, latency_batches=(), **FAST)
    assert cmp.samples == 200 and cmp.data == "mnist"
    assert 0.0 <= cmp.accuracy_a <= 1.0 and cmp.accuracy_a == cmp.accuracy_b


def test_input_that_does_not_match_the_data_is_a_clear_error():
    m = classifier(np.ones((10, 3 * 32 * 32), np.float32), in_shape=("N", 3, 32, 32))
    with pytest.raises(OnnxdnsError, match=r"\[N,1,28,28\].*\[N,3,32,32\]"):
        compare(m, m, data="mnist", **FAST)
    with pytest.raises(OnnxdnsError, match="unknown data"):
        compare(m, m, data="cifar", **FAST)


def test_models_with_different_outputs_are_rejected(weight):
    with pytest.raises(OnnxdnsError, match="shapes differ"):
        compare(classifier(weight), classifier(weight[:5]), samples=4, latency_batches=(), **FAST)


def test_measure_latency_side_by_side(weight):
    m = classifier(weight)
    feeds = runtime.input_feeds(m, batch=2)
    result = measure_latency({"a": m, "b": m.SerializeToString()}, feeds, repeats=4, warmup=1, threads=1)
    assert set(result) == {"a", "b"}
    for lat in result.values():
        assert lat.repeats == 4 and 0 < lat.min_ms <= lat.median_ms
    # positional feeds serve a model whose input has another name
    renamed = onnx.ModelProto()
    renamed.CopyFrom(m)
    renamed.graph.input[0].name = "image"
    renamed.graph.node[0].input[0] = "image"
    result = measure_latency({"a": m, "renamed": renamed}, [feeds["x"]], repeats=2, warmup=0)
    assert result["renamed"].median_ms > 0
    with pytest.raises(OnnxdnsError):
        measure_latency({"a": m}, feeds, repeats=0)


def test_sessions_made_for_side_by_side_timing_do_not_spin(weight, monkeypatch):
    """Each session owns an intra-op pool; one left spinning after its run would take cores from
    the next session timed, so measure_latency and compare make theirs with spinning off."""
    key = "session.intra_op.allow_spinning"

    def spinning(session) -> str:
        try:
            return session.get_session_options().get_session_config_entry(key)
        except RuntimeError:  # no entry: onnxruntime's default
            return "default"

    m = classifier(weight)
    assert spinning(runtime.make_session(m)) == "default"  # onnxruntime's default: spinning allowed
    assert spinning(runtime.make_session(m, spinning=False)) == "0"
    feeds = runtime.input_feeds(m, batch=2)
    made = []
    original = runtime.make_session

    def recording(*args, **kwargs):
        session = original(*args, **kwargs)
        made.append(spinning(session))
        return session

    monkeypatch.setattr(runtime, "make_session", recording)
    measure_latency({"a": m, "b": m}, feeds, repeats=2, warmup=0)
    compare(m, m, samples=4, latency_batches=(1,), repeats=2, warmup=0, threads=1)
    assert made and all(v == "0" for v in made)


# --------------------------------------------------------------------------- inputs that fit any model


def graph(nodes, inputs, outputs, inits=()) -> onnx.ModelProto:
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, list(inits)),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def nan_model(fill_only_where_negative: bool) -> onnx.ModelProto:
    """y = x, with NaN where x < 0 (both variants) and, when asked, also where x > 2."""
    nodes = [helper.make_node("Less", ["x", "zero"], ["neg"]),
             helper.make_node("Where", ["neg", "nan", "x"], ["y0"])]
    if fill_only_where_negative:
        nodes.append(helper.make_node("Identity", ["y0"], ["y"]))
    else:
        nodes += [helper.make_node("Greater", ["x", "two"], ["big"]), helper.make_node("Where", ["big", "nan", "y0"], ["y"])]
    return graph(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])],
                 [numpy_helper.from_array(np.array(0, np.float32), "zero"),
                  numpy_helper.from_array(np.array(2, np.float32), "two"),
                  numpy_helper.from_array(np.array(np.nan, np.float32), "nan")])


def test_nan_at_the_same_positions_is_equal_and_nan_in_one_model_is_a_difference():
    same = compare(nan_model(True), nan_model(True), samples=8, latency_batches=(), **FAST)
    assert same.max_abs_diff == 0.0 and same.mean_abs_diff == 0.0 and same.within(1e-6)
    assert same.output_scale > 0  # NaN is left out of the scale
    differs = compare(nan_model(True), nan_model(False), samples=8, latency_batches=(), **FAST)
    assert differs.max_abs_diff == np.inf and not differs.within(1e-4)


def test_scalar_output_turned_into_shape_1_is_detected():
    """Concatenating batches made [] and [1] look alike; outputs are now checked run by run."""
    x = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])]
    scalar = graph([helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0)], x,
                   [helper.make_tensor_value_info("s", TensorProto.FLOAT, [])])
    one = graph([helper.make_node("ReduceSum", ["x"], ["s0"], keepdims=0),
                 helper.make_node("Reshape", ["s0", "shape1"], ["s"])], x,
                [helper.make_tensor_value_info("s", TensorProto.FLOAT, [1])],
                [numpy_helper.from_array(np.array([1], np.int64), "shape1")])
    assert compare(scalar, scalar, samples=8, batch=4, latency_batches=(), **FAST).max_abs_diff == 0.0
    with pytest.raises(OnnxdnsError, match=r"output s: shapes differ between the models \(\[\] vs \[1\]\)"):
        compare(scalar, one, samples=8, batch=4, latency_batches=(), **FAST)


def test_output_dtype_change_is_detected():
    x = [helper.make_tensor_value_info("x", TensorProto.INT64, ["N", 4])]
    a = graph([helper.make_node("Identity", ["x"], ["y"])], x, [helper.make_tensor_value_info("y", TensorProto.INT64, ["N", 4])])
    b = graph([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.INT32)], x,
              [helper.make_tensor_value_info("y", TensorProto.INT32, ["N", 4])])
    with pytest.raises(OnnxdnsError, match=r"output y: types differ between the models \(int64 vs int32\)"):
        compare(a, b, samples=4, latency_batches=(), **FAST)


@pytest.mark.parametrize("options, fragment", [
    (dict(samples=10**9), "samples must be between 1 and 1,000,000"),
    (dict(repeats=10**9), "repeats must be between 1 and 10,000"),
    (dict(batch=0), "batch must be between"),
])
def test_absurd_effort_is_refused_at_once(weight, options, fragment):
    m = classifier(weight)
    with pytest.raises(OnnxdnsError, match=fragment):
        compare(m, m, **{**FAST, **options})


def test_multi_input_model_with_int64_tokens_is_exact():
    from test_runtime import multi_input_model

    m = multi_input_model()
    cmp = compare(m, m, samples=40, batch=16, latency_batches=(1, 4), **FAST)
    assert cmp.max_abs_diff == 0.0 and cmp.samples == 40 and cmp.notes == ()
    assert [row.batch for row in cmp.latency] == [1, 4]


def test_batch_fallback_is_reported_and_latency_stays_within_it():
    from test_runtime import batch_one_model

    m = batch_one_model()
    cmp = compare(m, m, samples=3, batch=32, latency_batches=(1, 32), **FAST)
    assert cmp.batch == 1 and cmp.samples == 3 and cmp.max_abs_diff == 0.0
    assert any("fails at batch 32" in n for n in cmp.notes)
    assert [row.batch for row in cmp.latency] == [1]


def test_real_inputs_from_npz(weight, tmp_path):
    a, b = classifier(weight), classifier(weight * 1.01)
    x = np.random.default_rng(5).standard_normal((6, 1, 28, 28)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    cmp = compare(a, b, data=str(tmp_path / "in.npz"), latency_batches=(1,), **FAST)
    expected = np.abs(x.reshape(6, -1) @ (weight * 0.01).T).max()
    assert cmp.data == "in.npz" and cmp.samples == 6
    assert cmp.max_abs_diff == pytest.approx(expected, rel=1e-3)
    assert [row.batch for row in cmp.latency] == [6]
    np.savez(tmp_path / "wrong.npz", image=x)
    with pytest.raises(OnnxdnsError, match="one array per model input, named x; missing x; unknown image"):
        compare(a, b, data=str(tmp_path / "wrong.npz"), **FAST)
    np.savez(tmp_path / "shape.npz", x=x[:, :, :14])
    with pytest.raises(OnnxdnsError, match=r"array x has shape \[6, 1, 14, 28\], the model input is 'x' float32 \[N,1,28,28\]"):
        compare(a, b, data=str(tmp_path / "shape.npz"), **FAST)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(OnnxdnsError, match="bad.npz: cannot read inputs"):
        compare(a, b, data=str(tmp_path / "bad.npz"), **FAST)


def test_reference_model_failing_on_given_inputs_says_so_untruncated(tmp_path):
    from test_runtime import batch_one_model

    m = batch_one_model()
    np.savez(tmp_path / "two.npz", x=np.ones((2, 4), np.float32))
    with pytest.raises(OnnxdnsError) as e:
        compare(m, m, data=str(tmp_path / "two.npz"), **FAST)
    text = str(e.value)
    assert text.startswith("model A (the reference) fails on the given inputs:")
    assert "requested shape:{1,4}" in text  # the end of onnxruntime's message is kept


def test_latency_failure_is_a_clear_error():
    """measure_latency wraps onnxruntime's exception (it was an unhandled RuntimeException)."""
    from test_runtime import batch_one_model

    m = batch_one_model()
    with pytest.raises(OnnxdnsError, match=r"model a fails in the latency measurement on inputs x \[3, 4\]: .*Reshape"):
        measure_latency({"a": m}, {"x": np.ones((3, 4), np.float32)}, repeats=1, warmup=0)
