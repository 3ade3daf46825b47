"""sparse-lowrank: emitted graphs (exactness, structure), the pass on real data, CLI and API."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from onnxdns import api, cli, modelio, runtime
from onnxdns.data import load_dataset
from onnxdns.lowrank import calibration, emit
from onnxdns.lowrank.fit import Factors
from onnxdns.lowrank.layers import MARK, find_layers
from onnxdns.lowrank.split import Settings, split_model
from onnxdns.workflows.sparse_lowrank import SparseLowRank
from passkit import assert_exact, check_idempotent, init, make_model, op_types, run, tensor_input

RNG = np.random.default_rng(7)


def normal(*shape, scale=1.0):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def one_layer(op: str) -> onnx.ModelProto:
    """A single Conv (strided, padded, dilated) / Gemm (transB=0, alpha, beta, [1, m] bias) /
    MatMul (3-D input) followed by Relu."""
    if op == "Conv":
        node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="layer", strides=[2, 1], pads=[1, 2, 0, 1],
                                dilations=[1, 2])
        inits = [init("w", normal(12, 6, 3, 3, scale=0.3)), init("b", normal(12))]
        x = tensor_input("x", ["N", 6, 9, 8])
        y = ["N", 12, 4, 7]
    elif op == "Gemm":
        node = helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="layer", alpha=0.5, beta=2.0)
        inits = [init("w", normal(20, 12, scale=0.3)), init("b", normal(1, 12))]
        x = tensor_input("x", ["N", 20])
        y = ["N", 12]
    else:
        node = helper.make_node("MatMul", ["x", "w"], ["y"], name="layer")
        inits = [init("w", normal(20, 12, scale=0.3))]
        x = tensor_input("x", ["N", 5, 20])
        y = ["N", 5, 12]
    return make_model([node, helper.make_node("Relu", ["y"], ["out"])], [x], [tensor_input("out", y)], inits)


def split_with(model: onnx.ModelProto, factors_for) -> onnx.ModelProto:
    """``model`` with its only layer replaced by ``factors_for(layer)``."""
    ir_model = modelio.to_ir(model)
    layers, _ = find_layers(ir_model.graph)
    emit.replace(ir_model.graph, layers[0], factors_for(layers[0]))
    return modelio.to_proto(ir_model)


def exact_factors(layer, rank: int, keep: np.ndarray) -> Factors:
    """Factors with ``S + P Q == W`` exactly: S takes the kept groups' columns, P Q an SVD of the rest."""
    w, k = layer.weight.astype(np.float64), layer.geometry.group_size
    cols = (keep[:, None] * k + np.arange(k)).reshape(-1)
    rest = w.copy()
    rest[:, cols] = 0
    u, s, vt = np.linalg.svd(rest, full_matrices=False)
    assert np.all(s[rank:] < 1e-6 * max(s[0], 1.0)), "the rest must have rank <= rank"
    return Factors(u[:, :rank] * s[:rank], vt[:rank], keep.astype(np.int64), w[:, cols],
                   layer.bias.astype(np.float64), k)


@pytest.mark.parametrize("op", ["Conv", "Gemm", "MatMul"])
def test_full_rank_or_everything_kept_is_exact(op):
    model = one_layer(op)
    layer = find_layers(modelio.to_ir(model).graph)[0][0]
    full = layer.geometry.full_rank
    no_groups = np.zeros(0, np.int64)
    all_groups = np.arange(layer.geometry.in_channels)
    for factors_for in (lambda l: exact_factors(l, full, no_groups), lambda l: exact_factors(l, 0, all_groups)):
        out = split_with(model, factors_for)
        onnx.checker.check_model(out, full_check=True)
        assert_exact(model, out, rel=1e-5, batch=3)


@pytest.mark.parametrize("op", ["Conv", "Gemm", "MatMul"])
def test_sparse_plus_lowrank_graph_structure(op):
    """A weight that is exactly rank 2 outside 3 kept groups: the split graph is exact, and has the
    documented structure (low-rank pair, Gather of the kept groups, narrow layer, Add, activation)."""
    model = one_layer(op)
    ir_model = modelio.to_ir(model)
    layer = find_layers(ir_model.graph)[0][0]
    keep = np.array([1, 4, 5])
    k = layer.geometry.group_size
    cols = (keep[:, None] * k + np.arange(k)).reshape(-1)
    m, d = layer.weight.shape
    w = normal(m, 2) @ normal(2, d)
    w[:, cols] = layer.weight[:, cols]
    layer.weight = w
    # write the structured weight back into the model so that before/after compare the same layer
    for t in model.graph.initializer:
        if t.name == "w":
            arr = w
            if op == "Conv":
                arr = w.reshape(onnx.numpy_helper.to_array(t).shape)
            elif op == "Gemm":
                arr = (w / 0.5).T
            else:
                arr = w.T
            t.CopyFrom(onnx.numpy_helper.from_array(np.ascontiguousarray(arr.astype(np.float32)), "w"))
    out = split_with(model, lambda l: exact_factors(l, 2, keep))
    onnx.checker.check_model(out, full_check=True)
    assert_exact(model, out, rel=1e-5, batch=3)
    expected = {"Conv": ["Conv", "Conv", "Gather", "Conv", "Add", "Relu"],
                "Gemm": ["Gemm", "Gemm", "Gather", "Gemm", "Add", "Relu"],
                "MatMul": ["MatMul", "MatMul", "Gather", "MatMul", "Add", "Relu"]}[op]  # zero bias: no bias Add
    assert op_types(out) == expected
    assert all(MARK in n.name for n in out.graph.node if n.op_type != "Relu")
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in out.graph.initializer}
    gather = next(n for n in out.graph.node if n.op_type == "Gather")
    np.testing.assert_array_equal(inits[gather.input[1]], keep)
    assert {a.name: a.i for a in gather.attribute}["axis"] == (-1 if op == "MatMul" else 1)
    if op == "Conv":
        first, second, _, narrow = out.graph.node[:4]
        assert inits[first.input[1]].shape == (2, 6, 3, 3) and inits[second.input[1]].shape == (12, 2, 1, 1)
        assert inits[narrow.input[1]].shape == (12, 3, 3, 3)
        attrs = {a.name: list(a.ints) for a in narrow.attribute}
        assert attrs["strides"] == [2, 1] and attrs["pads"] == [1, 2, 0, 1] and attrs["dilations"] == [1, 2]
    assert "w" not in inits and "b" not in inits  # the original weights are gone


def two_convs() -> onnx.ModelProto:
    """x -> Conv 2->8 -> Relu -> Conv 8->6 (named "layer") -> Relu."""
    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], name="producer", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c0"], ["r0"]),
             helper.make_node("Conv", ["r0", "w", "b"], ["y"], name="layer", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["y"], ["out"])]
    inits = [init("w0", normal(8, 2, 3, 3, scale=0.4)), init("b0", normal(8, scale=0.1)),
             init("w", normal(6, 8, 3, 3, scale=0.3)), init("b", normal(6, scale=0.1))]
    return make_model(nodes, [tensor_input("x", ["N", 2, 7, 7])], [tensor_input("out", ["N", 6, 7, 7])], inits)


@pytest.mark.parametrize("rank", [0, 2])
def test_input_channels_no_split_layer_reads_leave_their_producer(rank):
    """After the split of "layer" into a sparse part over input channels 1, 4, 6 (and a rank-2 part),
    narrowing is exact; with no low-rank part nobody reads the other five channels, so the producer
    keeps three filters and the Gather goes; a low-rank part reads them all, so nothing changes."""
    from onnxdns.passes.sparse_lowrank import narrow_inputs as _narrow_inputs

    model = two_convs()
    ir_model = modelio.to_ir(model)
    layer = next(l for l in find_layers(ir_model.graph)[0] if l.node.name == "layer")
    w, k = layer.weight.astype(np.float64), layer.geometry.group_size
    keep = np.array([1, 4, 6])
    cols = (keep[:, None] * k + np.arange(k)).reshape(-1)
    p = RNG.standard_normal((6, rank)) if rank else np.zeros((6, 0))
    q = RNG.standard_normal((rank, w.shape[1])) * 0.1 if rank else np.zeros((0, w.shape[1]))
    emit.replace(ir_model.graph, layer, Factors(p, q, keep, w[:, cols], layer.bias.astype(np.float64), k))
    split = modelio.to_proto(ir_model)
    details = _narrow_inputs(ir_model, round_to=1)
    narrowed = modelio.to_proto(ir_model)
    onnx.checker.check_model(narrowed, full_check=True)
    assert_exact(split, narrowed, rel=1e-5, batch=3)
    producer = next(n for n in narrowed.graph.node if n.name == "producer")
    filters = {t.name: t.dims[0] for t in narrowed.graph.initializer}[producer.input[1]]
    if rank:
        assert filters == 8 and details["removed_channels"] == {}
    else:
        assert filters == 3 and "Gather" not in op_types(narrowed)
        assert details["removed_channels"] == {"producer": 5} and details["macs_after"] < details["macs_before"]


def tiny_net() -> onnx.ModelProto:
    """28x28 -> Conv 1->8 (pad 1) -> BN -> Relu -> Conv 8->16 (stride 2) -> Relu -> GAP
    -> Gemm 16->24 -> Relu -> Gemm 24->10."""
    bn = [init("g", RNG.uniform(0.5, 1.5, 8).astype(np.float32)), init("be", normal(8, scale=0.1)),
          init("mu", normal(8, scale=0.1)), init("var", RNG.uniform(0.5, 1.5, 8).astype(np.float32))]
    nodes = [
        helper.make_node("Conv", ["input", "c1.w", "c1.b"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "g", "be", "mu", "var"], ["n1"], name="bn1"),
        helper.make_node("Relu", ["n1"], ["r1"]),
        helper.make_node("Conv", ["r1", "c2.w", "c2.b"], ["c2"], name="conv2", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fc1.w", "fc1.b"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["hr"]),
        helper.make_node("Gemm", ["hr", "fc2.w", "fc2.b"], ["logits"], name="fc2", transB=1),
    ]
    inits = [init("c1.w", normal(8, 1, 3, 3, scale=0.5)), init("c1.b", normal(8, scale=0.1)),
             init("c2.w", normal(16, 8, 3, 3, scale=0.2)), init("c2.b", normal(16, scale=0.1)),
             init("fc1.w", normal(24, 16, scale=0.4)), init("fc1.b", normal(24, scale=0.1)),
             init("fc2.w", normal(10, 24, scale=0.3)), init("fc2.b", normal(10, scale=0.1))] + bn
    return make_model(nodes, [tensor_input("input", ["N", 1, 28, 28])], [tensor_input("logits", ["N", 10])], inits)


def relu_outputs(model: onnx.ModelProto, names: list[str], images: np.ndarray) -> list[np.ndarray]:
    return runtime.run(calibration.prefix_model(model, names), {"input": images})


def test_reported_errors_match_a_direct_computation():
    """The per-layer errors the pass reports equal ||h(split) - h(original)|| / ||h(original)|| computed
    directly with onnxruntime on the held-out images (every position sampled, so nothing differs)."""
    model = tiny_net()
    images = np.asarray(load_dataset("fashion-mnist", "train").images[:40], np.float32)
    ir_model = modelio.to_ir(model)
    from onnxdns.passes.fold_batchnorm import FoldBatchNormPass

    FoldBatchNormPass().call(ir_model)
    folded = modelio.to_proto(ir_model)
    settings = Settings(target_compression=2.5, min_rows=40000, max_rows=40000, iterations=10, threads=1,
                        skip=("fc1", "fc2"))
    details = split_model(ir_model, calibration.Inputs({"input": images}, {"input": 0}), settings)
    out = modelio.to_proto(ir_model)
    onnx.checker.check_model(out, full_check=True)
    held_out = images[details["calibration"]["fit_images"]:]
    rows = {r["name"]: r for r in details["layers"]}
    assert rows["conv1"]["status"] == "split" and rows["conv2"]["status"] == "split"
    for name, value in (("conv1", "r1"), ("conv2", "r2")):
        (ref,), (got,) = relu_outputs(folded, [value], held_out), relu_outputs(out, [value], held_out)
        direct = np.linalg.norm(got.astype(np.float64) - ref) / np.linalg.norm(ref)
        assert rows[name]["rel_error"] == pytest.approx(direct, rel=1e-3, abs=1e-6), name
        assert rows[name]["macs_after"] < rows[name]["macs_before"]
    assert details["skipped"] == {"fc1": "skipped on request", "fc2": "skipped on request"}


def test_comparison_baselines_cost_at_least_the_chosen_split():
    """With ``compare``, a split layer reports low-rank only (SVD, ADMM), sparse only and the best
    split with both parts, each at no fewer MACs than the chosen option; the data-aware low-rank fit
    is never worse than the data-free truncated SVD of the same rank."""
    model = tiny_net()
    images = np.asarray(load_dataset("fashion-mnist", "train").images[:48], np.float32)
    ir_model = modelio.to_ir(model)
    from onnxdns.passes.fold_batchnorm import FoldBatchNormPass

    FoldBatchNormPass().call(ir_model)
    settings = Settings(target_compression=1.3, min_rows=20000, max_rows=20000, iterations=4, threads=1,
                        skip=("conv1", "fc1", "fc2"), compare=True)
    details = split_model(ir_model, calibration.Inputs({"input": images}, {"input": 0}), settings)
    (row,) = [r for r in details["layers"] if r["status"] == "split"]
    assert row["name"] == "conv2"
    b = row["baselines"]
    assert set(b) == {"lowrank_svd", "lowrank_admm", "sparse_admm", "mixed_admm"}
    for key, value in b.items():
        assert value["macs"] >= row["macs_after"], key
        assert 0 <= value["rel_error"] < 1.5
    assert b["mixed_admm"]["rank"] > 0 and b["mixed_admm"]["keep"] > 0
    assert b["sparse_admm"]["keep"] > 0 and b["lowrank_admm"]["rank"] == b["lowrank_svd"]["rank"] > 0
    assert b["lowrank_admm"]["rel_error"] <= b["lowrank_svd"]["rel_error"] + 1e-6


def test_pass_on_real_data_is_idempotent_and_keeps_the_interface():
    model = tiny_net()
    options = {"calib_data": "fashion-mnist", "calib_samples": 96, "target_speedup": 1.6, "iterations": 5, "threads": 1,
               "speed_check": False}
    result = SparseLowRank(**options).apply(model)
    assert result.modified
    assert result.details["folded_batchnorm"] == ["conv1"]
    assert result.details["speed_check"]["skipped"] and "disabled" in result.details["speed_check"]["reason"]
    assert "BatchNormalization" not in op_types(result.model)
    assert [o.name for o in result.model.graph.output] == ["logits"]
    onnx.checker.check_model(result.model, full_check=True)
    feeds = {"input": np.asarray(load_dataset("fashion-mnist", "test").images[:16], np.float32)}
    assert run(result.model, feeds)[0].shape == (16, 10)
    assert result.details["split_layers"] >= 1
    check_idempotent(SparseLowRank, result.model, **options)


def test_options_are_checked():
    from onnxdns.errors import OnnxdnsError

    with pytest.raises(OnnxdnsError, match="above 1"):
        SparseLowRank(target_speedup=2, target_compression=1)
    with pytest.raises(OnnxdnsError, match="above 1"):
        SparseLowRank(target_speedup=0.5)
    with pytest.raises(OnnxdnsError, match="finetune_data"):
        SparseLowRank(np.zeros((4, 1, 28, 28), np.float32), finetune_epochs=1)


def test_calibration_images_are_resized_to_the_model_input():
    spec = calibration.InputSpec("x", np.dtype(np.float32), ("N", 3, 56, 40), 0)
    inputs, source = calibration.calibration_inputs("mnist", [spec], 5)
    images = inputs.arrays["x"]
    assert images.shape == (5, 3, 56, 40) and "mnist" in source
    np.testing.assert_array_equal(images[:, 0], images[:, 2])
    flat = np.full((2, 1, 28, 28), 0.25, np.float32)
    np.testing.assert_allclose(calibration.fit_images(flat, (1, 224, 224)), 0.25, atol=1e-6)


def test_cli_optimize_prints_the_layer_report(tmp_path, capsys):
    src = tmp_path / "tiny.onnx"
    onnx.save(tiny_net(), src)
    out = tmp_path / "out.onnx"
    status = cli.main(["optimize", str(src), "-o", str(out), "--passes", "sparse-lowrank", "--calib-data",
                       "fashion-mnist", "--calib-samples", "96", "--target-speedup", "1.6", "--no-validate",
                       "--no-speed-check"])
    text = capsys.readouterr().out
    assert status == 0, text
    assert "sparse-lowrank" in text and "rel. error" in text and "conv2" in text and "speed check skipped" in text
    assert any(MARK in n.name for n in onnx.load(out).graph.node)
    status = cli.main(["optimize", str(src), "-o", str(out), "--passes", "fold-batchnorm", "--target-speedup", "2"])
    assert status == 2
    assert "sparse-lowrank" in capsys.readouterr().err


def test_api_takes_pass_options(tmp_path):
    src = tmp_path / "tiny.onnx"
    onnx.save(tiny_net(), src)
    result = api.optimize(src, tmp_path / "out.onnx", passes=["sparse-lowrank"], validate=False,
                          pass_options={"sparse_lowrank": {"calib_data": "fashion-mnist", "calib_samples": 96,
                                                           "target_compression": 2.0, "iterations": 5,
                                                           "speed_check": False}})
    details = result.passes[0].details
    assert details["target"]["compression"] == 2.0
    assert details["params"]["after"] * 2 <= details["params"]["before"] or not details["target"]["reached"]


def test_sensitivities_are_measured_on_the_model_outputs():
    from onnxdns.lowrank.sensitivity import NOISE_SUFFIX, noisy_model, sensitivities
    from onnxdns.passes.fold_batchnorm import FoldBatchNormPass

    model = FoldBatchNormPass()(tiny_net())
    layers = find_layers(modelio.to_ir(model).graph)[0]
    images = np.asarray(load_dataset("fashion-mnist", "test").images[:64], np.float32)
    noisy = noisy_model(model, [layer.activated_name for layer in layers])
    probe = runtime.run(calibration.prefix_model(model, [layer.activated_name for layer in layers]), {"input": images})
    ones = {layer.activated_name + NOISE_SUFFIX: np.ones(p.shape, np.float32) for layer, p in zip(layers, probe)}
    np.testing.assert_allclose(run(noisy, {"input": images, **ones})[0], run(model, {"input": images})[0],
                               rtol=1e-6, atol=1e-6)
    sens = sensitivities(model, layers, calibration.Inputs({"input": images}, {"input": 0}), delta=0.05)
    assert all(np.isfinite(v) and v > 0 for v in sens.values())
    # fc2's output is the logits: a relative error there is the same relative error of the output
    assert sens[layers[-1].index] == pytest.approx(1.0, rel=0.25)


@pytest.mark.train
def test_finetune_updates_the_split_model_in_place():
    from onnxdns.lowrank.finetune import finetune

    result = SparseLowRank("fashion-mnist", calib_samples=96, target_speedup=1.6, iterations=3,
                               threads=1, speed_check=False).apply(modelio.to_ir(tiny_net()))
    model = result.model
    before = {n: v.const_value.numpy().copy() for n, v in model.graph.initializers.items() if MARK in n}
    summary = finetune(model, "fashion-mnist", epochs=1, lr=0.01, subset=640, test_subset=200, threads=1)
    assert summary["steps"] == 10 and len(summary["val_accuracy"]) == 1
    after = {n: v.const_value.numpy() for n, v in model.graph.initializers.items() if MARK in n}
    changed = [n for n in before if before[n].dtype == np.float32 and not np.array_equal(before[n], after[n])]
    assert changed and all(n in after for n in before)
    onnx.checker.check_model(modelio.to_proto(model), full_check=True)


@pytest.mark.train
def test_finetuning_from_an_unlabelled_folder_distills_from_the_model_before_the_split(tmp_path, capsys):
    """A user's model and a flat folder of images, no labels: calibration and fine-tuning read the
    same folder; the loss is distillation from the unsplit model."""
    from PIL import Image
    from test_sources import conv_model

    rng = np.random.default_rng(0)
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(48):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    src, out = tmp_path / "net.onnx", tmp_path / "split.onnx"
    onnx.save(conv_model(16), src)
    split = SparseLowRank(str(folder), calib_samples=32, target_compression=1.3, iterations=2, threads=1,
                          speed_check=False, finetune_epochs=1, finetune_lr=0.001,
                          finetune_batch_size=8).apply(onnx.load(src))
    summary = split.details["finetune"]
    assert summary["loss"] == "distill" and not summary["diverged"] and summary["steps"] > 0
    assert summary["metrics"][-1], summary  # fidelity to the unsplit model measured on held-out images
    assert any(MARK in n.name for n in split.model.graph.node)
    status = cli.main(["optimize", str(src), "-o", str(out), "--passes", "sparse-lowrank", "--calib-data", str(folder),
                       "--calib-samples", "32", "--target-compression", "1.3", "--finetune-epochs", "1",
                       "--no-speed-check", "--mean", "0.5", "--std", "0.25",
                       "--pass-option", "sparse-lowrank.finetune_batch_size=8"])
    assert status == 0, capsys.readouterr()
    assert out.exists()
